"""Micro-benchmark of the attention of one Wan block at the real size, to pick the fast path on GPU.

Self-attention of a chunk over the memory layout of the MemFlow release (480x832, chunk 3, sink 3 + bank 3 +
12-frame window): q = 3 x 1560 = 4680 tokens, keys = 15 x 1560 = 23400 tokens, 12 heads x 128, bf16 (all sizes
come from the configs in bench_sampler). The cache marks whole frames valid; two masks are timed:
``steady`` (all frames valid: every chunk after the warm-up) and ``warmup`` (empty bank/window slots, as in
chunk 2). Each variant reports ms per call, TFLOP/s (4·Lq·Lk·H·D) and max |error| against a float32
reference with the same mask (variants marked "steady only" are exact only when every key is valid).
``--block`` also times a whole Wan block (projections, cross-attention, FFN) with each variant plugged in.

    python -m benchmarks.attention_variants [--iters 20] [--reps 5] [--block] [--json out.json] [--tiny]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

from benchmarks.bench_sampler import MODES, block_flops, build_configs, key_frames  # noqa: E402
from memflow_jax.memory.cache import CacheSpec  # noqa: E402
from memflow_jax.nn import dit  # noqa: E402
from memflow_jax.nn.attention import attention  # noqa: E402
from memflow_jax.nn.rope import rope_tables  # noqa: E402

Variant = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]  # (q, k, v, frame_valid [M]) -> out


def _token_mask(frame_valid: jax.Array, b: int, n: int) -> jax.Array:  # [M] -> [B, M*n]
    return jnp.broadcast_to(jnp.repeat(frame_valid, n), (b, frame_valid.shape[0] * n))


def _compact(k: jax.Array, v: jax.Array, frame_valid: jax.Array):
    """Valid frames moved to the front (stable), so a key-length (padding) mask is exact: (k, v, lengths [B])."""
    b, lk, h, d = k.shape
    m = frame_valid.shape[0]
    order = jnp.argsort(jnp.logical_not(frame_valid), stable=True)

    def take(x):
        return jnp.take(x.reshape(b, m, lk // m, h, d), order, axis=1).reshape(b, lk, h, d)

    lengths = jnp.full((b,), jnp.sum(frame_valid.astype(jnp.int32)) * (lk // m), jnp.int32)
    return take(k), take(v), lengths


def make_variants() -> dict[str, tuple[Variant, bool]]:
    """name -> (fn, exact for any frame mask). ``compact`` = valid frames gathered first + a key-length mask, the
    layout memory/attend.py builds for non-SMA layers (then ``impl=auto`` picks cuDNN on GPU)."""
    def n_of(k, fv):
        return k.shape[1] // fv.shape[0]

    def xla_mask(q, k, v, fv):  # the dispatcher's XLA path with a boolean [B, Lk] mask
        return attention(q, k, v, kv_mask=_token_mask(fv, q.shape[0], n_of(k, fv)), impl="xla")

    def xla_compact(q, k, v, fv):
        kc, vc, lengths = _compact(k, v, fv)
        return attention(q, kc, vc, kv_lengths=lengths, impl="xla")

    def xla_nomask(q, k, v, fv):
        return attention(q, k, v, impl="xla")

    def jax_xla_mask(q, k, v, fv):
        mask = _token_mask(fv, q.shape[0], n_of(k, fv))[:, None, None, :]
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")

    def cudnn_nomask(q, k, v, fv):
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")

    def full_mask(q, k, fv):  # cuDNN wants a [B, 1, Lq, Lk] mask/bias (no broadcasting over Lq)
        m = _token_mask(fv, q.shape[0], n_of(k, fv))[:, None, None, :]
        return jnp.broadcast_to(m, (q.shape[0], 1, q.shape[1], k.shape[1]))

    def cudnn_mask(q, k, v, fv):
        return jax.nn.dot_product_attention(q, k, v, mask=full_mask(q, k, fv), implementation="cudnn")

    def cudnn_bias(q, k, v, fv):
        neg = jnp.asarray(-0.7 * float(jnp.finfo(q.dtype).max), q.dtype)
        bias = jnp.where(full_mask(q, k, fv), jnp.zeros((), q.dtype), neg)
        return jax.nn.dot_product_attention(q, k, v, bias=bias, implementation="cudnn")

    def cudnn_compact(q, k, v, fv):
        kc, vc, lengths = _compact(k, v, fv)
        return attention(q, kc, vc, kv_lengths=lengths, impl="cudnn")

    def cudnn_cond(q, k, v, fv):  # no-mask kernel in steady state, compact path while slots are empty
        return lax.cond(jnp.all(fv), lambda: cudnn_nomask(q, k, v, fv), lambda: cudnn_compact(q, k, v, fv))

    return {"xla_mask": (xla_mask, True), "xla_compact+kv_lengths": (xla_compact, True),
            "xla_nomask": (xla_nomask, False), "jax_xla_mask": (jax_xla_mask, True),
            "cudnn_nomask": (cudnn_nomask, False), "cudnn_mask [B,1,Lq,Lk]": (cudnn_mask, True),
            "cudnn_bias [B,1,Lq,Lk]": (cudnn_bias, True), "cudnn_compact+kv_lengths": (cudnn_compact, True),
            "cudnn_cond(all valid)": (cudnn_cond, True)}


def reference(q, k, v, fv) -> jax.Array:
    """float32, highest-precision masked attention."""
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    mask = _token_mask(fv, q.shape[0], k.shape[1] // fv.shape[0])
    return attention(*f32, kv_mask=mask, impl="xla", precision=lax.Precision.HIGHEST)


def time_fn(fn: Callable, args: tuple, iters: int, reps: int) -> tuple[float, Any]:
    """Median over ``reps`` of the mean ms per call over ``iters`` back-to-back calls (after one compile call)."""
    f = jax.jit(fn)
    out = jax.block_until_ready(f(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(iters):
            r = f(*args)
        jax.block_until_ready(r)
        ts.append((time.perf_counter() - t0) / iters * 1e3)
    return statistics.median(ts), out


def shapes(tiny: bool, mode: str) -> dict[str, Any]:
    cfg = build_configs(tiny)
    m, s = cfg["model"], cfg["sampler"]
    mem = dataclasses.replace(cfg["memory"], **MODES[mode])
    n = dit.tokens_per_frame(m, *s.latent_hw)
    spec = CacheSpec.from_config(mem, num_layers=1, batch=1, tokens_per_frame=n, num_heads=m.num_heads,
                                 head_dim=m.head_dim, chunk_frames=s.chunk_frames)
    valid = [True] * key_frames(spec, mem)  # layout: sink | bank | window (chunk frames first)
    if not mem.sma:
        valid[spec.sink + 1:spec.sink + spec.bank] = [False] * max(spec.bank - 1, 0)  # bank: 1 prototype so far
        valid[spec.sink + spec.bank + spec.chunk_frames:] = [False] * (spec.ring - spec.chunk_frames)  # chunk 2
    else:
        valid[-(spec.ring - spec.chunk_frames):] = [False] * (spec.ring - spec.chunk_frames)
    return {"model": dataclasses.replace(m, dtype="bfloat16", param_dtype="bfloat16"), "n": n,
            "frames_q": s.chunk_frames, "frames_k": len(valid), "warmup_valid": valid, "grid": s.latent_hw}


def run_block(sh: dict, variants: dict, iters: int, reps: int) -> dict[str, Any]:
    """ms per call of one Wan block (bf16) with each attention variant over [cache (Lk - Lq tokens), chunk]."""
    m, n, fq, fk = sh["model"], sh["n"], sh["frames_q"], sh["frames_k"]
    b, lq, lk, (gh, gw) = 1, fq * n, fk * n, sh["grid"]
    block = dit.WanBlock(m)
    kx, kc, kt = jax.random.split(jax.random.PRNGKey(1), 3)
    h0 = jnp.zeros((1, 1, m.dim), jnp.float32)
    cs = jnp.zeros((1, m.head_dim // 2), jnp.float32)
    params = jax.jit(lambda key: block.init(key, h0, jnp.zeros((1, 1, 6, m.dim)), cs, cs, h0,
                                            lambda q, k, v, _: (attention(q, k, v, impl="xla"), None),
                                            method=dit.WanBlock.init_all))(kx)
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params)
    x = jax.random.normal(kx, (b, lq, m.dim), jnp.bfloat16)
    e0 = 0.1 * jax.random.normal(kt, (b, fq, 6, m.dim), jnp.float32)
    cos, sin = rope_tables(jnp.int32(fk - fq), fq, gh // m.patch_size[1], gw // m.patch_size[2], m.head_dim,
                           m.rope_theta)
    cache = jax.random.normal(kc, (2, b, lk - lq, m.num_heads, m.head_dim), jnp.bfloat16)
    text = jax.random.normal(kt, (2, b, m.text_len, m.num_heads, m.head_dim), jnp.bfloat16)
    fv = jnp.ones((fk,), bool)
    out = {}
    for name, (fn, _) in variants.items():
        def run(p, x, cache, text, fn=fn):
            def attend(q, k, v, _):
                keys = jnp.concatenate([cache[0], k.astype(q.dtype)], axis=1)
                vals = jnp.concatenate([cache[1], v.astype(q.dtype)], axis=1)
                return fn(q, keys, vals, fv), None
            return block.apply(p, x, e0, cos, sin, text[0], text[1], attend, None)[0]
        try:
            ms, _ = time_fn(run, (params, x, cache, text), iters, reps)
            out[name] = {"ms": ms, "tflops": block_flops(m, lq, lk) / ms / 1e9}
        except Exception as e:  # noqa: BLE001 - a variant the backend cannot run is reported, not fatal
            out[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--mode", default="nam", choices=list(MODES), help="memory layout that sets the key length")
    p.add_argument("--block", action="store_true", help="also time a whole Wan block per variant")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    sh = shapes(args.tiny, args.mode)
    m, n = sh["model"], sh["n"]
    b, lq, lk, h, d = 1, sh["frames_q"] * n, sh["frames_k"] * n, m.num_heads, m.head_dim
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (jax.random.normal(key, (b, L, h, d), jnp.bfloat16) for key, L in ((kq, lq), (kk, lk), (kv, lk)))
    masks = {"steady": jnp.ones((sh["frames_k"],), bool), "warmup": jnp.asarray(sh["warmup_valid"])}
    refs = {c: reference(q, k, v, fv) for c, fv in masks.items()}
    variants = make_variants()
    flops = 4.0 * b * lq * lk * h * d
    rows = []
    for name, (fn, exact) in variants.items():
        row: dict[str, Any] = {"variant": name, "exact_any_mask": exact}
        for case, fv in masks.items():
            try:
                ms, out = time_fn(fn, (q, k, v, fv), args.iters, args.reps)
                err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - refs[case])))
                row[case] = {"ms": ms, "tflops": flops / ms / 1e9, "max_abs_err": err}
            except Exception as e:  # noqa: BLE001 - e.g. cuDNN on CPU or an unsupported shape
                row[case] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"}
        rows.append(row)
    tq = jax.random.normal(kk, (b, m.text_len, h, d), jnp.bfloat16)
    cross = {}
    for name, fn in {"xla": lambda q, k: attention(q, k, k, impl="xla"),
                     "cudnn": lambda q, k: jax.nn.dot_product_attention(q, k, k, implementation="cudnn")}.items():
        try:
            cross[name] = {"ms": time_fn(fn, (q, tq), args.iters, args.reps)[0]}
        except Exception as e:  # noqa: BLE001
            cross[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"}
    report = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "mode": args.mode,
              "shapes": {"batch": b, "q_tokens": lq, "kv_tokens": lk, "heads": h, "head_dim": d,
                         "text_tokens": m.text_len, "warmup_valid_frames": sh["warmup_valid"]},
              "self_attention": rows, "cross_attention": cross,
              "block": run_block(sh, variants, args.iters, args.reps) if args.block else None}
    print(format_report(report), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
    return report


def _cell(c: dict, key: str, spec: str) -> str:
    return c["error"] if "error" in c else format(c[key], spec)


def format_report(r: dict[str, Any]) -> str:
    s = r["shapes"]
    out = [f"# attention variants on {r['device']} (jax {r['jax']}), mode {r['mode']}: q {s['q_tokens']} tokens, "
           f"kv {s['kv_tokens']} tokens, {s['heads']}x{s['head_dim']}, bf16; warm-up mask frames "
           f"{''.join('1' if x else '0' for x in s['warmup_valid_frames'])}", "",
           "| variant | exact for any frame mask | steady ms | steady TFLOP/s | steady max err | warmup ms | "
           "warmup max err |", "|---|---|---|---|---|---|---|"]
    for row in r["self_attention"]:
        st, wu = row["steady"], row["warmup"]
        if "error" in st and st == wu:
            out.append(f"| {row['variant']} | {'yes' if row['exact_any_mask'] else 'steady only'} | "
                       f"unavailable: {st['error']} | | | | |")
            continue
        out.append(f"| {row['variant']} | {'yes' if row['exact_any_mask'] else 'steady only'} | "
                   f"{_cell(st, 'ms', '.3f')} | {_cell(st, 'tflops', '.0f')} | {_cell(st, 'max_abs_err', '.2e')} | "
                   f"{_cell(wu, 'ms', '.3f')} | {_cell(wu, 'max_abs_err', '.2e')} |")
    out += ["", f"cross-attention (q {s['q_tokens']} x {s['text_tokens']} text tokens): "
            + ", ".join(f"{k} " + (f"unavailable ({c['error']})" if "error" in c else f"{c['ms']:.3f} ms")
                        for k, c in r["cross_attention"].items())]
    if r["block"]:
        out += ["", "| whole Wan block with | ms | TFLOP/s |", "|---|---|---|"]
        out += [f"| {k} | unavailable: {c['error']} | |" if "error" in c
                else f"| {k} | {c['ms']:.3f} | {c['tflops']:.0f} |" for k, c in r["block"].items()]
    return "\n".join(out)


if __name__ == "__main__":
    main()
