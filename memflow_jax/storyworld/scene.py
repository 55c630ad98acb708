"""Storyworld scene graph: frozen dataclasses describing a procedural video world.

A :class:`Script` is what the captions describe: a background, 1-3 objects (shape, named colour, size class)
and a sequence of prompt segments, each giving every object one action (a motion or an event) with its start
and end position. Positions are normalised frame coordinates (x, y) in [0, 1] (x = column, y = row); object
sizes are fractions of ``min(height, width)``, so one script renders at any resolution.

The HIDDEN attributes (:class:`HiddenAttributes`: exact hue offset within the named colour and a surface
pattern) are *not* part of the script: they are sampled per object per video from the render seed
(:func:`sample_hidden`), so no caption can state them. A model can only keep them consistent when an object
leaves and comes back by remembering what it looked like.

Timing of one segment of ``D`` frames, frame ``f`` in ``[0, D)`` (``alpha = f / D``, so the next segment's
first frame is exactly the segment's ``end``):

* ``still``: at ``start``;  ``left/right/up/down``: linear ``start -> end``;
* ``bounce``: ``x`` fixed, ``y = start_y - BOUNCE_HEIGHT * |sin(pi * k * f / D)|`` with ``k = max(1, round(D / 8))``
  bounces, back at ``start`` when the segment ends;
* ``enter/return``: from off-screen ``start`` to ``end`` during the first ``EVENT_FRAC`` of the segment, then still;
* ``leave``: from ``start`` to off-screen ``end`` during the first ``EVENT_FRAC``, then gone;
* ``absent``: not in the scene.
"""
from __future__ import annotations

import colorsys
import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

# --------------------------------------------------------------------------------------------------
# Closed palettes (ids are indices into these tuples)
# --------------------------------------------------------------------------------------------------

# Object colours: name -> HSV hue centre in degrees. Centres are >= 50 deg apart, so hue offsets of up to
# +-HUE_OFFSET_MAX never move an object into another named colour.
OBJECT_COLOURS: tuple[str, ...] = ("red", "yellow", "green", "cyan", "blue", "purple")
OBJECT_HUES: tuple[float, ...] = (0.0, 55.0, 120.0, 180.0, 230.0, 285.0)
OBJECT_SATURATION = 0.85
OBJECT_VALUE = 0.95  # base surface
PATTERN_VALUE = 0.55  # darker shade of the same hue used for the hidden pattern

# Backgrounds: name -> RGB. All are low-saturation or dark (HSV s < 0.5 or v < 0.45), so a pixel with
# s >= 0.5 and v >= 0.45 is always an object pixel (see metrics.object_mask).
BACKGROUND_COLOURS: tuple[str, ...] = ("sand", "gray", "white", "black", "navy", "forest")
BACKGROUND_RGB: tuple[tuple[int, int, int], ...] = (
    (215, 195, 150), (128, 128, 128), (235, 235, 235), (25, 25, 25), (30, 40, 80), (40, 70, 45))
TEXTURES: tuple[str, ...] = ("plain", "stripes", "dots")
TEXTURE_DELTA = 22  # texture pixels: background +- this per channel (darker on light, lighter on dark colours)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
SIZE_FRACTION: tuple[float, ...] = (0.16, 0.28)  # side of the object's box / min(height, width)

MOTIONS: tuple[str, ...] = ("left", "right", "up", "down", "still", "bounce")
EVENTS: tuple[str, ...] = ("enter", "leave", "return")
ACTIONS: tuple[str, ...] = MOTIONS + EVENTS + ("absent",)
SIDES: tuple[str, ...] = ("left", "right")
BACKGROUND_EVENTS: tuple[str, ...] = ("", "change", "revert")

# Hidden attributes: a discrete set of hue offsets (8 deg apart; metrics use half of that as tolerance)
# and surface patterns drawn in the darker shade.
HUE_OFFSETS: tuple[float, ...] = (-12.0, -4.0, 4.0, 12.0)
HUE_OFFSET_MAX = max(abs(h) for h in HUE_OFFSETS)
PATTERNS: tuple[str, ...] = ("solid", "hstripes", "vstripes", "spots")

