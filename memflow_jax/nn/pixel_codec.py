"""Pixel codecs: fixed stand-ins for the VAE with its frame layout: lossless (``vae.codec: pixel``) or a PCA of it
(``vae.codec: pca``).

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

``pca`` keeps the ``z_dim`` leading principal components of those cells (fitted in closed form on the training
clips by :func:`fit_pca`: params ``mean [P]`` and an orthonormal ``basis [P, z]``, ``P = ts * 3 * s^2``):
``z = (cell - mean) @ basis``, decoded as ``z @ basis.T + mean``. Why: a DiT's head maps each ``dim``-wide token
to its ``patch * z_dim`` values, so its output spans at most ``dim`` of them; the lossless codec's 768-value tokens
left most of each patch's noise undenoised (round 6), while 32 components a cell (128 a 2x2 token, the demo DiT's
width) keep 99.1 % of the pixel variance and pass the re-appearance test on 7 of 8 held-out stories.
"""
from __future__ import annotations

from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange

from memflow_jax.config import VAEConfig

Array = jax.Array


def strides(cfg: VAEConfig) -> tuple[int, int]:
    """(time stride, space stride): the Wan VAE's strides for the same ``temporal_downsample`` / ``dim_mult``."""
    return 2 ** sum(bool(t) for t in cfg.temporal_downsample), 2 ** (len(cfg.dim_mult) - 1)


def cell_dim(cfg: VAEConfig) -> int:
    """Values a latent cell of the lossless codec holds: ``ts * 3 * s^2`` (its ``z_dim``)."""
    ts, ss = strides(cfg)
    return ts * 3 * ss * ss


def abstract_params(cfg: VAEConfig) -> dict:
    """``{}`` for ``pixel``; ``{"mean": [P], "basis": [P, z]}`` (float32) for ``pca``."""
    if cfg.codec == "pixel":
        return {}
    p = cell_dim(cfg)
    return {"mean": jax.ShapeDtypeStruct((p,), jnp.float32), "basis": jax.ShapeDtypeStruct((p, cfg.z_dim), jnp.float32)}


def init_params(cfg: VAEConfig, rng: jax.Array) -> dict:
    """Random params (tests, smoke runs): zero mean and a random orthonormal basis (``pca``); ``{}`` (``pixel``)."""
    if cfg.codec == "pixel":
        return {}
    q, _ = jnp.linalg.qr(jax.random.normal(rng, (cell_dim(cfg), cfg.z_dim), jnp.float32))
    return {"mean": jnp.zeros((cell_dim(cfg),), jnp.float32), "basis": q}


def _video_cells(cfg: VAEConfig, video: np.ndarray) -> np.ndarray:
    """uint8 video ``[T, H, W, 3]`` (trimmed to 1 + ts k frames) -> its lossless cells ``[N, P]`` float64."""
    ts = strides(cfg)[0]
    x = np.asarray(video[None, :1 + (video.shape[0] - 1) // ts * ts], np.float32) / 127.5 - 1.0
    return np.asarray(encode_raw(cfg, x), np.float64).reshape(-1, cell_dim(cfg))


def fit_pca(cfg: VAEConfig, videos: Iterable[np.ndarray], stride: int = 1) -> dict:
    """Closed-form PCA params for ``cfg`` (``codec: pca``) from uint8 videos ``[T, H, W, 3]`` (T = 1 + ts k, or
    trimmed to it): every ``stride``-th cell of their lossless latents; float64 moments, float32 params."""
    p = cell_dim(cfg)
    s1, s2, n = np.zeros(p), np.zeros((p, p)), 0
    for v in videos:
        cells = _video_cells(cfg, v)[::stride]
        s1 += cells.sum(0)
        s2 += cells.T @ cells
        n += cells.shape[0]
    if n < 2:
        raise ValueError("fit_pca: no video cells to fit (pass at least one video)")
    mean = s1 / n
    cov = s2 / n - np.outer(mean, mean)
    w, v = np.linalg.eigh(cov)  # ascending
    basis = v[:, ::-1][:, :cfg.z_dim]
    basis = basis * np.where(basis.sum(0) < 0, -1.0, 1.0)  # a sign convention, so a refit gives the same params
    return {"mean": mean.astype(np.float32), "basis": basis.astype(np.float32)}


def explained_variance(cfg: VAEConfig, params: dict, videos: Iterable[np.ndarray]) -> float:
    """Fraction of the (mean-removed) cell variance of ``videos`` that ``params`` keep."""
    kept = total = 0.0
    for v in videos:
        d = _video_cells(cfg, v) - params["mean"]
        kept += float(np.square(d @ params["basis"]).sum())
        total += float(np.square(d).sum())
    return kept / max(total, 1e-30)


def project(params: dict, cells: Array) -> Array:
    """Lossless cells ``[..., P]`` -> PCA latents ``[..., z]``."""
    return (cells - params["mean"]) @ params["basis"]


def unproject(params: dict, z: Array) -> Array:
    """PCA latents ``[..., z]`` -> cells ``[..., P]``."""
    return z @ params["basis"].T + params["mean"]


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
