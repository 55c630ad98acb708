"""benchmarks/storyworld_return_loss.py: teacher-forced loss on return chunks per memory mode, paired."""
from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import storyworld_return_loss as RL


def test_summarise_pairs_every_mode_with_none():
    """Return / elsewhere means over the mask, paired differences against none story by story with their standard
    error, and the returns' relative gain beyond the mode's relative change elsewhere."""
    r = np.random.default_rng(0)
    masks = np.zeros((3, 6), np.float32)
    masks[:, 3:] = 1.0
    none = r.uniform(1.0, 2.0, (3, 2, 6))
    nam = none.copy()
    nam[..., 3:] *= 0.9  # 10 % lower on the return chunks
    nam[..., :3] *= 1.02  # 2 % higher elsewhere
    s = RL.summarise({"none": none, "nam": nam}, masks)
    assert set(s["none"]) == {"return_loss", "other_loss"}
    np.testing.assert_allclose(s["nam"]["return_loss"], nam[..., 3:].mean(), rtol=1e-12)
    np.testing.assert_allclose(s["nam"]["other_loss"], nam[..., :3].mean(), rtol=1e-12)
    rv = s["nam"]["return_vs_none"]
    d = (nam[..., 3:].mean(-1) - none[..., 3:].mean(-1)).mean(1)  # per story, over its draws
    np.testing.assert_allclose([rv["diff"], rv["se"]], [d.mean(), d.std(ddof=1) / np.sqrt(3)], rtol=1e-12)
    assert rv["n"] == 3
    np.testing.assert_allclose(rv["relative"], -0.1, rtol=1e-12)
    np.testing.assert_allclose(s["nam"]["other_vs_none"]["relative"], 0.02, rtol=1e-12)
    np.testing.assert_allclose(s["nam"]["return_gain_beyond_other"]["diff"], -0.12, rtol=1e-12)
    assert "| nam | " in RL.format_table(s) and "-12.0 ± 0.0 %" in RL.format_table(s)


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
        assert len(rep["per_story"][m]["return"]) == 1
    assert RL.main(["--tiny", "--draws", "1"]) == 2  # a clear error, no traceback
    assert RL.main(["--tiny", "--modes", "nam,bogus"]) == 2
