"""Where a chunk's time goes: a ``jax.profiler`` trace of steady-state chunks, summed per op kind.

Builds the same sampler as :mod:`benchmarks.bench_sampler` (Wan2.1-1.3B size, random bf16 weights), runs
``--warmup`` chunks (memory full: every key valid), traces ``--chunks`` chunks (with ``--switch`` also one prompt
switch's re-cache, with ``--vae`` the streaming VAE decode), reads the trace back with
``jax.profiler.ProfileData`` and prints, per chunk, device time by kind (attention, GEMM, convolution,
copies/gathers, other fusions) and the top ops; for the chunks, also the device's idle gaps (bucketed by length, and
the longest with the ops around them and the host's trace events meanwhile: launch gaps, command-buffer updates, or
the host between programs). On GPU the device plane's kernels are counted; on CPU (``--tiny``)
the host's XLA thunks.

    python -m benchmarks.profile_chunk [--mode nam] [--chunks 3] [--top 20] [--switch] [--vae] [--json out.json]
    python -m benchmarks.profile_chunk --tiny    # CPU smoke run
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402

from benchmarks import bench_sampler as bench  # noqa: E402

KINDS = ("attention", "gemm", "conv", "copy/gather", "other")


def op_kind(op: str, kernel: str) -> str:
    """Classify one device op by its HLO op name and kernel name (kernels inside a CUDA graph carry the command
    buffer's op name, so the kernel name, which names XLA's fusion, decides for those)."""
    o, k = op.lower(), kernel.lower()
    if o.startswith("command_buffer"):
        o = k
    if any(s in k for s in ("sdpa", "fmha", "flash")) or "fmha" in o:
        return "attention"
    if any(s in k for s in ("conv", "fprop", "implicit", "dgrad", "wgrad")) or "conv" in o:
        return "conv"
    if (any(s in k for s in ("gemm", "nvjet", "xmma", "cutlass", "dot")) or o.startswith(("gemm", "cublas", "dot"))
            or "triton_gemm" in o):
        return "gemm"
    if any(s in o for s in ("copy", "memcpy", "gather", "dynamic-update-slice", "dynamic_update_slice",
                            "concatenate", "transpose", "scatter", "slice", "select")):
        return "copy/gather"
    return "other"


def _stats(event) -> dict[str, Any]:
    try:
        return {name: value for name, value in event.stats}
    except (TypeError, ValueError):
        return {}


def device_ops(xplane: str) -> list[tuple[str, str, float, float]]:
    """(hlo op, kernel name, seconds, start seconds) of every device op in a trace file (GPU kernels, else CPU XLA
    thunks)."""
    from jax.profiler import ProfileData

    data = ProfileData.from_file(xplane)
    gpu = [p for p in data.planes if p.name.startswith("/device:GPU")]
    out = []
    for plane in gpu or [p for p in data.planes if p.name == "/host:CPU"]:
        for line in plane.lines:
            if gpu and not line.name.lower().startswith("stream"):
                continue  # device planes also hold "XLA Modules"/"XLA Ops" summary lines: count kernels once
            for ev in line.events:
                st = _stats(ev)
                op = st.get("hlo_op")
                if op is None or (not gpu and str(op).startswith(("while", "conditional", "call"))):
                    continue  # CPU thunks of control flow contain the ops they run: count those once
                out.append((str(op), ev.name, ev.duration_ns * 1e-9, ev.start_ns * 1e-9))
    return out


def busy_and_span(ops: list[tuple[str, str, float, float]]) -> tuple[float, float]:
    """(seconds some kernel runs on any stream: the union of the kernels' intervals, seconds from the first
    kernel's start to the last one's end). ``span - busy`` is time the device sat idle (launch gaps, syncs)."""
    if not ops:
        return 0.0, 0.0
    iv = sorted((start, start + dur) for _, _, dur, start in ops)
    busy, cur_lo, cur_hi = 0.0, iv[0][0], iv[0][1]
    for lo, hi in iv[1:]:
        if lo > cur_hi:
            busy += cur_hi - cur_lo
            cur_lo, cur_hi = lo, hi
        else:
            cur_hi = max(cur_hi, hi)
    busy += cur_hi - cur_lo
    return busy, max(hi for _, hi in iv) - iv[0][0]


GAP_BUCKETS_US = (5.0, 20.0, 100.0, 1000.0)


def idle_gaps(ops: list[tuple[str, str, float, float]], top: int,
              host: list[tuple[str, float, float]] | None = None) -> dict[str, Any]:
    """Where the device sat idle: the gaps between the union of kernel intervals, bucketed by length (µs: count
    and summed ms) and the ``top`` longest with the ops that end before and start after each (a gap after a
    small op a layer = a launch or sync per layer; one long gap a chunk = the host between programs)."""
    iv = sorted((start, start + dur, op) for op, _, dur, start in ops)
    gaps: list[tuple[float, str, str, float]] = []  # (length s, op before, op after, start s)
    hi, last = (iv[0][1], iv[0][2]) if iv else (0.0, "")
    for lo, end, op in iv[1:]:
        if lo > hi:
            gaps.append((lo - hi, last, op, hi))
        if end > hi:
            hi, last = end, op
    edges = (0.0,) + GAP_BUCKETS_US + (float("inf"),)
    buckets = {}
    for a, b in zip(edges[:-1], edges[1:]):
        sel = [g[0] for g in gaps if a <= g[0] * 1e6 < b]
        buckets[f"{a:g}-{b:g} us"] = {"count": len(sel), "ms": 1e3 * sum(sel)}
    longest = sorted(gaps, reverse=True)[:top]

    def during(g0: float, g1: float) -> list[str]:
        """The innermost host events spanning a gap, then those starting or ending inside it (longest overlap)."""
        span = sorted((d, n) for n, t, d in host or () if t <= g0 and t + d >= g1)[:3]
        part = sorted(((min(g1, t + d) - max(g0, t), n) for n, t, d in host or ()
                       if t < g1 and t + d > g0 and not (t <= g0 and t + d >= g1)), reverse=True)[:5]
        return ([f"in {n[:48]}" for _, n in span] + [f"{n[:48]} {o * 1e6:.0f}us" for o, n in part])

    return {"buckets": buckets, "longest": [{"us": g * 1e6, "after": a[:60], "before": b[:60],
                                             "host": during(t, t + g)} for g, a, b, t in longest]}


def summarize(ops: list[tuple[str, str, float, float]], per: int, top: int,
              host: list[tuple[str, float, float]] | None = None) -> dict[str, Any]:
    """Per-``per`` (chunk) seconds by kind, busy / span / idle seconds and the ``top`` ops by time."""
    by_kind = collections.Counter()
    by_op: dict[str, list] = {}
    busy, span = busy_and_span(ops)
    for op, kernel, s, _ in ops:
        kind = op_kind(op, kernel)
        by_kind[kind] += s
        # kernels inside CUDA graphs all carry their command buffer's name: group those by kernel instead
        key = kernel if op.startswith("command_buffer") else op
        e = by_op.setdefault(key, [0.0, 0, kernel, kind])
        e[0] += s
        e[1] += 1
    total = sum(by_kind.values())
    tops = sorted(by_op.items(), key=lambda kv: -kv[1][0])[:top]
    return {"total_s": total / per, "busy_s": busy / per, "span_s": span / per, "idle_s": (span - busy) / per,
            "by_kind_s": {k: by_kind.get(k, 0.0) / per for k in KINDS},
            "top": [{"op": op[:60], "kind": e[3], "s": e[0] / per, "calls": e[1] / per, "kernel": e[2][:80]}
                    for op, e in tops],
            "gaps": idle_gaps(ops, min(top, 10), host)}


def format_summary(title: str, s: dict[str, Any]) -> str:
    tot = s["total_s"] or 1.0
    lines = [f"## {title}: {s['total_s'] * 1e3:.1f} ms of kernel time; span {s['span_s'] * 1e3:.1f} ms, busy "
             f"{s['busy_s'] * 1e3:.1f} ms (any stream), idle {s['idle_s'] * 1e3:.1f} ms", "",
             "| kind | ms | share |", "|---|---|---|"]
    lines += [f"| {k} | {v * 1e3:.1f} | {100 * v / tot:.1f} % |" for k, v in s["by_kind_s"].items()]
    lines += ["", "| op | kind | ms | calls | kernel |", "|---|---|---|---|---|"]
    lines += [f"| {t['op']} | {t['kind']} | {t['s'] * 1e3:.2f} | {t['calls']:.0f} | `{t['kernel']}` |"
              for t in s["top"]]
    if "gaps" in s:  # summed over all traced chunks
        g = s["gaps"]
        lines += ["", "idle gaps (all traced chunks): " + ", ".join(
            f"{k}: {v['count']} ({v['ms']:.2f} ms)" for k, v in g["buckets"].items()), "",
            "| longest gap µs | after | before | host meanwhile |", "|---|---|---|---|"]
        lines += [f"| {x['us']:.0f} | {x['after']} | {x['before']} | {'; '.join(x['host'])} |" for x in g["longest"]]
    return "\n".join(lines)


def host_events(xplane: str) -> list[tuple[str, float, float]]:
    """(name, start s, duration s) of the host's trace events (PjRt / XLA runtime TraceMes, Python if traced)."""
    from jax.profiler import ProfileData

    out = []
    for plane in ProfileData.from_file(xplane).planes:
        if plane.name == "/host:CPU":
            for line in plane.lines:
                out += [(ev.name, ev.start_ns * 1e-9, ev.duration_ns * 1e-9) for ev in line.events]
    return out


