"""Wan2.1 causal 3-D VAE (``Wan2.1_VAE.pth``) in Flax Linen, channels-last, with a functional streaming cache.

Layout inside: ``[B, T, H, W, C]`` (NTHWC); conv kernels ``[kt, kh, kw, I, O]`` / ``[kh, kw, I, O]``.
Public API (pure functions, arrays in/out; ``cfg`` is a static, hashable :class:`VAEConfig`):

* :func:`init_params`, :func:`abstract_params`, :func:`param_count`
* :func:`encode` ``[B, 3, T, H, W]`` in [-1, 1] -> normalised latents ``[B, T', z, h, w]`` (T = 1 + 4k -> T' = 1 + k)
* :func:`decode` ``[B, T', z, h, w]`` -> pixels ``[B, 1 + 4(T'-1), 3, H, W]`` (clamped unless ``clamp=False``)
* :func:`init_decode_cache`, :func:`decode_chunk` (traceable, ``lax.scan``), :func:`decode_chunk_jit` (eager:
  per-frame steps for the first chunk, one decoder call for each later chunk): streaming decode with a
  fixed-shape, donatable cache.
* Training (traceable, differentiable): :func:`encode_moments` (posterior ``mu`` / log-variance) and
  :func:`decode_clip` (whole clip from a fresh cache: the streaming decoder step under ``lax.scan``).

``cfg.codec`` ``"pixel"`` / ``"pca"`` swaps the network for :mod:`memflow_jax.nn.pixel_codec` (lossless
space-to-depth, params ``{}``; or its PCA, params ``mean`` / ``basis``) behind the same functions, so samplers,
latent encoding and evaluation need no other change. ``pca`` with ``cfg.pca_decoder`` encodes with the PCA and
decodes with this module's decoder (params ``mean`` / ``basis`` + ``conv2`` / ``decoder``, cached like ``wan``'s).

Mapping the reference's stateful chunking onto fixed shapes:

* Cache. Every causal conv with a time kernel of 3 keeps the last ``CACHE_T = 2`` frames of its input. "No cache
  yet" equals a cache of zeros (the reference pads with zeros in front), so each cache is a zero-initialised
  ``[B, 2, h, w, C]`` array, the conv runs on ``concat(cache, x)`` (each time tap sliced from the two in place,
  never the concatenation as a whole) and the new cache is the last 2 frames of it.
* First step. The video's first step differs (encoder: frame 0 alone, not downsampled in time; decoder: the
  first latent frame skips the temporal upsample and gives 1 frame, not 4). ``first`` is either a Python bool
  (a static 1-frame first step) or a traced bool: then the first step runs with the shapes of a normal step,
  only frame 0 being real (the encoder's first chunk is frame 0 repeated), and every rule that differs selects
  with ``where``: caches take frame 0 only, ``downsample3d`` keeps frames ``0::2`` instead of the time conv,
  ``upsample3d`` repeats frames instead of the time conv and keeps its cache. Everything is causal or per
  frame, so the padding frames never reach frame 0, and ONE compiled step serves the first and later steps.
* Repeated layers. Runs of identical residual blocks (same channels in and out, back to back) have their
  params and caches stacked on a leading axis and run by one ``nn.scan`` (named ``<seq>_<first>-<last>``).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional, Union

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from memflow_jax.config import VAEConfig
from memflow_jax.nn import pixel_codec

ENCODER_KEYS = ("encoder", "conv1")  # params of the encoder path (video -> latent moments); the rest decodes
CACHE_T = 2  # frames of history kept per causal conv (reference constant)
NORM_EPS = 1e-12  # F.normalize's floor on the L2 norm

PIXEL_CODECS = ("pixel", "pca")  # the fixed codecs of nn/pixel_codec.py (encode without a network)
PCA_KEYS = ("mean", "basis")  # the fitted (frozen) params of the pca codec
Array = jax.Array
First = Union[bool, Array]  # static Python bool, or a traced scalar bool (see the module docstring)


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------


def _precision(dtype: Any) -> lax.Precision:
    # float32 parity needs full-precision convs/matmuls on GPU (no TF32); bf16 uses the fast path.
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def _torch_uniform(fan_in: int):
    """PyTorch's default conv init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for weight and bias."""
    bound = 1.0 / math.sqrt(max(fan_in, 1))
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _select(first: First, if_first: Array, otherwise: Array) -> Array:
    if isinstance(first, bool):
        return if_first if first else otherwise
    return jnp.where(first, if_first, otherwise)


def _time_window(prev: Optional[Array], x: Array, start: int, length: int) -> Array:
    """Frames ``[start, start + length)`` of ``concat(prev, x)`` along time (axis 1), without materialising the
    whole concatenation (``prev`` None = no frames in front)."""
    p = 0 if prev is None else prev.shape[1]
    parts = []
    if start < p:
        parts.append(prev[:, start:min(p, start + length)])
    if start + length > p:
        parts.append(x[:, max(0, start - p):start + length - p])
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)


