"""Export a training run's generator as a converted checkpoint (``<dir>/config.json`` + ``<dir>/dit/``).

The exported folder is what later stages read (``run.teacher_ckpt``, ``run.critic_ckpt``,
``train.generator_ckpt`` accept converted folders) and what :mod:`memflow_jax.storyworld.package` assembles into
the shipped demo checkpoint. EMA weights are exported when the run keeps them (``train.ema_weight > 0``), LoRA
adapters are merged into their base kernels first.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np

from memflow_jax.convert.common import save_converted
from memflow_jax.training.config import DIT_RECIPES


def generator_params(trainer: Any, use_ema: bool = True) -> Any:
    """Host copy of the trainer's effective generator params (EMA if kept and asked for; LoRA merged)."""
    src = trainer.ema if (use_ema and trainer.ema is not None) else trainer.gen.params
    return jax.tree_util.tree_map(np.asarray, trainer.gen_params(src))


def export_generator(trainer: Any, out_dir: str, use_ema: bool = True) -> str:
    """Write the generator of ``trainer`` (a :class:`memflow_jax.training.trainer.Trainer`) to ``out_dir``."""
    if getattr(trainer, "recipe", None) not in DIT_RECIPES:
        raise ValueError(f"recipe {trainer.recipe!r} has no DiT generator to export (the vae recipe's weights are "
                         "exported by `python -m memflow_jax.data.encode_latents`)")
    params = generator_params(trainer, use_ema)
    # the sampling sections only: train / run / teacher_model describe how it was made (kept in "source")
    cfg = trainer.cfg.checkpoint_dict()
    meta = {"source": {"run_dir": trainer.run_dir, "step": int(trainer.step), "recipe": trainer.recipe,
                       "ema": bool(use_ema and trainer.ema is not None)}}
    return save_converted(out_dir, {"dit": params}, cfg, extra_meta=meta)
