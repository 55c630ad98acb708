"""Unit tests of memflow_jax.training.losses: gradients, NaN safety, masks, the rng path, variants.

Expected values come from the stated formulas (numpy float64), never from literals.
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memflow_jax.diffusion import scheduler as S
from memflow_jax.training import losses as L

B, F, C, H, W = 2, 3, 4, 2, 2
SHAPE = (B, F, C, H, W)


@pytest.fixture(scope="module")
def scheds():
    return S.make_schedule(5.0), S.make_schedule(8.0)


def _rand(seed, shape=SHAPE):
    return np.random.RandomState(seed).randn(*shape).astype(np.float32)


def _toy_score(params, xt, t, ctx):
    """A differentiable stand-in for a score net: flow = w·xt + b·t/1000 + ctx."""
    return params["w"] * xt + params["b"] * (t / 1000.0)[..., None, None, None] + ctx


PARAMS = {"w": jnp.float32(0.7), "b": jnp.float32(-0.3)}
COND, UNCOND = jnp.float32(0.25), jnp.float32(-0.5)


# ------------------------------------------------------------------------------------------ dmd_loss


def test_dmd_loss_value_and_grad_formula():
    x, g = _rand(0), _rand(1)
    loss, grad = jax.value_and_grad(L.dmd_loss)(jnp.asarray(x), jnp.asarray(g))
    chex.assert_shape(loss, ())
    np.testing.assert_allclose(float(loss), 0.5 * np.mean(g.astype(np.float64) ** 2), rtol=1e-6)
    np.testing.assert_allclose(grad, g / g.size, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("mask_kind", ["full", "frames"])
def test_dmd_loss_masked(mask_kind):
    x, g = _rand(2), _rand(3)
    if mask_kind == "full":
        mask = np.random.RandomState(4).rand(*SHAPE) > 0.4
    else:  # whole frames, broadcast over C, H, W (the streaming "first frames frozen" mask)
        mask = np.zeros((B, F, 1, 1, 1), bool)
        mask[:, 1:] = True
    full = np.broadcast_to(mask, SHAPE)
    loss, grad = jax.value_and_grad(L.dmd_loss)(jnp.asarray(x), jnp.asarray(g), jnp.asarray(mask))
    np.testing.assert_allclose(float(loss), 0.5 * np.mean(g.astype(np.float64)[full] ** 2), rtol=1e-6)
    np.testing.assert_allclose(grad, np.where(full, g / full.sum(), 0.0), rtol=1e-6, atol=1e-12)
    # an all-True mask is the unmasked loss
    np.testing.assert_allclose(float(L.dmd_loss(x, g, np.ones(SHAPE, bool))), float(L.dmd_loss(x, g)), rtol=1e-7)


def test_mask_shape_error():
    with pytest.raises(ValueError, match="does not broadcast"):
        L.dmd_loss(_rand(0), _rand(1), np.ones((B, F + 1), bool))
    with pytest.raises(ValueError, match="shaped like x"):
        L.dmd_loss(_rand(0), _rand(1, (B, F, C, H, W + 1)))


# ------------------------------------------------------------------------------------------ kl_grad


def test_kl_grad_formula():
    x, fake, c, u = (_rand(s) for s in range(4))
    s = 3.0
    grad, m = L.kl_grad(x, fake, c, u, s)
    x64, fake64, c64, u64 = (a.astype(np.float64) for a in (x, fake, c, u))
    pred_real = c64 + s * (c64 - u64)
    norm = np.abs(x64 - pred_real).mean(axis=(1, 2, 3, 4))
    want = (fake64 - pred_real) / norm[:, None, None, None, None]
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m["kl_grad_normalizer"], norm, rtol=1e-6)
    np.testing.assert_allclose(float(m["dmdtrain_gradient_norm"]), np.abs(want).mean(), rtol=1e-5)
    un, mu = L.kl_grad(x, fake, c, u, s, normalize=False)
    np.testing.assert_allclose(un, fake64 - pred_real, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(mu["kl_grad_normalizer"], np.ones(B))


def test_kl_grad_nan_safety():
    """A zero normaliser (x == pred_real) or inf inputs give finite gradients, like torch.nan_to_num."""
    x, fake, c = _rand(5), _rand(6), _rand(7)
    u = c.copy()  # guidance term vanishes: pred_real = c
    x[0] = c[0]  # sample 0: normaliser 0
    fake[0, 0, 0, 0, 0] = c[0, 0, 0, 0, 0]  # 0/0 -> nan -> 0
    grad, _ = L.kl_grad(x, fake, c, u, 3.0)
    grad = np.asarray(grad)
    assert np.isfinite(grad).all()  # (the logged mean|grad| overflows to inf here, as torch's float32 mean does)
    assert grad[0, 0, 0, 0, 0] == 0.0
    big = np.finfo(np.float32).max  # nonzero/0 -> ±inf -> ±max finite
    np.testing.assert_array_equal(np.abs(grad[0].reshape(-1)[1:]), big)
    want1 = (fake[1].astype(np.float64) - c[1]) / np.abs(x[1].astype(np.float64) - c[1]).mean()
    np.testing.assert_allclose(grad[1], want1, rtol=1e-5, atol=1e-6)
    fake_inf = fake.copy()
    fake_inf[1, 0, 0, 0, 0] = np.inf
    g2, _ = L.kl_grad(x, fake_inf, c, u, 3.0)
    assert np.isfinite(np.asarray(g2)).all()


# ------------------------------------------------------------------------------------------ generator loss


def _gen_loss(x, scheds, params=PARAMS, **kw):
    s5, s8 = scheds
    score = lambda xt, t, ctx: _toy_score(params, xt, t, ctx)  # noqa: E731
    return L.dmd_generator_loss(x, real_score_fn=score, fake_score_fn=lambda xt, t, ctx: 0.5 * score(xt, t, ctx),
                                cond=COND, uncond=UNCOND, schedule=s5, real_score_schedule=s8, **kw)


def test_generator_loss_rng_path(scheds):
    x = jnp.asarray(_rand(8))
    loss, aux = _gen_loss(x, scheds, rng=jax.random.key(0), return_intermediates=True)
    chex.assert_shape(loss, ())
    chex.assert_tree_all_finite((loss, aux))
    chex.assert_shape(aux["timestep"], (B, F))
    chex.assert_shape(aux["raw_timestep"], (B, 1))
    chex.assert_shape(aux["noise"], SHAPE)
    t = np.asarray(aux["timestep"])
    np.testing.assert_array_equal(t, np.repeat(t[:, :1], F, axis=1))  # one timestep per sample
    assert (t >= 20).all() and (t <= 980).all()  # int(0.02·1000), int(0.98·1000)
    np.testing.assert_array_equal(t, S.dmd_timestep(aux["raw_timestep"], 5.0, 20, 980)[:, [0] * F])
    # same key -> same loss; jit gives the same result; another key -> other draws
    loss2, _ = jax.jit(lambda x, k: _gen_loss(x, scheds, rng=k))(x, jax.random.key(0))
    np.testing.assert_allclose(float(loss2), float(loss), rtol=1e-6)
    _, aux3 = _gen_loss(x, scheds, rng=jax.random.key(1), return_intermediates=True)
    assert not np.array_equal(np.asarray(aux3["noise"]), np.asarray(aux["noise"]))


def test_generator_loss_explicit_draws_and_fake_cfg(scheds):
    """Explicit draws replay exactly; a nonzero fake guidance scale runs the uncond fake pass."""
    x = jnp.asarray(_rand(9))
    raw, noise = jnp.array([[637], [3]]), jnp.asarray(_rand(10))
    loss, aux = _gen_loss(x, scheds, raw_timestep=raw, noise=noise, fake_guidance_scale=2.0,
                          return_intermediates=True)
    np.testing.assert_array_equal(aux["noise"], noise)
    np.testing.assert_array_equal(aux["raw_timestep"], raw)
    fc, fu = np.asarray(aux["fake_x0_cond"], np.float64), np.asarray(aux["fake_x0_uncond"], np.float64)
    g_want, _ = L.kl_grad(x, fc + 2.0 * (fc - fu), aux["real_x0_cond"], aux["real_x0_uncond"], 3.0)
    np.testing.assert_allclose(aux["kl_grad"], g_want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(loss), 0.5 * np.mean(np.asarray(aux["kl_grad"], np.float64) ** 2), rtol=1e-6)
    _, aux0 = _gen_loss(x, scheds, raw_timestep=raw, noise=noise, return_intermediates=True)
    assert "fake_x0_uncond" not in aux0


def test_generator_loss_guidance_interval(scheds):
    """``guidance_sigma_max``: a sample whose noise level is above it uses the conditional real score alone (DMD's
    scale 0), one at or below it the full scale; a bound above every level is the plain loss."""
    x = jnp.asarray(_rand(15))
    kw = dict(raw_timestep=jnp.array([[100], [900]]), noise=jnp.asarray(_rand(16)), return_intermediates=True)
    loss, aux = _gen_loss(x, scheds, **kw)
    sig = np.asarray(S.sigma_at(scheds[0], aux["timestep"]))[:, 0]  # [B]: one noise level per sample
    assert sig[0] != sig[1]
    mid = float(sig.mean())
    loss_i, aux_i = _gen_loss(x, scheds, guidance_sigma_max=mid, **kw)
    lo, hi = int(np.argmin(sig)), int(np.argmax(sig))
    scale = np.where(np.arange(B) == lo, 3.0, 0.0).reshape(B, 1, 1, 1, 1)
    g_want, _ = L.kl_grad(x, aux["fake_x0_cond"], aux["real_x0_cond"], aux["real_x0_uncond"], scale)
    np.testing.assert_allclose(aux_i["kl_grad"], g_want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(aux_i["kl_grad"][lo], aux["kl_grad"][lo])  # guided as before
    assert not np.allclose(aux_i["kl_grad"][hi], aux["kl_grad"][hi])
    loss_all, aux_all = _gen_loss(x, scheds, guidance_sigma_max=1.0, **kw)
    np.testing.assert_array_equal(aux_all["kl_grad"], aux["kl_grad"])
    assert float(loss_all) == float(loss) and float(loss_i) != float(loss)


def test_generator_loss_gradients(scheds):
    """d loss/dx = kl_grad/count; the score nets get no gradient (reference no_grad block)."""
    x = jnp.asarray(_rand(11))
    kw = dict(raw_timestep=jnp.array([[100], [900]]), noise=jnp.asarray(_rand(12)))
    (_, aux), gx = jax.value_and_grad(lambda x: _gen_loss(x, scheds, return_intermediates=True, **kw),
                                      has_aux=True)(x)
    np.testing.assert_allclose(gx, np.asarray(aux["kl_grad"]) / x.size, rtol=1e-6, atol=1e-12)
    gp = jax.grad(lambda p: _gen_loss(x, scheds, params=p, **kw)[0])(PARAMS)
    for v in jax.tree_util.tree_leaves(gp):
        assert float(v) == 0.0


def test_draw_errors(scheds):
    x = jnp.asarray(_rand(13))
    with pytest.raises(ValueError, match="rng"):
        _gen_loss(x, scheds, noise=jnp.asarray(_rand(14)))
    with pytest.raises(ValueError, match="one draw per sample"):
        _gen_loss(x, scheds, raw_timestep=jnp.array([1, 2, 3]), noise=jnp.asarray(_rand(14)))
    with pytest.raises(ValueError, match="like x"):
        _gen_loss(x, scheds, raw_timestep=jnp.array([1, 2]), noise=jnp.zeros((B, F, C, H, H + 1)))
    with pytest.raises(ValueError, match=r"\[B, F, C, H, W\]"):
        _gen_loss(x[0], scheds, rng=jax.random.key(0))


def test_timestep_draw_distribution():
    """rng draws are uniform integers over [0, num_train_timesteps): bounds and mean (499.5 ± 5σ)."""
    n = 4096
    raw, noise = L.draw_timestep_and_noise(jax.random.key(3), jnp.zeros((n, 2)))
    raw = np.asarray(raw)
    chex.assert_shape(raw, (n, 1))
    chex.assert_shape(noise, (n, 2))
    assert raw.min() >= 0 and raw.max() < 1000
    assert abs(raw.mean() - 499.5) < 5 * (1000 / np.sqrt(12)) / np.sqrt(n)


# ------------------------------------------------------------------------------------------ critic loss


def _critic(x, scheds, params=PARAMS, **kw):
    s5, s8 = scheds
    return L.critic_loss(x, fake_score_fn=lambda xt, t, ctx: _toy_score(params, xt, t, ctx), ctx=COND,
                         schedule=s5, fake_score_schedule=s8, **kw)


def test_critic_loss_variants_and_gradients(scheds):
    x = jnp.asarray(_rand(15))
    kw = dict(raw_timestep=jnp.array([[5], [990]]), noise=jnp.asarray(_rand(16)))
    loss, aux = _critic(x, scheds, return_intermediates=True, **kw)
    chex.assert_shape(loss, ())
    s5, s8 = scheds
    t = aux["critic_timestep"]
    ratio = np.asarray(S.sigma_at(s8, t) / S.sigma_at(s5, t), np.float64)[..., None, None, None]
    # quirk: x0 with the shift-8 table, back to flow with the shift-5 table = flow · σ8/σ5
    np.testing.assert_allclose(aux["flow_reconverted"], np.asarray(aux["fake_flow"], np.float64) * ratio,
                               rtol=1e-5, atol=1e-5)
    target = np.asarray(kw["noise"], np.float64) - np.asarray(x, np.float64)
    np.testing.assert_allclose(float(loss), np.mean((np.asarray(aux["flow_reconverted"]) - target) ** 2), rtol=1e-6)
    clean, _ = _critic(x, scheds, critic_reconvert_quirk=False, **kw)
    np.testing.assert_allclose(float(clean), np.mean((np.asarray(aux["fake_flow"]) - target) ** 2), rtol=1e-6)
    # the critic trains the fake score, never the generator output
    gp = jax.grad(lambda p: _critic(x, scheds, params=p, **kw)[0])(PARAMS)
    assert all(abs(float(v)) > 0 for v in jax.tree_util.tree_leaves(gp))
    gx = jax.grad(lambda x: _critic(x, scheds, **kw)[0])(x)
    np.testing.assert_array_equal(gx, np.zeros(SHAPE))
    # masked: mean over the selected entries
    mask = np.zeros((B, F, 1, 1, 1), bool)
    mask[:, 2:] = True
    lm, _ = _critic(x, scheds, mask=jnp.asarray(mask), **kw)
    sel = np.broadcast_to(mask, SHAPE)
    np.testing.assert_allclose(float(lm), np.mean(((np.asarray(aux["flow_reconverted"]) - target) ** 2)[sel]),
                               rtol=1e-6)


def test_critic_loss_rng_path(scheds):
    x = jnp.asarray(_rand(17))
    loss, aux = jax.jit(lambda x, k: _critic(x, scheds, rng=k))(x, jax.random.key(5))
    assert np.isfinite(float(loss))
    chex.assert_shape(aux["critic_timestep"], (B, F))
    t = np.asarray(aux["critic_timestep"])
    assert (t >= 20).all() and (t <= 980).all()


# ------------------------------------------------------------------------------------------ teacher / ODE


def test_flow_matching_loss(scheds):
    s5, _ = scheds
    x0, noise = jnp.asarray(_rand(18)), jnp.asarray(_rand(19))
    t = jnp.broadcast_to(s5.timesteps[jnp.array([[10], [700]])], (B, F))
    pred_fn = lambda xt, t, ctx: _toy_score(PARAMS, xt, t, ctx)  # noqa: E731
    loss, aux = L.flow_matching_loss(x0, pred_fn=pred_fn, schedule=s5, ctx=COND, t=t, noise=noise)
    pred = np.asarray(pred_fn(S.add_noise(s5, x0, noise, t), t, COND), np.float64)
    err = (pred - (np.asarray(noise, np.float64) - np.asarray(x0, np.float64))) ** 2
    np.testing.assert_allclose(float(loss), err.mean(), rtol=1e-6)
    lw, _ = L.flow_matching_loss(x0, pred_fn=pred_fn, schedule=s5, ctx=COND, t=t, noise=noise,
                                 use_training_weight=True)
    w = np.asarray(S.training_weight(s5, t), np.float64)[..., None, None, None]
    np.testing.assert_allclose(float(lw), (w * err).mean(), rtol=1e-6)
    # rng path: table timesteps, one per sample
    _, aux_r = L.flow_matching_loss(x0, pred_fn=pred_fn, schedule=s5, ctx=COND, rng=jax.random.key(2))
    tr = np.asarray(aux_r["timestep"])
    chex.assert_shape(tr, (B, F))
    assert np.isin(tr, np.asarray(s5.timesteps)).all()
    np.testing.assert_array_equal(tr, np.repeat(tr[:, :1], F, axis=1))


def test_ode_regression_loss():
    p, q = _rand(20), _rand(21)
    np.testing.assert_allclose(float(L.ode_regression_loss(p, q)),
                               np.mean((p.astype(np.float64) - q) ** 2), rtol=1e-6)
    mask = np.random.RandomState(22).rand(*SHAPE) > 0.5
    np.testing.assert_allclose(float(L.ode_regression_loss(p, q, mask)),
                               np.mean(((p.astype(np.float64) - q) ** 2)[mask]), rtol=1e-6)
    g = jax.grad(L.ode_regression_loss)(jnp.asarray(p), jnp.asarray(q))
    np.testing.assert_allclose(g, 2 * (p.astype(np.float64) - q) / p.size, rtol=1e-5, atol=1e-9)
