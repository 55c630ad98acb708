"""UMT5 tokenizer + encoder + converter against the reference fixtures ($MEMFLOW_FIXTURES/t5).

Data-driven: every tokenizer_case*.json / encoder_case*.json listed in the manifest, every prompt in them.
Tolerance of the float outputs: 50 x the reference's own float32-vs-float64 discrepancy recorded in the case
json (``tolerance_measurements.f32_vs_f64``), scaled by each tensor's magnitude relative to ``ref_max_abs``.
Ids, masks and position buckets must match exactly.
"""
from __future__ import annotations

import functools
import os
import re
import shutil

import chex
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from memflow_jax.config import TextConfig
from memflow_jax.convert.common import flatten
from memflow_jax.convert.t5 import convert_t5_state_dict, expected_torch_keys
from memflow_jax.nn import t5
from memflow_jax.text import TextEncoder, UMT5Tokenizer, clean_text
from tests.conftest import fixture_dir, load_json, load_manifest

pytestmark = pytest.mark.parity

COMPONENT = "t5"
NOISE_FACTOR = 50.0  # tolerance = NOISE_FACTOR x (reference f32 vs f64 max |diff|), scaled by magnitude


def _case_files(prefix: str) -> list[str]:
    paths = [f["path"] for f in load_manifest(COMPONENT)["files"]]
    found = sorted(p for p in paths if re.fullmatch(rf"{prefix}[^/]*\.json", p))
    if not found:
        raise FileNotFoundError(f"no {prefix}*.json in the {COMPONENT} fixture manifest")
    return found


def _tokenizer_params() -> list:
    out = []
    for name in _case_files("tokenizer_case"):
        for i, _ in enumerate(load_json(COMPONENT, name)["cases"]):
            out.append(pytest.param(name, i, id=f"{name[:-5]}-{i}"))
    return out


def _encoder_params() -> list:
    out = []
    for name in _case_files("encoder_case"):
        meta = load_json(COMPONENT, name)
        for i, _ in enumerate(meta["prompts"]):
            out.append(pytest.param(name, i, id=f"{meta['case']}-prompt{i}"))
    return out


def _encoder_cases() -> list:
    return [pytest.param(n, id=load_json(COMPONENT, n)["case"]) for n in _case_files("encoder_case")]


def text_config(meta: dict) -> TextConfig:
    """TextConfig of a case json's tiny reference model."""
    c = meta["tiny_config"]
    return TextConfig(vocab_size=c["vocab_size"], dim=c["dim"], dim_attn=c["dim_attn"], dim_ffn=c["dim_ffn"],
                      num_heads=c["num_heads"], num_layers=c["encoder_layers"], num_buckets=c["num_buckets"],
                      max_dist=c["max_dist"], text_len=meta["seq_len"], eps=c["eps"], dtype=c["dtype"])


@functools.lru_cache(maxsize=None)
def _arrays(case_json: str) -> dict:
    return load_file(os.path.join(fixture_dir(COMPONENT), case_json[:-5] + ".safetensors"))


@functools.lru_cache(maxsize=None)
def _params(case_json: str, which: str):
    meta = load_json(COMPONENT, case_json)
    return convert_t5_state_dict(os.path.join(fixture_dir(COMPONENT), meta["checkpoints"][which]),
                                 text_config(meta))


@functools.lru_cache(maxsize=None)
def _forward(case_json: str, which: str):
    """(encoder_out, per-block outputs, prompt_embeds) of the whole case batch, as numpy."""
    meta = load_json(COMPONENT, case_json)
    cfg = text_config(meta)
    a = _arrays(case_json)

    @jax.jit
    def run(p, ids, mask):
        out, blocks = t5.encode(p, cfg, ids, mask, return_blocks=True)
        return out, blocks, t5.zero_padding_rows(out, mask)

    res = run(_params(case_json, which), a["input_ids"].astype(np.int32), a["attention_mask"].astype(np.int32))
    return tuple(np.asarray(x) for x in res)


def _atol(meta: dict, expected: np.ndarray) -> float:
    m = meta["tolerance_measurements"]["f32_vs_f64"]["encoder_out"]
    scale = max(1.0, float(np.max(np.abs(expected))) / m["ref_max_abs"])
    return NOISE_FACTOR * m["max_abs"] * scale


def _close(name: str, got: np.ndarray, want: np.ndarray, atol: float) -> None:
    err = float(np.max(np.abs(got.astype(np.float64) - want))) if want.size else 0.0
    print(f"{name}: max|diff|={err:.3g} (atol {atol:.3g})")
    chex.assert_shape(got, want.shape)
    np.testing.assert_allclose(got, want, atol=atol, rtol=0, err_msg=name)


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _tokenizer(case_json: str, spm_only_dir: str | None = None) -> UMT5Tokenizer:
    meta = load_json(COMPONENT, case_json)
    folder = spm_only_dir or os.path.join(fixture_dir(COMPONENT), meta["tokenizer_folder"])
    return UMT5Tokenizer(folder, meta["seq_len"])


def _check_case(tok: UMT5Tokenizer, meta: dict, i: int) -> None:
    case = meta["cases"][i]
    assert clean_text(case["prompt"]) == case["cleaned"]
    ids, mask = tok([case["prompt"]])
    chex.assert_shape(ids, (1, meta["seq_len"]))
    assert ids.dtype == np.int32 and mask.dtype == np.int32
    assert ids[0].tolist() == case["input_ids"]
    assert mask[0].tolist() == case["attention_mask"]


