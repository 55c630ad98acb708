"""Encode a storyworld dataset to normalised VAE latents (the data of the teacher / ODE recipes).

    python -m memflow_jax.data.encode_latents --config configs/storyworld.yaml --vae RUN_OR_CONVERTED_DIR \\
        --data STORYWORLD_DATASET_DIR --out OUT_DIR [--batch-size 8] [--stats-from-samples 512] [--stats channel] \\
        [--frames N] [section.key=value ...]

``--data`` may be repeated (several dataset folders; their items are numbered in order). ``--segment-windows`` (with
``--frames N``) encodes, instead of each video's first N frames with its first prompt, the first N frames of every
prompt segment at least N frames long, with that segment's prompt: a narrative script's continuation segments
("the small red square leaves ...") become single-prompt training clips, and a one-segment clip stays itself.

``--vae``: a ``train.recipe=vae`` run folder (newest checkpoint, EMA params if saved), a converted checkpoint
folder or a ``Wan2.1_VAE.pth`` (:func:`memflow_jax.training.trainer.load_vae_host`); its architecture is the
config's ``vae`` section. With ``vae.codec=pixel`` (the parameter-free codec) no ``--vae`` is needed.

Pass 1 encodes (posterior mean ``mu``, no sampling) a seeded subset of ``--stats-from-samples`` clips and
measures the mean / std of their latents, per channel (``--stats channel``, the Wan VAE's convention) or one
value over all channels (``--stats global``: keeps the channels' relative scales, e.g. a PCA codec's variance
spectrum, so diffusion noise drowns the weak high-frequency components first, as in pixel space); pass 2 encodes
every clip and writes ``(mu - mean) * (1 / std)``, the convention of ``vae.encode(normalize=True)`` with
``vae.latent_mean`` / ``vae.latent_std`` set to the measured values (so a sampler decoding with that config inverts
it).

Output folder::

    latents/<i>.npz    ``latents`` float32 [F, C, h, w] + ``prompt`` (the clip's first prompt, or the window's
                       segment's): LatentSource (of ``OUT_DIR`` or ``OUT_DIR/latents``: the only sample files there)
    latents.jsonl      the same as a manifest (LatentSource.from_manifest)
    prompts.txt        every item's prompt, one a line, in a --seed shuffled order (a PromptSource for the ODE-pair
                       and DMD stages: with --segment-windows it holds the continuation prompts too)
    vae/               converted checkpoint: component "vae" + config.json whose vae section has the statistics
    vae_stats.json     {"latent_mean": [...], "latent_std": [...], ...}; written last (a finished run)

and it prints the config overrides ``vae.latent_mean=[...] vae.latent_std=[...]`` for later stages. Every file is
written atomically; a rerun overwrites.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable, Iterator, Sequence

import numpy as np

STD_FLOOR = 1e-6


class EncodeError(ValueError):
    """Inputs that do not fit together (resolution, clip length, VAE architecture, ...)."""


STATS_MODES = ("channel", "global")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m memflow_jax.data.encode_latents", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML whose vae / sampler sections describe the VAE and video")
    p.add_argument("--vae", default="", help="vae-recipe run folder | converted checkpoint folder | .pth (not needed "
                   "with vae.codec=pixel)")
    p.add_argument("--data", required=True, action="append",
                   help="storyworld dataset folder (python -m memflow_jax.storyworld.export); repeat for several")
    p.add_argument("--segment-windows", action="store_true",
                   help="encode the first --frames frames of every prompt segment that long, with its prompt")
    p.add_argument("--out", required=True, help="output folder (created; existing files are replaced)")
    p.add_argument("--batch-size", type=int, default=8, help="clips per encoder call")
    p.add_argument("--stats-from-samples", type=int, default=512,
                   help="clips (seeded random subset) whose latents give the per-channel mean / std")
    p.add_argument("--stats", choices=STATS_MODES, default="channel",
                   help="channel: a mean / std per latent channel; global: one mean / std over all channels")
    p.add_argument("--frames", type=int, default=None,
                   help="encode the first N frames of every video (N = 1 + k * time stride); default: the whole "
                        "video, which must then have that form and the same length for every clip")
    p.add_argument("--seed", type=int, default=0, help="seed of the statistics subset")
    p.add_argument("--workers", type=int, default=4, help="threads reading / decoding records")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="stored dtype of the latent files (float16 halves them, e.g. for the pixel codec's 192 "
                        "channels; readers cast back)")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    return p


# --------------------------------------------------------------------------------------------------
# Checks and batching
# --------------------------------------------------------------------------------------------------


def clip_frames(lengths: np.ndarray, frames: int | None, time_stride: int) -> int:
    """Frames encoded per clip: ``frames`` or the common video length; checked to be ``1 + time_stride * k``."""
    if frames is None:
        distinct = sorted(set(int(x) for x in lengths))
        if len(distinct) > 1:
            raise EncodeError(f"videos have different lengths ({distinct[:8]}{' ...' if len(distinct) > 8 else ''} "
                              f"frames); pass --frames N (N = 1 + {time_stride}k <= {distinct[0]}) to encode the "
                              "first N frames of each")
        frames = distinct[0]
        where = f"the videos have {frames} frames"
    else:
        where = f"--frames {frames}"
    if frames < 1 or (frames - 1) % time_stride:
        lo = 1 + max(frames - 1, 0) // time_stride * time_stride
        raise EncodeError(f"{where}, but the VAE encodes T = 1 + {time_stride}k frames (1, {1 + time_stride}, "
                          f"{1 + 2 * time_stride}, ...): pass --frames {lo}, or export clips of such a length "
                          f"(storyworld.export --clip-frames {lo + time_stride})")
    short = int((lengths < frames).sum())
    if short:
        raise EncodeError(f"{short} video(s) are shorter than {frames} frames (shortest {int(lengths.min())}); pass "
                          "a smaller --frames")
    return int(frames)


def _batches(indices: Sequence[int], batch_size: int) -> list[list[int]]:
    return [list(indices[i:i + batch_size]) for i in range(0, len(indices), batch_size)]


def _prefetch(fn: Callable[[list[int]], Any], batches: list[list[int]], workers: int,
              depth: int = 2) -> Iterator[Any]:
    """``fn(batch)`` for every batch in order, at most ``depth`` batches read ahead in a thread pool."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        queue: collections.deque = collections.deque()
        it = iter(batches)
        for b in it:
            queue.append(pool.submit(fn, b))
            if len(queue) > depth:
                break
        while queue:
            yield queue.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                queue.append(pool.submit(fn, nxt))


