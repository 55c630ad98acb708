"""Parity of memflow_jax.training.losses (DMD generator loss, KL gradient, critic loss) with the reference.

For every case of ``dmd/dmd_cases.json`` the stored ``torch.randint`` / ``randn_like`` draws are replayed and
the losses are run end to end with injectable score functions. Score backends live in ``SCORE_BACKENDS``:

* ``stored``: the score functions return the reference's stored DiT outputs (``fake_flow_pred_cond``,
  ``real_flow_pred_cond`` / ``_uncond``, ``critic_fake_flow_pred``) and record what they were called with.

A backend that runs our DiT port on the two tiny score-net folders only has to build a :class:`Backend`
(same fields; ``fake_score_fn`` and ``critic_score_fn`` are then the same function) with its own
tolerance floors (fixture README: 5e-5 on x0, 2e-4/1e-3 on kl_grad, rtol 1e-5 on losses).

Tolerances: the README floors for a float32 port on stored DiT outputs (atol 1e-5 on noisy latents, x0 and
gradients, rtol 1e-6 on losses; atol 1e-4 / rtol 1e-5 where x0 -> flow divides by σ, scheduler README),
raised to the reference's own float32-vs-float64 spread where ``tolerance_measurements`` records a larger one.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from memflow_jax.diffusion import scheduler as S
from memflow_jax.training import losses as L
from tests.conftest import fixture_dir, load_json

pytestmark = pytest.mark.parity

COMPONENT = "dmd"
META = load_json(COMPONENT, "dmd_cases.json")
CASES = {c["name"]: c for c in META["cases"]}


@dataclasses.dataclass
class Backend:
    """Score functions ``fn(xt [B,F,C,H,W], t [B,F], ctx) -> flow`` plus the contexts and tolerance floors."""

    real_score_fn: Callable
    fake_score_fn: Callable  # fake score in the generator (DMD) step
    critic_score_fn: Callable  # fake score in the critic step
    cond: Any
    uncond: Any
    floors: dict  # name -> (atol, rtol)
    calls: list = dataclasses.field(default_factory=list)


STORED_FLOORS = {
    "latent": (1e-5, 0.0), "x0": (1e-5, 0.0), "kl_grad": (1e-5, 1e-5), "flow_div_sigma": (1e-4, 1e-5),
    "loss": (0.0, 1e-6),
}


def _stored_backend(case: dict, a: dict) -> Backend:
    cond = {"prompt_embeds": jnp.asarray(a["cond_prompt_embeds"])}
    uncond = {"prompt_embeds": jnp.asarray(a["uncond_prompt_embeds"])}
    calls: list = []

    def pick(ctx):
        if ctx is cond:
            return "cond"
        if ctx is uncond:
            return "uncond"
        raise AssertionError("score function called with an unknown context")

    def real(xt, t, ctx):
        calls.append(("real", pick(ctx), xt, t))
        return jnp.asarray(a[f"real_flow_pred_{pick(ctx)}"])

    def fake(xt, t, ctx):
        calls.append(("fake", pick(ctx), xt, t))
        return jnp.asarray(a["fake_flow_pred_cond"])

    def critic(xt, t, ctx):
        calls.append(("critic", pick(ctx), xt, t))
        return jnp.asarray(a["critic_fake_flow_pred"])

    return Backend(real, fake, critic, cond, uncond, STORED_FLOORS, calls)


# README floors for running our own DiT port on the score-net folders (x0/flow 5e-5; kl_grad 2e-4 / 1e-3;
# losses rtol 1e-5); the critic's x0 -> flow reconversion scales the flow error by sigma8 / sigma5 (<= ~2 here).
DIT_FLOORS = {
    "latent": (1e-5, 0.0), "x0": (5e-5, 0.0), "kl_grad": (2e-4, 1e-3), "flow_div_sigma": (2e-4, 1e-3),
    "loss": (0.0, 1e-5),
}


@functools.cache
def _jitted_forward():
    from memflow_jax.nn import dit

    return jax.jit(dit.forward, static_argnums=1)


def _dit_forward(params, cfg, x, t, ctx):
    """``dit.forward``, one compiled program per (config, shapes): the fake and critic scores and every case share
    them."""
    return _jitted_forward()(params, cfg, x, t, ctx)


def _dit_backend(case: dict, a: dict) -> Backend:
    """Our Wan DiT (loaded through the converter from the two tiny folders; the teacher one is sharded)."""
    from memflow_jax.convert.dit import load_wan_folder

    root = fixture_dir("dmd")
    real_cfg, real_p = load_wan_folder(os.path.join(root, META["real_score_folder"]))
    fake_cfg, fake_p = load_wan_folder(os.path.join(root, META["fake_score_folder"]))
    cond = {"prompt_embeds": jnp.asarray(a["cond_prompt_embeds"])}
    uncond = {"prompt_embeds": jnp.asarray(a["uncond_prompt_embeds"])}
    calls: list = []

    def score(cfg, params, who):
        def fn(xt, t, ctx):  # [B,F,C,H,W], t [B,F] (WanDiffusionWrapper passes t[:, 0]) -> flow [B,F,C,H,W]
            calls.append((who, "cond" if ctx is cond else "uncond", xt, t))
            flow = _dit_forward(params, cfg, jnp.swapaxes(xt, 1, 2), t[:, 0], ctx["prompt_embeds"])
            return jnp.swapaxes(flow, 1, 2)
        return fn

    return Backend(score(real_cfg, real_p, "real"), score(fake_cfg, fake_p, "fake"),
                   score(fake_cfg, fake_p, "critic"), cond, uncond, DIT_FLOORS, calls)


SCORE_BACKENDS: dict[str, Callable[[dict, dict], Backend]] = {"stored": _stored_backend, "dit": _dit_backend}


def _tol(case: dict, key: str, floor: tuple[float, float]) -> dict:
    """README floor, raised to the reference's measured float32-vs-float64 spread for this key."""
    meas = case.get("tolerance_measurements", {}).get("f32_vs_f64", {}).get(key, {})
    return dict(atol=max(floor[0], float(meas.get("max_abs", 0.0))), rtol=floor[1])


