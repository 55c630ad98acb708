"""End-to-end text -> video: tokenizer -> UMT5 -> streaming causal DiT (NAM/SMA) -> streaming VAE decode -> mp4.

Components come from a converted checkpoint directory (``python -m memflow_jax.convert``) or, with no checkpoint,
from random initialisation of the config (a smoke run: the video is noise and the run says so).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from memflow_jax import config as config_lib
from memflow_jax.config import Config
from memflow_jax.convert.common import load_component, read_converted_meta
from memflow_jax.nn import dit, t5 as t5_nn, vae as vae_nn
from memflow_jax.sampling.streaming import StreamingSampler
from memflow_jax.sampling.timeline import Timeline
from memflow_jax.text.encoder import TextEncoder
from memflow_jax.text.tokenizer import UMT5Tokenizer

TINY_TOKENIZER = os.path.join(os.path.dirname(__file__), "assets", "tiny_umt5")


@dataclasses.dataclass
class Components:
    cfg: Config
    dit_params: Any
    text_encoder: TextEncoder
    vae_params: Any
    random_weights: bool


def _cast(tree: Any, dtype: str) -> Any:
    dt = jnp.dtype(dtype)
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, dt), tree)


def load_components(cfg: Config, ckpt_dir: str | None = None, seed: int = 0,
                    text_device: jax.Device | None = None) -> Components:
    """Params for every component: from ``ckpt_dir`` (converted Orbax dir) or random (tiny smoke runs)."""
    check_compatible(cfg)
    if ckpt_dir is None:
        k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
        dparams = dit.init_params(cfg.model, k1)
        tparams = t5_nn.init_params(cfg.text, k2)
        vparams = vae_nn.init_params(cfg.vae, k3)
        tok = UMT5Tokenizer(TINY_TOKENIZER, cfg.text.text_len)
        random_weights = True
    else:
        dparams = load_component(ckpt_dir, "dit", dit.abstract_params(dataclasses.replace(
            cfg.model, dtype="float32", param_dtype="float32")))
        tparams = load_component(ckpt_dir, "t5", t5_nn.abstract_params(cfg.text))
        vparams = load_component(ckpt_dir, "vae", vae_nn.abstract_params(cfg.vae))
        tok = UMT5Tokenizer(os.path.join(ckpt_dir, "tokenizer"), cfg.text.text_len)
        random_weights = False
    if cfg.model.dtype != "float32":
        dparams = _cast(dparams, cfg.model.dtype)  # inference: bf16 weights halve memory and bandwidth
    enc = TextEncoder(tok, tparams, cfg.text, device=text_device)
    return Components(cfg, dparams, enc, vparams, random_weights)


def check_compatible(cfg: Config) -> None:
    """Cross-section checks: the DiT consumes VAE latents and UMT5 embeddings."""
    m = cfg.model
    if m.in_dim != cfg.vae.z_dim or m.out_dim != cfg.vae.z_dim:
        raise config_lib.ConfigError(f"model.in_dim/out_dim ({m.in_dim}/{m.out_dim}) must equal vae.z_dim "
                                     f"({cfg.vae.z_dim}): the DiT denoises VAE latents")
    if m.text_dim != cfg.text.dim or m.text_len != cfg.text.text_len:
        raise config_lib.ConfigError(f"model.text_dim/text_len ({m.text_dim}/{m.text_len}) must equal "
                                     f"text.dim/text_len ({cfg.text.dim}/{cfg.text.text_len})")
    if cfg.sampler.vae_stride[1] != 2 ** (len(cfg.vae.dim_mult) - 1):
        raise config_lib.ConfigError(f"sampler.vae_stride {cfg.sampler.vae_stride} does not match the VAE's "
                                     f"spatial stride {2 ** (len(cfg.vae.dim_mult) - 1)}")


def config_from_checkpoint(ckpt_dir: str, overrides: list[str] = (), base_yaml: str | None = None) -> Config:
    """The config stored in a converted checkpoint, then the YAML's sections, then ``key=value`` overrides."""
    stored = read_converted_meta(ckpt_dir)["config"]
    data = dict(stored)
    if base_yaml:
        extra = config_lib.read_yaml(base_yaml)
        # the checkpoint defines the architecture; the YAML may set numerics and everything else
        arch = {"model": {k: v for k, v in (extra.get("model") or {}).items()
                          if k in ("dtype", "param_dtype", "attention_impl", "remat")}}
        extra = {k: v for k, v in extra.items() if k != "model"}
        data = config_lib.merge(config_lib.merge(data, extra), arch)
    return config_lib.from_dict(config_lib.merge(data, config_lib.parse_overrides(overrides)))


def generate(comp: Components, timeline: Timeline, *, num_frames: int, seed: int = 0,
             offload_text_encoder: bool = False,
             on_chunk: Callable[[int, np.ndarray, np.ndarray | None], None] | None = None,
             on_state: Callable | None = None) -> np.ndarray:
    """Stream a video: returns all latents [B, T, C, h, w]; ``on_chunk(i, latents, pixels [B,F,3,H,W])``
    is called per chunk (pixels are None when the VAE is skipped); ``on_state``: the sampler's per-chunk state hook
    (:meth:`StreamingSampler.stream`)."""
    cfg = comp.cfg
    b = cfg.sampler.batch_size
    # text: every distinct prompt encoded once; then the encoder can be dropped
    contexts = [comp.text_encoder.encode([p] * b) for p in timeline.prompts]
    if offload_text_encoder:
        comp.text_encoder.drop_params()
    contexts = [_fit_context(c, cfg) for c in contexts]
    sampler = StreamingSampler(comp.dit_params, cfg.model, cfg.memory, cfg.sampler, batch_size=b)
    h, w = sampler.latent_hw
    vcache = vae_nn.init_decode_cache(cfg.vae, b, h, w) if comp.vae_params is not None else None
    lat = []
    for ci, x0, _ in sampler.stream(contexts, list(timeline.switch_frames), num_frames,
                                    rng=jax.random.PRNGKey(seed), on_state=on_state):
        pix = None
        if vcache is not None:
            pix, vcache = vae_nn.decode_chunk_jit(comp.vae_params, cfg.vae, x0, vcache)
            pix = np.asarray(pix)
        x0 = np.asarray(x0)
        lat.append(x0)
        if on_chunk is not None:
            on_chunk(ci, x0, pix)
    return np.concatenate(lat, axis=1)


def _fit_context(ctx: jnp.ndarray, cfg: Config) -> np.ndarray:
    """UMT5 output [B, text.text_len, text.dim] -> the DiT's [B, model.text_len, model.text_dim]."""
    b, length, width = ctx.shape
    if width != cfg.model.text_dim:
        raise ValueError(f"text encoder width {width} != model.text_dim {cfg.model.text_dim}: the text and model "
                         "configs do not belong together")
    if length != cfg.model.text_len:
        raise ValueError(f"text encoder length {length} != model.text_len {cfg.model.text_len}: set text.text_len")
    # a host copy: the DiT places it like its other inputs (an array committed to the text encoder's device,
    # e.g. --text-device cpu, would pin the DiT's programs there and compile the chunk step once more)
    return np.asarray(ctx)
