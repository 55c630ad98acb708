"""LoRA adapters on the DiT block Dense layers, as a separate param tree merged inside the jitted step.

Tree layout (every leaf has the stacked ``[L]`` layer axis of ``params["blocks"]``)::

    {"blocks": {"self_attn": {"q": {"a": [L, in, r], "b": [L, r, out]}, "k": ..., "v": ..., "o": ...},
                "cross_attn": {...same...}, "ffn_0": {"a", "b"}, "ffn_2": {"a", "b"}}}

The effective kernel is ``kernel + (alpha / r) · a @ b`` (reference peft ``W + (alpha/r)·B@A`` with torch's
``[out, in]`` weights: ``a = A.T``, ``b = B.T``). Merging costs ``L·in·r·out`` flops per module, small next to a
forward, and leaves the DiT code untouched. Init as peft: ``a`` kaiming-uniform(a=√5) = U(±1/√in), ``b`` zero,
so a fresh adapter is the identity. Reference targets: every ``nn.Linear`` inside the attention blocks (self/cross
q, k, v, o and ffn.0 / ffn.2), for the generator and (``apply_to_critic``) the critic.
"""
from __future__ import annotations

import math
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Params = dict[str, Any]

# module paths under params["blocks"] (each holds a Dense "kernel" [L, in, out])
LORA_TARGETS: tuple[str, ...] = (
    "self_attn/q", "self_attn/k", "self_attn/v", "self_attn/o",
    "cross_attn/q", "cross_attn/k", "cross_attn/v", "cross_attn/o",
    "ffn_0", "ffn_2",
)
LORA_FORMAT = "memflow_jax.lora"


def _get(tree: Any, path: str) -> Any:
    node = tree
    for part in path.split("/"):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(path)
        node = node[part]
    return node


def _set(tree: dict, path: str, value: Any) -> dict:
    """Copy of ``tree`` with ``path`` replaced (only the dicts along the path are copied)."""
    head, _, rest = path.partition("/")
    out = dict(tree)
    out[head] = _set(tree.get(head, {}), rest, value) if rest else value
    return out


def _kernel(params: Params, module: str) -> Any:
    try:
        return _get(params, f"blocks/{module}/kernel")
    except KeyError:
        raise ValueError(f"LoRA target blocks/{module}/kernel is not in the model params; targets must be block "
                         f"Dense layers ({list(LORA_TARGETS)})") from None


