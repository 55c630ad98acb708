"""Video-latent sources for teacher fine-tuning and ODE-init training (random access, no grain at import).

* :class:`LatentSource` — one sample per file: ``.npy`` (the array), ``.npz`` (array ``key`` + optional
  0-d string ``prompt``), ``.safetensors`` (tensor ``key`` + ``prompt`` in the header metadata); or a JSONL
  manifest ``{"path": "...", "prompt": "..."}`` per line. Record ``{"latents": [F, C, H, W], "prompts", "idx"}``
  (the reference's latent layout ``[B, F, C, H, W]`` without the batch dim).
* :class:`OdeTrajectorySource` — ODE-init pairs: ``"ode_latent"`` ``[S, F, C, H, W]``, the sampler's states at
  the ``S - 1`` denoising steps followed by the clean result (reference: ``batch["ode_latent"][:, -1]`` is the
  clean latent).
* :class:`ArrayRecordSource` — the same records stored in ArrayRecord files, one ``.npz``-encoded record
  each (write them with :func:`write_array_record`); needs ``grain`` / ``array_record``.
"""
from __future__ import annotations

import glob
import io
import json
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from memflow_jax.data.prompts import DataError, parse_jsonl

LATENT_EXTS = (".npy", ".npz", ".safetensors")


def list_latent_files(path: str | os.PathLike | Sequence[str | os.PathLike],
                      exts: Sequence[str] = LATENT_EXTS) -> list[str]:
    """Sample files of a folder (recursive), a glob pattern, a single file, or a list of those; sorted."""
    if isinstance(path, (list, tuple)):
        return [f for p in path for f in list_latent_files(p, exts)]
    path = os.fspath(path)
    if os.path.isdir(path):
        files = sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names
                       if f.endswith(tuple(exts)))
    elif any(c in path for c in "*?["):
        files = sorted(f for f in glob.glob(path, recursive=True) if f.endswith(tuple(exts)))
    elif os.path.isfile(path):
        if not path.endswith(tuple(exts)):
            raise DataError(f"{path}: not a latent file (expected one of {list(exts)})")
        files = [path]
    else:
        raise DataError(f"{path}: no such file or folder")
    if not files:
        raise DataError(f"{path}: no latent files ({', '.join(exts)}) found")
    return files


def read_sample_file(path: str, key: str, prompt_key: str = "prompt") -> tuple[np.ndarray, str | None]:
    """``(array, prompt or None)`` from one ``.npy`` / ``.npz`` / ``.safetensors`` file."""
    try:
        if path.endswith(".npy"):
            return np.load(path, allow_pickle=False), None
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as z:
                if key not in z:
                    raise DataError(f"{path}: no array {key!r} (has {sorted(z.files)})")
                prompt = str(z[prompt_key][()]) if prompt_key in z else None
                return z[key], prompt
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="numpy") as f:
                if key not in f.keys():
                    raise DataError(f"{path}: no tensor {key!r} (has {sorted(f.keys())})")
                meta = f.metadata() or {}
                return f.get_tensor(key), meta.get(prompt_key)
    except DataError:
        raise
    except Exception as e:  # truncated / corrupt files
        raise DataError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None
    raise DataError(f"{path}: unsupported latent file type (expected one of {list(LATENT_EXTS)})")


def _check_array(x: np.ndarray, where: str, ndim: int, shape: Sequence[int] | None, what: str) -> np.ndarray:
    if x.ndim != ndim:
        raise DataError(f"{where}: {what} has shape {tuple(x.shape)}, expected {ndim} dims")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise DataError(f"{where}: {what} has shape {tuple(x.shape)}, expected {tuple(shape)}")
    if not np.issubdtype(x.dtype, np.floating) and x.dtype.name != "bfloat16":
        raise DataError(f"{where}: {what} has dtype {x.dtype}, expected a float array")
    return x


