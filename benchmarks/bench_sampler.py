"""Speed benchmark of the streaming sampler at Wan2.1-1.3B size (random weights made on device, no checkpoint).

Per memory mode (``nam`` | ``nam+sma`` | ``sink`` | ``local``): compile time of the first chunk, steady s/chunk
over N chunks, DiT FPS, a prompt switch (prompt K/V + re-cache + chunk) and its compile time, peak device
memory, analytic FLOPs -> achieved TFLOP/s; the streaming VAE decode s/chunk and end-to-end FPS; ``--long N``
checks that time and memory stay flat over N chunks. Each mode and the VAE run in a fresh process by default
(clean peak memory and compile times; ``--no-isolate`` runs everything here).

    python -m benchmarks.bench_sampler [--chunks 20] [--modes nam,sink] [--long 500] [--json out.json] [--tiny]
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.metadata
import json
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python benchmarks/bench_sampler.py` without an installed package
    sys.path.insert(0, ROOT)
from memflow_jax.runtime import apply_xla_defaults  # noqa: E402

apply_xla_defaults()  # before jax creates its backend (children of --isolate inherit the environment)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from memflow_jax.config import MemoryConfig, ModelConfig, SamplerConfig, VAEConfig  # noqa: E402
from memflow_jax.memory.cache import CacheSpec, recache_dead_frames  # noqa: E402
from memflow_jax.nn import dit  # noqa: E402
from memflow_jax.sampling.streaming import StreamingSampler  # noqa: E402

MODES: dict[str, dict[str, Any]] = {  # memory-config overrides per benchmark row
    "nam": {"mode": "nam", "sma": False},  # MemFlow release: sink 3 + NAM bank 3 + 12-frame window
    "nam+sma": {"mode": "nam", "sma": True},
    "sink": {"mode": "sink", "sma": False},  # LongLive: frame sink, no bank
    "local": {"mode": "none", "sma": False},  # plain rolling window
}


def build_configs(tiny: bool, attention_impl: str = "auto", kv_splits: int = 0) -> dict[str, Any]:
    """Real Wan2.1-1.3B / 480x832 setup (bf16), or a tiny float32 one that runs on CPU in seconds (same code
    paths; float32 because XLA:CPU compiles bf16 graphs several times slower)."""
    if tiny:
        z = 4
        model = ModelConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, text_len=8, text_dim=16, freq_dim=16,
                            in_dim=z, out_dim=z, dtype="float32", param_dtype="float32",
                            attention_impl=attention_impl)
        memory = MemoryConfig(local_attn_size=6, sink_size=1, bank_size=2, record_interval=1, sma_top_k=2)
        sampler = SamplerConfig(height=32, width=32, attention_kv_splits=kv_splits)  # 4x4 latents, 4 tokens a frame
        vae = VAEConfig(dim=4, z_dim=z, dim_mult=(1, 1, 1, 1), num_res_blocks=1, latent_mean=(0.0,) * z,
                        latent_std=(1.0,) * z, dtype="float32")
    else:
        model = ModelConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, text_len=512, text_dim=4096,
                            in_dim=16, out_dim=16, dtype="bfloat16", param_dtype="bfloat16",
                            attention_impl=attention_impl)
        memory = MemoryConfig(local_attn_size=12, sink_size=3, bank_size=3, record_interval=3)
        sampler = SamplerConfig(chunk_frames=3, denoising_step_list=(1000, 750, 500, 250), height=480, width=832,
                                attention_kv_splits=kv_splits)
        vae = VAEConfig(dtype="bfloat16")
    for c in (model, memory, sampler, vae):
        c.validate()
    return {"model": model, "memory": memory, "sampler": sampler, "vae": vae}


def forward_flops(m: ModelConfig, lq: int, lk: int, frames: int) -> float:
    """Matmul FLOPs (2 per multiply-add) of one DiT forward: ``lq`` query tokens (all batch rows, ``frames``
    frames) attending to ``lk`` self-attention keys per row. With d = dim = H·D, T = text_len, L = num_layers:

    per layer   self-attn q,k,v,o projections  8·lq·d²
                self-attn QKᵀ and PV             4·lq·lk·d
                cross-attn q,o projections     4·lq·d²     (text K/V are computed once per prompt)
                cross-attn QKᵀ and PV            4·lq·T·d    (all T text tokens: no text mask)
                FFN                            4·lq·d·ffn_dim
    outside     patch embed 2·lq·C_in·p·d + head 2·lq·d·C_out·p + time MLP 2·frames·(freq_dim·d + 7·d²)
    total = L·(per layer) + outside   (p = prod(patch_size); norms, RoPE, softmax, NAM/SMA scoring not counted)
    """
    d, p = m.dim, math.prod(m.patch_size)
    outside = 2 * lq * m.in_dim * p * d + 2 * lq * d * m.out_dim * p + 2 * frames * (m.freq_dim * d + 7 * d * d)
    return m.num_layers * block_flops(m, lq, lk) + float(outside)


def block_flops(m: ModelConfig, lq: int, lk: int) -> float:
    """Matmul FLOPs of one Wan block (the 'per layer' line of :func:`forward_flops`)."""
    d = m.dim
    return float(12 * lq * d * d + 4 * lq * lk * d + 4 * lq * m.text_len * d + 4 * lq * d * m.ffn_dim)


def key_frames(spec: CacheSpec, mem: MemoryConfig) -> int:
    """Frames in the self-attention key layout: sink + bank + window slots (SMA: top-k of sink+bank + window).
    The layout is static; masked (not yet filled) slots are computed too, and all are filled in steady state."""
    cand = spec.sink + spec.bank
    sel = min(mem.sma_top_k, cand) if (mem.sma and cand) else cand
    return sel + spec.window - spec.sink


def chunk_flops(m: ModelConfig, spec: CacheSpec, mem: MemoryConfig, steps: int,
                prune: bool = True) -> dict[str, float]:
    """FLOPs of one chunk (``steps`` denoising forwards + 1 clean-context pass) and of a prompt switch past the
    window (prompt K/V: text MLP 2·T·(text_dim·d + d²) + L·4·T·d² per row; re-cache forward over the W-frame
    history less its dead frames unless ``prune`` is off, :func:`memory.cache.recache_dead_frames`; chunk)."""
    n, b, f = spec.tokens_per_frame, spec.batch, spec.chunk_frames
    w = spec.window - (recache_dead_frames(spec, spec.window + f, mem.sma) if prune else 0)  # re-cache frames
    lk = key_frames(spec, mem) * n
    chunk = (steps + 1) * forward_flops(m, b * f * n, lk, b * f)
    prompt = b * m.text_len * (2 * m.text_dim * m.dim + 2 * m.dim ** 2 + 4 * m.num_layers * m.dim ** 2)
    switch = prompt + forward_flops(m, b * w * n, lk, b * w) + chunk
    return {"chunk": chunk, "switch": float(switch)}


def memory_stats() -> dict[str, int | None]:
    """``bytes_in_use`` / ``peak_bytes_in_use`` / ``bytes_limit`` of device 0 (None where the backend has none)."""
    st = jax.devices()[0].memory_stats() or {}  # None on CPU
    return {k: st.get(k) for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")}


def tree_bytes(tree: Any) -> int:
    return int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)))


def timed(fn, *a):
    t0 = time.perf_counter()
    return jax.block_until_ready(fn(*a)), time.perf_counter() - t0  # (left to right: result, then the clock)


def init_dit(m: ModelConfig, seed: int) -> dit.Params:
    """Random DiT params made on device by one jitted init, directly in the compute dtype (no f32 copy)."""
    m = dataclasses.replace(m, param_dtype=m.dtype)
    return jax.jit(lambda key: dit.init_params(m, key))(jax.random.PRNGKey(seed))


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def frames_per_chunk(cfg: dict) -> int:
    """Output video frames of one chunk: chunk latents x the VAE's time stride (3 x 4 = 12)."""
    from memflow_jax.nn import vae as vae_lib

    return cfg["sampler"].chunk_frames * vae_lib.time_stride(cfg["vae"])


