"""Parity of memflow_jax.diffusion.scheduler with the reference FlowMatchScheduler fixtures.

Every stored array of ``tables.safetensors`` and ``ops_case.safetensors`` is checked: the keys are read
from the files (a fixture set with another case count or extra shift tables runs unchanged) and mapped to
an op by name; a key no rule knows is a failure. Settings come from ``scheduler_cases.json``; tolerances
follow the fixture README: exact for integer ids, ``atol=1e-6`` for tables / add_noise / x0 (and the other
division-free element-wise ops), ``atol=1e-4, rtol=1e-5`` where a division by σ occurs (x0 -> flow).
"""
from __future__ import annotations

import os
import re

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from memflow_jax.diffusion import scheduler as S
from tests.conftest import fixture_dir, load_json, load_manifest

pytestmark = pytest.mark.parity

COMPONENT = "scheduler"
TABLE_FILE = "tables.safetensors"
OPS_FILE = "ops_case.safetensors"
CASES_JSON = "scheduler_cases.json"

# README "Suggested tolerance"
TOL_TABLE = dict(atol=1e-6, rtol=0.0)
TOL_DIV_SIGMA = dict(atol=1e-4, rtol=1e-5)

# stored inputs (checked for presence/shape, not against an op)
INPUT_KEYS = {
    TABLE_FILE: {"denoising_step_list_raw", "dmd_timestep_raw"},
    OPS_FILE: {"x0", "noise", "flow_pred", "timestep", "flow_loss_mask"},
}


def _keys(name: str) -> list[str]:
    path = os.path.join(fixture_dir(COMPONENT), name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} missing: the scheduler fixture set is incomplete")
    return sorted(load_file(path).keys())


TABLE_KEYS = _keys(TABLE_FILE)
OPS_KEYS = _keys(OPS_FILE)


@pytest.fixture(scope="module")
def cfg() -> dict:
    return load_json(COMPONENT, CASES_JSON)


@pytest.fixture(scope="module")
def tables() -> dict:
    return load_file(os.path.join(fixture_dir(COMPONENT), TABLE_FILE))


@pytest.fixture(scope="module")
def ops() -> dict:
    return load_file(os.path.join(fixture_dir(COMPONENT), OPS_FILE))


def _schedule(cfg: dict, shift: float) -> S.FlowMatchSchedule:
    g = cfg["generator_scheduler"]
    return S.make_schedule(
        shift, num_train_timesteps=g["num_train_timesteps"], sigma_min=g["sigma_min"],
        extra_one_step=g["extra_one_step"], num_inference_steps=g["set_timesteps"]["num_inference_steps"],
        sigma_max=g["sigma_max"])


def _gen(cfg: dict) -> S.FlowMatchSchedule:
    return _schedule(cfg, cfg["generator_scheduler"]["shift"])


def _table_check(key: str, t: dict, cfg: dict):
    """(actual, expected, tolerance) for a key of tables.safetensors."""
    m = re.fullmatch(r"(sigmas|timesteps|linear_timesteps_weights)_shift(\d+(?:\.\d+)?)", key)
    if m:
        sched = _schedule(cfg, float(m.group(2)))
        field = {"sigmas": "sigmas", "timesteps": "timesteps", "linear_timesteps_weights": "weights"}[m.group(1)]
        return getattr(sched, field), t[key], TOL_TABLE
    if key == "denoising_step_list_warped":
        raw = t["denoising_step_list_raw"]
        np.testing.assert_array_equal(raw, cfg["denoising_step_list_raw"])
        return S.warp_denoising_steps(raw, _gen(cfg)), t[key], TOL_TABLE
    if key == "dmd_timestep_shifted_clamped":
        d = cfg["dmd"]
        got = S.dmd_timestep(t["dmd_timestep_raw"], d["timestep_shift"], d["min_step"], d["max_step"],
                             d["num_train_timestep"])
        return got, t[key], TOL_TABLE
    raise KeyError(key)


