"""benchmarks/storyworld_return_loss.py: teacher-forced loss on return chunks per memory mode, paired."""
from __future__ import annotations

import json
import types

import numpy as np
import pytest

from benchmarks import storyworld_return_loss as RL


def test_summarise_pairs_every_mode_with_none():
    """Region means (per story over its draws), paired differences against none story by story with their standard
    error, and the returns' / object's relative change beyond the mode's relative change on the other chunks."""
    r = np.random.default_rng(0)
    frames = np.zeros((3, 6), bool)
    frames[:, 3:] = True
    ret = np.broadcast_to(frames[:, :, None, None], (3, 6, 2, 2))
    obj = ret & (np.arange(2)[None, None, :, None] == 0)  # the first row of cells in the return frames
    regions = {"return": ret, "other": ~ret, "object": obj}
    none = r.uniform(1.0, 2.0, (3, 2, 6, 2, 2))
    nam = none.copy()
    nam[:, :, 3:] *= 0.9  # 10 % lower on the return chunks
    nam[:, :, 3:, 0] *= 0.5  # and half again on the object's cells
    nam[:, :, :3] *= 1.02  # 2 % higher elsewhere
    s = RL.summarise({"none": none, "nam": nam}, regions)
    assert set(s["none"]) == {"return_loss", "other_loss", "object_loss"}
    np.testing.assert_allclose(s["nam"]["other_loss"], nam[:, :, :3].mean(), rtol=1e-12)
    np.testing.assert_allclose(s["nam"]["object_loss"], nam[:, :, 3:, 0].mean(), rtol=1e-12)
    rv = s["nam"]["return_vs_none"]
    d = (nam[:, :, 3:].mean(axis=(2, 3, 4)) - none[:, :, 3:].mean(axis=(2, 3, 4))).mean(1)  # per story
    np.testing.assert_allclose([rv["diff"], rv["se"]], [d.mean(), d.std(ddof=1) / np.sqrt(3)], rtol=1e-12)
    assert rv["n"] == 3
    np.testing.assert_allclose(s["nam"]["object_vs_none"]["relative"], 0.45 - 1.0, rtol=1e-12)
    np.testing.assert_allclose(s["nam"]["other_vs_none"]["relative"], 0.02, rtol=1e-12)
    np.testing.assert_allclose(s["nam"]["object_gain_beyond_other"]["diff"], -0.55 - 0.02, rtol=1e-12)
    table = RL.format_table(s)
    assert "| nam | " in table and "-57.0 ± 0.0 %" in table


def test_object_cells_pool_the_object_over_its_chunk():
    """A latent cell shows the returning object if any of its pixels does in any video frame of that latent frame."""
    ids = np.zeros((9, 8, 8), np.uint8)  # 9 video frames = latent frames 0, 1, 2 at time stride 4
    ids[5, 0, 5] = 2  # object 1 in video frame 5 (latent frame 2 decodes video frames 5-8), cell (0, 1)
    ids[1, 7, 0] = 2  # object 1 in video frame 1 (latent frame 1), cell (1, 0)
    ids[6, 6, 6] = 1  # object 0: not counted
    e = types.SimpleNamespace(annotations={"id_map": ids})
    got = RL.object_cells(e, [(1, 2, 3)], 3, 4, 4)
    assert got.shape == (3, 2, 2)
    assert got[2].tolist() == [[False, True], [False, False]] and not got[:2].any()
    assert RL.object_cells(e, [(1, 1, 3)], 3, 4, 4)[1].tolist() == [[False, False], [True, False]]
    with pytest.raises(ValueError, match="latent cells of 3 px"):
        RL.object_cells(e, [(1, 2, 3)], 3, 4, 3)


def test_full_mode_is_a_whole_story_window():
    assert RL.mode_overrides("full", 36) == ["memory.mode=none", "memory.sma=false", "memory.local_attn_size=36"]
    assert RL.mode_overrides("nam+sma", 36) == ["memory.mode=nam", "memory.sma=true"]


@pytest.mark.slow
def test_tiny_run_is_paired(tmp_path):
    """Random weights: every mode's report is finite and the JSON keeps the summary and the per-story losses (one
    story: no standard error)."""
    out = tmp_path / "rl.json"
    assert RL.main(["--tiny", "--draws", "2", "--min-absent", "0", "--modes", "none,nam,full", "--json", str(out),
                    "sampler.num_output_frames=24"]) == 0
    rep = json.loads(out.read_text())
    assert rep["modes"] == ["none", "nam", "full"] and rep["draws"] == 2 and rep["random_weights"]
    for m in ("nam", "full"):
        got = rep["summary"][m]["return_vs_none"]
        assert np.isfinite(got["diff"]) and got["n"] == 1
        per = rep["per_story"][m]
        assert set(per) == set(RL.REGIONS) and {len(v) for v in per.values()} == {1}
    assert RL.main(["--tiny", "--draws", "1"]) == 2  # a clear error, no traceback
    assert RL.main(["--tiny", "--modes", "nam,bogus"]) == 2