def mode_setup(name: str, params: dit.Params, cfg: dict, batch: int
               ) -> tuple[StreamingSampler, MemoryConfig, list[jnp.ndarray], jnp.ndarray, jnp.ndarray]:
    """The sampler of one memory mode and its inputs: (sampler, memory config, two prompts' embeddings
    [B, T, text_dim], chunk noise [B, F, C, h, w], step noise [steps-1, B, F, C, h, w]); host draws, so no RNG
    kernels to compile."""
    m, scfg = cfg["model"], cfg["sampler"]
    mem = dataclasses.replace(cfg["memory"], **MODES[name])
    mem.validate()
    s = StreamingSampler(params, m, mem, scfg, batch_size=batch, latent_hw=scfg.latent_hw)
    f, (h, w) = scfg.chunk_frames, scfg.latent_hw
    rng = np.random.default_rng(1)
    texts = [jnp.asarray(rng.standard_normal((batch, m.text_len, m.text_dim), np.float32)) for _ in range(2)]
    noise = jnp.asarray(rng.standard_normal((batch, f, m.in_dim, h, w), np.float32))
    step_noise = jnp.asarray(rng.standard_normal((len(s.timesteps) - 1,) + noise.shape, np.float32))
    return s, mem, texts, noise, step_noise


def vae_setup(cfg: dict, batch: int) -> tuple[Any, jnp.ndarray, Any]:
    """Random VAE params in the compute dtype, one chunk of latents [B, F, z, h, w] and a fresh decode cache."""
    from memflow_jax.nn import vae as vae_lib

    v, scfg = cfg["vae"], cfg["sampler"]
    (h, w), f = scfg.latent_hw, scfg.chunk_frames
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, v.dtype), vae_lib.init_params(v, jax.random.PRNGKey(7)))
    lat = jnp.asarray(np.random.default_rng(8).standard_normal((batch, f, v.z_dim, h, w), np.float32))
    return params, lat, vae_lib.init_decode_cache(v, batch, h, w)


