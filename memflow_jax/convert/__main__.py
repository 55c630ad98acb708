"""Convert a downloaded release into one checkpoint directory that ``sample.py --ckpt`` loads.

    python -m memflow_jax.convert --wan-folder wan_models/Wan2.1-T2V-1.3B \
        --base-pt checkpoints/base.pt --lora-pt checkpoints/lora.pt --lora-alpha 256 \
        --t5 wan_models/Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth \
        --tokenizer wan_models/Wan2.1-T2V-1.3B/google/umt5-xxl \
        --vae wan_models/Wan2.1-T2V-1.3B/Wan2.1_VAE.pth \
        --config configs/wan_1_3b.yaml --out ckpts/memflow

Only ``--wan-folder`` is required (a bare Wan2.1 DiT, e.g. a teacher). Every input is validated against the model
config before anything is written; the output directory appears atomically (all or nothing).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from memflow_jax import config as config_lib
from memflow_jax.convert.common import ConversionError, save_converted


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m memflow_jax.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--wan-folder", required=True, help="Wan2.1 diffusers folder (config.json + safetensors)")
    p.add_argument("--base-pt", help="Self-Forcing/LongLive/MemFlow generator checkpoint (base.pt)")
    p.add_argument("--use-ema", action="store_true", help="take base.pt['generator_ema']")
    p.add_argument("--lora-pt", help="MemFlow lora.pt (generator_lora), merged into the weights")
    p.add_argument("--lora-alpha", type=float, help="adapter.alpha of the LoRA (not stored in lora.pt)")
    p.add_argument("--t5", help="models_t5_umt5-xxl-enc-bf16.pth")
    p.add_argument("--tokenizer", help="google/umt5-xxl tokenizer folder (copied into the output)")
    p.add_argument("--vae", help="Wan2.1_VAE.pth")
    p.add_argument("--config", help="YAML for the non-architecture sections (memory, sampler, text, vae)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    return p.parse_args(argv)


def convert(args: argparse.Namespace) -> str:
    from memflow_jax.convert import dit as dit_conv

    base = config_lib.load(args.config, args.overrides) if args.config or args.overrides else config_lib.from_dict({})
    numerics = {k: getattr(base.model, k) for k in ("dtype", "param_dtype", "attention_impl", "remat")}
    model_cfg = dit_conv.read_wan_config(args.wan_folder, **numerics)
    if args.lora_pt and args.lora_alpha is None:
        raise ConversionError("--lora-pt needs --lora-alpha (adapter.alpha of the training YAML; lora.pt stores "
                              "only the rank)")
    f32 = dataclasses.replace(model_cfg, dtype="float32", param_dtype="float32")
    if args.base_pt:
        params = dit_conv.load_generator_pt(args.base_pt, f32, use_ema=args.use_ema)
    else:
        _, params = dit_conv.load_wan_folder(args.wan_folder, f32)
    if args.lora_pt:
        params = dit_conv.merge_lora(params, args.lora_pt, alpha=args.lora_alpha)
    components = {"dit": params}
    cfg = base.replace(model=model_cfg)
    if args.t5:
        from memflow_jax.convert.t5 import convert_t5_state_dict

        components["t5"] = convert_t5_state_dict(args.t5, cfg.text)
        if not args.tokenizer:
            raise ConversionError("--t5 needs --tokenizer (the google/umt5-xxl folder) so sample.py can tokenize")
        from memflow_jax.text.tokenizer import UMT5Tokenizer

        UMT5Tokenizer(args.tokenizer, cfg.text.text_len)  # validate before writing
    if args.vae:
        from memflow_jax.convert.vae import convert_vae_state_dict

        components["vae"] = convert_vae_state_dict(args.vae, cfg.vae)
    meta = {"sources": {k: v for k, v in vars(args).items() if k not in ("overrides",) and v}}
    return save_converted(args.out, components, cfg.checkpoint_dict(), meta,
                          copy_dirs={"tokenizer": args.tokenizer} if args.tokenizer else None)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        out = convert(args)
    except (ConversionError, config_lib.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
