"""Wan2.1 DiT in Flax Linen: embed -> lax.scan(blocks) -> head.

Two entry points share every layer:
* :func:`forward` — bidirectional (teacher / critic): ``[B, C, F, H, W]`` -> flow prediction.
* :func:`chunk_forward` — causal generator: a chunk of frames at absolute frame offset ``f0``; self-attention
  goes through an ``attend_fn`` supplied by the caller (the memory package builds the KV context from the cache
  and returns what it wants written back), threaded per layer through the scan.

Parameters: non-block params at the top level, block params stacked on a leading ``[num_layers]`` axis under
``params["blocks"]``. All Dense kernels are ``[in, out]``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from memflow_jax.config import ModelConfig
from memflow_jax.nn import attention as attn_lib
from memflow_jax.nn import initializers as init_lib
from memflow_jax.nn.rope import apply_rope, rope_tables, sinusoidal_embedding

Params = dict[str, Any]
# attend_fn(q, k, v, layer_inputs) -> (out [B, Lq, H, D], layer_outputs); q/k post-RoPE, shapes [B, L, H, D].
AttendFn = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray, Any], tuple[jnp.ndarray, Any]]


@dataclasses.dataclass(frozen=True)
class LayerCarry:
    """State carried whole through the layer scan (see :func:`run_blocks`): ``state`` (leading [L] axis),
    ``read(state, i, layer_inputs) -> layer_inputs`` and ``write(state, i, outputs) -> (state, outputs)``.
    ``ordered``: put an optimization barrier between the block and ``write`` (the block reads the old state and
    ``write`` updates it); False when the block itself returns the new state (``write`` only picks it up)."""

    state: Any
    read: Callable[[Any, jnp.ndarray, Any], Any]
    write: Callable[[Any, jnp.ndarray, Any], tuple[Any, Any]]
    ordered: bool = True


def _dtype(name: str) -> Any:
    return jnp.dtype(name)


def matmul_precision(cfg: ModelConfig) -> lax.Precision | None:
    return lax.Precision.HIGHEST if cfg.dtype == "float32" else None


def _dense(cfg: ModelConfig, features: int, name: str | None = None) -> nn.Dense:
    return nn.Dense(features, dtype=_dtype(cfg.dtype), param_dtype=_dtype(cfg.param_dtype),
                    precision=matmul_precision(cfg), name=name,
                    kernel_init=init_lib.xavier_uniform())  # = nn.initializers.xavier_uniform(), drawn flat


class RMSNorm(nn.Module):
    """``w * x * rsqrt(mean(x^2) + eps)``, computed in float32 (reference WanRMSNorm)."""

    dim: int
    eps: float
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        scale = self.param("scale", nn.initializers.ones, (self.dim,), self.param_dtype)
        xf = x.astype(jnp.float32)
        y = xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return y.astype(x.dtype) * scale.astype(x.dtype)


def layer_norm(x: jnp.ndarray, eps: float) -> jnp.ndarray:
    """LayerNorm without affine parameters, statistics in float32."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    return ((xf - mean) * lax.rsqrt(var + eps)).astype(x.dtype)


class AffineLayerNorm(nn.Module):
    dim: int
    eps: float
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        scale = self.param("scale", nn.initializers.ones, (self.dim,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.dim,), self.param_dtype)
        return layer_norm(x, self.eps) * scale.astype(x.dtype) + bias.astype(x.dtype)


