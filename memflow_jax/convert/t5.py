"""UMT5 encoder checkpoint (``models_t5_umt5-xxl-enc-bf16.pth``) -> :mod:`memflow_jax.nn.t5` params.

The file is a plain ``dict[str, Tensor]`` (bf16 in the release). Like the reference (bf16 weights loaded into a
float32 module) the default output dtype is float32; bf16 -> f32 is exact. Tensors are read from the
memory-mapped pickle and written one at a time into preallocated stacked arrays, so host memory stays ~1x the
converted model.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import ml_dtypes
import numpy as np

from memflow_jax.config import TextConfig
from memflow_jax.convert.common import (ConversionError, load_torch_pickle, tensor_to_numpy, unflatten,
                                        validate_against)
from memflow_jax.nn import t5 as t5_nn

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
# torch per-block name -> (flax name under blocks/, transpose)
_BLOCK_MAP = {
    "norm1.weight": ("norm1/scale", False),
    "norm2.weight": ("norm2/scale", False),
    "attn.q.weight": ("attn/q/kernel", True),
    "attn.k.weight": ("attn/k/kernel", True),
    "attn.v.weight": ("attn/v/kernel", True),
    "attn.o.weight": ("attn/o/kernel", True),
    "ffn.gate.0.weight": ("ffn/gate/kernel", True),
    "ffn.fc1.weight": ("ffn/fc1/kernel", True),
    "ffn.fc2.weight": ("ffn/fc2/kernel", True),
    "pos_embedding.embedding.weight": ("pos_embedding/embedding", False),
}
_TOP_MAP = {
    "token_embedding.weight": ("token_embedding/embedding", False),
    "norm.weight": ("norm/scale", False),
}


def expected_torch_keys(cfg: TextConfig) -> list[str]:
    """State-dict keys of the reference ``T5Encoder`` (umt5, per-layer position bias) for ``cfg``."""
    keys = list(_TOP_MAP)
    keys += [f"blocks.{i}.{name}" for i in range(cfg.num_layers) for name in _BLOCK_MAP]
    return sorted(keys)


def implied_config(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """The TextConfig fields a state dict's key set and shapes pin down (only those it has keys for)."""
    out: dict[str, int] = {}
    if "token_embedding.weight" in shapes:
        out["vocab_size"], out["dim"] = shapes["token_embedding.weight"]
    layers = [int(m.group(1)) for m in map(_BLOCK_RE.match, shapes) if m]
    if layers:
        out["num_layers"] = max(layers) + 1
    if "blocks.0.attn.q.weight" in shapes:
        out["dim_attn"] = shapes["blocks.0.attn.q.weight"][0]
    if "blocks.0.ffn.fc1.weight" in shapes:
        out["dim_ffn"] = shapes["blocks.0.ffn.fc1.weight"][0]
    if "blocks.0.pos_embedding.embedding.weight" in shapes:
        out["num_buckets"], out["num_heads"] = shapes["blocks.0.pos_embedding.embedding.weight"]
    return out


def _check_config(shapes: Mapping[str, tuple[int, ...]], cfg: TextConfig, what: str) -> None:
    if "pos_embedding.embedding.weight" in shapes:
        raise ConversionError(f"{what}: has a shared top-level 'pos_embedding' (a T5 with shared_pos=True); "
                              "only the umt5 encoder (one position bias per block) is supported")
    implied = implied_config(shapes)
    diffs = [f"text.{k}: checkpoint implies {v}, config has {getattr(cfg, k)}"
             for k, v in implied.items() if getattr(cfg, k) != v]
    if diffs:
        raise ConversionError(f"{what}: checkpoint does not match the text config\n  " + "\n  ".join(diffs)
                              + "\n  fix: set these text.* keys to the checkpoint's values (the real "
                              "umt5-xxl encoder is the TextConfig default)")


