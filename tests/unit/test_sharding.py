"""Mesh, logical-axis rules, param / optimizer-state / batch shardings, multi-host env detection.

Multi-device mechanism: XLA_FLAGS=--xla_force_host_platform_device_count=8 must be set before JAX starts its
backend, which an earlier test of the same pytest run may already have done with one CPU device. So under a
plain ``pytest`` run, ``test_on_8_host_devices`` re-runs this file in a subprocess with the flag and
``MEMFLOW_8DEV=1``; only in that subprocess are the ``Test8Devices`` tests defined (and they then assert that
8 devices exist). The other tests here need one device and run in-process.
"""
from __future__ import annotations

import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from memflow_jax.training import sharding as sh

INNER = os.environ.get("MEMFLOW_8DEV") == "1"

# tiny DiT-shaped tree (dims from a stated toy config: dim 16, ffn 32, 2 layers, C_in 4, patch 1x2x2,
# text_dim 12, freq_dim 6, out 4)
L, DIM, FFN, TEXT, FREQ, CIN, OUT, PATCH = 2, 16, 32, 12, 6, 4, 4, 1 * 2 * 2


def _dense(i, o, lead=()):
    return {"kernel": jax.ShapeDtypeStruct(lead + (i, o), jnp.float32),
            "bias": jax.ShapeDtypeStruct(lead + (o,), jnp.float32)}


def _attn():
    d = {n: _dense(DIM, DIM, (L,)) for n in ("q", "k", "v", "o")}
    d["norm_q"] = {"scale": jax.ShapeDtypeStruct((L, DIM), jnp.float32)}
    d["norm_k"] = {"scale": jax.ShapeDtypeStruct((L, DIM), jnp.float32)}
    return d


def dit_abstract() -> dict:
    return {
        "patch_embedding": _dense(PATCH * CIN, DIM),
        "text_embedding_0": _dense(TEXT, DIM), "text_embedding_2": _dense(DIM, DIM),
        "time_embedding_0": _dense(FREQ, DIM), "time_embedding_2": _dense(DIM, DIM),
        "time_projection": _dense(DIM, 6 * DIM),
        "blocks": {
            "self_attn": _attn(), "cross_attn": _attn(),
            "norm3": {"scale": jax.ShapeDtypeStruct((L, DIM), jnp.float32),
                      "bias": jax.ShapeDtypeStruct((L, DIM), jnp.float32)},
            "ffn_0": _dense(DIM, FFN, (L,)), "ffn_2": _dense(FFN, DIM, (L,)),
            "modulation": jax.ShapeDtypeStruct((L, 6, DIM), jnp.float32),
        },
        "head": {"head": _dense(DIM, OUT * PATCH), "modulation": jax.ShapeDtypeStruct((2, DIM), jnp.float32)},
    }


def _materialise(abstract, seed=0):
    leaves, tree = jax.tree_util.tree_flatten(abstract)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_unflatten(tree, [rng.standard_normal(x.shape).astype(np.float32) for x in leaves])


def _specs(shardings):
    return {sh.path_str(p): tuple(s.spec) for p, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}


# --------------------------------------------------------------------------------------------------
# one device (in-process)
# --------------------------------------------------------------------------------------------------


def test_logical_axes_table():
    r = sh.DEFAULT_RULES
    assert r.logical_axes("blocks/self_attn/q/kernel", 3) == ("layers", "embed", "heads")
    assert r.logical_axes("blocks/cross_attn/o/kernel", 3) == ("layers", "heads", "embed")
    assert r.logical_axes("blocks/ffn_0/kernel", 3) == ("layers", "embed", "mlp")
    assert r.logical_axes("blocks/ffn_2/kernel", 3) == ("layers", "mlp", "embed")
    assert r.logical_axes("params/blocks/attn/q/kernel", 3) == ("layers", "embed", "heads")  # UMT5 layout
    assert r.logical_axes("blocks/ffn/fc2/kernel", 3) == ("layers", "mlp", "embed")
    # anything else under blocks/ (norm3, LoRA factors): layers first, rest unnamed
    assert r.logical_axes("blocks/self_attn/q/lora_a", 3) == ("layers", None, None)
    assert r.logical_axes("0/mu/blocks/norm3/scale", 2) == ("layers", None)
    # unknown path or a rank the rule does not fit: all unnamed, never an error
    assert r.logical_axes("something/else", 2) == (None, None)
    assert r.logical_axes("blocks/ffn_0/kernel", 1) == ("layers",)


