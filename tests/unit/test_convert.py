"""Converter: validation errors name the keys and write nothing; converted dirs load back; LoRA merge math."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from memflow_jax.convert import __main__ as cli
from memflow_jax.convert.common import ConversionError, flatten, load_component, save_converted
from memflow_jax.convert.dit import convert_tensors, load_wan_folder, read_wan_config
from memflow_jax.nn import dit
from tests.conftest import fixture_dir

WAN = os.path.join(fixture_dir("dit"), "ckpt", "Wan2.1-T2V-tiny")


def _copy_folder(tmp_path, drop=(), reshape=None):
    out = tmp_path / "wan"
    out.mkdir()
    shutil.copy(os.path.join(WAN, "config.json"), out / "config.json")
    tensors = load_file(os.path.join(WAN, "diffusion_pytorch_model.safetensors"))
    tensors = {k: v for k, v in tensors.items() if k not in drop}
    if reshape:
        k = reshape
        tensors[k] = np.zeros((tensors[k].shape[0] + 1,) + tensors[k].shape[1:], tensors[k].dtype)
    save_file(tensors, str(out / "diffusion_pytorch_model.safetensors"))
    return str(out)


def test_truncated_checkpoint_names_missing_keys_and_writes_nothing(tmp_path, capsys):
    folder = _copy_folder(tmp_path, drop=("blocks.1.ffn.2.weight", "head.modulation"))
    out = tmp_path / "out"
    rc = cli.main(["--wan-folder", folder, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "head/modulation" in err and "blocks/ffn_2/kernel[layer 1]" in err
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith("out")]


def test_shape_mismatch_and_wrong_config(tmp_path):
    folder = _copy_folder(tmp_path, reshape="blocks.0.self_attn.q.bias")
    with pytest.raises(ConversionError, match="blocks.0.self_attn.q.bias"):
        load_wan_folder(folder)
    cfg = read_wan_config(WAN)
    import dataclasses
    bigger = dataclasses.replace(cfg, num_layers=cfg.num_layers + 1)
    with pytest.raises(ConversionError, match=r"layer %d" % cfg.num_layers):
        load_wan_folder(WAN, bigger)
    with pytest.raises(ConversionError, match="unexpected"):
        convert_tensors([("foo.weight", np.zeros(3))], cfg, "x")


def test_cli_roundtrip_and_lora_requires_alpha(tmp_path, capsys):
    out = tmp_path / "conv"
    assert cli.main(["--wan-folder", WAN, "--out", str(out)]) == 0
    cfg, params = load_wan_folder(WAN)
    back = load_component(str(out), "dit", dit.abstract_params(cfg))
    for k, v in flatten(params).items():
        np.testing.assert_array_equal(np.asarray(flatten(back)[k]), v)
    meta = json.load(open(out / "config.json"))
    assert meta["config"]["model"]["dim"] == cfg.dim
    lora = os.path.join(fixture_dir("dit"), "ckpt", "lora.pt")
    base = os.path.join(fixture_dir("dit"), "ckpt", "base.pt")
    assert cli.main(["--wan-folder", WAN, "--base-pt", base, "--lora-pt", lora, "--out", str(tmp_path / "x")]) == 2
    assert "--lora-alpha" in capsys.readouterr().err


def test_lora_merge_formula():
    torch = pytest.importorskip("torch")
    from memflow_jax.convert.dit import load_generator_pt, merge_lora
    ck = os.path.join(fixture_dir("dit"), "ckpt")
    cfg = read_wan_config(WAN)
    base = load_generator_pt(os.path.join(ck, "base.pt"), cfg)
    merged = merge_lora(base, os.path.join(ck, "lora.pt"), alpha=3.0, copy=True)
    sd = torch.load(os.path.join(ck, "lora.pt"), weights_only=True)["generator_lora"]
    a = sd["base_model.model.blocks.1.ffn.0.lora_A.weight"].numpy()
    b = sd["base_model.model.blocks.1.ffn.0.lora_B.weight"].numpy()
    want = base["blocks"]["ffn_0"]["kernel"][1] + (3.0 / a.shape[0]) * (b @ a).T
    np.testing.assert_allclose(merged["blocks"]["ffn_0"]["kernel"][1], want, rtol=1e-6, atol=1e-7)


def test_save_converted_replaces_atomically(tmp_path):
    out = str(tmp_path / "ck")
    save_converted(out, {"a": {"w": np.ones(3)}}, {"model": {}})

    class Boom(dict):
        def items(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_converted(out, Boom(), {"model": {}})
    np.testing.assert_array_equal(np.asarray(load_component(out, "a")["w"]), np.ones(3))  # old one intact
    assert sorted(os.listdir(tmp_path)) == ["ck"]
