"""Unit tests of the memory package (cache slots, NAM, SMA) on small random arrays."""
from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memflow_jax.config import MemoryConfig
from memflow_jax.memory import nam, sma
from memflow_jax.memory.cache import (CacheSpec, ForwardPlan, chunk_placement, chunk_slots_contiguous,
                                      effective_slots, init_cache, put_frames, reference_slot_order, slot_valid)
from tests import rand


def _spec(window=12, sink=3, bank=3, chunk=3, ri=1) -> CacheSpec:
    return CacheSpec(num_layers=2, batch=1, window=window, sink=sink, bank=bank, tokens_per_frame=4, num_heads=2,
                     head_dim=8, chunk_frames=chunk, record_interval=ri)


def _plan(start, recompute=False) -> ForwardPlan:
    return ForwardPlan(jnp.array(start, jnp.int32), jnp.array(False), jnp.array(recompute), jnp.array(False))


def test_nam_logits_mean_equals_bruteforce():
    # S_j = mean_{h,t,n} q_t . k_{j,n} / sqrt(D)  (the reference's aggregate, no softmax)
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
    k = rng.normal(size=(2, 4, 6, 3, 8)).astype(np.float32)
    got = np.asarray(nam.nam_scores(jnp.asarray(q), jnp.asarray(k)))
    want = np.einsum("bthd,bjnhd->bjthn", q.astype(np.float64), k).mean(axis=(2, 3, 4)) / math.sqrt(8)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_nam_softmax_mass_is_a_distribution():
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(1, 5, 2, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 3, 4, 2, 8)), jnp.float32)
    s = np.asarray(nam.nam_scores(q, k, "softmax_mass"))
    np.testing.assert_allclose(s.sum(axis=-1), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="nam_aggregate"):
        nam.nam_scores(q, k, "bogus")


def test_nam_compress_keeps_topk_in_descending_order_then_prototype():
    b, kk = 1, 4
    bank_k = jnp.arange(b * kk, dtype=jnp.float32).reshape(b, kk, 1, 1, 1)
    frames = jnp.array([[10, 11, 12, 13]], jnp.int32)
    scores = jnp.array([[0.1, 0.9, 0.5, 0.7]])
    proto = jnp.full((b, 1, 1, 1), 99.0)
    nk, nv, nf, top = nam.nam_compress(bank_k, bank_k, frames, proto, proto, jnp.array(20), scores)
    assert top.tolist() == [[1, 3, 2]]
    assert nf.tolist() == [[11, 13, 12, 20]]
    assert np.asarray(nk).ravel().tolist() == [1.0, 3.0, 2.0, 99.0]
    # all-zero query: every score ties, lax.top_k keeps the lowest indices in order (torch CPU did the same)
    _, _, _, top0 = nam.nam_compress(bank_k, bank_k, frames, proto, proto, jnp.array(20), jnp.zeros((1, kk)))
    assert top0.tolist() == [[0, 1, 2]]


@pytest.mark.parametrize("pointer,expect", [(0, [-1, -1, -1]), (1, [7, -1, -1]), (3, [0, 1, 7]),
                                            (4, "compress")])
def test_bank_update_lazy_insert(pointer, expect):
    kk = 3
    bank_k = jnp.zeros((1, kk, 2, 1, 4))
    bank_f = jnp.array([[-1, -1, -1]]) if pointer < 3 else jnp.array([[0, 1, 2]])
    if pointer == 3:
        bank_f = jnp.array([[0, 1, 5]])
    proto = jnp.ones((1, 2, 1, 4))
    tq = jnp.ones((1, 3, 1, 4))
    _, _, nf, _, _ = nam.bank_update(bank_k, bank_k, bank_f, proto, proto, jnp.array(7), jnp.array(pointer), tq)
    if expect == "compress":
        assert nf.shape == (1, kk) and int(nf[0, -1]) == 7
    else:
        assert nf.tolist() == [expect]


