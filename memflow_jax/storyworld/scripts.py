"""Samplers of storyworld narratives (multi-prompt scripts) and single-prompt clips.

:func:`sample_script` builds 3-6 prompt segments in the style of an interactive long-video benchmark: one
"memory" object is on screen from the start, leaves in a later segment and comes back in a later one still;
the background may change and later change back; other objects may enter mid-story. :func:`sample_clip`
gives one-prompt clips (motions, sometimes an enter or a leave) for teacher training.
:func:`sample_aligned_script` gives scripts whose segment boundaries fall on a streaming model's chunk boundaries
(the held-out evaluation's scripts and the ``stories`` datasets of teacher-forced story training).

Layout: objects live on horizontal lanes (distinct rows), enter / leave / come back along their lane, and
move by at least ``MIN_MOVE`` when they move. Vertical motions that would make two objects overlap are
re-drawn (best effort; the renderer's ``visible_fraction`` reports any overlap that remains).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from memflow_jax.storyworld import scene as S

MIN_MOVE = 0.15  # normalised distance of a move
MAX_MOVE = 0.45
OVERLAP_GAP = 0.02  # normalised clearance kept between objects' boxes
_MOTION_WEIGHTS = {"left": 1.0, "right": 1.0, "up": 0.6, "down": 0.6, "still": 0.5, "bounce": 0.6}
_MAX_RETRIES = 60
_MAX_ABSENT_TRIES = 2000  # draws of sample_aligned_script(min_absent=...) before it gives up


def _lanes(n: int) -> list[float]:
    if n == 1:
        return [0.5]
    return list(np.linspace(S.INNER_LO, S.INNER_HI, n)) if n > 2 else [0.3, 0.7]


def _offscreen_x(side: str) -> float:
    return S.OFFSCREEN_LO if side == "left" else S.OFFSCREEN_HI


def _sample_objects(rng: np.random.Generator, n: int) -> tuple[S.ObjectSpec, ...]:
    colours = rng.choice(len(S.OBJECT_COLOURS), size=n, replace=False)
    shapes = rng.integers(0, len(S.SHAPES), size=n)
    sizes = rng.integers(0, len(S.SIZES), size=n)
    return tuple(S.ObjectSpec(S.SHAPES[int(sh)], S.OBJECT_COLOURS[int(c)], S.SIZES[int(sz)])
                 for c, sh, sz in zip(colours, shapes, sizes))


def _motion(rng: np.random.Generator, pos: tuple[float, float]) -> S.ObjectAction:
    """A random feasible motion from ``pos`` that keeps the object fully inside the frame."""
    x, y = pos
    room = {"left": x - S.INNER_LO, "right": S.INNER_HI - x, "up": y - S.INNER_LO, "down": S.INNER_HI - y}
    options = [k for k in _MOTION_WEIGHTS
               if k == "still" or (k == "bounce" and y - S.BOUNCE_HEIGHT >= S.INNER_LO - 1e-9)
               or (k in room and room[k] >= MIN_MOVE)]
    w = np.asarray([_MOTION_WEIGHTS[k] for k in options])
    kind = options[int(rng.choice(len(options), p=w / w.sum()))]
    if kind in room:
        dist = float(rng.uniform(MIN_MOVE, min(MAX_MOVE, room[kind])))
        dx, dy = {"left": (-dist, 0.0), "right": (dist, 0.0), "up": (0.0, -dist), "down": (0.0, dist)}[kind]
        return S.ObjectAction(kind, pos, (x + dx, y + dy))
    return S.ObjectAction(kind, pos, pos)


def _overlaps(objects, actions, duration: int) -> int:
    """Frames x pairs where two in-scene objects' boxes (square frame assumed) come closer than OVERLAP_GAP."""
    traj = [S.action_positions(a, duration) for a in actions]
    half = [S.SIZE_FRACTION[o.size_id] / 2 for o in objects]
    count = 0
    for i in range(len(objects)):
        for j in range(i + 1, len(objects)):
            (pi, oi), (pj, oj) = traj[i], traj[j]
            both = oi & oj
            if not both.any():
                continue
            lim = half[i] + half[j] + OVERLAP_GAP
            d = np.abs(pi[both] - pj[both])
            count += int(np.sum((d[:, 0] < lim) & (d[:, 1] < lim)))
    return count


