"""Prompt sources (random access: ``len`` + ``[i]`` -> dict of numpy/str; no grain needed).

* :class:`PromptSource` — one prompt per line (the reference's vidprom ``.txt``; ``TextDataset``):
  record ``{"prompts": str, "idx": int}`` (+ ``"extended_prompts"`` with a parallel extended file).
* :class:`SwitchPromptSource` — the reference's prompt-switch pairs (``TwoTextDataset``): line ``i`` of
  ``*_switch.txt`` is the second-segment prompt of line ``i`` of the base file; record
  ``{"prompts", "switch_prompts", "idx"}``.
* :class:`MultiPromptSource` — our JSONL ``{"prompts": [...], "switch_frames": [...]}`` (the reference's
  ``MultiTextDataset`` JSONL plus the per-line switch frames that the reference takes from the config's
  ``switch_frame_indices``): record ``{"prompts_list": [S] str, "switch_frames": [S-1] int32, "idx"}``.

Blank lines in ``.txt`` files: the reference reads every line (``rstrip()``-ed) and keeps a blank one as an
empty prompt ``""`` (trained on as such), which also keeps line ``i`` of a base file paired with line ``i``
of its ``_switch`` file. ``on_blank="keep"`` (default) does the same; ``"skip"`` drops the line (the pair),
``"error"`` raises naming ``file:line``. Blank lines in JSONL files are skipped (JSON Lines convention).
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

BLANK_POLICIES = ("keep", "skip", "error")


class DataError(ValueError):
    """A data file that does not have the expected format (the message names file and line)."""


def _read_text_lines(path: str | os.PathLike) -> list[str]:
    """Lines of a UTF-8 text file, ``rstrip()``-ed (reference: ``[line.rstrip() for line in f]``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such prompt file")
    with open(path, "rb") as f:
        data = f.read()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 ({e.reason}); save the file as UTF-8") from None
    with open(path, encoding="utf-8") as f:  # universal newlines, like the reference
        return [line.rstrip() for line in f]


def _check_policy(on_blank: str) -> None:
    if on_blank not in BLANK_POLICIES:
        raise ValueError(f"on_blank={on_blank!r} is not one of {list(BLANK_POLICIES)}")


def read_prompt_file(path: str | os.PathLike, on_blank: str = "keep") -> list[tuple[int, str]]:
    """``(line_number, prompt)`` for each prompt line of ``path`` (1-based line numbers)."""
    _check_policy(on_blank)
    out = []
    for i, text in enumerate(_read_text_lines(path), start=1):
        if not text:
            if on_blank == "error":
                raise DataError(f"{os.fspath(path)}:{i}: blank line; prompt files hold one prompt per line "
                                "(remove the line, or use on_blank='skip' / 'keep')")
            if on_blank == "skip":
                continue
        out.append((i, text))
    if not out:
        raise DataError(f"{os.fspath(path)}: no prompts in the file")
    return out


class PromptSource:
    """One prompt per line; optional parallel file of extended prompts (reference ``TextDataset``)."""

    def __init__(self, path: str | os.PathLike, extended_path: str | os.PathLike | None = None,
                 on_blank: str = "keep"):
        _check_policy(on_blank)
        self.path = os.fspath(path)
        base = _read_text_lines(path)
        ext = None
        if extended_path is not None:
            ext = _read_text_lines(extended_path)
            if len(ext) != len(base):
                raise DataError(f"{extended_path} has {len(ext)} lines but {path} has {len(base)}; the extended "
                                "prompt file must have one line per prompt")
        self.prompts: list[str] = []
        self.extended: list[str] | None = [] if ext is not None else None
        self.lines: list[int] = []
        for i, text in enumerate(base):
            if not text and on_blank != "keep":
                if on_blank == "error":
                    raise DataError(f"{self.path}:{i + 1}: blank line; prompt files hold one prompt per line")
                continue
            self.prompts.append(text)
            self.lines.append(i + 1)
            if ext is not None:
                self.extended.append(ext[i])
        if not self.prompts:
            raise DataError(f"{self.path}: no prompts in the file")

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        rec = {"prompts": self.prompts[i], "idx": np.int64(i)}
        if self.extended is not None:
            rec["extended_prompts"] = self.extended[i]
        return rec


class SwitchPromptSource:
    """Pairs line ``i`` of ``prompt_path`` with line ``i`` of ``switch_prompt_path`` (``TwoTextDataset``)."""

    def __init__(self, prompt_path: str | os.PathLike, switch_prompt_path: str | os.PathLike,
                 on_blank: str = "keep"):
        _check_policy(on_blank)
        self.path, self.switch_path = os.fspath(prompt_path), os.fspath(switch_prompt_path)
        first = _read_text_lines(prompt_path)
        second = _read_text_lines(switch_prompt_path)
        if len(first) != len(second):  # the reference asserts equal line counts
            raise DataError(f"{self.switch_path} has {len(second)} lines but {self.path} has {len(first)}: "
                            "line i of the switch file is the second prompt of line i of the base file, so "
                            "both need the same number of lines")
        self.prompts: list[str] = []
        self.switch_prompts: list[str] = []
        self.lines: list[int] = []
        for i, (a, b) in enumerate(zip(first, second)):
            if (not a or not b) and on_blank != "keep":
                if on_blank == "error":
                    where = self.path if not a else self.switch_path
                    raise DataError(f"{where}:{i + 1}: blank line; every line needs a prompt (the two files "
                                    "are paired line by line)")
                continue
            self.prompts.append(a)
            self.switch_prompts.append(b)
            self.lines.append(i + 1)
        if not self.prompts:
            raise DataError(f"{self.path}: no prompt pairs in the files")

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"prompts": self.prompts[i], "switch_prompts": self.switch_prompts[i], "idx": np.int64(i)}


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_jsonl(path: str | os.PathLike) -> list[tuple[int, dict[str, Any]]]:
    """``(line_number, object)`` per non-blank line; invalid JSON / non-object lines raise with file:line."""
    path = os.fspath(path)
    out = []
    for i, text in enumerate(_read_text_lines(path), start=1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{i}: expected a JSON object like "
                            '{"prompts": [...], "switch_frames": [...]}, got ' + type(obj).__name__)
        out.append((i, obj))
    if not out:
        raise DataError(f"{path}: no records in the file")
    return out


