"""The pixel codec (``vae.codec=pixel``): lossless, streamable, parameter-free, behind the VAE's functions."""
from __future__ import annotations

import dataclasses
import json
import os

import chex
import jax
import numpy as np
import pytest

from memflow_jax import config as config_lib
from memflow_jax.config import ConfigError, VAEConfig
from memflow_jax.convert.common import ConversionError, load_component, save_converted
from memflow_jax.nn import pixel_codec, vae
from memflow_jax.training.trainer import checkpoint_latent_stats, load_vae_host

Z = 4 * 3 * 4 * 4  # time stride 4, 3 colours, space stride 4
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cfg(**kw) -> VAEConfig:
    rng = np.random.default_rng(0)
    base = dict(codec="pixel", z_dim=Z, dim_mult=(1, 2, 2), temporal_downsample=(True, True),
                latent_mean=tuple(rng.uniform(-0.5, 0.5, Z).tolist()), latent_std=tuple(rng.uniform(0.5, 2, Z).tolist()))
    base.update(kw)
    return VAEConfig(**base)


def _video(t: int = 13, h: int = 16, w: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (2, t, h, w, 3), dtype=np.uint8)  # [B, T, H, W, 3]


def test_round_trip_is_exact_and_streams():
    cfg = _cfg()
    video = _video()
    x = vae.video_to_input(video)  # [B, 3, T, H, W] in [-1, 1]
    z = vae.encode({}, cfg, x)  # normalised latents
    chex.assert_shape(z, (2, 4, Z, 4, 6))
    want = np.transpose(np.asarray(x), (0, 2, 1, 3, 4))  # [B, T, 3, H, W]
    np.testing.assert_allclose(np.asarray(vae.decode({}, cfg, z, clamp=False)), want, atol=2e-6)
    np.testing.assert_allclose(np.asarray(vae.decode_clip({}, cfg, z)), want, atol=2e-6)
    # streamed: a first chunk of 2 latent frames, then one of 2 (whole-chunk call) -> 5 + 8 frames
    cache = vae.init_decode_cache(cfg, 2, 4, 6)
    a, cache = vae.decode_chunk_jit({}, cfg, z[:, :2], cache, clamp=False)
    b, cache = vae.decode_chunk_jit({}, cfg, z[:, 2:], cache, clamp=False)
    chex.assert_shape((a, b), [(2, 5, 3, 16, 24), (2, 8, 3, 16, 24)])
    np.testing.assert_allclose(np.concatenate([a, b], axis=1), want, atol=2e-6)
    assert int(cache.num_latents) == 4
    # raw latents are the pixels themselves: latent frame 1 = video frames 1..4, space-to-depth
    raw = np.asarray(vae.encode({}, cfg, x, normalize=False))  # [B, T', z, h, w]
    np.testing.assert_array_equal(raw[0, 1, :3, 0, 0], np.asarray(x)[0, :, 1, 0, 0])


def test_first_latent_frame_decodes_to_the_mean_of_its_slots():
    cfg = _cfg(latent_mean=(0.0,), latent_std=(1.0,))  # one value for every channel
    z = np.random.default_rng(1).normal(size=(1, 1, Z, 2, 2)).astype(np.float32)
    y = np.asarray(vae.decode({}, cfg, z, clamp=False))  # [1, 1, 3, 8, 8]
    frames = np.asarray(pixel_codec.decode_raw(cfg, np.transpose(z, (0, 1, 3, 4, 2))))  # [1, 4, 8, 8, 3]
    np.testing.assert_allclose(y[0, 0], np.transpose(frames[0].mean(axis=0), (2, 0, 1)), atol=1e-6)


def test_parameter_free_everywhere(tmp_path):
    cfg = _cfg()
    assert vae.abstract_params(cfg) == {} and vae.init_params(cfg, jax.random.PRNGKey(0)) == {}
    assert load_vae_host("", cfg) == {}  # no weights to read
    save_converted(str(tmp_path / "ck"), {"vae": {}}, {"vae": dataclasses.asdict(cfg)})
    assert load_component(str(tmp_path / "ck"), "vae", vae.abstract_params(cfg)) == {}
    wan = VAEConfig(dim=8, z_dim=4, dim_mult=(1, 2), temporal_downsample=(True,), latent_mean=(0.0,) * 4,
                    latent_std=(1.0,) * 4)
    with pytest.raises(ConversionError, match="without parameters"):
        load_component(str(tmp_path / "ck"), "vae", vae.abstract_params(wan))
    with pytest.raises(ValueError, match="no posterior"):
        vae.encode_moments({}, cfg, vae.video_to_input(_video(5)))


