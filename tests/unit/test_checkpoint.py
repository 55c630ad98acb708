"""Training checkpoints (save / restore / resume / crash safety) and the training state they hold
(TrainConfig, AdamW + clipping, EMA).

Sharded round trips need 8 devices: as in test_sharding.py, ``test_on_8_host_devices`` re-runs this file in a
subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8 and ``MEMFLOW_8DEV=1``, the only place the
``Test8Devices`` tests are defined. Everything else runs in-process on one device.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from memflow_jax import config as cfg_lib
from memflow_jax.data import make_loader
from memflow_jax.training import sharding as sh
from memflow_jax.training.checkpoint import CheckpointError, TrainCheckpointer
from memflow_jax.training.config import TrainConfig
from memflow_jax.training.optim import ema_init, ema_update, make_optimizer

INNER = os.environ.get("MEMFLOW_8DEV") == "1"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tree(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"blocks": {"ffn_0": {"kernel": rng.standard_normal((2, 8, 16)).astype(np.float32),
                                 "bias": rng.standard_normal((2, 16)).astype(np.float32)}},
            "head": {"head": {"kernel": rng.standard_normal((8, 3)).astype(np.float32)}}}


def _abstract(tree):
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), tree)


def _opt():
    return make_optimizer(1e-3, 0.0, 0.999, 0.01, 10.0)


def _state(seed: int):
    """A training state with non-trivial optimizer moments (numpy leaves: no per-op compiles)."""
    params = _tree(seed)
    st = jax.tree_util.tree_map(np.asarray, _opt().init(params))
    st = jax.tree_util.tree_map(lambda x: x + np.asarray(seed + 1, x.dtype), st)  # count, mu, nu all != 0
    return {"generator": params, "generator_opt": st, "ema": jax.tree_util.tree_map(lambda x: x * 0.5, params),
            "rng": jax.random.key(seed), "step": seed}


# --------------------------------------------------------------------------------------------------
# one device
# --------------------------------------------------------------------------------------------------


def test_round_trip_interval_and_max_to_keep(tmp_path):
    with TrainCheckpointer(tmp_path / "ck", save_interval_steps=2, max_to_keep=2) as ck:
        assert ck.restore_latest({"generator": _abstract(_tree())}) is None  # fresh run
        saved = [s for s in range(1, 8) if ck.save(s, _state(s), metadata={"config": {"lr": 1e-5}})]
        assert saved == [2, 4, 6]
        ck.wait_until_finished()
        assert ck.all_steps() == [4, 6]
        want = _state(6)
        abstract = jax.tree_util.tree_map(lambda x: x, jax.eval_shape(lambda: want))
        abstract["step"] = 0
        r = ck.restore_latest(abstract)
    assert r.step == 6 and r.metadata == {"config": {"lr": 1e-5}}
    chex.assert_trees_all_equal(r.state["generator"], want["generator"])
    chex.assert_trees_all_equal(r.state["ema"], want["ema"])
    chex.assert_trees_all_equal(r.state["generator_opt"], want["generator_opt"])  # optax namedtuples intact
    assert isinstance(r.state["generator_opt"][1][0], optax.ScaleByAdamState)
    assert r.state["step"] == 6
    np.testing.assert_array_equal(jax.random.key_data(r.state["rng"]), jax.random.key_data(jax.random.key(6)))


def test_optional_missing_and_reserved(tmp_path):
    with TrainCheckpointer(tmp_path / "ck", max_to_keep=None) as ck:
        st = _state(1)
        st["ema"] = None  # before ema_start_step: not saved
        ck.save(1, st)
        ck.wait_until_finished()
        abstract = {"generator": _abstract(_tree()), "ema": _abstract(_tree())}
        with pytest.raises(CheckpointError, match="ema"):
            ck.restore_latest(abstract)
        r = ck.restore_latest(abstract, optional=("ema",))
        assert r.state["ema"] is None
        chex.assert_trees_all_equal(r.state["generator"], st["generator"])
        with pytest.raises(CheckpointError, match="reserved"):
            ck.save(2, {"meta": _tree()})
        with pytest.raises(CheckpointError, match="restore failed"):
            ck.restore_latest({"generator": {"head": _abstract(_tree())["head"]}})


def test_data_iterator_resumes_exactly(tmp_path):
    source = [{"x": np.float32(i)} for i in range(23)]
    it = make_loader(source, batch_size=4, seed=3, shard_index=0, shard_count=1, num_threads=1)
    for _ in range(7):  # crosses an epoch boundary
        next(it)
    with TrainCheckpointer(tmp_path / "ck") as ck:
        ck.save(7, {"generator": _tree()}, data_iterator=it)
        expected = [next(it)["x"] for _ in range(5)]  # advancing during the async write is safe
        ck.wait_until_finished()
    fresh = make_loader(source, batch_size=4, seed=3, shard_index=0, shard_count=1, num_threads=1)
    with TrainCheckpointer(tmp_path / "ck") as ck:
        r = ck.restore_latest({"generator": _abstract(_tree())}, data_iterator=fresh)
    assert r.data_iterator_restored
    for want in expected:
        np.testing.assert_array_equal(next(fresh)["x"], want)

    class TwoWorkers:  # the state layout of a Grain loader with 2 workers: another loader than the saved one's
        def get_state(self):
            return {"next_index_in_cycle": 0, "iterators_in_use_indices": [0, 1],
                    "iterators_in_use_states": [{"next_index": 0}, {"next_index": 0}]}

        def set_state(self, state):
            raise AssertionError("a state of another layout must not reach the loader")

    with TrainCheckpointer(tmp_path / "ck") as ck, pytest.raises(CheckpointError, match="train.data_workers"):
        ck.restore_latest({"generator": _abstract(_tree())}, data_iterator=TwoWorkers())


def test_half_written_steps_are_ignored(tmp_path):
    d = tmp_path / "ck"
    with TrainCheckpointer(d, max_to_keep=None) as ck:
        for s in (1, 2):
            ck.save(s, {"generator": _tree(s)})
        ck.wait_until_finished()
    # a save interrupted before Orbax's rename (local disk) ...
    shutil.copytree(d / "2", d / "3.orbax-checkpoint-tmp-1234")
    # ... and one interrupted before its commit markers (object stores: no rename, commit file last)
    shutil.copytree(d / "2", d / "4")
    os.remove(d / "4" / "commit_success.txt")
    os.remove(d / "4" / "_CHECKPOINT_METADATA")
    shutil.rmtree(d / "4" / "generator")
    with TrainCheckpointer(d, max_to_keep=None) as ck:
        assert ck.all_steps() == [1, 2]
        r = ck.restore_latest({"generator": _abstract(_tree())})
        assert r.step == 2
        chex.assert_trees_all_equal(r.state["generator"], _tree(2))
        assert not (d / "4").exists() and os.listdir(d / "_incomplete")  # moved aside, not deleted
        assert ck.save(4, {"generator": _tree(4)})  # the step number is free again
        ck.wait_until_finished()
        assert ck.latest_step() == 4


def test_foreign_step_folders_are_an_error(tmp_path):
    (tmp_path / "ck" / "5").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="commit marker"):
        TrainCheckpointer(tmp_path / "ck")


def test_crash_mid_save_loses_only_the_unfinished_step(tmp_path):
    script = textwrap.dedent("""
        import os, sys
        import numpy as np
        from memflow_jax.training.checkpoint import TrainCheckpointer
        ck = TrainCheckpointer(sys.argv[1], max_to_keep=None)
        big = lambda v: {"w": np.full((4,), v, np.float32), "big": np.full((1 << 23,), v, np.float32)}
        ck.save(1, {"params": big(1.0)})
        ck.wait_until_finished()
        ck.save(2, {"params": big(2.0)})  # async: returns before the 32 MB are on disk
        os._exit(1)  # the process dies mid-save
    """)
    d = str(tmp_path / "ck")
    r = subprocess.run([sys.executable, "-c", script, d], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr[-3000:]
    names = os.listdir(d)
    abstract = {"params": {"w": jax.ShapeDtypeStruct((4,), np.float32),
                           "big": jax.ShapeDtypeStruct((1 << 23,), np.float32)}}
    with TrainCheckpointer(d) as ck:
        res = ck.restore_latest(abstract)
    if "2" in names and ck.all_steps() == [1, 2]:  # the write happened to finish: it must then be whole
        assert res.step == 2
    else:
        assert any(n.startswith("2.") for n in names) or "2" not in names
        assert res.step == 1
    v = float(res.step)
    np.testing.assert_array_equal(res.state["params"]["w"], np.full((4,), v, np.float32))
    assert float(res.state["params"]["big"].min()) == float(res.state["params"]["big"].max()) == v


# --------------------------------------------------------------------------------------------------
# training state: config, optimiser, EMA
# --------------------------------------------------------------------------------------------------


def test_train_config_reference_defaults_and_loading(tmp_path):
    t = TrainConfig()
    t.validate()
    # configs/train_long.yaml (+ default_config.yaml) values
    assert (t.lr, t.lr_critic, t.beta1, t.beta2, t.weight_decay) == (1e-5, 2e-6, 0.0, 0.999, 0.01)
    assert (t.dfake_gen_update_ratio, t.ema_weight, t.ema_start_step, t.guidance_scale) == (5, 0.99, 200, 3.0)
    assert (t.streaming_chunk_size, t.streaming_max_length, t.streaming_min_new_frame) == (21, 240, 18)
    assert t.switch_choices == tuple(range(21, 202, 18)) and (t.lora_rank, t.lora_alpha) == (256, 256.0)
    assert (t.min_step, t.max_step) == (20, 980)  # int(0.02 * 1000), int(0.98 * 1000)
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  recipe: dmd\n  lr: 2.0e-06\n  switch_choices: [21, 39]\n")
    cfg = cfg_lib.load(str(path), ["train.max_iters=700"])
    assert (cfg.train.recipe, cfg.train.lr, cfg.train.max_iters, cfg.train.switch_choices) == \
        ("dmd", 2e-6, 700, (21, 39))
    with pytest.raises(cfg_lib.ConfigError, match="train.not_a_key"):
        cfg_lib.load(None, ["train.not_a_key=1"])
    with pytest.raises(cfg_lib.ConfigError, match="switch_choices"):
        cfg_lib.load(None, ["train.switch_choices=[240, 300]"])
    with pytest.raises(cfg_lib.ConfigError, match="recipe"):
        cfg_lib.load(None, ["train.recipe=gan"])
    t.check_against(cfg_lib.SamplerConfig(chunk_frames=3))
    with pytest.raises(cfg_lib.ConfigError, match="chunk_frames"):
        t.check_against(cfg_lib.SamplerConfig(chunk_frames=4, num_output_frames=20))


def test_optimizer_matches_torch_adamw_formula():
    """torch.optim.AdamW after clip_grad_norm_: p -= lr*wd*p; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
    p -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)."""
    lr, b1, b2, wd, clip, eps = 1e-2, 0.5, 0.999, 0.1, 1.0, 1e-8
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal((5,)).astype(np.float64)
    grads = [rng.standard_normal((5,)) * s for s in (3.0, 0.1, 2.0)]  # clipped, not clipped, clipped
    p, m, v = p0.copy(), np.zeros(5), np.zeros(5)
    for t, g in enumerate(grads, start=1):
        n = np.linalg.norm(g)
        g = g * min(1.0, clip / n)
        p = p - lr * wd * p
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        p = p - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    opt = make_optimizer(lr, b1, b2, wd, clip, eps)

    @jax.jit
    def step(x, s, g):
        u, s = opt.update(g, s, x)
        return optax.apply_updates(x, u), s

    x = jnp.asarray(p0, jnp.float32)
    s = opt.init(x)
    for g in grads:
        x, s = step(x, s, jnp.asarray(g, jnp.float32))
    np.testing.assert_allclose(np.asarray(x), p, rtol=1e-5, atol=1e-6)


def test_ema_copy_until_start_then_blend():
    decay, start = 0.9, 2
    ema = ema_init({"w": np.zeros(3, jnp.bfloat16)})
    assert ema["w"].dtype == jnp.float32
    upd = jax.jit(ema_update, static_argnums=(3, 4))
    ema = upd(ema, {"w": np.full(3, 1.0, np.float32)}, 1, decay, start)  # step <= start: copy
    ema = upd(ema, {"w": np.full(3, 2.0, np.float32)}, 2, decay, start)
    np.testing.assert_allclose(ema["w"], 2.0)
    ema = upd(ema, {"w": np.full(3, 4.0, np.float32)}, 3, decay, start)  # blend: 0.9*2 + 0.1*4
    np.testing.assert_allclose(ema["w"], 0.9 * 2.0 + 0.1 * 4.0, rtol=1e-6)


def test_on_8_host_devices():
    """Runs the Test8Devices class below in a fresh interpreter with 8 CPU devices."""
    if INNER:
        assert jax.device_count() == 8
        return
    env = dict(os.environ, MEMFLOW_8DEV="1",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip())
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "8",
                        os.path.abspath(__file__)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and "failed" not in r.stdout


# --------------------------------------------------------------------------------------------------
# 8 devices (subprocess only)
# --------------------------------------------------------------------------------------------------

if INNER:

    class Test8Devices:
        def test_sharded_round_trip_and_reshard_on_restore(self, tmp_path):
            mesh = sh.make_mesh(2, 4)
            p_sh = sh.param_shardings(_abstract(_tree()), mesh)
            params = sh.shard_params(_tree(5), p_sh)
            opt = _opt()
            o_sh = sh.opt_state_shardings(opt, _abstract(_tree()), p_sh)
            ost = jax.jit(opt.init, out_shardings=o_sh)(params)
            with TrainCheckpointer(tmp_path / "ck", max_to_keep=1) as ck:
                ck.save(3, {"generator": params, "generator_opt": ost, "rng": jax.random.key(1)})
                ck.wait_until_finished()
                abstract = {"generator": _abstract(_tree()), "generator_opt": jax.eval_shape(opt.init, params),
                            "rng": jax.eval_shape(lambda: jax.random.key(0))}
                r = ck.restore_latest(abstract, {"generator": p_sh, "generator_opt": o_sh})
                for x, s in zip(jax.tree_util.tree_leaves(r.state["generator"]), jax.tree_util.tree_leaves(p_sh)):
                    assert x.sharding == s and not x.sharding.is_fully_replicated or x.ndim == 0
                chex.assert_trees_all_equal(r.state["generator"], _tree(5))
                mu = r.state["generator_opt"][1][0].mu["blocks"]["ffn_0"]["kernel"]
                assert tuple(mu.sharding.spec) == (None, None, "fsdp")
                # restore onto another mesh layout (1 x 8): Orbax reshards on read
                mesh8 = sh.make_mesh(1, 8)
                r8 = ck.restore_latest({"generator": _abstract(_tree())},
                                       {"generator": sh.param_shardings(_abstract(_tree()), mesh8)})
            k = r8.state["generator"]["blocks"]["ffn_0"]["kernel"]
            assert {s.data.shape for s in k.addressable_shards} == {(2, 8, 2)}
            np.testing.assert_array_equal(np.asarray(k), _tree(5)["blocks"]["ffn_0"]["kernel"])
