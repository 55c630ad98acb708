"""The ``vae`` train recipe and its pieces: the traceable training encode / decode of :mod:`memflow_jax.nn.vae`
(equal to the streaming decode, causal, differentiable), the VAE loss, the teacher's text dropout, a tiny VAE run
through the Trainer on a storyworld dataset (metrics, checkpoint, resume) and ``run.vae_ckpt`` /
:func:`trainer.load_vae_host` from a run folder and a converted folder.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memflow_jax import config as cfg_lib
from memflow_jax.config import ConfigError, VAEConfig
from memflow_jax.convert.common import save_converted
from memflow_jax.nn import vae
from memflow_jax.storyworld.dataset import write_dataset
from memflow_jax.training import losses
from memflow_jax.training import trainer as tr
from tests import rand

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_VAE = os.path.join(ROOT, "configs", "tiny_vae.yaml")

Z = 4
CFG = VAEConfig(dim=8, z_dim=Z, dim_mult=(1, 2), num_res_blocks=1, temporal_downsample=(True,),
                latent_mean=tuple(np.linspace(-0.3, 0.3, Z)), latent_std=tuple(np.linspace(0.5, 2.0, Z)))
TS, SS = vae.time_stride(CFG), vae.space_stride(CFG)  # 2, 2


def _tree_close(a, b, atol: float = 0.0) -> None:
    chex.assert_trees_all_close(jax.tree_util.tree_map(np.asarray, a), jax.tree_util.tree_map(np.asarray, b),
                                atol=atol, rtol=0)


# --------------------------------------------------------------------------------------------------
# Training encode / decode
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def params():
    return vae.init_params(CFG, jax.random.PRNGKey(0))


def test_decode_clip_equals_streaming_decode_and_is_causal(params) -> None:
    b, t_lat, h, w = 2, 3, 3, 4
    lat = rand.normal(jax.random.PRNGKey(1), (b, t_lat, Z, h, w), jnp.float32)
    dec = jax.jit(vae.decode_clip, static_argnums=(1, 3, 4))
    full = dec(params, CFG, lat, True, False)
    chex.assert_shape(full, (b, 1 + TS * (t_lat - 1), 3, SS * h, SS * w))
    stream = vae.decode(params, CFG, lat, clamp=False)  # the streaming decoder, one compiled step per frame
    np.testing.assert_allclose(np.asarray(full), np.asarray(stream), rtol=0, atol=1e-5)
    # raw latents (normalized=False) == their normalised form decoded with the config's statistics
    mean = np.asarray(CFG.latent_mean, np.float32)[:, None, None]
    std = np.asarray(CFG.latent_std, np.float32)[:, None, None]
    raw = np.asarray(lat) * std + mean
    np.testing.assert_allclose(np.asarray(dec(params, CFG, raw, False, True)), np.asarray(full), rtol=0, atol=1e-5)
    # causal: changing the last latent frame changes only its own output frames
    changed = np.asarray(dec(params, CFG, lat.at[:, -1].add(1.0), True, False))
    keep = 1 + TS * (t_lat - 2)
    np.testing.assert_array_equal(changed[:, :keep], np.asarray(full)[:, :keep])
    assert not np.allclose(changed[:, keep:], np.asarray(full)[:, keep:])


def test_encode_moments_mu_is_encode(params) -> None:
    video = rand.uniform(jax.random.PRNGKey(2), (2, 3, 1 + 2 * TS, 8, 8), jnp.float32, -1, 1)
    mu, logvar = vae.encode_moments(params, CFG, video)
    chex.assert_shape([mu, logvar], (2, 3, Z, 8 // SS, 8 // SS))
    np.testing.assert_allclose(np.asarray(mu), np.asarray(vae.encode(params, CFG, video, normalize=False)),
                               rtol=0, atol=1e-6)
    assert not np.allclose(np.asarray(mu), np.asarray(logvar))  # the two halves of conv1's output


def _norm(tree) -> float:
    return float(jnp.sqrt(sum(jnp.sum(jnp.square(jnp.asarray(x))) for x in jax.tree_util.tree_leaves(tree))))


def test_vae_loss_terms() -> None:
    rng = np.random.default_rng(0)
    target = rng.uniform(-1, 1, (2, 5, 3, 4, 4)).astype(np.float32)
    mu = rng.standard_normal((2, 3, Z, 2, 2)).astype(np.float32)
    logvar = rng.standard_normal((2, 3, Z, 2, 2)).astype(np.float32)
    recon = target + 0.1 * rng.standard_normal(target.shape).astype(np.float32)
    loss, aux = losses.vae_loss(target, recon, mu, logvar, kl_weight=0.5)
    d = recon - target
    kl = np.mean(0.5 * (mu ** 2 + np.exp(logvar) - 1 - logvar))
    np.testing.assert_allclose(float(aux["l1"]), np.abs(d).mean(), rtol=1e-5)
    np.testing.assert_allclose(float(aux["mse"]), np.square(d).mean(), rtol=1e-5)
    np.testing.assert_allclose(float(aux["kl"]), kl, rtol=1e-5)
    np.testing.assert_allclose(float(loss), np.abs(d).mean() + np.square(d).mean() + 0.5 * kl, rtol=1e-5)
    per = np.square(np.clip(recon, -1, 1) - target).reshape(2, -1).mean(1)
    np.testing.assert_allclose(float(aux["psnr"]), np.mean(10 * np.log10(4 / per)), rtol=1e-5)
    zero = np.zeros_like(mu)
    assert float(losses.gaussian_kl(zero, zero)) == 0.0  # the prior itself
    z, lv = losses.gaussian_sample(jnp.asarray(mu), jnp.full_like(mu, -1e4), jax.random.key(0))
    assert float(lv.min()) == losses.LOGVAR_RANGE[0]  # clamped
    np.testing.assert_allclose(np.asarray(z), mu, atol=1e-6)  # variance exp(-30): the mean


def test_vae_loss_chroma_weight() -> None:
    """w = 1 + chroma_weight * (max - min) / 2 over RGB weights every pixel's L1 and squared error."""
    rng = np.random.default_rng(1)
    target = rng.uniform(-1, 1, (2, 5, 3, 4, 4)).astype(np.float32)
    target[:, :, :, :2] = target[:, :, :1, :2]  # grey pixels (chroma 0) in the top half
    recon = target + 0.1 * rng.standard_normal(target.shape).astype(np.float32)
    mu = rng.standard_normal((2, 3, Z, 2, 2)).astype(np.float32)
    logvar = rng.standard_normal((2, 3, Z, 2, 2)).astype(np.float32)
    c = (target.max(axis=2, keepdims=True) - target.min(axis=2, keepdims=True)) / 2
    assert c[:, :, :, :2].max() == 0.0 and c.max() > 0.5
    np.testing.assert_allclose(np.asarray(losses.chroma(jnp.asarray(target))), c, rtol=1e-6)
    loss, aux = losses.vae_loss(target, recon, mu, logvar, kl_weight=0.5, chroma_weight=3.0)
    d, w = recon - target, 1 + 3.0 * c
    kl = np.mean(0.5 * (mu ** 2 + np.exp(logvar) - 1 - logvar))
    np.testing.assert_allclose(float(loss), np.mean(w * np.abs(d)) + np.mean(w * d * d) + 0.5 * kl, rtol=1e-5)
    np.testing.assert_allclose(float(aux["l1"]), np.abs(d).mean(), rtol=1e-5)  # reported unweighted
    plain, _ = losses.vae_loss(target, recon, mu, logvar, kl_weight=0.5)
    assert float(loss) > float(plain)
    with pytest.raises(ValueError, match="RGB on axis -3"):
        losses.vae_loss(target[:, :, :2], recon[:, :, :2], mu, logvar, kl_weight=0.5, chroma_weight=1.0)


