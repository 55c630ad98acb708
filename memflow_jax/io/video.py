"""Video output: pixels -> uint8, atomic mp4 writing (imageio-ffmpeg), streaming writer, PNG frame strips.

Every file is written to a temporary sibling (same directory, so the final ``os.replace`` is atomic) and renamed
only when complete: a crash or an exception never leaves a partial file and never clobbers an existing one.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from typing import Any, Optional

import numpy as np


def pixels_to_uint8(frames: Any) -> np.ndarray:
    """Frames -> uint8 ``[T, H, W, 3]``.

    Accepts uint8 ``[T, H, W, 3]`` (returned as is) or float ``[T, 3, H, W]`` in [-1, 1] (a decoder output),
    mapped as the reference does: ``uint8(255 * clamp(x * 0.5 + 0.5, 0, 1))`` (torch's cast truncates).
    """
    a = np.asarray(frames)
    if a.dtype == np.uint8:
        if a.ndim != 4 or a.shape[-1] != 3:
            raise ValueError(f"uint8 frames must be [T, H, W, 3], got shape {a.shape}")
        return a
    if not np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float32)  # e.g. bfloat16 from ml_dtypes
    if a.ndim != 4 or a.shape[1] != 3:
        raise ValueError(f"float frames must be [T, 3, H, W] in [-1, 1] (decoder layout), got shape {a.shape}; "
                         "pass uint8 [T, H, W, 3] for channels-last frames")
    a = np.clip(a.astype(np.float32) * 0.5 + 0.5, 0.0, 1.0) * 255.0
    return np.ascontiguousarray(a.astype(np.uint8).transpose(0, 2, 3, 1))  # truncation, like torch .to(uint8)


def _temp_path(path: str, suffix: str) -> str:
    parent = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".part" + suffix, dir=parent)
    os.close(fd)
    return tmp


class Mp4Writer:
    """Streaming, atomic H.264 mp4 writer: ``with Mp4Writer(path, fps=16) as w: w.append(chunk)``.

    Frames go to a temp file next to ``path``; ``close()`` (normal exit of the ``with``) renames it over ``path``;
    an exception inside the ``with`` (or :meth:`abort`) removes it and leaves any existing ``path`` untouched.
    """

    def __init__(self, path: str | os.PathLike, fps: float = 16, quality: float = 8, codec: Optional[str] = None):
        self.path = os.fspath(path)
        if not self.path.lower().endswith(".mp4"):
            raise ValueError(f"{self.path}: Mp4Writer writes .mp4 files; use a path ending in .mp4")
        self.fps = fps
        self.quality = quality
        self.codec = codec
        self.num_frames = 0
        self._size: Optional[tuple[int, int]] = None  # (H, W)
        self._gen: Any = None
        self._tmp: Optional[str] = _temp_path(self.path, ".mp4")

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def append(self, frames: Any) -> None:
        """Append frames (uint8 ``[T, H, W, 3]`` or float ``[T, 3, H, W]`` in [-1, 1]); all chunks share H x W."""
        if self._tmp is None:
            raise RuntimeError(f"{self.path}: writer is already closed")
        u8 = pixels_to_uint8(frames)
        if self._size is None:
            import imageio_ffmpeg

            self._size = (u8.shape[1], u8.shape[2])
            self._gen = imageio_ffmpeg.write_frames(
                self._tmp, (u8.shape[2], u8.shape[1]), fps=self.fps, quality=self.quality, codec=self.codec,
                macro_block_size=2, output_params=["-f", "mp4"])
            with warnings.catch_warnings():
                # ffmpeg is started by fork+exec (the child execs at once); JAX warns on any fork: benign here
                warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
                self._gen.send(None)
        elif (u8.shape[1], u8.shape[2]) != self._size:
            raise ValueError(f"{self.path}: frames of size {u8.shape[1]}x{u8.shape[2]} appended to a video of "
                             f"size {self._size[0]}x{self._size[1]}")
        for f in u8:
            self._gen.send(np.ascontiguousarray(f))
        self.num_frames += len(u8)

    def close(self) -> str:
        """Finish encoding and atomically move the file into place; returns the path."""
        if self._tmp is None:
            return self.path
        if self.num_frames == 0:
            self.abort()
            raise ValueError(f"{self.path}: no frames were appended; nothing written")
        try:
            self._gen.close()  # flushes ffmpeg and waits for it
            self._gen = None
            os.replace(self._tmp, self.path)
            self._tmp = None
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        """Stop ffmpeg and delete the temp file (an existing ``path`` is kept)."""
        gen, self._gen = self._gen, None
        if gen is not None:
            try:
                gen.close()
            except Exception:  # ffmpeg may complain about an unfinished stream; the file is discarded anyway
                pass
        tmp, self._tmp = self._tmp, None
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)

    def __del__(self) -> None:  # a writer dropped without close(): never leave the temp file behind
        try:
            if getattr(self, "_tmp", None) is not None:
                self.abort()
        except Exception:
            pass


def write_mp4(path: str | os.PathLike, frames: Any, fps: float = 16, quality: float = 8) -> str:
    """Write a whole video atomically (uint8 ``[T, H, W, 3]`` or float ``[T, 3, H, W]`` in [-1, 1])."""
    with Mp4Writer(path, fps=fps, quality=quality) as w:
        w.append(frames)
    return os.fspath(path)


def frame_strip_png(frames: Any, path: str | os.PathLike, num_frames: Optional[int] = 8, gap: int = 2) -> str:
    """Save ``num_frames`` evenly spaced frames side by side (``gap`` white pixels apart) as one PNG, atomically.

    ``num_frames=None`` keeps every frame. Frames as for :func:`write_mp4`.
    """
    import imageio.v3 as iio

    u8 = pixels_to_uint8(frames)
    t, h, _, _ = u8.shape
    if t == 0:
        raise ValueError("frame_strip_png: no frames")
    n = t if num_frames is None else max(1, min(int(num_frames), t))
    idx = np.unique(np.round(np.linspace(0, t - 1, n)).astype(int))
    parts = []
    for j, i in enumerate(idx):
        if j:
            parts.append(np.full((h, gap, 3), 255, np.uint8))
        parts.append(u8[i])
    strip = np.concatenate(parts, axis=1)
    from memflow_jax.io.atomic import write_file

    return write_file(os.fspath(path), lambda tmp: iio.imwrite(tmp, strip, extension=".png"))