def _close(got, want, tol, what):
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != stored {want.shape}"
    np.testing.assert_allclose(got, want, err_msg=what, **tol)


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def schedules():
    ra = META["resolved_args"]
    n = ra["num_train_timestep"]
    return {
        "gen": S.make_schedule(ra["generator_scheduler_shift"], n),
        "real": S.make_schedule(ra["real_score_scheduler_shift"], n),
        "fake": S.make_schedule(ra["fake_score_scheduler_shift"], n),
    }


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    c = CASES[request.param]
    return c, load_file(os.path.join(fixture_dir(COMPONENT), c["file"]))


@pytest.fixture(scope="module", params=sorted(SCORE_BACKENDS))
def run(request, case, schedules):
    """Run the generator loss (plain, masked, its gradient) and the critic loss (plain, masked) once."""
    c, a = case
    backend = SCORE_BACKENDS[request.param](c, a)
    ra = META["resolved_args"]
    x = jnp.asarray(a["generator_output_bfchw"])
    mask = jnp.asarray(a["gradient_mask"])
    steps = dict(timestep_shift=ra["timestep_shift"], min_step=ra["min_step"], max_step=ra["max_step"])

    def gen_loss(x, mask=None):
        return L.dmd_generator_loss(
            x, real_score_fn=backend.real_score_fn, fake_score_fn=backend.fake_score_fn,
            cond=backend.cond, uncond=backend.uncond, schedule=schedules["gen"],
            real_score_schedule=schedules["real"], fake_score_schedule=schedules["fake"],
            raw_timestep=jnp.asarray(a["replay_randint_generator"]),
            noise=jnp.asarray(a["replay_randn_like_generator"]),
            guidance_scale=ra["real_guidance_scale"], fake_guidance_scale=ra["fake_guidance_scale"],
            mask=mask, return_intermediates=True, **steps)

    def crit_loss(x, mask=None, quirk=True):
        return L.critic_loss(
            x, fake_score_fn=backend.critic_score_fn, ctx=backend.cond, schedule=schedules["gen"],
            fake_score_schedule=schedules["fake"], raw_timestep=jnp.asarray(a["replay_randint_critic"]),
            noise=jnp.asarray(a["replay_randn_like_critic"]), mask=mask, critic_reconvert_quirk=quirk,
            return_intermediates=True, **steps)

    out = {"backend": backend, "case": c, "a": a, "x": x, "mask": mask}
    out["loss"], out["aux"] = gen_loss(x)
    out["loss_masked"], _ = gen_loss(x, mask)
    out["grad"] = jax.grad(lambda x: gen_loss(x)[0])(x)
    out["grad_masked"] = jax.grad(lambda x: gen_loss(x, mask)[0])(x)
    out["critic"], out["critic_aux"] = crit_loss(x)
    out["critic_masked"], _ = crit_loss(x, mask)
    out["critic_clean"], _ = crit_loss(x, quirk=False)
    return out


# ------------------------------------------------------------------------------------------ tests


def test_case_metadata(case):
    """The json's draws / scalars are the stored arrays (guards the replay itself)."""
    c, a = case
    for k in c["shapes"]:
        chex.assert_shape(a[k], tuple(c["shapes"][k]))
    np.testing.assert_array_equal(a["replay_randint_generator"].reshape(-1), c["raw_randint_generator"])
    np.testing.assert_array_equal(a["replay_randint_critic"].reshape(-1), c["raw_randint_critic"])
    for k, v in c["scalars"].items():
        np.testing.assert_allclose(float(a[k].reshape(())), v, rtol=1e-7)
    assert int(a["gradient_mask"][:, : c["mask_first_frames"]].sum()) == 0
    assert bool(a["gradient_mask"][:, c["mask_first_frames"]:].all())


