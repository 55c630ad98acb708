"""UMT5 text encoder (encoder only), the one Wan2.1 / MemFlow use, as a pure Flax Linen function.

Layout of the parameters (Flax names; ``Ly`` = ``cfg.num_layers``, every per-layer tensor is stacked on a
leading layer axis and consumed by one ``lax.scan``)::

    token_embedding/embedding          [V, D]
    blocks/norm1/scale                 [Ly, D]
    blocks/attn/{q,k,v}/kernel         [Ly, D, A]        (A = dim_attn)
    blocks/attn/o/kernel               [Ly, A, D]
    blocks/pos_embedding/embedding     [Ly, num_buckets, H]
    blocks/norm2/scale                 [Ly, D]
    blocks/ffn/{gate,fc1}/kernel       [Ly, D, F]
    blocks/ffn/fc2/kernel              [Ly, F, D]
    norm/scale                         [D]

Numerics: matmuls run in ``cfg.dtype`` (float32 for parity, bfloat16 for speed); the residual stream, every
RMSNorm, the attention logits and the softmax are float32. Parameters may be stored in float32 or bfloat16.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from memflow_jax.config import TextConfig
from memflow_jax.nn import initializers as init_lib

Params = Any  # nested dict of arrays: the ``params`` collection


def _dtype(name: str) -> Any:
    return jnp.dtype(name)


# --------------------------------------------------------------------------------------------------
# Relative position buckets
# --------------------------------------------------------------------------------------------------


def relative_position_bucket(lq: int, lk: int, num_buckets: int, max_dist: int) -> np.ndarray:
    """Bidirectional T5 bucket of ``key j - query i`` for every pair: ``[lq, lk]`` int32 (a static table).

    Half of the buckets are for keys after the query. Distances below ``num_buckets // 4`` get their own
    bucket; larger ones share log-spaced buckets up to ``max_dist``, clipped to the last bucket.
    """
    half = num_buckets // 2
    max_exact = half // 2
    rel = np.arange(lk, dtype=np.int64)[None, :] - np.arange(lq, dtype=np.int64)[:, None]
    offset = np.where(rel > 0, half, 0)
    dist = np.abs(rel)
    # The reference evaluates log(0) at dist 0 and discards it with a where; guard it instead.
    # float64 here gives the exact bucket edges (dist 16/32/64 land exactly on integers).
    log_ratio = np.log(np.maximum(dist, 1) / max_exact) / math.log(max_dist / max_exact)
    large = max_exact + (log_ratio * (half - max_exact)).astype(np.int64)
    large = np.minimum(large, half - 1)
    return (offset + np.where(dist < max_exact, dist, large)).astype(np.int32)


# --------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """T5 layer norm: ``w * x * rsqrt(mean(x^2) + eps)`` in float32 (no mean subtraction, no bias)."""

    eps: float
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:  # [..., D] -> [..., D] float32
        w = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return w.astype(jnp.float32) * x


def _dense(features: int, std: float, dtype: Any, param_dtype: Any, name: str) -> nn.Dense:
    return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=init_lib.normal(std), name=name)


class RelativeBias(nn.Module):
    """Learned bias per (bucket, head): ``emb[buckets]`` laid out heads-first."""

    num_buckets: int
    num_heads: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, buckets: jnp.ndarray) -> jnp.ndarray:  # [Lq, Lk] int32 -> [H, Lq, Lk] float32
        emb = self.param("embedding", init_lib.normal((2 * self.num_buckets * self.num_heads) ** -0.5),
                         (self.num_buckets, self.num_heads), self.param_dtype)
        return jnp.take(emb.astype(jnp.float32), buckets, axis=0).transpose(2, 0, 1)


class Block(nn.Module):
    """One encoder layer: ``x += Attn(norm1(x)); x += FFN(norm2(x))`` (scanned over the layer axis)."""

    cfg: TextConfig
    param_dtype: Any = jnp.float32
    collect: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray, buckets: jnp.ndarray, key_valid: jnp.ndarray):
        # x [B, L, D] float32; buckets [L, L] int32; key_valid [B, L] bool
        cfg = self.cfg
        dt = _dtype(cfg.dtype)
        h = cfg.num_heads

        # per-layer relative position bias (umt5: shared_pos=False)
        pos = RelativeBias(cfg.num_buckets, h, self.param_dtype, name="pos_embedding")(buckets)  # [H, L, L]
        # Reference: masked_fill(mask == 0, finfo(float32).min) on the bias, which is then ADDED to q.k.
        bias = jnp.where(key_valid[:, None, None, :], pos[None], jnp.finfo(jnp.float32).min)  # [B, H, L, L]

        # attention
        y = RMSNorm(cfg.eps, self.param_dtype, name="norm1")(x).astype(dt)
        attn = _Attention(cfg, self.param_dtype, name="attn")
        x = x + attn(y, bias).astype(jnp.float32)

        # gated-GELU feed-forward
        y = RMSNorm(cfg.eps, self.param_dtype, name="norm2")(x).astype(dt)
        x = x + _FeedForward(cfg, self.param_dtype, name="ffn")(y).astype(jnp.float32)
        return x, (x if self.collect else None)


class _Attention(nn.Module):
    cfg: TextConfig
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, bias: jnp.ndarray) -> jnp.ndarray:
        # x [B, L, D] (compute dtype); bias [B, H, L, L] float32 -> [B, L, D]
        cfg = self.cfg
        dt = _dtype(cfg.dtype)
        b, length, _ = x.shape
        h = cfg.num_heads
        hd = cfg.dim_attn // h
        q = _dense(cfg.dim_attn, (cfg.dim * cfg.dim_attn) ** -0.5, dt, self.param_dtype, "q")(x)
        k = _dense(cfg.dim_attn, cfg.dim ** -0.5, dt, self.param_dtype, "k")(x)
        v = _dense(cfg.dim_attn, cfg.dim ** -0.5, dt, self.param_dtype, "v")(x)
        q = q.reshape(b, length, h, hd)
        k = k.reshape(b, length, h, hd)
        v = v.reshape(b, length, h, hd)
        # T5 quirk: no 1/sqrt(head_dim) scaling of the logits.
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + bias
        probs = jax.nn.softmax(logits, axis=-1).astype(dt)  # float32 softmax
        o = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, length, cfg.dim_attn)
        return _dense(cfg.dim, (h * cfg.dim_attn) ** -0.5, dt, self.param_dtype, "o")(o)


class _FeedForward(nn.Module):
    cfg: TextConfig
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:  # [B, L, D] -> [B, L, D]
        cfg = self.cfg
        dt = _dtype(cfg.dtype)
        gate = _dense(cfg.dim_ffn, cfg.dim ** -0.5, dt, self.param_dtype, "gate")(x)
        fc1 = _dense(cfg.dim_ffn, cfg.dim ** -0.5, dt, self.param_dtype, "fc1")(x)
        # fc2(fc1(x) * gelu_tanh(gate(x)))
        y = fc1 * jax.nn.gelu(gate, approximate=True)
        return _dense(cfg.dim, cfg.dim_ffn ** -0.5, dt, self.param_dtype, "fc2")(y)


class _TokenEmbedding(nn.Module):
    vocab_size: int
    dim: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, ids: jnp.ndarray) -> jnp.ndarray:  # [B, L] int32 -> [B, L, D] float32
        emb = self.param("embedding", init_lib.normal(1.0), (self.vocab_size, self.dim), self.param_dtype)
        # gather first, then cast: never materialise a float32 copy of a bf16 table
        return jnp.take(emb, ids, axis=0).astype(jnp.float32)


class Encoder(nn.Module):
    """Token embedding -> scan(blocks) -> final RMSNorm. Returns ``(out [B, L, D], per_block or None)``."""

    cfg: TextConfig
    param_dtype: Any = jnp.float32
    collect: bool = False

    @nn.compact
    def __call__(self, ids: jnp.ndarray, mask: jnp.ndarray):
        cfg = self.cfg
        length = ids.shape[1]
        x = _TokenEmbedding(cfg.vocab_size, cfg.dim, self.param_dtype, name="token_embedding")(ids)  # [B, L, D]
        buckets = jnp.asarray(relative_position_bucket(length, length, cfg.num_buckets, cfg.max_dist))
        key_valid = mask > 0  # [B, L]
        blocks = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_layers)
        x, per_block = blocks(cfg, self.param_dtype, self.collect, name="blocks")(x, buckets, key_valid)
        out = RMSNorm(cfg.eps, self.param_dtype, name="norm")(x).astype(_dtype(cfg.dtype))
        return out, per_block  # per_block: [Ly, B, L, D] float32 residual stream after each block


# --------------------------------------------------------------------------------------------------
# Public functions (params in, arrays out)
# --------------------------------------------------------------------------------------------------


def init_params(cfg: TextConfig, rng: jax.Array, param_dtype: Any = jnp.float32) -> Params:
    """Random parameters (the reference's init distributions), per-layer tensors stacked on axis 0."""
    cfg.validate()
    ids = jnp.zeros((1, 1), jnp.int32)
    module = Encoder(cfg, jnp.dtype(param_dtype))
    return jax.jit(lambda r: module.init(r, ids, ids)["params"])(rng)


def abstract_params(cfg: TextConfig, param_dtype: Any = jnp.float32) -> Params:
    """``jax.ShapeDtypeStruct`` tree of :func:`init_params` (no memory allocated)."""
    return jax.eval_shape(lambda r: init_params(cfg, r, param_dtype), jax.random.key(0))


def param_count(params: Params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def _check_inputs(ids: jnp.ndarray, mask: jnp.ndarray) -> None:
    if ids.ndim != 2:
        raise ValueError(f"ids must be [B, L] token ids, got shape {ids.shape}")
    if tuple(mask.shape) != tuple(ids.shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal ids shape {tuple(ids.shape)} ([B, L])")


def encode(params: Params, cfg: TextConfig, ids: jnp.ndarray, mask: jnp.ndarray,
           return_blocks: bool = False):
    """Raw UMT5 encoder output ``[B, L, D]`` (rows of padded positions are NOT zero, like the reference).

    ids: [B, L] int32 token ids; mask: [B, L] (1 = real token). Jit with ``static_argnames=("cfg",
    "return_blocks")``. With ``return_blocks`` also returns the float32 residual stream after every block,
    ``[num_layers, B, L, D]`` (before the final norm).
    """
    _check_inputs(ids, mask)
    module = Encoder(cfg, collect=return_blocks)
    out, per_block = module.apply({"params": params}, jnp.asarray(ids, jnp.int32), jnp.asarray(mask))
    return (out, per_block) if return_blocks else out


def zero_padding_rows(x: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """Zero rows at positions >= the prompt length ``sum(mask > 0)`` (WanTextEncoder: ``u[v:] = 0``)."""
    seq_lens = jnp.sum(jnp.asarray(mask) > 0, axis=1)  # [B]
    keep = jnp.arange(x.shape[1])[None, :] < seq_lens[:, None]  # [B, L]
    return jnp.where(keep[..., None], x, jnp.zeros((), x.dtype))


def prompt_embeds(params: Params, cfg: TextConfig, ids: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """What the DiT consumes: :func:`encode` with rows >= seq_len zeroed. ``[B, L, D]``."""
    return zero_padding_rows(encode(params, cfg, ids, mask), mask)


def position_bias(params: Params, cfg: TextConfig, lq: int, lk: int) -> jnp.ndarray:
    """Per-layer relative position bias ``[num_layers, H, lq, lk]`` float32 (without the padding mask)."""
    buckets = jnp.asarray(relative_position_bucket(lq, lk, cfg.num_buckets, cfg.max_dist))
    emb = jnp.asarray(params["blocks"]["pos_embedding"]["embedding"], jnp.float32)  # [Ly, NB, H]
    return jnp.take(emb, buckets, axis=1).transpose(0, 3, 1, 2)
