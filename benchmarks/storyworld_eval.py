"""Storyworld memory evaluation: does the streaming model keep a returning object's hidden attribute?

For N held-out narrative scripts (an object leaves and later comes back), every memory mode and every sampling
seed: generate the video from the script's prompts (prompt switches on chunk boundaries), decode it, and score it
against the script's ground truth (``memflow_jax.storyworld.metrics``): prompt adherence per segment,
re-appearance consistency of the hidden attribute (hue / pattern) and temporal smoothness; plus the generation
speed. The ground truth is scored twice more: as rendered (the metrics' own ceiling, ~1) and encoded + decoded by
the checkpoint's VAE (``codec_roundtrip``: the ceiling of every mode with this codec). The DiT / VAE / text
params are loaded once; only the sampler's memory config changes between modes.

    python benchmarks/storyworld_eval.py --ckpt memflow_jax/assets/storyworld --num-scripts 8 --seeds 0,1,2 \
        --modes none,sink,nam,nam+sma --json outputs/storyworld_eval.json
    python benchmarks/storyworld_eval.py --tiny --json /tmp/sw_tiny.json   # CPU smoke run, random weights
    python benchmarks/storyworld_eval.py --codec-only --ckpt runs/storyworld/pca   # a codec's ceiling, no DiT

Held-out split. Training scripts come from ``storyworld.dataset.make_example``:
``SeedSequence([dataset_seed, index])`` with dataset seeds >= 0 and no spawn key. Evaluation script ``i`` uses
``SeedSequence([split_seed, i], spawn_key=(EVAL_SPAWN_KEY,))``: the spawn key enters numpy's seed hash, so the
streams are distinct from every training stream whatever the dataset seed (``--split-seed`` picks another
held-out set; 0 is the reported one). In the default split the returning object is on screen from the first frame,
so the frame sink (the first chunk, kept by sink and nam alike) shows it: memory modes can differ there only in how
they use what they keep. ``--late-memory`` draws scripts (4+ segments) whose returning object first enters after the
first segment, so only a memory of later frames (NAM's bank) has seen it when it returns: the split where nam and
nam+sma can beat sink on re-appearance. ``--min-absent N`` keeps scripts whose returning object stays off screen for
at least N latent frames: with N >= ``memory.local_attn_size - sink_size`` the rolling window of sink and nam no
longer shows it when it returns, with N >= ``memory.local_attn_size`` (mode none keeps no sink, so its window is
all of it) no mode's window does, only NAM's bank can have kept it.

Alignment (derived from ``cfg.sampler.vae_stride[0]`` = s and ``cfg.sampler.chunk_frames`` = c): latent frame 0
decodes to 1 video frame and each later latent frame to s, so ``n`` latent frames are ``1 + s(n - 1)`` video
frames and a prompt switch at latent frame L (a multiple of c) starts at video frame ``sL - (s - 1)``. A script
is sampled with segments of whole chunks (``s * c`` video frames each) and then its first segment is shortened
by ``s - 1`` frames, so every segment boundary of the ground truth is exactly where the model switches prompt.

Spread: each metric is first averaged over the scripts for one sampling seed; the table shows the mean over
seeds ± the sample standard deviation over seeds (ddof 1) and [min, max] of the per-seed means. FPS = video
frames / seconds of ``pipeline.generate`` (text encoding, streaming DiT, streaming VAE decode), measured after
one untimed warm-up generation per mode that compiles every step (its time is reported separately). "returns
measured / passed" counts the return events behind the re-appearance cells, over every script and seed: a return is
measured when the video draws the object whole on both sides of its gap, so a pass rate over few measured returns
says little (storyworld/TRAINING.md round 17). A pass is memory only if the look was not going to come back
anyway: "other seeds'" scores every measured return once more with the look before the gap taken from another
seed's video of the same script and mode (:func:`cross_seed_returns`). A model that draws an object's hidden
attribute from its prompt alone, the same for every seed, passes those as often as its own returns, in every
mode; memory's share of the consistency is own minus other seeds' (storyworld/TRAINING.md round 20).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import sys
import time
import types
from typing import Any, Callable, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python benchmarks/storyworld_eval.py` without an installed package
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from memflow_jax.storyworld import captions as C  # noqa: E402
from memflow_jax.storyworld import metrics as M  # noqa: E402
from memflow_jax.storyworld import render as R  # noqa: E402
from memflow_jax.storyworld import scene as S  # noqa: E402
from memflow_jax.storyworld import scripts as SC  # noqa: E402

EVAL_SPAWN_KEY = 0x5E7E7A1  # spawn key of the held-out evaluation scripts (training streams have none)
DEFAULT_CKPT = os.path.join(ROOT, "memflow_jax", "assets", "storyworld")
TINY_CONFIG = os.path.join(ROOT, "configs", "tiny.yaml")
# tiny.yaml is 64 x 64 with a VAE of spatial stride 8 and temporal stride 4: storyworld renders that natively
# (render.check_resolution wants multiples of 8); pinned here so the smoke run survives edits of tiny.yaml.
TINY_OVERRIDES = ("sampler.height=64", "sampler.width=64")
ALL_MODES = ("none", "sink", "nam", "nam+sma")
BASELINES = ("none", "sink")  # the memory-less / sink-only modes the memory modes are compared against
MAX_SCRIPT_TRIES = 64
# (key, table header, better direction: +1 higher is better, -1 lower, 0 no direction)
METRICS: tuple[tuple[str, str, int], ...] = (
    ("adherence", "adherence", +1),
    ("consistency_pass_rate", "reappear. pass", +1),
    ("consistency_distance", "reappear. dist", -1),
    ("smoothness", "smoothness (|dF|)", 0),
)


class EvalError(RuntimeError):
    """A setup that cannot produce a meaningful evaluation (message says what to change)."""


# latent <-> video frame alignment (one home: memflow_jax.storyworld.scripts)
video_frames = SC.video_frames
latent_to_video_start = SC.latent_to_video_start
video_to_latent_start = SC.video_to_latent_start
latent_switches = SC.latent_switches


def eval_rng(split_seed: int, index: int) -> np.random.Generator:
    """The generator of held-out script ``index`` (see the module docstring for the split convention)."""
    if split_seed < 0 or index < 0:
        raise ValueError(f"split_seed={split_seed} and index={index} must be >= 0")
    return np.random.default_rng(np.random.SeedSequence([int(split_seed), int(index)],
                                                        spawn_key=(EVAL_SPAWN_KEY,)))


@dataclasses.dataclass
class EvalScript:
    """One held-out script, its model timeline and its ground truth."""

    index: int
    script: S.Script
    render_seed: int
    prompts: list[str]
    latent_switch_frames: tuple[int, ...]  # where prompts[1:] start, latent frames (multiples of the chunk)
    video_start_frames: tuple[int, ...]  # where every segment starts, video frames (first is 0)
    num_latent_frames: int
    video: np.ndarray  # [T, H, W, 3] uint8 ground truth
    annotations: dict[str, Any]
    returning: list[tuple[int, int, int]]  # (object, leave segment, return segment)
    tries: int

    @property
    def num_video_frames(self) -> int:
        return int(self.video.shape[0])


def _gt_measurable(video: np.ndarray, ann: dict[str, Any]) -> bool:
    """The ground truth itself shows a returning object whole on both sides of its gap."""
    recs = M.reappearance_consistency(video, ann)
    return any(np.isfinite(r["distance"]) for r in recs)


def make_eval_script(index: int, *, split_seed: int, num_latent: int, chunk: int, t_stride: int, height: int,
                     width: int, fps: int, late_memory: bool = False, min_absent: int = 0) -> EvalScript:
    """Held-out script ``index``: re-drawn (same generator) until an object leaves and returns and the ground
    truth measures that return; with ``late_memory`` also until every returning object first enters after the
    first segment (so the frame sink never shows it), and with ``min_absent`` until every returning object is off
    screen for at least that many latent frames (the segments between its exit and its return), so that a local
    window of that many frames no longer shows it when it comes back."""
    rng = eval_rng(split_seed, index)
    for tries in range(1, MAX_SCRIPT_TRIES + 1):
        try:
            script = SC.sample_aligned_script(rng, num_latent=num_latent, chunk=chunk, t_stride=t_stride,
                                              p_late_memory=1.0 if late_memory else 0.0)
        except ValueError as e:  # too few chunks for a leave and a return
            raise EvalError(f"{e} (--max-chunks / sampler.num_output_frames)") from e
        render_seed = int(rng.integers(0, 2**31 - 1))
        returning = SC.returning_objects(script)
        if not returning or (late_memory and not SC.returns_after_the_start(script)):
            continue
        if min_absent and not SC.returns_absent_at_least(script, t_stride, min_absent):
            continue
        video, ann = R.render_video(script, render_seed, None, height, width, fps)
        if not _gt_measurable(video, ann):
            continue
        want = video_frames(num_latent, t_stride)
        if video.shape[0] != want:  # guards the alignment arithmetic above
            raise AssertionError(f"ground truth has {video.shape[0]} frames, the model makes {want}")
        return EvalScript(index, script, render_seed, C.script_prompts(script),
                          latent_switches(script, t_stride, chunk), tuple(script.start_frames), num_latent,
                          video, ann, returning, tries)
    what = "a measurable return" + (" of an object that enters after the first segment" if late_memory else "") + (
        f" after >= {min_absent} latent frames off screen" if min_absent else "")
    raise EvalError(f"script {index}: no script with {what} in {MAX_SCRIPT_TRIES} draws for {num_latent} latent "
                    "frames; use more chunks")


def late_memory_scripts(num_scripts: int, *, split_seed: int, num_latent: int, chunk: int, t_stride: int,
                        height: int, width: int, fps: int, min_absent: int,
                        log: Callable[[str], None] = print) -> tuple[list[EvalScript], list[int]]:
    """The first ``num_scripts`` held-out ``late_memory`` scripts with returns off screen >= ``min_absent`` latent
    frames, in index order; an index whose draws never fit is skipped (and returned), up to 4x ``num_scripts``
    indices (the diagnostics' split; the eval itself takes indices 0.. as they come)."""
    scripts, skipped = [], []
    for i in range(4 * num_scripts):
        if len(scripts) == num_scripts:
            break
        try:
            scripts.append(make_eval_script(i, split_seed=split_seed, num_latent=num_latent, chunk=chunk,
                                            t_stride=t_stride, height=height, width=width, fps=fps,
                                            late_memory=True, min_absent=min_absent))
        except EvalError as err:
            skipped.append(i)
            log(f"  skipped held-out script {i}: {err}")
    if len(scripts) < num_scripts:
        raise EvalError(f"only {len(scripts)} of {num_scripts} late-memory scripts in {4 * num_scripts} held-out "
                        f"indices (off screen >= {min_absent} latent frames): lower --min-absent or --num-scripts")
    return scripts, skipped


# --------------------------------------------------------------------------------------------------
# Config, modes, components
# --------------------------------------------------------------------------------------------------


def parse_mode(name: str) -> dict[str, Any]:
    """``none`` | ``sink`` | ``nam`` with an optional ``+sma`` -> memory overrides."""
    base, _, extra = name.partition("+")
    if base not in ("none", "sink", "nam") or extra not in ("", "sma"):
        raise EvalError(f"memory mode {name!r}: use none | sink | nam, optionally with +sma (e.g. nam+sma)")
    return {"mode": base, "sma": extra == "sma"}


def mode_overrides(name: str) -> list[str]:
    m = parse_mode(name)
    return [f"memory.mode={m['mode']}", f"memory.sma={'true' if m['sma'] else 'false'}"]


def resolve_source(args: argparse.Namespace) -> tuple[str | None, str | None, list[str]]:
    """(checkpoint dir or None for random weights, config YAML, base overrides)."""
    overrides = ["sampler.batch_size=1"] + list(args.overrides)
    if args.tiny:
        if args.ckpt:
            raise EvalError("--tiny runs random weights: drop --ckpt (or drop --tiny to evaluate the checkpoint)")
        return None, args.config or TINY_CONFIG, list(TINY_OVERRIDES) + overrides
    ckpt = args.ckpt
    if ckpt is None:
        if not os.path.isdir(DEFAULT_CKPT):
            raise EvalError(f"no --ckpt given and the demo checkpoint {DEFAULT_CKPT} does not exist (not trained / "
                            f"shipped yet): pass --ckpt DIR (a converted checkpoint) or --tiny for a random-weight "
                            f"smoke run")
        ckpt = DEFAULT_CKPT
    elif not os.path.isdir(ckpt):
        raise EvalError(f"--ckpt {ckpt}: no such directory")
    return ckpt, args.config, overrides


def build_config(ckpt: str | None, config: str | None, overrides: Sequence[str]):
    from memflow_jax import config as config_lib
    from memflow_jax.pipeline import config_from_checkpoint

    if ckpt is not None:
        return config_from_checkpoint(ckpt, list(overrides), config)
    return config_lib.load(config, list(overrides))


def check_config(cfg) -> tuple[int, int]:
    """(temporal stride, chunk) after checking that storyworld can render the config's frames."""
    s = cfg.sampler
    t_stride = int(s.vae_stride[0])
    from memflow_jax.nn import vae as vae_nn

    vae_t = vae_nn.time_stride(cfg.vae)
    if vae_t != t_stride:
        raise EvalError(f"sampler.vae_stride[0]={t_stride} but the VAE's temporal stride is {vae_t} "
                        f"(vae.temporal_downsample={cfg.vae.temporal_downsample}): fix one of them")
    try:
        R.check_resolution(s.height, s.width)
    except ValueError as e:
        raise EvalError(f"storyworld cannot render sampler.height x width = {s.height}x{s.width}: {e}") from None
    return t_stride, int(s.chunk_frames)


# --------------------------------------------------------------------------------------------------
# Generation and scoring
# --------------------------------------------------------------------------------------------------


def randomise_zero_head(params: Any, seed: int) -> tuple[Any, bool]:
    """(params, changed): Wan initialises the DiT's output projection to zero, so a random-weight DiT predicts
    the same flow whatever it attends to and every memory mode would give the same video. For random-weight
    smoke runs this draws that kernel (normal, Xavier scale) so the modes' outputs differ."""
    import jax

    try:
        kernel = params["head"]["head"]["kernel"]  # [dim, out_dim * prod(patch)]
    except (KeyError, TypeError):
        return params, False
    if np.any(np.asarray(kernel)):
        return params, False
    fan_in, fan_out = kernel.shape
    new = jax.random.normal(jax.random.PRNGKey(seed), kernel.shape, kernel.dtype) * np.sqrt(2.0 / (fan_in + fan_out))
    out = dict(params)
    out["head"] = dict(out["head"])
    out["head"]["head"] = dict(out["head"]["head"], kernel=new.astype(kernel.dtype))
    return out, True


def generate_video(comp, prompts: Sequence[str], switches: Sequence[int], num_latent: int, seed: int,
                   on_state: Callable | None = None) -> tuple[np.ndarray, float]:
    """(decoded video uint8 [T, H, W, 3] of batch item 0, seconds of ``pipeline.generate``); ``on_state``: the
    sampler's per-chunk state hook."""
    from memflow_jax.io.video import pixels_to_uint8
    from memflow_jax.pipeline import generate
    from memflow_jax.sampling.timeline import Timeline

    chunks: list[np.ndarray] = []

    def on_chunk(i: int, lat: np.ndarray, pix: np.ndarray | None) -> None:
        if pix is None:
            raise EvalError("the pipeline returned no pixels (no VAE params): the evaluation needs decoded frames")
        chunks.append(pix[0])  # [F, 3, H, W]

    t0 = time.perf_counter()
    generate(comp, Timeline(tuple(prompts), tuple(switches)), num_frames=num_latent, seed=seed, on_chunk=on_chunk,
             on_state=on_state)
    seconds = time.perf_counter() - t0  # generate returns host arrays: all work is done
    return pixels_to_uint8(np.concatenate(chunks, axis=0)), seconds


def codec_roundtrip(comp, video: np.ndarray) -> np.ndarray:
    """The ground truth ``[T, H, W, 3]`` uint8 encoded and decoded by the components' VAE (the streaming decode
    the pipeline uses): what a generator that made the ground truth's latents exactly would show. Its metrics
    bound every memory mode's from above (for this codec)."""
    from memflow_jax.io.video import pixels_to_uint8
    from memflow_jax.nn import vae as vae_nn

    vcfg = comp.cfg.vae
    z = vae_nn.encode(comp.vae_params, vcfg, vae_nn.video_to_input(video[None]))  # [1, T', z, h, w] normalised
    pix = vae_nn.decode(comp.vae_params, vcfg, z)  # [1, T, 3, H, W] in [-1, 1]
    return pixels_to_uint8(np.asarray(pix[0]))


def _f(x: Any) -> float:
    return float(x) if x is not None else float("nan")


def _look(hue: float, pattern: np.ndarray | None) -> list[float] | None:
    """One side of a return as ``[hue, *pattern features]`` (None: that side is not measured)."""
    return None if pattern is None else [float(hue)] + [float(x) for x in pattern]


def score(video: np.ndarray, ann: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """(metrics, reasons for non-finite values) of one video against its ground truth."""
    t_ann = len(ann["segment_id"])
    if video.shape[0] != t_ann:
        raise EvalError(f"the generated video has {video.shape[0]} frames but the ground truth has {t_ann}: the "
                        f"latent->video frame mapping (sampler.vae_stride[0]) does not match the VAE decoder")
    ev = M.evaluate(video, ann)
    events = [{"object": int(r["object"]), "gap": [int(g) for g in r["gap"]],
               "frames_before": int(r["frames_before"]), "frames_after": int(r["frames_after"]),
               "hue_distance": _f(r["hue_distance"]), "pattern_distance": _f(r["pattern_distance"]),
               "distance": _f(r["distance"]), "passed": bool(r["passed"]),
               "look_before": _look(r["hue_before"], r["pattern_before"]),
               "look_after": _look(r["hue_after"], r["pattern_after"])} for r in ev["consistency"]]
    out = {"adherence": float(ev["adherence"]),
           "adherence_per_segment": [float(p["score"]) for p in ev["adherence_detail"]["per_segment"]],
           "adherence_checks": {k: float(ev["adherence_detail"][k])
                                for k in ("present", "shape", "absent", "background") if k in ev["adherence_detail"]},
           "consistency_pass_rate": float(ev["consistency_pass_rate"]),
           "consistency_distance": float(ev["consistency_distance"]),
           "consistency_events": events,
           "first_looks": [None if fl is None else _look(*fl) for fl in ev["first_looks"]],
           "smoothness": float(ev["smoothness"])}
    reasons = {}
    if not events:
        reasons["consistency_pass_rate"] = "the ground truth shows no object whole on both sides of a gap"
        reasons["consistency_distance"] = reasons["consistency_pass_rate"]
    elif not np.isfinite(out["consistency_distance"]):
        reasons["consistency_distance"] = ("no return event measurable in the video: the returning object's "
                                           "colour covers < half its area before or after the gap")
    return out, reasons


def returns_tally(metrics: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Return events over videos: how many the ground truth has, how many the video lets us measure (the object
    drawn whole on both sides of its gap), how many of those pass. The pass rate alone hides how few are measured."""
    events = [e for m in metrics for e in m["consistency_events"]]
    dist = np.asarray([_f(e["distance"]) for e in events], np.float64)
    return {"events": len(events), "measured": int(np.isfinite(dist).sum()),
            "passed": int(sum(bool(e["passed"]) for e in events))}


def rate(k: float, n: float) -> float:
    """k / n, nan when n is 0."""
    return k / n if n else float("nan")


def cross_seed_returns(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Memory's share of the re-appearance passes: the runs of one mode, each return compared with itself and
    with every other seed's video of the same script.

    ``own``: the returns measured on both sides and how many pass (as :func:`returns_tally`). ``cross``: the
    same return with the look before the gap taken from seed a's video and the look after it from seed b's (a != b,
    each side measured in its own video): a generator that drew the returning object from its prompt alone, with
    no memory of the earlier frames, passes these as often as its own returns. So ``own rate - cross rate`` is
    the consistency that comes from remembering this video's earlier frames; a look the model draws the same for
    every seed passes both (a model that never varies the hidden attribute has nothing to remember)."""
    by_return: dict[tuple, dict[int, dict[str, Any]]] = {}  # (script, object, gap) -> {seed: event}
    for r in runs:
        for e in r["metrics"]["consistency_events"]:
            by_return.setdefault((r["script"], e["object"], tuple(e["gap"])), {})[r["seed"]] = e
    own_n = own_pass = cross_n = cross_pass = 0
    for seeds in by_return.values():
        for seed, e in seeds.items():
            if e["look_before"] is not None and e["look_after"] is not None:
                own_n += 1
                own_pass += bool(e["passed"])
            if e["look_before"] is None:
                continue
            a = e["look_before"]
            for b in (e2["look_after"] for seed2, e2 in seeds.items() if seed2 != seed):
                if b is not None:
                    cross_n += 1
                    cross_pass += M.same_look(a[0], a[1:], b[0], b[1:])
    return {"own": {"measured": own_n, "passed": own_pass, "rate": rate(own_pass, own_n)},
            "cross": {"pairs": cross_n, "passed": int(cross_pass), "rate": rate(cross_pass, cross_n)}}


def first_look_diversity(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """How often two seeds draw an object's first look the same (``metrics.same_look_rate`` over the runs of one
    mode, per script and object): the world's random hidden attributes give ``world_rate``
    (``metrics.RANDOM_SAME_LOOK_RATE``); a generator that draws one look per prompt gives ~1 and so has nothing for
    a memory to keep."""
    looks: dict[tuple[int, int], list] = {}
    for r in runs:
        for k, fl in enumerate(r["metrics"]["first_looks"]):
            if fl is not None:
                looks.setdefault((r["script"], k), []).append((fl[0], fl[1:]))
    pairs, same = M.same_look_rate(looks)
    return {"measured": sum(len(v) for v in looks.values()), "seed_pairs": pairs, "same_look_rate": same,
            "world_rate": M.RANDOM_SAME_LOOK_RATE}


def reference_returns(gt_metrics: Sequence[tuple[dict, dict]], codec_metrics: Sequence[tuple[dict, dict]]
                      ) -> dict[str, dict[str, int]]:
    """:func:`returns_tally` of the ground truth and of its codec round trip (per script), keyed as
    :func:`format_table` reads them."""
    return {"ground truth": returns_tally([g for g, _ in gt_metrics]),
            "codec": returns_tally([g for g, _ in codec_metrics])}


def _finite_mean(values: Sequence[float]) -> float:
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


def _std(v: np.ndarray) -> float:
    return float(np.std(v, ddof=1)) if v.size >= 2 else float("nan")


def aggregate(runs: list[dict[str, Any]], seeds: Sequence[int]) -> dict[str, Any]:
    """Per-seed means over scripts, then mean / std / min / max over seeds (NaN values carry a reason)."""
    out: dict[str, Any] = {}
    for key, _, _ in METRICS:
        per_seed, reasons = [], set()
        for sd in seeds:
            vals = np.asarray([r["metrics"][key] for r in runs if r["seed"] == sd], np.float64)
            reasons |= {r["reasons"][key] for r in runs if r["seed"] == sd and key in r["reasons"]}
            finite = vals[np.isfinite(vals)]
            per_seed.append(float(finite.mean()) if finite.size else float("nan"))
        out[key] = _summary(per_seed, sorted(reasons))
    per_seed_fps = []
    for sd in seeds:
        rs = [r for r in runs if r["seed"] == sd]
        per_seed_fps.append(sum(r["video_frames"] for r in rs) / sum(r["seconds"] for r in rs))
    out["fps"] = _summary(per_seed_fps, [])
    out["returns"] = returns_tally([r["metrics"] for r in runs])  # over every script and seed
    out["returns_cross_seed"] = cross_seed_returns(runs)
    out["first_looks"] = first_look_diversity(runs)
    return out


def _summary(per_seed: list[float], reasons: list[str]) -> dict[str, Any]:
    v = np.asarray(per_seed, np.float64)
    fin = v[np.isfinite(v)]
    s = {"mean": float(fin.mean()) if fin.size else float("nan"), "std": _std(fin),
         "min": float(fin.min()) if fin.size else float("nan"), "max": float(fin.max()) if fin.size else float("nan"),
         "per_seed": per_seed, "n_seeds": int(fin.size)}
    why = {}
    if not fin.size:
        why["mean"] = why["min"] = why["max"] = "; ".join(reasons) or "no finite value"
    if fin.size == 1:
        why["std"] = "one seed with a finite value: no seed-to-seed spread (pass --seeds with >= 2 seeds)"
    elif not fin.size:
        why["std"] = why["mean"]
    if fin.size < v.size and fin.size:
        why["per_seed"] = "; ".join(reasons) or "some seeds have no finite value"
    if why:
        s["reasons"] = why
    return s


def compare(summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each memory mode against each baseline (none / sink) per metric with a direction: mean difference, the
    per-seed paired differences, and whether the gain exceeds the seed-to-seed spread (better on every seed
    and by more than the larger of the two seed stds)."""
    out = []
    bases = [b for b in BASELINES if b in summary]
    for mode in summary:
        if mode in BASELINES:
            continue
        for base in bases:
            for key, _, sign in METRICS:
                if sign == 0:
                    continue
                a, b = summary[mode][key], summary[base][key]
                pa, pb = np.asarray(a["per_seed"], np.float64), np.asarray(b["per_seed"], np.float64)
                paired = sign * (pa - pb)
                ok = np.isfinite(paired)
                gain = float(sign * (a["mean"] - b["mean"]))
                stds = [x for x in (a["std"], b["std"]) if np.isfinite(x)]
                spread = max(stds) if len(stds) == 2 else float("nan")
                if not np.isfinite(gain) or not ok.any():
                    verdict = "n/a (no finite values)"
                elif ok.sum() < 2 or not np.isfinite(spread):
                    verdict = "n/a (needs >= 2 seeds for a spread)"
                elif (paired[ok] > 0).all() and gain > spread:
                    verdict = "better by more than the seed spread"
                elif gain > 0:
                    verdict = "better, within the seed spread"
                else:
                    verdict = "not better"
                out.append({"mode": mode, "baseline": base, "metric": key, "gain": gain, "spread": spread,
                            "paired_gain_min": float(np.min(paired[ok])) if ok.any() else float("nan"),
                            "paired_gain_max": float(np.max(paired[ok])) if ok.any() else float("nan"),
                            "verdict": verdict})
    return out


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def _cell(s: dict[str, Any], fmt: str = "{:.3f}") -> str:
    if not np.isfinite(s["mean"]):
        return "n/a"
    txt = fmt.format(s["mean"])
    if np.isfinite(s["std"]):
        txt += f" ± {fmt.format(s['std'])} [{fmt.format(s['min'])}, {fmt.format(s['max'])}]"
    return txt


def _returns_cell(t: dict[str, int] | None) -> str:
    return "–" if t is None else f"{t['measured']} / {t['passed']} of {t['events']}"


def _cross_cell(c: dict[str, Any] | None) -> str:
    if c is None or not c["own"]["measured"]:
        return "–"
    cross = f"{c['cross']['rate']:.2f} ({c['cross']['pairs']} pairs)" if c["cross"]["pairs"] else "n/a"
    return f"{c['own']['rate']:.2f} vs {cross}"


def _looks_cell(f: dict[str, Any] | None) -> str:
    if f is None or not f["seed_pairs"]:
        return "–"
    return f"{f['same_look_rate']:.2f} ({f['seed_pairs']} pairs)"


def format_table(summary: dict[str, dict[str, Any]], gt: dict[str, float],
                 codec: dict[str, float] | None = None,
                 ref_returns: dict[str, dict[str, int]] | None = None) -> str:
    """Markdown table; ``ref_returns``: the tallies of "ground truth" / "codec" (:func:`returns_tally`)."""
    heads = ["mode"] + [h for _, h, _ in METRICS] + ["returns measured / passed", "pass of measured: own vs "
                                                     "other seeds'", "first looks: same across seeds", "FPS"]
    rows = [heads, ["---"] * len(heads)]
    for mode, s in summary.items():
        rows.append([mode] + [_cell(s[k]) for k, _, _ in METRICS] + [_returns_cell(s.get("returns")),
                                                                    _cross_cell(s.get("returns_cross_seed")),
                                                                    _looks_cell(s.get("first_looks")),
                                                                    _cell(s["fps"], "{:.1f}")])
    ref_returns = ref_returns or {}
    world = f"{M.RANDOM_SAME_LOOK_RATE:.2f} (random hidden attributes)"
    refs = ([("ground truth through the VAE", codec, "codec")] if codec is not None else []) + \
        [("ground truth", gt, "ground truth")]
    for name, ref, key in refs:
        rows.append([name] + [f"{ref[k]:.3f}" if np.isfinite(ref[k]) else "n/a" for k, _, _ in METRICS]
                    + [_returns_cell(ref_returns.get(key)), "–", world if key == "ground truth" else "–", "–"])
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def _jsonable(x: Any) -> Any:
    """Strict JSON: non-finite floats -> None (their reasons sit beside them), numpy -> Python."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def write_json(path: str, report: dict[str, Any]) -> None:
    """Atomic (:func:`memflow_jax.io.atomic.write_text`)."""
    from memflow_jax.io.atomic import write_text

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_text(os.path.abspath(path), json.dumps(_jsonable(report), indent=1, allow_nan=False) + "\n")


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help=f"converted checkpoint dir (default: {DEFAULT_CKPT} if present)")
    p.add_argument("--config", default=None, help="YAML: with --ckpt, sections layered on the stored config; with "
                                                  "--tiny, the random-weight config (default configs/tiny.yaml)")
    p.add_argument("--num-scripts", type=int, default=None, help="held-out scripts (default 8; --tiny: 1)")
    p.add_argument("--seeds", default=None, help="comma-separated sampling seeds (default 0,1,2; --tiny: 0,1)")
    p.add_argument("--modes", default=",".join(ALL_MODES), help="memory modes: none|sink|nam[+sma], comma-separated")
    p.add_argument("--split-seed", type=int, default=0, help="held-out split (see the module docstring)")
    p.add_argument("--late-memory", action="store_true", help="held-out scripts whose returning object first "
                   "enters after the first segment: the frame sink never shows it, so only a memory of later "
                   "frames (nam) has its look when it returns (the split where nam can beat sink)")
    p.add_argument("--min-absent", type=int, default=0, help="held-out scripts whose returning object stays off "
                   "screen for at least this many latent frames (segments between exit and return); with "
                   "memory.local_attn_size (the window of mode none, which keeps no sink) no mode's window still "
                   "shows it when it returns (see the module docstring)")
    p.add_argument("--json", default=None, help="write every per-script per-seed number and the summary here")
    p.add_argument("--tiny", action="store_true", help="configs/tiny.yaml, random weights: a CPU smoke run")
    p.add_argument("--max-chunks", type=int, default=None, help="generate at most this many chunks (>= 3)")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up run per mode (FPS then "
                                                            "includes compilation)")
    p.add_argument("--codec-only", action="store_true", help="score only the ground truth and the codec's ceiling "
                   "(no DiT: --ckpt may be any converted checkpoint with a vae component, e.g. storyworld.pca_codec's)")
    p.add_argument("overrides", nargs="*", help="config overrides section.key=value (memory.mode/sma are set "
                                                "per mode)")
    return p.parse_args(argv)


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise EvalError(f"--seeds {text!r}: give comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise EvalError(f"--seeds {text!r}: give one or more distinct integers")
    return seeds


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The evaluation; returns the report (also written to ``--json``)."""
    t_start = time.perf_counter()
    ckpt, config, overrides = resolve_source(args)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or len(set(modes)) != len(modes):
        raise EvalError(f"--modes {args.modes!r}: give one or more distinct modes")
    for m in modes:
        parse_mode(m)
    seeds = _seeds(args.seeds or ("0,1" if args.tiny else "0,1,2"))
    num_scripts = args.num_scripts if args.num_scripts is not None else (1 if args.tiny else 8)
    if num_scripts < 1:
        raise EvalError("--num-scripts must be >= 1")
    if any(o.split("=", 1)[0] in ("memory.mode", "memory.sma") for o in args.overrides):
        raise EvalError("memory.mode / memory.sma are set per mode: choose them with --modes")

    cfg = build_config(ckpt, config, overrides)
    mode_cfgs = {m: build_config(ckpt, config, overrides + mode_overrides(m)) for m in modes}
    for m, c in mode_cfgs.items():  # the params are shared: only the memory section may differ
        for name, section in cfg.sections:
            if name != "memory" and getattr(c, name) != section:
                raise AssertionError(f"mode {m} changed config section {name!r}")
    t_stride, chunk = check_config(cfg)
    s = cfg.sampler
    num_latent = int(s.num_output_frames)
    if args.max_chunks is not None:
        if args.max_chunks < 3:
            raise EvalError(f"--max-chunks {args.max_chunks}: a script needs >= 3 chunks (3 segments)")
        num_latent = min(num_latent, args.max_chunks * chunk)
    n_video = video_frames(num_latent, t_stride)

    # ground truth
    t0 = time.perf_counter()
    scripts = [make_eval_script(i, split_seed=args.split_seed, num_latent=num_latent, chunk=chunk,
                                t_stride=t_stride, height=s.height, width=s.width, fps=s.fps,
                                late_memory=args.late_memory, min_absent=args.min_absent)
               for i in range(num_scripts)]
    gt_metrics = [score(e.video, e.annotations) for e in scripts]
    late = (", returning objects enter after the first segment" if args.late_memory else "") + (
        f", off screen >= {args.min_absent} latent frames" if args.min_absent else "")
    log(f"{num_scripts} held-out script(s) (split seed {args.split_seed}{late}): {num_latent} latent frames = "
        f"{num_latent // chunk} chunks = {n_video} video frames at {s.height}x{s.width}, {s.fps} fps; rendered "
        f"and scored in {time.perf_counter() - t0:.1f}s")
    for e in scripts:
        log(f"  script {e.index}: {len(e.prompts)} segments, video starts {list(e.video_start_frames)}, latent "
            f"switches {list(e.latent_switch_frames)}, returning (object, leave, return) {e.returning}")

    if args.codec_only:
        return _codec_only(args, cfg, ckpt, scripts, gt_metrics, t_start, log)

    from memflow_jax.pipeline import load_components

    t0 = time.perf_counter()
    comp = load_components(cfg, ckpt, seed=s.seed)
    load_s = time.perf_counter() - t0
    random_head = False
    if comp.random_weights:
        params, random_head = randomise_zero_head(comp.dit_params, s.seed)
        comp = dataclasses.replace(comp, dit_params=params)
    import jax

    device = str(jax.devices()[0])
    note = " (zero-init DiT head drawn at random so the modes differ)" if random_head else ""
    log(f"components {'RANDOM weights (smoke run: metrics are meaningless)' if comp.random_weights else ckpt} "
        f"loaded in {load_s:.1f}s on {device}{note}")

    # the codec's ceiling: the ground truth through the VAE (no generator can do better with this codec)
    t0 = time.perf_counter()
    codec_metrics = [score(codec_roundtrip(comp, e.video), e.annotations) for e in scripts]
    codec = {k: _finite_mean([g[0][k] for g in codec_metrics]) for k, _, _ in METRICS}
    log(f"ground truth through the VAE (the codec's ceiling): adherence {codec['adherence']:.3f}, reappearance "
        f"pass {codec['consistency_pass_rate']:.2f} ({time.perf_counter() - t0:.1f}s)")

    runs: list[dict[str, Any]] = []
    warmup: dict[str, float] = {}
    for mode in modes:
        mcomp = dataclasses.replace(comp, cfg=mode_cfgs[mode])
        if not args.no_warmup:  # a switch at every chunk: compiles the chunk step and every re-cache length
            e0 = scripts[0]
            n_chunks = num_latent // chunk
            prompts = [e0.prompts[i % len(e0.prompts)] for i in range(n_chunks)]
            _, warmup[mode] = generate_video(mcomp, prompts, [i * chunk for i in range(1, n_chunks)], num_latent,
                                             seeds[0])
            log(f"[{mode}] warm-up (compile + one run) {warmup[mode]:.1f}s")
        for e in scripts:
            for sd in seeds:
                video, sec = generate_video(mcomp, e.prompts, e.latent_switch_frames, num_latent, sd)
                metrics, reasons = score(video, e.annotations)
                runs.append({"mode": mode, "script": e.index, "seed": sd, "seconds": sec,
                             "video_frames": int(video.shape[0]), "fps": video.shape[0] / sec,
                             "video_sha1": hashlib.sha1(video.tobytes()).hexdigest(),
                             "metrics": metrics, "reasons": reasons})
                log(f"[{mode}] script {e.index} seed {sd}: adherence {metrics['adherence']:.3f}, reappearance "
                    f"pass {metrics['consistency_pass_rate']:.2f} dist {metrics['consistency_distance']:.3f}, "
                    f"smoothness {metrics['smoothness']:.4f}, {video.shape[0] / sec:.1f} FPS ({sec:.2f}s)")

    summary = {m: aggregate([r for r in runs if r["mode"] == m], seeds) for m in modes}
    gt = {k: _finite_mean([g[0][k] for g in gt_metrics]) for k, _, _ in METRICS}
    comparisons = compare(summary)
    ref_returns = reference_returns(gt_metrics, codec_metrics)
    table = format_table(summary, gt, codec, ref_returns)
    log("")
    log(table)
    log(f"cells: mean over {len(seeds)} sampling seed(s) of the per-seed mean over {num_scripts} script(s); "
        f"± = sample std over seeds (ddof 1); [min, max] of the per-seed means. adherence / reappear. pass: "
        f"higher is better (ground truth ~1); reappear. dist: lower is better (<= 1 passes); smoothness = mean "
        f"|frame difference| (lower = smoother; compare with the ground truth's); returns: return events whose "
        f"object the video draws whole on both sides of its gap / of those passing, of all (a mode: over scripts x "
        f"seeds; a reference: over scripts); pass of measured: own = the measured returns that pass, other "
        f"seeds' = the same returns with the look before the gap from another seed's video (what a generator "
        f"without memory of this video would pass; memory's share is the difference); first looks: how often two "
        f"seeds draw an object's first appearance with the same hidden attribute (the world: 1/16; ~1 = one look "
        f"per prompt, nothing for a memory to keep). "
        f"FPS excludes the warm-up"
        f"{' (none: FPS includes compilation)' if args.no_warmup else ''}.")
    for c in comparisons:
        log(f"  {c['mode']} vs {c['baseline']} {c['metric']}: gain {c['gain']:+.3f} (per-seed "
            f"{c['paired_gain_min']:+.3f}..{c['paired_gain_max']:+.3f}, seed spread {c['spread']:.3f}) -> "
            f"{c['verdict']}")
    if comp.random_weights:
        log("NOTE: random weights: the generated metrics only exercise the code path.")

    report = {
        "benchmark": "storyworld_eval",
        "setup": {"ckpt": ckpt, "config": config, "overrides": overrides, "random_weights": comp.random_weights,
                  "random_head": random_head,
                  "modes": modes, "mode_overrides": {m: mode_overrides(m) for m in modes}, "seeds": seeds,
                  "num_scripts": num_scripts, "num_latent_frames": num_latent, "num_video_frames": n_video,
                  "chunk_frames": chunk, "vae_temporal_stride": t_stride, "height": s.height, "width": s.width,
                  "fps": s.fps, "device": device, "platform": platform.platform(), "load_seconds": load_s,
                  "warmup": not args.no_warmup},
        "split": {"split_seed": args.split_seed, "late_memory": args.late_memory, "min_absent": args.min_absent,
                  "eval_spawn_key": EVAL_SPAWN_KEY,
                  "convention": "eval script i: SeedSequence([split_seed, i], spawn_key=(eval_spawn_key,)); "
                                "training (storyworld.dataset): SeedSequence([dataset_seed, index]), no spawn key"},
        "spread": "std = sample std (ddof 1) over the per-seed means (mean over scripts); min/max of those",
        "scripts": [{"index": e.index, "render_seed": e.render_seed, "prompts": e.prompts,
                     "latent_switch_frames": list(e.latent_switch_frames),
                     "video_start_frames": list(e.video_start_frames), "num_video_frames": e.num_video_frames,
                     "returning_objects": [list(r) for r in e.returning], "draws": e.tries,
                     "script": S.script_to_dict(e.script), "ground_truth": g, "ground_truth_reasons": why}
                    for e, (g, why) in zip(scripts, gt_metrics)],
        "ground_truth": gt,
        "ground_truth_through_vae": codec,
        "ground_truth_through_vae_per_script": [g for g, _ in codec_metrics],
        "returns": {"ground_truth": ref_returns["ground truth"], "ground_truth_through_vae": ref_returns["codec"]},
        "warmup_seconds": warmup,
        "runs": runs,
        "summary": summary,
        "comparisons": comparisons,
        "table": table,
        "total_seconds": time.perf_counter() - t_start,
    }
    if args.json:
        write_json(args.json, report)
        log(f"wrote {args.json}")
    return report


def _codec_only(args: argparse.Namespace, cfg, ckpt: str | None, scripts: list[EvalScript],
                gt_metrics: list, t_start: float, log: Callable[[str], None]) -> dict[str, Any]:
    """``--codec-only``: the ground truth and the ground truth through the checkpoint's codec, no generation."""
    import jax

    from memflow_jax.convert.common import load_component
    from memflow_jax.nn import vae as vae_nn

    if ckpt is None:
        params = vae_nn.init_params(cfg.vae, jax.random.PRNGKey(cfg.sampler.seed))
    else:
        params = load_component(ckpt, "vae", vae_nn.abstract_params(cfg.vae))
    comp = types.SimpleNamespace(cfg=cfg, vae_params=params)
    codec_metrics = [score(codec_roundtrip(comp, e.video), e.annotations) for e in scripts]
    codec = {k: _finite_mean([g[0][k] for g in codec_metrics]) for k, _, _ in METRICS}
    gt = {k: _finite_mean([g[0][k] for g in gt_metrics]) for k, _, _ in METRICS}
    table = format_table({}, gt, codec, reference_returns(gt_metrics, codec_metrics))
    log("")
    log(table)
    log("per script (adherence / reappearance pass): " + ", ".join(
        f"{g['adherence']:.3f} / {g['consistency_pass_rate']:.2f}" for g, _ in codec_metrics))
    report = {"benchmark": "storyworld_eval", "codec_only": True,
              "setup": {"ckpt": ckpt, "codec": cfg.vae.codec, "z_dim": cfg.vae.z_dim, "num_scripts": len(scripts),
                        "split_seed": args.split_seed, "late_memory": args.late_memory,
                        "min_absent": args.min_absent, "platform": platform.platform()},
              "ground_truth": gt, "ground_truth_through_vae": codec,
              "ground_truth_through_vae_per_script": [g for g, _ in codec_metrics], "table": table,
              "total_seconds": time.perf_counter() - t_start}
    if args.json:
        write_json(args.json, report)
        log(f"wrote {args.json}")
    return report


def run_cli(run_fn: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> int:
    """Exit status of ``run_fn(args)``: 0, or 2 with a one-line error for a bad script, config or checkpoint."""
    from memflow_jax.config import ConfigError

    try:
        run_fn(args)
    except (EvalError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