def test_timesteps(run):
    c, a, aux, caux = run["case"], run["a"], run["aux"], run["critic_aux"]
    _close(aux["timestep"], a["dmd_timestep"], dict(atol=0, rtol=1e-6), "dmd_timestep")
    _close(aux["timestep"][:, 0], c["timestep_generator"], dict(atol=0, rtol=1e-6), "timestep_generator")
    _close(caux["critic_timestep"], a["critic_timestep"], dict(atol=0, rtol=1e-6), "critic_timestep")
    _close(caux["critic_timestep"][:, 0], c["timestep_critic"], dict(atol=0, rtol=1e-6), "timestep_critic")


def test_noisy_latent(run):
    c, a, aux, fl = run["case"], run["a"], run["aux"], run["backend"].floors
    _close(aux["noisy_latent"], a["dmd_noisy_latent"], _tol(c, "dmd_noisy_latent", fl["latent"]), "dmd_noisy_latent")


def test_score_inputs(run):
    """The score functions saw the noisy latent and the [B, F] timesteps, with the right contexts."""
    a, fl, calls = run["a"], run["backend"].floors, run["backend"].calls
    if not calls:
        pytest.fail("backend recorded no score calls")
    seen = {(who, ctx) for who, ctx, _, _ in calls}
    assert {("fake", "cond"), ("real", "cond"), ("real", "uncond"), ("critic", "cond")} <= seen
    fake_guided = META["resolved_args"]["fake_guidance_scale"] != 0.0
    assert (("fake", "uncond") in seen) == fake_guided
    for who, _, xt, t in calls:
        key = "critic" if who == "critic" else "dmd"
        _close(xt, a[f"{key}_noisy_latent"], dict(atol=fl["latent"][0], rtol=0), f"{who} score input xt")
        _close(t, a[f"{key}_timestep"], dict(atol=0, rtol=1e-6), f"{who} score input t")


@pytest.mark.parametrize("key", ["fake_x0_cond", "real_x0_cond", "real_x0_uncond"])
def test_score_x0(run, key):
    c, a, aux, fl = run["case"], run["a"], run["aux"], run["backend"].floors
    _close(aux[key], a[key], _tol(c, key, fl["x0"]), key)


def test_kl_grad_from_stored_x0(case):
    """kl_grad on the stored x0s alone: unnormalised, normalised, normaliser, gradient norm."""
    c, a = case
    gs = META["resolved_args"]["real_guidance_scale"]
    args = (a["generator_output_bfchw"], a["fake_x0_cond"], a["real_x0_cond"], a["real_x0_uncond"], gs)
    un, _ = L.kl_grad(*args, normalize=False)
    _close(un, a["kl_grad_unnormalized"], _tol(c, "kl_grad_unnormalized", STORED_FLOORS["kl_grad"]),
           "kl_grad_unnormalized")
    g, m = L.kl_grad(*args)
    _close(g, a["kl_grad"], _tol(c, "kl_grad", STORED_FLOORS["kl_grad"]), "kl_grad")
    _close(m["kl_grad_normalizer"], a["derived_kl_grad_normalizer"], dict(atol=0, rtol=1e-6), "normalizer")
    _close(m["dmdtrain_gradient_norm"].reshape(1), a["dmdtrain_gradient_norm"],
           _tol(c, "dmdtrain_gradient_norm", STORED_FLOORS["loss"]), "dmdtrain_gradient_norm")


def test_kl_grad_end_to_end(run):
    c, a, aux, fl = run["case"], run["a"], run["aux"], run["backend"].floors
    _close(aux["kl_grad"], a["kl_grad"], _tol(c, "kl_grad", fl["kl_grad"]), "kl_grad")
    _close(aux["kl_grad_normalizer"], a["derived_kl_grad_normalizer"], dict(atol=0, rtol=fl["kl_grad"][1]),
           "kl_grad_normalizer")
    _close(aux["dmdtrain_gradient_norm"].reshape(1), a["dmdtrain_gradient_norm"],
           _tol(c, "dmdtrain_gradient_norm", fl["loss"]), "dmdtrain_gradient_norm")


def test_dmd_loss(run):
    c, a, fl = run["case"], run["a"], run["backend"].floors
    chex.assert_shape(run["loss"], ())
    _close(run["loss"].reshape(1), a["dmd_loss"], _tol(c, "dmd_loss", fl["loss"]), "dmd_loss")
    _close(run["loss_masked"].reshape(1), a["dmd_loss_masked"], _tol(c, "dmd_loss_masked", fl["loss"]),
           "dmd_loss_masked")