def test_bank_update_layers_equals_each_layer():
    """The sampler's once-per-chunk NAM over stacked layers, written into the cache's bank slots == bank_update
    layer by layer; the window slots are untouched."""
    rng = np.random.default_rng(5)
    L, b, kk, n, h, d, t, w = 2, 2, 3, 4, 2, 8, 5, 4
    k, v = (jnp.asarray(rng.normal(size=(L, b, w + kk, n, h, d)), jnp.float32) for _ in range(2))
    bk, bv = k[:, :, w:], v[:, :, w:]
    pk, pv = (jnp.asarray(rng.normal(size=(L, b, n, h, d)), jnp.float32) for _ in range(2))
    bf = jnp.broadcast_to(jnp.array([0, 3, 6]), (L, b, kk))
    tq = jnp.asarray(rng.normal(size=(L, b, t, h, d)), jnp.float32)
    nk, nv, *got = jax.jit(nam.bank_update_layers, static_argnums=2)(k, v, w, bf, pk, pv, jnp.array(9),
                                                                     jnp.array(4), tq)
    chex.assert_trees_all_equal((nk[:, :, :w], nv[:, :, :w]), (k[:, :, :w], v[:, :, :w]))
    got = (nk[:, :, w:], nv[:, :, w:], *got)
    for layer in range(L):
        want = nam.bank_update(bk[layer], bv[layer], bf[layer], pk[layer], pv[layer], jnp.array(9), jnp.array(4),
                               tq[layer])
        # scores: float32 sums in a different (batched) order on GPU -> rtol 1e-5; the choices must be identical
        chex.assert_trees_all_close(jax.tree_util.tree_map(lambda x: x[layer], got), want, rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_equal(got[4][layer], want[4])


def test_sma_select_sorted_valid_first_and_gather():
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.normal(size=(2, 6, 3, 8)), jnp.float32)
    cand = jnp.asarray(rng.normal(size=(2, 5, 4, 3, 8)), jnp.float32)
    valid = jnp.array([True, True, False, True, False])
    idx, sel_valid, scores = sma.sma_select(q, cand, valid, 3)
    chex.assert_shape(idx, (2, 3, 3))
    assert np.all(np.diff(np.asarray(idx), axis=-1) > 0)  # ascending
    assert bool(jnp.all(sel_valid))  # 3 valid candidates -> all picked
    assert set(np.asarray(idx).ravel().tolist()) <= {0, 1, 3}
    want = np.einsum("bhd,bmhd->bhm", np.asarray(q).mean(1), np.asarray(cand).mean(2))
    np.testing.assert_allclose(np.asarray(scores), want, rtol=1e-5, atol=1e-6)
    g = np.asarray(sma.gather_frames(cand, idx))  # [B, 3*N, H, D]
    for b in range(2):
        for h in range(3):
            want_h = np.concatenate([np.asarray(cand)[b, j, :, h] for j in np.asarray(idx)[b, h]])
            np.testing.assert_array_equal(g[b, :, h], want_h)
    # fewer valid than top_k: the surplus picks are flagged invalid
    _, sv, _ = sma.sma_select(q, cand, jnp.array([True, False, False, False, False]), 3)
    assert np.asarray(sv).sum(axis=-1).tolist() == [[1, 1, 1], [1, 1, 1]]


def test_slot_descriptors_are_the_candidates_means():
    """The per-chunk SMA descriptors of a stacked cache [L, B, W + K, N, H, D]: sink slots then bank slots."""
    k = jnp.asarray(np.random.default_rng(3).normal(size=(2, 1, 7, 4, 3, 8)), jnp.float32)  # W = 5, K = 2, S = 2
    got = sma.slot_descriptors(k, 2, 5, jnp.bfloat16)
    chex.assert_shape(got, (2, 1, 4, 3, 8))
    want = np.asarray(k.astype(jnp.bfloat16).astype(jnp.float32))[:, :, [0, 1, 5, 6]].mean(3)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)


