"""Teacher ODE trajectories for the causal ODE-regression init (``train.recipe=ode_init``).

    python -m memflow_jax.training.ode_pairs --config configs/ode_init.yaml --out data/ode_pairs \
        [--num-samples N] [--steps 48] [--guidance-scale 5.0] [--shift 5.0] [--format npz|arrayrecord] [k=v ...]

For each prompt the bidirectional teacher (``teacher_model`` section, weights ``run.teacher_ckpt``; random with
``run.synthetic_data=true``) integrates the flow ODE from Gaussian noise with ``--steps`` Euler steps on the
shifted sigma table (``x <- x + flow · (σ_next - σ)``, the last step to σ = 0) under classifier-free guidance
``uncond + g · (cond - uncond)`` (Wan sampling convention; ``uncond`` = ``train.negative_prompt``;
``--guidance-sigma-max`` guides only the steps at or below that sigma, ``scheduler.guidance_at``). The states at
the grid points nearest to the generator's warped denoising timesteps, then the final clean latent, form
``ode_latent [S + 1, F, C, h, w]`` (``--dtype``: float32, or float16 for large latents such as the pixel codec's).

Output (readable by :class:`memflow_jax.data.OdeTrajectorySource` / ``ArrayRecordSource``): ``ode_XXXXXX.npz``
(``ode_latent`` float32 + ``prompt``) per sample or one ``ode_pairs.array_record``, plus ``ode_pairs.json``
(timesteps recorded, solver settings).

``--stories DIR`` (a storyworld ``stories`` export; npz only): one trajectory per story, of the story's latent
length, each latent frame conditioned on its own segment's prompt (:func:`rollout.frame_contexts`; the teacher a
``teacher_story`` one) and the negative prompt on every frame; each file keeps the story's ``prompts`` and
``latent_switch_frames`` (and ``latent_returns`` where the export has them: the return-weighted loss's)
(``ode_pairs.json``: ``"kind": "stories"``). The ``ode_story`` recipe reads them
(:class:`memflow_jax.training.trainer.StoryOdeSource`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from memflow_jax.diffusion import scheduler as sch
from memflow_jax.nn import dit


def record_indices(grid_timesteps: np.ndarray, targets: Sequence[float]) -> np.ndarray:
    """Index of the Euler grid point nearest to each target timestep (first on ties)."""
    g = np.asarray(grid_timesteps, np.float64)
    return np.asarray([int(np.argmin(np.abs(g - float(t)))) for t in targets], np.int32)


def solve(params: Any, mcfg: Any, noise: jnp.ndarray, cond: jnp.ndarray, uncond: jnp.ndarray,
          schedule: sch.FlowMatchSchedule, guidance_scale: float,
          guidance_sigma_max: float | None = None) -> jnp.ndarray:
    """Euler flow ODE from ``noise`` [B, F, C, h, w]; returns every state [N + 1, B, F, C, h, w] (state ``i`` is
    the input of step ``i``; the last is the clean result). ``guidance_sigma_max``: ``scheduler.guidance_at``."""
    sig = schedule.sigmas
    ts = schedule.timesteps
    n = sig.shape[0]
    sig_next = jnp.concatenate([sig[1:], jnp.zeros((1,), sig.dtype)])

    def step(x, i):
        b, f = x.shape[:2]
        t = jnp.full((2 * b,), ts[i], jnp.float32)
        xx = jnp.concatenate([x, x], 0).transpose(0, 2, 1, 3, 4)
        ctx = jnp.concatenate([cond, uncond], 0)
        flow = dit.forward(params, mcfg, xx, t, ctx).transpose(0, 2, 1, 3, 4)
        fc, fu = flow[:b], flow[b:]
        g = sch.guidance_at(sig[i], guidance_scale, guidance_sigma_max, unguided=1.0).astype(fc.dtype)  # 1 or s
        v = fu + g * (fc - fu)
        x_new = (x.astype(jnp.float32) + v * (sig_next[i] - sig[i])).astype(x.dtype)
        return x_new, x

    last, states = jax.lax.scan(step, noise, jnp.arange(n))
    return jnp.concatenate([states, last[None]], 0)


def _text_cache(t: Any) -> Any:
    from memflow_jax.data import TextEmbeddingCache

    if not t.text_cache_dir:
        raise SystemExit("train.text_cache_dir is empty: build the UMT5 cache first (memflow_jax.data.text_cache)")
    return TextEmbeddingCache(t.text_cache_dir, as_dtype=np.float32)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m memflow_jax.training.ode_pairs", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True, help="output folder (created)")
    ap.add_argument("--num-samples", type=int, default=None, help="default: every prompt (run.synthetic_size "
                    "with synthetic data)")
    ap.add_argument("--steps", type=int, default=48, help="Euler steps")
    ap.add_argument("--guidance-scale", type=float, default=5.0)
    ap.add_argument("--guidance-sigma-max", type=float, default=None, help="guide only the steps at sigma <= this "
                    "(a guidance interval; above it the conditional flow alone); default: every step")
    ap.add_argument("--shift", type=float, default=None, help="sigma-table shift (default sampler.timestep_shift)")
    ap.add_argument("--batch-size", type=int, default=None, help="prompts per solve (default: the data-parallel "
                    "device count)")
    ap.add_argument("--format", choices=("npz", "arrayrecord"), default="npz")
    ap.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                    help="stored dtype of the trajectories (float16 halves the files; read back as float32)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stories", default=None, help="a storyworld stories export: one trajectory per story, a prompt "
                    "per latent frame (the ode_story recipe's data)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    if args.stories and args.format != "npz":
        raise SystemExit("--stories writes npz files (one per story with its prompts and switch frames): drop "
                         "--format arrayrecord")

    from memflow_jax import config as cfg_lib
    from memflow_jax.training import rollout as ro
    from memflow_jax.training import sharding as sh
    from memflow_jax.training import trainer as tr

    tr.init_distributed()
    cfg = cfg_lib.load(args.config, args.overrides)
    t, r = cfg.train, cfg.run
    tcfg = tr.with_numerics(cfg.teacher_model, t)
    if args.steps < 2:
        raise SystemExit("--steps must be >= 2")
    mesh = sh.make_mesh(t.mesh_data, t.mesh_fsdp, t.mesh_tensor)
    n_dp = int(np.prod([mesh.shape[a] for a in sh.DEFAULT_RULES.mesh_axes("batch") if a in mesh.axis_names]))
    bs = args.batch_size or n_dp
    if bs % n_dp:
        raise SystemExit(f"--batch-size {bs} must be a multiple of the {n_dp} data-parallel devices")
    abstract = dit.abstract_params(tcfg)
    shardings = sh.param_shardings(abstract, mesh)
    if r.teacher_ckpt and (os.path.exists(r.teacher_ckpt) or not r.synthetic_data):
        params = sh.shard_params(tr.load_dit_host(r.teacher_ckpt, tcfg, "run.teacher_ckpt"), shardings)
    elif r.synthetic_data:
        params = jax.jit(lambda k: tr.synthetic_init(tcfg, k), out_shardings=shardings)(jax.random.key(args.seed))
    else:
        raise SystemExit("run.teacher_ckpt is empty (or set run.synthetic_data=true for a random teacher)")

    stories = None
    if args.stories:
        if r.synthetic_data and not t.text_cache_dir:
            embedder: Any = tr.SyntheticEmbedder(tcfg.text_len, tcfg.text_dim, t.data_seed)
        else:
            embedder = _text_cache(t)
        stories = tr.StorySource(args.stories, embedder, videos=False)
        if stories.chunk != cfg.sampler.chunk_frames:
            raise SystemExit(f"{args.stories}: segment boundaries on chunks of {stories.chunk} latent frames, the "
                             f"generator's sampler.chunk_frames is {cfg.sampler.chunk_frames}: re-export the stories "
                             f"with --chunk {cfg.sampler.chunk_frames}")
        prompts = []  # a story's prompts come with it (stories[i])
    elif r.synthetic_data and not (t.text_cache_dir and os.path.exists(t.data_path)):
        source = tr.SyntheticPromptSource(r.synthetic_size)
        embedder = tr.SyntheticEmbedder(tcfg.text_len, tcfg.text_dim, t.data_seed)
        prompts = [str(source[i]["prompts"]) for i in range(len(source))]
    else:
        from memflow_jax.data import PromptSource

        source = PromptSource(t.data_path)
        embedder = _text_cache(t)
        prompts = [str(source[i]["prompts"]) for i in range(len(source))]
    total = len(stories) if stories is not None else len(prompts)
    n = total if args.num_samples is None else min(args.num_samples, total)
    shift = cfg.sampler.timestep_shift if args.shift is None else args.shift
    schedule = sch.make_schedule(shift, num_train_timesteps=cfg.sampler.num_train_timesteps,
                                 num_inference_steps=args.steps)
    targets = ro.rollout_config(cfg, 1).timesteps
    rec = record_indices(np.asarray(schedule.timesteps), targets)
    h, w = cfg.sampler.latent_hw
    frames = stories.num_latent if stories is not None else t.num_training_frames
    shape = (frames, tcfg.in_dim, h, w)
    bsh = sh.batch_sharding(mesh, bs)
    keep = jnp.asarray(list(rec) + [-1])  # states at the denoising timesteps, then the clean latent
    fn = jax.jit(lambda p, z, c, u: solve(p, tcfg, z, c, u, schedule, args.guidance_scale,
                                          args.guidance_sigma_max)[keep],
                 in_shardings=(shardings, bsh, bsh, bsh))
    neg = np.asarray(embedder[t.negative_prompt], np.float32)
    main_proc = jax.process_index() == 0
    if main_proc:
        os.makedirs(args.out, exist_ok=True)
    records = []
    from jax.experimental import multihost_utils

    for start in range(0, n, bs):
        idx = list(range(start, min(start + bs, n)))
        pad = idx + [idx[-1]] * (bs - len(idx))
        noise = np.stack([np.random.default_rng([args.seed, i]).standard_normal(shape).astype(np.float32)
                          for i in pad])
        if stories is not None:  # a prompt per (patch) frame [B, F', L, D]
            items = [stories[i] for i in pad]
            cond = np.asarray(ro.frame_contexts(jnp.asarray(np.stack([it["contexts"] for it in items])),
                                                jnp.asarray(np.stack([it["switch_frames"] for it in items])),
                                                frames, tcfg.patch_size[0]))
        else:
            cond = np.stack([np.asarray(embedder[prompts[i]], np.float32) for i in pad])
        unc = np.broadcast_to(neg, cond.shape)
        put = lambda a: jax.make_array_from_callback(a.shape, bsh, lambda s, a=a: a[s])  # noqa: E731
        states = fn(params, put(noise), put(cond), put(np.ascontiguousarray(unc)))  # [S+1, B, F, C, h, w]
        states = np.asarray(multihost_utils.process_allgather(states, tiled=True))
        for j, i in enumerate(idx):
            ode = np.ascontiguousarray(states[:, j]).astype(args.dtype)
            if stories is not None and main_proc:
                story = stories.records[i]
                extra = {"latent_returns": np.asarray(story["latent_returns"], np.int32).reshape(-1, 3)} \
                    if "latent_returns" in story else {}  # the return-weighted loss's (train.story_return_weight)
                np.savez(os.path.join(args.out, f"ode_{i:06d}.npz"), ode_latent=ode,
                         prompts=np.asarray(list(story["prompts"])),
                         latent_switch_frames=np.asarray(list(story["latent_switch_frames"]), np.int32), **extra)
            elif args.format == "npz" and main_proc:
                np.savez(os.path.join(args.out, f"ode_{i:06d}.npz"), ode_latent=ode, prompt=np.asarray(prompts[i]))
            elif args.format == "arrayrecord":
                records.append({"ode_latent": ode, "prompts": prompts[i]})
        print(f"ode pairs: {min(start + bs, n)}/{n}", file=sys.stderr, flush=True)
    if main_proc:
        if args.format == "arrayrecord":
            from memflow_jax.data import write_array_record

            write_array_record(os.path.join(args.out, "ode_pairs.array_record"), records)
        meta = {"count": n, "steps": args.steps, "shift": shift, "guidance_scale": args.guidance_scale,
                "guidance_sigma_max": args.guidance_sigma_max,
                "denoising_timesteps": [float(x) for x in targets],
                "recorded_grid_timesteps": [float(np.asarray(schedule.timesteps)[i]) for i in rec],
                "layout": "ode_latent [S+1, F, C, h, w]: states at the denoising timesteps, then the clean latent",
                "teacher_ckpt": r.teacher_ckpt or "synthetic", "format": args.format, "dtype": args.dtype,
                "kind": "stories" if stories is not None else "clips", "num_latent": frames}
        if stories is not None:
            meta["stories"] = os.path.abspath(args.stories)
        with open(os.path.join(args.out, "ode_pairs.json"), "w") as f:
            json.dump(meta, f, indent=1)
        print(f"wrote {n} ODE pairs to {os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
