"""Tiny dmd_long (streaming DMD with a prompt switch, LoRA on generator and critic, VAE first-frame re-encode) on a
2 x 4 (data x fsdp) mesh of 8 host CPU devices: sharded params, finite losses, params that move, checkpoints, and
a resume from the step-2 checkpoint (the later ones deleted, as after a crash) that ends bit-identical to the
uninterrupted run; a tiny dmd_story step (a batch of stories that switch prompts at their own frames, split
over the devices); and story ODE pairs solved over the devices, then tiny ode_story steps.

XLA_FLAGS=--xla_force_host_platform_device_count=8 must be set before JAX starts its backend, so under a plain
pytest run ``test_dmd_long_on_8_host_devices`` re-runs this file in a subprocess with the flag and
``MEMFLOW_8DEV=1`` (and a persistent compilation cache in a temp folder, so the two runs compile once); only
there are the ``Test8Devices`` tests defined.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest

INNER = os.environ.get("MEMFLOW_8DEV") == "1"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS, STOP = 4, 2


# Required by the training issue: in the default run (~140 s alone on 2 cores).
def test_dmd_long_on_8_host_devices(tmp_path):
    if INNER:
        pytest.skip("already inside the 8-device subprocess")
    env = dict(os.environ, MEMFLOW_8DEV="1", XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "slow",
                           os.path.abspath(__file__), "--basetemp", str(tmp_path / "inner")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    out = "\n".join(line for line in (proc.stdout + proc.stderr).splitlines()
                    if "spmd_partitioner" not in line)  # XLA partitioner performance notes
    assert proc.returncode == 0, out[-8000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout, proc.stdout[-3000:]


if INNER:
    import chex
    import jax
    import numpy as np

    from memflow_jax import config as cfg_lib
    from memflow_jax.training import sharding as sh
    from memflow_jax.training import trainer as tr

    def _cfg(*extra: str):
        return cfg_lib.load(os.path.join(ROOT, "configs", "tiny_dmd_long.yaml"),
                            ["train.mesh_data=2", "train.mesh_fsdp=4", "run.progress=false", "train.save_interval=2",
                             *extra])

    def _host(tree):
        return jax.tree_util.tree_map(np.asarray, tree)

    def _final(trainer):
        return _host({"gen": trainer.gen, "critic": trainer.critic, "stream": trainer.carry})

    @pytest.fixture(scope="module")
    def runs(tmp_path_factory):
        base = tmp_path_factory.mktemp("dmd_long")
        out = {"dir_a": base / "a", "dir_b": base / "b"}
        a = tr.Trainer(_cfg(f"train.max_iters={STEPS}"), str(out["dir_a"]), log=lambda m: None)
        try:
            out["mesh"] = dict(a.mesh.shape)
            out["init"] = _host({"gen": a.gen.params, "critic": a.critic.params})
            out["history_a"] = a.train()  # (donates the train states: read the arrays afterwards)
            out["arrays"] = {"gen_base": a.gen_base, "teacher": a.teacher, "gen_lora": a.gen.params,
                             "critic_opt": a.critic.opt_state, "uncond": a.uncond, "stream": a.carry}
            out["final_a"] = _final(a)
            out["host_a"] = a.stream_host.to_json()
        finally:
            a.close()
        # a crash after step STOP: run a's folder with the later checkpoints gone (no second run to step STOP)
        shutil.copytree(out["dir_a"], out["dir_b"])
        for step in os.listdir(out["dir_b"] / "checkpoints"):
            if step.isdigit() and int(step) > STOP:
                shutil.rmtree(out["dir_b"] / "checkpoints" / step)
        c = tr.Trainer(_cfg(f"train.max_iters={STEPS}"), str(out["dir_b"]), log=lambda m: None)
        try:
            out["resumed_at"] = c.step
            out["history_c"] = c.train()
            out["final_c"] = _final(c)
            out["host_c"] = c.stream_host.to_json()
        finally:
            c.close()
        return out

    def _expected_shard(x) -> tuple[int, ...]:
        """Shard shape implied by the array's PartitionSpec (stated formula: dim / product of its mesh axes)."""
        mesh = x.sharding.mesh
        shape = list(x.shape)
        for i, axes in enumerate(tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))):
            if axes is None:
                continue
            axes = (axes,) if isinstance(axes, str) else axes
            shape[i] //= math.prod(mesh.shape[a] for a in axes)
        return tuple(shape)

    @pytest.mark.slow
    class Test8Devices:
        def test_mesh_and_params_really_sharded(self, runs):
            assert jax.device_count() == 8 and runs["mesh"] == {"data": 2, "fsdp": 4}
            arrays = runs["arrays"]
            split = 0
            for name in ("gen_base", "teacher", "gen_lora", "critic_opt"):
                for path, x in jax.tree_util.tree_flatten_with_path(arrays[name])[0]:
                    if not hasattr(x, "sharding") or x.ndim == 0:
                        continue
                    shard = x.addressable_shards[0].data.shape
                    assert shard == _expected_shard(x), (name, sh.path_str(path), x.shape, x.sharding.spec)
                    split += shard != x.shape
            assert split > 20  # FSDP: most params are split 4 ways
            k = arrays["gen_base"]["blocks"]["ffn_0"]["kernel"]  # [L, dim, ffn]: largest dim over fsdp
            assert k.addressable_shards[0].data.shape == (k.shape[0], k.shape[1], k.shape[2] // 4)
            a = arrays["gen_lora"]["blocks"]["ffn_2"]["a"]  # LoRA factor [L, ffn, r]
            assert a.addressable_shards[0].data.shape == (a.shape[0], a.shape[1] // 4, a.shape[2])
            for x in (arrays["uncond"], arrays["stream"].cond, arrays["stream"].state.history):
                assert x.addressable_shards[0].data.shape[0] == x.shape[0] // 8  # batch over data x fsdp
            kv = arrays["stream"].state.cache.k  # [L, B, W, N, H, D]: batch axis 1
            assert kv.addressable_shards[0].data.shape[1] == kv.shape[1] // 8

        def test_losses_finite_params_change_and_streaming_progress(self, runs):
            hist = runs["history_a"]
            assert [h["step"] for h in hist] == list(range(1, STEPS + 1))
            assert [("generator_loss" in h) for h in hist] == [True, False, True, False]  # ratio 2
            for h in hist:
                for k, v in h.items():
                    if k.endswith(("loss", "norm")):
                        assert np.isfinite(v), (h["step"], k, v)
            assert all(h["critic_loss"] > 0 for h in hist)
            assert hist[0]["generator_grad_norm"] > 0 and hist[0]["dmdtrain_gradient_norm"] > 0
            # sequences of 12 frames: 6 (gen) + 3 (critic), then 3 -> 12, then a new sequence
            assert [h["stream_length"] for h in hist] == [9, 12, 9, 12]
            init, final = runs["init"], runs["final_a"]
            moved = lambda a, b: max(float(np.max(np.abs(x - y))) for x, y in  # noqa: E731
                                     zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
            assert moved(final["gen"].params, init["gen"]) > 0
            assert moved(final["critic"].params, init["critic"]) > 0
            # LoRA b factors started at zero and were trained
            assert np.abs(final["gen"].params["blocks"]["self_attn"]["q"]["b"]).max() > 0

        def test_checkpoints_written(self, runs):
            ckpt = runs["dir_a"] / "checkpoints"
            assert sorted(int(d) for d in os.listdir(ckpt) if d.isdigit()) == [2, 4]
            items = set(os.listdir(ckpt / "4"))
            assert {"generator_lora", "generator_opt", "critic_lora", "critic_opt", "rng", "stream",
                    "meta"} <= items, items
            meta = json.loads((ckpt / "4" / "meta" / "metadata").read_text()) if (
                ckpt / "4" / "meta" / "metadata").exists() else None
            if meta is not None:
                assert meta["user"]["stream_host"]["length"] == 12
            assert (runs["dir_a"] / "lora_final" / "config.json").is_file()
            lines = (runs["dir_a"] / "metrics.jsonl").read_text().splitlines()
            assert len(lines) == STEPS
            assert os.path.isdir(runs["dir_a"] / "tb")

        def test_resume_matches_uninterrupted_run(self, runs):
            assert runs["resumed_at"] == STOP
            assert [h["step"] for h in runs["history_c"]] == list(range(STOP + 1, STEPS + 1))
            for ha, hc in zip(runs["history_a"][STOP:], runs["history_c"]):
                for k in ha:
                    if k.endswith(("loss", "norm")):
                        assert ha[k] == hc[k], (k, ha[k], hc[k])
            chex.assert_trees_all_equal(runs["final_a"], runs["final_c"])
            assert runs["host_a"] == runs["host_c"]
            assert runs["host_a"]["switch_frame"] == 6 and runs["host_a"]["length"] == 12

    @pytest.mark.slow
    def test_dmd_story_on_8_host_devices(tmp_path):
        """recipe dmd_story on the 2 x 4 mesh: 8 stories that switch prompts at their own frames, one per device
        (per-sample re-cache under a sharded batch): finite losses and a generator and critic that move."""
        from memflow_jax.storyworld import dataset as D

        stories = D.write_dataset(tmp_path / "stories", kind="stories", num_examples=8, seed=0, height=32, width=32,
                                  storage="files", num_latent=12, chunk=3, t_stride=4)
        cfg = cfg_lib.load(os.path.join(ROOT, "configs", "tiny_dmd_story.yaml"),
                           ["train.mesh_data=2", "train.mesh_fsdp=4", "run.progress=false", "train.max_iters=2",
                            "train.save_interval=2", f"train.video_data_path={stories}"])
        t = tr.Trainer(cfg, str(tmp_path / "run"), log=lambda m: None)
        try:
            assert dict(t.mesh.shape) == {"data": 2, "fsdp": 4} and t.global_batch == 8
            switches = {tuple(t.source[i]["switch_frames"]) for i in range(len(t.source))}
            init = _host({"gen": t.gen.params, "critic": t.critic.params})
            hist = t.train()
            final = _host({"gen": t.gen.params, "critic": t.critic.params})
        finally:
            t.close()
        assert len(switches) > 1  # the batch's stories switch at different frames
        assert [("generator_loss" in h) for h in hist] == [True, False]  # dfake_gen_update_ratio 2
        for h in hist:
            assert all(np.isfinite(v) for k, v in h.items() if k.endswith(("loss", "norm"))), h
        for name in ("gen", "critic"):
            assert max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree_util.tree_leaves(init[name]),
                                                                    jax.tree_util.tree_leaves(final[name]))) > 0

    @pytest.mark.slow
    def test_ode_story_on_8_host_devices(tmp_path):
        """ode_pairs --stories solves 8 stories as one batch split over the 8 devices (a prompt per frame, the
        batch sharding on [B, F, T, D] contexts), then recipe ode_story on the 2 x 4 mesh: finite losses and a
        generator that moves."""
        from memflow_jax.storyworld import dataset as D
        from memflow_jax.training import ode_pairs

        mesh = ["train.mesh_data=2", "train.mesh_fsdp=4"]
        stories = D.write_dataset(tmp_path / "stories", kind="stories", num_examples=8, seed=0, height=32, width=32,
                                  storage="files", num_latent=9, chunk=3, t_stride=4)
        pairs = tmp_path / "pairs"
        config = os.path.join(ROOT, "configs", "tiny_ode_story.yaml")
        assert ode_pairs.main(["--config", config, "--stories", str(stories), "--out", str(pairs), "--steps", "4",
                               *mesh]) == 0
        assert json.loads((pairs / "ode_pairs.json").read_text())["count"] == 8
        cfg = cfg_lib.load(config, [*mesh, "run.progress=false", "train.max_iters=2", "train.batch_size=1",
                                    f"train.latent_data_path={pairs}"])
        t = tr.Trainer(cfg, str(tmp_path / "run"), log=lambda m: None)
        try:
            assert dict(t.mesh.shape) == {"data": 2, "fsdp": 4} and t.global_batch == 8
            init = _host(t.gen.params)
            hist = t.train()
            final = _host(t.gen.params)
        finally:
            t.close()
        assert len(hist) == 2 and all(np.isfinite(h["story_loss"]) for h in hist)
        assert max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree_util.tree_leaves(init),
                                                                jax.tree_util.tree_leaves(final))) > 0
