"""Wan DiT unit tests: shapes, parameter counts, causal == bidirectional where they must agree, RoPE accuracy."""
from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memflow_jax import config as config_lib
from memflow_jax.config import ModelConfig
from memflow_jax.nn import attention as attn_lib
from memflow_jax.nn import dit
from memflow_jax.nn.rope import apply_rope, precise_cos_sin, rope_tables, sinusoidal_embedding
from tests import rand

TINY = ModelConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, freq_dim=32, text_len=8, text_dim=12,
                   in_dim=4, out_dim=4)

# compiled once per config and shape: run eagerly, a forward dispatches (and compiles) hundreds of single ops
_forward = jax.jit(dit.forward, static_argnums=1)


def _count_formula(c: ModelConfig) -> int:
    """Parameter count of the torch WanModel modules (Linear: in*out + out; norms as stated)."""
    lin = lambda i, o: i * o + o  # noqa: E731
    p = math.prod(c.patch_size)
    block = (2 * (4 * lin(c.dim, c.dim) + 2 * c.dim)  # self + cross attention (q,k,v,o + norm_q/k)
             + 2 * c.dim  # norm3 (affine)
             + lin(c.dim, c.ffn_dim) + lin(c.ffn_dim, c.dim) + 6 * c.dim)  # ffn + modulation
    outer = (lin(c.in_dim * p, c.dim) + lin(c.text_dim, c.dim) + lin(c.dim, c.dim) + lin(c.freq_dim, c.dim)
             + lin(c.dim, c.dim) + lin(c.dim, 6 * c.dim) + lin(c.dim, c.out_dim * p) + 2 * c.dim)
    return c.num_layers * block + outer


@pytest.mark.parametrize("yaml", ["configs/wan_1_3b.yaml", "configs/wan_14b_teacher.yaml", "configs/tiny.yaml"])
def test_param_count_full_size(yaml):
    cfg = config_lib.load(yaml).model
    n = dit.count_params(dit.abstract_params(cfg))
    print(f"{yaml}: {n:,} parameters")
    assert n == _count_formula(cfg)
    if "1_3b" in yaml:
        assert abs(n - 1.3e9) < 0.15e9  # "1.3B"
    if "14b" in yaml:
        assert abs(n - 14e9) < 0.5e9


def test_stacked_block_params_and_shapes():
    p = dit.init_params(TINY, jax.random.PRNGKey(0))
    chex.assert_shape(p["blocks"]["self_attn"]["q"]["kernel"], (2, 32, 32))
    chex.assert_shape(p["blocks"]["modulation"], (2, 6, 32))
    chex.assert_shape(p["patch_embedding"]["kernel"], (4 * 4, 32))
    x = rand.normal(jax.random.PRNGKey(1), (2, 4, 3, 6, 8))
    ctx = rand.normal(jax.random.PRNGKey(2), (2, 8, 12))
    out = _forward(p, TINY, x, jnp.array([999.0, 10.5]), ctx)
    chex.assert_shape(out, x.shape)
    chex.assert_tree_all_finite(out)
    with pytest.raises(ValueError, match="text_dim"):  # shape checks: raised while tracing
        _forward(p, TINY, x, jnp.array([1.0, 2.0]), ctx[..., :5])
    with pytest.raises(ValueError, match="divisible"):
        _forward(p, TINY, x[..., :5], jnp.array([1.0, 2.0]), ctx)


