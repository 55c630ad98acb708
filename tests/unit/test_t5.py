"""UMT5 encoder / tokenizer / converter / TextEncoder: shapes, masking, cache, errors, full-size config."""
from __future__ import annotations

import dataclasses
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memflow_jax.config import TextConfig
from memflow_jax.convert.common import ConversionError, flatten, load_torch_pickle
from memflow_jax.convert.t5 import convert_t5_state_dict
from memflow_jax.nn import t5
from memflow_jax.text import TextEncoder, TokenizerError, UMT5Tokenizer
from tests.conftest import fixture_dir, load_json

TINY = TextConfig(vocab_size=384, dim=16, dim_attn=16, dim_ffn=32, num_heads=2, num_layers=2, text_len=12)


@pytest.fixture(scope="module")
def params():
    return t5.init_params(TINY, jax.random.key(0))


@pytest.fixture(scope="module")
def tokenizer_dir() -> str:
    return os.path.join(fixture_dir("t5"), load_json("t5", "tokenizer_case.json")["tokenizer_folder"])


def _fixture_cfg() -> tuple[TextConfig, str]:
    """Tiny config of the fixture checkpoint and its path (read from encoder_case.json)."""
    meta = load_json("t5", "encoder_case.json")
    c = meta["tiny_config"]
    cfg = TextConfig(vocab_size=c["vocab_size"], dim=c["dim"], dim_attn=c["dim_attn"], dim_ffn=c["dim_ffn"],
                     num_heads=c["num_heads"], num_layers=c["encoder_layers"], num_buckets=c["num_buckets"],
                     max_dist=c["max_dist"], text_len=meta["seq_len"], eps=c["eps"])
    return cfg, os.path.join(fixture_dir("t5"), meta["checkpoints"]["f32"])


def _ids(key, lens, cfg=TINY):
    """Random ids with right padding (0) after each length, and the matching mask. [B, L] int32."""
    b, n = len(lens), cfg.text_len
    ids = jax.random.randint(key, (b, n), 4, cfg.vocab_size, jnp.int32)
    mask = (jnp.arange(n)[None, :] < jnp.asarray(lens)[:, None]).astype(jnp.int32)
    return jnp.where(mask > 0, ids, 0), mask


# --------------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------------


def test_param_layout_and_output_shapes(params):
    c = TINY
    shapes = {k: v.shape for k, v in flatten(params).items()}
    assert shapes == {
        "token_embedding/embedding": (c.vocab_size, c.dim),
        "blocks/norm1/scale": (c.num_layers, c.dim),
        "blocks/norm2/scale": (c.num_layers, c.dim),
        "blocks/attn/q/kernel": (c.num_layers, c.dim, c.dim_attn),
        "blocks/attn/k/kernel": (c.num_layers, c.dim, c.dim_attn),
        "blocks/attn/v/kernel": (c.num_layers, c.dim, c.dim_attn),
        "blocks/attn/o/kernel": (c.num_layers, c.dim_attn, c.dim),
        "blocks/ffn/gate/kernel": (c.num_layers, c.dim, c.dim_ffn),
        "blocks/ffn/fc1/kernel": (c.num_layers, c.dim, c.dim_ffn),
        "blocks/ffn/fc2/kernel": (c.num_layers, c.dim_ffn, c.dim),
        "blocks/pos_embedding/embedding": (c.num_layers, c.num_buckets, c.num_heads),
        "norm/scale": (c.dim,),
    }
    ids, mask = _ids(jax.random.key(1), [3, c.text_len, 1])
    out, blocks = jax.jit(lambda p, i, m: t5.encode(p, c, i, m, return_blocks=True))(params, ids, mask)
    chex.assert_shape(out, (3, c.text_len, c.dim))
    chex.assert_shape(blocks, (c.num_layers, 3, c.text_len, c.dim))
    chex.assert_tree_all_finite((out, blocks))
    chex.assert_shape(t5.position_bias(params, c, 5, 7), (c.num_layers, c.num_heads, 5, 7))
    with pytest.raises(ValueError, match="mask shape"):
        t5.encode(params, c, ids, mask[:, :-1])