# Layout constants (normalised units).
INNER_LO, INNER_HI = 0.2, 0.8  # object centres in this range are fully inside the frame (size <= 0.3)
OFFSCREEN_LO, OFFSCREEN_HI = -0.2, 1.2  # centres here are fully outside the frame
BOUNCE_HEIGHT = 0.15
BOUNCE_FRAMES = 8  # nominal frames per bounce
EVENT_FRAC = 0.6  # enter/leave/return movements take this fraction of their segment


class SceneError(ValueError):
    """An invalid scene graph / script."""


def _check(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise SceneError(f"{name}={value!r} is not one of {list(choices)}")


# --------------------------------------------------------------------------------------------------
# Scene graph
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Background:
    """A named background colour with an optional texture."""

    colour: str = "sand"
    texture: str = "plain"

    def __post_init__(self):
        _check("background.colour", self.colour, BACKGROUND_COLOURS)
        _check("background.texture", self.texture, TEXTURES)

    @property
    def colour_id(self) -> int:
        return BACKGROUND_COLOURS.index(self.colour)

    @property
    def texture_id(self) -> int:
        return TEXTURES.index(self.texture)


@dataclasses.dataclass(frozen=True)
class ObjectSpec:
    """The visible (captioned) attributes of one object."""

    shape: str
    colour: str
    size: str

    def __post_init__(self):
        _check("object.shape", self.shape, SHAPES)
        _check("object.colour", self.colour, OBJECT_COLOURS)
        _check("object.size", self.size, SIZES)

    @property
    def shape_id(self) -> int:
        return SHAPES.index(self.shape)

    @property
    def colour_id(self) -> int:
        return OBJECT_COLOURS.index(self.colour)

    @property
    def size_id(self) -> int:
        return SIZES.index(self.size)


@dataclasses.dataclass(frozen=True)
class HiddenAttributes:
    """Per-object, per-video attributes that captions never state."""

    hue_offset: float  # degrees, one of HUE_OFFSETS
    pattern: str  # one of PATTERNS

    def __post_init__(self):
        if abs(self.hue_offset) > HUE_OFFSET_MAX:
            raise SceneError(f"hidden.hue_offset={self.hue_offset} exceeds +-{HUE_OFFSET_MAX} degrees")
        _check("hidden.pattern", self.pattern, PATTERNS)

    @property
    def pattern_id(self) -> int:
        return PATTERNS.index(self.pattern)


@dataclasses.dataclass(frozen=True)
class ObjectAction:
    """What one object does during one segment (see the module docstring for the timing)."""

    kind: str  # one of ACTIONS
    start: tuple[float, float] = (0.5, 0.5)  # normalised centre (x, y) at the segment's first frame
    end: tuple[float, float] = (0.5, 0.5)  # normalised centre when the movement is over
    side: str = ""  # enter/leave/return: "left" | "right"

    def __post_init__(self):
        _check("action.kind", self.kind, ACTIONS)
        if self.kind in EVENTS:
            _check(f"action.side (for {self.kind})", self.side, SIDES)
        elif self.side:
            raise SceneError(f"action {self.kind!r} takes no side (got side={self.side!r})")
        object.__setattr__(self, "start", tuple(float(v) for v in self.start))
        object.__setattr__(self, "end", tuple(float(v) for v in self.end))


@dataclasses.dataclass(frozen=True)
class Segment:
    """One prompt segment: its length in frames, background and one action per object."""

    duration: int
    background: Background
    actions: tuple[ObjectAction, ...]
    bg_event: str = ""  # "" | "change" (turns to a new colour) | "revert" (turns back to the first colour)

    def __post_init__(self):
        if int(self.duration) < 1:
            raise SceneError(f"segment.duration={self.duration} must be >= 1 frame")
        _check("segment.bg_event", self.bg_event, BACKGROUND_EVENTS)
        object.__setattr__(self, "actions", tuple(self.actions))


@dataclasses.dataclass(frozen=True)
class Script:
    """A narrative: objects and a sequence of prompt segments (one prompt per segment)."""

    objects: tuple[ObjectSpec, ...]
    segments: tuple[Segment, ...]

    def __post_init__(self):
        object.__setattr__(self, "objects", tuple(self.objects))
        object.__setattr__(self, "segments", tuple(self.segments))
        if not 1 <= len(self.objects) <= len(OBJECT_COLOURS):
            raise SceneError(f"a script needs 1..{len(OBJECT_COLOURS)} objects, got {len(self.objects)}")
        colours = [o.colour for o in self.objects]
        if len(set(colours)) != len(colours):
            raise SceneError(f"object colours must be distinct within a script (captions and metrics name "
                             f"objects by colour), got {colours}")
        if not self.segments:
            raise SceneError("a script needs at least one segment")
        for i, seg in enumerate(self.segments):
            if len(seg.actions) != len(self.objects):
                raise SceneError(f"segment {i} has {len(seg.actions)} actions for {len(self.objects)} objects")

    @property
    def num_frames(self) -> int:
        return int(sum(s.duration for s in self.segments))

    @property
    def start_frames(self) -> tuple[int, ...]:
        """First frame of every segment (the first is 0)."""
        return tuple(int(v) for v in np.cumsum([0] + [s.duration for s in self.segments[:-1]]))

    @property
    def switch_frames(self) -> tuple[int, ...]:
        """Frames where the prompt switches (``start_frames[1:]``; reference: len = num_segments - 1)."""
        return self.start_frames[1:]


# --------------------------------------------------------------------------------------------------
# Hidden attributes, colours
# --------------------------------------------------------------------------------------------------


def sample_hidden(script: Script, seed: int) -> tuple[HiddenAttributes, ...]:
    """The hidden attributes of every object of ``script`` for the video rendered with ``seed``."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EC2E7]))
    n = len(script.objects)
    offsets = rng.integers(0, len(HUE_OFFSETS), size=n)
    patterns = rng.integers(0, len(PATTERNS), size=n)
    return tuple(HiddenAttributes(HUE_OFFSETS[int(o)], PATTERNS[int(p)]) for o, p in zip(offsets, patterns))


def object_rgb(colour: str, hue_offset: float, value: float = OBJECT_VALUE) -> tuple[int, int, int]:
    """uint8 RGB of an object colour shifted by ``hue_offset`` degrees."""
    hue = (OBJECT_HUES[OBJECT_COLOURS.index(colour)] + hue_offset) % 360.0
    r, g, b = colorsys.hsv_to_rgb(hue / 360.0, OBJECT_SATURATION, value)
    return tuple(int(round(c * 255)) for c in (r, g, b))


def texture_rgb(colour: str) -> tuple[int, int, int]:
    """RGB of the texture marks on a background colour (darker on light colours, lighter on dark ones)."""
    rgb = BACKGROUND_RGB[BACKGROUND_COLOURS.index(colour)]
    delta = -TEXTURE_DELTA if max(rgb) > 127 else TEXTURE_DELTA
    return tuple(int(np.clip(c + delta, 0, 255)) for c in rgb)


# --------------------------------------------------------------------------------------------------
# Trajectories (compiled per-frame scene state)
# --------------------------------------------------------------------------------------------------


def action_positions(action: ObjectAction, duration: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame normalised centres ``[D, 2]`` and in-scene flags ``[D]`` of one action."""
    f = np.arange(duration, dtype=np.float64)
    start = np.asarray(action.start, np.float64)
    end = np.asarray(action.end, np.float64)
    on = np.ones(duration, bool)
    if action.kind == "absent":
        return np.tile(start, (duration, 1)), np.zeros(duration, bool)
    if action.kind == "still":
        alpha = np.zeros(duration)
    elif action.kind in ("left", "right", "up", "down"):
        alpha = f / duration
    elif action.kind == "bounce":
        k = max(1, int(round(duration / BOUNCE_FRAMES)))
        pos = np.tile(start, (duration, 1))
        pos[:, 1] = start[1] - BOUNCE_HEIGHT * np.abs(np.sin(np.pi * k * f / duration))
        return pos, on
    else:  # enter / return / leave
        alpha = np.minimum(1.0, f / max(1.0, EVENT_FRAC * duration))
        if action.kind == "leave":
            on = alpha < 1.0
    pos = start[None] + (end - start)[None] * alpha[:, None]
    return pos, on


@dataclasses.dataclass(frozen=True)
class SceneState:
    """A compiled script: everything :func:`render.render` needs to draw any frame ``t``.

    Arrays: ``centre`` float64 [T, N, 2] normalised (x, y); ``in_scene`` bool [T, N]; ``background_id``,
    ``texture_id``, ``segment_id`` int32 [T]; per object ``colour_id``, ``shape_id``, ``size_id``,
    ``pattern_id`` int32 [N] and ``hue_offset`` float64 [N].
    """

    centre: np.ndarray
    in_scene: np.ndarray
    background_id: np.ndarray
    texture_id: np.ndarray
    segment_id: np.ndarray
    colour_id: np.ndarray
    shape_id: np.ndarray
    size_id: np.ndarray
    pattern_id: np.ndarray
    hue_offset: np.ndarray

    @property
    def num_frames(self) -> int:
        return int(self.centre.shape[0])

    @property
    def num_objects(self) -> int:
        return int(self.centre.shape[1])


def compile_script(script: Script, hidden: Sequence[HiddenAttributes], num_frames: int | None = None
                   ) -> SceneState:
    """Per-frame state of ``script`` (its first ``num_frames`` frames; default all of them)."""
    total = script.num_frames
    num_frames = total if num_frames is None else int(num_frames)
    if not 1 <= num_frames <= total:
        raise SceneError(f"num_frames={num_frames} must be in [1, {total}] (the script's length); "
                         f"sample a longer script or pass num_frames=None")
    if len(hidden) != len(script.objects):
        raise SceneError(f"{len(hidden)} hidden attribute sets for {len(script.objects)} objects")
    centres, ons, bg, tex, seg_id = [], [], [], [], []
    for s, seg in enumerate(script.segments):
        per_obj = [action_positions(a, seg.duration) for a in seg.actions]
        centres.append(np.stack([p for p, _ in per_obj], axis=1))  # [D, N, 2]
        ons.append(np.stack([o for _, o in per_obj], axis=1))  # [D, N]
        bg += [seg.background.colour_id] * seg.duration
        tex += [seg.background.texture_id] * seg.duration
        seg_id += [s] * seg.duration
    i32 = lambda v: np.asarray(v, np.int32)
    return SceneState(
        centre=np.concatenate(centres)[:num_frames],
        in_scene=np.concatenate(ons)[:num_frames],
        background_id=i32(bg[:num_frames]), texture_id=i32(tex[:num_frames]), segment_id=i32(seg_id[:num_frames]),
        colour_id=i32([o.colour_id for o in script.objects]), shape_id=i32([o.shape_id for o in script.objects]),
        size_id=i32([o.size_id for o in script.objects]), pattern_id=i32([h.pattern_id for h in hidden]),
        hue_offset=np.asarray([h.hue_offset for h in hidden], np.float64))


# --------------------------------------------------------------------------------------------------
# (De)serialisation
# --------------------------------------------------------------------------------------------------


def script_to_dict(script: Script) -> dict[str, Any]:
    """JSON-able dict of a script (tuples become lists)."""
    def plain(x):
        if isinstance(x, (tuple, list)):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x
    return plain(dataclasses.asdict(script))


def script_from_dict(d: Mapping[str, Any]) -> Script:
    """Inverse of :func:`script_to_dict`."""
    objects = tuple(ObjectSpec(**o) for o in d["objects"])
    segments = tuple(
        Segment(duration=int(s["duration"]), background=Background(**s["background"]),
                actions=tuple(ObjectAction(kind=a["kind"], start=tuple(a["start"]), end=tuple(a["end"]),
                                           side=a.get("side", "")) for a in s["actions"]),
                bg_event=s.get("bg_event", ""))
        for s in d["segments"])
    return Script(objects=objects, segments=segments)


def hidden_to_dicts(hidden: Sequence[HiddenAttributes]) -> list[dict[str, Any]]:
    return [dataclasses.asdict(h) for h in hidden]