def _trace(fn, trace_dir: str, host: list | None = None) -> list[tuple[str, str, float]]:
    with jax.profiler.trace(trace_dir):
        fn()
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
    if not files:
        raise RuntimeError(f"jax.profiler wrote no .xplane.pb under {trace_dir}")
    if host is not None:
        host += host_events(files[-1])
    return device_ops(files[-1])


def fill_chunks(spec) -> int:
    """Chunks after which every key slot is valid (the steady state): the window holds ``spec.window`` frames
    after ceil(W / chunk) chunks; the bank's K-th frame is recorded by chunk (K-1) x record_interval."""
    window = -(-spec.window // spec.chunk_frames)
    bank = (spec.bank - 1) * spec.record_interval + 1 if spec.bank else 0
    return max(window, bank)


def vae_decoder(cfg: dict, chunks: int):
    """A warmed-up streaming VAE decode of ``chunks`` later chunks (``bench_sampler.vae_setup``)."""
    from memflow_jax.nn import vae as vae_lib

    params, lat, cache = bench.vae_setup(cfg, batch=1)
    v, box = cfg["vae"], {"cache": cache}

    def run(n: int) -> None:
        for _ in range(n):
            pix, box["cache"] = vae_lib.decode_chunk_jit(params, v, lat, box["cache"])
        jax.block_until_ready(box["cache"])

    run(3)  # first chunk and a later chunk compile separately
    return lambda: run(chunks)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="nam", choices=list(bench.MODES))
    p.add_argument("--warmup", type=int, default=None,
                   help="chunks before tracing (default: until the window and bank are full, from the config)")
    p.add_argument("--chunks", type=int, default=3, help="traced chunks")
    p.add_argument("--switch", action="store_true", help="also trace one prompt switch's re-cache")
    p.add_argument("--vae", action="store_true", help="also trace the streaming VAE decode of --chunks chunks")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--tiny", action="store_true", help="tiny float32 model on CPU (smoke test)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    cfg = bench.build_configs(args.tiny)
    s, _, texts, noise, step_noise = bench.mode_setup(args.mode, bench.init_dit(cfg["model"], seed=0), cfg, 1)
    kv = jax.block_until_ready(s.prompt_kv(texts[0]))
    box = {"state": s.init_state()}

    def chunks(n: int) -> None:
        for _ in range(n):
            box["state"] = s.chunk(box["state"], kv, noise, step_noise)[0]
        jax.block_until_ready(box["state"])

    chunks(max(fill_chunks(s.spec) if args.warmup is None else args.warmup, 1))
    report: dict[str, Any] = {"mode": args.mode, "device": jax.devices()[0].device_kind, "jax": jax.__version__,
                              "xla_flags": os.environ.get("XLA_FLAGS")}
    with tempfile.TemporaryDirectory() as d:
        host: list = []
        report["chunk"] = summarize(_trace(lambda: chunks(args.chunks), os.path.join(d, "chunk"), host), args.chunks,
                                    args.top, host)
        if args.switch:
            def recache() -> None:
                box["state"] = s.recache(box["state"], kv)[0]
                jax.block_until_ready(box["state"])

            recache()  # compile outside the trace
            report["recache"] = summarize(_trace(recache, os.path.join(d, "recache")), 1, args.top)
        if args.vae:
            report["vae"] = summarize(_trace(vae_decoder(cfg, args.chunks), os.path.join(d, "vae")), args.chunks,
                                      args.top)
    print(f"# chunk profile: {args.mode}, {report['device']}, jax {report['jax']}, XLA_FLAGS={report['xla_flags']}")
    print(format_summary("per chunk", report["chunk"]))
    if "recache" in report:
        print(format_summary("prompt-switch re-cache", report["recache"]))
    if "vae" in report:
        print(format_summary("streaming VAE decode per chunk", report["vae"]))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