def test_dmd_loss_grad(run):
    """jax.grad of the whole generator loss w.r.t. the generator output == the reference's autograd."""
    c, a, fl = run["case"], run["a"], run["backend"].floors
    want = a["dmd_loss_grad_wrt_generator_output"]
    atol, rtol = fl["kl_grad"]  # grad = kl_grad / count: the kl_grad tolerance scaled by 1/count
    _close(run["grad"], want, dict(atol=atol / want.size, rtol=rtol), "dmd_loss_grad_wrt_generator_output")
    # masked: zero outside the mask, kl_grad / count(mask) inside (formula)
    mask = a["gradient_mask"]
    want_m = np.where(mask, np.asarray(run["aux"]["kl_grad"], np.float64) / mask.sum(), 0.0)
    _close(run["grad_masked"], want_m, dict(atol=1e-12, rtol=1e-6), "masked dmd_loss grad")


def test_dmd_loss_on_stored_kl_grad(case):
    """dmd_loss and its jax.grad on the stored kl_grad: value 0.5·mean(g²), gradient g/count."""
    c, a = case
    x, g = jnp.asarray(a["generator_output_bfchw"]), jnp.asarray(a["kl_grad"])
    _close(L.dmd_loss(x, g).reshape(1), a["dmd_loss"], _tol(c, "dmd_loss", STORED_FLOORS["loss"]), "dmd_loss")
    _close(L.dmd_loss(x, g, a["gradient_mask"]).reshape(1), a["dmd_loss_masked"],
           _tol(c, "dmd_loss_masked", STORED_FLOORS["loss"]), "dmd_loss_masked")
    grad = jax.grad(L.dmd_loss)(x, g)
    _close(grad, a["dmd_loss_grad_wrt_generator_output"], dict(atol=1e-12, rtol=1e-6), "d dmd_loss / dx")


def test_critic_forward(run):
    c, a, caux, fl = run["case"], run["a"], run["critic_aux"], run["backend"].floors
    _close(caux["noisy_latent"], a["critic_noisy_latent"], _tol(c, "critic_noisy_latent", fl["latent"]),
           "critic_noisy_latent")
    _close(caux["fake_x0"], a["critic_fake_x0"], _tol(c, "critic_fake_x0", fl["x0"]), "critic_fake_x0")
    _close(caux["flow_reconverted"], a["critic_flow_pred_reconverted"],
           _tol(c, "critic_flow_pred_reconverted", fl["flow_div_sigma"]), "critic_flow_pred_reconverted")


def test_critic_loss(run):
    c, a, fl = run["case"], run["a"], run["backend"].floors
    chex.assert_shape(run["critic"], ())
    _close(run["critic"].reshape(1), a["critic_loss"], _tol(c, "critic_loss", fl["loss"]), "critic_loss")
    _close(run["critic_masked"].reshape(1), a["critic_loss_masked"], _tol(c, "critic_loss_masked", fl["loss"]),
           "critic_loss_masked")


def test_critic_loss_on_stored_flow(case):
    """The loss formula alone on the stored re-converted flow (isolates the reduction)."""
    c, a = case
    args = (a["critic_flow_pred_reconverted"], a["replay_randn_like_critic"], a["generator_output_bfchw"])
    _close(S.flow_loss(*args).reshape(1), a["critic_loss"], _tol(c, "critic_loss", STORED_FLOORS["loss"]),
           "critic_loss")
    _close(S.flow_loss(*args, a["gradient_mask"]).reshape(1), a["critic_loss_masked"],
           _tol(c, "critic_loss_masked", STORED_FLOORS["loss"]), "critic_loss_masked")


def test_critic_clean_variant(run):
    """critic_reconvert_quirk=False regresses the raw fake flow (formula on the run's own fake flow)."""
    a, caux = run["a"], run["critic_aux"]
    want = S.flow_loss(caux["fake_flow"], jnp.asarray(a["replay_randn_like_critic"]), run["x"])
    np.testing.assert_allclose(float(run["critic_clean"]), float(want), rtol=1e-6)

    # the quirk's flow is the raw flow scaled by σ_fake(t) / σ_gen(t) (mixed tables)
    ra = META["resolved_args"]
    t = caux["critic_timestep"]
    ratio = (S.sigma_at(S.make_schedule(ra["fake_score_scheduler_shift"]), t)
             / S.sigma_at(S.make_schedule(ra["generator_scheduler_shift"]), t))
    _close(caux["flow_reconverted"], caux["fake_flow"] * ratio[..., None, None, None],
           dict(atol=STORED_FLOORS["flow_div_sigma"][0], rtol=1e-5), "σ-ratio scaling")