def check_prompt_list(value: Any, where: str, field: str = "prompts") -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(p, str) for p in value):
        raise DataError(f"{where}: '{field}' must be a non-empty list of strings, got {value!r:.80}")
    return value


def check_switch_frames(frames: Any, num_prompts: int, where: str, num_frames: int | None = None,
                        chunk_frames: int | None = None) -> list[int]:
    """Validate one record's switch frames (latent-frame indices where prompt k+1 starts)."""
    if not isinstance(frames, list) or not all(_is_int(f) for f in frames):
        raise DataError(f"{where}: 'switch_frames' must be a list of integers, got {frames!r:.80}")
    if len(frames) != num_prompts - 1:
        raise DataError(f"{where}: {num_prompts} prompts need {num_prompts - 1} switch frames, got {len(frames)}")
    if frames and frames[0] <= 0:
        raise DataError(f"{where}: switch frame {frames[0]} must be > 0 (frame 0 always uses the first prompt)")
    for a, b in zip(frames, frames[1:]):
        if b <= a:
            raise DataError(f"{where}: switch_frames {frames} must be strictly increasing ({a} then {b})")
    if num_frames is not None and frames and frames[-1] >= num_frames:
        raise DataError(f"{where}: switch frame {frames[-1]} is past the last frame ({num_frames} frames)")
    if chunk_frames is not None:
        odd = [f for f in frames if f % chunk_frames]
        if odd:
            raise DataError(f"{where}: switch frames {odd} are not multiples of the chunk size {chunk_frames} "
                            "(a switch takes effect at a chunk start)")
    return frames


class MultiPromptSource:
    """JSONL multi-prompt records ``{"prompts": [p0, ..., pS-1], "switch_frames": [f1, ..., fS-1]}``.

    Switch frames are latent-frame indices, strictly increasing and > 0. ``num_frames`` bounds them;
    ``chunk_frames`` additionally requires chunk alignment (off by default: the reference's interactive
    pipeline accepts any frame and switches at the first chunk starting at or after it).
    ``default_switch_frames`` fills lines without the key (the reference's JSONL has only ``prompts`` and
    takes ``switch_frame_indices`` from the config). As in the reference, every line needs the same number of
    prompts (so records batch).
    """

    def __init__(self, path: str | os.PathLike, num_frames: int | None = None, chunk_frames: int | None = None,
                 default_switch_frames: Sequence[int] | None = None):
        self.path = os.fspath(path)
        self.prompts: list[list[str]] = []
        self.switch_frames: list[list[int]] = []
        self.lines: list[int] = []
        first_line = None
        for line, obj in parse_jsonl(self.path):
            where = f"{self.path}:{line}"
            if "prompts" not in obj:
                raise DataError(f"{where}: missing key 'prompts' (keys: {sorted(obj)})")
            prompts = check_prompt_list(obj["prompts"], where)
            if "switch_frames" in obj:
                frames = obj["switch_frames"]
            elif default_switch_frames is not None:
                frames = list(default_switch_frames)
            else:
                raise DataError(f"{where}: missing key 'switch_frames' (one latent-frame index per prompt change); "
                                "add it, or pass default_switch_frames")
            frames = check_switch_frames(frames, len(prompts), where, num_frames, chunk_frames)
            if self.prompts and len(prompts) != len(self.prompts[0]):
                raise DataError(f"{where}: {len(prompts)} prompts, but line {first_line} has "
                                f"{len(self.prompts[0])}; every line needs the same number of segments")
            first_line = first_line or line
            self.prompts.append(prompts)
            self.switch_frames.append(frames)
            self.lines.append(line)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"prompts_list": np.asarray(self.prompts[i]),
                "switch_frames": np.asarray(self.switch_frames[i], dtype=np.int32).reshape(-1),
                "idx": np.int64(i)}


def all_prompts(path: str | os.PathLike, on_blank: str = "keep") -> list[str]:
    """Every prompt of a ``.txt`` (one per line) or ``.jsonl`` (``prompts`` lists) file, in file order."""
    path = os.fspath(path)
    if path.endswith(".jsonl"):
        out = []
        for line, obj in parse_jsonl(path):
            if "prompts" not in obj:
                raise DataError(f"{path}:{line}: missing key 'prompts' (keys: {sorted(obj)})")
            out.extend(check_prompt_list(obj["prompts"], f"{path}:{line}"))
        return out
    return [p for _, p in read_prompt_file(path, on_blank)]