def lora_scale(alpha: float, rank: int) -> float:
    """``alpha / rank`` (peft ``scaling``)."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    return float(alpha) / float(rank)


def abstract_lora(params: Params, rank: int, targets: Sequence[str] = LORA_TARGETS,
                  dtype: Any = jnp.float32) -> Params:
    """Shapes of the LoRA tree for ``params`` (arrays or ``ShapeDtypeStruct``s); nothing is allocated."""
    tree: dict = {}
    for module in targets:
        k = _kernel(params, module)
        if len(k.shape) != 3:
            raise ValueError(f"blocks/{module}/kernel has shape {tuple(k.shape)}; expected stacked [L, in, out]")
        L, din, dout = k.shape
        tree = _set(tree, f"blocks/{module}", {"a": jax.ShapeDtypeStruct((L, din, rank), jnp.dtype(dtype)),
                                               "b": jax.ShapeDtypeStruct((L, rank, dout), jnp.dtype(dtype))})
    return tree


def init_lora(params: Params, rank: int, rng: jax.Array, targets: Sequence[str] = LORA_TARGETS,
              dtype: Any = jnp.float32) -> Params:
    """Fresh adapters: ``a ~ U(-1/sqrt(in), 1/sqrt(in))`` (peft kaiming-uniform, a=sqrt(5)), ``b = 0``.

    ``params`` may be abstract. Jit-friendly (shapes are static); wrap in ``jax.jit(..., out_shardings=...)``
    to create the tree sharded.
    """
    abstract = abstract_lora(params, rank, targets, dtype)
    keys = jax.random.split(rng, len(targets))
    tree: dict = {}
    for key, module in zip(keys, targets):
        a_shape = _get(abstract, f"blocks/{module}/a").shape
        b_shape = _get(abstract, f"blocks/{module}/b").shape
        bound = 1.0 / math.sqrt(a_shape[1])
        a = jax.random.uniform(key, a_shape, jnp.float32, -bound, bound).astype(dtype)
        tree = _set(tree, f"blocks/{module}", {"a": a, "b": jnp.zeros(b_shape, dtype)})
    return tree


def lora_targets(lora: Params) -> list[str]:
    """Module paths (``"self_attn/q"``, ...) present in a LoRA tree."""
    out = []
    for module in LORA_TARGETS:
        try:
            _get(lora, f"blocks/{module}/a")
            out.append(module)
        except KeyError:
            pass
    blocks = lora.get("blocks", {})
    known = {m.split("/")[0] for m in LORA_TARGETS}
    extra = sorted(set(blocks) - known)
    if extra:
        raise ValueError(f"LoRA tree has unknown block modules {extra}; expected a subset of {list(LORA_TARGETS)}")
    return out


def merge_lora_params(params: Params, lora: Params | None, scale: float) -> Params:
    """Params with every adapted kernel replaced by ``kernel + scale · a @ b`` (in the kernel's dtype).

    Differentiable w.r.t. both trees; call inside the jitted step (with ``stop_gradient`` on the frozen base) or
    once to export merged weights. ``lora=None`` returns ``params`` unchanged.
    """
    if lora is None:
        return params
    out = params
    for module in lora_targets(lora):
        k = _kernel(params, module)
        a = _get(lora, f"blocks/{module}/a")
        b = _get(lora, f"blocks/{module}/b")
        if a.shape[:2] != k.shape[:2] or b.shape[0] != k.shape[0] or b.shape[2] != k.shape[2] or \
                a.shape[2] != b.shape[1]:
            raise ValueError(f"LoRA blocks/{module}: a {tuple(a.shape)} / b {tuple(b.shape)} do not fit the kernel "
                             f"{tuple(k.shape)} (expected a [L, in, r], b [L, r, out])")
        delta = jnp.einsum("lir,lro->lio", a.astype(jnp.float32), b.astype(jnp.float32),
                           precision=jax.lax.Precision.HIGHEST)
        merged = (k.astype(jnp.float32) + jnp.float32(scale) * delta).astype(k.dtype)
        out = _set(out, f"blocks/{module}/kernel", merged)
    return out


def count_lora_params(lora: Params) -> int:
    return int(sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(lora)))


# --------------------------------------------------------------------------------------------------
# Save / load (an Orbax dir + config.json, through the converter helpers)
# --------------------------------------------------------------------------------------------------


def save_lora(out_dir: str, adapters: dict[str, Params], *, rank: int, alpha: float,
              extra_meta: dict[str, Any] | None = None) -> str:
    """Write named adapter trees (``{"generator_lora": ..., "critic_lora": ...}``) atomically to ``out_dir``.

    ``rank`` / ``alpha`` go to ``config.json`` (unlike the reference's ``lora.pt``, which lacks alpha).
    Gathers sharded arrays to the host; call on every process, only process 0 writes.
    """
    from jax.experimental import multihost_utils

    from memflow_jax.convert.common import save_converted

    host = {name: jax.tree_util.tree_map(
        lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)
        for name, tree in adapters.items()}
    if jax.process_index() != 0:
        return os.path.abspath(out_dir)
    meta = {"format": LORA_FORMAT, "rank": int(rank), "alpha": float(alpha), "scale": lora_scale(alpha, rank)}
    meta.update(extra_meta or {})
    return save_converted(out_dir, host, {"lora": meta})


def load_lora(ckpt_dir: str, name: str = "generator_lora", abstract: Params | None = None
              ) -> tuple[Params, dict[str, Any]]:
    """``(adapter tree, {"rank", "alpha", "scale"})`` from a folder written by :func:`save_lora`."""
    from memflow_jax.convert.common import load_component, read_converted_meta

    meta = read_converted_meta(ckpt_dir).get("config", {}).get("lora")
    if not meta or meta.get("format") != LORA_FORMAT:
        raise ValueError(f"{ckpt_dir}: not a LoRA folder written by memflow_jax.training.lora.save_lora "
                         "(for a reference lora.pt use memflow_jax.convert.dit.merge_lora)")
    tree = load_component(ckpt_dir, name, abstract)
    return tree, {k: meta[k] for k in ("rank", "alpha", "scale")}