def _durations(rng: np.random.Generator, n: int, segment_frames: tuple[int, int], num_frames: int | None,
               frame_multiple: int) -> list[int]:
    lo, hi = segment_frames
    if frame_multiple < 1 or lo < 1 or hi < lo:
        raise ValueError(f"segment_frames={segment_frames} must satisfy 1 <= lo <= hi and frame_multiple="
                         f"{frame_multiple} must be >= 1")
    if num_frames is None:
        choices = [d for d in range(lo, hi + 1) if d % frame_multiple == 0]
        if not choices:
            raise ValueError(f"no duration in segment_frames={segment_frames} is a multiple of {frame_multiple}")
        return [int(v) for v in rng.choice(choices, size=n)]
    units, unit_lo = num_frames // frame_multiple, -(-lo // frame_multiple)
    if num_frames % frame_multiple or units < n * unit_lo:
        raise ValueError(f"num_frames={num_frames} cannot be split into {n} segments of >= {lo} frames that are "
                         f"multiples of {frame_multiple}; raise num_frames or lower segment_frames[0]")
    extra = rng.multinomial(units - n * unit_lo, np.full(n, 1.0 / n))
    return [int((unit_lo + e) * frame_multiple) for e in extra]


def _event_action(rng, event: str, side: str, pos: tuple[float, float], lane: float, attempt: int
                  ) -> S.ObjectAction:
    """An enter / leave / return along ``lane`` (first attempt) or a random row (later attempts)."""
    if attempt >= _MAX_RETRIES // 2:  # the planned side is only a preference
        side = S.SIDES[int(rng.integers(0, 2))]
    if event == "leave":
        return S.ObjectAction("leave", pos, (_offscreen_x(side), pos[1]), side)
    y = lane if attempt == 0 else float(rng.uniform(S.INNER_LO, S.INNER_HI))
    return S.ObjectAction(event, (_offscreen_x(side), y), (float(rng.uniform(0.25, 0.75)), y), side)


def _build_segments(rng, objects, durations, lanes, plan, backgrounds, bg_events):
    """Simulate positions segment by segment. ``plan[s][k]``: "" (free motion), "absent" or (event, side)."""
    n = len(objects)
    pos = [(float(rng.uniform(0.3, 0.7)), lanes[k]) for k in range(n)]
    segments = []
    for s, dur in enumerate(durations):
        best, best_count = None, None
        for attempt in range(_MAX_RETRIES):
            actions = []
            for k in range(n):
                p = plan[s][k]
                if p == "absent":
                    actions.append(S.ObjectAction("absent", pos[k], pos[k]))
                elif p == "":
                    actions.append(_motion(rng, pos[k]) if attempt < _MAX_RETRIES // 2 or attempt % 2 == 0
                                   else S.ObjectAction("still", pos[k], pos[k]))
                else:
                    actions.append(_event_action(rng, p[0], p[1], pos[k], lanes[k], attempt))
            actions = tuple(actions)
            count = _overlaps(objects, actions, dur)
            if best_count is None or count < best_count:
                best, best_count = actions, count
            if count == 0:
                break
        actions = best  # the first overlap-free attempt, else the one with the least overlap
        segments.append(S.Segment(dur, backgrounds[s], actions, bg_events[s]))
        pos = [a.end for a in actions]
    return tuple(segments)


def script_overlap(script: S.Script) -> int:
    """Frames x object pairs whose boxes come closer than OVERLAP_GAP (square frame assumed; 0 = none)."""
    return sum(_overlaps(script.objects, seg.actions, seg.duration) for seg in script.segments)


def _least_overlap(sample, tries: int = 8) -> S.Script:
    best, best_count = None, None
    for _ in range(tries):
        script = sample()
        count = script_overlap(script)
        if best_count is None or count < best_count:
            best, best_count = script, count
        if count == 0:
            break
    return best