@pytest.mark.parametrize("case_json,i", _tokenizer_params())
def test_tokenizer_case(case_json: str, i: int):
    meta = load_json(COMPONENT, case_json)
    tok = _tokenizer(case_json)
    assert tok.vocab_size == meta["len_tokenizer"]
    assert tok.pad_id == meta["special_ids"]["<pad>"] and tok.eos_id == meta["special_ids"]["</s>"]
    _check_case(tok, meta, i)


@pytest.fixture(scope="module")
def spm_only_folder(tmp_path_factory) -> dict:
    """Copies of the fixture tokenizer folders without tokenizer.json (forces the sentencepiece fallback)."""
    out = {}
    for name in _case_files("tokenizer_case"):
        src = os.path.join(fixture_dir(COMPONENT), load_json(COMPONENT, name)["tokenizer_folder"])
        dst = tmp_path_factory.mktemp("spm_only")
        for f in os.listdir(src):
            if f != "tokenizer.json":
                shutil.copy(os.path.join(src, f), dst)
        out[name] = str(dst)
    return out


@pytest.mark.parametrize("case_json,i", _tokenizer_params())
def test_tokenizer_case_sentencepiece_fallback(case_json: str, i: int, spm_only_folder: dict):
    meta = load_json(COMPONENT, case_json)
    tok = _tokenizer(case_json, spm_only_folder[case_json])
    assert type(tok.backend).__name__ == "_SentencePieceBackend"
    assert tok.vocab_size == meta["len_tokenizer"]
    _check_case(tok, meta, i)


# --------------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case_json", _encoder_cases())
def test_checkpoint_layout(case_json: str):
    meta = load_json(COMPONENT, case_json)
    cfg = text_config(meta)
    assert expected_torch_keys(cfg) == sorted(meta["checkpoints"]["state_dict_keys"])
    got = {k: tuple(v.shape) for k, v in flatten(_params(case_json, "f32")).items()}
    assert got == {k: tuple(v.shape) for k, v in flatten(t5.abstract_params(cfg)).items()}
    want_total = sum(int(np.prod(s)) for s in meta["checkpoints"]["shapes"].values())
    assert t5.param_count(_params(case_json, "f32")) == want_total


@pytest.mark.parametrize("case_json", _encoder_cases())
def test_position_buckets_and_bias(case_json: str):
    meta = load_json(COMPONENT, case_json)
    cfg = text_config(meta)
    a = _arrays(case_json)
    lq, lk = a["rel_pos_bucket"].shape
    np.testing.assert_array_equal(t5.relative_position_bucket(lq, lk, cfg.num_buckets, cfg.max_dist),
                                  a["rel_pos_bucket"])
    bias = np.asarray(t5.position_bias(_params(case_json, "f32"), cfg, lq, lk))
    chex.assert_shape(bias, a["pos_bias"].shape)
    np.testing.assert_array_equal(bias, a["pos_bias"])  # a gather of the same float32 values


@pytest.mark.parametrize("case_json,i", _encoder_params())
def test_tokenizer_matches_encoder_case_ids(case_json: str, i: int):
    meta = load_json(COMPONENT, case_json)
    a = _arrays(case_json)
    tok_json = _case_files("tokenizer_case")[0]
    ids, mask = _tokenizer(tok_json)([meta["prompts"][i]])
    np.testing.assert_array_equal(ids[0], a["input_ids"][i])
    np.testing.assert_array_equal(mask[0], a["attention_mask"][i])
    assert int(a["seq_lens"][i]) == int(mask[0].sum())


@pytest.mark.parametrize("case_json,i", _encoder_params())
def test_encoder_f32_checkpoint(case_json: str, i: int):
    meta = load_json(COMPONENT, case_json)
    a = _arrays(case_json)
    out, blocks, pe = _forward(case_json, "f32")
    chex.assert_shape(blocks, (text_config(meta).num_layers,) + a["encoder_out"].shape)
    for layer in range(blocks.shape[0]):
        want = a[f"block_out_{layer}"][i]
        _close(f"block_out_{layer}[{i}]", blocks[layer, i], want, _atol(meta, want))
    _close(f"encoder_out[{i}]", out[i], a["encoder_out"][i], _atol(meta, a["encoder_out"][i]))
    _close(f"prompt_embeds[{i}]", pe[i], a["prompt_embeds"][i], _atol(meta, a["prompt_embeds"][i]))
    # rows past the prompt are exactly zero, as in WanTextEncoder
    assert not pe[i, int(a["seq_lens"][i]):].any()


@pytest.mark.parametrize("case_json,i", _encoder_params())
def test_encoder_bf16_checkpoint(case_json: str, i: int):
    meta = load_json(COMPONENT, case_json)
    a = _arrays(case_json)
    _, _, pe = _forward(case_json, "bf16")
    want = a["prompt_embeds_bf16ckpt"][i]
    _close(f"prompt_embeds_bf16ckpt[{i}]", pe[i], want, _atol(meta, want))


@pytest.mark.parametrize("case_json", _encoder_cases())
def test_text_encoder_end_to_end(case_json: str):
    """Prompts -> TextEncoder (tokenizer + converted .pth + cache) == WanTextEncoder's prompt_embeds."""
    meta = load_json(COMPONENT, case_json)
    a = _arrays(case_json)
    cfg = text_config(meta)
    tok = _tokenizer(_case_files("tokenizer_case")[0])
    enc = TextEncoder(tok, _params(case_json, "f32"), cfg, batch_size=len(meta["prompts"]))
    got = np.asarray(enc.encode(meta["prompts"]))
    _close("TextEncoder.encode", got, a["prompt_embeds"], _atol(meta, a["prompt_embeds"]))
