"""PyTorch Wan2.1 DiT checkpoints -> our Flax param tree.

Formats:
* Wan2.1 diffusers folder: ``config.json`` + ``diffusion_pytorch_model.safetensors`` or sharded
  ``diffusion_pytorch_model-0000N-of-0000M.safetensors`` + ``.index.json`` (read without torch);
* Self-Forcing / LongLive / MemFlow ``base.pt``: ``generator`` (keys ``model.<param>``), ``generator_ema``
  (``model._fsdp_wrapped_module.<param>``) or ``model`` entries;
* MemFlow ``lora.pt``: ``generator_lora`` peft state dict merged as ``W + (alpha / r) * B @ A``.

Tensors are converted one by one into preallocated stacked arrays, so host memory stays ~1x the model.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Iterable, Iterator

import numpy as np

from memflow_jax.config import ModelConfig, model_config_from_wan_json
from memflow_jax.convert.common import (ConversionError, flatten, iter_safetensors, load_torch_pickle,
                                        tensor_to_numpy, unflatten, validate_against)
from memflow_jax.nn import dit

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_TOP = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "text_embedding_0",
    "text_embedding.2": "text_embedding_2",
    "time_embedding.0": "time_embedding_0",
    "time_embedding.2": "time_embedding_2",
    "time_projection.1": "time_projection",
    "head.head": "head/head",
}
_IN_BLOCK = {
    "self_attn.q": "self_attn/q", "self_attn.k": "self_attn/k", "self_attn.v": "self_attn/v",
    "self_attn.o": "self_attn/o", "cross_attn.q": "cross_attn/q", "cross_attn.k": "cross_attn/k",
    "cross_attn.v": "cross_attn/v", "cross_attn.o": "cross_attn/o", "ffn.0": "ffn_0", "ffn.2": "ffn_2",
}
_NORMS = {"self_attn.norm_q", "self_attn.norm_k", "cross_attn.norm_q", "cross_attn.norm_k"}
# wrapper prefixes of the trainer's checkpoints (WanDiffusionWrapper / FSDP / EMA_FSDP / DDP)
_PREFIXES = ("model.", "_fsdp_wrapped_module.", "module.", "_orig_mod.")


def strip_wrapper_prefix(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key.replace("._fsdp_wrapped_module.", ".")


def map_key(torch_key: str, arr: np.ndarray) -> tuple[str, int | None, np.ndarray]:
    """Torch key + tensor -> (our flat path, layer index or None, converted array)."""
    m = _BLOCK.match(torch_key)
    if m:
        layer, rest = int(m.group(1)), m.group(2)
        if rest == "modulation":
            return "blocks/modulation", layer, arr.reshape(arr.shape[-2:])
        mod, _, leaf = rest.rpartition(".")
        if mod in _NORMS and leaf == "weight":
            return f"blocks/{mod.replace('.', '/')}/scale", layer, arr
        if mod == "norm3":
            return f"blocks/norm3/{'scale' if leaf == 'weight' else 'bias'}", layer, arr
        if mod in _IN_BLOCK:
            if leaf == "weight":
                return f"blocks/{_IN_BLOCK[mod]}/kernel", layer, arr.T
            if leaf == "bias":
                return f"blocks/{_IN_BLOCK[mod]}/bias", layer, arr
        raise ConversionError(f"unexpected block key {torch_key!r}")
    if torch_key == "head.modulation":
        return "head/modulation", None, arr.reshape(arr.shape[-2:])
    mod, _, leaf = torch_key.rpartition(".")
    if mod in _TOP:
        if leaf == "weight":
            if mod == "patch_embedding":  # Conv3d [dim, C, pt, ph, pw] -> Dense [C*pt*ph*pw, dim]
                return "patch_embedding/kernel", None, arr.reshape(arr.shape[0], -1).T
            return f"{_TOP[mod]}/kernel", None, arr.T
        if leaf == "bias":
            return f"{_TOP[mod]}/bias", None, arr
    raise ConversionError(f"unexpected key {torch_key!r} (not part of a Wan2.1 T2V DiT)")


def convert_tensors(items: Iterable[tuple[str, np.ndarray]], cfg: ModelConfig, what: str,
                    dtype: Any = np.float32) -> dict:
    """Stream ``(torch_key, array)`` pairs into a validated param tree for ``cfg``."""
    abstract = flatten(dit.abstract_params(cfg))
    out: dict[str, np.ndarray] = {}
    filled: dict[str, set[int]] = {}
    unexpected, mismatched = [], []
    for key, arr in items:
        try:
            path, layer, arr = map_key(key, np.asarray(arr))
        except ConversionError:
            unexpected.append(key)
            continue
        if path not in abstract:
            unexpected.append(key)
            continue
        want = tuple(abstract[path].shape)
        if layer is None:
            if tuple(arr.shape) != want:
                mismatched.append(f"{key}: checkpoint {tuple(arr.shape)} -> {path} model {want}")
                continue
            out[path] = arr.astype(dtype)
        else:
            if layer >= want[0] or tuple(arr.shape) != want[1:]:
                mismatched.append(f"{key}: checkpoint layer {layer} {tuple(arr.shape)} -> {path} model {want}")
                continue
            if path not in out:
                out[path] = np.zeros(want, dtype)
                filled[path] = set()
            out[path][layer] = arr
            filled[path].add(layer)
    missing = sorted(p for p in abstract if p not in out)
    missing += sorted(f"{p}[layer {i}]" for p, got in filled.items()
                      for i in range(abstract[p].shape[0]) if i not in got)
    if missing or unexpected or mismatched:
        lines = [f"{what}: checkpoint does not match the model config "
                 f"(dim={cfg.dim}, layers={cfg.num_layers}, heads={cfg.num_heads}, ffn={cfg.ffn_dim})"]
        if missing:
            lines.append(f"  missing ({len(missing)}): {missing[:20]}")
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): {unexpected[:20]}")
        if mismatched:
            lines.append(f"  shape mismatch ({len(mismatched)}): {mismatched[:20]}")
        raise ConversionError("\n".join(lines))
    validate_against(out, dit.abstract_params(cfg), what)
    return unflatten(out)


def read_wan_config(folder: str, **numerics: Any) -> ModelConfig:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{folder}: no config.json (expected a Wan2.1 diffusers folder)")
    with open(path) as f:
        return model_config_from_wan_json(json.load(f), **numerics)


def load_wan_folder(folder: str, cfg: ModelConfig | None = None, **numerics: Any) -> tuple[ModelConfig, dict]:
    """Wan2.1 diffusers folder -> (ModelConfig, params). ``cfg`` overrides config.json when given."""
    cfg = cfg or read_wan_config(folder, **numerics)
    return cfg, convert_tensors(iter_safetensors(folder), cfg, folder)


def _state_items(state: dict) -> Iterator[tuple[str, np.ndarray]]:
    for k, t in state.items():
        yield strip_wrapper_prefix(k), tensor_to_numpy(t)


def load_generator_pt(path: str, cfg: ModelConfig, use_ema: bool = False) -> dict:
    """Self-Forcing / LongLive / MemFlow ``base.pt`` -> params (``generator_ema`` when ``use_ema``)."""
    ckpt = load_torch_pickle(path)
    if not isinstance(ckpt, dict):
        raise ConversionError(f"{path}: expected a dict with 'generator'/'generator_ema'/'model' entries")
    order = ("generator_ema",) if use_ema else ("generator", "model")
    for entry in order:
        if entry in ckpt:
            return convert_tensors(_state_items(ckpt[entry]), cfg, f"{path}[{entry}]")
    if not any(k in ckpt for k in ("generator", "generator_ema", "model")) and all(
            hasattr(v, "shape") for v in ckpt.values()):
        return convert_tensors(_state_items(ckpt), cfg, path)  # a bare state dict
    raise ConversionError(f"{path}: no {' or '.join(repr(o) for o in order)} entry (has {sorted(ckpt)}); "
                          f"{'drop --use-ema' if use_ema else 'pass --use-ema if only EMA weights are stored'}")


_LORA = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?blocks\.(\d+)\.(.+)\.lora_([AB])\.weight$")


def lora_factors(state: dict, what: str) -> dict[tuple[int, str], dict[str, np.ndarray]]:
    """peft state dict -> {(layer, module): {"A": [r, in], "B": [out, r]}}."""
    out: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, t in state.items():
        m = _LORA.match(strip_wrapper_prefix(key) if not key.startswith("base_model") else key)
        if not m:
            raise ConversionError(f"{what}: unexpected LoRA key {key!r} (expected "
                                  "'base_model.model.blocks.<i>.<module>.lora_A/B.weight')")
        layer, module, ab = int(m.group(1)), m.group(2), m.group(3)
        if module not in _IN_BLOCK:
            raise ConversionError(f"{what}: LoRA on {module!r} is not supported (block linear layers only)")
        out.setdefault((layer, module), {})[ab] = tensor_to_numpy(t)
    for (layer, module), ab in out.items():
        if set(ab) != {"A", "B"}:
            raise ConversionError(f"{what}: blocks.{layer}.{module} has only lora_{list(ab)}")
    return out


def merge_lora(params: dict, lora_path: str, alpha: float, entry: str = "generator_lora",
               copy: bool = False) -> dict:
    """Merge ``lora.pt[entry]`` into ``params``: ``W + (alpha / r) * B @ A`` (rank r from the shapes).

    ``alpha`` is not stored in the file (it is the YAML ``adapter.alpha``): the caller must give it.
    The kernels are updated IN PLACE (no second copy of the model in host RAM) unless ``copy=True``.
    """
    ckpt = load_torch_pickle(lora_path)
    if not isinstance(ckpt, dict) or entry not in ckpt:
        raise ConversionError(f"{lora_path}: no {entry!r} entry (has "
                              f"{sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__})")
    factors = lora_factors(ckpt[entry], f"{lora_path}[{entry}]")
    flat = {k: (np.array(v, copy=True) if copy else np.asarray(v)) for k, v in flatten(params).items()}
    for (layer, module), ab in sorted(factors.items()):
        a, b = ab["A"], ab["B"]
        rank = a.shape[0]
        path = f"blocks/{_IN_BLOCK[module]}/kernel"
        kernel = flat[path]
        if layer >= kernel.shape[0] or (b @ a).T.shape != kernel.shape[1:]:
            raise ConversionError(f"{lora_path}: blocks.{layer}.{module} LoRA shapes A{a.shape} B{b.shape} "
                                  f"do not fit the model kernel {kernel.shape[1:]}")
        kernel[layer] += (alpha / rank) * (b @ a).T.astype(kernel.dtype)
    return unflatten(flat)