def _conv(x: Array, kernel: Array, bias: Array, strides: tuple[int, ...],
          padding: tuple[tuple[int, int], ...], prev: Optional[Array] = None,
          residual: Optional[Array] = None) -> Array:
    """Channels-last N-d conv (N = kernel.ndim - 2) in x's dtype; for a 3-D conv the input is
    ``concat(prev, x)`` along time (``prev``: the cached frames in front, never concatenated as a whole).
    ``residual`` (the output's shape) is added to the output on the conv's own layout, where XLA fuses it into
    cuDNN's conv as a side input (a residual block's skip).

    A 3-D conv with time stride 1 and no time padding (every causal conv: its padding is the explicit cache) runs
    as ONE 2-D conv over the output frames with the ``kt`` time taps stacked on the input channels, each tap read
    straight from ``prev`` and ``x``: cuDNN's 2-D channels-last kernels are much faster than its 3-D ones
    (streaming decode on an H100: benchmarks/RESULTS.md).
    """
    if kernel.ndim == 5 and strides[0] == 1 and tuple(padding[0]) == (0, 0):
        b, t, h, w, c = x.shape
        t += 0 if prev is None else prev.shape[1]
        kt, kh, kw, _, cout = kernel.shape
        to = t - kt + 1
        if 1 < kt and kt * cout <= c:
            # few output channels (the decoder head, 96 -> 3): stack the taps on the OUTPUT channels instead, so
            # the input is read once and never copied; frame t sums tap i of frame t + i
            k2 = jnp.transpose(kernel, (1, 2, 3, 0, 4)).reshape(kh, kw, c, kt * cout)  # (tap, channel) order
            zero = jnp.zeros((kt * cout,), bias.dtype)
            ys = [_conv(a.reshape((b * a.shape[1],) + a.shape[2:]), k2, zero, tuple(strides[1:]), tuple(padding[1:]))
                  for a in ((x,) if prev is None else (prev, x))]
            y = jnp.concatenate([a.reshape((b, -1) + a.shape[1:3] + (kt, cout)) for a in ys], axis=1)
            out = sum(y[:, i:i + to, :, :, i].astype(jnp.float32) for i in range(kt)) + bias.astype(jnp.float32)
            out = out.astype(x.dtype)
            return out if residual is None else out + residual
        frames = [_time_window(prev, x, i, to) for i in range(kt)]
        taps = frames[0] if kt == 1 else jnp.concatenate(frames, axis=-1)  # [B, To, H, W, kt*C]
        k2 = jnp.transpose(kernel, (1, 2, 0, 3, 4)).reshape(kh, kw, kt * c, cout)  # (tap, channel) order
        res = None if residual is None else residual.reshape((b * to,) + residual.shape[2:])
        y = _conv(taps.reshape((b * to,) + taps.shape[2:]), k2, bias, tuple(strides[1:]), tuple(padding[1:]),
                  residual=res)
        return y.reshape((b, to) + y.shape[1:])
    if prev is not None:
        x = jnp.concatenate([prev, x], axis=1)
    nd = kernel.ndim - 2
    spatial = "DHW"[-nd:]
    dn = lax.conv_dimension_numbers(x.shape, kernel.shape, (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"))
    y = lax.conv_general_dilated(x, kernel.astype(x.dtype), strides, padding, dimension_numbers=dn,
                                 precision=_precision(x.dtype))
    y = y + bias.astype(x.dtype)
    return y if residual is None else y + residual


class CausalConv3d(nn.Module):
    """3-D conv, time padded causally (``2*pad_t`` frames in front, none behind), space symmetric.

    ``cache`` holds the previous ``2*pad_t`` input frames (None = zeros = start of the video); the new cache is
    the last ``CACHE_T`` frames of ``concat(cache, x)`` (of ``concat(cache, x[:, :1])`` on a padded first
    step); None when ``pad_t == 0``.
    """

    features: int
    kernel_size: tuple[int, int, int]
    stride: tuple[int, int, int] = (1, 1, 1)
    padding: tuple[int, int, int] = (0, 0, 0)  # torch-style (t, h, w)

    @nn.compact
    def __call__(self, x: Array, cache: Optional[Array] = None, first: First = False,
                 residual: Optional[Array] = None) -> tuple[Array, Optional[Array]]:
        # x: [B, T, H, W, Cin]; cache: [B, 2*pad_t, H, W, Cin]
        cin = x.shape[-1]
        kt, kh, kw = self.kernel_size
        fan_in = cin * kt * kh * kw
        kernel = self.param("kernel", _torch_uniform(fan_in), (kt, kh, kw, cin, self.features))
        bias = self.param("bias", _torch_uniform(fan_in), (self.features,))
        pad_t = 2 * self.padding[0]
        new_cache = None
        if pad_t > 0:
            if pad_t != CACHE_T:
                raise ValueError(f"CausalConv3d: time padding {pad_t} != CACHE_T={CACHE_T} is not supported")
            if cache is None:
                cache = jnp.zeros((x.shape[0], pad_t) + x.shape[2:], x.dtype)
            prev = cache.astype(x.dtype)  # zero front padding == zero cache; the conv reads concat(prev, x)
            t = pad_t + x.shape[1]
            new_cache = _time_window(prev, x, t - CACHE_T, CACHE_T)
            if t > pad_t + 1 and first is not False:  # frame 0 only
                new_cache = _select(first, _time_window(prev, x, pad_t + 1 - CACHE_T, CACHE_T), new_cache)
        else:
            prev = None
        ph, pw = self.padding[1], self.padding[2]
        y = _conv(x, kernel, bias, self.stride, ((0, 0), (ph, ph), (pw, pw)), prev=prev, residual=residual)
        return y, new_cache  # y: [B, T', H', W', features]


def _upsample2x_conv3x3(x: Array, kernel: Array, bias: Array) -> Array:
    """``conv3x3(pad 1)(nearest_2x(x))`` as four 2x2 convs on ``x``, one per output phase: ``[N, H, W, C]`` ->
    ``[N, 2H, 2W, Cout]``, with no 4x upsampled input and 4/9 of the FLOPs.

    Output row ``2i`` reads input rows ``(i-1, i)`` with kernel rows ``(k0, k1 + k2)``, row ``2i+1`` reads ``(i, i+1)``
    with ``(k0 + k1, k2)``; the same for columns. Summed kernels are formed in float32.
    """
    k = kernel.astype(jnp.float32)  # [3, 3, C, Cout]
    merge = (lambda a: jnp.stack([a[0], a[1] + a[2]]), lambda a: jnp.stack([a[0] + a[1], a[2]]))
    pads = ((1, 0), (0, 1))  # phase 0 reads (i-1, i), phase 1 reads (i, i+1)
    rows = []
    for pa in range(2):
        kr = merge[pa](k)  # [2, 3, C, Cout]
        cols = [jnp.moveaxis(merge[pb](jnp.moveaxis(kr, 1, 0)), 0, 1) for pb in range(2)]  # [2, 2, C, Cout]
        rows.append(jnp.stack([_conv(x, cols[pb].astype(x.dtype), bias, (1, 1), (pads[pa], pads[pb]))
                               for pb in range(2)], axis=3))  # [N, H, W, 2, Cout]
    y = jnp.stack(rows, axis=2)  # [N, H, 2, W, 2, Cout]
    n, h, _, w, _, cout = y.shape
    return y.reshape(n, 2 * h, 2 * w, cout)


class Conv2d(nn.Module):
    """Per-frame 2-D conv on ``[B, T, H, W, C]`` (``padding`` = ((top, bottom), (left, right))).

    ``upsample``: nearest x2 in space first (3x3 kernel, stride 1, padding 1 only), computed without the
    upsampled intermediate (:func:`_upsample2x_conv3x3`).
    """

    features: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))
    upsample: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, t, h, w, cin = x.shape
        kh, kw = self.kernel_size
        kernel = self.param("kernel", _torch_uniform(cin * kh * kw), (kh, kw, cin, self.features))
        bias = self.param("bias", _torch_uniform(cin * kh * kw), (self.features,))
        if self.upsample:
            if (kh, kw) != (3, 3) or tuple(self.stride) != (1, 1) or tuple(map(tuple, self.padding)) != ((1, 1),) * 2:
                raise ValueError("Conv2d(upsample=True) supports only a 3x3 kernel, stride 1, padding 1")
            y = _upsample2x_conv3x3(x.reshape(b * t, h, w, cin), kernel, bias)
        else:
            y = _conv(x.reshape(b * t, h, w, cin), kernel, bias, self.stride, self.padding)
        return y.reshape((b, t) + y.shape[1:])


