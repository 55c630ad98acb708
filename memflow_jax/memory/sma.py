"""SMA — sparse memory activation: each head attends only to its top-k sink/bank frames.

Paper (eq. 5): r_j = <mean(q), mean(k_j)>, attend to the top-k frames by r_j. Release code: per (batch, head)
the query descriptor is the mean of the forward's post-RoPE queries, the frame descriptor the mean of the frame's
post-RoPE keys, no scaling, top-k kept in ascending candidate order. Works on arrays only.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def query_descriptor(q: jnp.ndarray) -> jnp.ndarray:
    """Mean of a forward's post-RoPE queries over its tokens: [B, Lq, H, D] -> [B, H, D] float32."""
    return jnp.mean(q.astype(jnp.float32), axis=1)


def frame_descriptors(frames: jnp.ndarray) -> jnp.ndarray:
    """Mean of each frame's post-RoPE keys over its tokens: [..., M, N, H, D] -> [..., M, H, D] float32."""
    return jnp.mean(frames.astype(jnp.float32), axis=-3)


def slot_descriptors(k: jnp.ndarray, sink: int, window: int, dtype=None) -> jnp.ndarray:
    """Descriptors of the candidate slots of a stacked cache ``k [L, B, W + K, N, H, D]`` (sink slots
    ``[0, sink)``, bank slots ``[window, W + K)``), read as ``dtype`` (the compute dtype attention sees):
    ``[L, B, sink + K, H, D]`` float32."""
    dtype = dtype or k.dtype
    return jnp.concatenate([frame_descriptors(k[:, :, :sink].astype(dtype)),
                            frame_descriptors(k[:, :, window:].astype(dtype))], axis=2)


def select_top_k(phi_q: jnp.ndarray, phi_k: jnp.ndarray, cand_valid: jnp.ndarray, top_k: int
                 ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Top-k candidates per (batch, head) by r_j = <phi_q, phi_k_j> (eq. 5).

    phi_q: [B, H, D]; phi_k: [B, M, H, D]; cand_valid: [M] or [B, M] bool (unfilled slots are never picked ahead
    of a valid frame). Returns (idx [B, H, k] ascending, valid [B, H, k] bool, scores [B, H, M] float32).
    """
    scores = jnp.einsum("bhd,bmhd->bhm", phi_q, phi_k, precision=lax.Precision.HIGHEST)
    valid = jnp.broadcast_to(cand_valid, (phi_q.shape[0], phi_k.shape[1]))[:, None, :]  # [B, 1, M]
    masked = jnp.where(valid, scores, -jnp.inf)
    k = min(top_k, phi_k.shape[1])
    _, idx = lax.top_k(masked, k)
    idx = jnp.sort(idx, axis=-1).astype(jnp.int32)
    sel_valid = jnp.take_along_axis(jnp.broadcast_to(valid, scores.shape), idx, axis=-1)
    return idx, sel_valid, scores


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
    return select_top_k(query_descriptor(q), frame_descriptors(cand_k), cand_valid, top_k)


def gather_frames(cand: jnp.ndarray, idx: jnp.ndarray) -> jnp.ndarray:
    """Per-head gather of frames: cand [B, M, N, H, D], idx [B, H, k] -> [B, k*N, H, D].

    One gather along the frame axis in the cache's own layout (no transposes of the candidates).
    """
    b, m, n, h, d = cand.shape
    index = jnp.swapaxes(idx, 1, 2)[:, :, None, :, None]  # [B, k, 1, H, 1]
    g = jnp.take_along_axis(cand, index, axis=1, mode="clip")  # [B, k, N, H, D]
    return g.reshape(b, -1, h, d)
