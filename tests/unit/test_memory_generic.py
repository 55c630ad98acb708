"""The memory package drives a non-Wan toy causal model (the example of docs/memory_for_other_models.md)."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from memflow_jax.config import MemoryConfig
from memflow_jax.memory.attend import LayerMemory, make_attend_fn
from memflow_jax.memory.cache import CacheSpec, ForwardPlan, commit, init_cache, record_chunk, with_bank
from tests import rand

L, B, N, H, D, C, T = 2, 1, 4, 2, 8, 3, 5
mem = MemoryConfig(mode="nam", local_attn_size=9, sink_size=3, bank_size=2, record_interval=1, sma=True,
                   sma_top_k=2)
spec = CacheSpec.from_config(mem, num_layers=L, batch=B, tokens_per_frame=N, num_heads=H, head_dim=D,
                             chunk_frames=C)


def toy_step(params, cache, x, text_query, start, update_cache, q_bank):
    plan = ForwardPlan(start=start, q_bank=q_bank, recompute=jnp.array(False), zero_text_query=jnp.array(False))
    attend = make_attend_fn(spec, mem, plan, C, slot_frame=cache.slot_frame, bank_pointer=cache.bank_pointer,
                            proto_frame=cache.proto_frame, update_cache=update_cache)
    layers = LayerMemory(cache.k, cache.v, None, None, cache.bank_frame,  # None: the cache's bank slots
                         cache.proto_k, cache.proto_v, text_query)

    def layer(h, xs):
        w, mem_l = xs
        q, k, v = (jnp.einsum("bte,ehd->bthd", h, w[i]) for i in range(3))
        out, outs = attend(q, k, v, mem_l)
        return h + out.reshape(h.shape), outs

    h, outs = jax.lax.scan(layer, x, (params, layers))
    if update_cache:
        cache = commit(cache, outs, attend.new_slot_frame, start + C, attend.placement)
        cache = record_chunk(cache, outs, start, spec, rule="interactive")
    else:                                   # a q_bank pass changed the bank: keep it
        cache = with_bank(cache, outs)
    return h, cache


def test_toy_model_streams_with_nam_and_sma():
    params = 0.2 * rand.normal(jax.random.PRNGKey(0), (L, 3, H * D, H, D))
    tq = rand.normal(jax.random.PRNGKey(1), (L, B, T, H, D))
    step = jax.jit(toy_step, static_argnums=(5,))
    cache = init_cache(spec)
    shapes = jax.tree_util.tree_map(jnp.shape, cache)
    for chunk in range(12):
        x = rand.normal(jax.random.PRNGKey(10 + chunk), (B, C * N, H * D))
        start = jnp.array(chunk * C, jnp.int32)
        h, cache = step(params, cache, x, tq, start, False, jnp.array(True))  # "denoising" pass, bank update
        h, cache = step(params, cache, h, tq, start, True, jnp.array(False))  # clean pass writes the cache
        chex.assert_tree_all_finite(h)
        assert jax.tree_util.tree_map(jnp.shape, cache) == shapes
    assert int(cache.end_frame) == 36 and int(cache.bank_pointer) == 12
    # the bank holds recorded chunk starts (NAM keeps some, the newest prototype is last)
    frames = jnp.asarray(cache.bank_frame)
    assert bool(jnp.all(frames % C == 0)) and int(frames[0, 0, -1]) == 30