def test_padding_is_masked(params):
    """Changing the ids at padded positions changes nothing in the real rows; prompt_embeds zeroes the rest."""
    lens = [5, 1, TINY.text_len]
    ids, mask = _ids(jax.random.key(2), lens)
    other = jnp.where(mask > 0, ids, jax.random.randint(jax.random.key(3), ids.shape, 4, TINY.vocab_size))
    run = jax.jit(lambda p, i, m: (t5.encode(p, TINY, i, m), t5.prompt_embeds(p, TINY, i, m)))
    out_a, pe_a = map(np.asarray, run(params, ids, mask))
    out_b, pe_b = map(np.asarray, run(params, other, mask))
    for b, n in enumerate(lens):
        np.testing.assert_array_equal(out_a[b, :n], out_b[b, :n])
        np.testing.assert_array_equal(pe_a[b, :n], out_a[b, :n])
        assert not pe_a[b, n:].any()
    # reference quirk kept by encode(): padded rows of the raw output are not zero
    assert np.abs(out_a[0, lens[0]:]).max() > 0


def test_bf16_params_and_compute(params):
    """bf16 params + bf16 matmuls: bf16 output within bf16 rounding of the f32 run on the same bf16 weights."""
    p16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(t5.abstract_params(TINY, jnp.bfloat16)))
    ids, mask = _ids(jax.random.key(4), [7, 3])
    run = jax.jit(t5.prompt_embeds, static_argnums=1)
    ref = run(p16, TINY, ids, mask)  # f32 compute, bf16 weights (the reference's real setting)
    out = run(p16, dataclasses.replace(TINY, dtype="bfloat16"), ids, mask)
    assert ref.dtype == jnp.float32 and out.dtype == jnp.bfloat16
    chex.assert_tree_all_finite(out)
    # bound: a few bf16 ulps (2^-8 relative) accumulated over 2 layers, relative to the output scale
    err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)))
    assert err < 0.05 * float(jnp.max(jnp.abs(ref))), err


def test_relative_position_bucket_exact_edges():
    """Full text_len table vs an integer-exact form of the bucket rule (no float rounding at the edges).

    For dist n >= max_exact: bucket = max_exact + max{k : (n/max_exact)^(half-max_exact) >= (max_dist/max_exact)^k},
    clipped to half-1; dist < max_exact is exact; keys after the query add `half`.
    """
    cfg = TextConfig()
    n = cfg.text_len
    table = t5.relative_position_bucket(n, n, cfg.num_buckets, cfg.max_dist)
    chex.assert_shape(table, (n, n))
    half = cfg.num_buckets // 2
    me = half // 2

    def exact(rel: int) -> int:
        d = abs(rel)
        if d < me:
            b = d
        else:
            k = 0
            while k + 1 < half - me and d ** (half - me) * me ** (k + 1) >= cfg.max_dist ** (k + 1) * me ** (half - me):
                k += 1
            b = me + k
        return b + (half if rel > 0 else 0)

    want = {rel: exact(rel) for rel in range(-(n - 1), n)}
    rel = np.arange(n)[None, :] - np.arange(n)[:, None]
    np.testing.assert_array_equal(table, np.vectorize(want.get)(rel))
    assert table.min() == 0 and table.max() == cfg.num_buckets - 1


