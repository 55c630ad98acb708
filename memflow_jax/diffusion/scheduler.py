"""Flow-matching noise schedule (rectified flow, Wan2.1 / MemFlow settings) as pure functions of tables.

Conventions
-----------
* A schedule is a :class:`FlowMatchSchedule`: three length-``T`` float32 tables (``sigmas``, ``timesteps``,
  ``weights``) built once on the host by :func:`make_schedule`, plus static metadata. It is a pytree, so it
  can be passed to jitted functions.
* Timesteps ``t`` are float arrays of any leading shape ``S`` (``[N]`` for flattened frames, ``[B, F]`` for
  video batches). Latents ``x`` are ``S + [C, H, W]``: the leading ``t.ndim`` dims of ``x`` equal ``t.shape``
  and exactly three trailing dims follow (``σ(t)`` is broadcast over ``C, H, W``).
* ``x_t = (1 - σ) x0 + σ noise``; the network predicts the flow ``noise - x0``; ``x0 = x_t - σ flow``.
* Every σ lookup is nearest-neighbour in the timestep table (``argmin |timesteps - t|``, first index on
  ties), as in the reference: timesteps between table entries are snapped, never interpolated.
"""
from __future__ import annotations

import functools
from fractions import Fraction
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "FlowMatchSchedule", "make_schedule", "warp_denoising_steps", "timestep_index", "sigma_at", "add_noise",
    "flow_to_x0", "x0_to_flow", "step", "training_weight", "training_target", "flow_loss", "dmd_timestep",
    "masked_mean", "accurate_sum",
]


@flax.struct.dataclass
class FlowMatchSchedule:
    """Tables of a flow-matching scheduler (all float32, length ``T = num_inference_steps``).

    sigmas:     [T] noise level per table entry, decreasing from 1 (never reaches 0 with extra_one_step).
    timesteps:  [T] ``sigmas * num_train_timesteps`` (what the DiT is conditioned on).
    weights:    [T] the "linear timesteps" training weights (bell curve around T/2, mean 1).
    """

    sigmas: jax.Array  # [T]
    timesteps: jax.Array  # [T]
    weights: jax.Array  # [T]
    shift: float = flax.struct.field(pytree_node=False, default=1.0)
    num_train_timesteps: int = flax.struct.field(pytree_node=False, default=1000)

    @property
    def num_entries(self) -> int:
        return int(self.sigmas.shape[0])


# --------------------------------------------------------------------------------------------------
# Host-side table construction (numpy, float32, bit-exact with the reference on CPU)
# --------------------------------------------------------------------------------------------------


def _round_to_f32(q: Fraction) -> np.float32:
    """Correctly rounded (nearest, ties to even) float32 of an exact rational."""
    x = np.float32(float(q))  # within one float32 ulp of q (float() is correctly rounded to float64)
    cands = (np.nextafter(x, np.float32(-np.inf)), x, np.nextafter(x, np.float32(np.inf)))
    best = min(cands, key=lambda c: (abs(Fraction(float(c)) - q), int(np.float32(c).view(np.uint32)) & 1))
    return np.float32(best)


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """float32 ``torch.linspace(start, end, steps)`` as computed by torch's CPU kernel.

    The kernel is symmetric: the first half is ``start + step·i`` and the second half ``end - step·(steps-1-i)``,
    each a single fused multiply-add (one rounding) in the AVX2/AVX512 builds, with
    ``step = (end - start) / (steps - 1)`` in float32. (``np.linspace`` differs in ~40% of the entries.)
    """
    if steps < 1:
        raise ValueError(f"linspace needs steps >= 1, got {steps}")
    f32 = np.float32
    s, e = f32(start), f32(end)
    if steps == 1:
        return np.array([s], np.float32)
    step = (e - s) / f32(steps - 1)
    half = steps // 2
    out = np.empty(steps, np.float32)
    qs, qe, qstep = Fraction(float(s)), Fraction(float(e)), Fraction(float(step))
    for i in range(steps):
        # exact fma then one rounding (float64 fma emulation could double-round)
        q = qs + qstep * i if i < half else qe - qstep * (steps - 1 - i)
        out[i] = _round_to_f32(q)
    return out


