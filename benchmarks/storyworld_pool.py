"""Pool ``storyworld_eval.py`` reports of one checkpoint and split that ran over disjoint seeds.

An eval over many seeds is faster as several processes side by side (each ``--seeds`` a slice), and a memory
claim needs many seeds: the re-appearance columns count a few returns a seed. This adds the reports' counts per mode
and prints one table:

* adherence: mean and sample std (ddof 1) over every seed of every report;
* returns measured / passed, and "pass of measured: own vs other seeds'" (``storyworld_eval.cross_seed_returns``):
  own and other-seed passes added over the reports. Other seeds' looks are taken within each report, so every
  report needs at least two seeds;
* memory's share = own rate p - other seeds' rate q, with the standard error ``sqrt(p(1-p)/n + q(1-q)/n)``, n the
  measured returns: each return's cross pairs reuse its own look before the gap, so they count as n draws, not as
  pairs (the conservative choice);
* first looks: the same across seeds, pairs added over the reports (absent from reports before round 20).

    python benchmarks/storyworld_pool.py a.json b.json [--json pooled.json] [--label NAME]

Reports must share the held-out split, the scripts and the modes, have two seeds or more each, and no seed may
appear twice; otherwise it exits 2 naming the mismatch. The output JSON keeps each input's per-mode summary, so the pooled numbers can be redone from it.
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import sys
from typing import Any, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python benchmarks/storyworld_pool.py` without an installed package
    sys.path.insert(0, ROOT)

from benchmarks import storyworld_eval as E  # noqa: E402

# setup keys that must agree between pooled reports (with the split)
SAME_SETUP = ("num_scripts", "num_latent_frames", "chunk_frames", "height", "width", "modes")


class PoolError(ValueError):
    """Reports that cannot be pooled (names the mismatch)."""


def load(path: str) -> dict[str, Any]:
    """A ``storyworld_eval.py --json`` report (``.json`` or ``.json.gz``)."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt") as f:
            report = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise PoolError(f"{path}: not a readable JSON report ({e})") from e
    missing = [k for k in ("setup", "split", "summary") if k not in report]
    if missing:
        raise PoolError(f"{path}: lacks {missing}; pass the reports that storyworld_eval.py --json writes")
    return report


def check_poolable(reports: Sequence[dict[str, Any]], names: Sequence[str]) -> None:
    """Raise :class:`PoolError` unless the reports share split, scripts and modes and their seeds are disjoint."""
    if not reports:
        raise PoolError("no reports given")
    first = reports[0]
    seen: dict[int, str] = {}
    for rep, name in zip(reports, names):
        diff = {k: (rep["split"].get(k), first["split"].get(k)) for k in set(rep["split"]) | set(first["split"])
                if rep["split"].get(k) != first["split"].get(k)}
        if diff:
            raise PoolError(f"{name}: held-out split differs from {names[0]}'s: "
                            + ", ".join(f"{k}={a!r} vs {b!r}" for k, (a, b) in sorted(diff.items())))
        for k in SAME_SETUP:
            if rep["setup"].get(k) != first["setup"].get(k):
                raise PoolError(f"{name}: setup {k}={rep['setup'].get(k)!r} differs from {names[0]}'s "
                                f"{first['setup'].get(k)!r}")
        if len(rep["setup"]["seeds"]) < 2:
            raise PoolError(f"{name}: one seed; other seeds' looks are taken within a report, so each report needs "
                            f">= 2 seeds (run storyworld_eval.py --seeds with two or more)")
        for s in rep["setup"]["seeds"]:
            if s in seen:
                raise PoolError(f"seed {s} is in both {seen[s]} and {name}: pool reports over disjoint seeds")
            seen[s] = name