class RMSNorm(nn.Module):
    """``F.normalize(x, dim=C) * sqrt(C) * gamma`` (norm floored at 1e-12; no bias), computed in float32."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        xf = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(xf * xf, axis=-1, keepdims=True))
        y = xf / jnp.maximum(norm, NORM_EPS) * math.sqrt(c) * scale
        return y.astype(x.dtype)


class ResidualBlock(nn.Module):
    """norm-SiLU-conv-norm-SiLU-conv + (1x1x1 shortcut if the channel count changes)."""

    in_dim: int
    out_dim: int

    @nn.compact
    def __call__(self, x: Array, cache: Optional[dict], first: First) -> tuple[Array, dict]:
        cache = cache or {}
        h = CausalConv3d(self.out_dim, (1, 1, 1), name="shortcut")(x)[0] if self.in_dim != self.out_dim else x
        y = nn.silu(RMSNorm(name="norm1")(x))
        y, c1 = CausalConv3d(self.out_dim, (3, 3, 3), padding=(1, 1, 1), name="conv1")(
            y, cache.get("conv1"), first)
        y = nn.silu(RMSNorm(name="norm2")(y))  # dropout (0.0, eval) omitted
        y, c2 = CausalConv3d(self.out_dim, (3, 3, 3), padding=(1, 1, 1), name="conv2")(
            y, cache.get("conv2"), first, residual=h)
        return y, {"conv1": c1, "conv2": c2}


@functools.lru_cache(maxsize=None)
def residual_stack(n: int) -> type:
    """n identical ``ResidualBlock(dim, dim)`` back to back: params / caches stacked on axis 0, one lax.scan."""
    return nn.scan(ResidualBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                   in_axes=(0, nn.broadcast), length=n)


class AttentionBlock(nn.Module):
    """Per-frame single-head spatial self-attention (qkv channels ordered [q | k | v]), residual."""

    dim: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, t, hh, ww, c = x.shape
        h = RMSNorm(name="norm")(x)
        qkv = Conv2d(3 * c, (1, 1), name="to_qkv")(h).reshape(b * t, hh * ww, 3 * c)
        q, k, v = (a.astype(jnp.float32) for a in jnp.split(qkv, 3, axis=-1))  # [BT, HW, C] each
        prec = _precision(x.dtype)
        logits = jnp.einsum("bqc,bkc->bqk", q, k, precision=prec) / math.sqrt(c)  # SDPA scale 1/sqrt(C)
        o = jnp.einsum("bqk,bkc->bqc", jax.nn.softmax(logits, axis=-1), v, precision=prec)
        o = Conv2d(c, (1, 1), name="proj")(o.astype(x.dtype).reshape(b, t, hh, ww, c))
        return x + o


class Resample(nn.Module):
    """Spatial (and optionally temporal) down/up-sampling, modes as the reference's ``Resample``."""

    dim: int
    mode: str  # downsample2d | downsample3d | upsample2d | upsample3d

    @nn.compact
    def __call__(self, x: Array, cache: Optional[Array], first: First) -> tuple[Array, Optional[Array]]:
        # x: [B, T, H, W, C]
        b = x.shape[0]
        new_cache = None
        if self.mode == "upsample3d":
            if cache is None:
                cache = jnp.zeros((b, CACHE_T) + x.shape[2:], x.dtype)
            if first is True:
                # reference 'Rep' sentinel: the first latent frame skips the time conv and stores nothing, so the
                # next call sees plain zero padding (frame 0 is never context for the temporal upsample)
                new_cache = cache
            else:
                y, c = CausalConv3d(2 * self.dim, (3, 1, 1), padding=(1, 0, 0), name="time_conv")(x, cache)
                t = y.shape[1]
                # 2C channels = [sample 0 | sample 1] -> 2 frames per input frame, interleaved in time
                y = y.reshape(b, t, *y.shape[2:4], 2, self.dim)
                y = jnp.moveaxis(y, 4, 2).reshape(b, 2 * t, *y.shape[2:4], self.dim)
                x = _select(first, jnp.repeat(x, 2, axis=1), y)  # padded first step: frame 0 passes through
                new_cache = _select(first, cache, c)
        if self.mode.startswith("upsample"):
            # nearest x2 (exact in any dtype; the reference goes through float32), then a 3x3 conv halving the
            # channels: one fused sub-pixel conv
            x = Conv2d(self.dim // 2, (3, 3), padding=((1, 1), (1, 1)), upsample=True, name="conv")(x)
        else:
            # ZeroPad2d((0, 1, 0, 1)) (right/bottom only) + 3x3 stride-2 conv
            x = Conv2d(self.dim, (3, 3), stride=(2, 2), padding=((0, 1), (0, 1)), name="conv")(x)
            if self.mode == "downsample3d":
                if first is True:
                    new_cache = x[:, -1:]  # first chunk: frame 0 is stored, not downsampled in time
                else:
                    # later chunks: stride-2 time conv over [last frame of previous chunk, chunk]
                    prev = cache if cache is not None else jnp.zeros_like(x[:, :1])
                    y, _ = CausalConv3d(self.dim, (3, 1, 1), stride=(2, 1, 1), name="time_conv")(
                        jnp.concatenate([prev.astype(x.dtype), x], axis=1))
                    new_cache = _select(first, x[:, :1], x[:, -1:])
                    x = _select(first, x[:, 0::2], y)  # padded first step: frame 0 kept, not convolved
        return x, new_cache


# --------------------------------------------------------------------------------------------------
# Encoder / decoder. Block plans follow the reference's nn.Sequential indices, which name the params.
# --------------------------------------------------------------------------------------------------


def _encoder_plan(cfg: VAEConfig) -> tuple[list[tuple], int]:
    dims = [cfg.dim * u for u in (1,) + tuple(cfg.dim_mult)]
    plan: list[tuple] = []
    scale = 1.0
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
        for _ in range(cfg.num_res_blocks):
            plan.append(("res", in_dim, out_dim))
            if scale in cfg.attn_scales:
                plan.append(("attn", out_dim))
            in_dim = out_dim
        if i != len(cfg.dim_mult) - 1:
            plan.append(("resample", out_dim, "downsample3d" if cfg.temporal_downsample[i] else "downsample2d"))
            scale /= 2.0
    return plan, dims[-1]


def _decoder_plan(cfg: VAEConfig) -> tuple[list[tuple], int, int]:
    mult = tuple(cfg.dim_mult)
    dims = [cfg.dim * u for u in (mult[-1],) + mult[::-1]]
    temporal_upsample = tuple(cfg.temporal_downsample)[::-1]
    plan: list[tuple] = []
    scale = 1.0 / 2 ** (len(mult) - 2)
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
        if i >= 1:  # every level after the first follows an upsample that halved the channels
            in_dim = in_dim // 2  # (reference: `i in (1, 2, 3)`, the same for len(dim_mult) <= 4)
        for _ in range(cfg.num_res_blocks + 1):
            plan.append(("res", in_dim, out_dim))
            if scale in cfg.attn_scales:
                plan.append(("attn", out_dim))
            in_dim = out_dim
        if i != len(mult) - 1:
            plan.append(("resample", out_dim, "upsample3d" if temporal_upsample[i] else "upsample2d"))
            scale *= 2.0
    return plan, dims[0], dims[-1]


def _group_runs(plan: list[tuple], prefix: str) -> list[tuple[str, tuple, list[int]]]:
    """(module name, spec, reference indices): runs of >= 2 identical ``res(C, C)`` become one stacked entry."""
    out: list[tuple[str, tuple, list[int]]] = []
    i = 0
    while i < len(plan):
        spec = plan[i]
        j = i + 1
        if spec[0] == "res" and spec[1] == spec[2]:
            while j < len(plan) and plan[j] == spec:
                j += 1
        idx = list(range(i, j))
        out.append((f"{prefix}_{i}" if j == i + 1 else f"{prefix}_{i}-{j - 1}", spec, idx))
        i = j
    return out


def block_layout(cfg: VAEConfig) -> dict[str, tuple[str, Optional[int]]]:
    """Reference block prefix (``'decoder.upsamples.5'``) -> (our module path, index in its stack or None).

    Covers the blocks of ``downsamples`` / ``upsamples``; used by the checkpoint converter.
    """
    out: dict[str, tuple[str, Optional[int]]] = {}
    for part, seq, plan in (("encoder", "downsamples", _encoder_plan(cfg)[0]),
                            ("decoder", "upsamples", _decoder_plan(cfg)[0])):
        for name, _, idx in _group_runs(plan, seq):
            for pos, i in enumerate(idx):
                out[f"{part}.{seq}.{i}"] = (f"{part}/{name}", pos if len(idx) > 1 else None)
    return out


def _run_plan(plan: list[tuple], prefix: str, x: Array, cache: dict, new_cache: dict, first: First) -> Array:
    # Unrolled over HETEROGENEOUS blocks (channels / resolution change from one to the next); runs of identical
    # residual blocks inside are one nn.scan each (residual_stack).
    for name, spec, idx in _group_runs(plan, prefix):
        if spec[0] == "res":
            if len(idx) > 1:
                x, new_cache[name] = residual_stack(len(idx))(spec[1], spec[2], name=name)(
                    x, cache.get(name), first)
            else:
                x, new_cache[name] = ResidualBlock(spec[1], spec[2], name=name)(x, cache.get(name), first)
        elif spec[0] == "attn":
            x = AttentionBlock(spec[1], name=name)(x)
        else:
            x, c = Resample(spec[1], spec[2], name=name)(x, cache.get(name), first)
            if c is not None:
                new_cache[name] = c
    return x


def _middle(dim: int, x: Array, cache: dict, new_cache: dict, first: First) -> Array:
    x, new_cache["middle_0"] = ResidualBlock(dim, dim, name="middle_0")(x, cache.get("middle_0"), first)
    x = AttentionBlock(dim, name="middle_1")(x)
    x, new_cache["middle_2"] = ResidualBlock(dim, dim, name="middle_2")(x, cache.get("middle_2"), first)
    return x


class Encoder3d(nn.Module):
    cfg: VAEConfig

    @nn.compact
    def __call__(self, x: Array, cache: Optional[dict], first: First) -> tuple[Array, dict]:
        # x: [B, t, H, W, 3] one chunk (2**n_time_down frames; 1 frame on a static first step) -> [B, 1, h, w, 2z]
        cache = cache or {}
        plan, out_dim = _encoder_plan(self.cfg)
        new: dict = {}
        x, new["conv1"] = CausalConv3d(self.cfg.dim, (3, 3, 3), padding=(1, 1, 1), name="conv1")(
            x, cache.get("conv1"), first)
        x = _run_plan(plan, "downsamples", x, cache, new, first)
        x = _middle(out_dim, x, cache, new, first)
        x = nn.silu(RMSNorm(name="head_norm")(x))
        x, new["head_conv"] = CausalConv3d(2 * self.cfg.z_dim, (3, 3, 3), padding=(1, 1, 1), name="head_conv")(
            x, cache.get("head_conv"), first)
        return x, new


class Decoder3d(nn.Module):
    cfg: VAEConfig

    @nn.compact
    def __call__(self, x: Array, cache: Optional[dict], first: First) -> tuple[Array, dict]:
        # x: [B, 1, h, w, z] one latent frame (after conv2) -> [B, 4, H, W, 3] (only frame 0 real on a traced
        # first step; [B, 1, H, W, 3] on a static first step)
        cache = cache or {}
        plan, in_dim, _ = _decoder_plan(self.cfg)
        new: dict = {}
        x, new["conv1"] = CausalConv3d(in_dim, (3, 3, 3), padding=(1, 1, 1), name="conv1")(
            x, cache.get("conv1"), first)
        x = _middle(in_dim, x, cache, new, first)
        x = _run_plan(plan, "upsamples", x, cache, new, first)
        x = nn.silu(RMSNorm(name="head_norm")(x))
        x, new["head_conv"] = CausalConv3d(3, (3, 3, 3), padding=(1, 1, 1), name="head_conv")(
            x, cache.get("head_conv"), first)
        return x, new


class WanVAE(nn.Module):
    """Params: ``encoder``, ``conv1`` (2z -> 2z, 1x1x1), ``conv2`` (z -> z, 1x1x1), ``decoder``."""

    cfg: VAEConfig

    def setup(self) -> None:
        self.encoder = Encoder3d(self.cfg)
        self.conv1 = CausalConv3d(2 * self.cfg.z_dim, (1, 1, 1))
        self.conv2 = CausalConv3d(self.cfg.z_dim, (1, 1, 1))
        self.decoder = Decoder3d(self.cfg)

    def encode_chunk(self, x: Array, cache: Optional[dict], first: First) -> tuple[Array, dict]:
        return self.encoder(x, cache, first)

    def quant(self, x: Array) -> Array:
        return self.conv1(x)[0]

    def post_quant(self, z: Array) -> Array:
        return self.conv2(z)[0]

    def decode_frame(self, x: Array, cache: Optional[dict], first: First) -> tuple[Array, dict]:
        return self.decoder(x, cache, first)

    def init_all(self, video: Array, z: Array) -> Array:
        """Touch every parameter once (non-first paths, so the time convs exist)."""
        e, _ = self.encoder(video, None, False)
        d, _ = self.decoder(self.conv2(z)[0], None, False)
        return self.conv1(e)[0].sum() + d.sum()


# --------------------------------------------------------------------------------------------------
# Params
# --------------------------------------------------------------------------------------------------


def _dtype(cfg: VAEConfig) -> Any:
    return jnp.dtype(cfg.dtype)


def time_stride(cfg: VAEConfig) -> int:
    """Video frames per latent frame (after the first): the VAE takes ``T = 1 + stride * k`` frames."""
    return 2 ** sum(bool(t) for t in cfg.temporal_downsample)


def space_stride(cfg: VAEConfig) -> int:
    """Pixels per latent cell along H and W."""
    return 2 ** (len(cfg.dim_mult) - 1)


def _f32(cfg: VAEConfig) -> VAEConfig:
    return cfg if cfg.dtype == "float32" else dataclasses.replace(cfg, dtype="float32")


def _check_cfg(cfg: VAEConfig) -> None:
    if not isinstance(cfg, VAEConfig):
        raise TypeError(f"cfg must be a memflow_jax.config.VAEConfig, got {type(cfg).__name__}")
    cfg.validate()


def abstract_params(cfg: VAEConfig) -> dict:
    """``jax.ShapeDtypeStruct`` tree of the (float32) params, no allocation."""
    _check_cfg(cfg)
    return jax.tree_util.tree_map(lambda x: x, _abstract_params(cfg))  # fresh containers: callers may mutate


def learned_decoder(cfg: VAEConfig) -> bool:
    """Whether ``cfg`` decodes with the Wan decoder network (``wan``, or ``pca`` with ``pca_decoder``)."""
    return cfg.codec == "wan" or (cfg.codec == "pca" and cfg.pca_decoder)


def frozen_keys(cfg: VAEConfig, freeze_encoder: bool = False) -> tuple[str, ...]:
    """The params a ``vae``-recipe run keeps fixed, so that its latents stay those of its init: the fitted PCA
    (``pca`` with ``pca_decoder``), else the encoder when ``freeze_encoder`` (``train.vae_freeze_encoder``)."""
    if cfg.codec == "pca" and cfg.pca_decoder:
        return PCA_KEYS
    return ENCODER_KEYS if freeze_encoder and cfg.codec == "wan" else ()


@functools.lru_cache(maxsize=32)
def _abstract_params(cfg: VAEConfig) -> dict:
    if not learned_decoder(cfg):
        return pixel_codec.abstract_params(cfg)
    ts, ss = time_stride(cfg), space_stride(cfg)
    video = jax.ShapeDtypeStruct((1, ts, ss, ss, 3), jnp.float32)
    z = jax.ShapeDtypeStruct((1, 1, 1, 1, cfg.z_dim), jnp.float32)
    init = functools.partial(WanVAE(_f32(cfg)).init, method=WanVAE.init_all)
    wan = jax.eval_shape(init, jax.random.PRNGKey(0), video, z)["params"]
    if cfg.codec == "wan":
        return wan
    return {**pixel_codec.abstract_params(cfg), **{k: v for k, v in wan.items() if k not in ENCODER_KEYS}}


def init_params(cfg: VAEConfig, rng: Array) -> dict:
    """Random float32 params with PyTorch's default conv init (U(+-1/sqrt(fan_in)) for kernel and bias, norm
    scale 1); traceable (jit it with out_shardings to init sharded). The tree mirrors the reference state dict,
    runs of identical residual blocks stacked (see convert/vae.py). Values come from ONE uniform draw split over
    the leaves (per-leaf initializers would compile ~200 threefry kernels: a minute on CPU)."""
    if not learned_decoder(cfg):
        return pixel_codec.init_params(cfg, rng)
    if cfg.codec == "pca":  # the fitted codec's stand-in params + a fresh decoder
        k_pca, rng = jax.random.split(rng)
        net = {k: v for k, v in abstract_params(cfg).items() if k not in PCA_KEYS}
        return {**pixel_codec.init_params(cfg, k_pca), **_init_network(net, rng)}
    return _init_network(abstract_params(cfg), rng)


def _init_network(abstract: dict, rng: Array) -> dict:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    names = [tuple(str(getattr(k, "key", k)) for k in path) for path, _ in leaves]
    shapes = [tuple(s.shape) for _, s in leaves]
    # fan_in = kernel dims x in-channels; a stacked run (module name "<seq>_<a>-<b>") has a layer axis in front
    fan = {n[:-1]: int(np.prod(s[1 if any("-" in part for part in n) else 0:-1]))
           for n, s in zip(names, shapes) if n[-1] == "kernel"}
    total = sum(int(np.prod(s)) for s in shapes)
    draw = jax.random.uniform(rng, (total,), jnp.float32, -1.0, 1.0)
    try:  # eager: split on the host (slicing ~200 leaves op by op would compile ~200 tiny programs)
        draw, xp = np.asarray(draw), np
    except jax.errors.TracerArrayConversionError:  # under jit: slices inside the caller's program
        xp = jnp
    out, off = [], 0
    for n, s in zip(names, shapes):
        size = int(np.prod(s))
        if n[-1] == "scale":
            val = xp.ones(s, np.float32)
        else:  # kernel or bias of a conv: bound 1/sqrt(fan_in of that conv's kernel)
            val = draw[off:off + size].reshape(s) * np.float32(1.0 / math.sqrt(fan[n[:-1]]))
        off += size
        out.append(jnp.asarray(val))
    return jax.tree_util.tree_unflatten(treedef, out)


def param_count(params: Any) -> int:
    """Number of scalars in a (possibly abstract) param tree."""
    return int(sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params)))


