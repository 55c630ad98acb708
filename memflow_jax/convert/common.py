"""Shared pieces of the PyTorch -> Flax converters.

* readers that stream tensors one by one (safetensors without torch; pickles with torch, lazily imported),
* flat ``"a/b/c"`` <-> nested param trees,
* validation of a converted tree against ``jax.eval_shape`` of the model (missing / unexpected / shape),
* atomic save and load of a converted checkpoint directory (Orbax params + ``config.json``).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Callable, Iterable, Iterator, Mapping

import jax
from memflow_jax.io.atomic import replace_dir
import numpy as np


class ConversionError(ValueError):
    """A checkpoint whose layout, keys or shapes do not match what the model expects."""


# --------------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------------


def safetensors_files(path: str) -> list[str]:
    """The ``.safetensors`` files of a file path or a diffusers folder (single or sharded + index)."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise ConversionError(f"{path}: no such file or folder")
    index = [f for f in os.listdir(path) if f.endswith(".safetensors.index.json")]
    if index:
        with open(os.path.join(path, index[0])) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConversionError(f"{path}/{index[0]}: no 'weight_map' in the index")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise ConversionError(f"{path}: shards named in {index[0]} are missing: {missing}")
        return [os.path.join(path, f) for f in files]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise ConversionError(f"{path}: no .safetensors files (expected diffusion_pytorch_model.safetensors "
                              "or sharded files with a .safetensors.index.json)")
    return [os.path.join(path, f) for f in files]


