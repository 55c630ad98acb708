"""Storyworld datasets on disk, readable by Grain.

Layout of a dataset folder (every file is a pure function of the arguments: same seed -> same bytes)::

    meta.json            format, kind, count, seed, resolution, fps, storage, sampler arguments, vocabulary
    data.array_record    one record per example (storage "arrayrecord")
    examples/000000.swr  ... one file per example (storage "files", when array_record is not installed)
    index.jsonl          per example: index, seed, num_frames, prompts, start_frames (+ file for "files"; stories
                         + latent_switch_frames, latent_returns)
    prompts.txt          one prompt per line (reference TextDataset format): the clip's prompt / a script's
                         first prompt
    segment_prompts.txt  every distinct prompt of every segment, in first-seen order (a text cache's input)
    switch_prompts.txt   scripts / stories: the second prompt of each script, line-paired with prompts.txt
                         (reference TwoTextDataset format)
    scripts.jsonl        scripts / stories: {"prompts": [...], "switch_frames": [...]} per line (switch frames in
                         video frames; the reference's MultiTextDataset wants one segment count per file, so
                         scripts_<n>seg.jsonl split them by count when counts differ)
    vocab.txt            the caption vocabulary, one token per line

Kinds: ``clips`` (one prompt), ``scripts`` (3-6 prompts, free segment lengths) and ``stories`` (scripts whose
segment boundaries fall on a streaming model's latent chunk boundaries, :func:`scripts.sample_aligned_script`;
their records add ``latent_switch_frames`` and ``latent_returns``, ``[object, latent frame its return segment
starts, latent frames it was off screen]`` per return: the teacher-forced story recipes' data and their
return-weighted loss).

A record is ``MAGIC | uint64 header length | JSON header | raw little-endian array bytes``; the header holds the
non-array fields and ``[name, dtype, shape, offset, nbytes]`` of every array. :class:`StoryworldSource`
decodes records into dicts (see :func:`make_example` for the fields).
"""
from __future__ import annotations

import concurrent.futures
import functools
import json
import os
import struct
from typing import Any, Iterable, Mapping

import numpy as np

from memflow_jax.storyworld import captions as C
from memflow_jax.storyworld import render as R
from memflow_jax.storyworld import scene as S
from memflow_jax.storyworld import scripts as SC

MAGIC = b"SWREC001"
FORMAT = "storyworld-v1"
KINDS = ("clips", "scripts", "stories")
STORAGES = ("auto", "arrayrecord", "files")
DATA_FILE = "data.array_record"


def _have_array_record() -> bool:
    try:
        from array_record.python import array_record_module  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------------------------------
# Examples and their serialisation
# --------------------------------------------------------------------------------------------------


def make_example(kind: str, index: int, seed: int, height: int = R.DEFAULT_HEIGHT, width: int = R.DEFAULT_WIDTH,
                 fps: int = R.DEFAULT_FPS, sampler_kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Example ``index`` of the dataset with master ``seed`` (independent of the dataset's size).

    Fields: ``video`` uint8 [T, H, W, 3]; ``annotations`` (see :func:`render.render_video`); ``prompts``
    (one per segment), ``captions`` (the sentences of each segment), ``start_frames`` / ``switch_frames``
    (lists of ints), ``script`` (``scene.script_to_dict``), ``hidden`` (hidden attributes per object),
    ``seed`` (render seed), ``index``, ``dataset_seed``, ``kind``, ``height``, ``width``, ``fps``,
    ``num_frames``; stories add ``latent_switch_frames`` (where prompts 2.. start, latent frames) and
    ``latent_returns`` (:func:`scripts.latent_returns`, lists).
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {list(KINDS)}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))
    kw = dict(sampler_kwargs or {})
    if kind == "clips":
        script = SC.sample_clip(rng, **kw)
    elif kind == "stories":
        script = SC.sample_aligned_script(rng, **kw)
    else:
        script = SC.sample_script(rng, **kw)
    render_seed = int(rng.integers(0, 2**31 - 1))
    hidden = S.sample_hidden(script, render_seed)
    video, ann = R.render_video(script, render_seed, None, height, width, fps, hidden=hidden)
    extra = {}
    if kind == "stories":
        extra["latent_switch_frames"] = list(SC.latent_switches(script, kw["t_stride"], kw["chunk"]))
        extra["latent_returns"] = [list(r) for r in SC.latent_returns(script, kw["t_stride"], kw["chunk"])]
    return {
        "kind": kind, "index": int(index), "dataset_seed": int(seed), "seed": render_seed,
        "height": int(height), "width": int(width), "fps": int(fps), "num_frames": int(video.shape[0]),
        "prompts": C.script_prompts(script), "captions": C.script_captions(script),
        "start_frames": list(script.start_frames), "switch_frames": list(script.switch_frames),
        "script": S.script_to_dict(script), "hidden": S.hidden_to_dicts(hidden),
        "video": video, "annotations": ann, **extra,
    }