def sample_script(rng: np.random.Generator, *, num_segments: int | None = None, num_objects: int | None = None,
                  max_objects: int = 3, segment_frames: tuple[int, int] = (16, 32), num_frames: int | None = None,
                  frame_multiple: int = 1, p_background_change: float = 0.6, p_enter: float = 0.35,
                  p_late_memory: float = 0.0) -> S.Script:
    """A 3-6 segment narrative in which one object leaves and later comes back.

    Args:
      rng: numpy Generator (the only source of randomness).
      num_segments: 3..6 (default: uniform in 3..6).
      num_objects / max_objects: objects in the story (default: uniform in 1..max_objects).
      segment_frames: (min, max) frames of a segment; num_frames: if given, the total length, split randomly
        into segments of >= min frames (max is then not enforced), so every script of a dataset has one length.
      frame_multiple: every segment length is a multiple of this (e.g. a latent-chunk size).
      p_background_change: probability that the background changes and later changes back (needs 4+ segments
        for the change to last a segment; with 3 it changes in segment 1 and reverts in 2).
      p_enter: probability that each non-memory object enters mid-story instead of being there from the start.
      p_late_memory: probability (4+ segments) that the object that leaves and comes back is absent at the start
        and enters in a later segment, so a frame sink (the first chunk) never shows it: only a memory that
        keeps later frames (NAM's bank) has its look when it returns. 0 draws nothing (the streams of scripts
        sampled before the option existed are unchanged).
    """
    if not 0.0 <= p_late_memory <= 1.0:
        raise ValueError(f"p_late_memory={p_late_memory} must be in [0, 1]")
    kw = dict(num_segments=num_segments, num_objects=num_objects, max_objects=max_objects,
              segment_frames=segment_frames, num_frames=num_frames, frame_multiple=frame_multiple,
              p_background_change=p_background_change, p_enter=p_enter, p_late_memory=p_late_memory)
    return _least_overlap(lambda: _sample_script_once(rng, **kw))


def _sample_script_once(rng, *, num_segments, num_objects, max_objects, segment_frames, num_frames,
                        frame_multiple, p_background_change, p_enter, p_late_memory) -> S.Script:
    n_seg = int(rng.integers(3, 7)) if num_segments is None else int(num_segments)
    if not 3 <= n_seg <= 6:
        raise ValueError(f"num_segments={n_seg} must be in 3..6 (a leave and a later return need >= 3)")
    if not 1 <= max_objects <= 3:
        raise ValueError(f"max_objects={max_objects} must be in 1..3 (lanes of a 64-pixel frame)")
    n_obj = int(rng.integers(1, max_objects + 1)) if num_objects is None else int(num_objects)
    if not 1 <= n_obj <= 3:
        raise ValueError(f"num_objects={n_obj} must be in 1..3")
    durations = _durations(rng, n_seg, segment_frames, num_frames, frame_multiple)
    objects = _sample_objects(rng, n_obj)
    lanes = [float(v) for v in rng.permutation(_lanes(n_obj))]

    plan: list[list] = [[""] * n_obj for _ in range(n_seg)]
    mem = int(rng.integers(0, n_obj))  # the object that leaves and comes back
    late = p_late_memory > 0 and n_seg >= 4 and rng.random() < p_late_memory
    first = 0  # the memory object's first segment on screen
    if late:  # absent until it enters in segment `first`, then on screen for at least a segment before leaving
        first = int(rng.integers(1, n_seg - 2))
        for s in range(first):
            plan[s][mem] = "absent"
        plan[first][mem] = ("enter", S.SIDES[int(rng.integers(0, 2))])
    leave = int(rng.integers(first + 1, n_seg - 1))
    ret = int(rng.integers(leave + 1, n_seg))
    plan[leave][mem] = ("leave", S.SIDES[int(rng.integers(0, 2))])
    for s in range(leave + 1, ret):
        plan[s][mem] = "absent"
    plan[ret][mem] = ("return", S.SIDES[int(rng.integers(0, 2))])
    for k in range(n_obj):
        if k != mem and rng.random() < p_enter:
            enter = int(rng.integers(1, n_seg))
            for s in range(enter):
                plan[s][k] = "absent"
            plan[enter][k] = ("enter", S.SIDES[int(rng.integers(0, 2))])

    base = S.Background(S.BACKGROUND_COLOURS[int(rng.integers(0, len(S.BACKGROUND_COLOURS)))],
                        S.TEXTURES[int(rng.integers(0, len(S.TEXTURES)))])
    backgrounds, bg_events = [base] * n_seg, [""] * n_seg
    if rng.random() < p_background_change:
        change = int(rng.integers(1, n_seg - 1))
        revert = int(rng.integers(change + 1, n_seg))
        other = [c for c in S.BACKGROUND_COLOURS if c != base.colour]
        new = S.Background(other[int(rng.integers(0, len(other)))], base.texture)
        for s in range(change, revert):
            backgrounds[s] = new
        bg_events[change], bg_events[revert] = "change", "revert"
    segments = _build_segments(rng, objects, durations, lanes, plan, backgrounds, bg_events)
    return S.Script(objects, segments)


