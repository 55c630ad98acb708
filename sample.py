"""Generate a (multi-prompt) long video with MemFlow.

    python sample.py                                    # embedded default: the storyworld demo model + story
    python sample.py --ckpt none                        # tiny random-weight smoke run (configs/tiny.yaml)
    python sample.py --ckpt ckpts/memflow --config configs/wan_1_3b.yaml \
        --prompts timeline.jsonl --out out.mp4 [section.key=value ...]

The timeline file is described in memflow_jax/sampling/timeline.py (our JSONL with start times, the reference's
interactive JSONL, or a .txt with one prompt). Output: an .mp4 written atomically (+ latents with --save-latents).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "tiny.yaml")
DEFAULT_CKPT = os.path.join(ROOT, "memflow_jax", "assets", "storyworld")  # the bundled demo model (issue #7)
DEFAULT_PROMPTS = ("a red circle moves right on a sand background",
                   "the red circle leaves and the background turns blue")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None,
                   help="YAML config (with --ckpt: numerics / memory / sampler overrides; else default configs/tiny.yaml)")
    p.add_argument("--ckpt", default=None,
                   help="converted checkpoint dir (python -m memflow_jax.convert); default: the bundled storyworld "
                        "demo model when no --config is given; 'none' = random weights")
    p.add_argument("--prompts", default=None, help="timeline .jsonl / interactive .jsonl / .txt")
    p.add_argument("--prompt", default=None, help="a single prompt for the whole video")
    p.add_argument("--switch-frames", default=None,
                   help="comma-separated latent frames for the reference's interactive JSONL")
    p.add_argument("--out", default="outputs/sample.mp4", help="output .mp4")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--save-latents", action="store_true", help="also write <out>.latents.npy")
    p.add_argument("--no-vae", action="store_true", help="skip decoding; save latents only")
    p.add_argument("--offload-text-encoder", action="store_true", help="free the UMT5 params after encoding")
    p.add_argument("--text-device", choices=("default", "cpu"), default="default",
                   help="run UMT5 on this device (cpu keeps the 5.7B encoder off the accelerator)")
    p.add_argument("overrides", nargs="*", help="config overrides section.key=value")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from memflow_jax.runtime import apply_xla_defaults

    apply_xla_defaults()  # before the first JAX computation
    import numpy as np
    from tqdm import tqdm

    from memflow_jax import config as config_lib
    from memflow_jax.io.atomic import write_file
    from memflow_jax.io.video import Mp4Writer
    from memflow_jax.pipeline import config_from_checkpoint, generate, load_components
    from memflow_jax.sampling.timeline import Timeline, TimelineError, align_switches, load_timeline

    if args.ckpt is None and args.config is None and os.path.isfile(os.path.join(DEFAULT_CKPT, "config.json")):
        args.ckpt = DEFAULT_CKPT
        if not (args.prompts or args.prompt):
            from memflow_jax.storyworld.package import STORY_FILE  # the default story

            args.prompts = os.path.join(DEFAULT_CKPT, STORY_FILE)
    if args.ckpt == "none":
        args.ckpt = None
    try:
        if args.ckpt:
            cfg = config_from_checkpoint(args.ckpt, args.overrides, args.config)
        else:
            cfg = config_lib.load(args.config or DEFAULT_CONFIG, args.overrides)
        s = cfg.sampler
        num_frames = s.num_output_frames
        switches = [int(x) for x in args.switch_frames.split(",")] if args.switch_frames else None
        if args.prompts and args.prompt:
            raise TimelineError("give --prompts FILE or --prompt TEXT, not both")
        if args.prompts:
            timeline = load_timeline(args.prompts, chunk=s.chunk_frames, num_frames=num_frames, fps=s.fps,
                                     switch_frames=switches)
        elif args.prompt:
            timeline = Timeline((args.prompt,), ())
        else:  # embedded default: two prompts, switch half way
            half = (num_frames // 2) // s.chunk_frames * s.chunk_frames
            timeline = Timeline(DEFAULT_PROMPTS, align_switches([half], s.chunk_frames, num_frames))
    except (config_lib.ConfigError, TimelineError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import jax

    text_device = jax.devices("cpu")[0] if args.text_device == "cpu" else None
    comp = load_components(cfg, args.ckpt, seed=args.seed if args.seed is not None else s.seed,
                           text_device=text_device)
    if args.no_vae:  # latents only: no decode (the VAE's programs are not even compiled)
        comp = dataclasses.replace(comp, vae_params=None)
    if comp.random_weights:
        print("NOTE: running with RANDOM weights (a smoke run; the video is noise). Without --ckpt / --config, "
              "sample.py uses the bundled storyworld model; see README 'Real weights' for the released model.")
    n_chunks = num_frames // s.chunk_frames
    print(f"prompts: {list(timeline.prompts)}  switches at latent frames {list(timeline.switch_frames)}  "
          f"{num_frames} latent frames in {n_chunks} chunks, memory={cfg.memory.mode}"
          f"{'+sma' if cfg.memory.sma else ''}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)) or ".", exist_ok=True)
    bar = tqdm(total=n_chunks, unit="chunk")
    t0 = time.time()
    writer = None if args.no_vae else Mp4Writer(args.out, fps=s.fps)

    def on_chunk(i, lat, pix):
        if writer is not None and pix is not None:
            writer.append(pix[0])
        bar.update(1)

    try:
        lat = generate(comp, timeline, num_frames=num_frames,
                       seed=args.seed if args.seed is not None else s.seed,
                       offload_text_encoder=args.offload_text_encoder, on_chunk=on_chunk)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is not None:
        writer.close()
    bar.close()
    if args.save_latents or args.no_vae:
        path = os.path.splitext(args.out)[0] + ".latents.npy"
        write_file(path, lambda tmp: np.save(tmp, lat))
        print(f"latents {lat.shape} -> {path}")
    dt = time.time() - t0
    if writer is not None:
        print(f"wrote {args.out} ({writer.num_frames} frames at {s.fps} fps) in {dt:.1f}s")
    return 0


if __name__ == "__main__":
    warnings.simplefilter("default")
    sys.exit(main())
