"""SMA — sparse memory activation: each head attends only to its top-k sink/bank frames.

Paper (eq. 5): r_j = <mean(q), mean(k_j)>, attend to the top-k frames by r_j. Release code: per (batch, head)
the query descriptor is the mean of the forward's post-RoPE queries, the frame descriptor the mean of the frame's
post-RoPE keys, no scaling, top-k kept in ascending candidate order. Works on arrays only.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def sma_select(q: jnp.ndarray, cand_k: jnp.ndarray, cand_valid: jnp.ndarray, top_k: int
               ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Pick ``top_k`` candidate frames per (batch, head).

    Args:
      q: [B, Lq, H, D] post-RoPE queries of the forward.
      cand_k: [B, M, N, H, D] candidate frames (sink then bank).
      cand_valid: [M] or [B, M] bool (unfilled slots are never picked ahead of a valid frame).
      top_k: static number of frames kept (when fewer are valid the surplus picks are marked invalid).
    Returns: (idx [B, H, k] ascending, valid [B, H, k] bool, scores [B, H, M] float32).
    """
    hp = lax.Precision.HIGHEST
    phi_q = jnp.mean(q.astype(jnp.float32), axis=1)  # [B, H, D]
    phi_k = jnp.mean(cand_k.astype(jnp.float32), axis=2)  # [B, M, H, D]
    scores = jnp.einsum("bhd,bmhd->bhm", phi_q, phi_k, precision=hp)
    valid = jnp.broadcast_to(cand_valid, (q.shape[0], cand_k.shape[1]))[:, None, :]  # [B, 1, M]
    masked = jnp.where(valid, scores, -jnp.inf)
    k = min(top_k, cand_k.shape[1])
    _, idx = lax.top_k(masked, k)
    idx = jnp.sort(idx, axis=-1).astype(jnp.int32)
    sel_valid = jnp.take_along_axis(jnp.broadcast_to(valid, scores.shape), idx, axis=-1)
    return idx, sel_valid, scores


def gather_frames(cand: jnp.ndarray, idx: jnp.ndarray) -> jnp.ndarray:
    """Per-head gather of frames: cand [B, M, N, H, D], idx [B, H, k] -> [B, k*N, H, D].

    One gather along the frame axis in the cache's own layout (no transposes of the candidates).
    """
    b, m, n, h, d = cand.shape
    index = jnp.swapaxes(idx, 1, 2)[:, :, None, :, None]  # [B, k, 1, H, 1]
    g = jnp.take_along_axis(cand, index, axis=1, mode="clip")  # [B, k, N, H, D]
    return g.reshape(b, -1, h, d)
