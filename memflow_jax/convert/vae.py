"""``Wan2.1_VAE.pth`` (plain torch state dict, 194 tensors) -> params of :mod:`memflow_jax.nn.vae`.

Key mapping (torch ``.`` path -> our ``/`` path), weights transposed to channels-last:

* ``{encoder,decoder}.{downsamples,upsamples,middle}.<i>.`` -> ``.../{downsamples,upsamples,middle}_<i>/``, except
  runs of identical residual blocks, stacked on a leading axis under ``<seq>_<first>-<last>/``
  (:func:`memflow_jax.nn.vae.block_layout`)
* ``residual.0|2|3|6`` -> ``norm1|conv1|norm2|conv2``; ``resample.1`` -> ``conv``;
  ``head.0|2`` -> ``head_norm|head_conv``
* ``weight`` -> ``kernel``: Conv3d ``[O, I, kt, kh, kw]`` -> ``[kt, kh, kw, I, O]``, Conv2d ``[O, I, kh, kw]`` ->
  ``[kh, kw, I, O]``; RMS_norm ``gamma`` ``[C, 1, 1(, 1)]`` -> ``scale`` ``[C]``; ``bias`` unchanged.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
import numpy as np

from memflow_jax.config import VAEConfig
from memflow_jax.convert.common import (ConversionError, load_torch_pickle, tensor_to_numpy, unflatten,
                                        validate_against)

_SUB = {
    "residual": {"0": "norm1", "2": "conv1", "3": "norm2", "6": "conv2"},
    "resample": {"1": "conv"},
    "head": {"0": "head_norm", "2": "head_conv"},
}
_LEAF = {"weight": "kernel", "gamma": "scale", "bias": "bias"}


def map_key(key: str, cfg: VAEConfig) -> Optional[tuple[str, Optional[int]]]:
    """(our flat param path, index in its layer stack or None) for a torch key; None if it has no counterpart."""
    from memflow_jax.nn.vae import block_layout

    parts = key.split(".")
    leaf = _LEAF.get(parts[-1])
    if leaf is None:
        return None
    parts = parts[:-1]
    out: list[str] = []
    pos: Optional[int] = None
    i = 0
    if len(parts) >= 3 and parts[1] in ("downsamples", "upsamples") and parts[2].isdigit():
        block = block_layout(cfg).get(".".join(parts[:3]))
        if block is None:
            return None
        out, pos = [block[0]], block[1]
        i = 3
    while i < len(parts):
        p = parts[i]
        nxt = parts[i + 1] if i + 1 < len(parts) else None
        if p == "middle" and nxt is not None and nxt.isdigit():
            out.append(f"middle_{nxt}")
            i += 2
        elif p in _SUB:
            if nxt not in _SUB[p]:
                return None
            out.append(_SUB[p][nxt])
            i += 2
        else:
            out.append(p)
            i += 1
    return "/".join(out + [leaf]), pos


def convert_tensor(key: str, arr: np.ndarray) -> np.ndarray:
    """Layout change for one tensor (see the module docstring)."""
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "gamma":
        return arr.reshape(arr.shape[0])
    if leaf == "weight":
        if arr.ndim == 5:
            return np.ascontiguousarray(arr.transpose(2, 3, 4, 1, 0))
        if arr.ndim == 4:
            return np.ascontiguousarray(arr.transpose(2, 3, 1, 0))
        raise ConversionError(f"{key}: expected a 4-D or 5-D conv weight, got shape {arr.shape}")
    return arr


def _state_dict(obj: Any, path: str) -> Mapping[str, Any]:
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(hasattr(v, "shape") for v in obj.values()):
        raise ConversionError(f"{path}: not a VAE state dict (expected a plain dict of tensors like "
                              "Wan2.1_VAE.pth)")
    return obj


def _check_dims(sd: Mapping[str, Any], cfg: VAEConfig, path: str) -> None:
    """Name a dim / z_dim mismatch directly (before the generic key/shape report)."""
    found = {}
    if "encoder.conv1.weight" in sd:
        found["dim"] = int(sd["encoder.conv1.weight"].shape[0])
    if "conv2.weight" in sd:
        found["z_dim"] = int(sd["conv2.weight"].shape[0])
    bad = {k: v for k, v in found.items() if v != getattr(cfg, k)}
    if bad:
        have = ", ".join(f"vae.{k}={v}" for k, v in bad.items())
        want = ", ".join(f"vae.{k}={getattr(cfg, k)}" for k in bad)
        raise ConversionError(f"{path}: checkpoint has {have} but the config has {want}; "
                              f"use the config of this checkpoint (override {have.replace(', ', ' ')})")


def convert_vae_state_dict(path_pth: str, cfg: VAEConfig) -> dict:
    """Read ``path_pth`` (torch pickle) and return the param tree for ``cfg`` (float32 jax arrays).

    Raises ConversionError naming any dim / z_dim mismatch, missing / unexpected keys or shape mismatches.
    """
    from memflow_jax.nn.vae import abstract_params

    cfg.validate()
    sd = _state_dict(load_torch_pickle(path_pth), path_pth)
    _check_dims(sd, cfg, path_pth)
    flat: dict[str, Any] = {}
    stacks: dict[str, dict[int, np.ndarray]] = {}
    unmapped: list[str] = []
    for key, t in sd.items():
        mapped = map_key(key, cfg)
        if mapped is None:
            unmapped.append(key)
            continue
        ours, pos = mapped
        arr = convert_tensor(key, tensor_to_numpy(t, np.float32))
        if pos is None:
            flat[ours] = arr
        else:
            stacks.setdefault(ours, {})[pos] = arr
    for ours, layers in stacks.items():  # runs of identical blocks: stack on a leading layer axis
        shapes = {a.shape for a in layers.values()}
        if sorted(layers) != list(range(len(layers))) or len(shapes) != 1:
            flat[ours] = np.zeros((0,))  # reported as a shape mismatch below
            continue
        flat[ours] = np.stack([layers[i] for i in range(len(layers))])
    for key in unmapped:  # reported by validate_against as unexpected keys
        flat[f"<unmapped>/{key}"] = np.zeros((0,), np.float32)
    validate_against(flat, abstract_params(cfg), f"Wan VAE checkpoint {path_pth} (vae.* config)")
    return jax.tree_util.tree_map(jax.numpy.asarray, unflatten(flat))
