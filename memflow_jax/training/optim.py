"""Optimisers (torch-style AdamW + global-norm clipping) and the generator EMA."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def make_optimizer(lr: float | optax.Schedule, beta1: float = 0.0, beta2: float = 0.999,
                   weight_decay: float = 0.01, clip: float | None = 10.0, eps: float = 1e-8
                   ) -> optax.GradientTransformation:
    """``clip_grad_norm_(clip)`` then ``torch.optim.AdamW(lr, (beta1, beta2), eps, weight_decay)``.

    Like the reference, weight decay (decoupled, scaled by ``lr``) applies to every trained param, biases and
    norm scales included. Clipping scales by ``clip / norm`` when ``norm > clip`` (torch adds 1e-6 to
    ``norm``; the difference is below f32 resolution at the norms where it clips). ``clip=None``: no clipping.
    """
    adamw = optax.adamw(lr, b1=beta1, b2=beta2, eps=eps, weight_decay=weight_decay)
    if clip is None:
        return adamw
    if clip <= 0:
        raise ValueError(f"clip={clip} must be > 0 (or None to disable clipping)")
    return optax.chain(optax.clip_by_global_norm(clip), adamw)


def make_optimizers(train: Any) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
    """(generator, critic) optimisers from a ``TrainConfig``."""
    gen = make_optimizer(train.lr, train.beta1, train.beta2, train.weight_decay, train.max_grad_norm_generator)
    critic = make_optimizer(train.lr_critic, train.beta1_critic, train.beta2_critic, train.weight_decay,
                            train.max_grad_norm_critic)
    return gen, critic


def ema_enabled(train: Any) -> bool:
    """Reference: EMA only with ``ema_weight > 0`` and never in LoRA mode."""
    return train.ema_weight > 0 and not train.lora_enabled


def ema_init(params: Any) -> Any:
    """Float32 shadow copy of ``params`` (reference ``EMA_FSDP`` keeps float32 shadows)."""
    return jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float32), params)


def ema_update(ema: Any, params: Any, step: jax.Array | int, decay: float, start_step: int) -> Any:
    """EMA after a generator update; ``step`` counts optimizer steps done, this one included.

    Reference: the EMA is created as a copy of the params once ``step >= ema_start_step`` and from then on
    updated after each generator step with ``ema = decay * ema + (1 - decay) * params``. Equivalently
    (called after every generator update): copy while ``step <= start_step``, blend after. Jit-safe.
    """
    copy = jnp.asarray(step) <= start_step

    def one(e, p):
        p = jnp.asarray(p, jnp.float32)
        return jnp.where(copy, p, decay * e + (1.0 - decay) * p)

    return jax.tree_util.tree_map(one, ema, params)