def test_config_errors_name_the_fix():
    with pytest.raises(ConfigError, match=f"vae.z_dim={Z}"):
        _cfg(z_dim=16, latent_mean=(0.0,), latent_std=(1.0,)).validate()
    with pytest.raises(ConfigError, match="vae.codec"):
        _cfg(codec="png").validate()
    with pytest.raises(ConfigError, match="z_dim=192 values each"):
        _cfg(latent_mean=(0.0, 1.0)).validate()
    cfg = config_lib.load(None, ["vae.codec=pixel", "vae.z_dim=192", "vae.dim_mult=[1,2,2]",
                                 "vae.temporal_downsample=[true,true]", "vae.latent_mean=[0]", "vae.latent_std=[1]"])
    assert cfg.vae.codec == "pixel" and pixel_codec.cell_dim(cfg.vae) == 192


def test_checkpoint_latent_stats(tmp_path):
    cfg = _cfg(latent_mean=(0.0,), latent_std=(1.0,))
    mean, std = [0.1] * Z, [2.0] * Z
    os.makedirs(tmp_path / "vae")
    with open(tmp_path / "vae" / "config.json", "w") as f:
        json.dump({"config": {}, "components": ["vae"], "latent_stats": {"latent_mean": mean, "latent_std": std}}, f)
    got = checkpoint_latent_stats(str(tmp_path / "vae"), cfg)
    assert got.latent_mean == tuple(mean) and got.latent_std == tuple(std)
    assert checkpoint_latent_stats(str(tmp_path / "missing"), cfg) is cfg  # a .pth / absent path: unchanged
    with pytest.raises(ConfigError, match="another VAE config"):
        checkpoint_latent_stats(str(tmp_path / "vae"), dataclasses.replace(
            cfg, codec="wan", z_dim=8, latent_mean=(0.0,), latent_std=(1.0,)))
    with open(tmp_path / "vae" / "config.json", "w") as f:  # encode_latents --stats global: one pair for every channel
        json.dump({"config": {}, "components": ["vae"], "latent_stats": {"latent_mean": [0.1], "latent_std": [2.0]}}, f)
    got = checkpoint_latent_stats(str(tmp_path / "vae"), cfg)
    assert got.latent_mean == (0.1,) and got.latent_std == (2.0,)


def _pca_cfg(z: int = 8, **kw) -> VAEConfig:
    return _cfg(codec="pca", z_dim=z, latent_mean=(0.0,), latent_std=(1.0,), **kw)


