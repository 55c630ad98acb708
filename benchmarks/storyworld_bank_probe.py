"""Does the DiT read its NAM memory bank when an object comes back? (issue #7's diagnostic)

On held-out ``--late-memory`` scripts (``storyworld_eval``: the returning object first enters after the frame sink;
``--min-absent`` defaults to ``memory.local_attn_size``, so no window shows it when it returns and only NAM's bank
can have kept it), every script is sampled with two seeds a and b, and then again with seed a's noise but, from the
chunk where the object returns, with the memory bank (bank slots, their frame indices, the pending prototype) of
run b at that point: run a<-b (and b<-a the other way). Same prompts, noise, sink and window; only the bank differs.

* influence = mean |a<-b - a| / mean |b - a| over the video frames from the swap on: 0 when the DiT does not read
  its bank at all, 1 when the swapped bank changes the video as much as another sample does.
* copy: the returning object's re-appearance distance (``storyworld.metrics``: hue / pattern, pass <= 1) in a<-b
  against its look in a before the gap ("own") and against its look in b before the gap ("bank's"), by scoring
  a<-b's frames after the swap behind a's and behind b's frames before it; the control is run a's own return
  scored behind b's frames ("cross", no swap). A DiT that redraws the object from its bank moves the return toward
  the bank's look (bank's < cross); one that ignores the bank does not.

    python benchmarks/storyworld_bank_probe.py --num-scripts 8 --seeds 0,1 [--mode nam+sma] --json out.json
    python benchmarks/storyworld_bank_probe.py --tiny          # CPU smoke run, random weights
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Any, Callable, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python benchmarks/storyworld_bank_probe.py` without an installed package
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from benchmarks import storyworld_eval as E  # noqa: E402
from memflow_jax.storyworld import metrics as M  # noqa: E402
from memflow_jax.storyworld import scripts as SC  # noqa: E402

BANK_FIELDS = ("bank_frame", "proto_k", "proto_v", "proto_frame", "bank_pointer")  # + the bank slots of k / v


def swap_bank(state, donor):
    """``state`` with ``donor``'s memory bank: the bank slots of k / v, their frame indices and the prototype."""
    import jax.numpy as jnp

    c, d = state.cache, donor.cache
    w = c.window
    new = c.replace(k=jnp.concatenate([c.k[:, :, :w], d.k[:, :, w:]], axis=2),
                    v=jnp.concatenate([c.v[:, :, :w], d.v[:, :, w:]], axis=2),
                    **{f: jnp.array(getattr(d, f), copy=True) for f in BANK_FIELDS})  # the chunk donates its state
    return state.replace(cache=new)


def bank_shows_object(state, visible: np.ndarray, t_stride: int) -> float:
    """Fraction of layers whose bank (batch item 0) holds a latent frame in which the ground truth shows the object
    (``visible`` [T] bool over video frames): what NAM kept that could tell the DiT how the object looked."""
    frames = np.asarray(state.cache.bank_frame)[:, 0]  # [L, K], -1 = empty slot
    def shows(f: int) -> bool:
        a, b = SC.latent_to_video_start(f, t_stride), SC.latent_to_video_start(f + 1, t_stride)
        return bool(visible[a:b].any())
    return float(np.mean([any(shows(int(f)) for f in layer if f >= 0) for layer in frames]))


def return_distance(video: np.ndarray, ann: dict[str, Any], obj: int) -> float:
    """Re-appearance distance of object ``obj`` in ``video`` (inf: not drawn whole on both sides of its gap)."""
    recs = [r for r in M.reappearance_consistency(video, ann) if r["object"] == obj]
    return float(min((r["distance"] for r in recs), default=float("inf")))


