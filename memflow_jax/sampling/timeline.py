"""Prompt timelines: which prompt is active from which latent frame, validated before any compute.

Accepted files (``sample.py --prompts``):
* our timeline JSONL, one segment per line: ``{"prompt": "...", "start": 0.0}`` (seconds of output video) or
  ``{"prompt": "...", "start_frame": 0}`` (latent frame); the first segment starts at 0;
* the reference's interactive JSONL: one line ``{"prompts": [...]}`` (+ ``"switch_frames": [...]`` or
  ``--switch-frames``), as in ``prompts/interactive_example.jsonl``;
* a ``.txt`` file: its first non-empty line is one prompt for the whole video.
Switch points that are not on a chunk boundary are rounded UP to the next boundary with a warning: the reference
switches at the first chunk whose start frame is >= the switch index.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from typing import Sequence


class TimelineError(ValueError):
    """A prompt file or switch specification that cannot be used."""


@dataclasses.dataclass(frozen=True)
class Timeline:
    prompts: tuple[str, ...]
    switch_frames: tuple[int, ...]  # latent frames where prompts[1:] start (chunk-aligned)

    def segment_of(self, frame: int) -> int:
        return sum(1 for f in self.switch_frames if frame >= f)


def seconds_to_latent_frame(seconds: float, fps: float, temporal_stride: int = 4) -> int:
    """Output-video time -> latent frame (each latent frame after the first covers ``temporal_stride`` frames)."""
    return int(round(seconds * fps / temporal_stride))


def align_switches(frames: Sequence[int], chunk: int, num_frames: int, where: str = "timeline") -> tuple[int, ...]:
    out = []
    for f in frames:
        if f < 0:
            raise TimelineError(f"{where}: switch frame {f} is negative")
        g = int(math.ceil(f / chunk) * chunk)
        if g != f:
            warnings.warn(f"{where}: switch frame {f} is not on a chunk boundary (chunk = {chunk} latent frames); "
                          f"the prompt switches at frame {g} (the reference switches at the first chunk start >= {f})")
        out.append(g)
    for a, b in zip(out, out[1:]):
        if b <= a:
            raise TimelineError(f"{where}: switch frames {list(frames)} are not strictly increasing "
                                f"(after rounding to chunks: {out})")
    if out and (out[0] <= 0 or out[-1] >= num_frames):
        raise TimelineError(f"{where}: switch frames {out} must lie inside (0, {num_frames}) latent frames; "
                            "lengthen the video (sampler.num_output_frames) or move the switches")
    return tuple(out)


def load_timeline(path: str, *, chunk: int, num_frames: int, fps: float,
                  switch_frames: Sequence[int] | None = None) -> Timeline:
    """Parse and validate a prompt file (see module doc)."""
    if not os.path.isfile(path):
        raise TimelineError(f"{path}: no such prompt file")
    with open(path, encoding="utf-8") as f:
        lines = [(i + 1, ln.strip()) for i, ln in enumerate(f) if ln.strip()]
    if not lines:
        raise TimelineError(f"{path}: empty prompt file; give at least one prompt")
    if path.endswith(".txt"):
        return _finish([lines[0][1]], list(switch_frames or []), chunk, num_frames, path)
    segments = []
    for lineno, ln in lines:
        try:
            obj = json.loads(ln)
        except json.JSONDecodeError as e:
            raise TimelineError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise TimelineError(f"{path}:{lineno}: each line must be a JSON object")
        if "prompts" in obj:  # reference interactive format
            if len(lines) > 1:
                warnings.warn(f"{path}: {len(lines)} interactive scripts; using the first (line {lines[0][0]})")
            prompts = obj["prompts"]
            if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
                raise TimelineError(f"{path}:{lineno}: 'prompts' must be a non-empty list of strings")
            sw = obj.get("switch_frames", switch_frames)
            if sw is None:
                raise TimelineError(f"{path}:{lineno}: {len(prompts)} prompts need {len(prompts) - 1} switch frames: "
                                    "add \"switch_frames\" to the line or pass --switch-frames")
            return _finish(prompts, list(sw), chunk, num_frames, f"{path}:{lineno}")
        unknown = sorted(set(obj) - {"prompt", "start", "start_frame"})
        if unknown:
            raise TimelineError(f"{path}:{lineno}: unknown key(s) {unknown}; a segment has 'prompt' and 'start' "
                                "(seconds) or 'start_frame' (latent frame)")
        if not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
            raise TimelineError(f"{path}:{lineno}: missing or empty 'prompt'")
        if "start" in obj and "start_frame" in obj:
            raise TimelineError(f"{path}:{lineno}: give 'start' (seconds) or 'start_frame', not both")
        if "start_frame" in obj:
            start = obj["start_frame"]
            if not isinstance(start, int):
                raise TimelineError(f"{path}:{lineno}: 'start_frame' must be an integer latent frame")
        else:
            sec = obj.get("start", 0.0 if not segments else None)
            if not isinstance(sec, (int, float)):
                raise TimelineError(f"{path}:{lineno}: 'start' (seconds) is required after the first segment")
            start = seconds_to_latent_frame(float(sec), fps)
        segments.append((lineno, obj["prompt"], start))
    if segments[0][2] != 0:
        raise TimelineError(f"{path}:{segments[0][0]}: the first segment must start at 0")
    for (l0, _, a), (l1, _, b) in zip(segments, segments[1:]):
        if b <= a:
            raise TimelineError(f"{path}:{l1}: start {b} is not after the previous segment's start {a} "
                                f"(line {l0}); times must increase")
    return _finish([s[1] for s in segments], [s[2] for s in segments[1:]], chunk, num_frames, path)


def _finish(prompts: list[str], switches: list[int], chunk: int, num_frames: int, where: str) -> Timeline:
    if len(switches) != len(prompts) - 1:
        raise TimelineError(f"{where}: {len(prompts)} prompts need {len(prompts) - 1} switch frames, "
                            f"got {switches}")
    return Timeline(tuple(prompts), align_switches(switches, chunk, num_frames, where))
