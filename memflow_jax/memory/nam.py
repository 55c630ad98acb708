"""NAM — narrative adaptive memory: keep the bank frames most relevant to the prompt, plus a prototype.

Paper (eq. 3-4): S_j = Aggregate(Softmax(Q_text K_j^T / sqrt(d))); keep top-k frames, append the newest
chunk's prototype. Release code: the "text query" is the layer's cross-attention KEY cache of the prompt and the
aggregate is the mean of raw scaled logits (no softmax) over heads, text tokens and frame tokens
(``nam_aggregate="logits_mean"``, default); the paper's softmax mass is ``"softmax_mass"``.
Works on arrays only: any causal model with a KV cache can call it.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax


def text_query_for(text_query: jnp.ndarray, zeroed: jnp.ndarray) -> jnp.ndarray:
    """NAM's text query ``[B, T, H, D]``, all zero where ``zeroed`` (``[]`` or per sample ``[B]``; the release
    zeroes it right after a prompt switch)."""
    z = jnp.asarray(zeroed)
    z = z.reshape(z.shape + (1,) * (text_query.ndim - z.ndim))
    return jnp.where(z, jnp.zeros_like(text_query), text_query)


def nam_scores(text_query: jnp.ndarray, bank_k: jnp.ndarray, aggregate: str = "logits_mean") -> jnp.ndarray:
    """Relevance of each bank frame to the prompt, one score per (batch, frame), shared by all heads.

    Args:
      text_query: [B, T, H, D] (release: cross-attention K of the prompt, padding rows included).
      bank_k: [B, K, N, H, D] post-RoPE bank keys.
      aggregate: ``logits_mean`` — S_j = mean_{h,t,n} q_t·k_{j,n} / sqrt(D) (= mean_h of the dot product of the
        mean-pooled query and key, by linearity); ``softmax_mass`` — mean_{h,t} of the softmax mass over all bank
        tokens that falls on frame j (the paper's Aggregate(Softmax(·))).
    Returns: [B, K] float32.
    """
    d = text_query.shape[-1]
    q = text_query.astype(jnp.float32)
    k = bank_k.astype(jnp.float32)
    hp = lax.Precision.HIGHEST
    if aggregate == "logits_mean":
        qm = jnp.mean(q, axis=1)  # [B, H, D]
        km = jnp.mean(k, axis=2)  # [B, K, H, D]
        return jnp.mean(jnp.einsum("bhd,bkhd->bkh", qm, km, precision=hp), axis=-1) / math.sqrt(d)
    if aggregate == "softmax_mass":
        b, kk, n, h, _ = k.shape
        logits = jnp.einsum("bthd,bknhd->bhtkn", q, k, precision=hp) / math.sqrt(d)
        p = jax.nn.softmax(logits.reshape(b, h, q.shape[1], kk * n), axis=-1).reshape(b, h, q.shape[1], kk, n)
        return jnp.mean(jnp.sum(p, axis=-1), axis=(1, 2))
    raise ValueError(f"unknown nam_aggregate {aggregate!r}; use logits_mean | softmax_mass")


def nam_compress(bank_k: jnp.ndarray, bank_v: jnp.ndarray, bank_frame: jnp.ndarray, proto_k: jnp.ndarray,
                 proto_v: jnp.ndarray, proto_frame: jnp.ndarray, scores: jnp.ndarray
                 ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Keep the top-(K-1) frames by score (descending, ties to the lowest index) and append the prototype.

    Args: bank_k/v [B, K, N, H, D]; bank_frame [B, K]; proto_k/v [B, N, H, D]; proto_frame []; scores [B, K].
    Returns: new bank_k, bank_v, bank_frame and the kept indices [B, K-1] (in kept order).
    """
    kk = bank_k.shape[1]
    _, top = lax.top_k(scores, kk - 1)  # [B, K-1], shape-static

    def gather(x):
        idx = top.reshape(top.shape + (1,) * (x.ndim - 2))
        return jnp.take_along_axis(x, idx, axis=1)

    new_k = jnp.concatenate([gather(bank_k), proto_k[:, None]], axis=1)
    new_v = jnp.concatenate([gather(bank_v), proto_v[:, None]], axis=1)
    new_f = jnp.concatenate([jnp.take_along_axis(bank_frame, top, axis=1),
                             jnp.broadcast_to(proto_frame, (bank_frame.shape[0], 1))], axis=1)
    return new_k, new_v, new_f, top


def bank_update(bank_k: jnp.ndarray, bank_v: jnp.ndarray, bank_frame: jnp.ndarray, proto_k: jnp.ndarray,
                proto_v: jnp.ndarray, proto_frame: jnp.ndarray, pointer: jnp.ndarray,
                text_query: jnp.ndarray, aggregate: str = "logits_mean"
                ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Lazy prototype insertion done before a ``q_bank`` forward (release semantics).

    While ``pointer <= K`` the prototype is (re)written to slot ``pointer - 1`` without scoring; once the pointer
    exceeds the capacity, NAM compresses. Nothing happens before the first recorded chunk (pointer 0).
    Returns (bank_k, bank_v, bank_frame, scores [B, K], kept [B, K-1]); ``scores``/``kept`` are meaningful only
    when a compression ran (``pointer > K``).
    """
    kk = bank_k.shape[1]
    scores = nam_scores(text_query, bank_k, aggregate)
    ck, cv, cf, top = nam_compress(bank_k, bank_v, bank_frame, proto_k, proto_v, proto_frame, scores)
    slot = jnp.clip(pointer - 1, 0, kk - 1)
    hit = (jnp.arange(kk) == slot) & (pointer >= 1) & (pointer <= kk)  # [K]
    ik = jnp.where(hit[None, :, None, None, None], proto_k[:, None], bank_k)
    iv = jnp.where(hit[None, :, None, None, None], proto_v[:, None], bank_v)
    i_f = jnp.where(hit[None, :], proto_frame, bank_frame)
    compress = pointer > kk
    return (jnp.where(compress, ck, ik), jnp.where(compress, cv, iv), jnp.where(compress, cf, i_f),
            scores, top)


def bank_update_layers(k: jnp.ndarray, v: jnp.ndarray, window: int, bank_frame: jnp.ndarray, proto_k: jnp.ndarray,
                       proto_v: jnp.ndarray, proto_frame: jnp.ndarray, pointer: jnp.ndarray,
                       text_query: jnp.ndarray, aggregate: str = "logits_mean"
                       ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """:func:`bank_update` of every layer, written into the stacked K/V whose slots ``[window, window + K)`` hold
    the bank (``k, v: [L, B, W + K, N, H, D]``; per-layer ``bank_frame [L, B, K]``, ``proto_k/v [L, B, N, H, D]``,
    ``text_query [L, B, T, H, D]``; ``proto_frame`` and ``pointer`` shared). It reads only the cache and the
    prompt, so a sampler runs it once before a chunk's forwards instead of inside the first one.

    One ``lax.scan`` over the layers carries ``k``/``v`` and updates each layer's bank slots in place, so only one
    layer's new bank exists next to the cache (all layers' at once: 0.86 GB at Wan-1.3B size).
    Returns (k, v, bank_frame, scores [L, B, K], kept [L, B, K-1]).
    """
    kk = bank_frame.shape[-1]

    def body(kv, xs):
        i, bf, pk, pv, tq = xs
        start = (i, 0, window, 0, 0, 0)
        size = (1,) + kv[0].shape[1:2] + (kk,) + kv[0].shape[3:]
        bk, bv = (lax.dynamic_slice(x, start, size)[0] for x in kv)
        nk, nv, nf, scores, kept = bank_update(bk, bv, bf, pk, pv, proto_frame, pointer, tq, aggregate)
        nk, nv = lax.optimization_barrier((nk, nv))  # gathered from the slots it overwrites: materialise first
        kv = tuple(lax.dynamic_update_slice(x, new[None].astype(x.dtype), start) for x, new in zip(kv, (nk, nv)))
        return kv, (nf, scores, kept)

    layers = jnp.arange(k.shape[0], dtype=jnp.int32)
    (k, v), (bank_frame, scores, kept) = lax.scan(body, (k, v), (layers, bank_frame, proto_k, proto_v, text_query))
    return k, v, bank_frame, scores, kept
