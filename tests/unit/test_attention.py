"""The attention dispatcher's split-KV path (nn/attention.py): the log-sum-exp merge and the wave model."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memflow_jax.nn import attention as attn_lib
from tests import rand


@pytest.mark.parametrize("splits", [1, 2, 3])
def test_split_kv_merge_equals_full_attention(splits):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
    q = rand.normal(kq, (2, 5, 3, 8))  # [B, Lq, H, D]
    k = 3.0 * rand.normal(kk, (2, 12, 3, 8))  # large logits: the merge must be exact, not just smooth
    v = rand.normal(kv, (2, 12, 3, 8))
    hi = jax.lax.Precision.HIGHEST
    full = attn_lib.attention(q, k, v, impl="xla", precision=hi)
    split = attn_lib.split_kv_attention(q, k, v, splits,
                                        lambda a, b, c: attn_lib.xla_attention_lse(a, b, c, precision=hi))
    assert split.shape == full.shape and split.dtype == full.dtype
    np.testing.assert_allclose(np.asarray(split), np.asarray(full), rtol=1e-5, atol=1e-6)


def test_merge_lse_of_unequal_parts_equals_full_attention():
    """SMA's in-place path merges the window's segments with the gathered per-head frames: parts of any sizes."""
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(1), 3)
    q = rand.normal(kq, (2, 5, 3, 8))
    k = 3.0 * rand.normal(kk, (2, 12, 3, 8))
    v = rand.normal(kv, (2, 12, 3, 8))
    hi = jax.lax.Precision.HIGHEST
    full = attn_lib.attention(q, k, v, impl="xla", precision=hi)
    parts = [attn_lib.xla_attention_lse(q, k[:, a:z], v[:, a:z], precision=hi) for a, z in ((0, 2), (2, 9), (9, 12))]
    merged = attn_lib.merge_lse([o for o, _ in parts], [lse for _, lse in parts])
    assert merged.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(merged), np.asarray(full), rtol=1e-5, atol=1e-6)


def test_auto_kv_splits_wave_model():
    # cost(s) = ceil(tiles * s / SMs) / s with tiles = B * H * ceil(Lq / 128); a split needs a 5 % predicted gain
    def cost(tiles, s, sms):
        return -(-tiles * s // sms) / s

    sms = 132  # H100 SXM
    chunk, recache = 3 * 1560, 12 * 1560  # a 3-frame chunk and a 12-frame re-cache at 480x832
    tiles = 12 * -(-chunk // 128)
    assert cost(tiles, 2, sms) <= 0.95 * cost(tiles, 1, sms)
    assert attn_lib.auto_kv_splits(1, chunk, 12, 15 * 1560, num_sms=sms) == 2
    tiles = 12 * -(-recache // 128)
    assert cost(tiles, 2, sms) > 0.95 * cost(tiles, 1, sms)  # 14 -> 13.5 waves: not worth the merge
    assert attn_lib.auto_kv_splits(1, recache, 12, 15 * 1560, num_sms=sms) == 1
    assert attn_lib.auto_kv_splits(1, chunk, 12, 15 * 1560 + 1, num_sms=sms) == 1  # no divisor of Lk fits
    assert attn_lib.auto_kv_splits(1, chunk, 12, 15 * 1560, num_sms=0) == 1  # not a GPU
    if jax.default_backend() != "gpu":
        assert attn_lib.auto_kv_splits(1, chunk, 12, 15 * 1560) == 1


def test_kv_splits_must_divide_key_length():
    q = jnp.zeros((1, 4, 2, 8), jnp.bfloat16)
    k = jnp.zeros((1, 10, 2, 8), jnp.bfloat16)
    with pytest.raises(ValueError, match="kv_splits=3 does not divide the key length 10"):
        attn_lib.attention(q, k, k, impl="cudnn", kv_splits=3)


def test_in_place_segments_choice():
    seg = attn_lib.in_place_segments
    assert seg(1000, 2, 8, 176, 1, backend="gpu") == 2  # at least 2 segments
    assert seg(1000, 2, 8, 176, 4, backend="gpu") == 4  # the requested split when it divides the length
    assert seg(1000, 2, 8, 177, 2, backend="gpu") == 3  # else the first divisor in 2..4
    assert seg(1000, 2, 8, 175, 2, backend="gpu") == 0  # none divides: gather path
    assert seg(1 << 24, 12, 128, 176, 2, backend="gpu") == 0  # int32 element offsets would overflow
    assert seg(1000, 2, 8, 176, 2, backend="cpu") == 0


@pytest.mark.parametrize("mask_kind", ["none", "lengths", "per_head"])
def test_cpu_flash_path_equals_plain_path(mask_kind, monkeypatch):
    """Long key sets on CPU run over key blocks with an online softmax; same result as the materialised logits,
    with key lengths, per-head masks (SMA), blocks wholly masked for some rows and blocks skipped for all."""
    kq, kk, kv, km = jax.random.split(jax.random.PRNGKey(2), 4)
    q = rand.normal(kq, (2, 6, 3, 8))
    k = 3.0 * rand.normal(kk, (2, 40, 3, 8))
    v = rand.normal(kv, (2, 40, 3, 8))
    hi = jax.lax.Precision.HIGHEST
    kw = {}
    if mask_kind == "lengths":
        kw["kv_lengths"] = jnp.array([30, 13], jnp.int32)  # row 1: blocks 2-4 of 8 keys masked; block 4: both
    elif mask_kind == "per_head":
        mask = jax.random.bernoulli(km, 0.5, (2, 3, 40)).at[:, :, 0].set(True)
        kw["kv_mask"] = mask.at[1, 2, 8:].set(False)
    monkeypatch.setattr(attn_lib, "_FLASH_MIN_KEYS", 1 << 30)
    plain = attn_lib.attention(q, k, v, impl="xla", precision=hi, **kw)
    monkeypatch.setattr(attn_lib, "_FLASH_MIN_KEYS", 16)
    monkeypatch.setattr(attn_lib, "_FLASH_MIN_BLOCK", 8)
    monkeypatch.setattr(attn_lib, "_FLASH_MAX_BLOCK", 8)
    assert attn_lib._key_block(40) == (8 if jax.default_backend() == "cpu" else 0)
    flash = attn_lib.attention(q, k, v, impl="xla", precision=hi, **kw)
    assert flash.shape == plain.shape and flash.dtype == plain.dtype
    np.testing.assert_allclose(np.asarray(flash), np.asarray(plain), rtol=1e-5, atol=1e-6)


def test_cpu_flash_path_gradients_equal_plain_path(monkeypatch):
    """The flash path is differentiable (training may run it on CPU) and its gradients match the plain path's."""
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(3), 3)
    q, k, v = (rand.normal(key, (1, 4 if key is kq else 32, 2, 8)) for key in (kq, kk, kv))
    lengths = jnp.array([20], jnp.int32)  # block 3 of 8 keys is skipped
    hi = jax.lax.Precision.HIGHEST

    def loss(q, k, v):
        return jnp.sum(jnp.sin(attn_lib.attention(q, k, v, kv_lengths=lengths, impl="xla", precision=hi)))

    monkeypatch.setattr(attn_lib, "_FLASH_MIN_KEYS", 1 << 30)
    plain = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    monkeypatch.setattr(attn_lib, "_FLASH_MIN_KEYS", 16)
    monkeypatch.setattr(attn_lib, "_FLASH_MIN_BLOCK", 8)
    monkeypatch.setattr(attn_lib, "_FLASH_MAX_BLOCK", 8)
    flash = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    for g, want in zip(flash, plain):
        np.testing.assert_allclose(np.asarray(g), np.asarray(want), rtol=1e-5, atol=1e-6)