def test_window_holds_sink_plus_last_frames_over_a_long_run():
    spec = _spec()
    slot_frame = init_cache(spec).slot_frame
    for start in range(0, 90, 3):
        src, has, slot_frame = effective_slots(slot_frame, _plan(start), 3, spec)
        end = start + 3
        valid = np.asarray(slot_valid(slot_frame, jnp.array(end), spec))
        held = sorted(int(f) for f, ok in zip(np.asarray(slot_frame), valid) if ok)
        want = sorted(set(range(min(spec.sink, end))) | set(range(max(spec.sink, end - spec.ring), end)))
        assert held == want, (start, held, want)
    order = np.asarray(reference_slot_order(slot_frame, spec))
    frames = np.asarray(slot_frame)[order]
    assert frames[:3].tolist() == [0, 1, 2] and np.all(np.diff(frames[3:]) == 1)


def test_recompute_protects_the_sink_and_drops_old_frames():
    spec = _spec()
    target, write = chunk_placement(_plan(3, recompute=True), 12, spec)  # frames 3..14 re-encoded at frame 15
    assert np.asarray(write).tolist() == [False] * 3 + [True] * 9
    target, write = chunk_placement(_plan(0), 6, spec)  # recache from frame 0: sink rewritten
    assert bool(jnp.all(write)) and np.asarray(target).tolist() == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("window,sink,chunk", [(12, 3, 3), (12, 0, 3), (9, 3, 3), (8, 2, 2), (10, 3, 3),
                                                (12, 4, 3), (7, 0, 3)])
def test_contiguous_chunk_writes_match_frame_by_frame(window, sink, chunk):
    """Where :func:`chunk_slots_contiguous` holds, every chunk-aligned forward lands in consecutive slots with every
    frame written, and the one-write path of :func:`put_frames` equals one write per frame; where it does not
    (the ring or the sink not a multiple of the chunk), some chunk straddles a wrap."""
    spec = _spec(window=window, sink=sink, chunk=chunk)
    contiguous = chunk_slots_contiguous(spec, chunk)
    assert contiguous == (sink % chunk == 0 and (window - sink) % chunk == 0)
    buf = rand.normal(jax.random.PRNGKey(0), (2, 1, spec.slots, 4, 2, 8))
    straddles = False
    for start in range(0, 40 * chunk, chunk):
        target, write = chunk_placement(_plan(start), chunk, spec)
        t = np.asarray(target)
        consecutive = bool(np.all(t == t[0] + np.arange(chunk))) and bool(np.all(np.asarray(write)))
        straddles |= not consecutive
        if contiguous:
            assert consecutive, (start, t)
            frames = rand.normal(jax.random.PRNGKey(start + 1), (1, chunk, 4, 2, 8))
            layer = jnp.array(start % 2, jnp.int32)
            np.testing.assert_array_equal(put_frames(buf, frames, (target, write), layer, contiguous=True),
                                          put_frames(buf, frames, (target, write), layer))
    assert straddles != contiguous


def test_spec_from_config_modes_and_errors():
    kw = dict(num_layers=1, batch=1, tokens_per_frame=4, num_heads=1, head_dim=8, chunk_frames=3)
    assert (CacheSpec.from_config(MemoryConfig(mode="none"), **kw).sink,
            CacheSpec.from_config(MemoryConfig(mode="none"), **kw).bank) == (0, 0)
    s = CacheSpec.from_config(MemoryConfig(mode="sink"), **kw)
    assert (s.sink, s.bank) == (3, 0)
    s = CacheSpec.from_config(MemoryConfig(mode="nam", bank_size=4), **kw)
    assert (s.sink, s.bank) == (3, 4)
    with pytest.raises(ValueError, match="local_attn_size"):
        CacheSpec.from_config(MemoryConfig(local_attn_size=5, sink_size=3), **kw)
    c = init_cache(s)
    chex.assert_shape(c.k, (1, 1, 12 + 4, 4, 1, 8))  # window slots, then bank slots
    chex.assert_shape(c.window_k, (1, 1, 12, 4, 1, 8))
    chex.assert_shape(c.bank_k, (1, 1, 4, 4, 1, 8))
    assert s.slots == 16 and c.window == 12
    jax.tree_util.tree_map(lambda x: None, c)  # a registered pytree
