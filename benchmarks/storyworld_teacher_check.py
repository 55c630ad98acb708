"""Storyworld teacher check: does a bidirectional teacher, through its codec, make clips that follow their prompts?

Run it before distilling (the ODE pairs, ODE init and DMD all copy the teacher): for N held-out single-prompt
clips (the split of ``storyworld_eval.py``: ``eval_rng(split_seed, i)``, disjoint from every training stream) the
teacher solves the flow ODE from noise (``training.ode_pairs.solve``: Euler, classifier-free guidance against the
negative prompt), the codec decodes the clean latent, and the video is scored against the clip's ground truth:
prompt adherence and temporal smoothness (``storyworld.metrics``), plus the std of the clean latent in the
normalised latent space (the training data has std 1; a teacher whose samples drift far from 1 diverges under
guidance). The ground truth through the codec is scored too: the ceiling of every teacher on this codec.
``--prompts FILE`` adds prompts without a ground truth (one a line, e.g. a script's continuation prompts, which
the clip-trained teacher never saw but scores during long tuning): smoothness and latent std only.
``--stories N`` (a story teacher, ``train.recipe=teacher_story``) also solves N held-out stories whole (the scripts
of ``storyworld_eval.py``, each with an object that leaves and comes back), every latent frame conditioned on its
segment's prompt, and scores them as the memory benchmark does, re-appearance consistency included: can the teacher
itself keep a returning object's hidden attribute? And does it draw that attribute diversely: each object's first
look per seed, and how often two seeds give the same look (``storyworld_eval.first_look_diversity``; random hidden
attributes give 1/16; one look per prompt gives ~1). And is a return's look its own video's, or the prompt's: each
measured return is scored against other seeds' looks before its gap too (``storyworld_eval.cross_seed_returns``).
``--guidance-sigma-max`` guides only the low-noise steps (``scheduler.guidance_at``). (``--num-clips 0`` checks
stories only.)

    python benchmarks/storyworld_teacher_check.py --teacher ART/teacher --text ART/text --vae DATA/latents/vae \\
        [--num-clips 8] [--seeds 0] [--steps 48] [--guidance-scale 3.0] [--json OUT.json] [--png OUT.png] \\
        [--prompts EXTRA_PROMPTS.txt] [--stories 8 [--story-png OUT.png]] [--guidance-sigma-max S]

``--teacher``: a converted DiT checkpoint (``train.py --export``), its ``model`` / ``sampler`` sections are used;
``--text``: a converted checkpoint with ``t5`` + ``tokenizer/`` (the ``text`` stage or a demo package);
``--vae``: the codec with the latent statistics the teacher was trained with (``data.encode_latents``' ``vae/``).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
import types
from typing import Any, Callable, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python benchmarks/storyworld_teacher_check.py` without an installed package
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from benchmarks import storyworld_eval as E  # noqa: E402
from memflow_jax.storyworld import captions as C  # noqa: E402
from memflow_jax.storyworld import metrics as M  # noqa: E402
from memflow_jax.storyworld import render as R  # noqa: E402
from memflow_jax.storyworld import scripts as SC  # noqa: E402

COLUMNS = (("adherence", "adherence"), ("smoothness", "smoothness (|dF|)"), ("latent_std", "latent std"))
STORY_COLUMNS = (("adherence", "adherence"), ("consistency_pass_rate", "reappear. pass"),
                 ("returns_measured", "returns measured"), ("smoothness", "smoothness (|dF|)"),
                 ("latent_std", "latent std"))


class CheckError(ValueError):
    """Inputs that cannot be checked (named, with the fix)."""


def held_out_clip(index: int, *, split_seed: int, num_frames: int, height: int, width: int, fps: int
                  ) -> tuple[str, np.ndarray, dict[str, Any]]:
    """(prompt, ground truth uint8 [T, H, W, 3], annotations) of held-out clip ``index``."""
    rng = E.eval_rng(split_seed, index)
    script = SC.sample_clip(rng, num_frames=num_frames)
    render_seed = int(rng.integers(0, 2**31 - 1))
    video, ann = R.render_video(script, render_seed, None, height, width, fps)
    return C.script_prompts(script)[0], video, ann


def load_config(teacher: str, text: str, vae: str, overrides: Sequence[str]):
    """The teacher's sections, then the text and codec sections of their own checkpoints, then overrides."""
    from memflow_jax import config as config_lib
    from memflow_jax.convert.common import read_converted_meta

    def sections(ckpt: str, names: Sequence[str], flag: str) -> dict[str, Any]:
        try:
            stored = read_converted_meta(ckpt)["config"]
        except FileNotFoundError as e:
            raise CheckError(f"{flag} {ckpt}: not a converted checkpoint ({e})") from e
        missing = [n for n in names if n not in stored]
        if missing:
            raise CheckError(f"{flag} {ckpt}: its config.json lacks section(s) {missing}")
        return {n: stored[n] for n in names}

    data = sections(teacher, ("model", "sampler"), "--teacher")
    data.update(sections(text, ("text",), "--text"))
    data.update(sections(vae, ("vae",), "--vae"))
    cfg = config_lib.from_dict(config_lib.merge(data, config_lib.parse_overrides(list(overrides))))
    from memflow_jax.pipeline import check_compatible

    check_compatible(cfg)
    return cfg


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from memflow_jax.convert.common import load_component
    from memflow_jax.diffusion import scheduler as sch
    from memflow_jax.io.video import pixels_to_uint8
    from memflow_jax.nn import dit, t5 as t5_nn, vae as vae_nn
    from memflow_jax.pipeline import _fit_context
    from memflow_jax.text.encoder import TextEncoder
    from memflow_jax.text.tokenizer import UMT5Tokenizer
    from memflow_jax.training.ode_pairs import solve

    t_start = time.perf_counter()
    cfg = load_config(args.teacher, args.text, args.vae, args.overrides)
    s, mcfg = cfg.sampler, cfg.model
    stride = vae_nn.time_stride(cfg.vae)
    if args.num_frames < 1 or (args.num_frames - 1) % stride:
        raise CheckError(f"--num-frames {args.num_frames}: a codec with time stride {stride} needs 1 + {stride}k "
                         f"video frames (the teacher's clips have 33)")
    num_latent = 1 + (args.num_frames - 1) // stride
    extra_prompts = read_prompts(args.prompts) if args.prompts else []
    mcfg32 = dataclasses.replace(mcfg, dtype="float32", param_dtype="float32")  # a check: float32 on any device
    params = load_component(args.teacher, "dit", dit.abstract_params(mcfg32))
    vparams = load_component(args.vae, "vae", vae_nn.abstract_params(cfg.vae))
    tok = UMT5Tokenizer(os.path.join(args.text, "tokenizer"), cfg.text.text_len)
    enc = TextEncoder(tok, load_component(args.text, "t5", t5_nn.abstract_params(cfg.text)), cfg.text)
    schedule = sch.make_schedule(s.timestep_shift, num_train_timesteps=s.num_train_timesteps,
                                 num_inference_steps=args.steps)
    fn = jax.jit(lambda p, z, c, u: solve(p, mcfg32, z, c, u, schedule, args.guidance_scale,
                                          args.guidance_sigma_max)[-1])
    neg = _fit_context(enc.encode([args.negative_prompt]), cfg)  # [1, L, D]
    h, w = s.latent_hw
    clips = [held_out_clip(i, split_seed=args.split_seed, num_frames=args.num_frames, height=s.height,
                           width=s.width, fps=s.fps) for i in range(args.num_clips)]
    gt = [E.score(v, a)[0] for _, v, a in clips]
    codec = [E.score(E.codec_roundtrip(types.SimpleNamespace(cfg=cfg, vae_params=vparams), v), a)[0]
             for _, v, a in clips]

    def sample(seed: int, index: int, prompt: str) -> tuple[np.ndarray, float]:
        """(decoded uint8 video [T, H, W, 3], std of the clean normalised latent) of one teacher solve."""
        noise = jax.random.normal(jax.random.fold_in(jax.random.key(seed), index), (1, num_latent, mcfg.in_dim, h, w))
        x0 = fn(params, noise, jnp.asarray(_fit_context(enc.encode([prompt]), cfg)), jnp.asarray(neg))
        video = pixels_to_uint8(np.asarray(vae_nn.decode(vparams, cfg.vae, x0)[0]))
        return video, float(np.std(np.asarray(x0)))

    runs, strips = [], []
    for seed in args.seeds:
        for i, (prompt, _, ann) in enumerate(clips):
            video, latent_std = sample(seed, i, prompt)
            m = E.score(video, ann)[0]
            rec = {"seed": seed, "clip": i, "prompt": prompt, "adherence": m["adherence"],
                   "smoothness": m["smoothness"], "latent_std": latent_std}
            runs.append(rec)
            log(f"seed {seed} clip {i}: adherence {rec['adherence']:.3f}, smoothness {rec['smoothness']:.4f}, "
                f"latent std {rec['latent_std']:.2f}  ({prompt})")
            if seed == args.seeds[0] and i < 4:  # one row of 11 evenly spaced frames
                strips.append(np.concatenate(list(video[np.linspace(0, video.shape[0] - 1, 11).astype(int)]), 1))
    extra = []
    for seed in args.seeds:
        for j, prompt in enumerate(extra_prompts):
            video, latent_std = sample(seed, 10_000 + j, prompt)
            rec = {"seed": seed, "prompt": prompt, "smoothness": float(M.temporal_smoothness(video)),
                   "latent_std": latent_std}
            extra.append(rec)
            log(f"seed {seed} extra prompt {j}: smoothness {rec['smoothness']:.4f}, latent std "
                f"{rec['latent_std']:.2f}  ({prompt})")
    story_report = check_stories(args, cfg, lambda z, c, u: fn(params, z, c, u), vparams, enc, neg, log) \
        if args.stories else None
    setup = {"teacher": args.teacher, "text": args.text, "vae": args.vae, "codec": cfg.vae.codec,
             "num_clips": args.num_clips, "seeds": list(args.seeds), "steps": args.steps,
             "guidance_scale": args.guidance_scale, "guidance_sigma_max": args.guidance_sigma_max,
             "negative_prompt": args.negative_prompt, "num_frames": args.num_frames, "split_seed": args.split_seed,
             "split": {"eval_spawn_key": E.EVAL_SPAWN_KEY}, "platform": platform.platform(), "jax": jax.__version__}
    if not runs:  # --num-clips 0: stories only
        report = {"benchmark": "storyworld_teacher_check", "setup": setup, "stories": story_report,
                  "total_seconds": time.perf_counter() - t_start}
        if args.json:
            E.write_json(args.json, report)
            log(f"wrote {args.json}")
        return report
    summary = {k: float(np.mean([r[k] for r in runs])) for k, _ in COLUMNS}
    per_seed = {k: [float(np.mean([r[k] for r in runs if r["seed"] == sd])) for sd in args.seeds] for k, _ in COLUMNS}
    rows = [("teacher", summary),
            ("ground truth through the codec", {"adherence": _mean(codec, "adherence"),
                                                "smoothness": _mean(codec, "smoothness"), "latent_std": 1.0}),
            ("ground truth", {"adherence": _mean(gt, "adherence"), "smoothness": _mean(gt, "smoothness")})]
    if extra:
        rows.append(("teacher, --prompts (no ground truth)",
                     {k: _mean(extra, k) for k in ("smoothness", "latent_std")}))
    table = "\n".join(["| | " + " | ".join(c for _, c in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"] + [
        f"| {name} | " + " | ".join(f"{row[k]:.3f}" if k in row else "–" for k, _ in COLUMNS) + " |"
        for name, row in rows])
    log("")
    log(table)
    log(f"cells: mean over {len(args.seeds)} seed(s) x {args.num_clips} held-out clip(s); latent std of the codec "
        f"row is the training data's by construction")
    if args.png and strips:
        from memflow_jax.io.video import frame_strip_png

        frame_strip_png(np.concatenate(strips, 0)[None], args.png, num_frames=None)  # one image, a row a clip
        log(f"wrote {args.png} (rows of 11 frames: the first {len(strips)} clips, seed {args.seeds[0]})")
    report = {"benchmark": "storyworld_teacher_check",
              "setup": setup,
              "summary": summary, "per_seed": per_seed, "ground_truth": rows[2][1],
              "ground_truth_through_codec": rows[1][1], "runs": runs, "extra_prompts": extra,
              "table": table, "stories": story_report,
              "total_seconds": time.perf_counter() - t_start}
    if args.json:
        E.write_json(args.json, report)
        log(f"wrote {args.json}")
    return report


def check_stories(args: argparse.Namespace, cfg: Any, solve_fn: Callable, vparams: Any, enc: Any, neg: np.ndarray,
                  log: Callable[[str], None]) -> dict[str, Any]:
    """``--stories``: held-out stories solved whole by the teacher (``solve_fn(noise, cond, uncond)`` -> clean
    latents, the clips' solver), a prompt per latent frame, scored with re-appearance; the ground truth and the ground
    truth through the codec are scored alongside."""
    import jax
    import jax.numpy as jnp

    from memflow_jax.io.video import pixels_to_uint8
    from memflow_jax.nn import vae as vae_nn
    from memflow_jax.pipeline import _fit_context
    from memflow_jax.training.rollout import frame_contexts

    s, mcfg = cfg.sampler, cfg.model
    stride, (h, w) = vae_nn.time_stride(cfg.vae), s.latent_hw
    n = args.story_latent or s.num_output_frames
    if n % s.chunk_frames:
        raise CheckError(f"--story-latent {n}: stories are whole chunks of sampler.chunk_frames={s.chunk_frames}")
    stories = [E.make_eval_script(i, split_seed=args.split_seed, num_latent=n, chunk=s.chunk_frames,
                                  t_stride=stride, height=s.height, width=s.width, fps=s.fps,
                                  late_memory=args.late_memory, min_absent=args.min_absent)
               for i in range(args.stories)]
    comp = types.SimpleNamespace(cfg=cfg, vae_params=vparams)
    gt = [E.score(e.video, e.annotations)[0] for e in stories]
    codec = [E.score(E.codec_roundtrip(comp, e.video), e.annotations)[0] for e in stories]

    def contexts(e: Any) -> jnp.ndarray:  # [1, F / patch_t, L, D]: each latent frame its segment's prompt
        seg = jnp.asarray(np.stack([_fit_context(enc.encode([p]), cfg)[0] for p in e.prompts]))[None]
        sw = jnp.asarray(np.asarray(e.latent_switch_frames, np.int32).reshape(1, -1))
        return frame_contexts(seg, sw, n, mcfg.patch_size[0])

    runs, strips, scored = [], [], []
    for seed in args.seeds:
        for i, e in enumerate(stories):
            ctx = contexts(e)
            noise = jax.random.normal(jax.random.fold_in(jax.random.key(seed), 20_000 + i), (1, n, mcfg.in_dim, h, w))
            x0 = solve_fn(noise, ctx, jnp.broadcast_to(jnp.asarray(neg)[:, None], ctx.shape))
            video = pixels_to_uint8(np.asarray(vae_nn.decode(vparams, cfg.vae, x0)[0]))
            metrics = E.score(video, e.annotations)[0]
            scored.append({"script": i, "seed": seed, "metrics": metrics})  # first looks' diversity, below
            rec = _story_record(metrics, seed=seed, story=i, latent_std=float(np.std(np.asarray(x0))))
            runs.append(rec)
            if seed == args.seeds[0] and i < 4:  # --story-png: the teacher's frames above the ground truth's
                pick = np.linspace(0, video.shape[0] - 1, 16).astype(int)
                strips += [np.concatenate(list(v[pick]), 1) for v in (video, e.video)]
            log(f"seed {seed} story {i}: adherence {rec['adherence']:.3f}, re-appearance pass "
                f"{rec['consistency_pass_rate']:.2f} ({rec['returns_measured']} of {rec['returns']} returns "
                f"measured), smoothness {rec['smoothness']:.4f}")
    first_looks = E.first_look_diversity(scored)
    log(f"first looks: {first_looks['measured']} object appearances measured; the same look under two seeds in "
        f"{first_looks['same_look_rate']:.2f} of {first_looks['seed_pairs']} pairs (random hidden attributes: "
        f"{first_looks['world_rate']:.3f}; ~1: one look per prompt)")
    cross = E.cross_seed_returns(scored)  # the teacher's own memory: its returns against other seeds' looks
    log(f"pass of measured returns: own {cross['own']['rate']:.2f} ({cross['own']['measured']} measured) vs other "
        f"seeds' {cross['cross']['rate']:.2f} ({cross['cross']['pairs']} pairs)")
    rows = [("teacher", {k: _mean(runs, k) for k, _ in STORY_COLUMNS}),
            ("ground truth through the codec", {k: _mean([_story_record(m) for m in codec], k)
                                                for k, _ in STORY_COLUMNS[:-1]}),
            ("ground truth", {k: _mean([_story_record(m) for m in gt], k) for k, _ in STORY_COLUMNS[:-1]})]
    table = "\n".join(["| stories | " + " | ".join(c for _, c in STORY_COLUMNS) + " |",
                       "|---" * (len(STORY_COLUMNS) + 1) + "|"] + [
        f"| {name} | " + " | ".join(f"{row[k]:.3f}" if k in row else "–" for k, _ in STORY_COLUMNS) + " |"
        for name, row in rows])
    log("")
    log(table)
    log(f"cells: mean over {len(args.seeds)} seed(s) x {len(stories)} held-out stories of {n} latent frames; "
        "returns measured: return events per story whose object the video shows whole on both sides of its gap")
    if args.story_png and strips:
        from memflow_jax.io.video import frame_strip_png

        frame_strip_png(np.concatenate(strips, 0)[None], args.story_png, num_frames=None)
        log(f"wrote {args.story_png} (16 frames a row: the teacher's story above its ground truth, the first "
            f"{len(strips) // 2} stories, seed {args.seeds[0]})")
    return {"num_stories": len(stories), "num_latent": n, "late_memory": args.late_memory, "first_looks": first_looks,
            "returns_cross_seed": cross, "min_absent": args.min_absent, "runs": runs, "rows": dict(rows),
            "table": table}


def _story_record(m: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The story columns of one scored video (``E.score``): re-appearance pass rate (0 when no return is
    measurable), measured and all return events, and each measured return's (distance, hue distance, pattern
    distance) (``metrics.reappearance_consistency``: passed iff distance <= 1)."""
    events = m["consistency_events"]
    measured = sum(1 for ev in events if ev["distance"] is not None and np.isfinite(ev["distance"]))
    rate = m["consistency_pass_rate"]
    return {**extra, "adherence": m["adherence"], "smoothness": m["smoothness"],
            "consistency_pass_rate": float(rate) if np.isfinite(rate) else 0.0,
            "returns_measured": measured, "returns": len(events),
            "return_distances": [[round(float(ev[k]), 3) for k in ("distance", "hue_distance", "pattern_distance")]
                                 for ev in events if ev["distance"] is not None and np.isfinite(ev["distance"])]}


def read_prompts(path: str) -> list[str]:
    """One prompt a non-empty line."""
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise CheckError(f"--prompts {path}: cannot read it ({e})") from e
    if not prompts:
        raise CheckError(f"--prompts {path}: no prompts (give one a line)")
    return prompts


def _mean(metrics: list[dict[str, Any]], key: str) -> float:
    return float(np.mean([m[key] for m in metrics]))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", required=True, help="converted teacher DiT checkpoint (train.py --export)")
    ap.add_argument("--text", required=True, help="converted checkpoint with t5 + tokenizer/")
    ap.add_argument("--vae", required=True, help="codec checkpoint with the teacher's latent statistics")
    ap.add_argument("--num-clips", type=int, default=8)
    ap.add_argument("--seeds", type=E._seeds, default=[0], help="comma-separated noise seeds")
    ap.add_argument("--steps", type=int, default=48, help="Euler steps (the odepairs stage uses 48)")
    ap.add_argument("--guidance-scale", type=float, default=3.0, help="the odepairs stage uses 3.0")
    ap.add_argument("--guidance-sigma-max", type=float, default=None, help="guide only the steps at sigma <= this "
                    "(scheduler.guidance_at; default every step)")
    ap.add_argument("--negative-prompt", default="", help="the storyworld recipes' negative prompt is empty")
    ap.add_argument("--num-frames", type=int, default=33, help="video frames a clip (the teacher's clips: 33)")
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--late-memory", action="store_true", help="--stories: held-out stories whose returning object "
                    "first enters after the first segment (storyworld_eval.py --late-memory)")
    ap.add_argument("--min-absent", type=int, default=0, help="--stories: held-out stories whose returning object "
                    "stays off screen at least this many latent frames (storyworld_eval.py --min-absent)")
    ap.add_argument("--prompts", default="", help="extra prompts, one a line, scored without a ground truth")
    ap.add_argument("--stories", type=int, default=0, help="also solve this many held-out stories whole, a prompt "
                    "per latent frame (a teacher_story teacher), scored with re-appearance")
    ap.add_argument("--story-latent", type=int, default=0, help="latent frames a story (default "
                    "sampler.num_output_frames)")
    ap.add_argument("--json", default="")
    ap.add_argument("--story-png", default="", help="with --stories: the first 4 stories as rows of 16 frames, "
                    "the teacher's above the ground truth's (first seed)")
    ap.add_argument("--png", default="", help="frame strips of the first 4 clips (first seed)")
    ap.add_argument("overrides", nargs="*", help="config overrides section.key=value")
    args = ap.parse_args(argv)
    if args.num_clips < 0 or args.stories < 0 or args.num_clips + args.stories < 1 or args.steps < 2:
        ap.error("--num-clips and --stories must be >= 0 (one of them >= 1) and --steps >= 2")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from memflow_jax import config as config_lib
    from memflow_jax.convert.common import ConversionError

    try:
        run(args)
    except (CheckError, ConversionError, config_lib.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