def sample_clip(rng: np.random.Generator, *, num_frames: int = 32, num_objects: int | None = None,
                max_objects: int = 3, p_event: float = 0.3) -> S.Script:
    """A single-prompt clip (one segment): objects move; with probability ``p_event`` one enters or leaves."""
    if num_frames < 1:
        raise ValueError(f"num_frames={num_frames} must be >= 1")
    return _least_overlap(lambda: _sample_clip_once(rng, num_frames, num_objects, max_objects, p_event))


def _sample_clip_once(rng, num_frames, num_objects, max_objects, p_event) -> S.Script:
    n_obj = int(rng.integers(1, max_objects + 1)) if num_objects is None else int(num_objects)
    if not 1 <= n_obj <= 3:
        raise ValueError(f"num_objects={n_obj} must be in 1..3")
    objects = _sample_objects(rng, n_obj)
    lanes = [float(v) for v in rng.permutation(_lanes(n_obj))]
    plan: list[list] = [[""] * n_obj]
    if rng.random() < p_event:
        k = int(rng.integers(0, n_obj))
        plan[0][k] = (("enter", "leave")[int(rng.integers(0, 2))], S.SIDES[int(rng.integers(0, 2))])
    bg = S.Background(S.BACKGROUND_COLOURS[int(rng.integers(0, len(S.BACKGROUND_COLOURS)))],
                      S.TEXTURES[int(rng.integers(0, len(S.TEXTURES)))])
    segments = _build_segments(rng, objects, [int(num_frames)], lanes, plan, [bg], [""])
    return S.Script(objects, segments)


def returning_objects(script: S.Script) -> list[tuple[int, int, int]]:
    """``(object, leave_segment, return_segment)`` for every leave that is followed by a return."""
    out = []
    for k in range(len(script.objects)):
        left_at = None
        for s, seg in enumerate(script.segments):
            kind = seg.actions[k].kind
            if kind == "leave":
                left_at = s
            elif kind == "return" and left_at is not None:
                out.append((k, left_at, s))
                left_at = None
    return out


def returns_after_the_start(script: S.Script) -> bool:
    """Every returning object is absent in the first segment (it enters later): a frame sink never shows it."""
    rets = returning_objects(script)
    return bool(rets) and all(script.segments[0].actions[k].kind == "absent" for k, _, _ in rets)


def absent_latent_frames(script: S.Script, obj: int, t_stride: int) -> int:
    """Latent frames of the segments in which returning object ``obj`` is absent between its (first) exit and its
    return: how long it is off screen before it comes back (0 if it never leaves and returns)."""
    for k, leave, ret in returning_objects(script):
        if k == obj:
            return _absent_between(script, leave, ret, t_stride)
    return 0


def _absent_between(script: S.Script, leave: int, ret: int, t_stride: int) -> int:
    return sum(script.segments[s].duration for s in range(leave + 1, ret)) // t_stride


def returns_absent_at_least(script: S.Script, t_stride: int, min_absent: int) -> bool:
    """An object leaves and returns, and every returning object is off screen >= ``min_absent`` latent frames
    (:func:`absent_latent_frames`): a local window of that many frames no longer shows it when it comes back."""
    rets = returning_objects(script)
    return bool(rets) and min(absent_latent_frames(script, k, t_stride) for k, _, _ in rets) >= min_absent


# --------------------------------------------------------------------------------------------------
# Latent <-> video frame alignment and chunk-aligned scripts
# --------------------------------------------------------------------------------------------------
# A causal video VAE of temporal stride s decodes latent frame 0 to 1 video frame and each later latent frame to
# s, so n latent frames are 1 + s(n - 1) video frames and latent frame L > 0 starts at video frame sL - (s - 1).


def video_frames(num_latent: int, t_stride: int) -> int:
    """Video frames decoded from ``num_latent`` latent frames: ``1 + s(n - 1)``."""
    if num_latent < 1 or t_stride < 1:
        raise ValueError(f"num_latent={num_latent} and t_stride={t_stride} must be >= 1")
    return 1 + t_stride * (num_latent - 1)


def latent_to_video_start(latent_frame: int, t_stride: int) -> int:
    """First video frame decoded from latent frame ``L``: 0 for L = 0, else ``sL - (s - 1)``."""
    return 0 if latent_frame == 0 else t_stride * latent_frame - (t_stride - 1)