# --------------------------------------------------------------------------------------------------
# Text dropout (teacher recipe)
# --------------------------------------------------------------------------------------------------


def test_text_dropout_masks_whole_samples() -> None:
    b, length, d = 256, 3, 5
    ctx = rand.normal(jax.random.key(0), (b, length, d))
    uncond = jnp.full((length, d), 7.0)
    out, dropped = losses.text_dropout(ctx, uncond, 0.0, jax.random.key(1))
    assert out is ctx and not bool(dropped.any())
    out, dropped = losses.text_dropout(ctx, jnp.broadcast_to(uncond, ctx.shape), 1.0 - 1e-7, jax.random.key(1))
    assert bool(dropped.all())
    np.testing.assert_array_equal(np.asarray(out), np.broadcast_to(np.asarray(uncond), ctx.shape))
    out, dropped = losses.text_dropout(ctx, uncond, 0.3, jax.random.key(2))
    drop = np.asarray(dropped)
    assert 0.15 < drop.mean() < 0.45  # 256 draws at p = 0.3
    np.testing.assert_array_equal(np.asarray(out)[drop], np.broadcast_to(np.asarray(uncond), (drop.sum(), length, d)))
    np.testing.assert_array_equal(np.asarray(out)[~drop], np.asarray(ctx)[~drop])
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        losses.text_dropout(ctx, uncond, 1.0, jax.random.key(0))


