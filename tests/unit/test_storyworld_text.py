"""Storyworld text model: corpus -> sentencepiece tokenizer -> UMT5 converted checkpoint, and the text cache
built from it (small corpora and few pretraining steps so the file stays fast)."""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from memflow_jax import config as config_lib
from memflow_jax.convert.common import load_component, read_converted_meta
from memflow_jax.data import text_cache
from memflow_jax.nn import t5 as t5_nn
from memflow_jax.storyworld import captions as C
from memflow_jax.storyworld import scene as S
from memflow_jax.storyworld import text_model as TM
from memflow_jax.text.encoder import TextEncoder
from memflow_jax.text.tokenizer import UMT5Tokenizer

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "storyworld.yaml")
NUM_CAPTIONS = 120
PRETRAIN_STEPS = 12


@pytest.fixture(scope="module")
def cfg() -> config_lib.Config:
    return config_lib.load(CONFIG)


@pytest.fixture(scope="module")
def built(tmp_path_factory, cfg):
    """The CLI's output (seed 3) and its printed summary."""
    out = str(tmp_path_factory.mktemp("text") / "ckpt")
    rc = TM.main(["--config", CONFIG, "--out", out, "--seed", "3", "--num-captions", str(NUM_CAPTIONS),
                  "--pretrain-steps", str(PRETRAIN_STEPS)])
    assert rc == 0
    return out, read_converted_meta(out)["text_model"]


def _tokenizer(out: str, cfg: config_lib.Config) -> UMT5Tokenizer:
    return UMT5Tokenizer(os.path.join(out, TM.TOKENIZER_DIR), cfg.text.text_len)


def test_build_is_deterministic(built, cfg, tmp_path):
    out, _ = built
    again = str(tmp_path / "again")
    TM.build(cfg, again, seed=3, num_captions=NUM_CAPTIONS, pretrain_steps=PRETRAIN_STEPS, probe=False)
    for name in os.listdir(os.path.join(out, TM.TOKENIZER_DIR)):
        with open(os.path.join(out, TM.TOKENIZER_DIR, name), "rb") as f1, \
                open(os.path.join(again, TM.TOKENIZER_DIR, name), "rb") as f2:
            assert f1.read() == f2.read(), name
    abstract = t5_nn.abstract_params(cfg.text)
    p1, p2 = load_component(out, "t5", abstract), load_component(again, "t5", abstract)
    jax.tree_util.tree_map(np.testing.assert_array_equal, p1, p2)
    # another seed: another corpus (and so other files)
    assert TM.build_corpus(4, NUM_CAPTIONS).captions != TM.build_corpus(3, NUM_CAPTIONS).captions


def test_corpus_round_trips_within_text_len(built, cfg):
    out, summary = built
    tok = _tokenizer(out, cfg)
    corpus = TM.build_corpus(3, NUM_CAPTIONS)
    assert summary["corpus_size"] == len(corpus.captions) == len(set(corpus.captions))
    ids, mask = tok(corpus.captions)  # [N, text_len]
    lengths = mask.sum(1)
    pieces = tok.backend.encode(corpus.captions)
    assert all(n == len(p) + 1 for n, p in zip(lengths, pieces))  # nothing truncated
    assert int(lengths.max()) == summary["max_tokens"] <= cfg.text.text_len
    assert np.all(ids[np.arange(len(ids)), lengths - 1] == tok.eos_id)
    assert not np.any(ids[mask == 1] == TM.UNK_ID)
    sp = tok.backend.sp
    assert [sp.decode(list(r[:n - 1])) for r, n in zip(ids, lengths)] == corpus.captions
    # every caption word is one piece; the longest template structure is in every corpus
    words = [w for w in C.VOCABULARY if w != "."]
    assert all(len(p) == 1 for p in tok.backend.encode(words))
    longest = [C.segment_prompt(s, 2) for s in TM.longest_structure_scripts(np.random.default_rng(0), 4)]
    assert max(len(C.tokenize(c)) for c in longest) >= max(len(C.tokenize(c)) for c in corpus.captions)
    assert TM.token_lengths(tok, longest).max() <= cfg.text.text_len
    # the negative prompt "" is just </s>
    ids0, mask0 = tok([""])
    assert int(mask0.sum()) == 1 and int(ids0[0, 0]) == tok.eos_id


def test_vocab_and_special_ids(built, cfg):
    out, summary = built
    tok = _tokenizer(out, cfg)
    sp = tok.backend.sp
    assert tok.vocab_size == summary["vocab_size"] <= cfg.text.vocab_size
    assert (tok.pad_id, tok.eos_id, sp.unk_id(), sp.bos_id()) == (TM.PAD_ID, TM.EOS_ID, TM.UNK_ID, -1)
    with open(os.path.join(out, TM.TOKENIZER_DIR, "special_tokens_map.json")) as f:
        assert json.load(f) == TM.SPECIAL_TOKENS
    assert tok(["A Small RED circle"])[0].tolist() == tok(["a small red circle"])[0].tolist()  # case folded