class LatentSource:
    """Latent video samples, one file each; record ``{out_key: array, "prompts": str, "idx": int}``.

    Args:
      files: files / folders / globs (see :func:`list_latent_files`).
      key: array name inside ``.npz`` / ``.safetensors`` files.
      ndim / shape: every sample's rank / exact shape (checked when read; errors name the file).
      prompts: prompts parallel to ``files`` (override the files' own); ``require_prompt``: a sample without
        one is an error (else ``""``).
      dtype: cast on read (``None`` keeps the stored dtype).
    """

    out_key = "latents"

    def __init__(self, files: str | os.PathLike | Sequence[str | os.PathLike], key: str = "latents",
                 ndim: int = 4, shape: Sequence[int] | None = None, prompts: Sequence[str] | None = None,
                 require_prompt: bool = True, dtype: Any = np.float32, prompt_key: str = "prompt"):
        self.files = list_latent_files(files)
        if prompts is not None and len(prompts) != len(self.files):
            raise DataError(f"{len(prompts)} prompts for {len(self.files)} latent files; pass one prompt per file")
        self.prompts = list(prompts) if prompts is not None else None
        self.key, self.ndim, self.shape, self.dtype = key, ndim, shape, dtype
        self.require_prompt, self.prompt_key = require_prompt, prompt_key

    @classmethod
    def from_manifest(cls, manifest: str | os.PathLike, **kw: Any) -> "LatentSource":
        """JSONL lines ``{"path": "<file, relative to the manifest>", "prompt": "..."}``."""
        manifest = os.fspath(manifest)
        base = os.path.dirname(os.path.abspath(manifest))
        files, prompts = [], []
        for line, obj in parse_jsonl(manifest):
            where = f"{manifest}:{line}"
            if not isinstance(obj.get("path"), str):
                raise DataError(f"{where}: missing string key 'path' (keys: {sorted(obj)})")
            if not isinstance(obj.get("prompt"), str):
                raise DataError(f"{where}: missing string key 'prompt' (keys: {sorted(obj)})")
            path = os.path.join(base, obj["path"])
            if not os.path.isfile(path):
                raise DataError(f"{where}: {path}: no such file")
            files.append(path)
            prompts.append(obj["prompt"])
        return cls(files, prompts=prompts, **kw)

    def __len__(self) -> int:
        return len(self.files)

    def _validate(self, x: np.ndarray, where: str) -> np.ndarray:
        return _check_array(x, where, self.ndim, self.shape, f"'{self.key}'")

    def __getitem__(self, i: int) -> dict[str, Any]:
        path = self.files[i]
        x, prompt = read_sample_file(path, self.key, self.prompt_key)
        x = self._validate(x, path)
        if self.prompts is not None:
            prompt = self.prompts[i]
        if prompt is None:
            if self.require_prompt:
                raise DataError(f"{path}: no prompt (store it as '{self.prompt_key}' in the .npz / safetensors "
                                "metadata, or use a manifest / prompts=...)")
            prompt = ""
        if self.dtype is not None:
            x = x.astype(self.dtype, copy=False)
        return {self.out_key: x, "prompts": prompt, "idx": np.int64(i)}


class OdeTrajectorySource(LatentSource):
    """ODE-init pairs ``{"ode_latent": [S, F, C, H, W], "prompts", "idx"}``; ``[-1]`` is the clean latent."""

    out_key = "ode_latent"

    def __init__(self, files: Any, key: str = "ode_latent", **kw: Any):
        kw.setdefault("ndim", 5)
        super().__init__(files, key=key, **kw)

    def _validate(self, x: np.ndarray, where: str) -> np.ndarray:
        x = super()._validate(x, where)
        if x.shape[0] < 2:
            raise DataError(f"{where}: ode_latent has {x.shape[0]} trajectory states; need >= 2 "
                            "(noisy states at the denoising steps, then the clean latent)")
        return x


# --------------------------------------------------------------------------------------------------
# ArrayRecord
# --------------------------------------------------------------------------------------------------


