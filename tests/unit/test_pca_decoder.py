"""``vae.pca_decoder``: the fitted PCA encodes, a Wan-architecture decoder decodes; its ``vae`` recipe trains the
decoder only (the PCA stays bit-exact), from latents with added noise (``train.vae_latent_noise``)."""
from __future__ import annotations

import dataclasses
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memflow_jax import config as cfg_lib
from memflow_jax.config import ConfigError, VAEConfig
from memflow_jax.nn import pixel_codec, vae
from memflow_jax.storyworld import pca_codec
from memflow_jax.storyworld.dataset import write_dataset
from memflow_jax.training import losses
from memflow_jax.training import trainer as tr

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_VAE = os.path.join(ROOT, "configs", "tiny_vae.yaml")
Z = 6  # of the 2 x 3 x 2 x 2 = 24 values a latent cell of the tiny strides holds
ARCH = ["vae.codec=pca", f"vae.z_dim={Z}", "vae.pca_decoder=true", "vae.latent_mean=[0]", "vae.latent_std=[1]"]
CFG = VAEConfig(codec="pca", pca_decoder=True, dim=8, z_dim=Z, dim_mult=(1, 2), num_res_blocks=1,
                temporal_downsample=(True,), latent_mean=(0.1,), latent_std=(1.5,))


def test_params_encode_and_streaming_decode():
    abstract = vae.abstract_params(CFG)
    assert set(abstract) == {"mean", "basis", "conv2", "decoder"}  # no encoder network
    params = vae.init_params(CFG, jax.random.PRNGKey(0))
    chex.assert_trees_all_equal_shapes(params, abstract)
    video = np.random.default_rng(0).integers(0, 256, (2, 9, 8, 12, 3), dtype=np.uint8)
    x = vae.video_to_input(video)  # [B, 3, T, H, W]
    plain = dataclasses.replace(CFG, pca_decoder=False)
    pca_only = {k: params[k] for k in vae.PCA_KEYS}
    z = vae.encode(params, CFG, x)  # [B, T', z, h, w]
    chex.assert_shape(z, (2, 5, Z, 4, 6))
    np.testing.assert_array_equal(np.asarray(z), np.asarray(vae.encode(pca_only, plain, x)))  # the PCA encodes
    whole = np.asarray(vae.decode_clip(params, CFG, z))  # [B, T, 3, H, W]
    chex.assert_shape(whole, (2, 9, 3, 8, 12))
    cache = vae.init_decode_cache(CFG, 2, 4, 6)
    assert cache.feats  # the decoder's causal cache (the plain PCA decodes without one)
    a, cache = vae.decode_chunk_jit(params, CFG, z[:, :3], cache, clamp=False)
    b, cache = vae.decode_chunk_jit(params, CFG, z[:, 3:], cache, clamp=False)
    np.testing.assert_allclose(np.concatenate([a, b], axis=1), whole, atol=2e-5)
    # the decoder, not the basis, makes the pixels
    assert not np.allclose(whole, np.asarray(vae.decode_clip(pca_only, plain, z)), atol=1e-2)


def test_config_errors_name_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="set vae.codec=pca or drop vae.pca_decoder"):
        VAEConfig(pca_decoder=True).validate()
    with pytest.raises(ConfigError, match="vae_latent_noise=-0.1 must be >= 0"):
        cfg_lib.load(TINY_VAE, ["train.vae_latent_noise=-0.1"])
    data = write_dataset(tmp_path / "data", kind="clips", num_examples=2, seed=0, height=16, width=16, num_frames=5)
    plain = [a for a in ARCH if "pca_decoder" not in a]
    with pytest.raises(ConfigError, match="no network to train.*vae.pca_decoder=true"):
        tr.Trainer(cfg_lib.load(TINY_VAE, plain + [f"train.video_data_path={data}"]), str(tmp_path / "run"))


def test_latent_noise_scales_with_the_batch_std():
    z = jax.random.normal(jax.random.PRNGKey(0), (64, 3, 4, 5, 5)) * 3.0 + 1.0
    np.testing.assert_array_equal(np.asarray(losses.latent_noise(z, 0.0, jax.random.PRNGKey(1))), np.asarray(z))
    noisy = np.asarray(losses.latent_noise(z, 0.5, jax.random.PRNGKey(1)))
    rel = (noisy - np.asarray(z)).reshape(64, -1).std(axis=1) / float(jnp.std(z))  # per-sample sigma
    assert rel.max() < 0.55 and rel.min() < 0.1 and 0.15 < rel.mean() < 0.35  # U(0, 0.5): mean 0.25