def test_too_long_caption_fails_clearly(built, cfg):
    out, summary = built
    short = dataclasses.replace(cfg.text, text_len=summary["max_tokens"] - 1)
    tok = UMT5Tokenizer(os.path.join(out, TM.TOKENIZER_DIR), short.text_len)
    with pytest.raises(TM.TextModelError, match="text_len"):
        TM.check_tokenizer(tok, TM.build_corpus(3, NUM_CAPTIONS).captions, short)
    with pytest.raises(TM.TextModelError, match="vocab_size"):
        TM.build(cfg, os.path.join(out + "_x"), num_captions=8, vocab_size=cfg.text.vocab_size + 1)
    assert not os.path.exists(out + "_x")


def test_converted_checkpoint_loads_and_encodes(built, cfg):
    out, summary = built
    meta = read_converted_meta(out)
    assert meta["components"] == ["t5"] and meta["negative_prompt"] == TM.NEGATIVE_PROMPT
    stored = config_lib.from_dict(meta["config"])
    assert stored.text == cfg.text and stored.model == cfg.model  # every section, for storyworld.package
    params = load_component(out, "t5", t5_nn.abstract_params(cfg.text))
    enc = TextEncoder(_tokenizer(out, cfg), params, cfg.text)
    prompts = ["", "a small red circle moves left on a sand background", TM.build_corpus(3, 4).captions[0]]
    emb = enc.encode_numpy(prompts)
    assert emb.shape == (len(prompts), cfg.text.text_len, cfg.text.dim)
    assert np.all(np.isfinite(emb))
    _, mask = enc.tokenizer(prompts)
    nonzero = np.any(emb != 0, -1)  # [B, text_len]
    np.testing.assert_array_equal(nonzero, mask == 1)  # exactly the tokens' rows (the "" row: </s> only)
    # the pretraining ran and lowered its loss; the probe measured both encoders
    assert summary["pretrain_steps"] == PRETRAIN_STEPS
    assert summary["pretrain_losses"][-1] < summary["pretrain_losses"][0]
    assert {"random", "pretrained"} <= set(summary["probe"])


def test_token_targets_follow_sentences(built, cfg):
    out, _ = built
    tok = _tokenizer(out, cfg)
    script = TM.longest_structure_scripts(np.random.default_rng(1), 1)[0]
    caption = C.segment_prompt(script, 2)
    labels = TM.caption_labels(script, 2)[None]
    targets, weights = TM.token_targets(tok, [caption], labels)  # [1, L, H]
    sentences = caption.split(C.SENTENCE_SEPARATOR)
    n_tok = len(tok.backend.encode([caption])[0])
    colour = [h for h, _ in TM.HEADS].index("colour")
    seg = script.segments[2]
    present = [k for k, a in enumerate(seg.actions) if a.kind != "absent"]
    t = 0
    for j, sentence in enumerate(sentences):
        n = len(tok.backend.encode([sentence])[0])
        want = script.objects[present[j]].colour_id + 1 if j < len(present) else 0
        assert np.all(targets[0, t:t + n, colour] == want), sentence
        t += n
    assert t == n_tok
    bg = [h for h, _ in TM.HEADS].index("bg_colour")
    assert np.all(targets[0, :n_tok + 1, bg] == S.BACKGROUND_COLOURS.index(seg.background.colour))
    assert weights[0, :n_tok, 0].all() and not weights[0, n_tok:, 0].any()  # object heads: pieces only
    assert weights[0, :n_tok + 1, bg].all() and not weights[0, n_tok + 1:, bg].any()  # bg heads: + </s>


def test_text_cache_from_converted_checkpoint(built, cfg, tmp_path):
    out, _ = built
    prompts = TM.build_corpus(5, 6).captions[:5]
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n")
    cache_dir = str(tmp_path / "cache")
    rc = text_cache.main(["build", "--prompts", str(path), "--out", cache_dir, "--converted-ckpt", out,
                          "--dtype", "float32", "--batch-size", "4"])
    assert rc == 0
    cache = text_cache.TextEmbeddingCache(cache_dir)
    assert cache.prompts == prompts + [""]  # the checkpoint's negative prompt, the empty string
    assert cache.meta["negative_prompt"] == "" and cache.meta["encoder"] == os.path.abspath(out)
    enc = TextEncoder(_tokenizer(out, cfg), load_component(out, "t5", t5_nn.abstract_params(cfg.text)), cfg.text)
    want = enc.encode_numpy(prompts + [""])  # [N, text_len, dim]
    np.testing.assert_allclose(cache.lookup(prompts + [""]), want, rtol=1e-5, atol=1e-6)
    # --config would silently disagree with the checkpoint's text section: refused
    with pytest.raises(SystemExit, match="--config"):
        text_cache.main(["build", "--prompts", str(path), "--out", str(tmp_path / "c2"), "--converted-ckpt", out,
                         "--config", CONFIG])
    with pytest.raises(SystemExit, match="no component|config.json"):
        text_cache.main(["build", "--prompts", str(path), "--out", str(tmp_path / "c3"), "--converted-ckpt",
                         str(tmp_path)])
