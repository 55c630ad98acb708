"""Probe: compiled memory analysis of one chunk step per memory mode, and SMA gather variants timed in place.

    python -m benchmarks.probe_memory [--tiny]

Prints, per mode, XLA's buffer sizes for the jitted chunk step (arguments, outputs, temporaries) and the
steady-state seconds per chunk; for nam+sma also with alternative per-head gathers (candidate layouts).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.bench_sampler import MODES, build_configs, init_dit
from memflow_jax.memory import sma
from memflow_jax.sampling import streaming
from memflow_jax.sampling.streaming import StreamingSampler


def gather_vmap_take(cand, idx):  # cand [B, M, N, H, D], idx [B, H, k]
    b, m, n, h, d = cand.shape
    per_head = jax.vmap(lambda c, i: jnp.take(c, i, axis=0), in_axes=(2, 0), out_axes=2)  # [M,N,H,D],[H,k]
    per_batch = jax.vmap(per_head, in_axes=(0, 0), out_axes=0)
    return per_batch(cand, idx).reshape(b, -1, h, d)


def gather_onehot(cand, idx):
    b, m, n, h, d = cand.shape
    oh = jax.nn.one_hot(idx, m, dtype=cand.dtype)  # [B, H, k, M]
    g = jnp.einsum("bhkm,bmnhd->bknhd", oh, cand, preferred_element_type=jnp.float32).astype(cand.dtype)
    return g.reshape(b, -1, h, d)


def run(name, params, cfg, chunks):
    m, scfg = cfg["model"], cfg["sampler"]
    mem = dataclasses.replace(cfg["memory"], **MODES[name])
    streaming._COMPILED.clear()
    s = StreamingSampler(params, m, mem, scfg, batch_size=1, latent_hw=scfg.latent_hw)
    rng = np.random.default_rng(0)
    h, w = scfg.latent_hw
    text = s.prompt_kv(jnp.asarray(rng.standard_normal((1, m.text_len, m.text_dim), np.float32)))
    noise = jnp.asarray(rng.standard_normal((1, scfg.chunk_frames, m.in_dim, h, w), np.float32))
    sn = jnp.asarray(rng.standard_normal((len(s.timesteps) - 1,) + noise.shape, np.float32))
    state = s.init_state()
    comp = s.steps.chunk.lower(s.params, state, text, noise, sn, jnp.zeros_like(noise)).compile()
    ma = comp.memory_analysis()
    gib = lambda x: x / 2**30  # noqa: E731
    mem_line = (f"args {gib(ma.argument_size_in_bytes):.2f} GiB, out {gib(ma.output_size_in_bytes):.2f}, "
                f"temp {gib(ma.temp_size_in_bytes):.2f}, alias {gib(ma.alias_size_in_bytes):.2f}") if ma else "n/a"
    times = []
    for i in range(chunks):
        t = time.perf_counter()
        state, x0, _ = s.chunk(state, text, noise, sn)
        jax.block_until_ready(x0)
        times.append(time.perf_counter() - t)
    st = jax.devices()[0].memory_stats() or {}
    print(f"| {name} | {np.median(times[2:]):.4f} | {mem_line} | in use {gib(st.get('bytes_in_use', 0)):.2f} GiB "
          f"| peak {gib(st.get('peak_bytes_in_use', 0)):.2f} GiB |", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--chunks", type=int, default=12)
    args = p.parse_args(argv)
    cfg = build_configs(args.tiny, "auto")
    params = init_dit(cfg["model"], 0)
    print("| variant | s/chunk | compiled buffers | after | |\n|---|---|---|---|---|")
    for name in ("nam", "sink", "nam+sma"):
        run(name, params, cfg, args.chunks)
    orig = sma.gather_frames
    for label, fn in (("vmap_take", gather_vmap_take), ("onehot", gather_onehot)):
        sma.gather_frames = fn
        print(f"# SMA gather = {label}", flush=True)
        run("nam+sma", params, cfg, args.chunks)
    sma.gather_frames = orig


if __name__ == "__main__":
    sys.exit(main())