def test_text_dropout_and_vae_config_validation() -> None:
    teacher = os.path.join(ROOT, "configs", "tiny_teacher.yaml")
    assert cfg_lib.load(teacher, ["train.text_dropout=0.1"]).train.text_dropout == 0.1
    assert cfg_lib.load(teacher).train.text_dropout == 0.0
    with pytest.raises(ConfigError, match="text_dropout"):
        cfg_lib.load(teacher, ["train.text_dropout=1.0"])
    with pytest.raises(ConfigError, match="recipe=teacher / teacher_story only"):
        cfg_lib.load(teacher, ["train.text_dropout=0.1", "train.recipe=ode_init"])
    with pytest.raises(ConfigError, match="lora_enabled=false"):
        cfg_lib.load(TINY_VAE, ["train.lora_enabled=true"])
    cfg = cfg_lib.load(TINY_VAE)
    assert cfg.train.recipe == "vae" and cfg.train.vae_kl_weight == 1e-6


# --------------------------------------------------------------------------------------------------
# The vae recipe through the Trainer
# --------------------------------------------------------------------------------------------------

STEPS = 24


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    """A tiny VAE trained STEPS steps (checkpoints at STEPS/2 and STEPS) on a 16x16 storyworld dataset."""
    root = tmp_path_factory.mktemp("vae_recipe")
    data = write_dataset(root / "data", kind="clips", num_examples=6, seed=0, height=16, width=16, num_frames=7)
    cfg = cfg_lib.load(TINY_VAE, [f"train.video_data_path={data}", "run.progress=false", "run.tensorboard=false",
                                  f"train.max_iters={STEPS}", f"train.save_interval={STEPS // 2}",
                                  "train.ema_start_step=2", "train.batch_size=2"])
    run = str(root / "run")
    trainer = tr.Trainer(cfg, run, log=lambda m: None)
    try:
        init = jax.tree_util.tree_map(np.asarray, trainer.gen.params)
        history = trainer.train()
        final = {"init": init, "params": jax.tree_util.tree_map(np.asarray, trainer.gen.params),
                 "ema": jax.tree_util.tree_map(np.asarray, trainer.ema),
                 "opt": jax.tree_util.tree_map(np.asarray, trainer.gen.opt_state)}
    finally:
        trainer.close()
    return {"cfg": cfg, "run": run, "root": root, "data": data, "history": history, **final}


def _windows(data: str, frames: int) -> np.ndarray:
    """Every ``frames``-frame window of the dataset as the VAE's input [N, 3, T, H, W] in [-1, 1]."""
    src = tr.VideoClipSource(data, frames)
    video = np.stack([src[i]["video"] for i in range(len(src))])  # [N, T, H, W, 3] uint8
    return np.transpose(video, (0, 4, 1, 2, 3)).astype(np.float32) / 127.5 - 1.0


