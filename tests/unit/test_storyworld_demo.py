"""The storyworld demo: default story, packaging of the stage outputs, and sample.py's bundled default."""
from __future__ import annotations

import json
import os
import shutil

import imageio.v3 as iio
import jax
import numpy as np
import pytest

import sample
from memflow_jax import config as config_lib
from memflow_jax.convert.common import read_converted_meta, save_converted
from memflow_jax.nn import dit, t5 as t5_nn, vae as vae_nn
from memflow_jax.pipeline import TINY_TOKENIZER, config_from_checkpoint, load_components
from memflow_jax.storyworld import package as pkg


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_demo_story_is_chunk_aligned_and_has_a_return(seed):
    story = pkg.demo_story(36, 3, seed)
    starts = [s["start_frame"] for s in story]
    assert len(story) == 4 and starts[0] == 0
    assert all(b - a >= 2 * 3 for a, b in zip(starts, starts[1:])) and starts[-1] < 36
    assert all(s % 3 == 0 for s in starts)
    text = " ".join(s["prompt"] for s in story)
    assert "leaves" in text and "comes back" in text  # the sampler's guarantee: one object leaves and returns
    assert pkg.demo_story(36, 3, seed) == story  # deterministic
    with pytest.raises(ValueError, match="cannot hold"):
        pkg.demo_story(9, 3, seed)


def _stage_dirs(tmp_path):
    """Tiny converted checkpoints shaped like the demo stages' outputs (random weights)."""
    cfg = config_lib.load("configs/tiny.yaml", ["sampler.num_output_frames=24"])
    d = cfg.to_dict()
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    dit_dir = save_converted(str(tmp_path / "dit"), {"dit": dit.init_params(cfg.model, k1)},
                             {k: d[k] for k in ("model", "memory", "sampler")})
    tok = tmp_path / "tok"
    shutil.copytree(TINY_TOKENIZER, tok)
    text_dir = save_converted(str(tmp_path / "text"), {"t5": t5_nn.init_params(cfg.text, k2)}, {"text": d["text"]},
                              copy_dirs={"tokenizer": str(tok)})
    vae_dir = save_converted(str(tmp_path / "vae"), {"vae": vae_nn.init_params(cfg.vae, k3)}, {"vae": d["vae"]})
    return cfg, dit_dir, text_dir, vae_dir


def test_package_merges_the_stages_into_one_loadable_checkpoint(tmp_path):
    import memflow_jax.training.config  # noqa: F401  (registers train / run / teacher_model, as --decoder-run does)

    cfg, dit_dir, text_dir, vae_dir = _stage_dirs(tmp_path)
    out = str(tmp_path / "pkg")
    assert pkg.main(["--dit", dit_dir, "--text", text_dir, "--vae", vae_dir, "--out", out]) == 0
    meta = read_converted_meta(out)
    assert meta["components"] == ["dit", "t5", "vae"]
    assert sorted(meta["config"]) == sorted(config_lib.CHECKPOINT_SECTIONS)  # a sampling process reads it back
    assert meta["param_counts"]["dit"] == dit.count_params(dit.abstract_params(cfg.model))
    got = config_from_checkpoint(out)
    assert got.model == cfg.model and got.text == cfg.text and got.vae == cfg.vae
    comp = load_components(got, out)
    assert not comp.random_weights
    with open(os.path.join(out, pkg.STORY_FILE)) as f:
        story = [json.loads(line) for line in f]
    assert story == pkg.demo_story(24, cfg.sampler.chunk_frames)
    # re-packaging a new DiT with the package's own text model and codec keeps their records, not nested histories
    again = str(tmp_path / "again")
    assert pkg.main(["--dit", dit_dir, "--text", out, "--vae", out, "--out", again]) == 0
    assert read_converted_meta(again)["sources"] == meta["sources"]
    # a stage folder without its section is named in the error, and nothing is written
    assert pkg.main(["--dit", text_dir, "--text", text_dir, "--vae", vae_dir, "--out", str(tmp_path / "bad")]) == 2
    assert not os.path.exists(tmp_path / "bad")


