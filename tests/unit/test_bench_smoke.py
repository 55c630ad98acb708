"""Smoke tests of the speed benchmarks on tiny CPU configs: report/table structure and the analytic FLOP count
(no timing assertions)."""
from __future__ import annotations

import dataclasses
import json
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import attention_variants, bench_sampler, profile_chunk
from memflow_jax import runtime
from memflow_jax.memory.cache import recache_dead_frames
from memflow_jax.sampling.streaming import StreamingSampler

TABLE_HEAD = "| mode | key frames | compile s | s/chunk |"


def _dot_flops(jaxpr) -> float:
    """Matmul FLOPs of a jaxpr: 2 x output size x contracted size per dot_general; scan bodies x length."""
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[i] for i in contract])
            continue
        subs = []
        for value in eqn.params.values():
            for v in value if isinstance(value, (list, tuple)) else [value]:
                inner = v if hasattr(v, "eqns") else getattr(v, "jaxpr", None)
                if hasattr(inner, "eqns"):
                    subs.append(_dot_flops(inner))
        assert eqn.primitive.name != "while", "unknown trip count"
        if eqn.primitive.name == "cond":
            total += max(subs)
        else:
            total += sum(subs) * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
    return total


@pytest.fixture(scope="module")
def tiny():
    cfg = bench_sampler.build_configs(tiny=True)
    return cfg, bench_sampler.init_dit(cfg["model"], seed=0)


@pytest.mark.parametrize("mode", list(bench_sampler.MODES))
def test_flop_formula_matches_traced_matmuls(tiny, mode):
    """Analytic chunk / switch FLOPs == every matmul of the traced sampler, minus the NAM and SMA scoring
    einsums the formula leaves out (per layer: NAM 2·B·K·H·D once per chunk and per re-cache, SMA 2·B·H·(S+K)·D
    per forward), plus the head of the forwards run only for the cache they write (clean pass, re-cache), which
    the formula counts (the issue's FLOPs) and the sampler never runs (``need_flow=False``; XLA then also drops
    their last layer's attention and FFN, which the trace still holds)."""
    cfg, params = tiny
    m, scfg = cfg["model"], cfg["sampler"]
    mem = dataclasses.replace(cfg["memory"], **bench_sampler.MODES[mode])
    s = StreamingSampler(params, m, mem, scfg, batch_size=1, latent_hw=scfg.latent_hw)
    h, w = scfg.latent_hw
    noise = jnp.zeros((1, scfg.chunk_frames, m.in_dim, h, w))
    step_noise = jnp.zeros((len(s.timesteps) - 1,) + noise.shape)
    text = jnp.zeros((1, m.text_len, m.text_dim))
    kv = s.prompt_kv(text)
    chunk = _dot_flops(jax.make_jaxpr(s.chunk)(s.init_state(), kv, noise, step_noise, noise).jaxpr)
    # a switch past the window re-encodes the W-frame history less its dead frames
    full = s.init_state().replace(frame=jnp.array(s.spec.window + scfg.chunk_frames, jnp.int32))
    recache = _dot_flops(jax.make_jaxpr(lambda t: s.recache(full, t))(kv).jaxpr)
    prompt = _dot_flops(jax.make_jaxpr(s.prompt_kv)(text).jaxpr)

    sp, d = s.spec, m.head_dim
    nam_once = m.num_layers * 2 * sp.bank * m.num_heads * d  # NAM: once before a chunk, once in a re-cache
    sma = m.num_layers * 2 * m.num_heads * (sp.sink + sp.bank) * d if mem.sma else 0  # SMA: every forward
    want = bench_sampler.chunk_flops(m, sp, mem, len(s.timesteps))
    steps = len(s.timesteps)
    head = 2 * m.dim * m.out_dim * int(np.prod(m.patch_size)) * sp.tokens_per_frame  # a frame's head matmul
    frame = int(full.frame)
    recached = min(sp.window, frame) - recache_dead_frames(sp, frame, mem.sma)
    assert chunk + sp.chunk_frames * head == want["chunk"] + nam_once + (steps + 1) * sma
    assert (chunk + recache + prompt + (sp.chunk_frames + recached) * head
            == want["switch"] + 2 * nam_once + (steps + 2) * sma)
    assert bench_sampler.key_frames(sp, mem) == {"nam": 8, "nam+sma": 7, "sink": 6, "local": 6}[mode]


