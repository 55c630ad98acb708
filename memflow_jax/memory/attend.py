"""One layer's self-attention over the memory: sink + (NAM-updated) bank + rolling window + this forward's frames.

:func:`make_attend_fn` returns the ``attend_fn(q, k, v, layer)`` that ``nn.dit.chunk_forward`` calls inside its
layer scan. It works on arrays (post-RoPE q/k, v, the layer's cache slices, the layer's text query), so any causal
model with a KV cache can use it. Reference semantics (MemFlow release):

* the forward's frames take their slots for this forward only (only cache-updating forwards persist them);
* keys = ``[sink (S frames), bank[:min(pointer, K)], window]`` — or, with SMA, ``[per-head top-k of sink+bank,
  window]``; valid frames are gathered to the front so attention needs only a key length (cuDNN flash attention
  takes ``key_value_seq_lengths``; attention is invariant to the order of keys);
* at ``q_bank`` forwards the pending prototype enters the bank (NAM once the bank is full) before attention;
  ``plan.q_bank`` may be a Python ``False`` (the sampler runs NAM once per chunk before its forwards,
  :func:`memory.nam.bank_update_layers`): then the bank is only read and not returned.

``in_place`` (the sampler's chunk forwards): the forward's frames are written into their cache slots first (the
clean pass overwrites them anyway), so every key already sits in the layer's contiguous slot region
``[sink | ring | bank]`` of the cache (:mod:`memory.cache`); once all slots are valid, cuDNN reads them there
(:func:`nn.attention.attention_in_place`, no gather), else the valid frames are gathered as above. With SMA the
window is read in place and only each head's top-k sink/bank frames are gathered (one more call, merged by
log-sum-exp), ranked by descriptors the sampler computes once per chunk (``LayerMemory.cand_mean``).
"""
from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax

from memflow_jax.config import MemoryConfig
from memflow_jax.memory import nam as nam_lib
from memflow_jax.memory import sma as sma_lib
from memflow_jax.memory.cache import (CacheSpec, ForwardPlan, chunk_placement, chunk_slots_contiguous,
                                      effective_slots, put_frames, slot_valid)
from memflow_jax.nn.attention import (attention, attention_in_place, auto_kv_splits, in_place_segments,
                                      resolve_impl)


SMA_AUTO_SEGMENTS = 2  # window segments of SMA's in-place path under attention_kv_splits=0 (measured best, H100)


@flax.struct.dataclass
class LayerMemory:
    """Per-layer slices handed to ``attend_fn`` through the layer scan (leading [L] axis when stacked)."""

    k: jnp.ndarray  # [B, W + K, N, H, D] the layer's cache slots (in place: the whole [L, B, W + K, ...] cache)
    v: jnp.ndarray
    bank_k: jnp.ndarray | None  # [B, K, N, H, D] a bank overriding the cache's bank slots (None: those)
    bank_v: jnp.ndarray | None
    bank_frame: jnp.ndarray  # [B, K]
    proto_k: jnp.ndarray  # [B, N, H, D]
    proto_v: jnp.ndarray
    text_query: jnp.ndarray  # [B, T, H, D] NAM query (the layer's cross-attention K of the prompt)
    index: jnp.ndarray | None = None  # [] int32 layer index (in place only)
    # [B, S + K, H, D] SMA descriptors of the sink and bank slots, computed once per chunk (in place only: its
    # forwards never write those slots once every slot is valid, the only time they are read)
    cand_mean: jnp.ndarray | None = None


