"""How much can a memory lower the DiT's loss where an object comes back? (issue #7's diagnostic)

The eval (``storyworld_eval.py``) asks whether sampled videos keep a returning object's look. This asks the
question under it, on the ground truth: teacher-forced on held-out stories (the ``story`` recipe's
:func:`rollout.teacher_forced_story`: the memory holds the ground-truth story, the chunk is noised to one denoising
step), how far below the memory-less mode does each memory mode bring the x0 error on the chunks where an object
returns after ``--min-absent`` latent frames off screen, and on the latent cells where the ground truth shows the
returning object in them (its look), against the other chunks? Every mode sees the same stories, noise and steps
(paired), so the differences are read story by story:

* ``none`` / ``sink`` / ``nam`` / ``nam+sma``: the eval's modes (the checkpoint's memory sizes);
* ``full``: no sink, a window as long as the story: every earlier frame in context, the most any memory of this
  DiT could show it (out of its training distribution, so an indication, not a bound).

At the first denoising step (``--exit-step 0``, pure noise) the chunk itself shows nothing, so whatever its
prediction knows of a returning object's look comes from the context.

    python benchmarks/storyworld_return_loss.py --num-scripts 16 --draws 4 --json out.json
    python benchmarks/storyworld_return_loss.py --tiny          # CPU smoke run, random weights
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python benchmarks/storyworld_return_loss.py` without an installed package
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from benchmarks import storyworld_eval as E  # noqa: E402
from memflow_jax.storyworld import scripts as SC  # noqa: E402

MODES = ("none", "sink", "nam", "nam+sma", "full")


def mode_overrides(name: str, num_latent: int) -> list[str]:
    """Memory overrides of ``name``: the eval's modes, or ``full`` (no sink, a window of the whole story)."""
    if name == "full":
        return ["memory.mode=none", "memory.sma=false", f"memory.local_attn_size={num_latent}"]
    return E.mode_overrides(name)


