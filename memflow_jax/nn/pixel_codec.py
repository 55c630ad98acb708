"""Pixel codec: a fixed, lossless stand-in for the VAE (``vae.codec: pixel``), with the VAE's frame layout.

A latent frame holds the pixels of the video frames it stands for, space-to-depth: with time stride ``ts`` and
space stride ``s`` (``nn.vae.time_stride`` / ``space_stride`` of the same config), latent frame ``k >= 1`` is
video frames ``1 + ts(k-1) .. ts k`` and latent frame 0 is video frame 0 repeated ``ts`` times (the Wan VAE's
``T = 1 + ts k`` layout), each ``[H, W, 3]`` frame folded into ``[H/s, W/s, 3 s^2]`` and the ``ts`` frames
concatenated on channels: ``z_dim = ts * 3 * s^2``, channel order (frame slot, row offset, column offset, RGB).
Decoding unfolds; the first latent frame decodes to the mean of its slots. Encode followed by decode is the
identity, so the codec's ceiling on any pixel metric is the ground truth itself.

Why it exists: the storyworld demo (issue #7) measured that its small learned VAE loses the small objects'
hidden attributes (``storyworld/TRAINING.md``, round 5); this codec removes that ceiling at the price of a
latent as large as the video (the DiT's token count is unchanged: it patchifies the same ``H/s x W/s`` grid).
It has no parameters: ``nn.vae`` dispatches here for ``codec == "pixel"`` and its params are ``{}``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange

from memflow_jax.config import VAEConfig

Array = jax.Array


def strides(cfg: VAEConfig) -> tuple[int, int]:
    """(time stride, space stride): the Wan VAE's strides for the same ``temporal_downsample`` / ``dim_mult``."""
    return 2 ** sum(bool(t) for t in cfg.temporal_downsample), 2 ** (len(cfg.dim_mult) - 1)


def z_dim(cfg: VAEConfig) -> int:
    """Channels of a latent frame: ``ts * 3 * s^2``."""
    ts, ss = strides(cfg)
    return ts * 3 * ss * ss


def encode_raw(cfg: VAEConfig, x: Array) -> Array:
    """Video ``[B, T, H, W, 3]`` (T = 1 + ts k) -> raw latents ``[B, 1 + k, H/s, W/s, z]`` (same dtype)."""
    ts, ss = strides(cfg)
    x = jnp.concatenate([jnp.repeat(x[:, :1], ts, axis=1), x[:, 1:]], axis=1)  # frame 0 fills latent 0's slots
    return rearrange(x, "b (k t) (h p) (w q) c -> b k h w (t p q c)", t=ts, p=ss, q=ss)


def decode_raw(cfg: VAEConfig, z: Array) -> Array:
    """Raw latents ``[B, k, h, w, z]`` -> ``[B, ts k, s h, s w, 3]``: every latent frame gives its ``ts`` frames
    (the caller keeps one frame of the video's first latent frame, see :func:`first_frame`)."""
    ts, ss = strides(cfg)
    return rearrange(z, "b k h w (t p q c) -> b (k t) (h p) (w q) c", t=ts, p=ss, q=ss)


def first_frame(cfg: VAEConfig, frames: Array) -> Array:
    """The one real frame of the video's first latent frame: the mean of its ``ts`` decoded slots.
    ``frames``: [B, ts, H, W, 3] -> [B, ts, H, W, 3] with every slot the mean (the shapes of a normal step)."""
    return jnp.broadcast_to(jnp.mean(frames, axis=1, keepdims=True), frames.shape)