def _valid_first(valid: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Frame order putting valid frames first (stable) and their count: ([M] int32, [] int32)."""
    return jnp.argsort(jnp.logical_not(valid), stable=True).astype(jnp.int32), jnp.sum(valid).astype(jnp.int32)


def _slot_validity(spec: CacheSpec, plan: ForwardPlan, n: int, slot_frame: jnp.ndarray, bank_pointer: jnp.ndarray):
    """The forward's placement, slot sources and validity: (placement, src, has, new_slot_frame, valid [W],
    bank_valid [K])."""
    placement = chunk_placement(plan, n, spec)  # (target slot [n], write flag [n])
    src, has, new_slot_frame = effective_slots(slot_frame, plan, n, spec, placement)
    valid = slot_valid(new_slot_frame, plan.start + n, spec)  # [W]
    bank_valid = jnp.arange(spec.bank) < jnp.minimum(bank_pointer, spec.bank)  # [K]
    return placement, src, has, new_slot_frame, valid, bank_valid


def keys_all_valid(spec: CacheSpec, plan: ForwardPlan, n: int, slot_frame: jnp.ndarray,
                   bank_pointer: jnp.ndarray) -> jnp.ndarray:
    """[] bool: every key slot (sink, window, bank) of a forward over ``n`` frames is valid, the condition under
    which :func:`make_attend_fn`'s in-place fast path runs (a stream's steady state)."""
    *_, valid, bank_valid = _slot_validity(spec, plan, n, slot_frame, bank_pointer)
    return jnp.all(valid) & jnp.all(bank_valid)


def in_place_fast_segments(spec: CacheSpec, mem: MemoryConfig, n: int, *, dtype: Any, cache_dtype: Any,
                           attention_impl: str = "auto", kv_splits: int = 0) -> int:
    """Key segments of the in-place fast path's cuDNN call over the stacked cache for a forward over ``n`` frames
    (keys read where they are once every slot is valid); 0 = no fast path on this backend (every forward gathers
    its keys). Static."""
    q = jax.ShapeDtypeStruct((spec.batch, n * spec.tokens_per_frame, spec.num_heads, spec.head_dim),
                             jnp.dtype(dtype))
    if jnp.dtype(cache_dtype) != q.dtype or resolve_impl(attention_impl, q, None) != "cudnn":
        return 0
    b, h, d, n_tok = spec.batch, spec.num_heads, spec.head_dim, spec.tokens_per_frame
    slots = spec.window + spec.bank
    if not mem.sma:
        length = slots * n_tok
        return in_place_segments(spec.num_layers * b * length, h, d, length,
                                 auto_kv_splits(b, q.shape[1], h, length) if kv_splits == 0 else kv_splits)
    if spec.sink + spec.bank == 0:
        return 0
    # SMA: the window is shared by every head and read in place (sampler.attention_kv_splits segments; auto: 2,
    # H100 0.296 s a chunk against 0.303 with 3 of the top-k part's size)
    return in_place_segments(spec.num_layers * b * slots * n_tok, h, d, (spec.window - spec.sink) * n_tok,
                             SMA_AUTO_SEGMENTS if kv_splits == 0 else kv_splits)


def make_attend_fn(spec: CacheSpec, mem: MemoryConfig, plan: ForwardPlan, n: int, *, slot_frame: jnp.ndarray,
                   bank_pointer: jnp.ndarray, proto_frame: jnp.ndarray, update_cache: bool,
                   attention_impl: str = "auto", precision: lax.Precision | None = None,
                   kv_splits: int = 1, in_place: bool = False, chunk_aligned: bool = False,
                   keys_valid: bool | None = None,
                   debug: bool = False) -> Callable[..., tuple[jnp.ndarray, dict[str, Any]]]:
    """Build the per-layer attention for a forward over ``n`` frames (static) described by ``plan``.

    The returned function maps ``(q, k, v, layer: LayerMemory)`` with q/k/v ``[B, n*N, H, D]`` to
    ``(out [B, n*N, H, D], outputs)``; ``outputs`` holds the updated bank (always), the forward's K/V frames
    and the prototype candidate (first frame) when ``update_cache`` (persisted by ``cache.commit``), and NAM/SMA
    traces when ``debug``. ``kv_splits``: see :func:`nn.attention.attention` (inference only).
    ``in_place``: the layer inputs carry the whole stacked cache and the layer index (``memory.cache.kv_in_place``);
    the forward's frames are written into it before attention and the written K/V come back in
    ``outputs["kv_state"]``. Needs a bank that is only read (``plan.q_bank is False``). ``chunk_aligned``: the
    caller guarantees ``plan.start`` is a multiple of ``n`` and no recompute (the sampler's chunk forwards), so the
    in-place write is one ``dynamic_update_slice`` per K and V where the slots allow
    (:func:`memory.cache.chunk_slots_contiguous`; H100: -2.5 ms a chunk against one write per frame).
    ``keys_valid``: None = each layer picks the in-place fast path or the gather on the device (a ``lax.cond`` a
    layer); True = the caller has checked that :func:`keys_all_valid` holds (the sampler's steady chunks), so
    each layer takes the fast path without a conditional (H100: -1.4 ms a sink chunk, -2.8 ms nam+sma).
    """
    if in_place and plan.q_bank is not False:
        raise ValueError("in-place attention needs a read-only bank (plan.q_bank=False): run NAM before the forward")
    S, K, N = spec.sink, spec.bank, spec.tokens_per_frame
    placement, src, has, new_slot_frame, valid, bank_valid = _slot_validity(spec, plan, n, slot_frame, bank_pointer)
    # pool frame of each key slot: cache slot j, bank slot i -> W + i, this forward's frame s -> W + K + s
    W = spec.window
    if in_place:  # the forward's frames are written into their slots: every key is a cache slot
        sink_src = jnp.arange(S, dtype=jnp.int32)
        ring_src = S + jnp.arange(W - S, dtype=jnp.int32)
    else:
        sink_src = jnp.where(has[:S], W + K + src[:S], jnp.arange(S)).astype(jnp.int32)  # [S]
        ring_src = jnp.where(has[S:], W + K + src[S:], S + jnp.arange(W - S)).astype(jnp.int32)  # [W - S]
    bank_src = W + jnp.arange(K, dtype=jnp.int32)  # [K]
    order, n_valid = _valid_first(jnp.concatenate([valid[:S], bank_valid, valid[S:]]))
    key_src = jnp.concatenate([sink_src, bank_src, ring_src])[order]  # [S + K + W - S] valid frames first
    all_valid = jnp.all(valid) & jnp.all(bank_valid)

    def attend(q, k, v, layer: LayerMemory):
        b, _, h, d = k.shape
        kf = k.reshape(b, n, N, h, d)
        vf = v.reshape(b, n, N, h, d)
        outs: dict[str, Any] = {}
        bank_k, bank_v, bank_frame = layer.bank_k, layer.bank_v, layer.bank_frame
        if bank_k is None and not in_place:  # the cache's own bank slots
            bank_k, bank_v = layer.k[:, W:], layer.v[:, W:]
        if K > 0 and plan.q_bank is not False:  # a Python False: the bank was updated before this forward
            tq = nam_lib.text_query_for(layer.text_query, plan.zero_text_query)
            nk, nv, nf, scores, kept = nam_lib.bank_update(
                bank_k, bank_v, bank_frame, layer.proto_k, layer.proto_v, proto_frame, bank_pointer, tq,
                mem.nam_aggregate)
            bank_k = jnp.where(plan.q_bank, nk, bank_k)
            bank_v = jnp.where(plan.q_bank, nv, bank_v)
            bank_frame = jnp.where(plan.q_bank, nf, bank_frame)
            outs["bank"] = (bank_k, bank_v, bank_frame)
            if debug:
                outs["nam_scores"], outs["nam_kept"] = scores, kept
        if update_cache:
            outs["first_frame"] = (kf[:, 0], vf[:, 0])
            if not in_place:
                outs["kv"] = (kf, vf)  # [B, n, N, H, D]; written into the cache slots by cache.commit
        dt = q.dtype
        fast = None
        cand_src = jnp.concatenate([sink_src, bank_src])  # [S + K] SMA's candidates (sink then bank): pool frames
        cand_valid = jnp.concatenate([valid[:S], bank_valid])
        if in_place:
            # the forward's frames go into their slots now; the keys are the layer's slot region [W + K]
            contiguous = chunk_aligned and chunk_slots_contiguous(spec, n)
            buf_k = put_frames(layer.k, kf, placement, layer.index, contiguous)
            buf_v = put_frames(layer.v, vf, placement, layer.index, contiguous)
            outs["kv_state"] = (buf_k, buf_v)

            def pool():  # the layer's slot region; sliced only where a gather reads it (a copy otherwise)
                return (lax.dynamic_index_in_dim(buf_k, layer.index, 0, keepdims=False).astype(dt),
                        lax.dynamic_index_in_dim(buf_v, layer.index, 0, keepdims=False).astype(dt))
            nb, slots = buf_k.shape[1:3]
            segments = in_place_fast_segments(spec, mem, n, dtype=dt, cache_dtype=buf_k.dtype,
                                              attention_impl=attention_impl, kv_splits=kv_splits)
            if not mem.sma:
                length = slots * N
                if segments:
                    starts = (layer.index * nb + jnp.arange(nb, dtype=jnp.int32)) * length

                    def fast(_):  # every slot valid: cuDNN reads the keys where they are
                        return attention_in_place(q, buf_k.reshape(1, -1, h, d), buf_v.reshape(1, -1, h, d),
                                                  starts, length, segments)
            elif S + K > 0:
                # SMA: the window is read in place; only each head's top-k frames are gathered, attended in one
                # more call and merged by log-sum-exp
                length = (W - S) * N
                if segments:
                    starts = ((layer.index * nb + jnp.arange(nb, dtype=jnp.int32)) * slots + S) * N

                    def fast(sel):  # every slot valid: [per-head frames (gathered), window (in place)]
                        flat_idx = ((layer.index * nb + jnp.arange(nb, dtype=jnp.int32))[:, None, None] * slots
                                    + jnp.take(cand_src, sel))  # [B, H, k] frames of the flattened buffer
                        idx = jnp.swapaxes(flat_idx, 0, 1).reshape(1, h, -1)  # [1, H, B*k] batch-major

                        def picked(buf):
                            g = sma_lib.gather_frames(buf.reshape((1, -1) + buf.shape[3:]), idx)  # [1, B*k*N, H, D]
                            return g.reshape(b, -1, h, d).astype(dt)
                        return attention_in_place(q, buf_k.reshape(1, -1, h, d), buf_v.reshape(1, -1, h, d),
                                                  starts, length, segments, extra=(picked(buf_k), picked(buf_v)))
        else:
            # every key frame comes from the pool [cache slots (W) | bank (K) | this forward's frames (n)] through
            # one gather per K and V (no placed copy of the cache; H100: -8 ms a chunk against place-then-concatenate)
            def pool():
                return (jnp.concatenate([layer.k[:, :W].astype(dt), bank_k.astype(dt), kf.astype(dt)], axis=1),
                        jnp.concatenate([layer.v[:, :W].astype(dt), bank_v.astype(dt), vf.astype(dt)], axis=1))

        def flat(x):
            return x.reshape(b, -1, h, d)

        if mem.sma and S + K > 0:
            phi_q = sma_lib.query_descriptor(q)

            def gathered_sma(_):
                pool_k, pool_v = pool()
                phi_k = sma_lib.frame_descriptors(jnp.take(pool_k, cand_src, axis=1))
                idx, sel_valid, scores = sma_lib.select_top_k(phi_q, phi_k, cand_valid, mem.sma_top_k)
                ring_order, n_ring = _valid_first(valid[S:])
                per_head = jnp.concatenate([jnp.take(cand_src, idx),  # [B, H, k] then the window, for all heads
                                            jnp.broadcast_to(ring_src[ring_order], (b, h, ring_src.shape[0]))],
                                           axis=-1)
                keys = sma_lib.gather_frames(pool_k, per_head)
                vals = sma_lib.gather_frames(pool_v, per_head)
                lengths = jnp.full((b,), (idx.shape[-1] + n_ring) * N, jnp.int32)
                mask = None
                if mem.sma_top_k > S:  # early chunks can have fewer valid candidates than picks: per-head mask
                    ring_ok = jnp.arange(spec.window - S) < n_ring
                    mask = jnp.concatenate([jnp.repeat(sel_valid, N, axis=-1),
                                            jnp.broadcast_to(jnp.repeat(ring_ok, N), (b, h, (spec.window - S) * N))],
                                           axis=-1)  # [B, H, Lk]
                    lengths = None
                return attention(q, keys, vals, kv_lengths=lengths, kv_mask=mask, impl=attention_impl,
                                 precision=precision, kv_splits=kv_splits), idx, scores

            def fast_sma(_):  # every slot valid: the candidates' descriptors were computed once for the chunk
                idx, _, scores = sma_lib.select_top_k(phi_q, layer.cand_mean, cand_valid, mem.sma_top_k)
                return fast(idx), idx, scores

            if fast is None or layer.cand_mean is None:
                out, idx, scores = gathered_sma(None)
            else:
                out, idx, scores = fast_sma(None) if keys_valid else lax.cond(all_valid, fast_sma, gathered_sma, None)
            if debug:
                outs["sma_idx"], outs["sma_scores"] = idx, scores
            return out, outs

        def gathered(_):
            # [sink, bank, window] with valid frames first, so attention needs only a key length (cuDNN)
            pool_k, pool_v = pool()
            keys = flat(jnp.take(pool_k, key_src, axis=1))
            vals = flat(jnp.take(pool_v, key_src, axis=1))
            lengths = jnp.full((b,), n_valid * N, jnp.int32)
            return attention(q, keys, vals, kv_lengths=lengths, impl=attention_impl, precision=precision,
                             kv_splits=kv_splits)

        if fast is None:
            out = gathered(None)
        else:
            out = fast(None) if keys_valid else lax.cond(all_valid, fast, gathered, None)
        return out, outs

    attend.new_slot_frame = new_slot_frame  # type: ignore[attr-defined]
    attend.placement = placement  # type: ignore[attr-defined]
    return attend