def test_real_config_defaults_and_param_count():
    """TextConfig() is umt5-xxl; eval_shape param count == total of the reference key/shape list at real size."""
    meta = load_json("t5", "encoder_case.json")
    real, tiny = meta["real_config"], meta["tiny_config"]
    cfg = TextConfig()
    for k in ("vocab_size", "dim", "dim_attn", "dim_ffn", "num_heads", "num_layers", "num_buckets", "max_dist",
              "text_len", "eps"):
        assert getattr(cfg, k) == real[k], k
    # shapes of the reference state dict in config fields; checked against the fixture's tiny key/shape list
    sym = {"token_embedding.weight": ("vocab_size", "dim"), "norm.weight": ("dim",),
           "norm1.weight": ("dim",), "norm2.weight": ("dim",),
           "attn.q.weight": ("dim_attn", "dim"), "attn.k.weight": ("dim_attn", "dim"),
           "attn.v.weight": ("dim_attn", "dim"), "attn.o.weight": ("dim", "dim_attn"),
           "ffn.gate.0.weight": ("dim_ffn", "dim"), "ffn.fc1.weight": ("dim_ffn", "dim"),
           "ffn.fc2.weight": ("dim", "dim_ffn"), "pos_embedding.embedding.weight": ("num_buckets", "num_heads")}

    def key_shapes(c: dict, layers: int) -> dict:
        out = {}
        for name, dims in sym.items():
            if name.startswith(("token_embedding", "norm.")):
                out[name] = [c[d] for d in dims]
            else:
                out.update({f"blocks.{i}.{name}": [c[d] for d in dims] for i in range(layers)})
        return out

    assert key_shapes(tiny, tiny["encoder_layers"]) == meta["checkpoints"]["shapes"]
    want = sum(int(np.prod(s)) for s in key_shapes(real, real["num_layers"]).values())
    abstract = t5.abstract_params(cfg)
    got = t5.param_count(abstract)
    print(f"umt5-xxl encoder parameters: {got:,} (reference key/shape list: {want:,})")
    assert got == want
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(abstract))


# --------------------------------------------------------------------------------------------------
# Tokenizer errors
# --------------------------------------------------------------------------------------------------


def test_bad_tokenizer_folder(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        UMT5Tokenizer(str(tmp_path / "nope"), 16)
    (tmp_path / "special_tokens_map.json").write_text("{}")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json.*spiece\.model"):
        UMT5Tokenizer(str(tmp_path), 16)
    (tmp_path / "tokenizer.json").write_text("not json")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        UMT5Tokenizer(str(tmp_path), 16)


def test_tokenizer_truncation_and_padding(tokenizer_dir):
    tok = UMT5Tokenizer(tokenizer_dir, 6)
    ids, mask = tok(["a b c d e f g h i j k l", "", "  x  "])
    chex.assert_shape((ids, mask), (3, 6))
    assert ids[0, -1] == tok.eos_id and mask[0].all()  # truncated, still ends in </s>
    assert ids[1].tolist() == [tok.eos_id] + [tok.pad_id] * 5 and mask[1].tolist() == [1, 0, 0, 0, 0, 0]
    n = int(mask[2].sum())
    assert ids[2, n - 1] == tok.eos_id and (ids[2, n:] == tok.pad_id).all()


# --------------------------------------------------------------------------------------------------
# Converter errors
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field,delta", [("num_layers", 1), ("num_heads", 2), ("vocab_size", 8), ("dim_ffn", 4)])
def test_wrong_config_checkpoint(field, delta):
    cfg, path = _fixture_cfg()
    wrong = dataclasses.replace(cfg, **{field: getattr(cfg, field) * delta if field == "num_heads"
                                        else getattr(cfg, field) + delta})
    with pytest.raises(ConversionError, match=rf"text\.{field}: checkpoint implies {getattr(cfg, field)}"):
        convert_t5_state_dict(path, wrong)


def test_checkpoint_missing_and_unexpected_keys(tmp_path):
    import torch

    cfg, path = _fixture_cfg()
    sd = dict(load_torch_pickle(path))
    dropped = "blocks.1.ffn.fc2.weight"
    sd.pop(dropped)
    sd["blocks.0.attn.extra.weight"] = torch.zeros(2)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ConversionError) as e:
        convert_t5_state_dict(str(tmp_path / "bad.pth"), cfg)
    assert dropped in str(e.value) and "blocks.0.attn.extra.weight" in str(e.value)
    with pytest.raises(ConversionError, match="no such file"):
        convert_t5_state_dict(str(tmp_path / "absent.pth"), cfg)


