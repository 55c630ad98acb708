"""benchmarks/storyworld_teacher_check.py: a teacher's held-out clips through its codec, on tiny random weights."""
from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest

from benchmarks import storyworld_eval as E
from benchmarks import storyworld_teacher_check as T
from memflow_jax import config as config_lib
from memflow_jax.convert.common import save_converted
from memflow_jax.nn import dit, t5 as t5_nn
from memflow_jax.pipeline import TINY_TOKENIZER

# the lossless pixel codec (no params): its ground-truth row must equal the ground truth's
PIXEL = ["vae.codec=pixel", "vae.z_dim=192", "vae.dim_mult=[1,2,2]", "vae.temporal_downsample=[true,true]",
         "vae.latent_mean=[0]", "vae.latent_std=[1]", "model.in_dim=192", "model.out_dim=192",
         "sampler.vae_stride=[4,4,4]"]


@pytest.fixture(scope="module")
def stage_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher_check")
    cfg = config_lib.load(E.TINY_CONFIG, list(E.TINY_OVERRIDES) + PIXEL)
    d = cfg.to_dict()
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    teacher = save_converted(str(root / "teacher"), {"dit": dit.init_params(cfg.model, k1)},
                             {k: d[k] for k in ("model", "sampler", "vae")})
    shutil.copytree(TINY_TOKENIZER, root / "tok")
    text = save_converted(str(root / "text"), {"t5": t5_nn.init_params(cfg.text, k2)}, {"text": d["text"]},
                          copy_dirs={"tokenizer": str(root / "tok")})
    vae = save_converted(str(root / "vae"), {"vae": {}}, {"vae": d["vae"]})  # parameter-free: config only
    return root, teacher, text, vae


def test_scores_held_out_clips_and_extra_prompts(stage_dirs):
    root, teacher, text, vae = stage_dirs
    (root / "extra.txt").write_text("the small red square moves left\n\nthe background turns black\n")
    out, png = root / "check.json", root / "check.png"
    assert T.main(["--teacher", teacher, "--text", text, "--vae", vae, "--num-clips", "2", "--seeds", "0,1",
                   "--steps", "3", "--prompts", str(root / "extra.txt"), "--json", str(out), "--png", str(png)]) == 0
    rep = json.loads(out.read_text())
    assert len(rep["runs"]) == 4 and len(rep["extra_prompts"]) == 4  # 2 clips / 2 prompts x 2 seeds
    assert {r["clip"] for r in rep["runs"]} == {0, 1} and png.exists()
    for k, _ in T.COLUMNS:
        assert np.isfinite(rep["summary"][k]) and len(rep["per_seed"][k]) == 2
        assert rep["summary"][k] == pytest.approx(np.mean(rep["per_seed"][k]))
    assert 0.0 <= rep["summary"]["adherence"] <= 1.0
    for k in ("adherence", "smoothness"):  # lossless codec: its ceiling is the ground truth (uint8 rounding aside)
        assert rep["ground_truth_through_codec"][k] == pytest.approx(rep["ground_truth"][k], abs=2 / 255)
    # the held-out clips are deterministic and come from the evaluation split, not a training stream
    p0, v0, _ = T.held_out_clip(0, split_seed=0, num_frames=33, height=64, width=64, fps=16)
    p1, v1, _ = T.held_out_clip(0, split_seed=0, num_frames=33, height=64, width=64, fps=16)
    assert p0 == p1 and v0.shape == (33, 64, 64, 3) and np.array_equal(v0, v1)
    assert rep["runs"][0]["prompt"] == p0


def test_scores_held_out_stories_whole(stage_dirs):
    """``--stories``: held-out stories solved whole, a prompt per latent frame, scored with re-appearance; with the
    lossless codec the ground truth's row is the ground truth's own (a measurable return in every story)."""
    root, teacher, text, vae = stage_dirs
    out, png = root / "stories.json", root / "stories.png"
    assert T.main(["--teacher", teacher, "--text", text, "--vae", vae, "--num-clips", "0", "--stories", "1",
                   "--steps", "2", "--seeds", "0,1", "--guidance-sigma-max", "0.5", "--json", str(out),
                   "--story-png", str(png)]) == 0
    full = json.loads(out.read_text())
    assert full["setup"]["guidance_sigma_max"] == 0.5
    rep = full["stories"]
    looks = rep["first_looks"]  # each object's first look per seed: pairs of seeds of one object
    assert looks["world_rate"] == 1 / 16 and looks["measured"] <= 2 * 3 and looks["seed_pairs"] <= 3
    assert looks["seed_pairs"] == 0 or 0.0 <= looks["same_look_rate"] <= 1.0
    cross = rep["returns_cross_seed"]  # each measured return against the other seed's look before its gap
    assert cross["own"]["measured"] == sum(r["returns_measured"] for r in rep["runs"])
    assert cross["cross"]["pairs"] <= 2 * rep["runs"][0]["returns"]
    assert rep["num_stories"] == 1 and len(rep["runs"]) == 2 and rep["num_latent"] == 12  # 2 seeds
    gt, codec, run = rep["rows"]["ground truth"], rep["rows"]["ground truth through the codec"], rep["runs"][0]
    assert gt["returns_measured"] >= 1 and codec["adherence"] == pytest.approx(gt["adherence"], abs=2 / 255)
    assert 0.0 <= run["adherence"] <= 1.0 and 0 <= run["returns_measured"] <= run["returns"]
    assert np.isfinite(run["latent_std"]) and "reappear. pass" in rep["table"]
    assert all(len(d) == 3 for d in run["return_distances"]) and len(run["return_distances"]) == run["returns_measured"]
    import imageio.v3 as iio

    s = config_lib.load(E.TINY_CONFIG, list(E.TINY_OVERRIDES) + PIXEL).sampler
    assert iio.imread(png).shape == (2 * s.height, 16 * s.width, 3)  # the teacher's 16 frames above the truth's


def test_errors_name_the_problem(stage_dirs, capsys):
    root, teacher, text, vae = stage_dirs
    assert T.main(["--teacher", text, "--text", text, "--vae", vae]) == 2  # a text checkpoint is no teacher
    assert "lacks section(s) ['model', 'sampler']" in capsys.readouterr().err
    assert T.main(["--teacher", teacher, "--text", text, "--vae", vae, "--num-frames", "32"]) == 2
    assert "1 + 4k" in capsys.readouterr().err
    (root / "empty.txt").write_text("\n")
    assert T.main(["--teacher", teacher, "--text", text, "--vae", vae, "--num-clips", "1", "--steps", "2",
                   "--prompts", str(root / "empty.txt")]) == 2
    assert "no prompts" in capsys.readouterr().err
    assert T.main(["--teacher", str(root / "nowhere"), "--text", text, "--vae", vae]) == 2
    assert "not a converted checkpoint" in capsys.readouterr().err