def _target(key: str) -> tuple[str, int | None, bool] | None:
    if key in _TOP_MAP:
        name, tr = _TOP_MAP[key]
        return name, None, tr
    m = _BLOCK_RE.match(key)
    if m and m.group(2) in _BLOCK_MAP:
        name, tr = _BLOCK_MAP[m.group(2)]
        return f"blocks/{name}", int(m.group(1)), tr
    return None


def convert_t5_state_dict(path_pth: str | Mapping[str, Any], cfg: TextConfig,
                          dtype: Any = np.float32) -> dict[str, Any]:
    """Read a UMT5 encoder ``.pth`` (or an already loaded state dict) and return the Flax param tree.

    Checks, in order: the implied config (vocab / dim / layers / heads / ...) against ``cfg``, then the key set
    and every shape against ``abstract_params(cfg)``; each failure raises ConversionError naming the keys.
    ``dtype``: numpy dtype of the output arrays (float32 like the reference; ``ml_dtypes.bfloat16`` halves it).
    """
    cfg.validate()
    what = path_pth if isinstance(path_pth, str) else "state dict"
    sd = load_torch_pickle(path_pth) if isinstance(path_pth, str) else path_pth
    if not isinstance(sd, Mapping):
        raise ConversionError(f"{what}: expected a plain dict of tensors (a state_dict), got {type(sd).__name__}")
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    _check_config(shapes, cfg, what)

    # Key set and shapes, before allocating anything: map each torch key to its (stacked) Flax shape.
    flat_shapes: dict[str, Any] = {}
    unmapped = []
    for key, shape in shapes.items():
        tgt = _target(key)
        if tgt is None:
            unmapped.append(key)
            continue
        name, layer, tr = tgt
        shape = shape[::-1] if tr else shape
        if layer is None:
            flat_shapes[name] = jax.ShapeDtypeStruct(shape, dtype)
        else:
            flat_shapes[name] = jax.ShapeDtypeStruct((cfg.num_layers,) + shape, dtype)
    missing = sorted(set(expected_torch_keys(cfg)) - set(shapes))
    if unmapped or missing:
        lines = [f"{what}: state-dict keys do not match the umt5 encoder"]
        if missing:
            lines.append(f"  missing ({len(missing)}): {missing[:20]}{' ...' if len(missing) > 20 else ''}")
        if unmapped:
            lines.append(f"  unexpected ({len(unmapped)}): {sorted(unmapped)[:20]}"
                         f"{' ...' if len(unmapped) > 20 else ''}")
        lines.append("  fix: pass the encoder-only checkpoint models_t5_umt5-xxl-enc-bf16.pth (a plain state_dict)")
        raise ConversionError("\n".join(lines))
    abstract = t5_nn.abstract_params(cfg)
    validate_against(flat_shapes, abstract, what)
    # per-layer shapes must agree across layers too (the stacked check above sees only one of them)
    for key, shape in shapes.items():
        m = _BLOCK_RE.match(key)
        if m:
            ref = shapes[f"blocks.0.{m.group(2)}"]
            if shape != ref:
                raise ConversionError(f"{what}: {key} has shape {shape} but blocks.0 has {ref}")

    # Convert tensor by tensor into preallocated arrays.
    flat: dict[str, np.ndarray] = {name: np.empty(s.shape, dtype) for name, s in flat_shapes.items()}
    for key in sd:
        name, layer, tr = _target(key)
        t = sd[key]
        # bf16 file -> bf16 params: reinterpret the bits, no float32 detour
        same = np.dtype(dtype) == np.dtype(ml_dtypes.bfloat16) and str(t.dtype) == "torch.bfloat16"
        arr = tensor_to_numpy(t, None if same else dtype)
        if tr:
            arr = arr.T
        if layer is None:
            flat[name][...] = arr
        else:
            flat[name][layer] = arr
        del arr
    validate_against(flat, abstract, what)
    return unflatten(flat)