def _stats(cfg: VAEConfig) -> tuple[Array, Array]:
    mean = jnp.asarray(np.asarray(cfg.latent_mean, np.float32))
    inv_std = jnp.asarray(np.float32(1.0) / np.asarray(cfg.latent_std, np.float32))  # reference scale[1] = 1/std
    return mean, inv_std


# --------------------------------------------------------------------------------------------------
# Encode
# --------------------------------------------------------------------------------------------------


def _check_video(cfg: VAEConfig, video: Any) -> None:
    if video.ndim != 5 or video.shape[1] != 3:
        raise ValueError(f"encode: video must be [B, 3, T, H, W] in [-1, 1], got shape {tuple(video.shape)}")
    _, _, t, h, w = video.shape
    ts, ss = time_stride(cfg), space_stride(cfg)
    if t < 1 or (t - 1) % ts:
        raise ValueError(f"encode: T={t} frames, but the Wan VAE needs T = 1 + {ts}k (1, {1 + ts}, {1 + 2 * ts}, "
                         f"...); trim the video to {1 + max(t - 1, 0) // ts * ts} frames")
    if h % ss or w % ss:
        raise ValueError(f"encode: H x W = {h} x {w} must be multiples of {ss} (the spatial stride); resize or crop")


def _encode_moments(params: dict, cfg: VAEConfig, video: Array, remat: bool = False) -> Array:
    """Posterior moments ``[B, T', h, w, 2z]`` (float32; ``mu`` = channels ``[:z]``, log-variance ``[z:]``, the
    reference's ``conv1(x).chunk(2)``) of a checked video ``[B, 3, T, H, W]``. ``remat``: recompute each
    encoder chunk in the backward pass (training memory)."""
    b, _, t, h, w = video.shape
    ts = time_stride(cfg)
    model = WanVAE(cfg)
    apply = functools.partial(model.apply, {"params": params}, method=WanVAE.encode_chunk)
    x = jnp.transpose(video, (0, 2, 3, 4, 1)).astype(_dtype(cfg))  # [B, T, H, W, 3]
    if t == 1:
        enc, _ = apply(x, None, True)  # frame 0 alone (static first step): [B, 1, h, w, 2z]
    else:
        # chunks [0], [1:5], [5:9], ... as the reference; the first is frame 0 repeated to ts frames and run
        # as a padded first step, so all chunks share one compiled encoder step under lax.scan
        k = (t - 1) // ts
        head = jnp.repeat(x[:, :1], ts, axis=1)[:, None]  # [B, 1, ts, H, W, 3]
        chunks = jnp.concatenate([head, x[:, 1:].reshape(b, k, ts, h, w, 3)], axis=1)
        flags = jnp.arange(k + 1) == 0

        def step(c, xs):
            xc, flag = xs
            y, c = apply(xc, c, flag)
            return c, y[:, 0]

        if remat:
            step = jax.checkpoint(step)
        cache = jax.eval_shape(lambda p, xc: apply(xc, None, True)[1], params, x[:, :1])
        cache = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), cache)
        _, ys = lax.scan(step, cache, (jnp.moveaxis(chunks, 1, 0), flags))  # [k+1, B, h, w, 2z]
        enc = jnp.moveaxis(ys, 0, 1)
    return model.apply({"params": params}, enc, method=WanVAE.quant).astype(jnp.float32)  # conv1 (1x1x1)