def _ops_check(key: str, o: dict, cfg: dict):
    """(actual, expected, tolerance) for a key of ops_case.safetensors; tolerance None = exact."""
    gen = _gen(cfg)
    t, xt = o["timestep"], o["add_noise_xt"]
    m = re.fullmatch(r"timestep_id_shift(\d+(?:\.\d+)?)", key)
    if m:
        return S.timestep_index(_schedule(cfg, float(m.group(1))), t), o[key], None
    m = re.fullmatch(r"x0_from_flow_shift(\d+(?:\.\d+)?)", key)
    if m:
        return S.flow_to_x0(_schedule(cfg, float(m.group(1))), o["flow_pred"], xt, t), o[key], TOL_TABLE
    m = re.fullmatch(r"flow_from_x0_shift(\d+(?:\.\d+)?)(?:_of_x0_shift(\d+(?:\.\d+)?))?", key)
    if m:  # round trip (same table) or the critic-loss mix (x0 from another table)
        x0_key = f"x0_from_flow_shift{m.group(2) or m.group(1)}"
        return S.x0_to_flow(_schedule(cfg, float(m.group(1))), o[x0_key], xt, t), o[key], TOL_DIV_SIGMA
    if key == "add_noise_xt":
        return S.add_noise(gen, o["x0"], o["noise"], t), o[key], TOL_TABLE
    if key == "step_prev_sample":
        return S.step(gen, o["flow_pred"], t, xt), o[key], TOL_TABLE
    if key == "training_weight":
        return S.training_weight(gen, t), o[key], TOL_TABLE
    if key == "training_target":
        return S.training_target(o["x0"], o["noise"], t), o[key], TOL_TABLE
    if key == "flow_loss":
        got = S.flow_loss(o["flow_pred"], o["noise"], o["x0"])
        np.testing.assert_allclose(float(got), cfg["flow_loss"], **TOL_TABLE)
        return got.reshape(o[key].shape), o[key], TOL_TABLE
    if key == "flow_loss_masked":
        got = S.flow_loss(o["flow_pred"], o["noise"], o["x0"], o["flow_loss_mask"])
        np.testing.assert_allclose(float(got), cfg["flow_loss_masked"], **TOL_TABLE)
        return got.reshape(o[key].shape), o[key], TOL_TABLE
    raise KeyError(key)


def _assert_close(key, got, want, tol):
    got = np.asarray(got)
    assert got.shape == want.shape, f"{key}: shape {got.shape} != stored {want.shape}"
    if tol is None:
        np.testing.assert_array_equal(got, want, err_msg=key)
    else:
        np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), err_msg=key, **tol)


@pytest.mark.parametrize("key", [k for k in TABLE_KEYS if k not in INPUT_KEYS[TABLE_FILE]])
def test_tables(key, tables, cfg):
    try:
        got, want, tol = _table_check(key, tables, cfg)
    except KeyError:
        pytest.fail(f"{TABLE_FILE}: no rule checks stored key {key!r}")
    _assert_close(key, got, want, tol)


@pytest.mark.parametrize("key", [k for k in OPS_KEYS if k not in INPUT_KEYS[OPS_FILE]])
def test_ops(key, ops, cfg):
    try:
        got, want, tol = _ops_check(key, ops, cfg)
    except KeyError:
        pytest.fail(f"{OPS_FILE}: no rule checks stored key {key!r}")
    _assert_close(key, got, want, tol)


def test_manifest_lists_stored_arrays():
    man = load_manifest(COMPONENT)
    listed = {f["path"]: f.get("tensors", {}) for f in man["files"]}
    for name, keys in ((TABLE_FILE, TABLE_KEYS), (OPS_FILE, OPS_KEYS)):
        assert sorted(listed[name]) == keys, f"{name}: manifest and file disagree"
        for k in INPUT_KEYS[name]:
            assert k in keys, f"{name}: input {k!r} missing"


def test_config_matches_stored_lists(cfg, tables):
    np.testing.assert_array_equal(tables["denoising_step_list_raw"], cfg["denoising_step_list_raw"])
    np.testing.assert_allclose(tables["denoising_step_list_warped"], cfg["denoising_step_list_warped"], atol=1e-6)
    n = cfg["generator_scheduler"]["set_timesteps"]["num_inference_steps"]
    for k in TABLE_KEYS:
        if re.fullmatch(r"(sigmas|timesteps|linear_timesteps_weights)_shift.*", k):
            chex.assert_shape(tables[k], (n,))