def test_pca_codec_then_decoder_recipe_trains_the_decoder_only(tmp_path):
    data = str(write_dataset(tmp_path / "data", kind="clips", num_examples=6, seed=0, height=16, width=16,
                             num_frames=7))
    assert pca_codec.main(["--config", TINY_VAE, "--data", data, "--out", str(tmp_path / "pca"),
                           "--num-videos", "6", "--cell-stride", "1", *ARCH]) == 0
    cfg = cfg_lib.load(TINY_VAE, ARCH + [f"train.video_data_path={data}", f"run.vae_ckpt={tmp_path / 'pca'}",
                                         "run.progress=false", "run.tensorboard=false", "train.max_iters=6",
                                         "train.save_interval=6", "train.ema_start_step=2", "train.batch_size=2",
                                         "train.vae_latent_noise=0.5", "train.weight_decay=0.1"])
    init = tr.load_vae_host(str(tmp_path / "pca"), cfg.vae)
    fit = pixel_codec.fit_pca(cfg.vae, _videos(data), stride=1)
    np.testing.assert_allclose(init["basis"], fit["basis"], atol=1e-6)  # the fit, beside a fresh decoder
    trainer = tr.Trainer(cfg, str(tmp_path / "run"), log=lambda m: None)
    try:
        hist = trainer.train()
        params = jax.tree_util.tree_map(np.asarray, trainer.gen.params)
        ema = jax.tree_util.tree_map(np.asarray, trainer.ema)
    finally:
        trainer.close()
    assert [h["step"] for h in hist] == list(range(1, 7))
    assert all(np.isfinite(h["vae_loss"]) and h["kl"] == 0.0 for h in hist)
    for k in vae.PCA_KEYS:  # frozen despite weight decay, in the params and in the EMA
        np.testing.assert_array_equal(params[k], init[k])
        np.testing.assert_array_equal(ema[k], init[k])
    moved = [float(np.abs(a - b).max()) for a, b in zip(jax.tree_util.tree_leaves(params["decoder"]),
                                                         jax.tree_util.tree_leaves(init["decoder"]))]
    assert min(moved) > 0
    # the run folder is a run.vae_ckpt / --vae for the next stages (latents, package), EMA params first
    got = tr.load_vae_host(str(tmp_path / "run"), cfg.vae)
    chex.assert_trees_all_close(got, ema)
    from memflow_jax.data import encode_latents

    assert encode_latents.main(["--config", TINY_VAE, "--vae", str(tmp_path / "run"), "--data", data, "--out",
                                str(tmp_path / "lat"), "--stats", "global", "--workers", "1", *ARCH]) == 0
    packed = tr.load_vae_host(str(tmp_path / "lat" / "vae"), cfg.vae)  # the package's VAE: PCA + trained decoder
    chex.assert_trees_all_close(packed, ema)
    _check_swapped_decoder(tmp_path, ema)


def _check_swapped_decoder(tmp_path, ema):
    """storyworld.package --decoder-run: the run's EMA weights with --vae's measured statistics, the frozen PCA
    checked equal; a --vae without measured statistics, another PCA or an unfrozen run is refused by name."""
    import json

    from memflow_jax.convert.common import read_converted_meta, save_converted
    from memflow_jax.storyworld import package as pkg

    lat, run = str(tmp_path / "lat" / "vae"), str(tmp_path / "run")
    section, params, _ = pkg.swapped_decoder(lat, run)
    chex.assert_trees_all_close(params, ema)
    measured = read_converted_meta(lat)["latent_stats"]
    assert section["pca_decoder"] and [section["latent_mean"], section["latent_std"]] == [
        measured["latent_mean"], measured["latent_std"]]
    with pytest.raises(ValueError, match="no measured latent statistics"):
        pkg.swapped_decoder(str(tmp_path / "pca"), run)  # the PCA fit's placeholder 0 / 1
    meta = read_converted_meta(lat)
    other = dict(params, basis=params["basis"] + 1e-3)
    save_converted(str(tmp_path / "other"), {"vae": other}, meta["config"],
                   extra_meta={"latent_stats": measured})
    with pytest.raises(ValueError, match="frozen 'basis' params differ"):
        pkg.swapped_decoder(str(tmp_path / "other"), run)
    unfrozen = tmp_path / "unfrozen"
    unfrozen.mkdir()
    with open(os.path.join(run, "config.json")) as f:
        run_cfg = json.load(f)
    run_cfg["vae"]["pca_decoder"] = False
    (unfrozen / "config.json").write_text(json.dumps(run_cfg))
    with pytest.raises(ValueError, match="trained its encoder too"):
        pkg.swapped_decoder(lat, str(unfrozen))


def _videos(data: str):
    from memflow_jax.storyworld.dataset import StoryworldSource

    src = StoryworldSource(data)
    for i in range(len(src)):
        yield src[i]["video"]