def _encode_mu(params: dict, cfg: VAEConfig, video: Array) -> Array:
    """Raw ``mu`` ``[B, T', h, w, z]`` (float32) of a checked video ``[B, 3, T, H, W]`` (log-var dropped)."""
    if cfg.codec in PIXEL_CODECS:
        cells = pixel_codec.encode_raw(cfg, jnp.transpose(video, (0, 2, 3, 4, 1)).astype(jnp.float32))
        return pixel_codec.project(params, cells) if cfg.codec == "pca" else cells
    return _encode_moments(params, cfg, video)[..., :cfg.z_dim]


_encode_mu_jit = jax.jit(_encode_mu, static_argnums=1)


def video_to_input(video: Array) -> Array:
    """uint8 video ``[B, T, H, W, 3]`` -> the VAE's input ``[B, 3, T, H, W]`` float32 in [-1, 1] (traceable)."""
    return jnp.transpose(video, (0, 4, 1, 2, 3)).astype(jnp.float32) / 127.5 - 1.0


def encode(params: dict, cfg: VAEConfig, video: Array, normalize: bool = True) -> Array:
    """Video ``[B, 3, T, H, W]`` in [-1, 1] -> latents ``[B, 1 + (T-1)/4, z, H/8, W/8]`` (compiled inside).

    ``normalize=True`` returns ``(mu - mean) * (1/std)`` (WanVAEWrapper.encode_to_latent); ``False`` the raw
    ``mu`` (WanVAE_.encode with scale [0, 1]). Runs the encoder on frames ``[0]``, ``[1:5]``, ``[5:9]``, ...
    carrying the causal cache (as the reference), the chunks by one ``lax.scan``.
    """
    _check_cfg(cfg)
    _check_video(cfg, video)
    mu = _encode_mu_jit(params, cfg, video)  # [B, T', h, w, z]
    if normalize:
        mean, inv_std = _stats(cfg)
        mu = (mu - mean) * inv_std
    return jnp.transpose(mu, (0, 1, 4, 2, 3))  # [B, T', z, h, w]


