"""``python -m memflow_jax.data.encode_latents``: two passes over a tiny storyworld dataset -> LatentSource files
whose statistics normalise the latents, the converted ``vae/`` checkpoint, the printed overrides and clear errors.
"""
from __future__ import annotations

import json
import os

import chex
import jax
import numpy as np
import pytest

from memflow_jax import config as cfg_lib
from memflow_jax.convert.common import load_component, read_converted_meta, save_converted
from memflow_jax.data import LatentSource
from memflow_jax.data import encode_latents as el
from memflow_jax.nn import vae
from memflow_jax.storyworld.dataset import StoryworldSource, write_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_VAE = os.path.join(ROOT, "configs", "tiny_vae.yaml")
N_CLIPS, FRAMES = 5, 5  # 5 frames = 1 + 2k for the tiny VAE's time stride 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("encode_latents")
    data = write_dataset(root / "data", kind="clips", num_examples=N_CLIPS, seed=3, height=16, width=16,
                         num_frames=FRAMES)
    cfg = cfg_lib.load(TINY_VAE)
    params = jax.tree_util.tree_map(np.asarray, vae.init_params(cfg.vae, jax.random.PRNGKey(0)))
    conv = save_converted(str(root / "vae_conv"), {"vae": params}, cfg.to_dict())
    return {"root": root, "data": data, "cfg": cfg, "params": params, "conv": conv}


def test_encode_writes_normalised_latents_stats_and_checkpoint(setup, capsys) -> None:
    out = setup["root"] / "out"
    # batch 2 over 5 clips: the last batch is padded; statistics from every clip
    rc = el.main(["--config", TINY_VAE, "--vae", setup["conv"], "--data", setup["data"], "--out", str(out),
                  "--batch-size", "2", "--stats-from-samples", str(N_CLIPS)])
    assert rc == 0
    printed = capsys.readouterr().out.strip().splitlines()
    cfg, params = setup["cfg"], setup["params"]
    z, (h, w) = cfg.vae.z_dim, cfg.sampler.latent_hw
    f_lat = 1 + (FRAMES - 1) // vae.time_stride(cfg.vae)
    src = LatentSource(str(out / "latents"), shape=(f_lat, z, h, w))
    assert len(src) == N_CLIPS
    videos = StoryworldSource(setup["data"])
    recs = [src[i] for i in range(N_CLIPS)]
    assert [r["prompts"] for r in recs] == [videos[i]["prompts"][0] for i in range(N_CLIPS)]
    assert len(LatentSource.from_manifest(str(out / "latents.jsonl"))) == N_CLIPS
    assert LatentSource(str(out)).files == src.files  # the output folder itself: nothing else looks like a sample
    # the measured statistics normalise the written latents (all clips measured): mean 0, std 1 per channel
    lat = np.stack([r["latents"] for r in recs])  # [N, F, C, h, w]
    np.testing.assert_allclose(lat.mean(axis=(0, 1, 3, 4)), 0.0, atol=1e-4)
    np.testing.assert_allclose(lat.std(axis=(0, 1, 3, 4)), 1.0, atol=1e-4)
    stats = json.loads((out / "vae_stats.json").read_text())
    assert len(stats["latent_mean"]) == len(stats["latent_std"]) == z
    assert stats["num_clips"] == N_CLIPS and stats["latent_shape"] == [f_lat, z, h, w]
    # the printed overrides load into a config whose vae.encode(normalize=True) reproduces the files
    line = printed[-1].split()
    assert [x.split("=")[0] for x in line] == ["vae.latent_mean", "vae.latent_std"]
    cfg2 = cfg_lib.load(TINY_VAE, line)
    np.testing.assert_array_equal(np.float32(cfg2.vae.latent_mean), np.float32(stats["latent_mean"]))
    np.testing.assert_array_equal(np.float32(cfg2.vae.latent_std), np.float32(stats["latent_std"]))
    video = np.stack([videos[i]["video"] for i in range(N_CLIPS)])  # [N, T, H, W, 3] uint8
    x = np.transpose(video, (0, 4, 1, 2, 3)).astype(np.float32) / 127.5 - 1.0
    np.testing.assert_allclose(np.asarray(vae.encode(params, cfg2.vae, x, normalize=True)), lat, rtol=0, atol=1e-5)
    # vae/: the same params, the statistics in its config, readable as the trainer's run.vae_ckpt
    meta = read_converted_meta(str(out / "vae"))
    assert meta["components"] == ["vae"] and "run" not in meta["config"]
    assert meta["config"]["vae"]["latent_mean"] == stats["latent_mean"]
    chex.assert_trees_all_equal(jax.tree_util.tree_map(np.asarray, load_component(
        str(out / "vae"), "vae", vae.abstract_params(cfg2.vae))), params)
    from memflow_jax.training.trainer import load_vae_host

    chex.assert_trees_all_equal(load_vae_host(str(out / "vae"), cfg.vae), params)


