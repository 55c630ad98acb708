"""Config loading: YAML sections, key=value overrides, clear errors."""
from __future__ import annotations

import pytest

from memflow_jax import config as config_lib
from memflow_jax.config import ConfigError


def test_shipped_configs_load():
    for name in ("wan_1_3b", "wan_14b_teacher", "tiny"):
        cfg = config_lib.load(f"configs/{name}.yaml")
        assert cfg.model.dim % cfg.model.num_heads == 0
    cfg = config_lib.load("configs/wan_1_3b.yaml")
    assert (cfg.model.dim, cfg.model.ffn_dim, cfg.model.num_heads, cfg.model.num_layers) == (1536, 8960, 12, 30)
    assert cfg.sampler.latent_hw == (60, 104)
    t = config_lib.load("configs/wan_14b_teacher.yaml").model
    assert (t.dim, t.ffn_dim, t.num_heads, t.num_layers) == (5120, 13824, 40, 40)


def test_overrides_and_types():
    cfg = config_lib.load("configs/tiny.yaml", ["memory.sma=false", "model.num_layers=3", "sampler.context_noise=1e-5",
                                                "sampler.denoising_step_list=[1000,500]"])
    assert cfg.memory.sma is False and cfg.model.num_layers == 3
    assert cfg.sampler.context_noise == 1e-5 and cfg.sampler.denoising_step_list == (1000, 500)


@pytest.mark.parametrize("override,match", [
    ("model.dimm=3", "unknown config key 'model.dimm'"),
    ("modle.dim=3", "unknown config section"),
    ("model.dim=abc", "expects an integer"),
    ("memory.mode=bogus", "memory.mode"),
    ("memory.sma=maybe", "true/false"),
    ("sampler.attention_kv_splits=-1", "attention_kv_splits=-1 must be >= 0"),
    ("dim=3", "section.key"),
    ("model.dim", "section.key=value"),
])
def test_bad_overrides_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        config_lib.load("configs/tiny.yaml", [override])


@pytest.mark.parametrize("files,match", [
    ({"c.yaml": "model:\n  dim: 32\n  num_head: 2\n"}, "model.num_head"),
    ({"c.yaml": "- a\n- b\n"}, "mapping"),
    ({"c.yaml": "base: b.yaml\n", "b.yaml": "base: c.yaml\n"}, "loops back"),
    ({"c.yaml": "base: missing.yaml\n"}, "missing.yaml does not exist"),
    ({"c.yaml": "base: [1, 2]\n"}, "must be a path"),
])
def test_bad_yaml_files_name_the_problem(tmp_path, files, match):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=match):
        config_lib.load(str(tmp_path / "c.yaml"))


def test_roundtrip_json():
    cfg = config_lib.load("configs/tiny.yaml")
    again = config_lib.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()


def test_base_yaml_is_merged_under_the_file(tmp_path):
    (tmp_path / "parent.yaml").write_text("model:\n  dim: 64\n  num_heads: 2\nmemory:\n  sink_size: 2\n")
    (tmp_path / "sub").mkdir()
    child = tmp_path / "sub" / "child.yaml"
    child.write_text("base: ../parent.yaml\nname: child\nmodel:\n  dim: 32\n")
    cfg = config_lib.load(str(child), ["memory.bank_size=4"])
    assert (cfg.model.dim, cfg.model.num_heads) == (32, 2)  # child wins, parent's other keys kept
    assert (cfg.memory.sink_size, cfg.memory.bank_size) == (2, 4)


def test_storyworld_configs_share_the_architecture():
    import glob

    import memflow_jax.training.trainer  # noqa: F401  (registers the run / teacher_model sections)
    from memflow_jax.pipeline import config_from_checkpoint

    base = config_lib.load("configs/storyworld.yaml")
    # the story chain (teacher -> ODE trajectories -> causal init -> DMD on whole stories) runs at round 14's wide
    # shape, the shipped DiT's since round 17; the clip chain at the base shape. Latents and prompts are shared.
    story = ("teacher_story", "ode_story", "dmd_story")
    wide = config_lib.load("configs/storyworld_ode_story.yaml").model
    shipped = config_from_checkpoint("memflow_jax/assets/storyworld").model
    for key in ("dim", "ffn_dim", "num_heads", "num_layers"):  # (its latents: ARCH=pcadec, train_demo.sh)
        assert getattr(shipped, key) == getattr(wide, key), key
    for path in sorted(glob.glob("configs/storyworld_*.yaml")):
        cfg = config_lib.load(path)
        assert cfg.text == base.text and cfg.vae == base.vae, path
        if cfg.train.recipe in story:
            assert cfg.model == wide, path
            for key in ("in_dim", "out_dim", "patch_size", "text_len", "text_dim", "freq_dim"):
                assert getattr(cfg.model, key) == getattr(base.model, key), (path, key)
            if cfg.train.recipe != "teacher_story":
                assert cfg.teacher_model == wide, path  # the story teacher, the generator's start
        else:
            assert cfg.model == base.model, path
            if cfg.train.recipe not in ("vae", "teacher"):
                assert cfg.teacher_model == base.model, path  # the clip teacher has the generator's shape
