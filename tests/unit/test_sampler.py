"""Streaming sampler on a tiny random model: long runs, memory modes, prompt switches, bad input."""
from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memflow_jax.config import MemoryConfig, ModelConfig, SamplerConfig
from memflow_jax.nn import dit
from memflow_jax.memory.attend import LayerMemory, make_attend_fn
from memflow_jax.memory.cache import CacheSpec, ForwardPlan, commit, init_cache, recache_dead_frames
from memflow_jax.sampling.streaming import (ChunkSteps, PromptKV, StreamingSampler, memory_forward,
                                            to_model_layout, validate_schedule)
from tests import rand

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
    return [rand.normal(jax.random.PRNGKey(100 + i), (batch, MODEL.text_len, MODEL.text_dim))
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
    assert c.bank_k.shape[2] == spec.bank and c.window_k.shape[2] == spec.window and c.k.shape[2] == spec.slots
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


def test_on_state_hook_sees_each_chunk_start_after_the_switch(params):
    """``stream(on_state=...)``: called once a chunk with the state it starts from (the switch's re-cache already
    applied); returning it unchanged changes nothing, returning another state is what the chunk then reads."""
    from benchmarks.storyworld_eval import randomise_zero_head

    head_drawn, _ = randomise_zero_head(params, 0)  # a zero-init head would make x0 independent of the cache
    s = StreamingSampler(head_drawn, MODEL, MODES["nam"], SAMPLER, batch_size=1)
    plain = [np.asarray(x) for _, x, _ in s.stream(_contexts(2), [6], 12, rng=jax.random.PRNGKey(4))]
    seen = []

    def look(ci, state):
        seen.append((ci, int(state.frame)))
        return state

    hooked = [np.asarray(x) for _, x, _ in s.stream(_contexts(2), [6], 12, rng=jax.random.PRNGKey(4), on_state=look)]
    np.testing.assert_array_equal(np.concatenate(hooked, 1), np.concatenate(plain, 1))
    assert seen == [(0, 0), (1, 3), (2, 6), (3, 9)]
    zeroed = [np.asarray(x) for _, x, _ in s.stream(
        _contexts(2), [6], 12, rng=jax.random.PRNGKey(4),
        on_state=lambda ci, st: st.replace(cache=st.cache.replace(k=jnp.zeros_like(st.cache.k))) if ci == 3 else st)]
    np.testing.assert_array_equal(np.concatenate(zeroed[:3], 1), np.concatenate(plain[:3], 1))
    assert float(np.max(np.abs(zeroed[3] - plain[3]))) > 0


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
    short = jnp.zeros((1, SAMPLER.chunk_frames - 1, MODEL.in_dim, *SAMPLER.latent_hw))
    with pytest.raises(ValueError, match="chunk_frames"):
        s.chunk(s.init_state(), None, short, short[None])


@pytest.mark.parametrize("query", ["zeroed", "new_prompt"])
def test_nam_switch_query_variants(params, query):
    """Release: the re-cache NAM scores with an all-zero text query (every score 0); paper: with the new prompt."""
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


def test_in_place_cache_write_equals_stacked_commit(params):
    """A cache-writing forward writes each layer's K/V into the carried cache (``kv_carry``); the result equals
    returning every layer's frames stacked and committing them after the scan (the generic path)."""
    mem, n, (h, w) = MODES["nam"], SAMPLER.chunk_frames, SAMPLER.latent_hw
    spec = CacheSpec.from_config(mem, num_layers=MODEL.num_layers, batch=1,
                                 tokens_per_frame=dit.tokens_per_frame(MODEL, h, w), num_heads=MODEL.num_heads,
                                 head_dim=MODEL.head_dim, chunk_frames=n)
    cache = init_cache(spec)
    rnd = rand.normal(jax.random.PRNGKey(7), cache.k.shape)
    cache = cache.replace(k=rnd, v=-rnd, slot_frame=jnp.arange(spec.window, dtype=jnp.int32),
                          end_frame=jnp.array(9, jnp.int32), bank_pointer=jnp.array(2, jnp.int32))
    text = PromptKV(*dit.text_kv(params, MODEL, _contexts(1)[0]))
    x = rand.normal(jax.random.PRNGKey(8), (1, n, MODEL.in_dim, h, w))
    plan = ForwardPlan(start=jnp.array(9, jnp.int32), q_bank=jnp.array(True), recompute=jnp.array(False),
                       zero_text_query=jnp.array(False))

    @jax.jit
    def in_place(cache):
        flow, _, outs, (slots, placement) = memory_forward(params, MODEL, spec, mem, cache, x, 0.0, plan, text,
                                                           True)
        assert "kv" not in outs and "carry" in outs
        return flow, commit(cache, outs, slots, plan.start + n, placement)

    @jax.jit
    def stacked(cache):
        attend = make_attend_fn(spec, mem, plan, n, slot_frame=cache.slot_frame, bank_pointer=cache.bank_pointer,
                                proto_frame=cache.proto_frame, update_cache=True)
        layers = LayerMemory(cache.k, cache.v, cache.bank_k, cache.bank_v, cache.bank_frame, cache.proto_k,
                             cache.proto_v, text.k)
        flow, outs = dit.chunk_forward(params, MODEL, to_model_layout(x), jnp.zeros((1, n)), plan.start, text.k,
                                       text.v, attend, layers)
        return to_model_layout(flow), commit(cache, outs, attend.new_slot_frame, plan.start + n, attend.placement)

    flow, got = in_place(cache)
    flow2, want = stacked(cache)
    np.testing.assert_allclose(np.asarray(flow), np.asarray(flow2), rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-6)
    assert not np.allclose(np.asarray(got.k), np.asarray(cache.k))  # the chunk's frames did land


@pytest.mark.parametrize("mode", ["nam", "nam+sma", "sink", "none"])
def test_in_place_chunk_forwards_equal_generic_path(params, mode):
    """``attention_kv_splits != 1``: the chunk's forwards write their frames into the cache and attend there
    (``in_place``); with ``1`` they gather keys from [cache | bank | new frames]. Same videos and caches, across a
    prompt switch and the warm-up chunks."""
    runs = {}
    for splits in (1, 0):
        s = StreamingSampler(params, MODEL, MODES[mode], dataclasses.replace(SAMPLER, attention_kv_splits=splits))
        lat = [x0 for _, x0, _ in s.stream(_contexts(2), [9], 18, rng=jax.random.PRNGKey(4))]
        runs[splits] = (jnp.concatenate(lat, axis=1), s.current_state.cache)
    np.testing.assert_allclose(np.asarray(runs[0][0]), np.asarray(runs[1][0]), rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(runs[0][1], runs[1][1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["nam", "sink", "nam+sma", "none"])
def test_recache_prunes_only_dead_frames(params, mode):
    """A switch past the window re-encodes W frames; the first S are neither written nor attended (keys come only
    from cache slots), so the pruned re-cache (W - S frames) leaves the same cache. Under SMA the query mean pools
    every frame: nothing is pruned."""
    mem = MODES[mode]
    s = StreamingSampler(params, MODEL, mem, SAMPLER, batch_size=1)
    texts = [s.prompt_kv(c) for c in _contexts(2)]
    state = s.init_state()
    shape = (1, SAMPLER.chunk_frames, MODEL.in_dim, *SAMPLER.latent_hw)
    for i in range(5):  # 15 frames > W = 9 (none: 6)
        k1, k2 = jax.random.split(jax.random.PRNGKey(20 + i))
        state, _, _ = s.chunk(state, texts[0], rand.normal(k1, shape),
                              rand.normal(k2, (len(s.timesteps) - 1,) + shape))
    want_drop = 0 if mode in ("nam+sma", "none") else mem.sink_size
    assert recache_dead_frames(s.spec, int(state.frame), mem.sma) == want_drop
    assert recache_dead_frames(s.spec, s.spec.window, mem.sma) == 0  # from frame 0 the sink is re-written
    # the re-cache donates its state: each call gets its own copy
    pruned, _ = s.recache(jax.tree_util.tree_map(jnp.array, state), texts[1])
    full, _ = s.recache(jax.tree_util.tree_map(jnp.array, state), texts[1], prune=False)
    assert (s.spec.window, want_drop) in s.steps.recache
    chex.assert_trees_all_close(pruned, full, rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(pruned.cache.k), np.asarray(state.cache.k))  # the window was re-encoded


def test_steady_program_takes_over_once_every_key_slot_is_valid(params):
    """Where the in-place cuDNN path exists (GPU) ``StreamingSampler.chunk`` runs a chunk whose key slots are all
    valid (``ChunkSteps.steady``, read on the host) with a second program, compiled with the first chunk, whose
    layers read their keys without a per-layer validity conditional. Forced here on the CPU (where both programs
    gather their keys): the flag turns on once the window and bank are full and stays on across a prompt switch,
    the steady program is traced once, and the video and cache equal the one-program run."""
    mem = MODES["nam"]
    shape = (1, SAMPLER.chunk_frames, MODEL.in_dim, *SAMPLER.latent_hw)
    runs = {}
    for forced in (False, True):
        s = StreamingSampler(params, MODEL, mem, SAMPLER, batch_size=1)
        if forced:
            s.steps = ChunkSteps(MODEL, mem, SAMPLER, s.spec, s.timesteps, False)
            s.steps.fast_path = True  # what a GPU picks
        texts = [s.prompt_kv(c) for c in _contexts(2)]
        state, lat, flags = s.init_state(), [], []
        for i in range(7):
            if i == 5:  # frame 15 > W = 9
                state, _ = s.recache(state, texts[1])
            flags.append(bool(s.steps.steady(state)))
            k1, k2 = jax.random.split(jax.random.PRNGKey(40 + i))
            state, x0, _ = s.chunk(state, texts[int(i >= 5)], rand.normal(k1, shape),
                                   rand.normal(k2, (len(s.timesteps) - 1,) + shape))
            lat.append(x0)
        runs[forced] = (jnp.concatenate(lat, axis=1), state.cache, flags, s.trace_count)
    flags = runs[True][2]
    first = flags.index(True)
    assert 0 < first <= -(-s.spec.window // SAMPLER.chunk_frames) and all(flags[first:]), flags
    assert runs[False][2] == flags and runs[True][3] == 2  # a fresh ChunkSteps: each program traced once
    np.testing.assert_allclose(np.asarray(runs[True][0]), np.asarray(runs[False][0]), rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(runs[True][1], runs[False][1], rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="split-KV runs on the cuDNN path (GPU)")
@pytest.mark.parametrize("mode", ["nam", "nam+sma", "sink"])
def test_split_kv_attention_matches_one_call_on_gpu(mode):
    """bf16 on cuDNN: the sampler with ``attention_kv_splits`` = 2 or 3 / auto gives the one-call result (up to
    bf16)."""
    mcfg = dataclasses.replace(MODEL, dim=128, num_heads=2, ffn_dim=256, dtype="bfloat16", param_dtype="bfloat16")
    scfg = dataclasses.replace(SAMPLER, height=64, width=64)  # 8x8 latents -> 16 tokens per frame
    params = dit.init_params(mcfg, jax.random.PRNGKey(0))
    # key lengths: 11 (nam) / 9 (sink) frames of 16 tokens: divisible by the splits; nam+sma: in place (any split
    # but 1) reads the 6-frame window in that many segments (auto: 2) and gathers each head's 2 sink/bank frames
    mem = MODES[mode]
    outs = {}
    for splits in {"nam": (1, 2, 0), "nam+sma": (1, 2, 4, 0), "sink": (1, 3, 0)}[mode]:
        s = StreamingSampler(params, mcfg, mem, dataclasses.replace(scfg, attention_kv_splits=splits))
        lat = [x0 for _, x0, _ in s.stream(_contexts(2), [9], 18, rng=jax.random.PRNGKey(3))]
        outs[splits] = np.asarray(jnp.concatenate(lat, axis=1).astype(jnp.float32))
        assert s.steps.fast_path == (splits != 1) and s.trace_count == (2 if splits != 1 else 1)  # steady program
    for splits, lat in outs.items():
        np.testing.assert_allclose(lat, outs[1], rtol=0.05, atol=0.05, err_msg=f"kv_splits={splits}")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the in-place SMA path runs on cuDNN (GPU)")
def test_in_place_sma_batch_rows_on_gpu():
    """bf16 on cuDNN, batch 2: SMA's in-place path (window read in place, each row's per-head frames gathered from
    the flattened cache) gives the gather path's result for every batch row."""
    mcfg = dataclasses.replace(MODEL, dim=128, num_heads=2, ffn_dim=256, dtype="bfloat16", param_dtype="bfloat16")
    scfg = dataclasses.replace(SAMPLER, height=64, width=64)
    params = dit.init_params(mcfg, jax.random.PRNGKey(0))
    outs = {}
    for splits in (1, 0):
        s = StreamingSampler(params, mcfg, MODES["nam+sma"], dataclasses.replace(scfg, attention_kv_splits=splits),
                             batch_size=2)
        lat = [x0 for _, x0, _ in s.stream(_contexts(2, batch=2), [15], 27, rng=jax.random.PRNGKey(5))]
        outs[splits] = np.asarray(jnp.concatenate(lat, axis=1).astype(jnp.float32))
    assert not np.allclose(outs[1][0], outs[1][1])  # the rows differ, so a mixed-up row would show
    np.testing.assert_allclose(outs[0], outs[1], rtol=0.05, atol=0.05)