def test_single_device_mesh_replicates_everything():
    mesh = sh.make_mesh(1, 1, devices=jax.devices()[:1])
    specs = _specs(sh.param_shardings(dit_abstract(), mesh))
    assert all(all(a is None for a in s) for s in specs.values())


def test_make_mesh_errors():
    with pytest.raises(ValueError, match="devices"):
        sh.make_mesh(2, 2, devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="only one"):
        sh.make_mesh(-1, -1)


def test_maybe_initialize_distributed_env_detection():
    calls = []
    fake = lambda **kw: calls.append(kw)  # noqa: E731
    assert sh.maybe_initialize_distributed({}, fake) is False
    assert sh.maybe_initialize_distributed({"WORLD_SIZE": "1"}, fake) is False
    assert calls == []
    env = {"WORLD_SIZE": "16", "RANK": "9", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8",
           "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    assert sh.maybe_initialize_distributed(env, fake) is True
    assert calls[-1] == {"coordinator_address": "10.0.0.1:29500", "num_processes": 16, "process_id": 9,
                         "local_device_ids": [1]}
    env = {"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "fe80::1", "MASTER_PORT": "1234"}  # one process per host
    sh.maybe_initialize_distributed(env, fake)
    assert calls[-1] == {"coordinator_address": "[fe80::1]:1234", "num_processes": 2, "process_id": 1}
    sh.maybe_initialize_distributed({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4",
                                     "JAX_PROCESS_ID": "3"}, fake)
    assert calls[-1] == {"coordinator_address": "h:1", "num_processes": 4, "process_id": 3}
    sh.maybe_initialize_distributed({"SLURM_NTASKS": "4"}, fake)
    assert calls[-1] == {}  # JAX's own cluster auto-detection
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        sh.maybe_initialize_distributed({"WORLD_SIZE": "2", "RANK": "0"}, fake)


def test_on_8_host_devices():
    """Runs the Test8Devices class below in a fresh interpreter with 8 CPU devices."""
    if INNER:
        assert jax.device_count() == 8
        return
    env = dict(os.environ, MEMFLOW_8DEV="1",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip())
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__)],
                       cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and "failed" not in r.stdout


# --------------------------------------------------------------------------------------------------
# 8 devices (subprocess only)
# --------------------------------------------------------------------------------------------------

