"""sample.py end to end on the embedded tiny config: prompts -> UMT5 -> DiT (NAM+SMA) -> VAE -> mp4."""
from __future__ import annotations

import json
import os

import imageio.v3 as iio
import jax
import numpy as np

import sample
from memflow_jax import config as config_lib
from memflow_jax.convert.common import save_converted
from memflow_jax.nn import dit, t5 as t5_nn, vae as vae_nn
from memflow_jax.pipeline import TINY_TOKENIZER


def test_random_weight_run_writes_a_playable_mp4(tmp_path, capsys):
    out = tmp_path / "v.mp4"
    assert sample.main(["--ckpt", "none", "--out", str(out), "--save-latents"]) == 0
    log = capsys.readouterr().out
    assert "RANDOM weights" in log
    cfg = config_lib.load(sample.DEFAULT_CONFIG)
    frames = iio.imread(str(out))
    t = cfg.sampler.num_output_frames
    assert frames.shape == (1 + 4 * (t - 1), cfg.sampler.height, cfg.sampler.width, 3)
    lat = np.load(str(out).replace(".mp4", ".latents.npy"))
    assert lat.shape == (1, t, cfg.model.in_dim, cfg.sampler.height // 8, cfg.sampler.width // 8)
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_ckpt_dir_and_timeline(tmp_path, capsys):
    cfg = config_lib.load(sample.DEFAULT_CONFIG, ["sampler.num_output_frames=6"])
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    comps = {"dit": dit.init_params(cfg.model, k[0]), "t5": t5_nn.init_params(cfg.text, k[1]),
             "vae": vae_nn.init_params(cfg.vae, k[2])}
    ck = str(tmp_path / "ck")
    save_converted(ck, comps, cfg.to_dict(), copy_dirs={"tokenizer": TINY_TOKENIZER})
    tl = tmp_path / "t.jsonl"
    tl.write_text(json.dumps({"prompt": "a blue circle"}) + "\n" + json.dumps({"prompt": "a red square",
                                                                               "start_frame": 3}) + "\n")
    out = tmp_path / "o.mp4"
    assert sample.main(["--ckpt", ck, "--prompts", str(tl), "--out", str(out), "--no-vae", "--text-device", "cpu",
                        "--offload-text-encoder"]) == 0
    assert np.load(str(out).replace(".mp4", ".latents.npy")).shape[1] == 6
    assert "RANDOM" not in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "start": 0}\n{"prompt": "b", "start_frame": 4}\n{"prompt": "c", "start_frame": 1}\n')
    assert sample.main(["--ckpt", ck, "--prompts", str(bad), "--out", str(out)]) == 2
    assert "not after" in capsys.readouterr().err
    assert sample.main(["--ckpt", ck, "--out", str(out), "model.bogus=1"]) == 2