def _format_floats(values: Sequence[float]) -> str:
    """``[a,b,...]`` with the shortest digits that round-trip each value as float32 (no spaces: one shell word)."""
    return "[" + ",".join(np.format_float_positional(np.float32(v), unique=True, trim="0") for v in values) + "]"


# --------------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------------


def make_encoder(params: Any, vae_cfg: Any) -> Callable[[np.ndarray], np.ndarray]:
    """``fn(uint8 video [B, T, H, W, 3]) -> raw mu [B, T', z, h, w]`` float32 (one compile per batch shape)."""
    import jax

    from memflow_jax.nn import vae as vae_lib

    params = jax.device_put(params)

    @jax.jit
    def enc(p, video):
        return vae_lib.encode(p, vae_cfg, vae_lib.video_to_input(video), normalize=False)  # [B, T', z, h, w]

    return lambda video: np.asarray(enc(params, video), np.float32)


def segment_windows(records: Sequence[dict[str, Any]], frames: int) -> list[tuple[int, int, str]]:
    """``(example, start frame, prompt)`` of every prompt segment with at least ``frames`` frames (index.jsonl
    records: ``num_frames``, ``start_frames``, ``prompts``)."""
    out = []
    for i, r in enumerate(records):
        starts, n = [int(x) for x in r["start_frames"]], int(r["num_frames"])
        if len(starts) != len(r["prompts"]):
            raise EncodeError(f"example {i}: {len(starts)} start frames but {len(r['prompts'])} prompts")
        for start, end, prompt in zip(starts, starts[1:] + [n], r["prompts"]):
            if end - start >= frames:
                out.append((i, start, str(prompt)))
    return out