def run_mode(name: str, params: dit.Params, cfg: dict, args: argparse.Namespace) -> dict[str, Any]:
    """Benchmark one memory mode; returns its row (times in seconds)."""
    m = cfg["model"]
    s, mem, texts, noise, step_noise = mode_setup(name, params, cfg, args.batch)
    kv = jax.block_until_ready(s.prompt_kv(texts[0]))
    state = s.init_state()

    def step(st, text_kv):
        st, x0, _ = s.chunk(st, text_kv, noise, step_noise)  # context_noise 0: no ctx noise used
        return jax.block_until_ready(st), x0

    def do_switch(st, text):  # what a prompt switch costs: new prompt K/V, re-cache, then the next chunk
        text_kv = s.prompt_kv(text)
        st, _ = s.recache(st, text_kv, prune=args.recache_prune)
        return step(st, text_kv)[0]

    (state, _), compile_s = timed(step, state, kv)  # chunk 1: trace + compile + run
    log(f"{name}: first chunk (compile) {compile_s:.1f} s")
    traces = s.trace_count
    times, mark20 = [], None
    for i in range(args.chunks):
        (state, _), dt = timed(step, state, kv)
        times.append(dt)
        if i + 2 == min(20, args.chunks + 1):  # chunk number 20 (or the last one of a short run)
            mark20 = memory_stats()
        if args.long and (i + 2) % 100 == 0:
            log(f"{name}: chunk {i + 2}: {dt:.3f} s")
    mark_n = memory_stats()
    while int(state.frame) <= s.spec.window:  # switches past the window: one re-cache program
        state, _ = step(state, kv)
    switch = []
    for j in range(max(2, args.switches)):  # alternate between the two prompts
        state, dt = timed(do_switch, state, texts[(j + 1) % 2])
        switch.append(dt)
    retraces = s.trace_count - traces  # > 0: something in the state changed shape or dtype
    med = statistics.median(times)
    fl = chunk_flops(m, s.spec, mem, len(s.timesteps), prune=args.recache_prune)
    sw = statistics.median(switch[1:])
    kf = key_frames(s.spec, mem)
    row = {"mode": name, "memory_config": dataclasses.asdict(mem), "key_frames": kf,
           "query_tokens": args.batch * s.spec.chunk_frames * s.tokens_per_frame, "key_tokens": kf * s.tokens_per_frame,
           "compile_s": compile_s, "chunks": len(times), "chunk_s": times, "chunk_s_median": med,
           "chunk_s_min": min(times), "chunk_s_max": max(times), "dit_fps": frames_per_chunk(cfg) / med,
           "chunk_tflop": fl["chunk"] / 1e12, "tflops": fl["chunk"] / med / 1e12, "switch_s": sw,
           "switch_compile_s": switch[0] - sw, "switch_tflop": fl["switch"] / 1e12, "retraces": retraces,
           "dit_params": dit.count_params(params), "params_bytes": tree_bytes(params),
           "state_bytes": tree_bytes(jax.eval_shape(s.init_state)), "device_memory": memory_stats(),
           "device_memory_at_20": mark20, "device_memory_at_n": mark_n,
           "chunk_s_at_20": statistics.median(times[13:23] or times),
           "chunk_s_at_end": statistics.median(times[-10:])}
    if retraces:
        log(f"WARNING {name}: the chunk step was traced {retraces} extra time(s): shapes are not static")
    log(f"{name}: {med:.3f} s/chunk, {row['dit_fps']:.1f} FPS, {row['tflops']:.0f} TFLOP/s, switch {sw:.3f} s")
    return row


