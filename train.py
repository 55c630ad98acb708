"""MemFlow training entry point (recipes: vae | teacher | teacher_story | ode_init | dmd | dmd_long | dmd_story |
story).

    python train.py --config configs/dmd_long.yaml [section.key=value ...] [--run-dir DIR]
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python train.py --config configs/tiny_dmd_long.yaml \
        train.mesh_data=2 train.mesh_fsdp=4

The run directory (``--run-dir``, else ``train.ckpt_dir``, else ``runs/<config name>``) receives everything the run
writes: ``checkpoints/`` (Orbax; the run resumes from the newest complete step), ``metrics.jsonl``, ``tb/``
(TensorBoard), ``config.json``, ``lora_final/``. Multi-host launches (torchrun-style env, SLURM, Cloud TPU,
``JAX_COORDINATOR_ADDRESS``) initialise ``jax.distributed`` first. ``--ode-pairs`` writes teacher ODE trajectories
instead of training (see ``python -m memflow_jax.training.ode_pairs --help``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="YAML recipe (configs/*.yaml)")
    ap.add_argument("--run-dir", default=None, help="output folder (default: train.ckpt_dir or runs/<config name>)")
    ap.add_argument("--max-steps", type=int, default=None, help="stop after this loop step (default train.max_iters)")
    ap.add_argument("--ode-pairs", metavar="OUT", default=None,
                    help="generate teacher ODE pairs into OUT instead of training (ode_pairs defaults)")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="stop (checkpointed, resumable) once this much wall time has passed")
    ap.add_argument("--export", metavar="DIR", default=None,
                    help="after training, write the generator (EMA if kept, LoRA merged) as a converted checkpoint")
    ap.add_argument("--no-ema", action="store_true", help="--export the raw weights even when EMA is kept")
    ap.add_argument("overrides", nargs="*", help="section.key=value")
    args = ap.parse_args(argv)

    from memflow_jax.training import trainer as trainer_lib  # registers the train / run / teacher_model sections

    trainer_lib.init_distributed()  # before anything touches a JAX backend

    from memflow_jax import config as cfg_lib

    cfg = cfg_lib.load(args.config, args.overrides)
    if args.ode_pairs:
        from memflow_jax.training import ode_pairs

        return ode_pairs.main(["--config", args.config, "--out", args.ode_pairs] + list(args.overrides))
    name = os.path.splitext(os.path.basename(args.config))[0]
    run_dir = args.run_dir or cfg.train.ckpt_dir or os.path.join("runs", name)
    tr = trainer_lib.Trainer(cfg, run_dir)
    try:
        tr.log(f"recipe {tr.recipe}: mesh {dict(tr.mesh.shape)}, global batch {tr.global_batch}, run dir {tr.run_dir}"
               f", starting at step {tr.step}")
        deadline = time.time() + 60.0 * args.max_minutes if args.max_minutes else None
        history = tr.train(args.max_steps, deadline=deadline)
        if history:
            last = {k: v for k, v in history[-1].items() if isinstance(v, (int, float))}
            tr.log(f"done: step {tr.step}; last metrics {last}")
        if args.export:
            from memflow_jax.training.export import export_generator

            tr.log(f"exported the generator (step {tr.step}) to {export_generator(tr, args.export, not args.no_ema)}")
    finally:
        tr.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