def encode_dataset(cfg: Any, vae_params: Any, data_dir: str | Sequence[str], out_dir: str, batch_size: int = 8,
                   stats_from_samples: int = 512, frames: int | None = None, seed: int = 0, workers: int = 4,
                   progress: bool = True, log: Callable[[str], None] = print,
                   dtype: str = "float32", stats: str = "channel", windows: bool = False) -> dict[str, Any]:
    """Both passes (see the module docstring); returns the statistics record written to ``vae_stats.json``."""
    from memflow_jax.convert.common import save_converted
    from memflow_jax.data.latents import manifest_line, write_latent_file
    from memflow_jax.io.atomic import write_text
    from memflow_jax.nn import vae as vae_lib
    from memflow_jax.storyworld.dataset import StoryworldSource

    if batch_size < 1:
        raise EncodeError(f"--batch-size {batch_size} must be >= 1")
    if stats_from_samples < 1:
        raise EncodeError(f"--stats-from-samples {stats_from_samples} must be >= 1")
    if stats not in STATS_MODES:
        raise EncodeError(f"--stats {stats!r}: expected one of {STATS_MODES}")
    vcfg, s = cfg.vae, cfg.sampler
    ts, ss = vae_lib.time_stride(vcfg), vae_lib.space_stride(vcfg)
    dirs = [data_dir] if isinstance(data_dir, (str, os.PathLike)) else list(data_dir)
    if not dirs:
        raise EncodeError("no --data folder given")
    sources = [StoryworldSource(d) for d in dirs]
    for d, src in zip(dirs, sources):
        h, w = int(src.meta["height"]), int(src.meta["width"])
        if (h, w) != (s.height, s.width):
            raise EncodeError(f"{d}: videos are {h}x{w} px, the config's sampler.height x width is "
                              f"{s.height}x{s.width}; export the dataset at that size (storyworld.export --height "
                              f"{s.height} --width {s.width}) or fix the config")
    if s.height % ss or s.width % ss:
        raise EncodeError(f"{s.height}x{s.width} px is not a multiple of the VAE's spatial stride {ss}")
    try:
        records = [src.index_records() for src in sources]
    except ValueError as e:
        raise EncodeError(str(e)) from None
    # items: (dataset, example, first frame, prompt)
    if windows:
        if frames is None:
            raise EncodeError("--segment-windows needs --frames N (the window length, 1 + time stride * k)")
        nf = clip_frames(np.asarray([frames]), frames, ts)
        items = [(k, i, start, p) for k, recs in enumerate(records) for i, start, p in segment_windows(recs, nf)]
        if not items:
            raise EncodeError(f"no prompt segment has {nf} frames: pass a smaller --frames")
    else:
        lengths = np.asarray([int(r["num_frames"]) for recs in records for r in recs], np.int64)
        nf = clip_frames(lengths, frames, ts)
        items = [(k, i, 0, str(r["prompts"][0])) for k, recs in enumerate(records) for i, r in enumerate(recs)]
    n = len(items)
    encode = make_encoder(vae_params, vcfg)

    def load(batch: list[int]) -> tuple[list[int], np.ndarray, list[str]]:
        decoded: dict[tuple[int, int], np.ndarray] = {}  # a script's windows share one decode
        clips = []
        for j in batch:
            k, i, start, _ = items[j]
            if (k, i) not in decoded:
                decoded[(k, i)] = sources[k][i]["video"]
            clips.append(decoded[(k, i)][start:start + nf])
        video = np.stack(clips)  # [b, nf, H, W, 3] uint8
        if len(batch) < batch_size:  # pad: one compiled shape for every batch
            video = np.concatenate([video, np.repeat(video[-1:], batch_size - len(batch), axis=0)])
        return batch, video, [items[j][3] for j in batch]

    def bar(total: int, desc: str):
        if not progress:
            return None
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="clip", dynamic_ncols=True)

    # pass 1: statistics of mu over a seeded subset (float64 accumulators per channel)
    rng = np.random.default_rng(seed)
    subset = np.sort(rng.choice(n, size=min(stats_from_samples, n), replace=False)).tolist()
    z = vcfg.z_dim
    s1, s2, count = np.zeros(z), np.zeros(z), 0
    pb = bar(len(subset), "stats")
    for batch, video, _ in _prefetch(load, _batches(subset, batch_size), workers):
        mu = encode(video)[:len(batch)].astype(np.float64)  # [b, T', z, h, w]
        s1 += mu.sum(axis=(0, 1, 3, 4))
        s2 += np.square(mu).sum(axis=(0, 1, 3, 4))
        count += mu.size // z
        if pb is not None:
            pb.update(len(batch))
    if pb is not None:
        pb.close()
    if stats == "global":  # one value for every channel: vae.latent_mean / latent_std of length 1 broadcast
        s1, s2, count = s1.sum(keepdims=True), s2.sum(keepdims=True), count * z
    mean = s1 / count
    std = np.sqrt(np.maximum(s2 / count - np.square(mean), 0.0))
    if (std < STD_FLOOR).any():
        log(f"warning: latent channel(s) {np.flatnonzero(std < STD_FLOOR).tolist()} are constant over the "
            f"statistics subset (std < {STD_FLOOR}); their std is floored to {STD_FLOOR}")
        std = np.maximum(std, STD_FLOOR)
    mean32, std32 = mean.astype(np.float32), std.astype(np.float32)
    inv_std = np.float32(1.0) / std32  # the float32 factor vae.encode(normalize=True) multiplies by

    # pass 2: every clip, normalised, one file each
    lat_dir = os.path.join(out_dir, "latents")
    os.makedirs(lat_dir, exist_ok=True)
    lines, shape = [], None
    pb = bar(n, "encode")
    for batch, video, prompts in _prefetch(load, _batches(list(range(n)), batch_size), workers):
        mu = encode(video)[:len(batch)]  # [b, T', z, h, w]
        lat = (mu - mean32[None, None, :, None, None]) * inv_std[None, None, :, None, None]
        for i, x, prompt in zip(batch, lat, prompts):
            name = f"{i:06d}.npz"
            write_latent_file(os.path.join(lat_dir, name), x.astype(dtype), prompt)
            lines.append(manifest_line(os.path.join("latents", name), prompt))
        shape = tuple(lat.shape[1:])
        if pb is not None:
            pb.update(len(batch))
    if pb is not None:
        pb.close()
    write_text(os.path.join(out_dir, "latents.jsonl"), "\n".join(lines) + "\n")
    # every item's prompt in a seeded order, so any first N (ode_pairs --num-samples) mixes clips and windows
    order = np.random.default_rng([seed, 1]).permutation(n)
    write_text(os.path.join(out_dir, "prompts.txt"), "\n".join(items[j][3] for j in order) + "\n")

    stats_cfg = cfg.replace(vae=dataclasses.replace(
        vcfg, latent_mean=tuple(float(v) for v in mean32), latent_std=tuple(float(v) for v in std32)))
    config_dict = stats_cfg.checkpoint_dict()
    stats = {"latent_mean": [float(v) for v in mean32], "latent_std": [float(v) for v in std32],
             "stats": stats, "num_clips": n, "stats_from_samples": len(subset), "frames": nf,
             "latent_shape": list(shape), "segment_windows": bool(windows),
             "data": [os.path.abspath(d) for d in dirs] if len(dirs) > 1 else os.path.abspath(dirs[0])}
    save_converted(os.path.join(out_dir, "vae"), {"vae": vae_params}, config_dict,
                   extra_meta={"latent_stats": {k: stats[k] for k in ("latent_mean", "latent_std")}})
    write_text(os.path.join(out_dir, "vae_stats.json"), json.dumps(stats, indent=1, sort_keys=True) + "\n")
    return stats