def test_causal_chunk_with_full_attention_equals_bidirectional():
    """chunk_forward at f0=0 with plain self-attention over the chunk is the bidirectional forward."""
    p = dit.init_params(TINY, jax.random.PRNGKey(0))
    p = jax.jit(lambda p: jax.tree_util.tree_map(
        lambda a: a + 0.01 * rand.normal(jax.random.PRNGKey(3), a.shape), p))(p)
    x = rand.normal(jax.random.PRNGKey(1), (1, 4, 3, 4, 4))
    ctx = rand.normal(jax.random.PRNGKey(2), (1, 8, 12))
    t = jnp.array([[500.0, 400.0, 300.0]])
    ref = _forward(p, TINY, x, t, ctx)
    tk, tv = jax.jit(dit.text_kv, static_argnums=1)(p, TINY, ctx)
    got, _ = jax.jit(lambda p, x, t, f0, tk, tv: dit.chunk_forward(
        p, TINY, x, t, f0, tk, tv, lambda q, k, v, _: (attn_lib.attention(q, k, v, impl="xla"), None)))(
        p, x, t, jnp.array(0), tk, tv)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_a_prompt_per_frame():
    """``forward`` with per-frame prompt embeddings ``[B, F, T, D]``: one prompt repeated on every frame is the
    single-prompt forward; a second segment's prompt changes its frames; a wrong frame count names the fix.
    ``rollout.frame_contexts`` picks each latent frame's segment from the switch frames."""
    from memflow_jax.training.rollout import NO_SWITCH, frame_contexts

    p = dit.init_params(TINY, jax.random.PRNGKey(0))  # its head is zero: perturbed so the output depends on the text
    p = jax.jit(lambda p: jax.tree_util.tree_map(
        lambda a: a + 0.01 * rand.normal(jax.random.PRNGKey(3), a.shape), p))(p)
    x = rand.normal(jax.random.PRNGKey(1), (1, 4, 3, 4, 4))
    a, b = (rand.normal(jax.random.PRNGKey(k), (1, 8, 12)) for k in (2, 3))
    t = jnp.array([[500.0, 400.0, 300.0]])
    one = _forward(p, TINY, x, t, a)
    same = _forward(p, TINY, x, t, jnp.repeat(a[:, None], 3, axis=1))
    np.testing.assert_allclose(np.asarray(same), np.asarray(one), rtol=1e-5, atol=1e-6)
    segs = frame_contexts(jnp.stack([a[0], b[0], b[0]])[None], jnp.array([[2, NO_SWITCH]]), 3)  # frames a, a, b
    chex.assert_trees_all_equal(segs, jnp.stack([a[0], a[0], b[0]])[None])
    two = _forward(p, TINY, x, t, segs)
    assert float(jnp.abs(two - one).max()) > 1e-4
    with pytest.raises(ValueError, match="per-frame prompt embeddings"):
        _forward(p, TINY, x, t, segs[:, :2])