def probe_script(comp, e: "E.EvalScript", seeds: tuple[int, int], chunk: int, t_stride: int
                 ) -> list[dict[str, Any]]:
    """Both swaps (a<-b, b<-a) of one script, at the return of its first returning object: influence, the copy
    distances and whether each bank holds that object."""
    import jax
    import jax.numpy as jnp

    def sample(seed: int, on_state: Callable) -> np.ndarray:  # [T, H, W, 3] uint8
        return E.generate_video(comp, e.prompts, e.latent_switch_frames, e.num_latent_frames, seed, on_state)[0]

    obj, _, ret_seg = e.returning[0]
    swap_chunk = e.latent_switch_frames[ret_seg - 1] // chunk  # the chunk the return segment starts with
    swap_video = E.video_frames(swap_chunk * chunk, t_stride)  # video frames made before that chunk

    states: dict[int, Any] = {}
    videos = {}
    for s in seeds:
        def keep(ci, state, s=s):
            if ci == swap_chunk:  # a copy: the chunk program donates the state it is given
                states[s] = jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), state)
            return state
        videos[s] = sample(s, keep)
    out = []
    for a, b in (seeds, seeds[::-1]):
        swapped = sample(a, lambda ci, st, b=b: swap_bank(st, states[b]) if ci == swap_chunk else st)
        va, vb = videos[a].astype(np.float32), videos[b].astype(np.float32)
        before = float(np.abs(swapped[:swap_video].astype(np.float32) - va[:swap_video]).max())
        diff_swap = float(np.abs(swapped[swap_video:] - va[swap_video:]).mean())
        diff_seed = float(np.abs(vb[swap_video:] - va[swap_video:]).mean())
        behind_b = np.concatenate([videos[b][:swap_video], swapped[swap_video:]])
        cross = np.concatenate([videos[b][:swap_video], videos[a][swap_video:]])  # the control: no swap
        ca, cb = states[a].cache, states[b].cache
        visible = np.asarray(e.annotations["visible"])[:, obj]
        out.append({"script": e.index, "object": obj, "seeds": [a, b], "swap_chunk": swap_chunk,
                    "bank_frames": [np.asarray(ca.bank_frame)[0, 0].tolist(), np.asarray(cb.bank_frame)[0, 0].tolist()],
                    "bank_shows_object": [bank_shows_object(states[x], visible, t_stride) for x in (a, b)],
                    "bank_k_mean_abs_diff": float(jnp.mean(jnp.abs(ca.bank_k.astype(jnp.float32)
                                                                   - cb.bank_k.astype(jnp.float32)))),
                    "swap_video_frame": swap_video, "max_diff_before_swap": before,
                    "mean_diff_swap": diff_swap, "mean_diff_seed": diff_seed,
                    "influence": diff_swap / diff_seed if diff_seed > 0 else float("nan"),
                    "distance_unswapped": return_distance(videos[a], e.annotations, obj),
                    "distance_own": return_distance(swapped, e.annotations, obj),
                    "distance_banks": return_distance(behind_b, e.annotations, obj),
                    "distance_cross": return_distance(cross, e.annotations, obj)})
    return out


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    infl = np.array([r["influence"] for r in rows], np.float64)
    keys = ("distance_own", "distance_banks", "distance_cross")
    measured = [[r[k] for k in keys] for r in rows if all(np.isfinite(r[k]) for k in keys)]
    d = np.array(measured, np.float64).reshape(-1, 3)  # [n, own / bank's / cross]
    return {"swaps": len(rows), "influence_mean": float(np.nanmean(infl)) if rows else float("nan"),
            "influence_min": float(np.nanmin(infl)) if rows else float("nan"),
            "influence_max": float(np.nanmax(infl)) if rows else float("nan"),
            "returns_measured": len(d),
            "moved_toward_bank": int(np.sum(d[:, 1] < d[:, 2])),  # bank's look closer than without the swap
            "donor_bank_shows_object": float(np.mean([r["bank_shows_object"][1] for r in rows])) if rows else 0.0,
            **{f"{k}_mean": float(d[:, i].mean()) if len(d) else float("nan") for i, k in enumerate(keys)}}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default=None, help=f"converted checkpoint dir (default: {E.DEFAULT_CKPT})")
    p.add_argument("--config", default=None)
    p.add_argument("--tiny", action="store_true", help="random-weight smoke run on the tiny config")
    p.add_argument("--mode", default="nam", choices=("nam", "nam+sma"))
    p.add_argument("--num-scripts", type=int, default=None)
    p.add_argument("--seeds", default="0,1", help="the two sampling seeds whose banks are swapped")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--min-absent", type=int, default=None, help="default: memory.local_attn_size")
    p.add_argument("--max-chunks", type=int, default=None)
    p.add_argument("--json", default="")
    p.add_argument("overrides", nargs="*")
    return p.parse_args(argv)


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    t_start = time.perf_counter()
    seeds = tuple(E._seeds(args.seeds))
    if len(seeds) != 2 or seeds[0] == seeds[1]:
        raise E.EvalError(f"--seeds {args.seeds!r}: give two different seeds (their banks are swapped)")
    ckpt, config, overrides = E.resolve_source(args)
    if any(o.split("=", 1)[0] in ("memory.mode", "memory.sma") for o in args.overrides):
        raise E.EvalError("memory.mode / memory.sma come from --mode")
    cfg = E.build_config(ckpt, config, overrides + E.mode_overrides(args.mode))
    t_stride, chunk = E.check_config(cfg)
    s = cfg.sampler
    num_latent = int(s.num_output_frames) if args.max_chunks is None else min(int(s.num_output_frames),
                                                                              args.max_chunks * chunk)
    min_absent = cfg.memory.local_attn_size if args.min_absent is None else args.min_absent
    num_scripts = args.num_scripts if args.num_scripts is not None else (1 if args.tiny else 8)
    scripts, skipped = E.late_memory_scripts(num_scripts, split_seed=args.split_seed, num_latent=num_latent,
                                             chunk=chunk, t_stride=t_stride, height=s.height, width=s.width,
                                             fps=s.fps, min_absent=min_absent, log=log)

    from memflow_jax.pipeline import load_components

    comp = load_components(cfg, ckpt, seed=s.seed)
    if comp.random_weights:
        params, _ = E.randomise_zero_head(comp.dit_params, s.seed)
        comp = dataclasses.replace(comp, dit_params=params)
    log(f"{num_scripts} late-memory script(s), off screen >= {min_absent} latent frames; mode {args.mode}; "
        f"seeds {seeds}; {'RANDOM weights' if comp.random_weights else ckpt}")
    rows = []
    for e in scripts:
        t0 = time.perf_counter()
        got = probe_script(comp, e, seeds, chunk, t_stride)
        rows.extend(got)
        for r in got:
            log(f"  script {e.index} {r['seeds'][0]}<-{r['seeds'][1]} (swap at chunk {r['swap_chunk']}): influence "
                f"{r['influence']:.3f}, return distance own {r['distance_own']:.2f} / bank's "
                f"{r['distance_banks']:.2f} / cross {r['distance_cross']:.2f} (unswapped {r['distance_unswapped']:.2f}) "
                f"({time.perf_counter() - t0:.1f}s)")
    summary = summarise(rows)
    log(f"influence {summary['influence_mean']:.3f} [{summary['influence_min']:.3f}, {summary['influence_max']:.3f}] "
        f"over {summary['swaps']} swaps; returns measured {summary['returns_measured']}, moved toward the bank's "
        f"look {summary['moved_toward_bank']} (mean distance own {summary['distance_own_mean']:.2f}, bank's "
        f"{summary['distance_banks_mean']:.2f}, cross without the swap {summary['distance_cross_mean']:.2f}); "
        f"the swapped-in bank holds a frame showing the object in {summary['donor_bank_shows_object']:.2f} of the "
        f"layers (mean over swaps)")
    report = {"benchmark": "storyworld_bank_probe", "ckpt": ckpt, "mode": args.mode, "seeds": list(seeds),
              "min_absent": min_absent, "num_scripts": num_scripts, "skipped_scripts": skipped, "rows": rows,
              "summary": summary,
              "total_seconds": time.perf_counter() - t_start}
    if args.json:
        E.write_json(args.json, report)
        log(f"wrote {args.json}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    return E.run_cli(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