def encode_moments(params: dict, cfg: VAEConfig, video: Array, remat: bool = False) -> tuple[Array, Array]:
    """Traceable posterior of a video ``[B, 3, T, H, W]`` in [-1, 1] (VAE training): ``(mu, logvar)``, each
    ``[B, T', z, h, w]`` float32, raw (not normalised by ``latent_mean`` / ``latent_std``).

    The same chunked, cached encoder as :func:`encode` (``mu`` here equals ``encode(..., normalize=False)``).
    """
    _check_cfg(cfg)
    if cfg.codec in PIXEL_CODECS:
        raise ValueError(f"encode_moments: vae.codec={cfg.codec} is a fixed codec (pca: fitted in closed form by "
                         "pixel_codec.fit_pca): there is no posterior to train; train a VAE with vae.codec=wan")
    _check_video(cfg, video)
    moments = jnp.transpose(_encode_moments(params, cfg, video, remat), (0, 1, 4, 2, 3))  # [B, T', 2z, h, w]
    return moments[:, :, :cfg.z_dim], moments[:, :, cfg.z_dim:]


# --------------------------------------------------------------------------------------------------
# Decode
# --------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class DecodeCache:
    """Streaming-decode state: ``[B, 2, h_l, w_l, C_l]`` per causal time conv of the decoder (``[n, B, ...]``
    for a stack of n identical blocks), all zero at the start.

    ``num_latents`` counts decoded latent frames (int32 array). ``started`` is static (tree structure): it
    decides the output length of the next chunk (first chunk: 1 + 4(k-1) frames, later ones 4k).
    """

    feats: dict
    num_latents: Array
    started: bool = flax.struct.field(pytree_node=False, default=False)


