"""The one attention dispatcher: cuDNN flash attention on GPU when shapes allow, XLA otherwise.

Masks are given as valid lengths (``kv_lengths``: the first n keys of each batch row are valid) or, more generally,
a boolean ``kv_mask``. On TPU the XLA path runs; a Pallas splash-attention kernel
(``jax.experimental.pallas.ops.tpu.splash_attention``) would be added here as one more ``impl`` branch. On CPU,
long key sets run over key blocks with an online softmax (no [Lq, Lk] logits; ``_xla_flash_attention``).

Split-KV (inference only, ``kv_splits``): a chunk's queries are few (3 frames x 12 heads = 444 cuDNN tiles of 128
rows), so the flash kernel's last wave leaves most of an H100's 132 SMs idle. Splitting the keys into ``s`` equal
parts that run as ``s`` batch rows of one call, then merging the partial outputs by their log-sum-exp
(``o = sum_i softmax_i(lse_i) o_i``), fills the waves: H100, q 4680 x kv 23 400: 1.34 -> 1.25 ms.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

# Largest logits block [B, H, Lq_block, Lk] the XLA path materialises at once (elements).
_XLA_MAX_LOGITS = 1 << 24  # 64 MiB of f32 logits: fastest block on 2 CPU cores (tuned)
# CPU: from this many keys on, the XLA path runs over key blocks with an online softmax (flash-style) instead of
# materialising [Lq_block, Lk] logits: q 4680 x kv 23 400 (the parity fixtures' full-size frames), 2 heads of 16:
# 0.89 -> 0.41 s on 2 cores with blocks of 1560 keys. Key blocks: the largest divisor of Lk in
# [_FLASH_MIN_BLOCK, _FLASH_MAX_BLOCK].
_FLASH_MIN_KEYS = 8192
_FLASH_MIN_BLOCK, _FLASH_MAX_BLOCK = 512, 2048


def resolve_impl(impl: str, q: jnp.ndarray, kv_mask: jnp.ndarray | None) -> str:
    """The attention implementation ``auto`` stands for here: cuDNN on GPU for bf16/fp16 without a general mask."""
    if impl != "auto":
        return impl
    backend = jax.default_backend()
    if (backend == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) and kv_mask is None
            and q.shape[-1] <= 128 and q.shape[-1] % 8 == 0):
        return "cudnn"
    return "xla"


_TILE_Q = 128  # query rows per cuDNN flash-attention CTA on sm90 (two 64-row consumer warpgroups)
_MIN_SPLIT_GAIN = 0.05  # split only when the wave model predicts at least this saving


def auto_kv_splits(b: int, lq: int, h: int, lk: int, num_sms: int | None = None, max_splits: int = 4) -> int:
    """Key splits that fill the GPU's waves best: argmin_s ceil(tiles*s / SMs) / s over s | Lk (1 = no split).

    ``tiles = B * H * ceil(Lq / 128)`` CTAs each do work proportional to ``Lk / s``; a split is taken only when it
    predicts >= 5 % less time (merging the partial outputs costs a little). ``num_sms``: the device's SM count
    (``core_count`` of the first GPU; 1 = no split off GPU)."""
    if num_sms is None:
        dev = jax.devices()[0]
        num_sms = getattr(dev, "core_count", 0) if dev.platform == "gpu" else 0
    if not num_sms or num_sms <= 1:
        return 1
    tiles = b * h * -(-lq // _TILE_Q)

    def cost(s: int) -> float:
        return -(-tiles * s // num_sms) / s

    best = 1
    for s in range(2, max_splits + 1):
        if lk % s == 0 and cost(s) <= (1 - _MIN_SPLIT_GAIN) * cost(1) and cost(s) < cost(best):
            best = s
    return best


def split_kv_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, splits: int,
                       attend_lse: Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray],
                                            tuple[jnp.ndarray, jnp.ndarray]]) -> jnp.ndarray:
    """Attention over ``splits`` equal key parts run as batch rows of one call, merged by log-sum-exp.

    q: [B, Lq, H, D]; k, v: [B, Lk, H, D] with Lk % splits == 0; ``attend_lse(q, k, v)`` returns
    (out [B', Lq, H, D], lse [B', Lq, H] float32). Returns [B, Lq, H, D] in q's dtype. Forward only: the cuDNN
    kernel's backward ignores the gradient of its lse, so training calls attention without splits.
    """
    b, lq, h, d = q.shape
    lk = k.shape[1]
    qs = jnp.broadcast_to(q[:, None], (b, splits, lq, h, d)).reshape(b * splits, lq, h, d)
    ks = k.reshape(b * splits, lk // splits, h, d)  # row b*s + j = keys [j*Lk/s, (j+1)*Lk/s) of batch b: no copy
    vs = v.reshape(b * splits, lk // splits, h, d)
    out, lse = attend_lse(qs, ks, vs)
    return merge_partials(out, lse, splits).astype(q.dtype)


def merge_partials(out: jnp.ndarray, lse: jnp.ndarray, parts: int) -> jnp.ndarray:
    """Exact softmax attention from ``parts`` attentions over disjoint key sets: row ``b*parts + j`` of
    ``out [B*parts, Lq, H, D]`` / ``lse [B*parts, Lq, H]`` is part j of batch b (:func:`merge_lse` of the parts).
    Returns [B, Lq, H, D] float32."""
    n, lq, h, d = out.shape
    o = out.reshape(n // parts, parts, lq, h, d)
    w = lse.reshape(n // parts, parts, lq, h)
    return merge_lse([o[:, j] for j in range(parts)], [w[:, j] for j in range(parts)])


def _cudnn_attention_lse(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cuDNN flash attention that also returns the log-sum-exp of each query row: ([B, Lq, H, D], [B, Lq, H])."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_fa  # the public API does not return lse

    out, lse = cudnn_fa.dot_product_attention(q, k, v, scale=1.0 / math.sqrt(q.shape[-1]), return_residual=True)
    if lse.shape == (q.shape[0], q.shape[2], q.shape[1]):  # [B, H, Lq] (BTNH inputs)
        lse = lse.transpose(0, 2, 1)
    return out, lse


_INT32_MAX = (1 << 31) - 1


def in_place_segments(num_tokens: int, h: int, d: int, length: int, splits: int,
                      backend: str | None = None) -> int:
    """Key segments for :func:`attention_in_place`: ``splits`` (at least 2: cuDNN applies packed offsets only with
    several segments), else the first of 2..4 that divides the key ``length``; 0 when it cannot run (not a GPU, no
    divisor, or a buffer of ``num_tokens`` tokens too large for cuDNN's int32 element offsets)."""
    if num_tokens * h * d > _INT32_MAX or (backend or jax.default_backend()) != "gpu":
        return 0
    for s in (max(splits, 2), 2, 3, 4):
        if length % s == 0:
            return s
    return 0


def merge_lse(outs: list[jnp.ndarray], lses: list[jnp.ndarray]) -> jnp.ndarray:
    """Exact softmax attention from attentions over disjoint key sets given as lists: ``outs[i] [B, Lq, H, D]``,
    ``lses[i] [B, Lq, H]``; ``o = sum_i exp(lse_i - lse) o_i`` with ``lse = logsumexp_i lse_i``. Returns float32
    [B, Lq, H, D] (one elementwise fusion: no stacked copy of the parts)."""
    lf = [x.astype(jnp.float32) for x in lses]
    m = lf[0]
    for x in lf[1:]:
        m = jnp.maximum(m, x)
    ws = [jnp.exp(x - m) for x in lf]
    total = ws[0]
    for w in ws[1:]:
        total = total + w
    out = outs[0].astype(jnp.float32) * (ws[0] / total)[..., None]
    for o, w in zip(outs[1:], ws[1:]):
        out = out + o.astype(jnp.float32) * (w / total)[..., None]
    return out


def _in_place_parts(q: jnp.ndarray, k_all: jnp.ndarray, v_all: jnp.ndarray, starts: jnp.ndarray, length: int,
                    segments: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The unmerged partial attentions of :func:`attention_in_place`: (out [B*s, Lq, H, D], lse [B*s, Lq, H]),
    row ``b*s + j`` = segment j of batch row b."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_fa  # packed offsets are not in the public API

    b, lq, h, d = q.shape
    s = segments
    part = length // s
    qs = jnp.broadcast_to(q[:, None], (b, s, lq, h, d)).reshape(1, b * s * lq, h, d)
    q_off = (jnp.arange(b * s + 1, dtype=jnp.int32) * lq)[None]  # [1, B*s + 1]
    kv_off = (starts.astype(jnp.int32)[:, None] + part * jnp.arange(s, dtype=jnp.int32)[None]).reshape(-1)
    kv_off = jnp.concatenate([kv_off, starts[-1:].astype(jnp.int32) + length])[None]
    q_len = jnp.full((1, b * s), lq, jnp.int32)
    kv_len = jnp.full((1, b * s), part, jnp.int32)
    out, lse = cudnn_fa.dot_product_attention(
        qs, k_all, v_all, q_seqlen=q_len, kv_seqlen=kv_len, q_offsets=q_off, kv_offsets=kv_off,
        scale=1.0 / math.sqrt(d), mask_type=cudnn_fa.MaskType.PADDING, return_residual=True)
    lse = lse[:, :, :lq].transpose(0, 2, 1)  # [B*s, H, Lq] (segment j's rows first in its slice) -> [B*s, Lq, H]
    return out.reshape(b * s, lq, h, d), lse


def attention_in_place(q: jnp.ndarray, k_all: jnp.ndarray, v_all: jnp.ndarray, starts: jnp.ndarray, length: int,
                       segments: int, extra: tuple[jnp.ndarray, jnp.ndarray] | None = None) -> jnp.ndarray:
    """cuDNN attention of each batch row's queries over ``length`` keys read in place from one big buffer.

    q: [B, Lq, H, D]; k_all, v_all: [1, M, H, D] (e.g. a whole stacked KV cache, flattened: no copy);
    starts: [B] int32 token offset of each row's keys in k_all (ascending); ``segments`` (>= 2, divides
    ``length``): each row's keys run as that many packed segments (cuDNN's ragged offsets), each with its own copy
    of the row's queries, merged by log-sum-exp. ``extra``: more keys of each row, (k, v) [B, Le, H, D] (SMA's
    per-head frames), attended in one more call and merged the same way. Forward only.
    Returns: [B, Lq, H, D] in q's dtype.
    """
    b, lq, h, d = q.shape
    out, lse = _in_place_parts(q, k_all, v_all, starts, length, segments)
    out = out.reshape(b, segments, lq, h, d)
    lse = lse.reshape(b, segments, lq, h)
    outs = [out[:, j] for j in range(segments)]
    lses = [lse[:, j] for j in range(segments)]
    if extra is not None:
        e_out, e_lse = _cudnn_attention_lse(q, *extra)
        outs, lses = outs + [e_out], lses + [e_lse]
    return merge_lse(outs, lses).astype(q.dtype)


def xla_attention_lse(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray,
                      precision: lax.Precision | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Plain XLA attention returning (out [B, Lq, H, D], lse [B, Lq, H] float32): the CPU stand-in of
    :func:`_cudnn_attention_lse` (tests of the split-KV merge)."""
    logits = jnp.einsum("bqhd,bkhd->bqhk", q, k, precision=precision,
                        preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
    lse = jax.nn.logsumexp(logits, axis=-1)
    p = jnp.exp(logits - lse[..., None])
    out = jnp.einsum("bqhk,bkhd->bqhd", p.astype(v.dtype), v, precision=precision,
                     preferred_element_type=jnp.float32)
    return out.astype(q.dtype), lse


def attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *, kv_lengths: jnp.ndarray | None = None,
              kv_mask: jnp.ndarray | None = None, impl: str = "auto",
              precision: lax.Precision | None = None, kv_splits: int = 1) -> jnp.ndarray:
    """Softmax attention with scale 1/sqrt(D).

    Args:
      q: [B, Lq, H, D]; k, v: [B, Lk, H, D].
      kv_lengths: [B] int32, keys at positions >= length are ignored.
      kv_mask: [B, Lk] or per-head [B, H, Lk] bool, True = attend (general masks; forces the XLA path).
      impl: auto | xla | cudnn.
      kv_splits: cuDNN only, when every key is valid: 1 = one call, 0 = :func:`auto_kv_splits`, n = n key parts
        (:func:`split_kv_attention`; forward only, not for differentiated calls).
    Returns: [B, Lq, H, D] in q's dtype.
    """
    impl = resolve_impl(impl, q, kv_mask)
    if impl == "cudnn":
        if kv_mask is not None:
            raise ValueError("cudnn attention takes kv_lengths, not an arbitrary kv_mask")
        splits = auto_kv_splits(q.shape[0], q.shape[1], q.shape[2], k.shape[1]) if kv_splits == 0 else kv_splits
        if k.shape[1] % splits:
            raise ValueError(f"kv_splits={splits} does not divide the key length {k.shape[1]}; use a divisor or 0")

        def full(_):
            if splits > 1:
                return split_kv_attention(q, k, v, splits, _cudnn_attention_lse)
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


def _key_block(lk: int) -> int:
    """Key block of the CPU flash path (0: none, take the plain path)."""
    if lk < _FLASH_MIN_KEYS or jax.default_backend() != "cpu":
        return 0
    return next((n for n in range(_FLASH_MAX_BLOCK, _FLASH_MIN_BLOCK - 1, -1) if lk % n == 0), 0)


def _query_blocks(b: int, h: int, lq: int, lk: int) -> int:
    """Query blocks so that one logits block [B, H, Lq / n, Lk] has at most ``_XLA_MAX_LOGITS`` elements."""
    nblk = 1
    while b * h * (lq // nblk) * lk > _XLA_MAX_LOGITS and lq % (nblk * 2) == 0:
        nblk *= 2
    return nblk


def _map_query_blocks(fn: Callable[[jnp.ndarray], jnp.ndarray], q: jnp.ndarray, nblk: int) -> jnp.ndarray:
    if nblk == 1:
        return fn(q)
    b, lq, h, d = q.shape
    qs = q.reshape(b, nblk, lq // nblk, h, d).transpose(1, 0, 2, 3, 4)
    out = lax.map(fn, qs)
    return out.transpose(1, 0, 2, 3, 4).reshape(b, lq, h, d)


def _xla_attention(q, k, v, mask, precision):
    b, lq, h, d = q.shape
    lk = k.shape[1]
    kb = _key_block(lk)
    if kb:
        return _xla_flash_attention(q, k, v, mask, precision, kb)
    scale = 1.0 / math.sqrt(d)

    def one(qb):
        logits = jnp.einsum("bqhd,bkhd->bhqk", qb, k, precision=precision,
                            preferred_element_type=jnp.float32) * scale
        if mask is not None:
            m = mask[:, None, None, :] if mask.ndim == 2 else mask[:, :, None, :]
            logits = jnp.where(m, logits, -jnp.inf)
        p = jax.nn.softmax(logits, axis=-1)
        return jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v, precision=precision,
                          preferred_element_type=jnp.float32).astype(q.dtype)

    # bound memory: split queries into blocks so one logits block has <= _XLA_MAX_LOGITS elements
    return _map_query_blocks(one, q, _query_blocks(b, h, lq, lk))


def _xla_flash_attention(q, k, v, mask, precision, kb: int):
    """The XLA path over key blocks of ``kb`` with an online softmax (running max, sum and output rescaled per
    block), so no [Lq, Lk] logits are materialised; wholly masked blocks are skipped. Same inputs and result as
    :func:`_xla_attention`."""
    b, lq, h, d = q.shape
    lk = k.shape[1]
    nk = lk // kb
    scale = 1.0 / math.sqrt(d)
    ks = k.reshape(b, nk, kb, h, d).transpose(1, 0, 3, 2, 4)  # [nk, B, H, kb, D]
    vs = v.reshape(b, nk, kb, h, d).transpose(1, 0, 3, 2, 4)
    if mask is None:
        ms = jnp.ones((nk, b, 1, kb), bool)
    else:
        m = mask[:, None, :] if mask.ndim == 2 else mask  # [B, 1 | H, Lk]
        ms = m.reshape(b, m.shape[1], nk, kb).transpose(2, 0, 1, 3)  # [nk, B, 1 | H, kb]

    def one(qb):  # [B, Lq', H, D]
        qt = qb.transpose(0, 2, 1, 3)  # [B, H, Lq', D]
        n = qt.shape[2]

        def block(carry, blk):
            mx, den, acc = carry
            kk, vv, ok = blk
            s = jnp.einsum("bhqd,bhkd->bhqk", qt, kk, precision=precision,
                           preferred_element_type=jnp.float32) * scale
            s = jnp.where(ok[:, :, None, :], s, -jnp.inf)
            new = jnp.maximum(mx, s.max(-1))
            base = jnp.where(jnp.isfinite(new), new, 0.0)  # a row with no valid key yet: exp(-inf) = 0 below
            p = jnp.exp(s - base[..., None])
            corr = jnp.exp(mx - base)
            den = den * corr + p.sum(-1)
            acc = acc * corr[..., None] + jnp.einsum("bhqk,bhkd->bhqd", p.astype(vv.dtype), vv,
                                                     precision=precision, preferred_element_type=jnp.float32)
            return new, den, acc

        def step(carry, blk):  # a block with no valid key (the warm-up's empty slots) is skipped
            return lax.cond(jnp.any(blk[2]), block, lambda c, _: c, carry, blk), None

        init = (jnp.full((b, h, n), -jnp.inf, jnp.float32), jnp.zeros((b, h, n), jnp.float32),
                jnp.zeros((b, h, n, d), jnp.float32))
        (_, den, acc), _ = lax.scan(step, init, (ks, vs, ms))
        return (acc / den[..., None]).transpose(0, 2, 1, 3).astype(q.dtype)

    return _map_query_blocks(one, q, _query_blocks(b, h, lq, kb))