def encode_example(example: Mapping[str, Any]) -> bytes:
    """Serialise an example dict (arrays + JSON-able fields; ``annotations`` a dict of arrays) to bytes."""
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {}
    for key, value in example.items():
        if key == "annotations":
            arrays.update({f"annotations/{k}": np.asarray(v) for k, v in value.items()})
        elif isinstance(value, (np.ndarray, np.generic)):
            arrays[key] = np.asarray(value)
        else:
            meta[key] = value
    specs, chunks, offset = [], [], 0
    for name in sorted(arrays):
        a = arrays[name]
        a = np.ascontiguousarray(a.astype(a.dtype.newbyteorder("<"), copy=False))
        specs.append([name, a.dtype.str, list(a.shape), offset, a.nbytes])
        chunks.append(a.tobytes())
        offset += a.nbytes
    header = json.dumps({"meta": meta, "arrays": specs}, sort_keys=True, separators=(",", ":")).encode()
    return MAGIC + struct.pack("<Q", len(header)) + header + b"".join(chunks)


def decode_example(data: bytes) -> dict[str, Any]:
    """Inverse of :func:`encode_example` (arrays are fresh writable copies)."""
    data = bytes(data)
    if data[:len(MAGIC)] != MAGIC:
        raise ValueError(f"not a storyworld record (magic {data[:len(MAGIC)]!r} != {MAGIC!r})")
    (hlen,) = struct.unpack("<Q", data[len(MAGIC):len(MAGIC) + 8])
    start = len(MAGIC) + 8
    header = json.loads(data[start:start + hlen])
    base = start + hlen
    out: dict[str, Any] = dict(header["meta"])
    ann: dict[str, np.ndarray] = {}
    for name, dtype, shape, offset, nbytes in header["arrays"]:
        a = np.frombuffer(data, dtype=np.dtype(dtype), count=int(np.prod(shape, dtype=np.int64)),
                          offset=base + offset).reshape(shape).copy()
        if name.startswith("annotations/"):
            ann[name[len("annotations/"):]] = a
        else:
            out[name] = a
    if ann:
        out["annotations"] = ann
    return out


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def _encoded(index: int, kind: str, seed: int, height: int, width: int, fps: int,
             sampler_kwargs: Mapping[str, Any]) -> tuple[bytes, dict[str, Any]]:
    ex = make_example(kind, index, seed, height, width, fps, sampler_kwargs)
    keys = ("index", "seed", "num_frames", "prompts", "start_frames", "switch_frames", "latent_switch_frames",
            "latent_returns")
    info = {k: ex[k] for k in keys if k in ex}
    return encode_example(ex), info