def overrides_line(stats: dict[str, Any]) -> str:
    """``vae.latent_mean=[...] vae.latent_std=[...]`` for later stages' command lines."""
    mean, std = _format_floats(stats["latent_mean"]), _format_floats(stats["latent_std"])
    return f"vae.latent_mean={mean} vae.latent_std={std}"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from memflow_jax import config as config_lib
    from memflow_jax.convert.common import ConversionError
    from memflow_jax.training import trainer as trainer_lib  # registers the train / run sections; load_vae_host

    t0 = time.time()
    try:
        cfg = config_lib.load(args.config, args.overrides)
        if not args.vae and cfg.vae.codec != "pixel":
            raise EncodeError("--vae is required: a vae-recipe run folder, a converted checkpoint or a .pth (only "
                              "vae.codec=pixel needs none)")
        params = trainer_lib.load_vae_host(args.vae, cfg.vae, "--vae")
        stats = encode_dataset(cfg, params, args.data, args.out, batch_size=args.batch_size,
                               stats_from_samples=args.stats_from_samples, frames=args.frames, seed=args.seed,
                               workers=args.workers, dtype=args.dtype, stats=args.stats,
                               windows=args.segment_windows)
    except (EncodeError, ConversionError, config_lib.ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {stats['num_clips']} latent clips {stats['latent_shape']} [F, C, h, w] to "
          f"{os.path.join(args.out, 'latents')} in {time.time() - t0:.1f}s; VAE + statistics in "
          f"{os.path.join(args.out, 'vae')}")
    print(f"teacher data: train.latent_data_path={args.out} (its latents/ files; train.num_training_frames="
          f"{stats['latent_shape'][0]})")
    print(overrides_line(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
