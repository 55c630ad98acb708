"""DiT parity against the reference fixtures: every case of $MEMFLOW_FIXTURES/dit/manifest.json.

* ``teacher_forward``: bidirectional WanModel from the Wan2.1 folder (flow and shift-`timestep_shift` x0).
* ``causal_rollout``: the streaming pipeline (window roll, NAM, prompt switch + re-cache, SMA, EMA, LoRA),
  replaying the stored noise; per-chunk latents (first diverging chunk reported), x0 probes, cache/bank frame
  means, NAM/SMA selections (canonicalised by the recorded equivalence groups) and the final bank frames.
"""
from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from memflow_jax.convert.dit import load_wan_folder
from memflow_jax.diffusion import scheduler as sch
from memflow_jax.nn import dit
from tests.conftest import fixture_dir, load_manifest
from tests.parity.dit_replay import model_config, prompt_context, run_rollout

MANIFEST = load_manifest("dit")
ROOT = fixture_dir("dit")
CASES = MANIFEST["cases"]


def _check(name: str, got: np.ndarray, ref: np.ndarray, rtol_to_max: float) -> None:
    assert got.shape == ref.shape, f"{name}: shape {got.shape} vs reference {ref.shape}"
    err = float(np.max(np.abs(got.astype(np.float64) - ref)))
    bound = rtol_to_max * float(np.max(np.abs(ref)))
    assert err <= bound, f"{name}: max|diff| {err:.3e} > {bound:.3e} (rtol_to_max {rtol_to_max})"


def _rtol(case: dict, key: str) -> float:
    tol = case["tolerance"]
    if key in tol:
        return float(tol[key]["rtol_to_max"])
    if key.endswith("_frame_mean"):
        return float(tol["cache_and_bank_frame_means"]["rtol_to_max"])
    raise KeyError(f"case {case['name']}: no tolerance for {key}")


def _teacher_forward(case: dict) -> None:
    arrays = load_file(os.path.join(ROOT, case["file"]))
    cfg, params = load_wan_folder(os.path.join(ROOT, MANIFEST["checkpoints"][case["checkpoint"]]["path"]))
    assert cfg == model_config(ROOT, MANIFEST), "config.json and manifest arch disagree"
    x = arrays["x_bcfhw"].astype(np.float32)
    t = arrays["t"].astype(np.float32)
    ctx = prompt_context(ROOT, MANIFEST, case["prompt_ids"], cfg)
    flow = np.asarray(dit.forward(params, cfg, jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx)))
    _check("flow_pred_bcfhw", flow, arrays["flow_pred_bcfhw"], _rtol(case, "flow_pred_bcfhw"))
    schedule = sch.make_schedule(case["timestep_shift"])
    b, f = x.shape[0], x.shape[2]
    tt = jnp.broadcast_to(jnp.asarray(t)[:, None], (b, f))
    x0 = sch.flow_to_x0(schedule, jnp.asarray(flow.transpose(0, 2, 1, 3, 4)),
                        jnp.asarray(x.transpose(0, 2, 1, 3, 4)), tt)
    _check("x0_pred_bfchw", np.asarray(x0), arrays["x0_pred_bfchw"], _rtol(case, "x0_pred_bfchw"))


def _canon(sel, groups) -> list[int]:
    rep = {}
    for g in groups:
        for i in g:
            rep[i] = min(g)
    return sorted(rep.get(int(i), int(i)) for i in sel)


def _our_trace(debug: list, chunk: int, phase: str, key: str, layer: int):
    if phase == "recache":
        for d in debug:
            if "recache" in d and d["chunk"] == chunk:
                return np.asarray(d["recache"][key])[layer]
        raise AssertionError(f"no re-cache at chunk {chunk} in our run")
    d = next(d for d in debug if "recache" not in d and d["chunk"] == chunk)
    if phase == "ctx":
        return np.asarray(d["ctx"][key])[layer]
    step = int(phase.replace("step", ""))
    return np.asarray(d["steps"][key])[step, layer]


def _causal_rollout(case: dict) -> None:
    ref = load_file(os.path.join(ROOT, case["file"]))
    with open(os.path.join(ROOT, case["debug"])) as f:
        dbg_ref = json.load(f)
    out, debug, sampler = run_rollout(ROOT, MANIFEST, case)
    # per-chunk latents: report the first chunk that diverges
    c = case["num_frame_per_block"]
    lat, lref = out["output_latents"], ref["output_latents"]
    assert lat.shape == lref.shape, f"output_latents shape {lat.shape} vs {lref.shape}"
    bound = _rtol(case, "output_latents") * float(np.max(np.abs(lref)))
    for ci in range(case["num_chunks"]):
        err = float(np.max(np.abs(lat[:, ci * c:(ci + 1) * c] - lref[:, ci * c:(ci + 1) * c])))
        assert err <= bound, f"first diverging chunk: {ci} (max|diff| {err:.3e} > {bound:.3e})"
    for key in ("x0_probe", "cache_k_frame_mean", "cache_v_frame_mean", "bank_k_frame_mean",
                "bank_v_frame_mean"):
        if key in ref:
            _check(key, out[key], ref[key], _rtol(case, key))
    # NAM selections (kept indices, canonicalised by equivalent bank slots)
    n_nam = 0
    for e in dbg_ref["nam_compress"]:
        ours = _our_trace(debug, e["chunk"], e["phase"], "nam_kept", e["layer"])
        for b, top in enumerate(e["topk"]):
            groups = [g for item in e.get("equivalent_slots", []) if item.get("b", b) == b
                      for g in item.get("groups", [])]
            assert _canon(ours[b], groups) == _canon(top, groups), (
                f"NAM top-k differs at chunk {e['chunk']} {e['phase']} layer {e['layer']} b {b}: "
                f"ours {list(ours[b])} ref {top} (scores {e['scores'][b]})")
        n_nam += 1
    assert n_nam == case["nam_compressions_per_layer"] * sampler.mcfg.num_layers or not dbg_ref["nam_compress"]
    # SMA selections per (batch, head)
    for e in dbg_ref["sma_selections"]:
        ours = _our_trace(debug, e["chunk"], e["phase"], "sma_idx", e["layer"])
        for b, per_head in enumerate(e["selected_sorted"]):
            for h, sel in enumerate(per_head):
                groups = [g for item in e.get("equivalent_candidates", [])
                          if item["b"] == b and item["h"] == h for g in item["groups"]]
                mine = [i for i in ours[b, h] if i < e["num_candidates"]]
                assert _canon(mine, groups) == _canon(sel, groups), (
                    f"SMA selection differs at chunk {e['chunk']} {e['phase']} layer {e['layer']} b {b} h {h}: "
                    f"ours {mine} ref {sel}")
    assert len(dbg_ref["sma_selections"]) == case["sma_calls"]
    # final bank provenance
    if sampler.spec.bank > 0:
        final = np.asarray(sampler.current_state.cache.bank_frame).tolist()
        want = [[[-1 if f is None else f for f in row] for row in layer] for layer in dbg_ref["final_bank_frames"]]
        assert final == want, f"final bank frames {final} vs {dbg_ref['final_bank_frames']}"


# rollout kinds differ by pipeline (single-prompt / interactive); the case's "pipeline" field selects the rules
KINDS = {"teacher_forward": _teacher_forward, "causal_rollout": _causal_rollout,
         "interactive_rollout": _causal_rollout}


@pytest.mark.parity
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_dit_case(case: dict) -> None:
    if case["kind"] not in KINDS:
        pytest.fail(f"case {case['name']}: kind {case['kind']!r} is not implemented")
    KINDS[case["kind"]](case)