def _write_lines(path: str, lines: Iterable[str]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for line in lines:
            if "\n" in line:
                raise ValueError(f"a prompt contains a newline (the one-per-line format cannot hold it): {line!r}")
            f.write(line + "\n")


def write_dataset(out_dir: str | os.PathLike, kind: str = "scripts", num_examples: int = 100, seed: int = 0,
                  height: int = R.DEFAULT_HEIGHT, width: int = R.DEFAULT_WIDTH, fps: int = R.DEFAULT_FPS,
                  storage: str = "auto", workers: int = 0, **sampler_kwargs: Any) -> str:
    """Write ``num_examples`` clips / scripts to ``out_dir`` (see the module docstring); returns the folder.

    ``sampler_kwargs`` go to :func:`scripts.sample_clip` / :func:`scripts.sample_script` /
    :func:`scripts.sample_aligned_script` (stories: ``num_latent``, ``chunk``, ``t_stride``); ``workers > 1``
    renders in that many processes (the output is the same bytes).
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {list(KINDS)}")
    if storage not in STORAGES:
        raise ValueError(f"storage={storage!r} is not one of {list(STORAGES)}")
    if num_examples < 1:
        raise ValueError(f"num_examples={num_examples} must be >= 1")
    if kind == "stories":
        missing = [k for k in ("num_latent", "chunk", "t_stride") if k not in sampler_kwargs]
        if missing:
            raise ValueError(f"kind='stories' needs the model's alignment {missing} (latent frames per story, "
                             "latent frames per chunk, the VAE's temporal stride)")
    R.check_resolution(height, width)
    if storage == "auto":
        storage = "arrayrecord" if _have_array_record() else "files"
    elif storage == "arrayrecord" and not _have_array_record():
        raise ImportError("storage='arrayrecord' needs the array_record package (pip install array_record), "
                          "or pass storage='files'")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    job = functools.partial(_encoded, kind=kind, seed=int(seed), height=height, width=width, fps=fps,
                            sampler_kwargs=sampler_kwargs)

    infos: list[dict[str, Any]] = []
    writer = None
    if storage == "arrayrecord":
        from array_record.python.array_record_module import ArrayRecordWriter
        writer = ArrayRecordWriter(os.path.join(out_dir, DATA_FILE), "group_size:1")
    else:
        os.makedirs(os.path.join(out_dir, "examples"), exist_ok=True)

    def consume(results):
        for record, info in results:
            if writer is not None:
                writer.write(record)
            else:
                info["file"] = f"examples/{info['index']:06d}.swr"
                with open(os.path.join(out_dir, info["file"]), "wb") as f:
                    f.write(record)
            infos.append(info)

    try:
        if workers > 1:
            with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
                consume(pool.map(job, range(num_examples), chunksize=max(1, num_examples // (4 * workers))))
        else:
            consume(map(job, range(num_examples)))
    finally:
        if writer is not None:
            writer.close()

    with open(os.path.join(out_dir, "index.jsonl"), "w", encoding="utf-8", newline="\n") as f:
        for info in infos:
            f.write(json.dumps(info, sort_keys=True) + "\n")
    _write_lines(os.path.join(out_dir, "prompts.txt"), (i["prompts"][0] for i in infos))
    _write_lines(os.path.join(out_dir, "segment_prompts.txt"), dict.fromkeys(p for i in infos for p in i["prompts"]))
    _write_lines(os.path.join(out_dir, "vocab.txt"), C.VOCABULARY)
    if kind in ("scripts", "stories"):
        _write_lines(os.path.join(out_dir, "switch_prompts.txt"), (i["prompts"][1] for i in infos))
        lines = [json.dumps({"prompts": i["prompts"], "switch_frames": i["switch_frames"]}) for i in infos]
        _write_lines(os.path.join(out_dir, "scripts.jsonl"), lines)
        counts = sorted({len(i["prompts"]) for i in infos})
        if len(counts) > 1:
            for n in counts:
                _write_lines(os.path.join(out_dir, f"scripts_{n}seg.jsonl"),
                             (line for line, i in zip(lines, infos) if len(i["prompts"]) == n))
    meta = {"format": FORMAT, "kind": kind, "num_examples": int(num_examples), "seed": int(seed),
            "height": int(height), "width": int(width), "fps": int(fps), "storage": storage,
            "sampler_kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in sampler_kwargs.items()},
            "vocabulary": list(C.VOCABULARY)}
    with open(os.path.join(out_dir, "meta.json"), "w", encoding="utf-8", newline="\n") as f:
        f.write(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return out_dir


# --------------------------------------------------------------------------------------------------
# Reading (Grain random-access data source)
# --------------------------------------------------------------------------------------------------


def _array_record_source(paths: list[str]):
    import grain
    cls = getattr(getattr(grain, "sources", None), "ArrayRecordDataSource", None)
    if cls is None:
        import grain.python as gp
        cls = gp.ArrayRecordDataSource
    return cls(paths)


class StoryworldSource:
    """Grain random-access data source over a folder written by :func:`write_dataset`.

    ``len(src)`` examples; ``src[i]`` is the decoded example dict (fields of :func:`make_example`). Picklable
    (the file reader is reopened lazily in each process), so it works with ``grain.MapDataset.source`` and
    multi-worker ``grain.DataLoader``.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        meta_path = os.path.join(self.path, "meta.json")
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"{meta_path} not found: {self.path!r} is not a storyworld dataset folder; "
                                    f"write one with `python -m memflow_jax.storyworld.export --out DIR`")
        with open(meta_path, encoding="utf-8") as f:
            self.meta = json.load(f)
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path}: format {self.meta.get('format')!r} != {FORMAT!r}")
        self.storage = self.meta["storage"]
        self._len = int(self.meta["num_examples"])
        self._files: list[str] | None = None
        if self.storage == "files":
            with open(os.path.join(self.path, "index.jsonl"), encoding="utf-8") as f:
                self._files = [json.loads(line)["file"] for line in f if line.strip()]
            if len(self._files) != self._len:
                raise ValueError(f"{self.path}: index.jsonl lists {len(self._files)} files, meta says {self._len}")
        self._reader = None

    def __len__(self) -> int:
        return self._len

    def num_frames(self) -> np.ndarray:
        """``[N]`` int64 frame count of every video, from ``index.jsonl`` (no video is decoded)."""
        return np.asarray([int(r["num_frames"]) for r in self.index_records()], np.int64)

    def index_records(self) -> list[dict[str, Any]]:
        """Every example's ``index.jsonl`` record (``num_frames``, ``prompts``, ``start_frames``, ...), no video
        decoded."""
        index = os.path.join(self.path, "index.jsonl")
        with open(index, encoding="utf-8") as f:
            recs = [json.loads(line) for line in f if line.strip()]
        if len(recs) != self._len:
            raise ValueError(f"{index} lists {len(recs)} examples, {self.path}/meta.json {self._len}: the "
                             "dataset folder is incomplete")
        return recs

    def _raw(self, index: int) -> bytes:
        if self._files is not None:
            with open(os.path.join(self.path, self._files[index]), "rb") as f:
                return f.read()
        if self._reader is None:
            self._reader = _array_record_source([os.path.join(self.path, DATA_FILE)])
        return self._reader[index]

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = int(index)
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(f"index {index} out of range for a dataset of {self._len} examples")
        return decode_example(self._raw(i))

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_reader"] = None
        return state

    def __repr__(self) -> str:
        return f"StoryworldSource({self.path!r}, kind={self.meta['kind']}, len={self._len}, storage={self.storage})"