def init_decode_cache(cfg: VAEConfig, batch: int, h: int, w: int, dtype: Any = None) -> DecodeCache:
    """Zero cache for latents of spatial size ``h x w``; ``dtype`` defaults to ``cfg.dtype`` (compute dtype)."""
    _check_cfg(cfg)
    dtype = jnp.dtype(dtype) if dtype is not None else _dtype(cfg)
    feats = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, dtype), _cache_shapes(cfg, batch, h, w, dtype))
    return DecodeCache(feats=feats, num_latents=jnp.zeros((), jnp.int32), started=False)


@functools.lru_cache(maxsize=32)
def _cache_shapes(cfg: VAEConfig, batch: int, h: int, w: int, dtype: Any) -> dict:
    if not learned_decoder(cfg):
        return {}  # every latent frame decodes on its own
    x = jax.ShapeDtypeStruct((batch, 1, h, w, cfg.z_dim), dtype)
    _, feats = jax.eval_shape(  # the cache a first step builds from nothing has the fixed cache shapes
        lambda p, xx: WanVAE(cfg).apply({"params": p}, xx, None, True, method=WanVAE.decode_frame),
        abstract_params(cfg), x)
    return feats


def _check_latents(cfg: VAEConfig, latents: Any, cache: Optional[DecodeCache]) -> None:
    if latents.ndim != 5 or latents.shape[2] != cfg.z_dim or latents.shape[1] < 1:
        raise ValueError(f"decode: latents must be [B, T>=1, z_dim={cfg.z_dim}, h, w], got {tuple(latents.shape)}")
    if cache is not None and cache.feats:  # (the pixel codecs' cache is empty: nothing to match)
        b, _, _, h, w = latents.shape
        want = cache.feats["conv1"].shape  # decoder.conv1 sees the latent grid: [B, 2, h, w, z]
        if want[0] != b or tuple(want[2:4]) != (h, w):
            raise ValueError(f"decode_chunk: the cache was made for batch {want[0]}, latent size {tuple(want[2:4])}; "
                             f"the latents are batch {b}, size {(h, w)}: use init_decode_cache(cfg, {b}, {h}, {w})")


def _decode_step(params: dict, cfg: VAEConfig, z: Array, feats: dict, first: First,
                 normalized: bool = True) -> tuple[Array, dict]:
    """One latent frame ``[B, 1, h, w, z]`` -> ``[B, 4, H, W, 3]`` float32 and the new cache.

    ``first`` (traced bool): the video's first latent frame; then only output frame 0 is real. ``normalized``
    (static): ``z`` is a normalised latent, denormalised here (reference: ``z / (1/std) + mean``); False: a raw
    latent (VAE training). Applies ``conv2`` (1x1x1: per frame == on the whole sequence) and the decoder in the
    compute dtype; the cache keeps its own dtype.
    """
    z = z.astype(jnp.float32)
    if normalized:
        mean, inv_std = _stats(cfg)
        z = z / inv_std + mean
    if not learned_decoder(cfg):
        y = pixel_codec.decode_raw(cfg, pixel_codec.unproject(params, z) if cfg.codec == "pca" else z)  # [B,4k,H,W,3]
        if first is not False:  # the video's first latent frame: its one real frame is the mean of its slots
            ts = time_stride(cfg)
            y = jnp.concatenate([jnp.where(first, pixel_codec.first_frame(cfg, y[:, :ts]), y[:, :ts]), y[:, ts:]],
                                axis=1)
        return y, feats
    dt = _dtype(cfg)
    model = WanVAE(cfg)
    x = model.apply({"params": params}, z.astype(dt), method=WanVAE.post_quant)
    y, new = model.apply({"params": params}, x, jax.tree_util.tree_map(lambda a: a.astype(dt), feats), first,
                         method=WanVAE.decode_frame)
    new = jax.tree_util.tree_map(lambda a, o: a.astype(o.dtype), new, feats)
    return y.astype(jnp.float32), new


def _decode_chunk_raw(params: dict, cfg: VAEConfig, latents: Array, cache: DecodeCache, normalized: bool = True,
                      remat: bool = False) -> tuple[Array, DecodeCache]:
    """Unclamped chunk decode, traceable: ``[B, k, z, h, w]`` -> ``[B, F, H, W, 3]`` float32 and the new cache.
    ``remat``: recompute each latent frame's decoder step in the backward pass (training memory)."""
    b, k = latents.shape[:2]
    z = jnp.moveaxis(jnp.transpose(latents, (0, 1, 3, 4, 2)), 1, 0)[:, :, None]  # [k, B, 1, h, w, z]
    flags = (jnp.arange(k) == 0) & (not cache.started)

    def step(c, xs):  # one latent frame -> 4 frames; one compiled decoder step, cache carried
        y, c = _decode_step(params, cfg, xs[0], c, xs[1], normalized)
        return c, y

    if remat:
        step = jax.checkpoint(step)
    feats, ys = lax.scan(step, cache.feats, (z, flags))  # ys: [k, B, 4, H, W, 3]
    ys = jnp.moveaxis(ys, 0, 1)  # [B, k, 4, H, W, 3]
    if cache.started:
        pix = ys.reshape((b, -1) + ys.shape[3:])
    else:  # the video's first latent frame gives one real frame (frame 0 of its step)
        pix = jnp.concatenate([ys[:, 0, :1], ys[:, 1:].reshape((b, -1) + ys.shape[3:])], axis=1)
    return pix, DecodeCache(feats=feats, num_latents=cache.num_latents + k, started=True)