def test_converter_transposes_and_keeps_dtype():
    import ml_dtypes

    cfg, path = _fixture_cfg()
    sd = load_torch_pickle(path)
    p = convert_t5_state_dict(path, cfg)
    q = sd["blocks.1.attn.q.weight"].numpy()  # torch [out, in]
    np.testing.assert_array_equal(p["blocks"]["attn"]["q"]["kernel"][1], q.T)
    np.testing.assert_array_equal(p["blocks"]["ffn"]["gate"]["kernel"][0], sd["blocks.0.ffn.gate.0.weight"].numpy().T)
    assert all(x.dtype == np.float32 for x in jax.tree_util.tree_leaves(p))
    p16 = convert_t5_state_dict(path, cfg, dtype=ml_dtypes.bfloat16)
    assert all(x.dtype == ml_dtypes.bfloat16 for x in jax.tree_util.tree_leaves(p16))


# --------------------------------------------------------------------------------------------------
# TextEncoder
# --------------------------------------------------------------------------------------------------


def test_text_encoder_cache_and_batching(params, tokenizer_dir):
    tok = UMT5Tokenizer(tokenizer_dir, TINY.text_len)
    enc = TextEncoder(tok, jax.device_get(params), TINY, batch_size=2)
    prompts = ["a red fox", "a blue bird", "a red fox", "snow  falls"]
    out = enc.encode(prompts)
    chex.assert_shape(out, (4, TINY.text_len, TINY.dim))
    assert enc.num_encoded == 3 and enc.num_forward_calls == 2  # 3 distinct prompts, batches of <= 2
    ids, mask = tok(prompts)
    np.testing.assert_allclose(np.asarray(out), np.asarray(jax.jit(t5.prompt_embeds, static_argnums=1)(params, TINY, ids, mask)),
                               atol=1e-6, rtol=0)
    np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(out[2]))
    # same cleaned text -> cache hit, no forward
    again = enc.encode(["  a red\tfox ", "snow falls"])
    assert enc.num_encoded == 3 and enc.num_forward_calls == 2 and enc.cached("a   red fox")
    np.testing.assert_array_equal(np.asarray(again), np.asarray(out[jnp.array([0, 3])]))
    enc.encode("a green frog")
    assert enc.num_encoded == 4 and enc.num_forward_calls == 3


def test_text_encoder_device_and_drop_params(params, tokenizer_dir):
    tok = UMT5Tokenizer(tokenizer_dir, TINY.text_len)
    device = jax.devices()[-1]
    enc = TextEncoder(tok, jax.device_get(params), TINY, device=device)
    out = enc.encode(["a cat", "a dog"])
    assert out.devices() == {device}
    owned = jax.tree_util.tree_leaves(enc.params)
    enc.drop_params()
    assert not enc.has_params and all(x.is_deleted() for x in owned)
    np.testing.assert_array_equal(np.asarray(enc.encode(["a dog"]))[0], np.asarray(out[1]))
    with pytest.raises(RuntimeError, match="drop_params"):
        enc.encode(["a bird"])
    # params that already live on the device are the caller's: dropping must not delete them
    enc2 = TextEncoder(tok, params, TINY)
    enc2.encode("x")
    enc2.drop_params()
    assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(params))


def test_text_encoder_rejects_mismatched_tokenizer(params, tokenizer_dir):
    with pytest.raises(ValueError, match="text_len"):
        TextEncoder(UMT5Tokenizer(tokenizer_dir, TINY.text_len + 1), params, TINY)
    small = dataclasses.replace(TINY, vocab_size=64)
    with pytest.raises(ValueError, match="vocab_size"):
        TextEncoder(UMT5Tokenizer(tokenizer_dir, TINY.text_len), t5.abstract_params(small), small)