def pool_mode(summaries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One mode's pooled numbers from the reports' ``summary[mode]`` dicts."""
    adh = [x for s in summaries for x in s["adherence"]["per_seed"]]
    mean = sum(adh) / len(adh)
    std = math.sqrt(sum((x - mean) ** 2 for x in adh) / (len(adh) - 1)) if len(adh) > 1 else 0.0
    out: dict[str, Any] = {"adherence": {"mean": mean, "std": std, "n_seeds": len(adh)}}
    if all("returns" in s for s in summaries):
        out["returns"] = {k: sum(s["returns"][k] for s in summaries) for k in ("events", "measured", "passed")}
    if all("returns_cross_seed" in s for s in summaries):
        n = sum(s["returns_cross_seed"]["own"]["measured"] for s in summaries)
        k = sum(s["returns_cross_seed"]["own"]["passed"] for s in summaries)
        pairs = sum(s["returns_cross_seed"]["cross"]["pairs"] for s in summaries)
        kc = sum(s["returns_cross_seed"]["cross"]["passed"] for s in summaries)
        p, q = E.rate(k, n), E.rate(kc, pairs)
        se = math.sqrt((p * (1 - p) + q * (1 - q)) / n) if n and pairs else float("nan")
        out["returns_cross_seed"] = {"own": {"measured": n, "passed": k, "rate": p},
                                     "cross": {"pairs": pairs, "passed": kc, "rate": q}}
        out["memory_share"] = {"own_minus_other": p - q, "se": se}
    looks = [s["first_looks"] for s in summaries if s.get("first_looks")]
    if looks:
        pairs = sum(f["seed_pairs"] for f in looks)
        same = sum(f["same_look_rate"] * f["seed_pairs"] for f in looks if f["seed_pairs"])
        out["first_looks"] = {"seed_pairs": pairs, "same_look_rate": E.rate(same, pairs), "reports": len(looks)}
    return out


def pool(reports: Sequence[dict[str, Any]], names: Sequence[str] | None = None) -> dict[str, Any]:
    """Pooled per-mode numbers of reports over disjoint seeds (:func:`check_poolable` first)."""
    names = list(names or [f"report {i}" for i in range(len(reports))])
    check_poolable(reports, names)
    modes = list(reports[0]["summary"])
    for rep, name in zip(reports, names):
        if list(rep["summary"]) != modes:
            raise PoolError(f"{name}: modes {list(rep['summary'])} differ from {names[0]}'s {modes}")
    seeds = sorted(s for rep in reports for s in rep["setup"]["seeds"])
    return {"split": reports[0]["split"], "num_scripts": reports[0]["setup"]["num_scripts"], "seeds": seeds,
            "summary": {m: pool_mode([rep["summary"][m] for rep in reports]) for m in modes},
            "inputs": [{"name": n, "ckpt": rep["setup"].get("ckpt"), "device": rep["setup"].get("device"),
                        "seeds": rep["setup"]["seeds"], "summary": rep["summary"]} for rep, n in zip(reports, names)]}


def format_table(pooled: dict[str, Any]) -> str:
    """Markdown table of :func:`pool`'s result."""
    heads = ["mode", "adherence", "returns measured / passed", "pass of measured: own vs other seeds'",
             "memory's share (own - other) ± se", "first looks: same across seeds"]
    rows = [heads, ["---"] * len(heads)]
    for mode, s in pooled["summary"].items():
        a = s["adherence"]
        share = s.get("memory_share")
        rows.append([mode, f"{a['mean']:.3f} ± {a['std']:.3f} ({a['n_seeds']} seeds)",
                     E._returns_cell(s.get("returns")), E._cross_cell(s.get("returns_cross_seed")),
                     "–" if share is None or not math.isfinite(share["se"])
                     else f"{share['own_minus_other']:+.2f} ± {share['se']:.2f}",
                     E._looks_cell(s.get("first_looks"))])
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("reports", nargs="+", help="storyworld_eval.py --json reports (.json or .json.gz)")
    p.add_argument("--json", default=None, help="write the pooled numbers (and each input's summary) here")
    p.add_argument("--label", default="", help="a name for the pooled model, kept in the JSON")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        pooled = pool([load(p) for p in args.reports], args.reports)
    except PoolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    pooled["label"] = args.label
    split = pooled["split"]
    print(f"{args.label or 'pooled'}: {pooled['num_scripts']} held-out scripts x {len(pooled['seeds'])} seeds "
          f"(late_memory={split.get('late_memory')}, min_absent={split.get('min_absent')})")
    print(format_table(pooled))
    if args.json:
        E.write_json(args.json, pooled)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