def test_fused_qkv_layout_is_the_same_model():
    """The sampler's layout (:func:`dit.fuse_self_qkv`: q/k/v kernels side by side) splits back to the module's
    params exactly, and the forward and the prompt's cross-attention K/V take it unchanged."""
    p = dit.init_params(TINY, jax.random.PRNGKey(0))
    pf = dit.fuse_self_qkv(p)
    attn = pf["blocks"]["self_attn"]
    chex.assert_shape(attn["qkv"]["kernel"], (TINY.num_layers, TINY.dim, 3 * TINY.dim))
    chex.assert_shape(attn["qkv"]["bias"], (TINY.num_layers, 3 * TINY.dim))
    assert not {"q", "k", "v"} & set(attn) and dit.fuse_self_qkv(pf) is pf
    chex.assert_trees_all_equal(dit.split_self_qkv(pf["blocks"]), p["blocks"])
    x = rand.normal(jax.random.PRNGKey(1), (1, 4, 3, 4, 4))
    ctx = rand.normal(jax.random.PRNGKey(2), (1, 8, 12))
    t = jnp.array([[500.0, 400.0, 300.0]])
    np.testing.assert_allclose(np.asarray(_forward(pf, TINY, x, t, ctx)), np.asarray(_forward(p, TINY, x, t, ctx)),
                               rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_equal(dit.text_kv(pf, TINY, ctx), dit.text_kv(p, TINY, ctx))


def test_cache_only_forward_drops_the_last_layer_and_writes_the_same_state():
    """``run_blocks(need_output=False)`` (a forward run for what its layers write, the sampler's clean pass on an
    accelerator): the last layer runs outside the scan with its output dropped; the carried state and the stacked
    per-layer outputs equal the whole scan's."""
    params = dit.init_params(TINY, jax.random.PRNGKey(0))
    n, s = 6, 3  # tokens, frames
    x = rand.normal(jax.random.PRNGKey(1), (1, n, TINY.dim))
    e0 = rand.normal(jax.random.PRNGKey(2), (1, s, 6, TINY.dim))
    cos, sin = rope_tables(0, s, 1, n // s, TINY.head_dim)
    tk, tv = dit.text_kv(params, TINY, rand.normal(jax.random.PRNGKey(3), (1, TINY.text_len, TINY.text_dim)))

    def attend(q, k, v, layer):  # what a cache-writing forward hands back: its keys, plus the old slot it read
        return attn_lib.attention(q, k, v, impl="xla"), {"kv": k + layer, "first": v[:, :1]}

    def write(state, i, outs):
        outs = dict(outs)
        return state.at[i].set(outs.pop("kv")), outs

    def run(need_output):
        carry = dit.LayerCarry(jnp.zeros((TINY.num_layers, 1, n, TINY.num_heads, TINY.head_dim)),
                               lambda st, i, _: st[i], write)
        return dit.run_blocks(params, TINY, x, e0, cos, sin, tk, tv, attend, None, carry, need_output=need_output)

    (h, full), (none, peeled) = jax.jit(lambda: (run(True), run(False)))()
    assert none is None and h.shape == x.shape and full["first"].shape[0] == TINY.num_layers
    chex.assert_trees_all_close(peeled, full, rtol=1e-6, atol=1e-6)  # the carried state and the stacked outputs
    assert float(jnp.abs(full["carry"][-1]).max()) > 0  # the last layer's write is there


def test_remat_policies_match():
    p = dit.init_params(TINY, jax.random.PRNGKey(0))
    x = rand.normal(jax.random.PRNGKey(1), (1, 4, 1, 4, 4))
    ctx = jnp.ones((1, 8, 12))

    def loss(params, cfg):
        return jnp.sum(dit.forward(params, cfg, x, jnp.array([3.0]), ctx) ** 2)

    grad = jax.jit(jax.grad(loss), static_argnums=1)  # remat acts on the compiled program
    g0 = grad(p, TINY)
    for remat in ("full", "dots"):
        cfg = ModelConfig(**{**TINY.__dict__, "remat": remat})
        g = grad(p, cfg)
        chex.assert_trees_all_close(g, g0, rtol=1e-5, atol=1e-6)


def test_precise_cos_sin_float64_accuracy_at_any_position():
    freqs = np.power(10000.0, -np.arange(64) / 64)
    t = np.array([0.0, 1000.0, 937.5, 833.3333129882812, 512.3, 999.99], np.float32)
    c, s = precise_cos_sin(jnp.asarray(t), freqs)
    ang = t.astype(np.float64)[:, None] * freqs
    assert np.abs(np.asarray(c) - np.cos(ang)).max() < 5e-7
    assert np.abs(np.asarray(s) - np.sin(ang)).max() < 5e-7
    pos = np.array([0, 7, 1023, 1024, 123456, 9_999_999])  # far past any fixed 1024-frame table
    c, s = precise_cos_sin(jnp.asarray(pos, jnp.int32), freqs)
    assert np.abs(np.asarray(c) - np.cos(pos[:, None] * freqs)).max() < 5e-7
    emb = sinusoidal_embedding(jnp.asarray([250.0]), 32)
    chex.assert_shape(emb, (1, 32))


def test_rope_relative_property_and_offsets():
    """<R(p)q, R(p')k> depends only on p - p': shifting every frame by the same offset changes nothing."""
    d = 16
    q = rand.normal(jax.random.PRNGKey(0), (1, 2 * 2 * 3, 1, d))
    k = rand.normal(jax.random.PRNGKey(1), (1, 2 * 2 * 3, 1, d))
    def logits(f0):
        c, s = rope_tables(jnp.array(f0), 2, 2, 3, d)
        return jnp.einsum("bqhd,bkhd->qk", apply_rope(q, c, s), apply_rope(k, c, s))
    np.testing.assert_allclose(np.asarray(logits(0)), np.asarray(logits(5000)), rtol=1e-4, atol=1e-4)
    c, s = rope_tables(jnp.array([0, 3]), 2, 2, 3, d)  # per-batch offsets
    chex.assert_shape(c, (2, 12, d // 2))


def test_attention_dispatcher_masks():
    q = rand.normal(jax.random.PRNGKey(0), (2, 5, 2, 8))
    k = rand.normal(jax.random.PRNGKey(1), (2, 7, 2, 8))
    v = rand.normal(jax.random.PRNGKey(2), (2, 7, 2, 8))
    full = attn_lib.attention(q[:, :, :, :], k[:, :4], v[:, :4], impl="xla")
    by_len = attn_lib.attention(q, k, v, kv_lengths=jnp.array([4, 4]), impl="xla")
    by_mask = attn_lib.attention(q, k, v, kv_mask=jnp.arange(7)[None] < 4 * jnp.ones((2, 1)), impl="xla")
    np.testing.assert_allclose(np.asarray(by_len), np.asarray(full), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(by_mask), np.asarray(full), rtol=1e-5, atol=1e-6)
    per_head = jnp.broadcast_to((jnp.arange(7) < 4)[None, None], (2, 2, 7))
    np.testing.assert_allclose(np.asarray(attn_lib.attention(q, k, v, kv_mask=per_head, impl="xla")),
                               np.asarray(full), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unknown attention impl"):
        attn_lib.attention(q, k, v, impl="bogus")