def test_vae_recipe_trains_logs_and_checkpoints(vae_run) -> None:
    hist = vae_run["history"]
    assert [h["step"] for h in hist] == list(range(1, STEPS + 1))
    for key in ("vae_loss", "l1", "mse", "kl", "psnr", "vae_grad_norm"):
        assert all(np.isfinite(h[key]) for h in hist), key
    # every part of the VAE was updated
    moved = {k: _norm(jax.tree_util.tree_map(lambda a, b: a - b, vae_run["params"][k], v))
             for k, v in vae_run["init"].items()}
    assert set(moved) == {"encoder", "conv1", "conv2", "decoder"} and min(moved.values()) > 0, moved
    # the deterministic reconstruction (decode(mu)) of every training window got better
    cfg = vae_run["cfg"]
    x = jnp.asarray(_windows(vae_run["data"], cfg.train.vae_clip_frames))

    @jax.jit
    def l1(p):
        mu, _ = vae.encode_moments(p, cfg.vae, x)
        return jnp.mean(jnp.abs(vae.decode_clip(p, cfg.vae, mu, normalized=False) - jnp.swapaxes(x, 1, 2)))

    before, after = float(l1(vae_run["init"])), float(l1(vae_run["params"]))
    assert after < 0.95 * before, (before, after)
    run = vae_run["run"]
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == [str(STEPS // 2), str(STEPS)]
    items = set(os.listdir(os.path.join(run, "checkpoints", str(STEPS))))
    assert {"vae", "vae_opt", "ema", "rng"} <= items and "generator" not in items
    recs = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    # EMA (start step 2): blended after step 2, so it differs from the params
    assert _norm(jax.tree_util.tree_map(lambda a, b: a - b, vae_run["ema"], vae_run["params"])) > 0


def test_vae_recipe_resumes_from_its_checkpoint(vae_run) -> None:
    trainer = tr.Trainer(vae_run["cfg"], vae_run["run"], log=lambda m: None)
    try:
        assert trainer.step == STEPS
        _tree_close(trainer.gen.params, vae_run["params"])
        _tree_close(trainer.ema, vae_run["ema"])
        _tree_close(trainer.gen.opt_state, vae_run["opt"])
    finally:
        trainer.close()


def test_vae_recipe_rejects_bad_clip_length_and_resolution(vae_run, tmp_path) -> None:
    base = [f"train.video_data_path={vae_run['data']}", "run.progress=false", "run.tensorboard=false"]
    with pytest.raises(ConfigError, match=r"vae_clip_frames=4 is not 1 \+ 2k.*use 3 or 5"):
        tr.Trainer(cfg_lib.load(TINY_VAE, base + ["train.vae_clip_frames=4"]), str(tmp_path / "a"))
    with pytest.raises(ConfigError, match="16x16 px.*32x32"):
        tr.Trainer(cfg_lib.load(TINY_VAE, base + ["sampler.height=32", "sampler.width=32"]), str(tmp_path / "b"))


def test_vae_ckpt_from_run_dir_and_converted_dir_are_identical(vae_run, tmp_path, monkeypatch) -> None:
    vcfg = vae_run["cfg"].vae
    from_run = tr.load_vae_host(vae_run["run"], vcfg)
    _tree_close(from_run, vae_run["ema"])  # EMA params when the run saved them
    _tree_close(tr.load_vae_host(os.path.join(vae_run["run"], "checkpoints"), vcfg), from_run)
    with monkeypatch.context() as m:  # a path relative to the working directory (Orbax wants absolute ones)
        m.chdir(os.path.dirname(vae_run["run"]))
        _tree_close(tr.load_vae_host(os.path.basename(vae_run["run"]), vcfg), from_run)
    conv = save_converted(str(tmp_path / "conv"), {"vae": from_run}, vae_run["cfg"].to_dict())
    _tree_close(tr.load_vae_host(conv, vcfg), from_run)
    # run.vae_ckpt initialises the vae recipe from either
    cfg = cfg_lib.load(TINY_VAE, [f"train.video_data_path={vae_run['data']}", "run.progress=false",
                                  "run.tensorboard=false", f"run.vae_ckpt={conv}"])
    trainer = tr.Trainer(cfg, str(tmp_path / "from_conv"), log=lambda m: None)
    try:
        _tree_close(trainer.gen.params, from_run)
    finally:
        trainer.close()
    wrong = VAEConfig(dim=4, z_dim=Z, dim_mult=(1, 2), num_res_blocks=1, temporal_downsample=(True,),
                      latent_mean=(0.0,) * Z, latent_std=(1.0,) * Z)
    with pytest.raises(ValueError, match="does not match the model config"):
        tr.load_vae_host(vae_run["run"], wrong)
    with pytest.raises(FileNotFoundError, match="neither a converted checkpoint"):
        tr.load_vae_host(str(tmp_path), vcfg)


@pytest.mark.slow
def test_resumed_run_with_worker_processes_exits_cleanly(vae_run, tmp_path) -> None:
    """train.py with grain worker processes, resumed to a later step: no traceback at exit (Trainer.close stops
    the restored iterator's workers before the interpreter's finalizers close their queues)."""
    args = [sys.executable, os.path.join(ROOT, "train.py"), "--config", TINY_VAE, "--run-dir", str(tmp_path / "run"),
            f"train.video_data_path={vae_run['data']}", "train.save_interval=2", "train.batch_size=2",
            "train.data_workers=2", "run.tensorboard=false", "run.progress=false"]
    for steps in (2, 4):
        r = subprocess.run(args + [f"train.max_iters={steps}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "resumed from" in r.stdout + r.stderr