def run_vae(cfg: dict, args: argparse.Namespace) -> dict[str, Any]:
    """Streaming VAE decode of one chunk (bf16), first chunk and later chunks compiled separately."""
    from memflow_jax.nn import vae as vae_lib

    decode = functools.partial(vae_lib.decode_chunk_jit, whole_chunk=args.vae_whole_chunk)
    v = cfg["vae"]
    params, lat, cache = vae_setup(cfg, args.batch)
    (_, cache), first_s = timed(decode, params, v, lat, cache)  # first chunk: 1 + 4(f-1) frames
    (pix, cache), second_s = timed(decode, params, v, lat, cache)  # later chunks: 4f frames
    times = []
    for _ in range(args.vae_chunks):
        (pix, cache), dt = timed(decode, params, v, lat, cache)
        times.append(dt)
    med = statistics.median(times)
    log(f"vae: {med:.3f} s/chunk -> {pix.shape[1]} frames of {pix.shape[-2]}x{pix.shape[-1]}")
    return {"first_chunk_s": first_s, "compile_s": second_s - med, "chunk_s": times, "chunk_s_median": med,
            "chunk_s_min": min(times), "chunk_s_max": max(times), "frames_per_chunk": int(pix.shape[1]),
            "pixels": [int(pix.shape[-2]), int(pix.shape[-1])], "params_bytes": tree_bytes(params),
            "device_memory": memory_stats()}


def run_unit(unit: str, cfg: dict, args: argparse.Namespace, params: dit.Params | None = None) -> dict[str, Any]:
    if unit != "vae" and params is None:
        params = init_dit(cfg["model"], seed=0)
    out = run_vae(cfg, args) if unit == "vae" else run_mode(unit, params, cfg, args)
    dev = jax.devices()[0]
    return {**out, "device": {"kind": dev.device_kind, "platform": dev.platform, "count": jax.device_count()}}


