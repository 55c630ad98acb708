"""Streaming sampler on a tiny random model: long runs, memory modes, prompt switches, bad input."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memflow_jax.config import MemoryConfig, ModelConfig, SamplerConfig
from memflow_jax.nn import dit
from memflow_jax.sampling.streaming import StreamingSampler, validate_schedule

MODEL = ModelConfig(dim=16, ffn_dim=32, num_heads=2, num_layers=2, freq_dim=16, text_len=4, text_dim=8,
                    in_dim=4, out_dim=4)
SAMPLER = SamplerConfig(height=32, width=32, num_output_frames=12)  # 4x4 latents -> 4 tokens per frame
MODES = {
    "none": MemoryConfig(mode="none", local_attn_size=6),
    "sink": MemoryConfig(mode="sink", local_attn_size=9),
    "nam": MemoryConfig(mode="nam", local_attn_size=9, bank_size=2, record_interval=1),
    "nam+sma": MemoryConfig(mode="nam", local_attn_size=9, bank_size=2, record_interval=1, sma=True,
                            sma_top_k=2),
}


@pytest.fixture(scope="module")
def params():
    return dit.init_params(MODEL, jax.random.PRNGKey(0))


def _contexts(n, batch=1):
    return [jax.random.normal(jax.random.PRNGKey(100 + i), (batch, MODEL.text_len, MODEL.text_dim))
            for i in range(n)]


def _shapes(state):
    return jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), state)


def test_long_run_static_shapes_one_trace(params):
    """>= 200 chunks: cache leaf shapes never change, the chunk step is traced once, no NaN, positions advance."""
    s = StreamingSampler(params, MODEL, MODES["nam+sma"], SAMPLER, batch_size=1)
    n_chunks = 200
    first = None
    x0_last = None
    traces_before = s.trace_count
    for ci, x0, _ in s.stream(_contexts(2), [300], n_chunks * 3, rng=jax.random.PRNGKey(1)):
        shapes = _shapes(s.current_state)
        if first is None:
            first = shapes
            traces_after_first = s.trace_count
        assert shapes == first, f"cache shapes changed at chunk {ci}"
        if ci % 50 == 0 or ci == n_chunks - 1:
            assert bool(jnp.all(jnp.isfinite(x0))), f"NaN at chunk {ci}"
        x0_last = x0
    assert traces_after_first - traces_before <= 1
    assert s.trace_count == traces_after_first, "the chunk step was re-traced after the first chunk"
    st = s.current_state
    assert int(st.frame) == 600 and int(st.cache.end_frame) == 600
    assert int(jnp.max(st.cache.slot_frame)) == 599  # absolute positions keep advancing (no frame-table cap)
    assert int(st.cache.bank_pointer) == n_chunks  # record_interval 1: one record per chunk
    assert bool(jnp.all(jnp.isfinite(x0_last)))


@pytest.mark.parametrize("mode", list(MODES))
def test_memory_modes_with_switches(params, mode):
    s = StreamingSampler(params, MODEL, MODES[mode], SAMPLER, batch_size=2)
    outs = [x0 for _, x0, _ in s.stream(_contexts(3, batch=2), [6, 15], 24, rng=jax.random.PRNGKey(2))]
    lat = jnp.concatenate(outs, axis=1)
    chex.assert_shape(lat, (2, 24, MODEL.in_dim, 4, 4))
    chex.assert_tree_all_finite(lat)
    c = s.current_state.cache
    spec = s.spec
    assert c.bank_k.shape[2] == spec.bank and c.k.shape[2] == spec.window
    if mode in ("none", "sink"):
        assert spec.bank == 0
    else:
        assert spec.bank == 2 and int(jnp.min(c.bank_frame)) >= 0  # bank filled with recorded frames
    # batch elements are independent streams: different noise -> different videos
    assert float(jnp.max(jnp.abs(lat[0] - lat[1]))) > 0


def test_explicit_noise_replays_rng_run(params):
    """The explicit-noise path (used by the parity tests) reproduces a run exactly."""
    s = StreamingSampler(params, MODEL, MODES["nam"], SAMPLER, batch_size=1)
    rng = np.random.default_rng(0)
    init = rng.normal(size=(1, 9, 4, 4, 4)).astype(np.float32)
    step = rng.normal(size=(3, 3, 1, 3, 4, 4, 4)).astype(np.float32)
    a = [np.asarray(x) for _, x, _ in s.stream(_contexts(1), [], 9, init_noise=init, step_noise=step)]
    b = [np.asarray(x) for _, x, _ in s.stream(_contexts(1), [], 9, init_noise=init, step_noise=step)]
    np.testing.assert_array_equal(np.concatenate(a, 1), np.concatenate(b, 1))


def test_bad_inputs(params):
    s = StreamingSampler(params, MODEL, MODES["nam"], SAMPLER, batch_size=1)
    with pytest.raises(ValueError, match="text_dim"):
        s.prompt_kv(jnp.zeros((1, MODEL.text_len, MODEL.text_dim + 1)))
    with pytest.raises(ValueError, match="multiple of the chunk"):
        validate_schedule([], 1, 10, 3)
    with pytest.raises(ValueError, match="chunk boundary"):
        validate_schedule([4], 2, 12, 3)
    with pytest.raises(ValueError, match="increase"):
        validate_schedule([6, 6], 3, 12, 3)
    with pytest.raises(ValueError, match="switch frames"):
        validate_schedule([3], 3, 12, 3)
    with pytest.raises(ValueError, match="multiple"):
        SamplerConfig(num_output_frames=10).validate()


@pytest.mark.parametrize("query", ["zeroed", "new_prompt"])
def test_nam_switch_query_variants(params, query):
    """Release: the re-cache NAM scores with an all-zero text query (every score 0); paper: with the new prompt."""
    import dataclasses
    mem = dataclasses.replace(MODES["nam"], nam_switch_query=query)
    s = StreamingSampler(params, MODEL, mem, SAMPLER, batch_size=1, debug=True)
    recache_scores = None
    for ci, x0, dbg in s.stream(_contexts(2), [9], 12, rng=jax.random.PRNGKey(3)):
        if x0 is None:  # the re-cache forward at the switch (bank full: pointer 3 > 2 -> NAM compresses)
            recache_scores = np.asarray(dbg["recache"]["nam_scores"])
    assert recache_scores is not None
    if query == "zeroed":
        assert np.all(recache_scores == 0.0)
    else:
        assert np.any(recache_scores != 0.0)