def test_pca_fit_recovers_a_low_rank_world_and_decodes_it_exactly():
    """Videos whose 48-value frame cells live in a 6-dim affine subspace and hold still within each latent frame
    (so the first latent frame, frame 0 repeated, is in it too): a 6-component PCA reconstructs them."""
    rng = np.random.default_rng(0)
    lossless = _cfg(latent_mean=(0.0,), latent_std=(1.0,))
    mean, basis = rng.uniform(-0.3, 0.3, Z // 4), np.linalg.qr(rng.normal(size=(Z // 4, 6)))[0]

    def video(seed):  # per-frame cells = mean + basis @ c, the same in the 4 slots of a latent frame
        c = np.random.default_rng(seed).uniform(-0.2, 0.2, (1, 4, 4, 6, 6))
        cells = np.tile(mean + c @ basis.T, 4).astype(np.float32)  # [1, 4, 4, 6, 192]
        frames = np.asarray(pixel_codec.decode_raw(lossless, cells))[0]  # [16, 16, 24, 3]
        return np.concatenate([frames[:1], frames[4:]])  # 13 frames = 1 + 4 * 3

    cfg = _pca_cfg(6)
    videos = [video(s) for s in range(3)]
    params = pixel_codec.fit_pca(cfg, [((v + 1) * 127.5) for v in videos])  # float "uint8" scale: exact pixels
    chex.assert_shape((params["mean"], params["basis"]), [(Z,), (Z, 6)])
    np.testing.assert_allclose(params["basis"].T @ params["basis"], np.eye(6), atol=1e-5)
    assert pixel_codec.explained_variance(cfg, params, [((v + 1) * 127.5) for v in videos]) > 1 - 1e-6
    x = np.transpose(videos[1], (3, 0, 1, 2))[None]  # [1, 3, T, H, W]
    z = vae.encode(params, cfg, x)  # normalised = raw (mean 0, std 1)
    chex.assert_shape(z, (1, 4, 6, 4, 6))
    got = np.asarray(vae.decode(params, cfg, z, clamp=False))[0]  # [T, 3, H, W]
    np.testing.assert_allclose(got, np.transpose(videos[1], (0, 3, 1, 2)), atol=1e-4)
    cache = vae.init_decode_cache(cfg, 1, 4, 6)
    a, cache = vae.decode_chunk_jit(params, cfg, z[:, :1], cache, clamp=False)
    b, cache = vae.decode_chunk_jit(params, cfg, z[:, 1:], cache, clamp=False)
    np.testing.assert_allclose(np.concatenate([a, b], axis=1)[0], got, atol=1e-5)


def test_pca_params_shapes_checkpoint_and_errors(tmp_path):
    cfg = _pca_cfg(8)
    abstract = vae.abstract_params(cfg)
    assert {k: v.shape for k, v in abstract.items()} == {"mean": (Z,), "basis": (Z, 8)}
    params = vae.init_params(cfg, jax.random.PRNGKey(0))
    np.testing.assert_allclose(np.asarray(params["basis"]).T @ np.asarray(params["basis"]), np.eye(8), atol=1e-5)
    save_converted(str(tmp_path / "ck"), {"vae": params}, {"vae": dataclasses.asdict(cfg)})
    got = load_vae_host(str(tmp_path / "ck"), cfg)
    np.testing.assert_array_equal(got["basis"], np.asarray(params["basis"]))
    (tmp_path / "x.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="Wan VAE state dict"):
        load_vae_host(str(tmp_path / "x.pth"), cfg)
    with pytest.raises(ConfigError, match="1..192 principal components"):
        _pca_cfg(200).validate()
    with pytest.raises(ValueError, match="no posterior"):
        vae.encode_moments(params, cfg, vae.video_to_input(_video(5)))


def test_pca_codec_cli_fits_and_encode_latents_reads_it(tmp_path):
    from memflow_jax.data import encode_latents
    from memflow_jax.storyworld import export, pca_codec

    data = str(tmp_path / "clips")
    assert export.main(["--out", data, "--kind", "clips", "--num", "6", "--seed", "0", "--clip-frames", "9",
                        "--height", "32", "--width", "32"]) == 0
    arch = ["vae.codec=pca", "vae.z_dim=16", "vae.dim_mult=[1,2,2]", "vae.temporal_downsample=[true,true]",
            "vae.latent_mean=[0]", "vae.latent_std=[1]", "sampler.height=32", "sampler.width=32"]
    assert pca_codec.main(["--config", os.path.join(ROOT, "configs", "storyworld.yaml"), "--data", data,
                           "--out", str(tmp_path / "pca"), "--num-videos", "6", *arch]) == 0
    assert encode_latents.main(["--config", os.path.join(ROOT, "configs", "storyworld.yaml"), "--vae",
                                str(tmp_path / "pca"), "--data", data, "--out", str(tmp_path / "lat"),
                                "--dtype", "float16", "--workers", "1", *arch]) == 0
    with open(tmp_path / "lat" / "vae_stats.json") as f:
        stats = json.load(f)
    assert stats["latent_shape"] == [3, 16, 8, 8] and len(stats["latent_std"]) == 16
    assert pca_codec.main(["--config", os.path.join(ROOT, "configs", "storyworld.yaml"), "--data", data,
                           "--out", str(tmp_path / "bad")]) == 2  # the config's codec is wan: a clear error
