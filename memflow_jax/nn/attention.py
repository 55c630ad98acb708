"""The one attention dispatcher: cuDNN flash attention on GPU when shapes allow, XLA otherwise.

Masks are given as valid lengths (``kv_lengths``: the first n keys of each batch row are valid) or, more generally,
a boolean ``kv_mask``. On TPU the XLA path runs; a Pallas splash-attention kernel
(``jax.experimental.pallas.ops.tpu.splash_attention``) would be added here as one more ``impl`` branch.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

# Largest logits block [B, H, Lq_block, Lk] the XLA path materialises at once (elements).
_XLA_MAX_LOGITS = 1 << 24  # 64 MiB of f32 logits: fastest block on 2 CPU cores (tuned)


def _resolve_impl(impl: str, q: jnp.ndarray, kv_mask: jnp.ndarray | None) -> str:
    if impl != "auto":
        return impl
    backend = jax.default_backend()
    if (backend == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) and kv_mask is None
            and q.shape[-1] <= 128 and q.shape[-1] % 8 == 0):
        return "cudnn"
    return "xla"


def attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *, kv_lengths: jnp.ndarray | None = None,
              kv_mask: jnp.ndarray | None = None, impl: str = "auto",
              precision: lax.Precision | None = None) -> jnp.ndarray:
    """Softmax attention with scale 1/sqrt(D).

    Args:
      q: [B, Lq, H, D]; k, v: [B, Lk, H, D].
      kv_lengths: [B] int32, keys at positions >= length are ignored.
      kv_mask: [B, Lk] or per-head [B, H, Lk] bool, True = attend (general masks; forces the XLA path).
      impl: auto | xla | cudnn.
    Returns: [B, Lq, H, D] in q's dtype.
    """
    impl = _resolve_impl(impl, q, kv_mask)
    if impl == "cudnn":
        if kv_mask is not None:
            raise ValueError("cudnn attention takes kv_lengths, not an arbitrary kv_mask")

        def full(_):
            return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")

        if kv_lengths is None:
            return full(None)

        def padded(_):
            return jax.nn.dot_product_attention(
                q, k, v, key_value_seq_lengths=kv_lengths,
                query_seq_lengths=jnp.full_like(kv_lengths, q.shape[1]), implementation="cudnn")

        # once a stream's memory is full every key is valid: the unmasked kernel is faster (H100 micro-benchmark)
        return lax.cond(jnp.all(kv_lengths >= k.shape[1]), full, padded, None)
    if impl != "xla":
        raise ValueError(f"unknown attention impl {impl!r}; use auto | xla | cudnn")
    mask = kv_mask
    if kv_lengths is not None:
        lm = jnp.arange(k.shape[1])[None, :] < kv_lengths[:, None]
        mask = lm if mask is None else (mask & lm if mask.ndim == 2 else mask & lm[:, None, :])
    return _xla_attention(q, k, v, mask, precision)


def _xla_attention(q, k, v, mask, precision):
    b, lq, h, d = q.shape
    lk = k.shape[1]
    scale = 1.0 / math.sqrt(d)
    # Bound memory: split queries into blocks so one logits block has <= _XLA_MAX_LOGITS elements.
    nblk = 1
    while b * h * (lq // nblk) * lk > _XLA_MAX_LOGITS and lq % (nblk * 2) == 0:
        nblk *= 2

    def one(qb):
        logits = jnp.einsum("bqhd,bkhd->bhqk", qb, k, precision=precision,
                            preferred_element_type=jnp.float32) * scale
        if mask is not None:
            m = mask[:, None, None, :] if mask.ndim == 2 else mask[:, :, None, :]
            logits = jnp.where(m, logits, -jnp.inf)
        p = jax.nn.softmax(logits, axis=-1)
        return jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v, precision=precision,
                          preferred_element_type=jnp.float32).astype(q.dtype)

    if nblk == 1:
        return one(q)
    qs = q.reshape(b, nblk, lq // nblk, h, d).transpose(1, 0, 2, 3, 4)
    out = lax.map(one, qs)
    return out.transpose(1, 0, 2, 3, 4).reshape(b, lq, h, d)
