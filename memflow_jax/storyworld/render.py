"""Storyworld renderer: vectorised numpy rasteriser (no anti-aliasing) with per-frame ground truth.

Objects are drawn in index order (later objects on top) at integer pixel positions, so an object's pattern
is pixel-identical wherever it is. Every size is derived from ``min(height, width)``.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np

from memflow_jax.storyworld import scene as S

DEFAULT_HEIGHT = 64
DEFAULT_WIDTH = 64
DEFAULT_FPS = 16


def check_resolution(height: int, width: int) -> None:
    """Raise unless ``height`` and ``width`` are multiples of 8 and at least 16."""
    for name, v in (("height", height), ("width", width)):
        if int(v) != v or v < 16 or v % 8:
            raise ValueError(f"{name}={v} must be a multiple of 8 and >= 16 (VAE stride 8; smaller frames make "
                             f"objects a few pixels wide); pick e.g. 64")


def object_size_px(size_id: int, height: int, width: int) -> int:
    """Side in pixels of an object's square box."""
    return max(3, int(np.floor(S.SIZE_FRACTION[size_id] * min(height, width) + 0.5)))


@functools.lru_cache(maxsize=256)
def object_masks(shape_id: int, size_px: int, pattern_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``(shape [s, s] bool, dark [s, s] bool)``: the object's pixels and its pattern pixels (subset)."""
    s = size_px
    v, u = np.meshgrid(np.arange(s) + 0.5, np.arange(s) + 0.5, indexing="ij")  # pixel centres (row, col)
    shape = S.SHAPES[shape_id]
    if shape == "circle":
        m = (u - s / 2) ** 2 + (v - s / 2) ** 2 <= (s / 2) ** 2
    elif shape == "square":
        m = np.ones((s, s), bool)
    else:  # triangle: apex at the top centre, base along the bottom row
        m = np.abs(u - s / 2) <= v / 2
    period = max(6, 2 * int(round(s / 5)))  # bands >= 3 px: survive a little blur
    band = period // 2
    iv, iu = np.arange(s)[:, None], np.arange(s)[None, :]
    pattern = S.PATTERNS[pattern_id]
    if pattern == "solid":
        dark = np.zeros((s, s), bool)
    elif pattern == "hstripes":
        dark = np.broadcast_to((iv // band) % 2 == 1, (s, s))
    elif pattern == "vstripes":
        dark = np.broadcast_to((iu // band) % 2 == 1, (s, s))
    else:  # spots: band x band squares on a period grid
        dark = ((iv + band // 2) % period < band) & ((iu + band // 2) % period < band)
    m.setflags(write=False)
    dark = np.asarray(dark & m)
    dark.setflags(write=False)
    return m, dark


@functools.lru_cache(maxsize=64)
def background_image(colour_id: int, texture_id: int, height: int, width: int) -> np.ndarray:
    """uint8 [H, W, 3] background (read-only; copy before drawing)."""
    colour = S.BACKGROUND_COLOURS[colour_id]
    img = np.empty((height, width, 3), np.uint8)
    img[:] = S.BACKGROUND_RGB[colour_id]
    period = max(4, min(height, width) // 8)
    y, x = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    texture = S.TEXTURES[texture_id]
    if texture == "stripes":  # diagonal stripes
        marks = ((x + y) // (period // 2)) % 2 == 1
    elif texture == "dots":
        c = period / 2 - 0.5
        marks = ((x % period) - c) ** 2 + ((y % period) - c) ** 2 <= (period / 4) ** 2
    else:
        marks = np.zeros((height, width), bool)
    img[marks] = S.texture_rgb(colour)
    img.setflags(write=False)
    return img


def _object_box(state: S.SceneState, t: int, k: int, height: int, width: int) -> tuple[int, int, int]:
    """``(x0, y0, size_px)``: integer top-left corner (may lie outside the frame) and side of object k."""
    s = object_size_px(int(state.size_id[k]), height, width)
    cx, cy = state.centre[t, k]
    x0 = int(np.floor(cx * width - s / 2 + 0.5))
    y0 = int(np.floor(cy * height - s / 2 + 0.5))
    return x0, y0, s


def _colours(state: S.SceneState, k: int) -> tuple[np.ndarray, np.ndarray]:
    colour = S.OBJECT_COLOURS[int(state.colour_id[k])]
    off = float(state.hue_offset[k])
    return (np.asarray(S.object_rgb(colour, off), np.uint8),
            np.asarray(S.object_rgb(colour, off, S.PATTERN_VALUE), np.uint8))


def render_with_ids(state: S.SceneState, t: int, height: int = DEFAULT_HEIGHT, width: int = DEFAULT_WIDTH
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Frame ``t``: ``(rgb uint8 [H, W, 3], ids uint8 [H, W])`` with ids 0 = background, k + 1 = object k."""
    check_resolution(height, width)
    if not 0 <= t < state.num_frames:
        raise IndexError(f"frame t={t} outside the compiled scene's [0, {state.num_frames})")
    frame = background_image(int(state.background_id[t]), int(state.texture_id[t]), height, width).copy()
    ids = np.zeros((height, width), np.uint8)
    for k in range(state.num_objects):
        if not state.in_scene[t, k]:
            continue
        x0, y0, s = _object_box(state, t, k, height, width)
        ya, yb, xa, xb = max(y0, 0), min(y0 + s, height), max(x0, 0), min(x0 + s, width)
        if ya >= yb or xa >= xb:
            continue
        shape, dark = object_masks(int(state.shape_id[k]), s, int(state.pattern_id[k]))
        local = (slice(ya - y0, yb - y0), slice(xa - x0, xb - x0))
        m, d = shape[local], dark[local]
        base, shade = _colours(state, k)
        block = frame[ya:yb, xa:xb]
        block[m] = base
        block[d] = shade
        ids[ya:yb, xa:xb][m] = k + 1
    return frame, ids


def render(scene_state: S.SceneState, t: int, height: int = DEFAULT_HEIGHT, width: int = DEFAULT_WIDTH
           ) -> np.ndarray:
    """Frame ``t`` of a compiled scene (:func:`scene.compile_script`) as uint8 ``[H, W, 3]``."""
    return render_with_ids(scene_state, t, height, width)[0]


def render_video(script: S.Script, seed: int, num_frames: int | None = None, height: int = DEFAULT_HEIGHT,
                 width: int = DEFAULT_WIDTH, fps: int = DEFAULT_FPS, *,
                 hidden: Sequence[S.HiddenAttributes] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Render ``script`` with the hidden attributes of ``seed`` -> ``(video uint8 [T, H, W, 3], annotations)``.

    Segment durations are in frames, so ``fps`` only labels the clip (stored in the annotations).
    ``hidden`` overrides the seed's hidden attributes (used to build corrupted videos in tests).

    Annotations (N objects, S segments; pixel units, (x, y) order, boxes ``[x0, y0, x1, y1)`` clipped to the
    frame, -1 where the object is not on screen):
      ``visible`` bool [T, N] (any pixel shows), ``visible_fraction`` float32 [T, N] (shown / full area:
      1 = fully in frame and unoccluded), ``in_scene`` bool [T, N], ``centre`` float32 [T, N, 2],
      ``bbox`` int32 [T, N, 4], ``id_map`` uint8 [T, H, W] (0 = background, k + 1 = object k),
      ``area`` / ``size_px`` int32 [N], ``colour_id`` / ``shape_id`` / ``size_id`` / ``pattern_id`` int32 [N],
      ``hue_offset`` / ``hue`` float32 [N] (degrees), ``background_id`` / ``texture_id`` / ``segment_id``
      int32 [T], ``start_frames`` int32 [S], ``height`` / ``width`` / ``fps`` / ``seed`` int64 scalars.
    """
    check_resolution(height, width)
    if int(fps) != fps or fps < 1:
        raise ValueError(f"fps={fps} must be a positive integer")
    if hidden is None:
        hidden = S.sample_hidden(script, seed)
    state = S.compile_script(script, hidden, num_frames)
    T, N = state.num_frames, state.num_objects
    video = np.empty((T, height, width, 3), np.uint8)
    id_map = np.empty((T, height, width), np.uint8)
    bbox = np.full((T, N, 4), -1, np.int32)
    for t in range(T):
        video[t], id_map[t] = render_with_ids(state, t, height, width)
        for k in range(N):
            if not state.in_scene[t, k]:
                continue
            x0, y0, s = _object_box(state, t, k, height, width)
            box = (max(x0, 0), max(y0, 0), min(x0 + s, width), min(y0 + s, height))
            if box[0] < box[2] and box[1] < box[3]:
                bbox[t, k] = box
    size_px = np.asarray([object_size_px(int(i), height, width) for i in state.size_id], np.int32)
    area = np.asarray([object_masks(int(state.shape_id[k]), int(size_px[k]), 0)[0].sum() for k in range(N)],
                      np.int32)
    shown = np.stack([(id_map == k + 1).sum(axis=(1, 2)) for k in range(N)], axis=1)  # [T, N]
    hue = (np.asarray(S.OBJECT_HUES)[state.colour_id] + state.hue_offset) % 360.0
    ann = {
        "visible": shown > 0,
        "visible_fraction": (shown / area[None]).astype(np.float32),
        "in_scene": state.in_scene.copy(),
        "centre": (state.centre * np.asarray([width, height])).astype(np.float32),
        "bbox": bbox,
        "id_map": id_map,
        "area": area,
        "size_px": size_px,
        "colour_id": state.colour_id, "shape_id": state.shape_id, "size_id": state.size_id,
        "pattern_id": state.pattern_id,
        "hue_offset": state.hue_offset.astype(np.float32), "hue": hue.astype(np.float32),
        "background_id": state.background_id, "texture_id": state.texture_id, "segment_id": state.segment_id,
        "start_frames": np.asarray([f for f in script.start_frames if f < T], np.int32),
        "height": np.int64(height), "width": np.int64(width), "fps": np.int64(fps), "seed": np.int64(seed),
    }
    return video, ann