def run_isolated(units: list[str], argv: list[str]) -> dict[str, Any]:
    """Each unit in a fresh process (this one never touches the device, so it holds no device memory)."""
    results = {}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    for unit in units:
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "unit.json")
            log(f"{unit}: fresh process")
            p = subprocess.run([sys.executable, "-m", "benchmarks.bench_sampler", *argv, "--unit", unit,
                                "--json", out], cwd=ROOT, env=env)
            ok = p.returncode == 0 and os.path.exists(out)
            results[unit] = json.loads(Path(out).read_text()) if ok else {
                "error": f"subprocess exited with {p.returncode} (its stderr is above)"}
    return results


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: dict | None, argv: list[str]) -> dict[str, Any]:
    env: dict[str, Any] = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *getattr(sys, "orig_argv", sys.argv)[1:]]),
        "args": argv, "python": platform.python_version(), "platform": platform.platform(), "jax": jax.__version__,
        "jaxlib": _version("jaxlib"), "flax": _version("flax"), "device": device,
        "cuda_plugin": _version("jax-cuda12-plugin") or _version("jax-cuda13-plugin"),
        **{k: os.environ.get(k) for k in ("XLA_FLAGS", "XLA_PYTHON_CLIENT_MEM_FRACTION",
                                          "XLA_PYTHON_CLIENT_PREALLOCATE")},
    }
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True)
        env["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
        cuda = re.search(r"CUDA Version:\s*([\d.]+)", subprocess.run(["nvidia-smi"], capture_output=True,
                                                                     text=True).stdout)
        env["cuda_driver_api"] = cuda.group(1) if cuda else None
    return env


def _f(x: Any, spec: str = ".3f") -> str:
    return "–" if x is None else format(x, spec)


def _gib(stats: dict | None, key: str = "peak_bytes_in_use") -> float | None:
    v = (stats or {}).get(key)
    return None if v is None else v / 2 ** 30


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def format_report(rep: dict[str, Any]) -> str:
    """The printed report: environment header, one markdown row per mode, VAE note, flatness table (--long)."""
    env, vae, c, s = rep["environment"], rep["vae"], rep["config"]["model"], rep["config"]["sampler"]
    out = ["# memflow_jax sampler benchmark", "", f"command: {env['command']}",
           f"device: {env['device']} | nvidia-smi: {env.get('nvidia_smi', 'n/a')} | "
           f"CUDA (driver API): {env.get('cuda_driver_api', 'n/a')}",
           f"jax {env['jax']} | jaxlib {env['jaxlib']} | flax {env['flax']} | cuda plugin {env['cuda_plugin']} | "
           f"XLA_FLAGS={env['XLA_FLAGS']}",
           f"DiT {rep['dit_params'] or 0:,} params ({c['dtype']}), attention_impl={c['attention_impl']}, batch "
           f"{rep['batch']}, {s['height']}x{s['width']}, chunk {s['chunk_frames']} latents = "
           f"{rep['frames_per_chunk']} frames, {len(s['denoising_step_list'])} steps + 1 clean pass", ""]
    rows = []
    for r in rep["rows"]:
        if "error" in r:
            rows.append([r["mode"], f"error: {r['error']}"] + [""] * 13)
            continue
        rows.append([r["mode"], str(r["key_frames"]), _f(r["compile_s"], ".1f"), _f(r["chunk_s_median"]),
                     _f(r["chunk_s_min"]), _f(r["chunk_s_max"]), _f(r["dit_fps"], ".2f"),
                     _f(r["chunk_tflop"], ".1f"), _f(r["tflops"], ".0f"), _f(r["switch_s"]),
                     _f(r["switch_s"] / r["chunk_s_median"], ".2f"), _f(r["switch_compile_s"], ".1f"),
                     _f(_gib(r["device_memory"]), ".2f"),
                     _f(vae.get("chunk_s_median")), _f(r.get("e2e_fps"), ".2f")])
    out += _table(["mode", "key frames", "compile s", "s/chunk", "min", "max", "DiT FPS", "TFLOP/chunk", "TFLOP/s",
                   "switch s", "switch / chunk", "switch compile s", "peak GiB", "VAE s/chunk", "e2e FPS"], rows) + [""]
    if "chunk_s_median" in vae:
        out.append(f"VAE decode: {vae['frames_per_chunk']} frames of {vae['pixels'][0]}x{vae['pixels'][1]} per "
                   f"chunk, first chunk (with compile) {vae['first_chunk_s']:.1f} s, later-chunk compile "
                   f"{vae['compile_s']:.1f} s, peak {_f(_gib(vae['device_memory']), '.2f')} GiB")
    else:
        out.append(f"VAE: {vae.get('skipped') or vae.get('error')}")
    if rep["long"]:
        n = rep["long"]
        rows = [[r["mode"], str(r["chunks"] + 1), _f(r["chunk_s_at_20"]), _f(r["chunk_s_at_end"])]
                + [_f(_gib(r[k], key), ".3f") for key in ("peak_bytes_in_use", "bytes_in_use")
                   for k in ("device_memory_at_20", "device_memory_at_n")] for r in rep["rows"] if "error" not in r]
        out += ["", "Flatness (s/chunk: medians of chunks 15-24 and of the last 10):"]
        out += _table(["mode", "chunks", "s/chunk @20", f"s/chunk @{n}", "peak GiB @20", f"peak GiB @{n}",
                       "in use GiB @20", f"in use GiB @{n}"], rows)
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chunks", type=int, default=20, help="timed chunks after the warm-up chunk")
    p.add_argument("--modes", default=None, help=f"comma list of {list(MODES)} (default all; 'nam' with --long)")
    p.add_argument("--long", type=int, default=0, metavar="N", help="run N chunks and report flatness")
    p.add_argument("--switches", type=int, default=3, help="prompt switches (the first one compiles)")
    p.add_argument("--vae-chunks", type=int, default=10)
    p.add_argument("--no-vae", action="store_true")
    p.add_argument("--vae-whole-chunk", action=argparse.BooleanOptionalAction, default=True,
                   help="later chunks decode their latent frames in one decoder call (default) or one step each")
    p.add_argument("--recache-prune", action=argparse.BooleanOptionalAction, default=True,
                   help="the re-cache leaves out the history frames nothing reads (exact; default) or runs all W")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--attention-impl", default="auto", choices=["auto", "xla", "cudnn"],
                   help="model.attention_impl (auto: cuDNN on GPU wherever no kv_mask is passed)")
    p.add_argument("--kv-splits", type=int, default=0,
                   help="sampler.attention_kv_splits (0: auto wave model, 1: one cuDNN call per attention)")
    p.add_argument("--tiny", action="store_true", help="tiny model on CPU (smoke test; timings meaningless)")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="one fresh process per mode (default: on, off with --tiny)")
    p.add_argument("--json", default=None, help="write the full report here")
    p.add_argument("--unit", default=None, help=argparse.SUPPRESS)  # internal: one unit for --isolate
    args = p.parse_args(argv)
    args.modes = args.modes.split(",") if args.modes else (["nam"] if args.long else list(MODES))
    if any(x not in MODES for x in args.modes):
        p.error(f"--modes {args.modes}: choose from {list(MODES)}")
    args.chunks = args.long - 1 if args.long else args.chunks  # chunk 1 is the warm-up
    if args.chunks < 1 or args.vae_chunks < 1:
        p.error("--chunks and --vae-chunks must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; prints the markdown table and returns the report (also written to ``--json``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    cfg = build_configs(args.tiny, args.attention_impl, args.kv_splits)
    if args.unit:  # child of --isolate
        result = run_unit(args.unit, cfg, args)
        Path(args.json).write_text(json.dumps(result))
        return result
    units = args.modes + ([] if args.no_vae else ["vae"])
    if args.isolate if args.isolate is not None else not args.tiny:
        results = run_isolated(units, argv)
    else:
        params = init_dit(cfg["model"], seed=0)
        results = {u: run_unit(u, cfg, args, params) for u in units}
    vae = results.get("vae") or {"skipped": "--no-vae"}
    rows = [{"mode": u, **results[u]} for u in args.modes]
    for r in rows:
        if "chunk_s_median" in r and "chunk_s_median" in vae:
            r["e2e_fps"] = frames_per_chunk(cfg) / (r["chunk_s_median"] + vae["chunk_s_median"])
    device = next((r["device"] for r in results.values() if "device" in r), None)
    report = {"environment": environment(device, argv), "long": args.long, "batch": args.batch,
              "frames_per_chunk": frames_per_chunk(cfg),
              "dit_params": next((r["dit_params"] for r in rows if "dit_params" in r), None),
              "config": {k: dataclasses.asdict(v) for k, v in cfg.items()}, "rows": rows, "vae": vae}
    print(format_report(report), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