class Attention(nn.Module):
    """q/k/v/o projections with q/k RMSNorm; used for self- and cross-attention."""

    cfg: ModelConfig

    def setup(self) -> None:
        c = self.cfg
        self.q = _dense(c, c.dim)
        self.k = _dense(c, c.dim)
        self.v = _dense(c, c.dim)
        self.o = _dense(c, c.dim)
        if c.qk_norm:
            self.norm_q = RMSNorm(c.dim, c.eps, _dtype(c.param_dtype))
            self.norm_k = RMSNorm(c.dim, c.eps, _dtype(c.param_dtype))

    def _split(self, x: jnp.ndarray) -> jnp.ndarray:
        return x.reshape(x.shape[:-1] + (self.cfg.num_heads, self.cfg.head_dim))

    def project_q(self, x: jnp.ndarray) -> jnp.ndarray:  # [B, L, dim] -> [B, L, H, D]
        q = self.q(x)
        return self._split(self.norm_q(q) if self.cfg.qk_norm else q)

    def project_kv(self, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        k = self.k(x)
        k = self.norm_k(k) if self.cfg.qk_norm else k
        return self._split(k), self._split(self.v(x))

    def out(self, x: jnp.ndarray) -> jnp.ndarray:  # [B, L, H, D] -> [B, L, dim]
        return self.o(x.reshape(x.shape[:-2] + (self.cfg.dim,)))

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:  # used only by init
        q = self.project_q(x)
        k, v = self.project_kv(x)
        return self.out(q + k + v)


class WanBlock(nn.Module):
    """One Wan attention block (self-attn with RoPE + cross-attn + FFN, 6-way adaLN modulation per frame)."""

    cfg: ModelConfig

    def setup(self) -> None:
        c = self.cfg
        self.self_attn = Attention(c)
        self.cross_attn = Attention(c)
        self.norm3 = AffineLayerNorm(c.dim, c.eps, _dtype(c.param_dtype)) if c.cross_attn_norm else None
        self.ffn_0 = _dense(c, c.ffn_dim)
        self.ffn_2 = _dense(c, c.dim)
        self.modulation = self.param(
            "modulation", lambda k, s, d: (init_lib.standard_normal(k, s) / math.sqrt(c.dim)).astype(d), (6, c.dim),
            _dtype(c.param_dtype))

    def init_all(self, x, e0, cos, sin, context, attend_fn):
        """Touches every parameter (for ``init``)."""
        tk, tv = self.text_kv(context)
        return self(x, e0, cos, sin, tk, tv, attend_fn, None)

    def text_kv(self, context: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Cross-attention K/V of the embedded text [B, T, dim] -> ([B, T, H, D], [B, T, H, D])."""
        return self.cross_attn.project_kv(context)

    def __call__(self, x: jnp.ndarray, e0: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray,
                 text_k: jnp.ndarray, text_v: jnp.ndarray, attend_fn: AttendFn,
                 layer_inputs: Any) -> tuple[jnp.ndarray, Any]:
        """x: [B, F*S, dim]; e0: [B, F, 6, dim]; cos/sin: [(B,) F*S, D/2]; text_k/v: [B, T, H, D], or
        [B, F, T, H, D] for a prompt per frame."""
        c = self.cfg
        b, n, _ = x.shape
        f = e0.shape[1]
        s = n // f
        e = (self.modulation.astype(jnp.float32)[None, None] + e0.astype(jnp.float32))  # [B, F, 6, dim]
        e = [e[:, :, i][:, :, None, :] for i in range(6)]  # each [B, F, 1, dim]

        def modulate(h, shift, scale):
            h = h.reshape(b, f, s, c.dim)
            return (h * (1 + scale) + shift).reshape(b, n, c.dim).astype(x.dtype)

        def gate(h, g):
            return (h.reshape(b, f, s, c.dim) * g).reshape(b, n, c.dim).astype(x.dtype)

        # self-attention
        h = modulate(layer_norm(x, c.eps), e[0], e[1])
        q = apply_rope(self.self_attn.project_q(h), cos, sin)
        k, v = self.self_attn.project_kv(h)
        k = apply_rope(k, cos, sin)
        y, layer_out = attend_fn(q, k, v, layer_inputs)
        x = x + gate(self.self_attn.out(y), e[2])
        # cross-attention (all text_len tokens, no text mask: reference behaviour)
        h = self.norm3(x) if self.norm3 is not None else x
        qc = self.cross_attn.project_q(h)
        tk, tv = text_k.astype(qc.dtype), text_v.astype(qc.dtype)
        if tk.ndim == 5:  # a prompt per frame [B, F, T, H, D]: each frame's tokens attend to their own prompt
            tk, tv = (a.reshape((b * f,) + a.shape[2:]) for a in (tk, tv))
            yc = attn_lib.attention(qc.reshape((b * f, s) + qc.shape[2:]), tk, tv, impl=c.attention_impl,
                                    precision=matmul_precision(c)).reshape(qc.shape)
        else:
            yc = attn_lib.attention(qc, tk, tv, impl=c.attention_impl, precision=matmul_precision(c))
        x = x + self.cross_attn.out(yc)
        # feed-forward
        h = modulate(layer_norm(x, c.eps), e[3], e[4])
        y = self.ffn_2(nn.gelu(self.ffn_0(h), approximate=True))
        x = x + gate(y, e[5])
        return x, layer_out


class WanOuter(nn.Module):
    """Everything outside the blocks: patch/text/time embeddings and the head."""

    cfg: ModelConfig

    def setup(self) -> None:
        c = self.cfg
        self.patch_embedding = _dense(c, c.dim)
        self.text_embedding_0 = _dense(c, c.dim)
        self.text_embedding_2 = _dense(c, c.dim)
        self.time_embedding_0 = _dense(c, c.dim)
        self.time_embedding_2 = _dense(c, c.dim)
        self.time_projection = _dense(c, 6 * c.dim)
        self.head = Head(c)

    def embed(self, x: jnp.ndarray) -> tuple[jnp.ndarray, tuple[int, int, int]]:
        """[B, C, F, H, W] -> tokens [B, F'*H'*W', dim] (order f, h, w) and grid (F', H', W')."""
        pt, ph, pw = self.cfg.patch_size
        b, ch, f, hh, ww = x.shape
        if f % pt or hh % ph or ww % pw:
            raise ValueError(f"latent shape {x.shape} is not divisible by patch_size {self.cfg.patch_size}")
        g = (f // pt, hh // ph, ww // pw)
        x = x.reshape(b, ch, g[0], pt, g[1], ph, g[2], pw)
        x = x.transpose(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, g[0] * g[1] * g[2], ch * pt * ph * pw)
        return self.patch_embedding(x.astype(_dtype(self.cfg.dtype))), g

    def time(self, t: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """t: [B, F] -> (e [B, F, dim], e0 [B, F, 6, dim]) in float32."""
        c = self.cfg
        s = sinusoidal_embedding(t, c.freq_dim).astype(_dtype(c.dtype))
        e = self.time_embedding_2(nn.silu(self.time_embedding_0(s)))
        e0 = self.time_projection(nn.silu(e))
        e0 = e0.reshape(e0.shape[:-1] + (6, c.dim))
        return e.astype(jnp.float32), e0.astype(jnp.float32)

    def text(self, context: jnp.ndarray) -> jnp.ndarray:
        """[B, T, text_dim] -> [B, T, dim]."""
        h = self.text_embedding_0(context.astype(_dtype(self.cfg.dtype)))
        return self.text_embedding_2(nn.gelu(h, approximate=True))

    def __call__(self, x, t, context):  # used only by init
        tok, g = self.embed(x)
        e, _ = self.time(t)
        return self.head.apply_head(tok, e, g), self.text(context)


class Head(nn.Module):
    cfg: ModelConfig

    def setup(self) -> None:
        c = self.cfg
        self.head = _dense(c, c.out_dim * math.prod(c.patch_size))
        self.modulation = self.param(
            "modulation", lambda k, s, d: (init_lib.standard_normal(k, s) / math.sqrt(c.dim)).astype(d), (2, c.dim),
            _dtype(c.param_dtype))

    def apply_head(self, x: jnp.ndarray, e: jnp.ndarray, grid: tuple[int, int, int]) -> jnp.ndarray:
        """x: [B, F*S, dim]; e: [B, F, dim] -> [B, C_out, F, H, W] (float32)."""
        c = self.cfg
        b, n, _ = x.shape
        f = e.shape[1]
        m = self.modulation.astype(jnp.float32)[None, None] + e[:, :, None, :]  # [B, F, 2, dim]
        h = layer_norm(x, c.eps).reshape(b, f, n // f, c.dim)
        h = (h * (1 + m[:, :, 1:2]) + m[:, :, 0:1]).reshape(b, n, c.dim).astype(x.dtype)
        out = self.head(h).astype(jnp.float32)
        pt, ph, pw = c.patch_size
        gf, gh, gw = grid
        out = out.reshape(b, gf, gh, gw, pt, ph, pw, c.out_dim)
        out = out.transpose(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(b, c.out_dim, gf * pt, gh * ph, gw * pw)


# --------------------------------------------------------------------------------------------------
# Params
# --------------------------------------------------------------------------------------------------


def _dummy_inputs(cfg: ModelConfig):
    pt, ph, pw = cfg.patch_size
    x = jnp.zeros((1, cfg.in_dim, pt, ph, pw), jnp.float32)
    t = jnp.zeros((1, 1), jnp.float32)
    ctx = jnp.zeros((1, 1, cfg.text_dim), jnp.float32)
    return x, t, ctx


def _plain_attend(q, k, v, _):
    return attn_lib.attention(q, k, v, impl="xla"), None


def init_params(cfg: ModelConfig, rng: jax.Array) -> Params:
    """Random params (Wan init: xavier-uniform Dense, normal(0, 0.02) for text/time embeddings, zero head).
    One compiled program (eagerly, the init's dummy forward would compile op by op: ~10 s on CPU)."""
    return _init_params_jit(cfg, rng)


@functools.partial(jax.jit, static_argnums=0)
def _init_params_jit(cfg: ModelConfig, rng: jax.Array) -> Params:
    k_outer, k_blocks = jax.random.split(rng)
    x, t, ctx = _dummy_inputs(cfg)
    outer = WanOuter(cfg).init(k_outer, x, t, ctx)["params"]
    outer = dict(outer)
    for name in ("text_embedding_0", "text_embedding_2", "time_embedding_0", "time_embedding_2"):
        k_outer, sub = jax.random.split(k_outer)
        outer[name] = dict(outer[name])
        outer[name]["kernel"] = 0.02 * jax.random.normal(sub, outer[name]["kernel"].shape,
                                                         outer[name]["kernel"].dtype)
    outer["head"] = dict(outer["head"])
    outer["head"]["head"] = dict(outer["head"]["head"])
    outer["head"]["head"]["kernel"] = jnp.zeros_like(outer["head"]["head"]["kernel"])

    def one_block(key):
        d = cfg.head_dim
        hx = jnp.zeros((1, 1, cfg.dim), jnp.float32)
        e0 = jnp.zeros((1, 1, 6, cfg.dim), jnp.float32)
        cs = jnp.zeros((1, d // 2), jnp.float32)
        return WanBlock(cfg).init(key, hx, e0, cs, cs, hx, _plain_attend, method=WanBlock.init_all)["params"]

    blocks = jax.vmap(one_block)(jax.random.split(k_blocks, cfg.num_layers))
    outer["blocks"] = blocks
    return outer


def abstract_params(cfg: ModelConfig) -> Params:
    """Shapes/dtypes of the params (no allocation)."""
    return jax.eval_shape(lambda k: init_params(cfg, k), jax.random.PRNGKey(0))


def count_params(params: Params) -> int:
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params))


def _outer(params: Params) -> dict:
    return {"params": {k: v for k, v in params.items() if k != "blocks"}}


# --------------------------------------------------------------------------------------------------
# Forward pieces
# --------------------------------------------------------------------------------------------------


def embed_text(params: Params, cfg: ModelConfig, context: jnp.ndarray) -> jnp.ndarray:
    """Text embedding MLP: [B, T, text_dim] -> [B, T, dim]."""
    if context.shape[-1] != cfg.text_dim:
        raise ValueError(f"prompt embeddings have width {context.shape[-1]}, the model expects "
                         f"text_dim={cfg.text_dim} (UMT5 output); check the text encoder / model config")
    return WanOuter(cfg).apply(_outer(params), context, method=WanOuter.text)


def text_kv(params: Params, cfg: ModelConfig, context: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Per-layer cross-attention K/V of a prompt, computed once: [B, T, text_dim] -> 2 x [L, B, T, H, D] (a prompt
    per frame: [B, F, T, text_dim] -> 2 x [L, B, F, T, H, D])."""
    ctx = embed_text(params, cfg, context)
    block = WanBlock(cfg)

    def one(p):
        return block.apply({"params": split_self_qkv(p)}, ctx, method=WanBlock.text_kv)

    return jax.lax.map(one, params["blocks"])


def _remat(fn: Callable, cfg: ModelConfig) -> Callable:
    if cfg.remat == "none":
        return fn
    policy = None if cfg.remat == "full" else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    return jax.checkpoint(fn, policy=policy, static_argnums=())


_QKV = ("q", "k", "v")


def fuse_self_qkv(params: Params) -> Params:
    """The sampler's layout of the params: each layer's self-attention q/k/v Dense kernels side by side in one
    ``blocks.self_attn.qkv`` (kernel ``[L, dim, 3*dim]``, bias ``[L, 3*dim]``), the rest shared with ``params``.

    On the GPU, XLA merges the three projections of the same input into one GEMM and, with separate weights,
    concatenates the layer's three kernels for it on every layer-forward (a copy of 3 * dim^2 values); stored side
    by side, the merged GEMM reads the layer's slice as it is. Every forward here (:func:`run_blocks`,
    :func:`text_kv`) takes either layout (:func:`split_self_qkv`); training keeps the checkpoint's layout.
    Costs one more copy of the q/k/v kernels while the caller also holds ``params``.
    """
    attn = params["blocks"]["self_attn"]
    if "qkv" in attn:
        return params
    fused = {"kernel": jnp.concatenate([attn[n]["kernel"] for n in _QKV], axis=-1),  # [L, dim, 3*dim]
             "bias": jnp.concatenate([attn[n]["bias"] for n in _QKV], axis=-1)}  # [L, 3*dim]
    rest = {k: v for k, v in attn.items() if k not in _QKV}
    return {**params, "blocks": {**params["blocks"], "self_attn": {**rest, "qkv": fused}}}


def split_self_qkv(layer: Params) -> Params:
    """One layer's (or the stacked) block params in either layout -> the module's layout (q/k/v Dense): static
    slices of the fused kernel, which XLA's merged q‖k‖v GEMM reads back as the one buffer."""
    attn = layer["self_attn"]
    if "qkv" not in attn:
        return layer
    d = attn["qkv"]["kernel"].shape[-1] // 3
    split = {n: {"kernel": attn["qkv"]["kernel"][..., i * d:(i + 1) * d],
                 "bias": attn["qkv"]["bias"][..., i * d:(i + 1) * d]} for i, n in enumerate(_QKV)}
    rest = {k: v for k, v in attn.items() if k != "qkv"}
    return {**layer, "self_attn": {**rest, **split}}


def pack_small_params(blocks: Params, max_size: int) -> tuple[list, dict, Callable[[list, dict], Params]]:
    """Stacked block params -> (big leaves, small leaves packed per dtype ``{dtype: [L, P]}``, ``unpack``).

    Every leaf with fewer than ``max_size`` values a layer (biases, norm scales, modulation; not the Dense kernels)
    goes into one ``[L, P]`` row buffer per dtype, so the layer scan slices one row a layer instead of one small
    copy kernel per leaf (≈15 a layer-forward on the GPU, launch-bound). ``unpack(big_i, small_i)`` rebuilds one
    layer's param tree from the scan's slices (static slices of the row: free inside the consumers' fusions), in
    the module's layout (:func:`split_self_qkv`).
    """
    leaves, treedef = jax.tree_util.tree_flatten(blocks)
    num_layers = leaves[0].shape[0]
    is_small = [math.prod(x.shape[1:]) < max_size for x in leaves]
    groups: dict[str, list[int]] = {}
    for i, x in enumerate(leaves):
        if is_small[i]:
            groups.setdefault(jnp.dtype(x.dtype).name, []).append(i)
    small = {dt: jnp.concatenate([leaves[i].reshape(num_layers, -1) for i in idx], axis=1)
             for dt, idx in groups.items()}
    big = [x for x, sm in zip(leaves, is_small) if not sm]

    def unpack(big_i: list, small_i: dict) -> Params:
        out: list = [None] * len(leaves)
        it = iter(big_i)
        for i, sm in enumerate(is_small):
            if not sm:
                out[i] = next(it)
        for dt, idx in groups.items():
            off = 0
            for i in idx:
                shape = leaves[i].shape[1:]
                size = math.prod(shape)
                out[i] = small_i[dt][off:off + size].reshape(shape)
                off += size
        return split_self_qkv(jax.tree_util.tree_unflatten(treedef, out))

    return big, small, unpack


def run_blocks(params: Params, cfg: ModelConfig, x: jnp.ndarray, e0: jnp.ndarray, cos: jnp.ndarray,
               sin: jnp.ndarray, text_k: jnp.ndarray, text_v: jnp.ndarray, attend_fn: AttendFn,
               layer_inputs: Any = None, carry: LayerCarry | None = None,
               need_output: bool = True) -> tuple[jnp.ndarray | None, Any]:
    """One ``lax.scan`` over the stacked blocks; ``layer_inputs`` (leading [L] axis) is sliced per layer and
    handed to ``attend_fn``; whatever ``attend_fn`` returns per layer comes back stacked on [L].

    ``carry``: state threaded through the scan whole instead of sliced (a cache-writing forward's KV cache), so
    each layer updates its own slice in place: ``carry.read(state, i, layer_inputs_i)`` before the block,
    ``carry.write(state, i, outputs_i) -> (state, outputs_i)`` after it. The write is ordered after the block's
    output (an optimization barrier), so the layer's reads of the old slice finish first and XLA needs no copy.
    ``need_output=False`` (with ``carry``: a forward run only for the cache it writes): the last layer runs
    outside the scan and its hidden state is dropped, so XLA keeps of it only what the write needs (its K/V),
    not its attention, cross-attention and FFN; returns ``h = None``. Not for differentiated forwards (the
    scan then indexes the stacked params itself, whose gradient would add up a full-size zero per layer).
    Returns ``(h, outputs)``, plus the final state in ``outputs["carry"]`` when ``carry`` is given.
    """
    block = WanBlock(cfg)
    big, small, unpack = pack_small_params(params["blocks"], cfg.dim * cfg.dim)

    if carry is None:
        def body(h, xs):
            p, ps, tk, tv, li = xs
            return block.apply({"params": unpack(p, ps)}, h, e0, cos, sin, tk, tv, attend_fn, li)

        return lax.scan(_remat(body, cfg), x, (big, small, text_k, text_v, layer_inputs))

    def layer(h, state, xs_i, ordered):
        p, ps, tk, tv, li, i = xs_i
        h, out = block.apply({"params": unpack(p, ps)}, h, e0, cos, sin, tk, tv, attend_fn,
                             carry.read(state, i, li))
        if ordered:
            h, state = lax.optimization_barrier((h, state))  # reads of the old slice happen before the write
        state, out = carry.write(state, i, out)
        return h, state, out

    layers = jnp.arange(cfg.num_layers, dtype=jnp.int32)
    xs = (big, small, text_k, text_v, layer_inputs, layers)
    if need_output or cfg.num_layers < 2:
        def carried(c, xs_i):
            h, state, out = layer(*c, xs_i, carry.ordered)
            return (h, state), out

        (h, state), outs = lax.scan(_remat(carried, cfg), (x, carry.state), xs)
        return h, {**outs, "carry": state}

    def first_layers(c, i):  # layers 0 .. L-2, indexing the stacked inputs as the scan over xs would
        h, state, out = layer(*c, jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, i, keepdims=False), xs),
                              carry.ordered)
        return (h, state), out

    (h, state), outs = lax.scan(_remat(first_layers, cfg), (x, carry.state), layers[:-1])
    # the last layer: nothing reads its output, so no barrier either (its reads of the cache are dropped too)
    _, state, out = layer(h, state, jax.tree.map(lambda a: a[-1], xs), False)
    outs = jax.tree.map(lambda a, b: jnp.concatenate([a, b[None]]), outs, out)
    return None, {**outs, "carry": state}


def _broadcast_t(t: jnp.ndarray, b: int, f: int) -> jnp.ndarray:
    t = jnp.asarray(t, jnp.float32)
    if t.ndim == 0:
        t = jnp.full((b,), t)
    if t.ndim == 1:
        t = jnp.broadcast_to(t[:, None], (b, f))
    if t.shape != (b, f):
        raise ValueError(f"timesteps of shape {t.shape} do not fit batch {b} x frames {f} (give [B] or [B, F])")
    return t


def forward(params: Params, cfg: ModelConfig, x: jnp.ndarray, t: jnp.ndarray,
            context: jnp.ndarray) -> jnp.ndarray:
    """Bidirectional Wan forward (teacher / critic).

    Args:
      x: [B, C_in, F, H, W] noisy latents; t: [B] or [B, F] timesteps (0..1000, float);
      context: [B, T, text_dim] prompt embeddings (zero rows past the prompt, as UMT5 gives), or
        [B, F / patch_t, T, text_dim]: a prompt per (patch) frame, e.g. a story's segments (not in the reference).
    Returns: flow prediction [B, C_out, F, H, W] float32.
    """
    b, _, f = x.shape[:3]
    outer = WanOuter(cfg)
    tokens, grid = outer.apply(_outer(params), x, method=WanOuter.embed)
    if context.ndim == 4 and context.shape[:2] != (b, grid[0]):
        raise ValueError(f"per-frame prompt embeddings of shape {context.shape} do not fit batch {b} x {grid[0]} "
                         "(patch) frames: give [B, T, text_dim] or one prompt per frame [B, F, T, text_dim]")
    e, e0 = outer.apply(_outer(params), _broadcast_t(t, b, grid[0]), method=WanOuter.time)
    tk, tv = text_kv(params, cfg, context)
    cos, sin = rope_tables(0, grid[0], grid[1], grid[2], cfg.head_dim, cfg.rope_theta)

    def full_attend(q, k, v, _):
        return attn_lib.attention(q, k, v, impl=cfg.attention_impl, precision=matmul_precision(cfg)), None

    h, _ = run_blocks(params, cfg, tokens, e0, cos, sin, tk, tv, full_attend)
    return WanOuter(cfg).apply(_outer(params), h, e, grid, method=lambda m, *a: m.head.apply_head(*a))


def chunk_forward(params: Params, cfg: ModelConfig, x: jnp.ndarray, t: jnp.ndarray, f0: jnp.ndarray,
                  text_k: jnp.ndarray, text_v: jnp.ndarray, attend_fn: AttendFn,
                  layer_inputs: Any = None, carry: LayerCarry | None = None,
                  need_flow: bool = True) -> tuple[jnp.ndarray | None, Any]:
    """Causal chunk forward at absolute latent-frame offset ``f0`` (traced int32 scalar or [B]).

    Args:
      x: [B, C_in, F, H, W] the chunk's noisy latents; t: [B] or [B, F] timesteps.
      text_k, text_v: [L, B, T, H, D] from :func:`text_kv` (computed once per prompt).
      attend_fn: builds the KV context per layer (see ``memflow_jax.memory``); receives post-RoPE q/k.
      layer_inputs: pytree with a leading [L] axis passed to ``attend_fn`` layer by layer.
      carry: state updated in place layer by layer (see :func:`run_blocks`).
      need_flow: False for a forward run only for the cache it writes (with ``carry``): flow is None, the head is
        not applied and, on an accelerator, the last layer computes only its K/V (:func:`run_blocks`
        ``need_output``; on the CPU, where a tiny model's compile time outweighs 1/L of a forward, the layer scan
        stays whole: the peeled layer is a second traced copy of the block).
    Returns: (flow [B, C_out, F, H, W] float32, per-layer outputs of ``attend_fn`` stacked on [L]).
    """
    b = x.shape[0]
    outer = WanOuter(cfg)
    tokens, grid = outer.apply(_outer(params), x, method=WanOuter.embed)
    e, e0 = outer.apply(_outer(params), _broadcast_t(t, b, grid[0]), method=WanOuter.time)
    cos, sin = rope_tables(f0, grid[0], grid[1], grid[2], cfg.head_dim, cfg.rope_theta)
    peel = not need_flow and carry is not None and jax.default_backend() != "cpu"
    h, outs = run_blocks(params, cfg, tokens, e0, cos, sin, text_k, text_v, attend_fn, layer_inputs, carry,
                         need_output=not peel)
    if not need_flow:
        return None, outs
    flow = outer.apply(_outer(params), h, e, grid, method=lambda m, *a: m.head.apply_head(*a))
    return flow, outs


def tokens_per_frame(cfg: ModelConfig, latent_h: int, latent_w: int) -> int:
    """Tokens of one latent frame: (H / ph) * (W / pw) (1560 for 60 x 104 latents)."""
    _, ph, pw = cfg.patch_size
    if latent_h % ph or latent_w % pw:
        raise ValueError(f"latent size {latent_h}x{latent_w} is not divisible by patch {cfg.patch_size[1:]}")
    return (latent_h // ph) * (latent_w // pw)