def test_global_stats_keep_the_channels_relative_scales(setup, tmp_path, capsys) -> None:
    """--stats global: one mean / std over all channels (length-1 config tuples that broadcast), so the written
    latents are the raw latents shifted and scaled by scalars; vae.encode(normalize=True) still reproduces them."""
    per_channel, glob = tmp_path / "channel", tmp_path / "global"
    base = ["--config", TINY_VAE, "--vae", setup["conv"], "--data", setup["data"], "--stats-from-samples", str(N_CLIPS)]
    assert el.main(base + ["--out", str(per_channel)]) == 0
    assert el.main(base + ["--out", str(glob), "--stats", "global"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1].split()
    cfg = cfg_lib.load(TINY_VAE, line)
    assert len(cfg.vae.latent_mean) == len(cfg.vae.latent_std) == 1
    stats = json.loads((glob / "vae_stats.json").read_text())
    assert stats["stats"] == "global" and len(stats["latent_std"]) == 1
    z = cfg.vae.z_dim
    lat = np.stack([LatentSource(str(glob / "latents"))[i]["latents"] for i in range(N_CLIPS)])  # [N, F, C, h, w]
    np.testing.assert_allclose([lat.mean(), lat.std()], [0.0, 1.0], atol=1e-4)  # over every channel together
    # raw = lat * std + mean; the per-channel files give the same raw latents with their own statistics
    ch = json.loads((per_channel / "vae_stats.json").read_text())
    lat_ch = np.stack([LatentSource(str(per_channel / "latents"))[i]["latents"] for i in range(N_CLIPS)])
    raw_g = lat * stats["latent_std"][0] + stats["latent_mean"][0]
    raw_c = lat_ch * np.float32(ch["latent_std"]).reshape(1, 1, z, 1, 1) + np.float32(ch["latent_mean"]).reshape(
        1, 1, z, 1, 1)
    np.testing.assert_allclose(raw_g, raw_c, rtol=0, atol=1e-4)
    video = np.stack([StoryworldSource(setup["data"])[i]["video"] for i in range(N_CLIPS)])
    x = np.transpose(video, (0, 4, 1, 2, 3)).astype(np.float32) / 127.5 - 1.0
    np.testing.assert_allclose(np.asarray(vae.encode(setup["params"], cfg.vae, x, normalize=True)), lat, rtol=0,
                               atol=1e-5)


def test_segment_windows_add_every_long_enough_segment_with_its_prompt(setup, tmp_path) -> None:
    """--segment-windows over clips + scripts: each clip once (its one segment), then the first FRAMES frames of
    every script segment that long, with that segment's prompt, numbered in --data order."""
    scripts = write_dataset(tmp_path / "scripts", kind="scripts", num_examples=3, seed=1, height=16, width=16,
                            segment_frames=(4, 8))
    out = tmp_path / "win"
    rc = el.main(["--config", TINY_VAE, "--vae", setup["conv"], "--data", setup["data"], "--data", scripts,
                  "--out", str(out), "--frames", str(FRAMES), "--segment-windows", "--stats-from-samples", "4"])
    assert rc == 0
    clips, scr = StoryworldSource(setup["data"]), StoryworldSource(scripts)
    want = [(clips, i, 0, clips[i]["prompts"][0]) for i in range(N_CLIPS)]
    for i in range(len(scr)):
        ex = scr[i]
        ends = list(ex["start_frames"][1:]) + [ex["num_frames"]]
        want += [(scr, i, a, p) for a, b, p in zip(ex["start_frames"], ends, ex["prompts"]) if b - a >= FRAMES]
    assert len(want) > N_CLIPS and any(a > 0 for _, _, a, _ in want)  # the scripts give continuation windows
    src = LatentSource(str(out / "latents"))
    assert len(src) == len(want) and json.loads((out / "vae_stats.json").read_text())["segment_windows"]
    listed = (out / "prompts.txt").read_text().splitlines()  # every item's prompt, shuffled: the ODE / DMD prompts
    assert sorted(listed) == sorted(p for _, _, _, p in want) and listed != [p for _, _, _, p in want]
    cfg2 = setup["cfg"]
    stats = json.loads((out / "vae_stats.json").read_text())
    mean = np.float32(stats["latent_mean"]).reshape(1, 1, -1, 1, 1)
    std = np.float32(stats["latent_std"]).reshape(1, 1, -1, 1, 1)
    for j, (ds, i, a, prompt) in enumerate(want):
        rec = src[j]
        assert rec["prompts"] == prompt
        video = ds[i]["video"][a:a + FRAMES][None]  # [1, T, H, W, 3]
        raw = vae.encode(setup["params"], cfg2.vae, vae.video_to_input(video), normalize=False)
        np.testing.assert_allclose(rec["latents"][None], (np.asarray(raw) - mean) / std, rtol=0, atol=1e-4)
    # windows need --frames, and a length some segment has
    base = ["--config", TINY_VAE, "--vae", setup["conv"], "--data", scripts, "--out", str(tmp_path / "x"),
            "--segment-windows"]
    with pytest.raises(el.EncodeError, match="needs --frames"):
        el.encode_dataset(cfg2, setup["params"], [scripts], str(tmp_path / "x"), windows=True)
    assert el.main(base + ["--frames", "61"]) == 2


def test_encode_errors_name_the_problem(setup, tmp_path, capsys) -> None:
    base = ["--config", TINY_VAE, "--vae", setup["conv"], "--out", str(tmp_path / "out")]
    assert el.main(base + ["--data", setup["data"], "sampler.height=32", "sampler.width=32"]) == 2
    assert "videos are 16x16 px" in capsys.readouterr().err
    assert el.main(base + ["--data", setup["data"], "--frames", "4"]) == 2
    assert "T = 1 + 2k" in capsys.readouterr().err
    assert el.main(base + ["--data", setup["data"], "--frames", "7"]) == 2
    assert "shorter than 7 frames" in capsys.readouterr().err
    uneven = write_dataset(tmp_path / "uneven", kind="scripts", num_examples=3, seed=0, height=16, width=16)
    assert el.main(base + ["--data", uneven]) == 2
    assert "--frames N" in capsys.readouterr().err
    assert el.main(base + ["--data", setup["data"], "vae.dim=4"]) == 2  # architecture of the config != weights
    assert "does not match the model config" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out" / "vae_stats.json")
    with pytest.raises(el.EncodeError, match=r"have 8 frames.*1 \+ 2k.*--frames 7"):
        el.clip_frames(np.array([8, 8]), None, 2)
