"""Pooling storyworld_eval reports over disjoint seeds: counts add, rates and the memory share follow their stated
formulas, and reports that cannot be pooled are refused by name."""
from __future__ import annotations

import gzip
import json
import math

import pytest

from benchmarks import storyworld_pool as P

SPLIT = {"split_seed": 0, "late_memory": True, "min_absent": 9}
SETUP = {"num_scripts": 8, "num_latent_frames": 36, "chunk_frames": 3, "height": 64, "width": 64,
         "modes": ["none", "nam"]}


def _mode(adh, own, cross, looks=None):
    s = {"adherence": {"per_seed": list(adh)},
         "returns": {"events": 16 * len(adh), "measured": own[0], "passed": own[1]},
         "returns_cross_seed": {"own": {"measured": own[0], "passed": own[1], "rate": own[1] / own[0]},
                                "cross": {"pairs": cross[0], "passed": cross[1], "rate": cross[1] / cross[0]}}}
    if looks is not None:
        s["first_looks"] = {"seed_pairs": looks[0], "same_look_rate": looks[1]}
    return s


def _report(seeds, adh, own, cross, looks=None, split=None, **setup):
    return {"split": dict(split or SPLIT), "setup": {**SETUP, **setup, "seeds": list(seeds), "ckpt": "pkg"},
            "summary": {"none": _mode(adh, own, cross, looks), "nam": _mode(adh, own, cross, looks)}}


def test_pool_adds_counts_and_states_its_formulas():
    a = _report([0, 1], [0.8, 0.9], own=(10, 5), cross=(20, 4), looks=(10, 0.5))
    b = _report([2, 3, 4], [0.7, 0.8, 0.9], own=(30, 21), cross=(60, 30))  # a report without first looks
    got = P.pool([a, b])
    assert got["seeds"] == [0, 1, 2, 3, 4] and list(got["summary"]) == ["none", "nam"]
    s = got["summary"]["nam"]
    adh = [0.8, 0.9, 0.7, 0.8, 0.9]
    mean = sum(adh) / 5
    assert s["adherence"]["mean"] == pytest.approx(mean) and s["adherence"]["n_seeds"] == 5
    assert s["adherence"]["std"] == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in adh) / 4))
    assert s["returns"] == {"events": 80, "measured": 40, "passed": 26}
    own, cross = s["returns_cross_seed"]["own"], s["returns_cross_seed"]["cross"]
    assert (own["measured"], own["passed"], cross["pairs"], cross["passed"]) == (40, 26, 80, 34)
    p, q = 26 / 40, 34 / 80
    assert s["memory_share"]["own_minus_other"] == pytest.approx(p - q)
    assert s["memory_share"]["se"] == pytest.approx(math.sqrt((p * (1 - p) + q * (1 - q)) / 40))
    assert s["first_looks"] == {"seed_pairs": 10, "same_look_rate": 0.5, "reports": 1}
    assert [i["seeds"] for i in got["inputs"]] == [[0, 1], [2, 3, 4]]
    table = P.format_table(got)
    row = ("| nam | 0.820 ± 0.084 (5 seeds) | 40 / 26 of 80 | 0.65 vs 0.42 (80 pairs) | +0.23 ± 0.11 "
           "| 0.50 (10 pairs) |")
    assert row in table


def test_pool_refuses_what_cannot_be_pooled():
    a = _report([0, 1], [0.8, 0.9], own=(10, 5), cross=(20, 4))
    with pytest.raises(P.PoolError, match="seed 1 is in both"):
        P.pool([a, _report([1, 2], [0.8, 0.9], own=(10, 5), cross=(20, 4))], ["a", "b"])
    with pytest.raises(P.PoolError, match="held-out split differs from a's: late_memory=False vs True"):
        P.pool([a, _report([2, 3], [0.8, 0.8], own=(1, 1), cross=(1, 1), split={**SPLIT, "late_memory": False})],
               ["a", "b"])
    with pytest.raises(P.PoolError, match="setup num_scripts=16 differs"):
        P.pool([a, _report([2, 3], [0.8, 0.8], own=(1, 1), cross=(1, 1), num_scripts=16)], ["a", "b"])
    with pytest.raises(P.PoolError, match="b: one seed; .* each report needs >= 2 seeds"):
        P.pool([a, _report([2], [0.8], own=(1, 1), cross=(1, 1))], ["a", "b"])
    with pytest.raises(P.PoolError, match="no reports"):
        P.pool([])


def test_cli_reads_gzip_writes_json_and_names_bad_files(tmp_path, capsys):
    a = tmp_path / "a.json.gz"
    with gzip.open(a, "wt") as f:
        json.dump(_report([0, 1], [0.8, 0.9], own=(10, 5), cross=(20, 4)), f)
    b = tmp_path / "b.json"
    b.write_text(json.dumps(_report([2, 3], [0.7, 0.8], own=(10, 6), cross=(20, 6))))
    out = tmp_path / "pooled.json"
    assert P.main([str(a), str(b), "--json", str(out), "--label", "m"]) == 0
    assert "8 held-out scripts x 4 seeds" in capsys.readouterr().out
    pooled = json.loads(out.read_text())
    assert pooled["label"] == "m" and pooled["summary"]["none"]["returns_cross_seed"]["own"]["passed"] == 11
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"summary": {}}))
    assert P.main([str(bad)]) == 2
    assert "lacks ['setup', 'split']" in capsys.readouterr().err
