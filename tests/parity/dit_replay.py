"""Replay a DiT fixture case (manifest entry) through our converter + sampler; shared by the parity tests."""
from __future__ import annotations

import dataclasses
import os

import numpy as np
from safetensors.numpy import load_file

from memflow_jax.config import MemoryConfig, ModelConfig, SamplerConfig
from memflow_jax.convert.dit import load_generator_pt, merge_lora, read_wan_config
from memflow_jax.memory.cache import reference_slot_order
from memflow_jax.sampling.streaming import StreamingSampler

PIPELINE_RULE = {"CausalInferencePipeline": "single", "InteractiveCausalInferencePipeline": "interactive"}


def model_config(root: str, manifest: dict) -> ModelConfig:
    cfg = read_wan_config(os.path.join(root, manifest["checkpoints"]["wan_folder"]["path"]))
    arch = manifest["arch"]
    cfg = dataclasses.replace(cfg, text_dim=arch.get("text_dim", cfg.text_dim),
                              patch_size=tuple(arch.get("patch_size", cfg.patch_size)))
    return cfg


def prompt_context(root: str, manifest: dict, prompt_ids: list[str], cfg: ModelConfig) -> np.ndarray:
    prompts = load_file(os.path.join(root, manifest["inputs"]["prompts"]["path"]))
    ctx = np.zeros((len(prompt_ids), cfg.text_len, cfg.text_dim), np.float32)
    for b, pid in enumerate(prompt_ids):
        p = prompts[pid].astype(np.float32)
        ctx[b, :p.shape[0]] = p
    return ctx


def generator_params(root: str, manifest: dict, case: dict, cfg: ModelConfig):
    ck = manifest["checkpoints"]
    params = load_generator_pt(os.path.join(root, ck[case["checkpoint"]]["path"]), cfg, use_ema=case["use_ema"])
    if case.get("lora"):
        lora = ck[case["lora"]]
        params = merge_lora(params, os.path.join(root, lora["path"]), alpha=float(lora["alpha"]))
    return params


def run_rollout(root: str, manifest: dict, case: dict):
    """Returns (outputs dict of arrays in the fixture layouts, debug list, sampler)."""
    cfg = model_config(root, manifest)
    params = generator_params(root, manifest, case, cfg)
    mk = case["model_kwargs"]
    mem = MemoryConfig(mode="nam" if mk.get("bank_size", 0) > 0 else ("sink" if mk.get("sink_size", 0) > 0 else "none"),
                       local_attn_size=mk["local_attn_size"], sink_size=mk.get("sink_size", 0),
                       bank_size=max(mk.get("bank_size", 0), 1), record_interval=mk.get("record_interval", 1),
                       global_sink=case.get("global_sink", True), sma=bool(mk.get("SMA", False)),
                       bank_record_rule=PIPELINE_RULE[case["pipeline"]])
    h, w = manifest["latent_hw"]
    scfg = SamplerConfig(chunk_frames=case["num_frame_per_block"], denoising_step_list=tuple(case["denoising_step_list"]),
                         warp_denoising_step=case["warp_denoising_step"], timestep_shift=mk["timestep_shift"],
                         context_noise=float(case["context_noise"]), height=h * 8, width=w * 8,
                         num_output_frames=case["num_output_frames"], batch_size=case["batch_size"])
    b = case["batch_size"]
    sampler = StreamingSampler(params, cfg, mem, scfg, batch_size=b, latent_hw=(h, w), debug=True)
    np.testing.assert_allclose(sampler.timesteps, case["denoising_timesteps_used"], rtol=0, atol=1e-4)
    noise = load_file(os.path.join(root, manifest["inputs"]["noise_stream"]["path"]))
    n_chunks, c = case["num_chunks"], case["num_frame_per_block"]
    init = noise["init_noise"][:b, :n_chunks * c].astype(np.float32)
    step = noise["step_noise"][:n_chunks, :, :b].astype(np.float32)
    segs = case["prompt_ids_per_segment"]
    contexts = [prompt_context(root, manifest, ids if len(ids) == b else ids * b, cfg) for ids in segs]
    x0s, probes, cache_k, cache_v, bank_k, bank_v, debug = [], [], [], [], [], [], []
    stride = case.get("x0_probe_stride", 8)
    for ci, x0, dbg in sampler.stream(contexts, case["switch_frame_indices"], n_chunks * c,
                                      init_noise=init, step_noise=step):
        if x0 is None:
            debug.append(dbg)
            continue
        x0s.append(np.asarray(x0))
        probes.append(np.asarray(dbg["x0_steps"])[:, :, :, :, ::stride, ::stride])
        debug.append({"chunk": ci, **dbg})
        cache = sampler.current_state.cache
        order = np.asarray(reference_slot_order(cache.slot_frame, sampler.spec))
        cache_k.append(np.asarray(cache.k).mean(axis=3)[:, :, order])
        cache_v.append(np.asarray(cache.v).mean(axis=3)[:, :, order])
        bank_k.append(np.asarray(cache.bank_k).mean(axis=3))
        bank_v.append(np.asarray(cache.bank_v).mean(axis=3))
    out = {"output_latents": np.concatenate(x0s, axis=1), "x0_probe": np.stack(probes),
           "cache_k_frame_mean": np.stack(cache_k), "cache_v_frame_mean": np.stack(cache_v),
           "bank_k_frame_mean": np.stack(bank_k), "bank_v_frame_mean": np.stack(bank_v)}
    return out, debug, sampler