if INNER:

    class Test8Devices:
        def test_mesh_shapes(self):
            m = sh.make_mesh(2, 4)
            assert m.axis_names == ("data", "fsdp") and dict(m.shape) == {"data": 2, "fsdp": 4}
            assert dict(sh.make_mesh(2, -1).shape) == {"data": 2, "fsdp": 4}
            assert dict(sh.make_mesh(-1, 2, tensor=2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
            with pytest.raises(ValueError, match="8 are available"):
                sh.make_mesh(3, 2)

        def test_dit_tree_specs_2x4(self):
            mesh = sh.make_mesh(2, 4)
            specs = _specs(sh.param_shardings(dit_abstract(), mesh))
            # the layer axis is never sharded; fsdp goes on the largest dim divisible by 4 (first on ties)
            assert specs["blocks/self_attn/q/kernel"] == (None, "fsdp", None)
            assert specs["blocks/cross_attn/o/kernel"] == (None, "fsdp", None)
            assert specs["blocks/self_attn/q/bias"] == (None, "fsdp")
            assert specs["blocks/ffn_0/kernel"] == (None, None, "fsdp")  # ffn_dim 32 > dim 16
            assert specs["blocks/ffn_2/kernel"] == (None, "fsdp", None)
            assert specs["blocks/modulation"] == (None, None, "fsdp")  # 6 is not divisible by 4
            assert specs["time_projection/kernel"] == (None, "fsdp")  # 6*dim = 96
            assert specs["time_embedding_0/kernel"] == (None, "fsdp")  # freq_dim 6 not divisible
            assert specs["patch_embedding/kernel"] == ("fsdp", None)  # 16 x 16: first dim
            for path, spec in specs.items():
                assert "data" not in str(spec), path  # params are replicated over data
                if path.startswith("blocks/"):
                    assert spec[0] is None, path

        def test_params_really_sharded(self):
            mesh = sh.make_mesh(2, 4)
            abstract = dit_abstract()
            shardings = sh.param_shardings(abstract, mesh)
            host = _materialise(abstract)
            params = sh.shard_params(host, shardings)
            for (path, x), h in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree_util.tree_leaves(host)):
                spec = tuple(x.sharding.spec)
                expect = tuple(d // 4 if s == "fsdp" else d for d, s in zip(h.shape, spec + (None,) * 9))
                for shard in x.addressable_shards:
                    assert shard.data.shape == expect, sh.path_str(path)
                distinct = {tuple((i.start, i.stop) for i in s.index) for s in x.addressable_shards}
                assert len(distinct) == (4 if "fsdp" in spec else 1), sh.path_str(path)
                np.testing.assert_array_equal(np.asarray(x), h)

        def test_tiny_and_odd_dims_replicated(self):
            mesh = sh.make_mesh(2, 4)
            tree = {"odd": jnp.zeros((3, 5)), "scalar": jnp.zeros(()), "lora": {"blocks": {"a": jnp.zeros((2, 6, 3))}},
                    "step": 7}
            specs = _specs(sh.param_shardings(tree, mesh))
            assert specs["odd"] == (None, None) and specs["scalar"] == () and specs["step"] == ()
            assert specs["lora/blocks/a"] == (None, None, None)  # layers axis 2 excluded, 6 and 3 not divisible
            placed = sh.shard_params(tree, sh.param_shardings(tree, mesh))
            assert placed["odd"].sharding.is_fully_replicated
            assert int(placed["step"]) == 7

        def test_tensor_axis(self):
            mesh = sh.make_mesh(2, 2, tensor=2)
            specs = _specs(sh.param_shardings(dit_abstract(), mesh))
            assert specs["blocks/self_attn/q/kernel"] == (None, "fsdp", "tensor")
            assert specs["blocks/self_attn/o/kernel"] == (None, "tensor", "fsdp")
            assert specs["blocks/ffn_0/kernel"] == (None, "fsdp", "tensor")
            assert specs["blocks/ffn_2/bias"] == (None, "fsdp")
            assert specs["blocks/self_attn/norm_q/scale"] == (None, ("tensor", "fsdp"))

        def test_opt_state_shardings_mirror_params_and_train_step_runs(self):
            mesh = sh.make_mesh(2, 4)
            abstract = dit_abstract()
            p_sh = sh.param_shardings(abstract, mesh)
            opt = optax.chain(optax.clip_by_global_norm(10.0), optax.adamw(1e-3, b1=0.0, weight_decay=0.01))
            s_sh = sh.opt_state_shardings(opt, abstract, p_sh)
            adam = s_sh[1][0]
            assert tuple(adam.count.spec) == ()
            assert _specs(adam.mu) == _specs(p_sh) and _specs(adam.nu) == _specs(p_sh)
            params = sh.shard_params(_materialise(abstract), p_sh)
            state = jax.jit(opt.init, out_shardings=s_sh)(params)

            @jax.jit
            def step(p, s):
                g = jax.tree_util.tree_map(jnp.ones_like, p)
                u, s = opt.update(g, s, p)
                return optax.apply_updates(p, u), s

            new_p, new_s = step(params, state)
            chex.assert_trees_all_equal_shapes(new_p, params)
            for x, want in zip(jax.tree_util.tree_leaves(new_s[1][0].mu), jax.tree_util.tree_leaves(p_sh)):
                assert x.sharding.is_equivalent_to(want, x.ndim)

        def test_batch_sharding_and_process_slice(self):
            mesh = sh.make_mesh(2, 4)
            s = sh.batch_sharding(mesh, 16)
            assert tuple(s.spec) == (("data", "fsdp"),)
            x = jax.device_put(np.arange(16 * 3, dtype=np.float32).reshape(16, 3), s)
            assert {sh_.data.shape for sh_ in x.addressable_shards} == {(2, 3)}
            with pytest.raises(ValueError, match="divisible"):
                sh.batch_sharding(mesh, 12)
            assert sh.process_batch_slice(16, mesh) == slice(0, 16)  # one process holds every row
            assert sh.process_batch_slice(16) == slice(0, 16)
            g = sh.make_global_batch({"x": np.ones((8, 2), np.float32)}, mesh)
            assert g["x"].shape == (8, 2) and tuple(g["x"].sharding.spec) == (("data", "fsdp"),)
            act = sh.logical_sharding(mesh, ("batch", "seq", "embed"))
            assert tuple(act.spec) == (("data", "fsdp"), None, None)