@functools.lru_cache(maxsize=16)
def _host_tables(shift: float, num_train_timesteps: int, sigma_min: float, extra_one_step: bool,
                 n: int, sigma_max: float, denoising_strength: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    f32 = np.float32
    sigma_start = sigma_min + (sigma_max - sigma_min) * denoising_strength
    if extra_one_step:  # reference: linspace over n + 1 points, drop the last (σ = sigma_min never used)
        base = _torch_linspace_f32(sigma_start, sigma_min, n + 1)[:-1]
    else:
        base = _torch_linspace_f32(sigma_start, sigma_min, n)
    sigmas = (f32(shift) * base) / (f32(1) + f32(shift - 1) * base)
    timesteps = sigmas * f32(num_train_timesteps)
    # reference "linear timesteps weights": y = exp(-2((t - n/2)/n)^2), shifted to min 0, scaled to sum n.
    # exp is taken in float64 and rounded (a correctly rounded float32 exp; torch's vectorised exp differs by
    # an ulp in some entries on some CPUs), the sum is exact then rounded: within 5e-7 of the reference.
    arg = f32(-2) * np.square((timesteps - f32(n / 2)) / f32(n))
    y = np.exp(arg.astype(np.float64)).astype(np.float32)
    y_shifted = y - y.min()
    total = f32(np.sum(y_shifted, dtype=np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):  # total = 0 for a few-step table: NaN weights, as in the
        weights = y_shifted * (f32(n) / total)               # reference (only the training table's are used)
    return sigmas.astype(np.float32), timesteps.astype(np.float32), weights.astype(np.float32)


def make_schedule(
    shift: float,
    num_train_timesteps: int = 1000,
    sigma_min: float = 0.0,
    extra_one_step: bool = True,
    *,
    num_inference_steps: int | None = None,
    sigma_max: float = 1.0,
    denoising_strength: float = 1.0,
) -> FlowMatchSchedule:
    """Build the float32 tables of ``FlowMatchScheduler(shift, sigma_min, extra_one_step)`` after
    ``set_timesteps(num_inference_steps, training=True)`` (MemFlow: ``num_inference_steps = 1000``,
    the default ``num_train_timesteps``).

    Computed on the host in numpy with the reference's float32 op order, so σ and the timesteps are the
    reference's bit for bit and the weights agree to an ulp (exp / sum order).
    """
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    n = int(num_inference_steps if num_inference_steps is not None else num_train_timesteps)
    if n < 2:
        raise ValueError(f"num_inference_steps must be >= 2, got {n}")
    sigmas, timesteps, weights = _host_tables(float(shift), int(num_train_timesteps), float(sigma_min),
                                              bool(extra_one_step), n, float(sigma_max), float(denoising_strength))
    return FlowMatchSchedule(
        sigmas=jnp.asarray(sigmas), timesteps=jnp.asarray(timesteps), weights=jnp.asarray(weights),
        shift=float(shift), num_train_timesteps=int(num_train_timesteps))


def warp_denoising_steps(step_list: Sequence[int], schedule: FlowMatchSchedule) -> np.ndarray:
    """Map integer denoising steps (e.g. ``[1000, 750, 500, 250]``) onto the shifted table.

    Reference ``warp_denoising_step``: ``cat(timesteps, [0])[num_train_timesteps - step]``. Returns a host
    float32 array (the step list is static configuration).
    """
    ts = np.concatenate([np.asarray(schedule.timesteps, np.float32), np.zeros([1], np.float32)])
    steps = np.asarray(step_list)
    if steps.ndim != 1 or not np.issubdtype(steps.dtype, np.integer):
        raise ValueError(f"step_list must be a 1-D list of integers, got {step_list!r}")
    idx = schedule.num_train_timesteps - steps
    if (idx < 0).any() or (idx >= ts.shape[0]).any():
        raise ValueError(
            f"denoising steps {step_list!r} must lie in [{schedule.num_train_timesteps - ts.shape[0] + 1}, "
            f"{schedule.num_train_timesteps}] for a {schedule.num_entries}-entry table")
    return ts[idx]


# --------------------------------------------------------------------------------------------------
# Lookups
# --------------------------------------------------------------------------------------------------


@jax.jit
def timestep_index(schedule: FlowMatchSchedule, t: jax.Array) -> jax.Array:
    """Nearest table entry of every timestep: ``argmin |timesteps - t|``, first index on ties.

    t: any shape ``S`` -> int32 ``S``. The distances are float32 like the reference's ``add_noise`` / ``step``;
    its flow<->x0 conversions subtract in float64, which ranks identically here: a near-tie needs ``t`` between
    two neighbours ``a < b`` with ``b <= 2a`` (true for these tables), so both float32 differences are exact
    (Sterbenz).
    """
    t = jnp.asarray(t, jnp.float32)
    d = jnp.abs(schedule.timesteps.astype(jnp.float32) - t[..., None])  # [*S, T]
    return jnp.argmin(d, axis=-1).astype(jnp.int32)


@jax.jit
def sigma_at(schedule: FlowMatchSchedule, t: jax.Array) -> jax.Array:
    """σ of the nearest table entry. t: ``S`` -> float32 ``S``."""
    return schedule.sigmas[timestep_index(schedule, t)]


def guidance_at(sigma: jax.Array, guidance_scale: float, sigma_max: float | None, unguided: float) -> jax.Array:
    """Classifier-free guidance scale at noise level ``sigma`` (any shape -> float32, same shape): ``guidance_scale``
    where ``sigma <= sigma_max`` (a guidance interval, Kynkaanniemi et al. 2024), else ``unguided``, the scale that
    means the conditional prediction alone in the caller's formula (1 for ``uncond + s·(cond - uncond)``, 0 for
    DMD's ``cond + s·(cond - uncond)``). ``sigma_max`` None or >= 1 (sigmas are <= 1): every step guided.
    Guidance at high noise, where an object's look is decided, gives each prompt one look (storyworld/TRAINING.md
    round 20)."""
    g = jnp.full(jnp.shape(sigma), guidance_scale, jnp.float32)
    if sigma_max is None or sigma_max >= 1.0:
        return g
    return jnp.where(jnp.asarray(sigma) <= sigma_max, g, jnp.float32(unguided))


def _check_latent(name: str, x: jax.Array, t: jax.Array) -> None:
    if x.ndim != t.ndim + 3 or tuple(x.shape[: t.ndim]) != tuple(t.shape):
        raise ValueError(
            f"{name} has shape {tuple(x.shape)} but timestep has shape {tuple(t.shape)}: latents must be "
            f"t.shape + [C, H, W] (e.g. t [B, F] with x [B, F, C, H, W], or t [N] with x [N, C, H, W])")


def _bcast(s: jax.Array) -> jax.Array:
    return s[..., None, None, None]


def _compute_dtype(*xs: jax.Array):
    return jnp.promote_types(jnp.result_type(*xs), jnp.float32)


# --------------------------------------------------------------------------------------------------
# Element-wise ops
# --------------------------------------------------------------------------------------------------


@jax.jit
def add_noise(schedule: FlowMatchSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """Forward process ``(1 - σ) x0 + σ noise``. x0, noise: ``S + [C, H, W]``; t: ``S``. Dtype of ``noise``.

    Reference quirk: σ is never 0 (smallest entry ~0.005 at shift 5), so t = 0 still adds a little noise.
    """
    t = jnp.asarray(t, jnp.float32)
    _check_latent("x0", x0, t)
    _check_latent("noise", noise, t)
    sigma = _bcast(sigma_at(schedule, t))
    ct = _compute_dtype(x0, noise)
    # torch rounds both products before the add; XLA may contract one of them into an FMA, which moves some
    # entries by 1 ulp (~1e-7, far inside the 1e-6 tolerance). No public API forbids the contraction.
    xt = (1.0 - sigma).astype(ct) * x0.astype(ct) + sigma.astype(ct) * noise.astype(ct)
    return xt.astype(noise.dtype)


@jax.jit
def flow_to_x0(schedule: FlowMatchSchedule, flow: jax.Array, xt: jax.Array, t: jax.Array) -> jax.Array:
    """``x0 = x_t - σ(t) · flow``. flow, xt: ``S + [C, H, W]``; t: ``S``. Dtype of ``flow``.

    The reference computes this in float64 and casts back. In float32 the product and the difference are
    each correctly rounded (or fused into one FMA by XLA), so the result is within ~1 ulp of
    ``max(|x_t|, |σ·flow|)`` of the float64 value (< 1e-6 for |values| < 8), inside the fixture tolerance.
    """
    t = jnp.asarray(t, jnp.float32)
    _check_latent("flow", flow, t)
    _check_latent("xt", xt, t)
    sigma = _bcast(sigma_at(schedule, t))
    ct = _compute_dtype(flow, xt)
    return (xt.astype(ct) - sigma.astype(ct) * flow.astype(ct)).astype(flow.dtype)


@jax.jit
def x0_to_flow(schedule: FlowMatchSchedule, x0: jax.Array, xt: jax.Array, t: jax.Array) -> jax.Array:
    """``flow = (x_t - x0) / σ(t)``. x0, xt: ``S + [C, H, W]``; t: ``S``. Dtype of ``x0``.

    The reference computes this in float64 and casts back. We subtract first, in float32: the difference of
    two float32 numbers is one correctly rounded operation, then we divide by σ (a true division, not a
    multiplication by 1/σ). Two roundings in all, so the relative error is <= ~2 ulp of the result whatever
    σ is; multiplying an x0 error by 1/σ (up to ~200) is what the fixture's looser tolerance is for.
    """
    t = jnp.asarray(t, jnp.float32)
    _check_latent("x0", x0, t)
    _check_latent("xt", xt, t)
    sigma = _bcast(sigma_at(schedule, t))
    ct = _compute_dtype(x0, xt)
    return ((xt.astype(ct) - x0.astype(ct)) / sigma.astype(ct)).astype(x0.dtype)


@functools.partial(jax.jit, static_argnames=("to_final",))
def step(schedule: FlowMatchSchedule, flow: jax.Array, t: jax.Array, xt: jax.Array,
         *, to_final: bool = False) -> jax.Array:
    """One Euler step to the next table entry: ``x_t + flow · (σ_next - σ)``. flow, xt: ``S + [C, H, W]``.

    Reference quirk: if ANY timestep in the batch is at the last table entry (or ``to_final``),
    ``σ_next = 0`` for ALL samples.
    """
    t = jnp.asarray(t, jnp.float32)
    _check_latent("flow", flow, t)
    _check_latent("xt", xt, t)
    idx = timestep_index(schedule, t)
    n = schedule.num_entries
    sigma = schedule.sigmas[idx]
    sigma_next = schedule.sigmas[jnp.minimum(idx + 1, n - 1)]
    at_end = jnp.any(idx + 1 >= n) | to_final
    sigma_next = jnp.where(at_end, jnp.zeros_like(sigma_next), sigma_next)
    ct = _compute_dtype(flow, xt)
    out = xt.astype(ct) + flow.astype(ct) * _bcast(sigma_next - sigma).astype(ct)
    return out.astype(xt.dtype)


@jax.jit
def training_weight(schedule: FlowMatchSchedule, t: jax.Array) -> jax.Array:
    """Per-timestep loss weight of the nearest table entry. t: ``S`` -> float32 ``S``."""
    return schedule.weights[timestep_index(schedule, t)]


def training_target(x0: jax.Array, noise: jax.Array, t: jax.Array | None = None) -> jax.Array:
    """Flow-matching regression target ``noise - x0`` (independent of ``t``; kept for API symmetry)."""
    del t
    return noise - x0


@functools.partial(jax.jit, static_argnames=("axis", "block"))
def accurate_sum(x: jax.Array, axis: int | tuple[int, ...] | None = None, *, block: int = 4) -> jax.Array:
    """Sum in float32 by a ``block``-ary tree (pairwise-style summation), over ``axis`` (default: all).

    XLA:CPU reduces long rows almost sequentially, whose float32 error (several ulp over a few thousand
    terms) exceeds the fixtures' 1e-6 on losses that torch sums with its cascade summation; the tree keeps the
    error at O(log N) ulp. Python-level loop over the (static) tree depth only.
    """
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    axes = tuple(range(x.ndim)) if axis is None else tuple(a % x.ndim for a in np.atleast_1d(axis))
    keep = [a for a in range(x.ndim) if a not in axes]
    v = jnp.transpose(x, keep + list(axes)).reshape([x.shape[a] for a in keep] + [-1])
    while v.shape[-1] > block:
        pad = (-v.shape[-1]) % block
        if pad:
            v = jnp.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, pad)])
        v = v.reshape(v.shape[:-1] + (v.shape[-1] // block, block)).sum(axis=-1)
    return v.sum(axis=-1)


@jax.jit
def masked_mean(values: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean of ``values`` (float32 tree sum), or over the True entries of ``mask``. Scalar.

    ``mask`` must broadcast to ``values.shape`` (e.g. a full bool mask like the reference's gradient_mask,
    or ``[B, F, 1, 1, 1]`` for whole frames); the count is that of the broadcast mask. An all-False mask
    gives NaN, like the reference's mean over an empty selection.
    """
    values = values.astype(jnp.promote_types(values.dtype, jnp.float32))
    if mask is None:
        return accurate_sum(values) / jnp.asarray(values.size, values.dtype)
    mask = jnp.asarray(mask)
    try:
        mask = jnp.broadcast_to(mask.astype(bool), values.shape)
    except ValueError as e:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to {tuple(values.shape)}; "
                         "pass a bool mask of the latent's shape (or one with size-1 dims)") from e
    total = accurate_sum(jnp.where(mask, values, jnp.zeros_like(values)))
    return total / jnp.sum(mask, dtype=values.dtype)


@jax.jit
def flow_loss(pred: jax.Array, noise: jax.Array, x0: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Reference ``FlowPredLoss``: ``mean((pred - (noise - x0))²)`` (over ``mask`` when given). Scalar."""
    if pred.shape != noise.shape or pred.shape != x0.shape:
        raise ValueError(f"flow_loss needs equal shapes, got pred {pred.shape}, noise {noise.shape}, x0 {x0.shape}")
    err = jnp.square(pred.astype(jnp.float32) - (noise.astype(jnp.float32) - x0.astype(jnp.float32)))
    return masked_mean(err, mask)


@functools.lru_cache(maxsize=32)
def _dmd_timestep_table(shift: float, min_step: float, max_step: float, num_train_timesteps: int) -> np.ndarray:
    f32 = np.float32
    t = np.arange(num_train_timesteps, dtype=np.int64).astype(np.float32)
    n = f32(num_train_timesteps)
    if shift > 1:  # reference applies the shift only for timestep_shift > 1
        u = t / n
        t = (f32(shift) * u) / (f32(1) + f32(shift - 1) * u) * n
    return np.clip(t, f32(min_step), f32(max_step)).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("shift", "min_step", "max_step", "num_train_timesteps"))
def dmd_timestep(raw_int: jax.Array, shift: float, min_step: float, max_step: float,
                 num_train_timesteps: int = 1000) -> jax.Array:
    """DMD/critic timestep of an integer draw in ``[0, num_train_timesteps)``. Any shape -> float32.

    Reference quirk: ``1000·s·u / (1 + (s-1)·u)`` with ``u = r / 1000`` is applied to the integer draw in
    float32 (not through the σ table), only when ``shift > 1``, then clamped to ``[min_step, max_step]``.
    The map is tabulated on the host in numpy (XLA would turn ``r / 1000`` into ``r * 0.001`` and change
    half of the values by an ulp) and gathered; draws outside the range are clipped into it.
    """
    raw = jnp.asarray(raw_int)
    if not jnp.issubdtype(raw.dtype, jnp.integer):
        raise ValueError(f"dmd_timestep needs the integer timestep draw, got dtype {raw.dtype}")
    table = jnp.asarray(_dmd_timestep_table(float(shift), float(min_step), float(max_step),
                                            int(num_train_timesteps)))
    return table[jnp.clip(raw, 0, num_train_timesteps - 1)]