def test_tiny_run_report_and_table(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench_sampler, "init_dit", lambda m, seed: tiny[1])  # same tiny params, built once
    path = tmp_path / "bench.json"
    report = bench_sampler.main(["--tiny", "--chunks", "2", "--modes", "nam", "--switches", "2", "--vae-chunks", "1",
                                 "--json", str(path)])
    out = capsys.readouterr().out
    on_disk = json.loads(path.read_text())
    assert on_disk["rows"][0]["chunk_s"] == report["rows"][0]["chunk_s"]
    assert set(on_disk) == {"environment", "long", "batch", "frames_per_chunk", "dit_params", "config", "rows", "vae"}
    env = report["environment"]
    assert env["args"][:3] == ["--tiny", "--chunks", "2"] and env["command"].split()[0] == sys.executable
    assert env["jax"] == jax.__version__ and env["device"]["platform"] == jax.default_backend()
    assert {"jaxlib", "flax", "XLA_FLAGS"} <= set(env)

    cfg = report["config"]
    fpc = cfg["sampler"]["chunk_frames"] * 2 ** sum(cfg["vae"]["temporal_downsample"])
    assert report["frames_per_chunk"] == fpc
    assert report["dit_params"] == bench_sampler.dit.count_params(bench_sampler.dit.abstract_params(
        bench_sampler.build_configs(tiny=True)["model"]))
    (row,) = report["rows"]
    mem = cfg["memory"]
    assert row["mode"] == "nam" and "error" not in row
    assert row["key_frames"] == mem["sink_size"] + mem["bank_size"] + (mem["local_attn_size"] - mem["sink_size"])
    assert row["chunks"] == 2 and len(row["chunk_s"]) == 2 and row["retraces"] == 0
    assert row["chunk_s_min"] <= row["chunk_s_median"] <= row["chunk_s_max"]
    assert min(row["chunk_s"]) > 0 and row["compile_s"] > 0 and row["switch_s"] > 0
    chex.assert_trees_all_close(row["dit_fps"], fpc / row["chunk_s_median"])
    chex.assert_trees_all_close(row["tflops"], row["chunk_tflop"] / row["chunk_s_median"])
    vae = report["vae"]
    assert "skipped" in vae or (vae["frames_per_chunk"] == fpc and
                                vae["pixels"] == [cfg["sampler"]["height"], cfg["sampler"]["width"]])
    if "chunk_s_median" in vae:
        chex.assert_trees_all_close(row["e2e_fps"], fpc / (row["chunk_s_median"] + vae["chunk_s_median"]))

    lines = out.splitlines()
    head = next(i for i, x in enumerate(lines) if x.startswith(TABLE_HEAD))
    assert lines[head + 2].startswith("| nam | ")
    assert lines[head + 2].count("|") == lines[head].count("|") == 16
    assert f"| {row['switch_s'] / row['chunk_s_median']:.2f} |" in lines[head + 2]  # the switch / chunk column
    assert "Flatness" not in out
    report["long"] = 3  # the --long table renders from the same row fields
    long_table = bench_sampler.format_report(report).split("Flatness")[1].splitlines()
    assert long_table[1].startswith("| mode | chunks | s/chunk @20 | s/chunk @3 |")
    assert long_table[3].startswith("| nam | 3 | ")


@pytest.mark.slow
def test_tiny_run_all_modes(tmp_path):
    report = bench_sampler.main(["--tiny", "--chunks", "2", "--json", str(tmp_path / "b.json")])
    assert [r["mode"] for r in report["rows"]] == list(bench_sampler.MODES)
    assert all("error" not in r and r["retraces"] == 0 for r in report["rows"])


@pytest.mark.slow
def test_isolated_processes(tmp_path):
    report = bench_sampler.main(["--tiny", "--isolate", "--chunks", "1", "--modes", "local", "--no-vae",
                                 "--json", str(tmp_path / "b.json")])
    (row,) = report["rows"]
    assert "error" not in row and row["chunks"] == 1 and report["vae"] == {"skipped": "--no-vae"}