def iter_safetensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(key, array)`` one tensor at a time from a file or folder (no torch needed)."""
    from safetensors import safe_open

    for file in safetensors_files(path):
        with safe_open(file, framework="numpy") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def load_torch_pickle(path: str) -> Any:
    """``torch.load`` a ``.pt``/``.pth`` (weights only, memory-mapped); needs the ``convert`` extra."""
    try:
        import torch
    except ImportError:
        raise ConversionError(
            f"reading {os.path.basename(path)} needs PyTorch (a pickle): install the convert extra "
            "with `pip install -e '.[convert]'` (pins torch==2.13.0, CPU wheel)") from None
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated / not a torch zip / foreign pickle
        raise ConversionError(f"{path}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: {e})") from None


def tensor_to_numpy(t: Any, dtype: Any = np.float32) -> np.ndarray:
    """One torch tensor -> numpy (bf16 handled; cast to ``dtype`` unless None)."""
    import torch

    t = t.detach()
    if dtype is None:
        if t.dtype == torch.bfloat16:
            import ml_dtypes

            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
    return t.to(torch.float32).numpy().astype(dtype, copy=False)


# --------------------------------------------------------------------------------------------------
# Trees
# --------------------------------------------------------------------------------------------------


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, v in flat.items():
        node = out
        parts = key.split("/")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return out


def validate_against(flat: Mapping[str, Any], abstract: Mapping[str, Any], what: str) -> None:
    """Raise ConversionError listing missing / unexpected keys and shape mismatches."""
    want = flatten(abstract)
    missing = sorted(set(want) - set(flat))
    unexpected = sorted(set(flat) - set(want))
    mismatched = sorted(
        f"{k}: checkpoint {_shape(flat[k])} vs model {_shape(want[k])}"
        for k in set(want) & set(flat) if _shape(flat[k]) != _shape(want[k]))
    if missing or unexpected or mismatched:
        lines = [f"{what}: checkpoint does not match the model config"]
        if missing:
            lines.append(f"  missing ({len(missing)}): {missing[:20]}{' ...' if len(missing) > 20 else ''}")
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): {unexpected[:20]}"
                         f"{' ...' if len(unexpected) > 20 else ''}")
        if mismatched:
            lines.append(f"  shape mismatch ({len(mismatched)}): {mismatched[:20]}"
                         f"{' ...' if len(mismatched) > 20 else ''}")
        lines.append("  fix: use the config of the model the checkpoint was trained with (model.* keys)")
        raise ConversionError("\n".join(lines))


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(x.shape) if hasattr(x, "shape") else tuple(np.shape(x))


def cast_tree(tree: Any, dtype: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: np.asarray(x, dtype=dtype), tree)


# --------------------------------------------------------------------------------------------------
# Converted checkpoint directory: <dir>/config.json + <dir>/<component>/ (Orbax)
# --------------------------------------------------------------------------------------------------

CONFIG_FILE = "config.json"


def save_converted(out_dir: str, components: Mapping[str, Any], config_dict: Mapping[str, Any],
                   extra_meta: Mapping[str, Any] | None = None,
                   copy_dirs: Mapping[str, str] | None = None) -> str:
    """Write ``components`` (name -> param tree) with Orbax and the config as JSON, atomically
    (``copy_dirs``: extra folders copied in, e.g. the tokenizer).

    Everything is written into a temporary sibling directory that is renamed to ``out_dir`` only at the
    end, so a failure leaves nothing behind and an existing ``out_dir`` is replaced only on success.
    """
    import orbax.checkpoint as ocp

    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=parent)
    try:
        ckptr = ocp.StandardCheckpointer()
        for name, params in components.items():
            if not jax.tree_util.tree_leaves(params):
                continue  # a parameter-free component (the pixel codec): listed in config.json, nothing to store
            ckptr.save(os.path.join(tmp, name), jax.tree_util.tree_map(np.asarray, params))
        ckptr.wait_until_finished()
        for name, src in (copy_dirs or {}).items():
            shutil.copytree(src, os.path.join(tmp, name))
        meta = {"config": dict(config_dict), "components": sorted(components)}
        if extra_meta:
            meta.update(extra_meta)
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_converted_meta(ckpt_dir: str) -> dict[str, Any]:
    path = os.path.join(ckpt_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise ConversionError(f"{ckpt_dir}: not a converted checkpoint (no {CONFIG_FILE}); "
                              "create one with `python -m memflow_jax.convert ...`")
    with open(path) as f:
        return json.load(f)


def load_component(ckpt_dir: str, name: str, abstract: Any | None = None) -> Any:
    """Restore one component's params (validated against ``abstract`` when given)."""
    import orbax.checkpoint as ocp

    meta = read_converted_meta(ckpt_dir)
    if name not in meta.get("components", []):
        raise ConversionError(f"{ckpt_dir}: has no component {name!r} (has {meta.get('components')})")
    path = os.path.join(os.path.abspath(ckpt_dir), name)
    if abstract is not None and not jax.tree_util.tree_leaves(abstract):
        return jax.tree_util.tree_map(lambda x: x, abstract)  # parameter-free: nothing was stored
    if not os.path.isdir(path):
        raise ConversionError(f"{ckpt_dir}: component {name!r} was saved without parameters (e.g. vae.codec=pixel), "
                              "but this config expects some: load it with the config stored in its config.json")
    ckptr = ocp.StandardCheckpointer()
    if abstract is not None:
        stored = ckptr.metadata(path)
        stored_tree = getattr(stored, "item_metadata", stored)
        stored_tree = getattr(stored_tree, "tree", stored_tree)
        validate_against(flatten(_shapes(stored_tree)), abstract, f"{ckpt_dir}/{name}")
        return ckptr.restore(path, abstract)
    return ckptr.restore(path)


def _shapes(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _shapes(v) for k, v in tree.items()}
    return jax.ShapeDtypeStruct(tuple(tree.shape), np.float32) if hasattr(tree, "shape") else tree


def first_present(mapping: Mapping[str, Any], keys: Iterable[str], what: str) -> tuple[str, Any]:
    for k in keys:
        if k in mapping:
            return k, mapping[k]
    raise ConversionError(f"{what}: none of the entries {list(keys)} found (has {sorted(mapping)[:10]})")


Mapper = Callable[[str], "str | None"]