def _to_pixels(pix: Array, clamp: bool) -> Array:
    """Decoder output ``[B, F, H, W, 3]`` -> ``[B, F, 3, H, W]``, clamped to [-1, 1] if ``clamp``."""
    if clamp:
        pix = jnp.clip(pix, -1.0, 1.0)
    return jnp.transpose(pix, (0, 1, 4, 2, 3))


def decode_chunk(params: dict, cfg: VAEConfig, latents: Array, cache: DecodeCache,
                 clamp: bool = True) -> tuple[Array, DecodeCache]:
    """Decode the next chunk of latents ``[B, k, z, h, w]`` -> pixels ``[B, F, 3, H, W]`` and the new cache.

    ``F = 1 + 4(k-1)`` for the first chunk (``cache.started`` False), ``4k`` after; chunks decoded in turn
    equal one full decode (the reference's ``cached_decode``). Traceable (``lax.scan`` over the chunk's latent
    frames): jit it with ``static_argnums=1`` (+ ``static_argnames='clamp'``) and ``donate_argnums=3``, e.g.
    inside a sampler step. For eager use prefer :func:`decode_chunk_jit` (one compile for every chunk length).
    """
    _check_cfg(cfg)
    _check_latents(cfg, latents, cache)
    pix, new_cache = _decode_chunk_raw(params, cfg, latents, cache)
    return _to_pixels(pix, clamp), new_cache


_decode_step_jit = jax.jit(_decode_step, static_argnums=1, donate_argnums=3)


@functools.partial(jax.jit, static_argnums=(1, 4), donate_argnums=3)
def _decode_frames_jit(params: dict, cfg: VAEConfig, latents: Array, feats: dict,
                       clamp: bool) -> tuple[Array, dict]:
    """A started video's next ``k`` latent frames ``[B, k, z, h, w]`` in one decoder call -> pixels
    ``[B, 4k, 3, H, W]`` and the new cache (``first`` static False: no per-frame selects)."""
    y, feats = _decode_step(params, cfg, jnp.transpose(latents, (0, 1, 3, 4, 2)), feats, False)
    return _to_pixels(y, clamp), feats


@functools.partial(jax.jit, static_argnums=1)
def _split_frames(latents: Array, k: int) -> tuple[Array, ...]:
    z = jnp.transpose(latents, (0, 1, 3, 4, 2))  # [B, k, h, w, z]
    return tuple(z[:, i:i + 1] for i in range(k))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _assemble(ys: tuple[Array, ...], first: bool, clamp: bool) -> Array:
    ys = ((ys[0][:, :1],) + tuple(ys[1:])) if first else ys  # first latent frame: one real frame
    return _to_pixels(jnp.concatenate(ys, axis=1), clamp)


def decode_chunk_jit(params: dict, cfg: VAEConfig, latents: Array, cache: DecodeCache,
                     clamp: bool = True, whole_chunk: bool = True) -> tuple[Array, DecodeCache]:
    """:func:`decode_chunk` for eager callers; the cache is DONATED (do not reuse the one passed in).

    The video's first chunk runs ONE compiled decoder step per latent frame from Python (the reference's
    ``cached_decode`` loop; the same program for the first and later frames). Later chunks (``whole_chunk``,
    default) run their ``k`` latent frames through the decoder in ONE call: every time conv is causal with an
    explicit cache, so this equals ``k`` single-frame steps (up to rounding) and the convs see ``k`` times more
    frames at once (H100, 480x832 bf16: 0.117 -> 0.105 s a chunk, +4 GiB peak; benchmarks/RESULTS.md). It
    compiles once per chunk length. ``whole_chunk=False`` keeps the per-frame steps for every chunk (one program
    for all lengths, the smaller peak).
    """
    _check_cfg(cfg)
    _check_latents(cfg, latents, cache)
    k = latents.shape[1]
    if whole_chunk and cache.started:
        pix, feats = _decode_frames_jit(params, cfg, jnp.asarray(latents), cache.feats, bool(clamp))
        return pix, DecodeCache(feats=feats, num_latents=cache.num_latents + k, started=True)
    feats = cache.feats
    ys = []
    for i, z in enumerate(_split_frames(jnp.asarray(latents), k)):
        y, feats = _decode_step_jit(params, cfg, z, feats, np.bool_(i == 0 and not cache.started))
        ys.append(y)
    new_cache = DecodeCache(feats=feats, num_latents=cache.num_latents + k, started=True)
    return _assemble(tuple(ys), not cache.started, bool(clamp)), new_cache


decode_stream = decode_chunk_jit  # the name used in DESIGN.md


def decode(params: dict, cfg: VAEConfig, latents: Array, clamp: bool = True) -> Array:
    """Latents ``[B, T', z, h, w]`` -> pixels ``[B, 1 + 4(T'-1), 3, 8h, 8w]`` (compiled inside), clamped to
    [-1, 1] unless ``clamp=False``; one latent frame at a time with the causal cache (``decode_to_pixel``)."""
    _check_cfg(cfg)
    _check_latents(cfg, latents, None)
    b, _, _, h, w = latents.shape
    return decode_chunk_jit(params, cfg, latents, init_decode_cache(cfg, b, h, w), clamp=clamp)[0]


def decode_clip(params: dict, cfg: VAEConfig, latents: Array, normalized: bool = True,
                remat: bool = False) -> Array:
    """Traceable, differentiable whole-clip decode (VAE training): ``[B, T', z, h, w]`` -> unclamped pixels
    ``[B, 1 + 4(T'-1), 3, H, W]`` float32. ``normalized=False`` takes raw latents (the encoder's ``mu`` / a
    posterior sample) instead of normalised ones.

    It is :func:`decode_chunk` from a fresh cache: the same per-latent-frame decoder step (traced ``first``
    flag, no Python branching) under ``lax.scan``, so it is causal and equals the streaming decode (up to f32
    rounding; the compiled programs differ).
    """
    _check_cfg(cfg)
    _check_latents(cfg, latents, None)
    b, _, _, h, w = latents.shape
    cache = DecodeCache(feats=jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                                     _cache_shapes(cfg, b, h, w, _dtype(cfg))),
                        num_latents=jnp.zeros((), jnp.int32), started=False)
    pix, _ = _decode_chunk_raw(params, cfg, latents, cache, normalized=normalized, remat=remat)
    return jnp.transpose(pix, (0, 1, 4, 2, 3))  # [B, F, 3, H, W]