def encode_record(record: Mapping[str, Any]) -> bytes:
    """A dict of arrays / strings / numbers -> ``.npz`` bytes (no pickle)."""
    buf = io.BytesIO()
    arrays = {}
    for k, v in record.items():
        a = np.asarray(v)
        if a.dtype == object:
            raise DataError(f"record field {k!r} is not an array, number or string (got {type(v).__name__})")
        arrays[k] = a
    np.savez(buf, **arrays)
    return buf.getvalue()


def decode_record(data: bytes) -> dict[str, Any]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        out = {}
        for k in z.files:
            a = z[k]
            out[k] = str(a[()]) if a.ndim == 0 and a.dtype.kind == "U" else a
        return out


def write_array_record(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> int:
    """Write records (e.g. ``{"latents": ..., "prompts": "..."}``) to one ArrayRecord file; returns the count."""
    from array_record.python.array_record_module import ArrayRecordWriter

    n = 0
    writer = ArrayRecordWriter(os.fspath(path), "group_size:1")
    try:
        for rec in records:
            writer.write(encode_record(rec))
            n += 1
    finally:
        writer.close()
    return n


class ArrayRecordSource:
    """Records of ArrayRecord files written by :func:`write_array_record`.

    ``field`` (``"latents"`` or ``"ode_latent"``) is validated like the file sources (``ndim``, ``shape``,
    and ``S >= 2`` for ``ode_latent``); ``idx`` is the global record index.
    """

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike], field: str = "latents",
                 ndim: int | None = None, shape: Sequence[int] | None = None, dtype: Any = np.float32):
        try:
            import grain
            ArrayRecordDataSource = grain.sources.ArrayRecordDataSource
        except (ImportError, AttributeError):
            import grain.python as grain  # older grain layout
            ArrayRecordDataSource = grain.ArrayRecordDataSource
        if isinstance(paths, (str, os.PathLike)):
            paths = sorted(glob.glob(os.fspath(paths))) if any(c in os.fspath(paths) for c in "*?[") \
                else [os.fspath(paths)]
        paths = [os.fspath(p) for p in paths]
        missing = [p for p in paths if not os.path.isfile(p)]
        if not paths or missing:
            raise DataError(f"ArrayRecord files not found: {missing or paths}")
        self.paths = paths
        self._source = ArrayRecordDataSource(paths)
        self.field, self.shape, self.dtype = field, shape, dtype
        self.ndim = ndim if ndim is not None else (5 if field == "ode_latent" else 4)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int) -> dict[str, Any]:
        where = f"{self.paths}[record {i}]" if len(self.paths) > 1 else f"{self.paths[0]}[record {i}]"
        try:
            rec = decode_record(self._source[i])
        except Exception as e:
            raise DataError(f"{where}: not a record written by write_array_record ({type(e).__name__}: {e})") \
                from None
        if self.field not in rec:
            raise DataError(f"{where}: no field {self.field!r} (has {sorted(rec)})")
        x = _check_array(rec[self.field], where, self.ndim, self.shape, f"'{self.field}'")
        if self.field == "ode_latent" and x.shape[0] < 2:
            raise DataError(f"{where}: ode_latent has {x.shape[0]} trajectory states; need >= 2")
        if self.dtype is not None:
            rec[self.field] = x.astype(self.dtype, copy=False)
        rec["idx"] = np.int64(i)
        return rec


def write_latent_file(path: str | os.PathLike, latents: np.ndarray, prompt: str, key: str = "latents") -> str:
    """Atomically write one ``.npz`` sample readable by :class:`LatentSource`: array ``key`` + 0-d ``prompt``.

    Written to a temporary sibling (not matched by :data:`LATENT_EXTS`) and renamed, so a reader or a crash
    never sees a partial file.
    """
    path = os.fspath(path)
    if not path.endswith(".npz"):
        raise DataError(f"{path}: latent sample files written here are .npz")
    from memflow_jax.io.atomic import write_file

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **{key: np.asarray(latents), "prompt": np.asarray(str(prompt))})

    return write_file(path, write)


def manifest_line(path: str, prompt: str) -> str:
    """One JSONL manifest line for :meth:`LatentSource.from_manifest`."""
    return json.dumps({"path": path, "prompt": prompt}, ensure_ascii=False)
