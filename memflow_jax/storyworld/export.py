"""Export a storyworld dataset: ``python -m memflow_jax.storyworld.export --out DIR [--kind scripts] ...``.

Examples::

    # 1000 single-prompt 32-frame clips for teacher training
    python -m memflow_jax.storyworld.export --out data/sw_clips --kind clips --num 1000 --clip-frames 32
    # 200 switch scripts of exactly 4 segments and 96 frames
    python -m memflow_jax.storyworld.export --out data/sw_scripts --num 200 --num-segments 4 --num-frames 96
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence

from memflow_jax.storyworld import captions as C
from memflow_jax.storyworld import dataset as D
from memflow_jax.storyworld import render as R


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m memflow_jax.storyworld.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (created; files in it are overwritten)")
    p.add_argument("--kind", choices=D.KINDS, default="scripts",
                   help="single-prompt clips, multi-prompt scripts, or stories (scripts on the model's chunk grid)")
    p.add_argument("--num", type=int, default=100, help="number of examples")
    p.add_argument("--seed", type=int, default=0, help="master seed (same seed -> byte-identical export)")
    p.add_argument("--height", type=int, default=R.DEFAULT_HEIGHT, help="pixels, multiple of 8")
    p.add_argument("--width", type=int, default=R.DEFAULT_WIDTH, help="pixels, multiple of 8")
    p.add_argument("--fps", type=int, default=R.DEFAULT_FPS)
    p.add_argument("--storage", choices=D.STORAGES, default="auto",
                   help="arrayrecord (default when installed) or one file per example")
    p.add_argument("--workers", type=int, default=0, help="render processes (0/1: in this process)")
    p.add_argument("--max-objects", type=int, default=3)
    g = p.add_argument_group("clips")
    g.add_argument("--clip-frames", type=int, default=32, help="frames per clip")
    g.add_argument("--p-event", type=float, default=0.3, help="probability that a clip shows an enter / leave")
    g = p.add_argument_group("scripts")
    g.add_argument("--num-segments", type=int, default=None, help="3..6 (default: random per script)")
    g.add_argument("--num-frames", type=int, default=None, help="total frames of every script (default: random)")
    g.add_argument("--segment-frames", type=int, nargs=2, default=(16, 32), metavar=("MIN", "MAX"))
    g.add_argument("--frame-multiple", type=int, default=1, help="segment lengths are multiples of this")
    g.add_argument("--p-background-change", type=float, default=0.6)
    g = p.add_argument_group("stories (segment boundaries on latent chunk boundaries)")
    g.add_argument("--num-latent", type=int, default=36, help="latent frames per story (a multiple of --chunk)")
    g.add_argument("--chunk", type=int, default=3, help="latent frames per chunk (sampler.chunk_frames)")
    g.add_argument("--t-stride", type=int, default=4, help="the VAE's temporal stride (sampler.vae_stride[0])")
    g.add_argument("--p-late-memory", type=float, default=0.0,
                   help="probability that a story's returning object first enters after the first segment (so "
                        "after the frame sink; stories of 4+ segments)")
    g.add_argument("--min-absent", type=int, default=0,
                   help="every story re-drawn until each returning object is off screen >= this many latent frames "
                        "(beyond a local window of that size: only a memory can show it again); 0 = any return")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.kind == "clips":
        kw = dict(num_frames=args.clip_frames, max_objects=args.max_objects, p_event=args.p_event)
    elif args.kind == "stories":
        kw = dict(num_latent=args.num_latent, chunk=args.chunk, t_stride=args.t_stride, max_objects=args.max_objects,
                  p_late_memory=args.p_late_memory, min_absent=args.min_absent)
    else:
        kw = dict(num_segments=args.num_segments, num_frames=args.num_frames,
                  segment_frames=tuple(args.segment_frames), frame_multiple=args.frame_multiple,
                  max_objects=args.max_objects, p_background_change=args.p_background_change)
    t0 = time.time()
    out = D.write_dataset(args.out, kind=args.kind, num_examples=args.num, seed=args.seed, height=args.height,
                          width=args.width, fps=args.fps, storage=args.storage, workers=args.workers, **kw)
    src = D.StoryworldSource(out)
    ex = src[0]
    print(f"wrote {len(src)} {args.kind} to {out} ({src.storage}) in {time.time() - t0:.1f}s; "
          f"vocabulary {len(C.VOCABULARY)} tokens")
    print(json.dumps({"example_0": {"prompts": ex["prompts"], "start_frames": ex["start_frames"],
                                    "video": list(ex["video"].shape)}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
