"""benchmarks/storyworld_bank_probe.py: swapping NAM's memory bank between two runs, on tiny random weights."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import storyworld_bank_probe as P
from memflow_jax import config as config_lib
from memflow_jax.nn import dit
from memflow_jax.sampling.streaming import StreamingSampler


def test_swap_bank_takes_the_bank_and_keeps_the_window():
    cfg = config_lib.load("configs/tiny.yaml", ["memory.mode=nam"])
    s = StreamingSampler(dit.init_params(cfg.model, jax.random.PRNGKey(0)), cfg.model, cfg.memory, cfg.sampler)
    base = s.init_state()

    def filled(seed):
        leaves, tree = jax.tree_util.tree_flatten(base.cache)
        keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
        new = [jax.random.normal(k, x.shape).astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.floating)
               else x + seed for k, x in zip(keys, leaves)]
        return base.replace(cache=jax.tree_util.tree_unflatten(tree, new))

    a, b = filled(1), filled(2)
    got = P.swap_bank(a, b).cache
    w = a.cache.window
    assert b.cache.bank_frame.shape[-1] > 0  # the tiny nam config has a bank
    np.testing.assert_array_equal(got.k[:, :, :w], a.cache.k[:, :, :w])
    np.testing.assert_array_equal(got.v[:, :, :w], a.cache.v[:, :, :w])
    np.testing.assert_array_equal(got.k[:, :, w:], b.cache.k[:, :, w:])
    np.testing.assert_array_equal(got.v[:, :, w:], b.cache.v[:, :, w:])
    for f in P.BANK_FIELDS:
        np.testing.assert_array_equal(getattr(got, f), getattr(b.cache, f))
    for f in ("slot_frame", "end_frame"):
        np.testing.assert_array_equal(getattr(got, f), getattr(a.cache, f))


def test_tiny_probe_changes_nothing_before_the_swap(tmp_path):
    out = tmp_path / "probe.json"
    assert P.main(["--tiny", "--min-absent", "0", "--json", str(out), "sampler.num_output_frames=24"]) == 0
    rep = json.loads(out.read_text())
    rows = rep["rows"]
    assert len(rows) == 2 and {tuple(r["seeds"]) for r in rows} == {(0, 1), (1, 0)}
    for r in rows:
        assert r["swap_chunk"] >= 1 and r["swap_video_frame"] > 0
        assert r["max_diff_before_swap"] == 0.0  # same noise and prompts: identical until the bank is swapped
        assert r["mean_diff_seed"] > 0 and np.isfinite(r["influence"]) and r["influence"] >= 0
        assert r["influence"] == pytest.approx(r["mean_diff_swap"] / r["mean_diff_seed"])
        assert r["bank_k_mean_abs_diff"] > 0  # the two runs' banks differ, so the swap is a real change
        assert {"distance_own", "distance_banks", "distance_cross", "distance_unswapped"} <= set(r)
        assert all(0.0 <= x <= 1.0 for x in r["bank_shows_object"])
    assert rep["summary"]["swaps"] == 2
    assert P.main(["--tiny", "--seeds", "3,3"]) == 2  # two different seeds needed: a clear error, no traceback


def test_summary_counts_returns_moved_toward_the_bank():
    inf = float("inf")
    rows = [{"influence": 0.1, "distance_own": 2.0, "distance_banks": 0.5, "distance_cross": 1.5},   # moved
            {"influence": 0.3, "distance_own": 0.5, "distance_banks": 2.0, "distance_cross": 1.0},   # not moved
            {"influence": 0.2, "distance_own": inf, "distance_banks": 1.0, "distance_cross": 1.0}]   # not measured
    for r, shows in zip(rows, (1.0, 0.5, 0.0)):
        r["bank_shows_object"] = [0.0, shows]
    s = P.summarise(rows)
    assert s["swaps"] == 3 and s["returns_measured"] == 2 and s["moved_toward_bank"] == 1
    assert s["influence_mean"] == pytest.approx(0.2) and (s["influence_min"], s["influence_max"]) == (0.1, 0.3)
    assert s["distance_own_mean"] == pytest.approx(1.25) and s["distance_banks_mean"] == pytest.approx(1.25)
    assert s["distance_cross_mean"] == pytest.approx(1.25)
    assert s["donor_bank_shows_object"] == pytest.approx(0.5)


def test_bank_shows_object_maps_latent_frames_to_video_frames():
    # stride 4: latent 0 -> video frame 0, latent f >= 1 -> video frames 4f-3 .. 4f
    visible = np.zeros(13, bool)
    visible[5:9] = True  # latent frame 2
    bank = jnp.array([[[2, -1]], [[1, 3]], [[-1, -1]]], jnp.int32)  # [L=3, B=1, K=2]
    state = type("S", (), {"cache": type("C", (), {"bank_frame": bank})()})()
    assert P.bank_shows_object(state, visible, 4) == pytest.approx(1 / 3)  # only layer 0 holds latent frame 2