def test_attention_variants_tiny(tmp_path):
    path = tmp_path / "attn.json"
    report = attention_variants.main(["--tiny", "--iters", "1", "--reps", "1", "--json", str(path)])
    assert json.loads(path.read_text())["shapes"] == report["shapes"]
    rows = {r["variant"]: r for r in report["self_attention"]}
    assert set(rows) == set(attention_variants.make_variants())
    for name, row in rows.items():
        for case in ("steady", "warmup"):
            cell = row[case]
            if "error" in cell:  # cuDNN variants off GPU
                assert name.startswith("cudnn") and jax.default_backend() != "gpu"
                continue
            assert cell["ms"] > 0
            if row["exact_any_mask"] or case == "steady":
                assert cell["max_abs_err"] < 2e-2, (name, case, cell)
    for name in ("xla_mask", "xla_compact+kv_lengths", "jax_xla_mask"):
        assert "error" not in rows[name]["warmup"]
    # the warm-up mask is not trivial: ignoring it changes the result
    assert rows["xla_nomask"]["warmup"]["max_abs_err"] > 0.1
    assert not all(report["shapes"]["warmup_valid_frames"])


def test_profile_chunk_tiny(tmp_path, capsys):
    path = tmp_path / "prof.json"
    report = profile_chunk.main(["--tiny", "--warmup", "1", "--chunks", "1", "--switch", "--vae", "--top", "3",
                                 "--json", str(path)])
    assert json.loads(path.read_text())["mode"] == report["mode"] == "nam"
    for part in ("chunk", "recache", "vae"):
        s = report[part]
        assert set(s["by_kind_s"]) == set(profile_chunk.KINDS) and s["total_s"] > 0
        chex.assert_trees_all_close(sum(s["by_kind_s"].values()), s["total_s"])
        assert 0 < len(s["top"]) <= 3 and all(t["kind"] in profile_chunk.KINDS for t in s["top"])
    assert "## per chunk" in capsys.readouterr().out


@pytest.mark.parametrize("record_interval", [1, 3])
def test_profile_warmup_fills_window_and_bank(record_interval):
    """``profile_chunk.fill_chunks``: after that many chunks every window slot and bank slot is valid, one chunk
    fewer leaves a slot empty (the profile would trace the warm-up path)."""
    cfg = bench_sampler.build_configs(tiny=True)
    cfg["memory"] = dataclasses.replace(cfg["memory"], record_interval=record_interval)
    s, _, texts, noise, step_noise = bench_sampler.mode_setup("nam", bench_sampler.init_dit(cfg["model"], 0), cfg, 1)
    kv = s.prompt_kv(texts[0])
    state = s.init_state()
    n = profile_chunk.fill_chunks(s.spec)

    def full(st):
        return bool(jnp.all(st.cache.slot_frame >= 0)) and int(st.cache.bank_pointer) >= s.spec.bank

    for i in range(n):
        assert not full(state), f"full after {i} chunks, fill_chunks says {n}"
        state = s.chunk(state, kv, noise, step_noise)[0]
    assert full(state)


def test_profile_op_kinds():
    """Kernel names as an H100 trace shows them (benchmarks/results/h100_profile_nam.json)."""
    kind = profile_chunk.op_kind
    assert kind("command_buffer_35", "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7") == "attention"
    assert kind("command_buffer_35", "nvjet_sm90_tst_128x216_64x4_2x1_v_bz_coopA_bias_NNT") == "gemm"
    assert kind("cudnn-conv-bias-activation.96", "void cudnn::engines_precompiled::nchwToNhwcKernel") == "conv"
    assert kind("copy.1", "MemcpyD2D") == "copy/gather"
    assert kind("command_buffer_35", "memcpy128") == "copy/gather"
    assert kind("command_buffer_35", "input_concatenate_fusion_4") == "copy/gather"
    assert kind("command_buffer_35", "loop_add_fusion_4") == "other"


def test_xla_defaults_respect_user_flags():
    env = {}
    assert runtime.apply_xla_defaults(env) == "--xla_gpu_enable_triton_gemm=false"
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    runtime.apply_xla_defaults(env)
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8 --xla_gpu_enable_triton_gemm=false"
    env = {"XLA_FLAGS": "--xla_gpu_enable_triton_gemm=true"}  # the user's choice wins
    assert runtime.apply_xla_defaults(env) == "--xla_gpu_enable_triton_gemm=true"