def video_to_latent_start(video_frame: int, t_stride: int) -> int:
    """Inverse of :func:`latent_to_video_start` (raises for a frame that starts no latent frame)."""
    if video_frame == 0:
        return 0
    latent, rem = divmod(video_frame + t_stride - 1, t_stride)
    if rem or latent < 1:
        raise ValueError(f"video frame {video_frame} is not the first frame of a latent frame (stride {t_stride})")
    return latent


def sample_aligned_script(rng: np.random.Generator, *, num_latent: int, chunk: int, t_stride: int,
                          max_objects: int = 3, p_late_memory: float = 0.0, min_absent: int = 0) -> S.Script:
    """A 3..min(6, chunks) segment narrative (:func:`sample_script`) whose segment boundaries fall on the chunk
    boundaries of a model making ``num_latent`` latent frames in chunks of ``chunk``: segment lengths
    ``k * s * c`` video frames except the first, ``k * s * c - (s - 1)``; total ``video_frames(num_latent, s)``.
    ``p_late_memory``: as :func:`sample_script`'s. ``min_absent > 0``: re-drawn (from ``rng``) until every
    returning object is off screen for at least that many latent frames (:func:`returns_absent_at_least`); 0
    draws once (the same script as
    before this option existed)."""
    if num_latent % chunk:
        raise ValueError(f"num_latent={num_latent} is not a multiple of the chunk size {chunk}")
    n_chunks = num_latent // chunk
    if n_chunks < 3:
        raise ValueError(f"{n_chunks} chunks ({num_latent} latent frames) cannot hold 3 segments (a leave and a "
                         f"later return); give >= 3 chunks")
    if min_absent < 0:
        raise ValueError(f"min_absent={min_absent} must be >= 0 (latent frames off screen; 0 = any return)")
    if min_absent > num_latent - 3 * chunk:
        raise ValueError(f"min_absent={min_absent}: a story of {num_latent} latent frames keeps >= {3 * chunk} for "
                         f"the segments before and after the gap, so at most {num_latent - 3 * chunk} can be absent")
    for _ in range(_MAX_ABSENT_TRIES):
        script = _aligned_once(rng, n_chunks, chunk, t_stride, num_latent, max_objects, p_late_memory)
        if not min_absent or returns_absent_at_least(script, t_stride, min_absent):
            return script
    raise ValueError(f"no story of {num_latent} latent frames with every return >= {min_absent} latent frames off "
                     f"screen in {_MAX_ABSENT_TRIES} draws; lower min_absent or use more chunks")


def _aligned_once(rng, n_chunks: int, chunk: int, t_stride: int, num_latent: int, max_objects: int,
                  p_late_memory: float) -> S.Script:
    unit = t_stride * chunk  # video frames of a chunk after the first
    n_seg = int(rng.integers(3, min(6, n_chunks) + 1))
    script = sample_script(rng, num_segments=n_seg, max_objects=max_objects, segment_frames=(unit, unit),
                           num_frames=t_stride * num_latent, frame_multiple=unit, p_late_memory=p_late_memory)
    segs = list(script.segments)
    segs[0] = dataclasses.replace(segs[0], duration=segs[0].duration - (t_stride - 1))
    return S.Script(script.objects, tuple(segs))


def latent_returns(script: S.Script, t_stride: int, chunk: int) -> tuple[tuple[int, int, int], ...]:
    """``(object, latent frame where its return segment starts, latent frames it was off screen)`` for every
    return of a chunk-aligned script (:func:`returning_objects`, :func:`absent_latent_frames`)."""
    starts = (0,) + latent_switches(script, t_stride, chunk)
    out = []
    for k, leave, ret in returning_objects(script):
        out.append((int(k), int(starts[ret]), _absent_between(script, leave, ret, t_stride)))
    return tuple(out)


def latent_switches(script: S.Script, t_stride: int, chunk: int) -> tuple[int, ...]:
    """The latent frames where the script's segments 2.. start (checked to be chunk boundaries)."""
    out = tuple(video_to_latent_start(v, t_stride) for v in script.switch_frames)
    bad = [f for f in out if f % chunk]
    if bad:
        raise ValueError(f"switches at latent frames {bad} are not chunk boundaries (chunk {chunk})")
    return out
