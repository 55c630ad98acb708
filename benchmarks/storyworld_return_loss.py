"""How much can a memory lower the DiT's loss where an object comes back? (issue #7's diagnostic)

The eval (``storyworld_eval.py``) asks whether sampled videos keep a returning object's look. This asks the
question under it, on the ground truth: teacher-forced on held-out stories (the ``story`` recipe's
:func:`rollout.teacher_forced_story`: the memory holds the ground-truth story, the chunk is noised to one denoising
step), how far below the memory-less mode does each memory mode bring the x0 error on the chunks where an object
returns after ``--min-absent`` latent frames off screen, against the other chunks? Every mode sees the same
stories, noise and steps (paired), so the differences are read per sample:

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


def split_losses(loss: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame x0 MSE ``[S, K, F]`` (stories, draws, frames) and ``masks`` ``[S, F]`` (1 on the return chunks)
    -> each story's mean over its draws on the return chunks and elsewhere, ``[S]`` each."""
    m = masks[:, None, :].astype(bool)
    ret = np.sum(np.where(m, loss, 0.0), -1) / np.maximum(np.sum(m, -1), 1)
    other = np.sum(np.where(m, 0.0, loss), -1) / np.maximum(np.sum(~m, -1), 1)
    return ret.mean(1), other.mean(1)


def summarise(losses: dict[str, np.ndarray], masks: np.ndarray) -> dict[str, Any]:
    """Per mode: the mean loss on return chunks and elsewhere (:func:`split_losses`), both paired against ``none``
    story by story (a story's draws share its frames, so the story is the unit of the standard errors)."""
    base_r, base_o = split_losses(losses["none"], masks) if "none" in losses else (None, None)
    out = {}
    for mode, a in losses.items():
        r, o = split_losses(a, masks)
        row = {"return_loss": float(r.mean()), "other_loss": float(o.mean())}
        if base_r is not None and mode != "none":
            row["return_vs_none"] = paired(r, base_r)
            row["other_vs_none"] = paired(o, base_o)
            # the return chunks' relative change beyond the mode's relative change elsewhere, per story
            row["return_gain_beyond_other"] = mean_se(r / base_r - o / base_o)
        out[mode] = row
    return out


def format_table(summary: dict[str, Any]) -> str:
    head = ("| mode | loss at returns | elsewhere | returns vs none | elsewhere vs none | returns' gain beyond "
            "elsewhere |\n| --- | --- | --- | --- | --- | --- |")
    rows = []
    for mode, s in summary.items():
        cells = [f"{s['return_loss']:.4f}", f"{s['other_loss']:.4f}"]
        for k in ("return_vs_none", "other_vs_none"):
            p = s.get(k)
            cells.append("–" if p is None else f"{p['diff']:+.4f} ± {p['se']:.4f} ({100 * p['relative']:+.1f} %)")
        g = s.get("return_gain_beyond_other")
        cells.append("–" if g is None else f"{100 * g['diff']:+.1f} ± {100 * g['se']:.1f} %")
        rows.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join([head] + rows)


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
    from memflow_jax.training.trainer import return_mask

    t_start = time.perf_counter()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or len(set(modes)) != len(modes) or any(m not in MODES for m in modes):
        raise E.EvalError(f"--modes {args.modes!r}: give distinct modes of {', '.join(MODES)}")
    if args.draws < 2:
        raise E.EvalError(f"--draws {args.draws}: give >= 2 (the standard errors pair samples)")
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
    masks = np.stack([return_mask(SC.latent_returns(e.script, t_stride, chunk), num_latent, chunk, min_absent)
                      for e in scripts])
    if not masks.any(axis=1).all():
        raise AssertionError("a held-out story without a return chunk: make_eval_script's min_absent failed")
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
        f"latent frames, {k} noise draws each, exit step {args.exit_step}; {int(masks.sum())} return frames")

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
            err = np.square(np.asarray(pred, np.float32) - np.asarray(lat, np.float32))
            per.append(err.reshape(err.shape[:2] + (-1,)).mean(-1))  # [K, F]
        losses[mode] = np.stack(per)  # [S, K, F]
        log(f"[{mode}] {time.perf_counter() - t0:.1f}s")
    summary = summarise(losses, masks)
    per_story = {m: dict(zip(("return", "other"), (x.tolist() for x in split_losses(a, masks))))
                 for m, a in losses.items()}
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