def mean_se(d: np.ndarray) -> dict[str, float]:
    """Mean of per-sample values with its standard error (NaN for one sample)."""
    n = d.size
    return {"diff": float(d.mean()), "se": float(d.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan"), "n": int(n)}


def paired(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Mean of ``x - y`` over paired samples with its standard error, and the mean relative difference."""
    return {**mean_se(x - y), "relative": float(np.mean((x - y) / y))}


REGIONS = ("return", "other", "object")  # return chunks, every other chunk, the returning object's cells in them


def object_cells(e: "E.EvalScript", returns: Sequence[Sequence[int]], num_latent: int, t_stride: int,
                 cell: int) -> np.ndarray:
    """bool ``[F, H / cell, W / cell]``: for each ``(object, first, end)`` of ``returns``, the latent cells
    (``cell`` x ``cell`` pixels) of latent frames ``first .. end - 1`` in which the ground truth shows that object
    in any of the video frames the latent frame decodes to."""
    ids = e.annotations["id_map"]  # [T, H, W] uint8, k + 1 = object k
    t, h, w = ids.shape
    if h % cell or w % cell:
        raise ValueError(f"{h}x{w} px frames do not divide into latent cells of {cell} px")
    out = np.zeros((num_latent, h // cell, w // cell), bool)
    for obj, first, last in returns:
        for f in range(first, last):
            a, b = SC.latent_to_video_start(f, t_stride), min(SC.latent_to_video_start(f + 1, t_stride), t)
            shown = (ids[a:max(b, a + 1)] == obj + 1).any(axis=0)  # [H, W]
            out[f] |= shown.reshape(h // cell, cell, w // cell, cell).any(axis=(1, 3))
    return out


def region_losses(loss: np.ndarray, regions: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-cell x0 MSE ``[S, K, F, h, w]`` (stories, draws, frames, latent cells) and region masks ``[S, F, h, w]``
    -> each story's mean over its draws of the mean over the region, ``[S]`` per region."""
    out = {}
    for name, m in regions.items():
        mb = np.broadcast_to(m[:, None].astype(bool), loss.shape)
        out[name] = (np.sum(np.where(mb, loss, 0.0), axis=(2, 3, 4))
                     / np.maximum(np.sum(mb, axis=(2, 3, 4)), 1)).mean(1)
    return out


def summarise(losses: dict[str, np.ndarray], regions: dict[str, np.ndarray]) -> dict[str, Any]:
    """Per mode and region (:data:`REGIONS`): the mean loss, and against ``none`` story by story (a story's draws
    share its frames, so the story is the unit of the standard errors): the paired difference, and for the return
    chunks and the object's cells the relative change beyond the mode's relative change on the other chunks."""
    base = region_losses(losses["none"], regions) if "none" in losses else None
    out = {}
    for mode, a in losses.items():
        got = region_losses(a, regions)
        row: dict[str, Any] = {f"{r}_loss": float(v.mean()) for r, v in got.items()}
        if base is not None and mode != "none":
            for r, v in got.items():
                row[f"{r}_vs_none"] = paired(v, base[r])
            for r in ("return", "object"):
                if r in got:
                    row[f"{r}_gain_beyond_other"] = mean_se(got[r] / base[r] - got["other"] / base["other"])
        out[mode] = row
    return out


def format_table(summary: dict[str, Any]) -> str:
    regions = [r for r in REGIONS if f"{r}_loss" in next(iter(summary.values()))]
    names = {"return": "return chunks", "other": "other chunks", "object": "returning object's cells"}
    head = ["mode"] + [f"{names[r]}" for r in regions] + [f"{names[r]} vs none" for r in regions] + \
        [f"{names[r]}: gain beyond other chunks" for r in ("return", "object") if r in regions]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for mode, s in summary.items():
        cells = [mode] + [f"{s[f'{r}_loss']:.4f}" for r in regions]
        for r in regions:
            p = s.get(f"{r}_vs_none")
            cells.append("–" if p is None else f"{p['diff']:+.4f} ± {p['se']:.4f} ({100 * p['relative']:+.1f} %)")
        for r in ("return", "object"):
            if r in regions:
                g = s.get(f"{r}_gain_beyond_other")
                cells.append("–" if g is None else f"{100 * g['diff']:+.1f} ± {100 * g['se']:.1f} %")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default=None, help="converted checkpoint (default: the bundled demo model)")
    p.add_argument("--config", default=None, help="YAML on top of the checkpoint's config")
    p.add_argument("--tiny", action="store_true", help="random-weight tiny model (CPU smoke run)")
    p.add_argument("--num-scripts", type=int, default=None, help="held-out stories (default 8; --tiny 1)")
    p.add_argument("--draws", type=int, default=4, help="noise draws per story (the batch)")
    p.add_argument("--exit-step", type=int, default=0, help="denoising step index the chunks are noised to")
    p.add_argument("--min-absent", type=int, default=9,
                   help="return chunks: objects off screen >= this many latent frames (stories drawn to have one)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated: " + " | ".join(MODES))
    p.add_argument("--split-seed", type=int, default=0, help="held-out split (storyworld_eval.py)")
    p.add_argument("--max-chunks", type=int, default=None)
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    return p.parse_args(argv)


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from memflow_jax.nn import vae as vae_nn
    from memflow_jax.pipeline import _fit_context, load_components
    from memflow_jax.training import rollout as ro
    from memflow_jax.training.trainer import return_chunks, return_mask

    t_start = time.perf_counter()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or len(set(modes)) != len(modes) or any(m not in MODES for m in modes):
        raise E.EvalError(f"--modes {args.modes!r}: give distinct modes of {', '.join(MODES)}")
    if args.draws < 2:
        raise E.EvalError(f"--draws {args.draws}: give >= 2 noise draws a story")
    if any(o.split("=", 1)[0] in ("memory.mode", "memory.sma") for o in args.overrides):
        raise E.EvalError("memory.mode / memory.sma are set per mode: choose them with --modes")
    eargs = argparse.Namespace(tiny=args.tiny, ckpt=args.ckpt, config=args.config, overrides=list(args.overrides))
    ckpt, config, overrides = E.resolve_source(eargs)
    cfg = E.build_config(ckpt, config, overrides)
    t_stride, chunk = E.check_config(cfg)
    s = cfg.sampler
    num_latent = int(s.num_output_frames)
    if args.max_chunks is not None:
        num_latent = min(num_latent, args.max_chunks * chunk)
    num_scripts = args.num_scripts if args.num_scripts is not None else (1 if args.tiny else 8)
    min_absent = args.min_absent
    scripts, skipped = E.late_memory_scripts(num_scripts, split_seed=args.split_seed, num_latent=num_latent,
                                             chunk=chunk, t_stride=t_stride, height=s.height, width=s.width,
                                             fps=s.fps, min_absent=min_absent, log=log)
    rows = [SC.latent_returns(e.script, t_stride, chunk) for e in scripts]
    masks = np.stack([return_mask(r, num_latent, chunk, min_absent) for r in rows])  # [S, F]
    if not masks.any(axis=1).all():
        raise AssertionError("a held-out story without a return chunk: make_eval_script's min_absent failed")
    cell = int(s.vae_stride[1])  # pixels per latent cell (the loss is per latent position)
    objects = np.stack([object_cells(e, return_chunks(r, num_latent, chunk, min_absent), num_latent, t_stride, cell)
                        for e, r in zip(scripts, rows)])  # [S, F, h, w]
    hw = objects.shape[2:]
    frames = masks.astype(bool)[:, :, None, None]
    regions = {"return": np.broadcast_to(frames, masks.shape + hw), "other": np.broadcast_to(~frames, masks.shape + hw),
               "object": objects & frames}
    if not regions["object"].any(axis=(1, 2, 3)).all():
        raise AssertionError("a held-out story whose returning object shows in no latent cell of its return chunk")
    comp = load_components(cfg, ckpt, seed=s.seed)
    if comp.random_weights:
        params, _ = E.randomise_zero_head(comp.dit_params, s.seed)
        comp = dataclasses.replace(comp, dit_params=params)
    k = args.draws
    prompts = sorted({p for e in scripts for p in e.prompts})
    emb = {p: _fit_context(comp.text_encoder.encode([p]), cfg)[0] for p in prompts}
    num_prompts = max(len(e.prompts) for e in scripts)
    latents, contexts, switches = [], [], []
    for e in scripts:
        z = vae_nn.encode(comp.vae_params, cfg.vae, vae_nn.video_to_input(e.video[None]))  # [1, F, C, h, w]
        latents.append(np.asarray(z[0], np.float32))
        ps = list(e.prompts) + [e.prompts[-1]] * (num_prompts - len(e.prompts))
        contexts.append(np.stack([emb[p] for p in ps]).astype(np.float32))
        sw = list(e.latent_switch_frames) + [ro.NO_SWITCH] * (num_prompts - 1 - len(e.latent_switch_frames))
        switches.append(np.asarray(sw, np.int32))
    log(f"{num_scripts} held-out stories (late returns, off screen >= {min_absent} latent frames), {num_latent} "
        f"latent frames, {k} noise draws each, exit step {args.exit_step}; {int(masks.sum())} return frames, "
        f"{int(regions['object'].sum())} of their latent cells show the returning object")

    losses: dict[str, np.ndarray] = {}
    for mode in modes:
        mcfg = E.build_config(ckpt, config, overrides + mode_overrides(mode, num_latent))
        rc = ro.story_config(mcfg, k, model=mcfg.model)
        fn = jax.jit(lambda p, lat, ctx, sw, rng, rc=rc: ro.teacher_forced_story(
            p, rc, lat, ctx, sw, rng, exit_choices=(args.exit_step,))[0])
        t0 = time.perf_counter()
        per = []
        for i in range(num_scripts):
            lat = jnp.asarray(np.broadcast_to(latents[i], (k,) + latents[i].shape))
            pred = fn(comp.dit_params, lat, jnp.asarray(np.broadcast_to(contexts[i], (k,) + contexts[i].shape)),
                      jnp.asarray(np.broadcast_to(switches[i], (k,) + switches[i].shape)),
                      jax.random.key(1000 + i))  # the same noise and steps in every mode
            err = np.square(np.asarray(pred, np.float32) - np.asarray(lat, np.float32))  # [K, F, C, h, w]
            per.append(err.mean(axis=2))  # [K, F, h, w]
        losses[mode] = np.stack(per)  # [S, K, F, h, w]
        log(f"[{mode}] {time.perf_counter() - t0:.1f}s")
    summary = summarise(losses, regions)
    per_story = {m: {r: v.tolist() for r, v in region_losses(a, regions).items()} for m, a in losses.items()}
    table = format_table(summary)
    log(table)
    report = {"ckpt": ckpt, "random_weights": comp.random_weights, "num_scripts": num_scripts, "draws": k,
              "exit_step": args.exit_step, "min_absent": min_absent, "num_latent": num_latent,
              "split_seed": args.split_seed, "scripts": [e.index for e in scripts], "skipped_scripts": skipped,
              "modes": modes, "overrides": list(args.overrides), "summary": summary, "per_story": per_story,
              "seconds": time.perf_counter() - t_start}
    if args.json:
        E.write_json(args.json, report)
        log(f"wrote {args.json}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return E.run_cli(run, args)


if __name__ == "__main__":
    raise SystemExit(main())