def test_package_can_store_the_dit_in_bfloat16(tmp_path):
    import ml_dtypes

    cfg, dit_dir, text_dir, vae_dir = _stage_dirs(tmp_path)
    full, half = str(tmp_path / "full"), str(tmp_path / "half")
    assert pkg.main(["--dit", dit_dir, "--text", text_dir, "--vae", vae_dir, "--out", full]) == 0
    assert pkg.main(["--dit", dit_dir, "--text", text_dir, "--vae", vae_dir, "--out", half,
                     "--dit-dtype", "bfloat16"]) == 0
    assert read_converted_meta(half)["stored_dtypes"] == {"dit": "bfloat16"}
    assert pkg.dir_size(os.path.join(half, "dit")) < 0.75 * pkg.dir_size(os.path.join(full, "dit"))
    a = load_components(config_from_checkpoint(full), full).dit_params
    b = load_components(config_from_checkpoint(half), half).dit_params
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert y.dtype == x.dtype  # restored in the loader's param dtype
        np.testing.assert_array_equal(np.asarray(y), np.asarray(x).astype(ml_dtypes.bfloat16).astype(x.dtype))
    with pytest.raises(ValueError, match="dit_dtype"):
        pkg.package(dit_dir, text_dir, vae_dir, str(tmp_path / "bad"), dit_dtype="int8")
    assert not os.path.exists(tmp_path / "bad")


def test_default_sample_uses_the_bundled_demo_model(tmp_path, capsys):
    assert os.path.isfile(os.path.join(sample.DEFAULT_CKPT, "config.json")), "the bundled demo checkpoint is missing"
    out = tmp_path / "story.mp4"
    assert sample.main(["--out", str(out)]) == 0
    log = capsys.readouterr().out
    assert "RANDOM" not in log and "switches at latent frames" in log
    cfg = config_from_checkpoint(sample.DEFAULT_CKPT)
    frames = iio.imread(str(out))
    t = cfg.sampler.num_output_frames
    assert frames.shape == (1 + cfg.sampler.vae_stride[0] * (t - 1), cfg.sampler.height, cfg.sampler.width, 3)
    assert frames.std() > 5  # a picture, not a flat frame
    with open(os.path.join(sample.DEFAULT_CKPT, pkg.STORY_FILE)) as f:
        first = json.loads(f.readline())["prompt"]
    assert first in log


def test_bundled_checkpoint_is_small_and_complete():
    size = pkg.dir_size(sample.DEFAULT_CKPT)
    assert size <= 25 * 2**20, f"bundled demo is {size / 2**20:.1f} MiB (target <= 25 MiB)"
    assert np.all([os.path.isdir(os.path.join(sample.DEFAULT_CKPT, c)) for c in ("dit", "t5", "vae", "tokenizer")])


def test_train_demo_stages_match_their_documentation():
    """Every stage of train_demo.sh is listed in its header and in its unknown-stage error, and runs as a case."""
    import re
    import subprocess

    script = os.path.join(os.path.dirname(sample.__file__), "memflow_jax", "storyworld", "train_demo.sh")
    with open(script) as f:
        text = f.read()
    header = text[text.index("# Stages, in order"):text.index("set -euo pipefail")]
    documented = re.findall(r"^#   ([a-z]+) ", header, flags=re.M)
    cases = re.findall(r"^    ([a-z]+)\)$", text, flags=re.M)
    listed = re.search(r"unknown stage '\$name' \(([a-z ]+)\)", text).group(1).split()
    assert documented == cases == listed, (documented, cases, listed)
    proc = subprocess.run(["bash", script, "nope"], capture_output=True, text=True, env=dict(os.environ, WORKERS="1"))
    assert proc.returncode == 2 and "unknown stage 'nope'" in proc.stderr
