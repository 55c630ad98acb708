"""Training losses of MemFlow as pure functions of arrays and score callables.

* DMD generator loss (distribution matching distillation, DMD paper eqs. 7-8) and the critic (fake score)
  denoising loss, with the reference's timestep draws, shifts and mixed-table conversions.
* Flow-matching loss for teacher training on data latents, ODE-regression loss for the causal init.
* Text dropout for classifier-free guidance (teacher training) and the VAE's reconstruction + KL loss.

Score callables
---------------
``score_fn(xt, t, ctx) -> flow`` with ``xt`` [B, F, C, H, W], ``t`` [B, F] float32 (the same value for all
frames of a sample, as drawn by the reference's ``uniform_timestep=True``) and ``ctx`` any pytree (text
embeddings, ...). It returns the flow prediction ``noise - x0`` [B, F, C, H, W]. How the network consumes
``t`` is the callable's business: the bidirectional Wan score nets of the reference take ``t[:, 0]``.
The losses convert flow to x0 themselves, with the score net's own table (``WanDiffusionWrapper`` default
shift 8), so a callable is a plain network forward.

Random draws
------------
Every stochastic loss takes either ``rng`` (a ``jax.random`` key) or explicit draws
(``raw_timestep`` int [B] or [B, 1] in ``[0, num_train_timesteps)``, ``noise`` like ``x``), so tests can
replay the reference's ``torch.randint`` / ``torch.randn_like`` draws. With ``rng`` the key is split into
(timestep key, noise key), the reference's draw order; explicit draws take precedence over the key.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from memflow_jax.diffusion.scheduler import (
    FlowMatchSchedule, accurate_sum, add_noise, dmd_timestep, flow_loss, flow_to_x0, guidance_at, masked_mean,
    sigma_at, training_weight, x0_to_flow)

__all__ = [
    "ScoreFn", "draw_timestep_and_noise", "kl_grad", "dmd_loss", "dmd_generator_loss", "critic_loss",
    "flow_matching_loss", "ode_regression_loss", "text_dropout", "gaussian_sample", "gaussian_kl", "vae_loss",
    "chroma",
]

ScoreFn = Callable[[jax.Array, jax.Array, Any], jax.Array]  # (xt [B,F,C,H,W], t [B,F], ctx) -> flow


def _check_video(name: str, x: jax.Array) -> None:
    if x.ndim != 5:
        raise ValueError(f"{name} must be [B, F, C, H, W], got shape {tuple(x.shape)}")


def draw_timestep_and_noise(
    rng: jax.Array | None,
    x: jax.Array,
    *,
    raw_timestep: jax.Array | None = None,
    noise: jax.Array | None = None,
    min_timestep: int = 0,
    max_timestep: int = 1000,
) -> tuple[jax.Array, jax.Array]:
    """The reference's ``randint(min, max, [B, 1])`` then ``randn_like(x)``; explicit draws win.

    x: [B, ...]. Returns ``(raw [B, 1] int32, noise like x)``.
    """
    b = x.shape[0]
    if (raw_timestep is None or noise is None) and rng is None:
        raise ValueError("pass rng=jax.random.key(...) or both explicit draws raw_timestep= and noise=")
    if rng is not None:
        k_t, k_n = jax.random.split(rng)
    if raw_timestep is None:
        if not 0 <= min_timestep < max_timestep:
            raise ValueError(f"need 0 <= min_timestep < max_timestep, got [{min_timestep}, {max_timestep})")
        raw_timestep = jax.random.randint(k_t, (b, 1), min_timestep, max_timestep, dtype=jnp.int32)
    raw_timestep = jnp.asarray(raw_timestep)
    if raw_timestep.size != b:
        raise ValueError(f"raw_timestep needs one draw per sample ({b}), got shape {tuple(raw_timestep.shape)}")
    raw_timestep = raw_timestep.reshape(b, 1)
    if noise is None:
        noise = jax.random.normal(k_n, x.shape, x.dtype)
    if tuple(noise.shape) != tuple(x.shape):
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(x.shape)} (like x)")
    return raw_timestep, noise


def _frame_timestep(raw: jax.Array, num_frames: int, shift: float, min_step: float, max_step: float,
                    num_train_timesteps: int) -> jax.Array:
    """[B, 1] integer draw -> [B, F] float32 (reference: repeat over frames, then shift and clamp)."""
    t = dmd_timestep(raw, shift, min_step, max_step, num_train_timesteps)  # [B, 1]
    return jnp.broadcast_to(t, (raw.shape[0], num_frames))


def _step_defaults(schedule: FlowMatchSchedule, timestep_shift, min_step, max_step, max_timestep):
    n = schedule.num_train_timesteps
    return (schedule.shift if timestep_shift is None else timestep_shift,
            int(0.02 * n) if min_step is None else min_step,  # reference: int(0.02 * num_train_timestep)
            int(0.98 * n) if max_step is None else max_step,
            n if max_timestep is None else max_timestep)


# --------------------------------------------------------------------------------------------------
# DMD
# --------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("normalize",))
def kl_grad(
    x: jax.Array,
    fake_x0: jax.Array,
    real_x0_cond: jax.Array,
    real_x0_uncond: jax.Array,
    guidance_scale: float,
    *,
    normalize: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """DMD gradient ``fake_x0 - pred_real`` with ``pred_real = cond + s·(cond - uncond)`` (CFG on the teacher).

    All arrays [B, ...] (the generator output ``x`` and the x0 estimates). With ``normalize`` the gradient is
    divided per sample by ``mean_{non-batch}|x - pred_real|`` (DMD eq. 8); NaN/inf are then replaced like
    ``torch.nan_to_num``. Returns ``(grad like x, metrics)`` with metrics ``dmdtrain_gradient_norm``
    (``mean|grad|``, scalar) and ``kl_grad_normalizer`` ([B], ones when not normalising).
    """
    if not (x.shape == fake_x0.shape == real_x0_cond.shape == real_x0_uncond.shape):
        raise ValueError(f"kl_grad needs equal shapes, got x {x.shape}, fake {fake_x0.shape}, "
                         f"real cond {real_x0_cond.shape}, real uncond {real_x0_uncond.shape}")
    ct = jnp.promote_types(x.dtype, jnp.float32)
    x, fake_x0, cond, uncond = (a.astype(ct) for a in (x, fake_x0, real_x0_cond, real_x0_uncond))
    pred_real = cond + (cond - uncond) * jnp.asarray(guidance_scale, ct)  # reference op order
    grad = fake_x0 - pred_real
    reduce_axes = tuple(range(1, x.ndim))
    if normalize:
        count = jnp.asarray(x[0].size, ct)
        normalizer = accurate_sum(jnp.abs(x - pred_real), reduce_axes) / count  # [B]
        grad = grad / normalizer.reshape((-1,) + (1,) * (x.ndim - 1))
    else:
        normalizer = jnp.ones((x.shape[0],), ct)
    grad = jnp.nan_to_num(grad)
    metrics = {"dmdtrain_gradient_norm": masked_mean(jnp.abs(grad)), "kl_grad_normalizer": normalizer}
    return grad, metrics


@jax.jit
def dmd_loss(x: jax.Array, grad: jax.Array, mask: jax.Array | None = None,
             frame_weight: jax.Array | None = None) -> jax.Array:
    """``0.5·mean((x - stop_gradient(x - grad))²)`` over all elements or over ``mask``. Scalar float32.

    d loss / d x = ``grad / count`` (``count`` = elements, or True entries of the broadcast mask; zero
    outside the mask). ``x - sg(x - grad)`` is written as ``x - sg(x) + sg(grad)``: the same value and
    derivative, but exact in float32 (the reference evaluates it in float64; in float32 ``x - grad`` would
    round at the scale of ``x``, not of ``grad``). ``frame_weight`` [B, F] (not in the reference; not with
    ``mask``): the frame-weighted mean (:func:`weighted_frame_mean`) of each frame's mean, so frame ``f`` of
    sample ``b`` gets ``w_bf · grad / (Σ w · elements per frame)``; all ones = no weight.
    """
    if x.shape != grad.shape:
        raise ValueError(f"dmd_loss needs grad shaped like x, got {grad.shape} vs {x.shape}")
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    diff = x - jax.lax.stop_gradient(x) + jax.lax.stop_gradient(grad.astype(x.dtype))
    if frame_weight is None:
        return 0.5 * masked_mean(jnp.square(diff), mask)
    if mask is not None:
        raise ValueError("dmd_loss takes a mask or a frame_weight, not both (fold the mask into the weight)")
    if tuple(frame_weight.shape) != tuple(x.shape[:2]):
        raise ValueError(f"dmd_loss: frame_weight {tuple(frame_weight.shape)} must be [B, F] = {tuple(x.shape[:2])}")
    per_frame = jnp.mean(jnp.square(diff).reshape(x.shape[:2] + (-1,)), axis=-1)  # [B, F]
    return 0.5 * weighted_frame_mean(per_frame, frame_weight)


def dmd_generator_loss(
    x: jax.Array,
    *,
    real_score_fn: ScoreFn,
    fake_score_fn: ScoreFn,
    cond: Any,
    uncond: Any,
    schedule: FlowMatchSchedule,
    real_score_schedule: FlowMatchSchedule,
    fake_score_schedule: FlowMatchSchedule | None = None,
    rng: jax.Array | None = None,
    raw_timestep: jax.Array | None = None,
    noise: jax.Array | None = None,
    guidance_scale: float = 3.0,
    fake_guidance_scale: float = 0.0,
    guidance_sigma_max: float | None = None,
    timestep_shift: float | None = None,
    min_step: float | None = None,
    max_step: float | None = None,
    min_timestep: int = 0,
    max_timestep: int | None = None,
    mask: jax.Array | None = None,
    frame_weight: jax.Array | None = None,
    return_intermediates: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """DMD generator loss of the generator output ``x`` [B, F, C, H, W] (reference
    ``DMD.compute_distribution_matching_loss``). Differentiable w.r.t. ``x`` only: the score passes run on
    ``stop_gradient`` inputs, like the reference's ``no_grad`` block.

    1. ``t = dmd_timestep(randint(min_timestep, max_timestep))`` per sample, repeated over frames ([B, F]);
       ``timestep_shift`` defaults to ``schedule.shift``, ``min/max_step`` to 2% / 98% of the train steps.
    2. ``xt = add_noise(schedule, x, noise, t)`` with the generator table (shift 5).
    3. Fake score (cond; also uncond if ``fake_guidance_scale != 0``) and real score (cond, uncond); their flows
       become x0 with their own tables (``*_score_schedule``, shift 8; ``fake_score_schedule`` defaults to
       ``real_score_schedule``).
    4. ``grad = kl_grad(x, fake_x0, real_x0_cond, real_x0_uncond, guidance_scale)``; loss ``dmd_loss``. With
       ``guidance_sigma_max`` (not in the reference) a sample whose noise level σ(t) exceeds it gets scale 0, the
       conditional real score alone (``scheduler.guidance_at``): guidance only at low noise. ``frame_weight``
       [B, F] (not in the reference; the dmd_story recipe's return weight): :func:`dmd_loss`'s weighted mean.

    Returns ``(loss, aux)``; aux has ``dmdtrain_gradient_norm``, ``timestep`` [B, F] and, with
    ``return_intermediates``, the draws, noisy latent, flows, x0s, ``kl_grad`` and its normaliser.
    """
    _check_video("x", x)
    shift, min_step, max_step, max_timestep = _step_defaults(schedule, timestep_shift, min_step, max_step,
                                                             max_timestep)
    fake_score_schedule = real_score_schedule if fake_score_schedule is None else fake_score_schedule
    x_ng = jax.lax.stop_gradient(x)
    raw, noise = draw_timestep_and_noise(rng, x_ng, raw_timestep=raw_timestep, noise=noise,
                                         min_timestep=min_timestep, max_timestep=max_timestep)
    t = _frame_timestep(raw, x.shape[1], shift, min_step, max_step, schedule.num_train_timesteps)  # [B, F]
    xt = add_noise(schedule, x_ng, noise, t)

    fake_flow = fake_score_fn(xt, t, cond)
    fake_x0 = flow_to_x0(fake_score_schedule, fake_flow, xt, t)
    inter = {"fake_flow_cond": fake_flow, "fake_x0_cond": fake_x0}
    if fake_guidance_scale != 0.0:
        fake_flow_u = fake_score_fn(xt, t, uncond)
        fake_x0_u = flow_to_x0(fake_score_schedule, fake_flow_u, xt, t)
        fake_x0 = fake_x0 + (fake_x0 - fake_x0_u) * fake_guidance_scale
        inter.update(fake_flow_uncond=fake_flow_u, fake_x0_uncond=fake_x0_u)
    real_flow_c = real_score_fn(xt, t, cond)
    real_flow_u = real_score_fn(xt, t, uncond)
    real_x0_c = flow_to_x0(real_score_schedule, real_flow_c, xt, t)
    real_x0_u = flow_to_x0(real_score_schedule, real_flow_u, xt, t)
    scale: Any = guidance_scale
    if guidance_sigma_max is not None and guidance_sigma_max < 1.0:  # sigmas are <= 1: else every level guided
        # [B, F] -> [B, F, 1, 1, 1]: each sample's and frame's noise level
        scale = guidance_at(sigma_at(schedule, t), guidance_scale, guidance_sigma_max, unguided=0.0)
        scale = scale.reshape(t.shape + (1,) * (x.ndim - t.ndim))
    grad, metrics = kl_grad(x_ng, fake_x0, real_x0_c, real_x0_u, scale)
    grad = jax.lax.stop_gradient(grad)
    loss = dmd_loss(x, grad, mask, frame_weight)

    aux = {"dmdtrain_gradient_norm": metrics["dmdtrain_gradient_norm"], "timestep": t}
    if return_intermediates:
        inter.update(raw_timestep=raw, noise=noise, noisy_latent=xt, real_flow_cond=real_flow_c,
                     real_flow_uncond=real_flow_u, real_x0_cond=real_x0_c, real_x0_uncond=real_x0_u,
                     kl_grad=grad, kl_grad_normalizer=metrics["kl_grad_normalizer"])
        aux.update(inter)
    return loss, aux


def critic_loss(
    x: jax.Array,
    *,
    fake_score_fn: ScoreFn,
    ctx: Any,
    schedule: FlowMatchSchedule,
    fake_score_schedule: FlowMatchSchedule,
    rng: jax.Array | None = None,
    raw_timestep: jax.Array | None = None,
    noise: jax.Array | None = None,
    timestep_shift: float | None = None,
    min_step: float | None = None,
    max_step: float | None = None,
    min_timestep: int = 0,
    max_timestep: int | None = None,
    mask: jax.Array | None = None,
    critic_reconvert_quirk: bool = True,
    return_intermediates: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Denoising (flow) loss of the fake score on the generator output ``x`` [B, F, C, H, W], which is
    treated as data (``stop_gradient``): differentiate w.r.t. the fake score's parameters through
    ``fake_score_fn``. Reference ``DMD.critic_loss`` (no mask) / ``StreamingTrainingModel.compute_critic_loss``.

    Same timestep/noise draws as :func:`dmd_generator_loss`; ``xt = add_noise(schedule, x, noise, t)``.
    With ``critic_reconvert_quirk=True`` (reference): the fake flow becomes ``x0 = xt - σ₈·flow`` with the
    fake score's table, then back ``flow' = (xt - x0)/σ₅`` with the generator table — i.e. the prediction is
    scaled by ``σ₈/σ₅ ≠ 1`` — and ``loss = mean((flow' - (noise - x))²)``. ``False`` is the paper-clean
    variant: the raw flow prediction is regressed on ``noise - x`` (what the round trip would be with one
    consistent table). ``mask`` as in :func:`dmd_loss`.
    """
    _check_video("x", x)
    shift, min_step, max_step, max_timestep = _step_defaults(schedule, timestep_shift, min_step, max_step,
                                                             max_timestep)
    x = jax.lax.stop_gradient(x)
    raw, noise = draw_timestep_and_noise(rng, x, raw_timestep=raw_timestep, noise=noise,
                                         min_timestep=min_timestep, max_timestep=max_timestep)
    t = _frame_timestep(raw, x.shape[1], shift, min_step, max_step, schedule.num_train_timesteps)  # [B, F]
    xt = add_noise(schedule, x, noise, t)
    flow = fake_score_fn(xt, t, ctx)
    x0 = flow_to_x0(fake_score_schedule, flow, xt, t)
    if critic_reconvert_quirk:  # reference: x0 from the shift-8 table, back to flow with the shift-5 table
        flow_used = x0_to_flow(schedule, x0, xt, t)
    else:
        flow_used = flow
    loss = flow_loss(flow_used, noise, x, mask)
    aux = {"critic_timestep": t}
    if return_intermediates:
        aux.update(raw_timestep=raw, noise=noise, noisy_latent=xt, fake_flow=flow, fake_x0=x0,
                   flow_reconverted=flow_used)
    return loss, aux


# --------------------------------------------------------------------------------------------------
# Teacher training and ODE init
# --------------------------------------------------------------------------------------------------


def flow_matching_loss(
    x0: jax.Array,
    *,
    pred_fn: ScoreFn,
    schedule: FlowMatchSchedule,
    ctx: Any = None,
    rng: jax.Array | None = None,
    t: jax.Array | None = None,
    noise: jax.Array | None = None,
    mask: jax.Array | None = None,
    use_training_weight: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Flow-matching loss on data latents ``x0`` [B, F, C, H, W] (teacher training / fine-tuning).

    ``t`` [B, F] (explicit) or drawn with ``rng``: a uniform table index per sample, ``t = timesteps[idx]``
    shared by all frames. ``xt = add_noise(schedule, x0, noise, t)``, ``flow = pred_fn(xt, t, ctx)``, loss
    ``mean((flow - (noise - x0))²)`` (over ``mask``); with ``use_training_weight`` each element's squared
    error is multiplied by the table's training weight of its timestep. Returns ``(loss, {"timestep": t})``.
    """
    _check_video("x0", x0)
    b, f = x0.shape[:2]
    if (t is None or noise is None) and rng is None:
        raise ValueError("pass rng=jax.random.key(...) or both explicit t= and noise=")
    if rng is not None:
        k_t, k_n = jax.random.split(rng)
    if t is None:
        idx = jax.random.randint(k_t, (b, 1), 0, schedule.num_entries)
        t = jnp.broadcast_to(schedule.timesteps[idx], (b, f))
    t = jnp.asarray(t, jnp.float32)
    if noise is None:
        noise = jax.random.normal(k_n, x0.shape, x0.dtype)
    xt = add_noise(schedule, x0, noise, t)
    pred = pred_fn(xt, t, ctx)
    if not use_training_weight:
        return flow_loss(pred, noise, x0, mask), {"timestep": t}
    err = jnp.square(pred.astype(jnp.float32) - (noise.astype(jnp.float32) - x0.astype(jnp.float32)))
    err = err * training_weight(schedule, t)[..., None, None, None]
    return masked_mean(err, mask), {"timestep": t}


@jax.jit
def ode_regression_loss(pred_x0: jax.Array, target_x0: jax.Array, mask: jax.Array | None = None,
                        frame_weight: jax.Array | None = None) -> jax.Array:
    """Causal ODE-init regression: ``mean((pred_x0 - target_x0)²)`` (over ``mask``). Scalar float32.

    ``frame_weight`` ``[B, F]`` (latents ``[B, F, ...]``; not with ``mask``): the frame-weighted mean
    ``Σ w_bf · mse_bf / Σ w_bf`` (``mse_bf`` the frame's mean squared error), equal to the plain mean for equal
    weights."""
    if pred_x0.shape != target_x0.shape:
        raise ValueError(f"ode_regression_loss needs equal shapes, got {pred_x0.shape} vs {target_x0.shape}")
    if frame_weight is None:
        return masked_mean(jnp.square(pred_x0.astype(jnp.float32) - target_x0.astype(jnp.float32)), mask)
    if mask is not None or tuple(frame_weight.shape) != tuple(pred_x0.shape[:2]):
        raise ValueError(f"frame_weight {tuple(frame_weight.shape)} must be [B, F] = {tuple(pred_x0.shape[:2])} of "
                         "the latents, without a mask")
    return weighted_frame_mean(frame_mse(pred_x0, target_x0), frame_weight)


def weighted_frame_mean(per_frame: jax.Array, frame_weight: jax.Array) -> jax.Array:
    """``Σ w_bf · x_bf / Σ w_bf`` of per-frame values ``[B, F]`` (e.g. :func:`frame_mse`). Scalar float32."""
    w = frame_weight.astype(jnp.float32)
    return jnp.sum(w * per_frame.astype(jnp.float32)) / jnp.sum(w)


def frame_mse(pred_x0: jax.Array, target_x0: jax.Array) -> jax.Array:
    """Mean squared error of each frame of latents ``[B, F, ...]``: ``[B, F]`` float32."""
    err = jnp.square(pred_x0.astype(jnp.float32) - target_x0.astype(jnp.float32))
    return jnp.mean(err.reshape(err.shape[:2] + (-1,)), axis=-1)


# --------------------------------------------------------------------------------------------------
# Text dropout (classifier-free guidance) and the VAE loss
# --------------------------------------------------------------------------------------------------


def text_dropout(ctx: jax.Array, uncond: jax.Array, p: float, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per sample, with probability ``p`` replace the prompt embedding by the unconditional one.

    ctx: [B, L, D]; uncond: [B, L, D] or [L, D] (the negative prompt's embedding). ``p`` is static, in [0, 1).
    Returns ``(ctx', dropped [B] bool)``; ``p == 0`` returns ``ctx`` untouched (no draw).
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"text dropout probability p={p} must be in [0, 1)")
    b = ctx.shape[0]
    if p == 0.0:
        return ctx, jnp.zeros((b,), bool)
    dropped = jax.random.bernoulli(rng, p, (b,))
    out = jnp.where(dropped.reshape((b,) + (1,) * (ctx.ndim - 1)), jnp.asarray(uncond, ctx.dtype), ctx)
    return out, dropped


LOGVAR_RANGE = (-30.0, 20.0)  # posterior log-variance clamp (keeps exp() finite early in training)


def gaussian_sample(mu: jax.Array, logvar: jax.Array, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Reparameterised posterior sample ``mu + exp(logvar / 2) * eps`` (float32) and the clamped log-variance."""
    logvar = jnp.clip(logvar.astype(jnp.float32), *LOGVAR_RANGE)
    eps = jax.random.normal(rng, mu.shape, jnp.float32)
    return mu.astype(jnp.float32) + jnp.exp(0.5 * logvar) * eps, logvar


def gaussian_kl(mu: jax.Array, logvar: jax.Array) -> jax.Array:
    """``KL(N(mu, exp(logvar)) || N(0, 1))`` in nats, averaged over every latent element. Scalar float32."""
    mu, logvar = mu.astype(jnp.float32), jnp.clip(logvar.astype(jnp.float32), *LOGVAR_RANGE)
    return jnp.mean(0.5 * (jnp.square(mu) + jnp.exp(logvar) - 1.0 - logvar))


def latent_noise(z: jax.Array, max_sigma: float, rng: jax.Array) -> jax.Array:
    """``z + sigma * std(z) * eps`` with ``sigma ~ U(0, max_sigma)`` per sample (axis 0) and ``std(z)`` over the
    whole batch, not differentiated: decoder-input augmentation (``train.vae_latent_noise``). float32."""
    z = z.astype(jnp.float32)
    k_sigma, k_eps = jax.random.split(rng)
    sigma = jax.random.uniform(k_sigma, (z.shape[0],) + (1,) * (z.ndim - 1), jnp.float32, 0.0, max_sigma)
    return z + sigma * jax.lax.stop_gradient(jnp.std(z)) * jax.random.normal(k_eps, z.shape, jnp.float32)


def chroma(pixels: jax.Array) -> jax.Array:
    """Chroma ``(max - min) / 2`` over the channel axis of pixels ``[B, T, 3, H, W]`` in [-1, 1]: ``[B, T, 1, H, W]``
    in [0, 1] (0 for greys, 1 for a fully saturated colour)."""
    return (jnp.max(pixels, axis=-3, keepdims=True) - jnp.min(pixels, axis=-3, keepdims=True)) / 2.0


def vae_loss(target: jax.Array, recon: jax.Array, mu: jax.Array | None, logvar: jax.Array | None,
             kl_weight: float, chroma_weight: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """VAE training loss ``mean(w |d|) + mean(w d^2) + kl_weight * KL`` with ``d = recon - target`` and per-pixel
    weight ``w = 1 + chroma_weight * chroma(target)`` (0: plain L1 + MSE pixel means). The chroma weight puts
    the reconstruction budget on coloured detail (storyworld's objects are a few percent of the pixels and carry
    all of the colour; its backgrounds are greys).

    target / recon: pixels of equal shape ``[B, T, 3, H, W]`` in [-1, 1] (``recon`` unclamped); mu / logvar: the
    posterior ``[B, ...]``, or both None for a fixed encoder (no KL term: ``kl`` is 0). Returns ``(loss, aux)``
    with ``l1``, ``mse`` (unweighted means), ``kl`` (nats per latent element) and ``psnr`` (dB, of the
    reconstruction clamped to [-1, 1], per sample then averaged; peak-to-peak 2).
    """
    if target.shape != recon.shape:
        raise ValueError(f"vae_loss: target {tuple(target.shape)} and recon {tuple(recon.shape)} differ")
    if chroma_weight and (target.ndim < 3 or target.shape[-3] != 3):
        raise ValueError(f"vae_loss: chroma_weight needs RGB on axis -3 ([B, T, 3, H, W]), got {tuple(target.shape)}")
    target, recon = target.astype(jnp.float32), recon.astype(jnp.float32)
    diff = recon - target
    l1 = jnp.mean(jnp.abs(diff))
    mse = jnp.mean(jnp.square(diff))
    kl = gaussian_kl(mu, logvar) if mu is not None else jnp.zeros((), jnp.float32)
    if chroma_weight:
        w = 1.0 + chroma_weight * chroma(target)
        loss = jnp.mean(w * jnp.abs(diff)) + jnp.mean(w * jnp.square(diff)) + kl_weight * kl
    else:
        loss = l1 + mse + kl_weight * kl
    err = jnp.square(jnp.clip(recon, -1.0, 1.0) - target).reshape(target.shape[0], -1).mean(axis=1)  # [B]
    psnr = jnp.mean(10.0 * jnp.log10(4.0 / jnp.maximum(err, 1e-10)))
    aux = jax.lax.stop_gradient({"l1": l1, "mse": mse, "kl": kl, "psnr": psnr})
    return loss, aux
