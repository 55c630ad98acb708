"""Prompt timeline parsing and validation (sample.py --prompts)."""
from __future__ import annotations

import json

import pytest

from memflow_jax.sampling.timeline import TimelineError, load_timeline


def _write(tmp_path, name, lines):
    p = tmp_path / name
    p.write_text("\n".join(json.dumps(x) if not isinstance(x, str) else x for x in lines) + "\n")
    return str(p)


def test_timeline_seconds_and_frames(tmp_path):
    p = _write(tmp_path, "t.jsonl", [{"prompt": "a", "start": 0}, {"prompt": "b", "start": 3.0},
                                     {"prompt": "c", "start_frame": 30}])
    tl = load_timeline(p, chunk=3, num_frames=60, fps=16)
    assert tl.prompts == ("a", "b", "c") and tl.switch_frames == (12, 30)  # 3 s * 16 fps / 4 = 12
    assert tl.segment_of(0) == 0 and tl.segment_of(12) == 1 and tl.segment_of(59) == 2


def test_reference_interactive_format_rounds_with_warning(tmp_path):
    p = _write(tmp_path, "i.jsonl", [{"prompts": ["a", "b", "c"]}])
    with pytest.warns(UserWarning, match="chunk boundary"):
        tl = load_timeline(p, chunk=3, num_frames=120, fps=16, switch_frames=[40, 80])
    assert tl.switch_frames == (42, 81)


@pytest.mark.parametrize("lines,match", [
    ([], "empty prompt file"),
    (["{not json"], ":1: not valid JSON"),
    ([{"prompt": "a", "start": 1.0}], "first segment must start at 0"),
    ([{"prompt": "a"}, {"prompt": "b", "start": 2.0}, {"prompt": "c", "start": 1.0}], ":3: start"),
    ([{"prompt": "a", "speed": 2}], "unknown key"),
    ([{"prompt": ""}], "empty 'prompt'"),
    ([{"prompts": ["a", "b"]}], "switch frames"),
    ([{"prompt": "a"}, {"prompt": "b", "start_frame": 99}], "inside"),
])
def test_bad_timelines(tmp_path, lines, match):
    p = _write(tmp_path, "bad.jsonl", lines)
    with pytest.raises(TimelineError, match=match):
        load_timeline(p, chunk=3, num_frames=60, fps=16)


def test_txt_prompt(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("\n a fox in snow \n")
    assert load_timeline(str(p), chunk=3, num_frames=6, fps=16).prompts == ("a fox in snow",)