# ------------------------------------------------------------------------- non-fixture scheduler checks


def test_sigma_never_zero_and_add_noise_at_zero(cfg):
    """Quirk: the table stops one step short of σ=0, so t=0 snaps to the smallest σ > 0."""
    gen = _gen(cfg)
    assert float(gen.sigmas.min()) > 0
    x0, noise = np.zeros((1, 1, 1, 1), np.float32), np.ones((1, 1, 1, 1), np.float32)
    np.testing.assert_allclose(np.asarray(S.add_noise(gen, x0, noise, np.zeros((1,), np.float32))).reshape(()),
                               np.asarray(gen.sigmas)[-1])


def test_step_any_last_entry_zeroes_all(cfg):
    """Quirk: one sample at the last table entry sends σ_next to 0 for the whole batch."""
    gen = _gen(cfg)
    ts, sig = np.asarray(gen.timesteps), np.asarray(gen.sigmas)
    t = ts[[0, -1]]
    flow, xt = np.ones((2, 1, 1, 1), np.float32), np.zeros((2, 1, 1, 1), np.float32)
    out = np.asarray(S.step(gen, flow, t, xt)).reshape(2)
    np.testing.assert_allclose(out, -sig[[0, -1]], rtol=1e-7)
    out_mid = np.asarray(S.step(gen, flow[:1], t[:1], xt[:1])).reshape(())
    np.testing.assert_allclose(out_mid, sig[1] - sig[0], rtol=1e-7)
    out_final = np.asarray(S.step(gen, flow[:1], t[:1], xt[:1], to_final=True)).reshape(())
    np.testing.assert_allclose(out_final, -sig[0], rtol=1e-7)


def test_timestep_index_ties_and_float64_ranking(cfg):
    gen = _gen(cfg)
    ts = np.asarray(gen.timesteps)
    ts64 = ts.astype(np.float64)
    # exact, representable midpoints between two entries: the first (larger-timestep) index wins
    mids = ((ts64[:-1] + ts64[1:]) / 2).astype(np.float32)
    tie = np.nonzero(mids.astype(np.float64) * 2 == ts64[:-1] + ts64[1:])[0]
    assert tie.size, "no representable midpoint in the table"
    np.testing.assert_array_equal(S.timestep_index(gen, mids[tie]), tie)
    # the float64 ranking of the reference's conversions, on random timesteps in and beyond the table range
    t = np.random.RandomState(0).uniform(-10, 1010, 4096).astype(np.float32)
    want = np.argmin(np.abs(ts64[None] - t[:, None].astype(np.float64)), axis=1)
    np.testing.assert_array_equal(S.timestep_index(gen, t), want)
    # Sterbenz precondition stated in timestep_index: neighbours within a factor 2
    assert (ts64[:-1] <= 2 * ts64[1:]).all()
    chex.assert_shape(S.timestep_index(gen, jnp.zeros((2, 3))), (2, 3))


def test_shape_errors(cfg):
    gen = _gen(cfg)
    with pytest.raises(ValueError, match="t.shape"):
        S.add_noise(gen, jnp.zeros((2, 3, 4, 5)), jnp.zeros((2, 3, 4, 5)), jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="denoising steps"):
        S.warp_denoising_steps([1001], gen)
    with pytest.raises(ValueError, match="integer"):
        S.dmd_timestep(jnp.zeros((2,)), 5.0, 20, 980)


def test_video_layout_matches_flat_layout(cfg, ops):
    """[B, F] timesteps with [B, F, C, H, W] latents == the flattened [B·F] call."""
    gen = _gen(cfg)
    n = ops["timestep"].shape[0] // 2 * 2
    t, x0, noise = ops["timestep"][:n], ops["x0"][:n], ops["noise"][:n]
    flat = S.add_noise(gen, x0, noise, t)
    vid = S.add_noise(gen, x0.reshape((2, n // 2) + x0.shape[1:]), noise.reshape((2, n // 2) + x0.shape[1:]),
                      t.reshape(2, n // 2))
    np.testing.assert_array_equal(np.asarray(vid).reshape(flat.shape), flat)
