"""Training loop pieces: LoRA trees, the Self-Forcing rollout (parity with the streaming sampler, gradients only
through exit steps, detached memory), streaming bookkeeping, and tiny end-to-end runs of the recipes.

The multi-device run (tiny dmd_long on a 2 x 4 mesh, checkpoint resume) is in test_training_multidevice.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memflow_jax import config as cfg_lib
from memflow_jax.diffusion import scheduler as sch
from memflow_jax.memory.cache import ForwardPlan
from memflow_jax.sampling.streaming import StreamingSampler
from memflow_jax.training import lora as lora_lib
from memflow_jax.training import losses
from memflow_jax.training import rollout as ro
from memflow_jax.training import trainer as tr
from tests import rand

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(ROOT, "configs")


def _cfg(name: str = "tiny_dmd_long", *overrides: str) -> cfg_lib.Config:
    return cfg_lib.load(os.path.join(CONFIGS, f"{name}.yaml"), list(overrides))


_init_jit = jax.jit(tr.synthetic_init, static_argnums=0)


def _init(mcfg, seed: int):
    """Synthetic random params (jitted: one compile per config instead of hundreds of eager ops)."""
    return _init_jit(mcfg, jax.random.key(seed))


def _tree_norm(tree) -> float:
    return float(jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(tree))))


# --------------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------------


def test_lora_init_merge_and_save_round_trip(tmp_path):
    cfg = _cfg()
    params = _init(cfg.model, 0)
    rank, alpha = 4, 8.0
    lora = lora_lib.init_lora(params, rank, jax.random.key(1))
    assert lora_lib.lora_targets(lora) == list(lora_lib.LORA_TARGETS)
    L, d, f = cfg.model.num_layers, cfg.model.dim, cfg.model.ffn_dim
    chex.assert_shape(lora["blocks"]["self_attn"]["q"]["a"], (L, d, rank))
    chex.assert_shape(lora["blocks"]["ffn_0"]["b"], (L, rank, f))
    chex.assert_shape(lora["blocks"]["ffn_2"]["a"], (L, f, rank))
    # peft init: a ~ U(+-1/sqrt(in)), b = 0 -> a fresh adapter leaves the model unchanged
    a = np.asarray(lora["blocks"]["ffn_2"]["a"])
    assert np.abs(a).max() <= 1 / np.sqrt(f) and np.abs(a).max() > 0.5 / np.sqrt(f)
    merged = lora_lib.merge_lora_params(params, lora, lora_lib.lora_scale(alpha, rank))
    chex.assert_trees_all_equal(merged, params)
    # non-zero b: kernel + (alpha / r) a @ b on every target, nothing else touched
    lora = jax.tree_util.tree_map(lambda x: x + 0.1, lora)
    merged = lora_lib.merge_lora_params(params, lora, alpha / rank)
    for module in ("self_attn/q", "cross_attn/o", "ffn_0"):
        node = lora["blocks"]
        k = params["blocks"]
        m = merged["blocks"]
        for part in module.split("/"):
            node, k, m = node[part], k[part], m[part]
        want = np.asarray(k["kernel"]) + alpha / rank * np.einsum("lir,lro->lio", node["a"], node["b"])
        np.testing.assert_allclose(np.asarray(m["kernel"]), want, rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_equal(m["bias"], k["bias"])
    chex.assert_trees_all_equal(merged["head"], params["head"])
    chex.assert_trees_all_equal(merged["blocks"]["modulation"], params["blocks"]["modulation"])
    # gradients reach both factors through the merge
    g = jax.grad(lambda lo: jnp.sum(lora_lib.merge_lora_params(params, lo, 2.0)["blocks"]["ffn_0"]["kernel"] ** 2))(
        lora)
    assert _tree_norm(g["blocks"]["ffn_0"]) > 0 and _tree_norm(g["blocks"]["self_attn"]) == 0
    out = lora_lib.save_lora(str(tmp_path / "lora"), {"generator_lora": lora}, rank=rank, alpha=alpha)
    back, meta = lora_lib.load_lora(out, "generator_lora", jax.eval_shape(lambda x: x, lora))
    chex.assert_trees_all_equal(back, lora)
    assert meta == {"rank": rank, "alpha": alpha, "scale": alpha / rank}
    teacher = jax.eval_shape(lambda: tr.synthetic_init(cfg.teacher_model, jax.random.key(2)))
    wrong = jax.eval_shape(lambda: lora_lib.init_lora(teacher, rank, jax.random.key(3)))  # shapes are enough
    with pytest.raises(ValueError, match="do not fit"):
        lora_lib.merge_lora_params(params, wrong, 1.0)


# --------------------------------------------------------------------------------------------------
# Streaming bookkeeping (host side)
# --------------------------------------------------------------------------------------------------


def test_streaming_host_bookkeeping_matches_reference_rules():
    # reference train_long: 21-frame windows, 18 new frames after the first, 240-frame sequences
    host = ro.StreamHost(active=True, length=0, max_length=240)
    assert ro.new_frame_choices(host, 21, 18, 3) == [21]
    host.length = 21
    assert ro.new_frame_choices(host, 21, 18, 3) == [18]  # range(18, min(240 - 21 + 1, 21), 3)
    lengths = [21]
    while host.can_generate_more(18):
        host.length += 18
        lengths.append(host.length)
    assert lengths[-1] == 237 and not host.can_generate_more(18)  # 237 + 18 > 240: a new sequence starts
    host = ro.StreamHost(active=True, length=30, max_length=60)
    assert ro.new_frame_choices(host, 21, 12, 3) == [12, 15, 18]
    with pytest.raises(ValueError, match="streaming_min_new_frame"):
        ro.new_frame_choices(host, 21, 21, 3)
    t = _cfg("dmd_long").train
    rng = np.random.default_rng(0)
    draws = {ro.choose_switch_frame(t, 240, 3, rng) for _ in range(200)}
    assert draws == set(t.switch_choices)  # every choice < 240 is drawn
    assert {ro.choose_switch_frame(t, 60, 3, rng) for _ in range(50)} == {21, 39, 57}  # only choices < length
    with pytest.raises(ValueError, match="chunk-aligned"):
        ro.choose_switch_frame(_cfg("dmd_long", "train.switch_choices=[20]").train, 240, 3, rng)


# --------------------------------------------------------------------------------------------------
# Rollout
# --------------------------------------------------------------------------------------------------


def test_rollout_matches_streaming_sampler_with_a_switch():
    """With the last step as exit and the inference pipeline's switches (no ctx noise at t=0, no q_bank repeat,
    no cache reset), the training rollout is the sampler: same noise -> same frames, re-cache included."""
    cfg = _cfg()
    b, f, sw = 2, 12, 6
    rc = ro.rollout_config(cfg, b, last_step_only=True, ctx_noise_always=False, ctx_qbank_quirk=False,
                           reset_cache_at_switch=False, bank_record_rule="interactive")
    params = _init(rc.model, 0)
    ctx1 = rand.normal(jax.random.key(1), (b, rc.model.text_len, rc.model.text_dim))
    ctx2 = rand.normal(jax.random.key(2), ctx1.shape)
    rng = jax.random.key(3)
    x, mask, aux = jax.jit(lambda p, c1, c2: ro.rollout(p, rc, rng, (c1, c2), num_frames=f, switch_frame=sw))(
        params, ctx1, ctx2)
    chex.assert_shape(x, (b, f) + rc.latent_shape)
    chex.assert_shape(mask, (b, f, 1, 1, 1))
    assert bool(jnp.all(mask)) and int(aux["state"].frame) == f
    np.testing.assert_array_equal(np.asarray(aux["exit_steps"]), rc.num_steps - 1)
    s = StreamingSampler(params, rc.model, rc.memory, cfg.sampler, batch_size=b, latent_hw=rc.latent_shape[1:])
    state = s.init_state()
    texts = s.prompt_kv(ctx1), s.prompt_kv(ctx2)
    _, k_noise = jax.random.split(rng)
    outs = []
    for i in range(f // rc.chunk_frames):
        if i * rc.chunk_frames == sw:
            state, _ = s.recache(state, texts[1])
        noise, step_noise, ctx_noise = ro.chunk_noise(k_noise, rc, i)
        state, x0, _ = s.chunk(state, texts[int(i * rc.chunk_frames >= sw)], noise, step_noise, ctx_noise)
        outs.append(x0)
    np.testing.assert_allclose(np.asarray(x), np.asarray(jnp.concatenate(outs, 1)), rtol=1e-5, atol=2e-6)
    chex.assert_trees_all_close(aux["state"].cache.k, state.cache.k, rtol=1e-5, atol=2e-6)


def test_teacher_forced_story_is_the_sampler_on_its_own_frames():
    """With one denoising step the sampler's chunk input is pure noise, so teacher forcing on the frames a
    rollout (with the sampler's memory semantics) made must predict those frames: same cache, same NAM bank,
    same re-cache. Per-sample switch frames (6 and 3) check that only the switching sample takes the re-cache."""
    cfg = _cfg("tiny_dmd_long", "sampler.denoising_step_list=[1000]")
    b, f = 2, 9
    rc = ro.story_config(cfg, b)
    assert rc.num_steps == 1 and not (rc.ctx_noise_always or rc.ctx_qbank_quirk or rc.reset_cache_at_switch)
    params = _init(rc.model, 0)
    ctx1 = rand.normal(jax.random.key(1), (b, rc.model.text_len, rc.model.text_dim))
    ctx2 = rand.normal(jax.random.key(2), ctx1.shape)
    rng = jax.random.key(3)
    roll = jax.jit(lambda p, sw: ro.rollout(p, rc, rng, (ctx1, ctx2), num_frames=f, switch_frame=sw)[0],
                   static_argnums=1)
    xa, xb = roll(params, 6), roll(params, 3)
    gt = jnp.stack([xa[0], xb[1]])
    contexts = jnp.stack([ctx1, ctx2], axis=1)  # [B, P=2, T, D]
    switches = jnp.asarray([[6], [3]], jnp.int32)
    pred, aux = jax.jit(lambda p, g, c, s: ro.teacher_forced_story(p, rc, g, c, s, rng))(params, gt, contexts,
                                                                                        switches)
    chex.assert_shape(pred, gt.shape)
    chex.assert_shape(aux["exit_steps"], (f // rc.chunk_frames, b))
    np.testing.assert_allclose(np.asarray(pred), np.asarray(gt), rtol=1e-5, atol=2e-6)


def _story_case(switch_frames, f: int = 9):
    """A tiny story batch: (rc, params, latents [B, f, ...], contexts [B, P, T, D], switch frames [B, P - 1])."""
    sw = jnp.asarray(switch_frames, jnp.int32)
    b, segments = sw.shape[0], sw.shape[1] + 1
    rc = ro.story_config(_cfg(), b)
    gt = rand.normal(jax.random.key(1), (b, f) + rc.latent_shape)
    ctx = rand.normal(jax.random.key(2), (b, segments, rc.model.text_len, rc.model.text_dim))
    return rc, _init(rc.model, 0), gt, ctx, sw


def test_teacher_forced_story_on_trajectory_states_is_the_noised_story():
    """``states``: the drawn step's state replaces fresh noise on the latents. States made of the very noise the
    function draws (``chunk_noise`` of its second key) at each step's timestep must give its default predictions."""
    rc, params, gt, ctx, sw = _story_case([[3], [6]])
    b, f = gt.shape[:2]
    rng = jax.random.key(3)
    _, k_noise = jax.random.split(rng)
    noise = jnp.concatenate([ro.chunk_noise(k_noise, rc, i)[0] for i in range(f // rc.chunk_frames)], 1)
    sched = rc.schedule()
    states = jnp.stack([sch.add_noise(sched, gt, noise, jnp.full((b, f), t, jnp.float32)) for t in rc.timesteps], 1)
    chex.assert_shape(states, (b, rc.num_steps, f) + rc.latent_shape)
    run = jax.jit(lambda p, st: ro.teacher_forced_story(p, rc, gt, ctx, sw, rng, states=st))
    want, aux = jax.jit(lambda p: ro.teacher_forced_story(p, rc, gt, ctx, sw, rng))(params)
    got, aux2 = run(params, states)
    np.testing.assert_array_equal(np.asarray(aux["exit_steps"]), np.asarray(aux2["exit_steps"]))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=2e-6)
    other, _ = run(params, states + 0.5)  # the states are the input: other states, other predictions
    assert float(jnp.max(jnp.abs(other - want))) > 1e-3
    with pytest.raises(ValueError, match="one noisy state per denoising step"):
        ro.teacher_forced_story(params, rc, gt, ctx, sw, rng, states=states[:, 1:])


@pytest.mark.parametrize("slow", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["errors", "gradient"])
def test_teacher_forced_story_gradient_and_errors(slow):
    rc, params, gt, ctx, sw = _story_case([[3, ro.NO_SWITCH]])

    def loss(p):
        pred, aux = ro.teacher_forced_story(p, rc, gt, ctx, sw, jax.random.key(4), exit_choices=(1, 2))
        return jnp.mean(jnp.square(pred - gt)), aux

    with pytest.raises(ValueError, match="exit_choices"):
        ro.teacher_forced_story(params, rc, gt, ctx, sw, jax.random.key(4), exit_choices=(rc.num_steps,))
    with pytest.raises(ValueError, match="switch_frames"):
        ro.teacher_forced_story(params, rc, gt, ctx, sw[:, :1], jax.random.key(4))
    with pytest.raises(ValueError, match="one prompt embedding per segment"):
        ro.teacher_forced_story(params, rc, gt, ctx[:, :, :1], sw, jax.random.key(4))
    if not slow:
        return
    (value, aux), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    assert np.isfinite(float(value)) and _tree_norm(grads) > 0
    assert set(np.unique(np.asarray(aux["exit_steps"]))) <= {1, 2}


def test_story_rollout_is_the_rollout_per_sample():
    """Stories that switch at different frames (6 and 3): each sample's frames are those of the two-prompt rollout
    that switches where it does, from the same draws (chunk noise, exit steps), so only the switching sample takes
    the re-cache and it is the rollout's."""
    cfg = _cfg()
    b, f = 2, 9
    rc = ro.story_config(cfg, b)
    params = _init(rc.model, 0)
    ctx1 = rand.normal(jax.random.key(1), (b, rc.model.text_len, rc.model.text_dim))
    ctx2 = rand.normal(jax.random.key(2), ctx1.shape)
    rng = jax.random.key(3)
    roll = jax.jit(lambda p, sw: ro.rollout(p, rc, rng, (ctx1, ctx2), num_frames=f, switch_frame=sw),
                   static_argnums=1)
    (xa, _, aux_a), (xb, _, _) = roll(params, 6), roll(params, 3)
    contexts = jnp.stack([ctx1, ctx2], axis=1)  # [B, P=2, T, D]
    switches = jnp.asarray([[6], [3]], jnp.int32)
    x, aux = jax.jit(lambda p: ro.story_rollout(p, rc, rng, contexts, switches, num_frames=f))(params)
    chex.assert_shape(x, (b, f) + rc.latent_shape)
    np.testing.assert_array_equal(np.asarray(aux["exit_steps"]), np.asarray(aux_a["exit_steps"]))
    np.testing.assert_allclose(np.asarray(x), np.asarray(jnp.stack([xa[0], xb[1]])), rtol=1e-5, atol=2e-6)
    assert float(jnp.max(jnp.abs(xa[1] - xb[1]))) > 1e-3  # the switch frame matters: the check can fail
    with pytest.raises(ValueError, match="whole chunks"):
        ro.story_rollout(params, rc, rng, contexts, switches, num_frames=f - 1)


def _explicit_chunk(rc, rng, ctx, p_steps, p_exit):
    """One chunk from an empty memory, written out step by step: steps 0..S-2 with p_steps, the exit (last)
    step with p_exit. With p_steps = stop_gradient(p) this is what the rollout differentiates."""
    sched = rc.schedule()
    _, k_noise = jax.random.split(rng)
    noise, step_noise, _ = ro.chunk_noise(k_noise, rc, 0)
    cache = ro.init_state(rc).cache
    bank = (cache.bank_k, cache.bank_v, cache.bank_frame)
    texts = ro.prompt_kv(p_steps, rc, ctx), ro.prompt_kv(p_exit, rc, ctx)
    x = noise
    s_last = rc.num_steps - 1
    for s, t in enumerate(rc.timesteps):
        plan = ForwardPlan(start=jnp.array(0, jnp.int32), q_bank=jnp.array(s == 0), recompute=jnp.array(False),
                           zero_text_query=jnp.array(False))
        p, text = (p_exit, texts[1]) if s == s_last else (p_steps, texts[0])
        flow, tt, outs, _ = ro._forward(p, rc, cache, x, t, plan, text, False, bank)
        x0 = sch.flow_to_x0(sched, flow, x, tt)
        if s < s_last:
            x = sch.add_noise(sched, x0, step_noise[s], jnp.full_like(tt, rc.timesteps[s + 1]))
            bank = outs["bank"]
    return x0


def _one_chunk_setup(cfg):
    """Rollout config (exit step = last step), params, a context, an rng and a random loss weight for one chunk."""
    rc = ro.rollout_config(cfg, 1, last_step_only=True)
    c = rc.chunk_frames
    params = _init(rc.model, 0)
    ctx = rand.normal(jax.random.key(1), (1, rc.model.text_len, rc.model.text_dim))
    w = rand.normal(jax.random.key(4), (1, c) + rc.latent_shape)
    return rc, c, params, ctx, jax.random.key(5), w


def test_generator_gradient_flows_only_through_the_exit_step():
    cfg = _cfg("tiny_dmd_long", "sampler.denoising_step_list=[1000,500]")  # 2 steps: a small explicit graph
    rc, c, params, ctx, rng, w = _one_chunk_setup(cfg)

    def via_rollout(p):
        x, _, _ = ro.rollout(p, rc, rng, ctx, num_frames=c)
        return jnp.sum(x * w), x

    @jax.jit
    def explicit_grads(p):
        def loss(p_exit, p_steps):
            x0 = _explicit_chunk(rc, rng, ctx, p_steps, p_exit)
            return jnp.sum(x0 * w), x0
        (_, x0), (g_exit, g_steps) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(p, p)
        return x0, g_exit, g_steps  # d/dp of loss(p, p) = g_exit + g_steps

    (_, x), g_roll = jax.jit(jax.value_and_grad(via_rollout, has_aux=True))(params)
    x_ref, g_exit, g_steps = explicit_grads(params)
    np.testing.assert_allclose(np.asarray(x), np.asarray(x_ref), rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(g_roll, g_exit, rtol=1e-4, atol=1e-6)
    # the path through the earlier (re-noised) steps carries a real gradient, which the rollout cuts
    assert _tree_norm(g_steps) > 1e-3 * _tree_norm(g_exit) > 0


@pytest.mark.slow
def test_no_gradient_through_the_carried_memory():
    """Chunk 2's gradient equals that of a window that starts from the (detached) memory after chunk 1, and
    the gradient w.r.t. the carried cache is exactly zero."""
    cfg = _cfg()
    rc, c, params, ctx, rng, w = _one_chunk_setup(cfg)
    _, _, aux1 = ro.rollout(params, rc, rng, ctx, num_frames=c)
    state1 = aux1["state"]

    def full(p):
        x, _, _ = ro.rollout(p, rc, rng, ctx, num_frames=2 * c)
        return jnp.sum(x[:, c:] * w), x

    def from_state(p, k, v):
        st = state1.replace(cache=state1.cache.replace(k=k, v=v))
        x, _, _ = ro.generate_window(p, rc, st, ro.prompt_kv(p, rc, ctx), rng, num_frames=2 * c, skip_chunks=1)
        return jnp.sum(x[:, c:] * w), x

    (_, x_full), g_full = jax.jit(jax.value_and_grad(full, has_aux=True))(params)
    (_, x_skip), (g_skip, g_k, g_v) = jax.jit(jax.value_and_grad(from_state, argnums=(0, 1, 2), has_aux=True))(
        params, state1.cache.k, state1.cache.v)
    np.testing.assert_allclose(np.asarray(x_full[:, c:]), np.asarray(x_skip[:, c:]), rtol=1e-5, atol=1e-6)
    assert not np.any(np.asarray(x_skip[:, :c]))  # skipped slot: nothing generated
    chex.assert_trees_all_close(g_full, g_skip, rtol=1e-4, atol=1e-6)
    assert _tree_norm(g_full) > 0
    assert not np.any(np.asarray(g_k)) and not np.any(np.asarray(g_v))
    assert float(jnp.max(jnp.abs(state1.cache.k))) > 0  # the memory is non-trivial, yet gives no gradient


# --------------------------------------------------------------------------------------------------
# Tiny runs
# --------------------------------------------------------------------------------------------------


def test_tiny_teacher_run_loss_goes_down(tmp_path):
    cfg = _cfg("tiny_teacher", "run.progress=false", "run.tensorboard=false", "train.max_iters=60",
               "train.save_interval=60")
    trainer = tr.Trainer(cfg, str(tmp_path / "run"), log=lambda m: None)
    try:
        history = trainer.train()
    finally:
        trainer.close()
    losses = np.array([h["teacher_loss"] for h in history])
    assert len(losses) == 60 and np.all(np.isfinite(losses))
    assert losses[-10:].mean() < 0.85 * losses[:10].mean(), losses
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "60")
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines] == list(range(1, 61))


def _stories(tmp_path):
    from memflow_jax.storyworld import dataset as D

    return D.write_dataset(tmp_path / "stories", kind="stories", num_examples=4, seed=0, height=32, width=32,
                           storage="files", num_latent=9, chunk=3, t_stride=4)


def _story_trainer(stories, run, *extra):
    return tr.Trainer(_cfg("tiny_story", f"train.video_data_path={stories}", *extra), run, log=lambda m: None)


def test_story_recipe_refuses_other_datasets(tmp_path):
    from memflow_jax.storyworld import dataset as D

    stories = _stories(tmp_path)
    clips = D.write_dataset(tmp_path / "clips", kind="clips", num_examples=1, height=32, width=32, storage="files")
    with pytest.raises(ValueError, match="--kind stories"):
        _story_trainer(clips, str(tmp_path / "r2"))
    with pytest.raises(cfg_lib.ConfigError, match="re-export with --chunk"):
        _story_trainer(stories, str(tmp_path / "r3"), "sampler.chunk_frames=1")
    t = _story_trainer(stories, str(tmp_path / "r4"), "train.story_return_weight=2")  # the return mask's rows
    try:
        recs = D.StoryworldSource(stories).index_records()
        for i in range(len(recs)):
            np.testing.assert_array_equal(t.source[i]["return_mask"], tr.return_mask(recs[i]["latent_returns"], 9, 3, 0))
        assert any(t.source[i]["return_mask"].any() for i in range(len(recs)))
    finally:
        t.close()


@pytest.mark.slow
def test_tiny_story_run(tmp_path):
    stories, run = _stories(tmp_path), str(tmp_path / "run")
    t = _story_trainer(stories, run, "train.max_iters=4")
    try:
        assert t.source.num_prompts == 3 and t.rc.num_steps == 4
        history = t.train()
    finally:
        t.close()
    assert len(history) == 4 and all(np.isfinite(h["story_loss"]) for h in history)
    assert os.path.isdir(os.path.join(run, "checkpoints", "4"))


@pytest.mark.slow
def test_tiny_story_run_resumes(tmp_path):
    stories, run = _stories(tmp_path), str(tmp_path / "run")
    for end, start in ((2, 0), (3, 2)):
        t = _story_trainer(stories, run, f"train.max_iters={end}")
        try:
            assert t.step == start
            assert len(t.train()) == end - start and t.step == end
        finally:
            t.close()


@pytest.mark.slow
def test_tiny_teacher_story_run_resumes(tmp_path):
    """recipe teacher_story: flow matching on whole stories (a prompt per latent frame, text dropout on every
    segment at once), resumed from its step-2 checkpoint."""
    stories, run = _stories(tmp_path), str(tmp_path / "run")
    for end, start in ((2, 0), (3, 2)):
        t = tr.Trainer(_cfg("tiny_teacher_story", f"train.video_data_path={stories}", f"train.max_iters={end}"),
                       run, log=lambda m: None)
        try:
            assert t.step == start and t.story_vae is not None
            history = t.train()
        finally:
            t.close()
        assert len(history) == end - start and t.step == end
        assert all(np.isfinite(h["teacher_loss"]) and 0 <= h["text_dropped_frac"] <= 1 for h in history)


def test_dmd_story_refuses_streaming():
    with pytest.raises(cfg_lib.ConfigError, match="streaming_training=false"):
        _cfg("tiny_dmd_story", "train.streaming_training=true")


@pytest.mark.slow
def test_tiny_dmd_story_run_resumes(tmp_path):
    """recipe dmd_story: whole-story rollouts (the stories' prompts and switch frames, no video read), the real
    score and the critic conditioned per frame; a run resumed from its step-2 checkpoint ends equal to the
    uninterrupted one."""
    stories = _stories(tmp_path)

    def run(run_dir, steps):
        t = tr.Trainer(_cfg("tiny_dmd_story", f"train.video_data_path={stories}", f"train.max_iters={steps}"),
                       str(run_dir), log=lambda m: None)
        try:
            assert t.story_frames == 9 and t.story_vae is None and "video" not in t.source[0]
            return t.train(), jax.tree_util.tree_map(np.asarray, t.gen.params)
        finally:
            t.close()

    hist, final = run(tmp_path / "a", 3)
    assert [h["step"] for h in hist if "generator_loss" in h] == [1, 3]  # dfake_gen_update_ratio 2
    assert all(np.isfinite(h["critic_loss"]) for h in hist)
    assert all(np.isfinite(h["generator_loss"]) and h["generator_grad_norm"] > 0 for h in hist if "generator_loss" in h)
    run(tmp_path / "b", 2)
    hist_b, final_b = run(tmp_path / "b", 3)
    assert [h["step"] for h in hist_b] == [3]
    chex.assert_trees_all_equal(final_b, final)


def _critic_arch_teacher_trainer(tmp_path, steps):
    stories = _stories(tmp_path)
    return tr.Trainer(_cfg("tiny_dmd_story", f"train.video_data_path={stories}", f"train.max_iters={steps}",
                           "run.critic_arch=teacher"), str(tmp_path / "run"), log=lambda m: None)


def test_critic_arch_teacher_starts_as_the_teacher(tmp_path):
    """run.critic_arch=teacher: the fake score has teacher_model's (wider) shape and starts as a copy of the real
    score (DMD2's initialisation)."""
    t = _critic_arch_teacher_trainer(tmp_path, 1)
    try:
        assert t.critic_cfg == t.teacher_cfg and t.critic_cfg.dim != t.gen_cfg.dim
        critic0 = t.critic_base if t.critic_base is not None else t.critic.params
        chex.assert_trees_all_equal(jax.tree_util.tree_map(np.asarray, critic0),
                                    jax.tree_util.tree_map(np.asarray, t.teacher))
    finally:
        t.close()


@pytest.mark.slow
def test_critic_arch_teacher_trains(tmp_path):
    """... and the generator and that critic both update, finite."""
    t = _critic_arch_teacher_trainer(tmp_path, 2)
    try:
        hist = t.train()
    finally:
        t.close()
    assert [("generator_loss" in h) for h in hist] == [True, False]  # dfake_gen_update_ratio 2
    assert all(np.isfinite(h["critic_loss"]) and h["critic_grad_norm"] > 0 for h in hist)
    assert np.isfinite(hist[0]["generator_loss"]) and hist[0]["generator_grad_norm"] > 0


def test_critic_arch_is_checked():
    with pytest.raises(cfg_lib.ConfigError, match="run.critic_arch='wide'"):
        _cfg("tiny_dmd_story", "run.critic_arch=wide")


def _run(args, env=None, timeout=900):
    env = dict(os.environ, **(env or {}))
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable] + args, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def test_story_weight_needs_a_dmd_recipe_and_stories():
    with pytest.raises(cfg_lib.ConfigError, match="train.recipe=story"):
        _cfg("tiny_story", "train.story_weight=0.5", "train.story_data_path=/stories")
    with pytest.raises(cfg_lib.ConfigError, match="needs train.story_data_path"):
        _cfg("tiny_dmd_long", "train.story_weight=0.5")
    with pytest.raises(cfg_lib.ConfigError, match="must be >= 0"):
        _cfg("tiny_dmd_long", "train.story_weight=-1")


def test_guidance_sigma_max_config():
    assert _cfg("tiny_dmd_long").train.guidance_sigma_max == 1.0  # every noise level: the reference
    with pytest.raises(cfg_lib.ConfigError, match="train.guidance_sigma_max=-0.5 must be >= 0"):
        _cfg("tiny_dmd_long", "train.guidance_sigma_max=-0.5")


@pytest.mark.slow
def test_tiny_dmd_real_score_guidance_interval(tmp_path):
    """train.guidance_sigma_max reaches DMD's real score: 1.0 is the plain loss, 0 (no level guided) another."""
    def first_generator_loss(*overrides):
        t = tr.Trainer(_cfg("tiny_dmd_long", "run.progress=false", "train.max_iters=1", *overrides),
                       str(tmp_path / "_".join(overrides or ("plain",))), log=lambda m: None)
        try:
            return next(h["generator_loss"] for h in t.train() if "generator_loss" in h)
        finally:
            t.close()

    plain = first_generator_loss()
    assert first_generator_loss("train.guidance_sigma_max=1.0") == plain
    assert first_generator_loss("train.guidance_sigma_max=0.0") != plain


def test_story_term_batch_carries_the_return_mask(tmp_path):
    """train.story_return_weight beside DMD (train.story_weight): the story term's batch carries each story's
    return mask, which the story loss weighs (the same _story_loss as the story recipes)."""
    stories = _stories(tmp_path)
    t = tr.Trainer(_cfg("tiny_dmd_long", "run.progress=false", "train.story_weight=0.5",
                        f"train.story_data_path={stories}", "train.story_return_weight=4"), str(tmp_path / "run"),
                   log=lambda m: None)
    try:
        batch = t._story_batch(0)
        assert t._return_fields() == ("return_mask",) and set(batch) == {"video", "contexts", "switch_frames",
                                                                         "return_mask"}
        chex.assert_shape(batch["return_mask"], (t.global_batch, t.story_source.num_latent))
        assert set(np.unique(np.asarray(batch["return_mask"]))) <= {0.0, 1.0}
    finally:
        t.close()


@pytest.mark.slow
def test_tiny_dmd_long_with_the_story_term_resumes(tmp_path):
    """train.story_weight: generator loss = DMD + weight * story loss; the stories come by index from the step,
    so a run resumed from its step-2 checkpoint ends equal to the uninterrupted one."""
    stories = _stories(tmp_path)

    def run(run_dir, steps):
        cfg = _cfg("tiny_dmd_long", "run.progress=false", "train.story_weight=0.5",
                   f"train.story_data_path={stories}", f"train.max_iters={steps}")
        t = tr.Trainer(cfg, str(run_dir), log=lambda m: None)
        try:
            return t.train(), jax.tree_util.tree_map(np.asarray, t.gen.params)
        finally:
            t.close()

    hist, final = run(tmp_path / "a", 3)
    gen = [h for h in hist if "generator_loss" in h]
    assert [h["step"] for h in gen] == [1, 3]  # dfake_gen_update_ratio 2
    for h in gen:
        assert np.isfinite(h["story_loss"]) and h["story_loss"] > 0
        np.testing.assert_allclose(h["generator_loss"], h["generator_dmd_loss"] + 0.5 * h["story_loss"], rtol=1e-5)
    assert all("story_loss" not in h for h in hist if "generator_loss" not in h)
    run(tmp_path / "b", 2)
    hist_b, final_b = run(tmp_path / "b", 3)
    assert [h["step"] for h in hist_b] == [3]
    assert hist_b[0]["story_loss"] == gen[-1]["story_loss"]
    chex.assert_trees_all_equal(final_b, final)


def test_solve_guidance_interval():
    """``guidance_sigma_max``: guided steps only at sigma <= it; above every sigma = always guided, below every
    sigma = the conditional flow alone (guidance 1), in between = each step's own scale."""
    from memflow_jax.training import ode_pairs as op

    cfg = _cfg("tiny_ode_init")
    mcfg = cfg.teacher_model
    params = tr.synthetic_init(mcfg, jax.random.key(0))  # a random head: the flows are not zero
    h, w = cfg.sampler.latent_hw
    k1, k2, k3 = jax.random.split(jax.random.key(2), 3)
    noise = jax.random.normal(k1, (1, 4, mcfg.in_dim, h, w))
    cond = jax.random.normal(k2, (1, mcfg.text_len, mcfg.text_dim))
    unc = jax.random.normal(k3, (1, mcfg.text_len, mcfg.text_dim))
    schedule = sch.make_schedule(cfg.sampler.timestep_shift, num_train_timesteps=1000, num_inference_steps=4)
    sig = np.asarray(schedule.sigmas)
    run = lambda g, smax: op.solve(params, mcfg, noise, cond, unc, schedule, g, smax)  # noqa: E731
    always = run(3.0, None)
    np.testing.assert_array_equal(run(3.0, float(sig.max()) + 1.0), always)
    np.testing.assert_array_equal(run(3.0, float(sig.min()) / 2), run(1.0, None))
    mid = float(sig[1:3].mean())  # steps 0-1 unguided (sigma above mid), 2-3 guided
    got = run(3.0, mid)
    np.testing.assert_array_equal(got[:3], run(1.0, None)[:3])  # states before the first guided step
    assert not np.allclose(got[-1], always[-1]) and not np.allclose(got[-1], run(1.0, None)[-1])
    sig2 = jnp.asarray([0.2, 0.9])
    chex.assert_trees_all_equal(sch.guidance_at(sig2, 3.0, 0.5, unguided=1.0), jnp.asarray([3.0, 1.0]))
    chex.assert_trees_all_equal(sch.guidance_at(sig2, 3.0, None, unguided=0.0), jnp.asarray([3.0, 3.0]))


@pytest.mark.slow
def test_ode_pairs_then_ode_init_run(tmp_path):
    pairs = tmp_path / "pairs"
    _run(["-m", "memflow_jax.training.ode_pairs", "--config", "configs/tiny_ode_init.yaml", "--out", str(pairs),
          "--num-samples", "3", "--steps", "8"])
    from memflow_jax.data import OdeTrajectorySource

    src = OdeTrajectorySource(str(pairs))
    assert len(src) == 3
    rec = src[0]
    cfg = _cfg("tiny_ode_init")
    h, w = cfg.sampler.latent_hw
    chex.assert_shape(rec["ode_latent"], (len(cfg.sampler.denoising_step_list) + 1, cfg.train.num_training_frames,
                                          cfg.model.in_dim, h, w))
    assert rec["prompts"] == "synthetic prompt 0"
    meta = json.loads((pairs / "ode_pairs.json").read_text())
    assert meta["recorded_grid_timesteps"][0] == 1000.0
    run = tmp_path / "run"
    _run(["train.py", "--config", "configs/tiny_ode_init.yaml", "--run-dir", str(run), "run.progress=false",
          f"train.latent_data_path={pairs}", "train.max_iters=4", "train.save_interval=2"])
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 4 and all(np.isfinite(r["ode_loss"]) for r in recs)
    assert sorted(os.listdir(run / "checkpoints")) == ["2", "4"]


def _fake_story_pairs(path, rc, *, count=2, frames=9, kind="stories", timesteps=None, returns=None):
    """A story ODE-pairs folder as ``ode_pairs --stories`` writes it, with random trajectories (``returns``: each
    pair's ``latent_returns`` rows, else none stored)."""
    os.makedirs(path, exist_ok=True)
    steps = list(rc.timesteps) if timesteps is None else timesteps
    for i in range(count):
        extra = {} if returns is None else {"latent_returns": np.asarray(returns[i], np.int32).reshape(-1, 3)}
        np.savez(os.path.join(path, f"ode_{i:06d}.npz"),
                 ode_latent=np.random.default_rng(i).standard_normal((len(steps) + 1, frames) + rc.latent_shape)
                 .astype(np.float32),
                 prompts=np.asarray([f"a circle moves left {i}", "a square enters"][: 1 + i % 2]),
                 latent_switch_frames=np.asarray([3] if i % 2 else [], np.int32), **extra)
    with open(os.path.join(path, "ode_pairs.json"), "w") as f:
        json.dump({"count": count, "kind": kind, "num_latent": frames,
                   "denoising_timesteps": [float(x) for x in steps]}, f)
    return str(path)


def test_ode_story_data_and_its_checks(tmp_path):
    """recipe ode_story: StoryOdeSource's records (the stories' prompts padded as StorySource's) and clear errors
    for pairs of clips, of other timesteps, or of another latent shape."""
    cfg = _cfg("tiny_ode_story")
    rc = ro.story_config(cfg, 2)
    good = _fake_story_pairs(tmp_path / "good", rc)
    t = tr.Trainer(_cfg("tiny_ode_story", f"train.latent_data_path={good}"), str(tmp_path / "run"), log=lambda m: None)
    try:
        assert t.recipe == "ode_story" and t.story_frames == 9 and t.rc.num_steps == 4 and t.story_vae is None
        recs = [t.source[i] for i in range(2)]
        chex.assert_shape(recs[0]["ode_latent"], (5, 9) + rc.latent_shape)
        chex.assert_shape(recs[0]["contexts"], (2, cfg.model.text_len, cfg.model.text_dim))
        assert recs[0]["switch_frames"].tolist() == [ro.NO_SWITCH] and recs[1]["switch_frames"].tolist() == [3]
        np.testing.assert_array_equal(recs[0]["contexts"][0], recs[0]["contexts"][1])  # padding repeats the last
    finally:
        t.close()
    cases = {"clips": (dict(kind="clips"), ValueError, "ode_init"),
             "steps": (dict(timesteps=[1000.0, 500.0]), cfg_lib.ConfigError, "regenerate the ODE pairs"),
             "frames": (dict(frames=8), cfg_lib.ConfigError, "whole chunks")}
    for name, (kw, err, msg) in cases.items():
        bad = _fake_story_pairs(tmp_path / name, rc, **kw)
        with pytest.raises(err, match=msg):
            tr.Trainer(_cfg("tiny_ode_story", f"train.latent_data_path={bad}"), str(tmp_path / f"r_{name}"),
                       log=lambda m: None)
    with pytest.raises(cfg_lib.ConfigError, match="latent_data_path is empty"):
        tr.Trainer(_cfg("tiny_ode_story"), str(tmp_path / "r_empty"), log=lambda m: None)


def test_return_mask_and_the_frame_weighted_loss():
    """return_mask: 1 on the first chunk of each return off screen >= min_absent frames; the frame-weighted
    regression is sum(w * frame mse) / sum(w), the plain mean for equal weights."""
    rows = [[0, 6, 3], [1, 12, 9], [2, 15, 0]]  # (object, return frame, frames absent)
    np.testing.assert_array_equal(tr.return_mask(rows, 18, 3, 3), [0] * 6 + [1] * 3 + [0] * 3 + [1] * 3 + [0] * 3)
    np.testing.assert_array_equal(tr.return_mask(rows, 18, 3, 9), [0] * 12 + [1] * 3 + [0] * 3)
    np.testing.assert_array_equal(tr.return_mask(rows, 18, 3, 0)[15:], [1, 1, 1])
    assert tr.return_mask([], 9, 3, 0).tolist() == [0.0] * 9
    r = np.random.default_rng(0)
    pred, target = (jnp.asarray(r.standard_normal((2, 4, 3, 2, 2)), jnp.float32) for _ in range(2))
    w = jnp.asarray(r.uniform(0.5, 3.0, (2, 4)), jnp.float32)
    frame_mse = np.mean(np.square(np.asarray(pred - target)).reshape(2, 4, -1), -1)
    np.testing.assert_allclose(float(losses.ode_regression_loss(pred, target, frame_weight=w)),
                               np.sum(np.asarray(w) * frame_mse) / np.sum(np.asarray(w)), rtol=1e-6)
    np.testing.assert_allclose(float(losses.ode_regression_loss(pred, target, frame_weight=jnp.full((2, 4), 7.0))),
                               float(losses.ode_regression_loss(pred, target)), rtol=1e-6)
    with pytest.raises(ValueError, match=r"must be \[B, F\]"):
        losses.ode_regression_loss(pred, target, frame_weight=w[:, :3])
    with pytest.raises(cfg_lib.ConfigError, match="has none"):
        _cfg("tiny_dmd", "train.story_return_weight=2")
    with pytest.raises(cfg_lib.ConfigError, match="must be >= 0"):
        _cfg("tiny_ode_story", "train.story_return_min_absent=-1")


def test_dmd_loss_frame_weight():
    """dmd_loss(frame_weight=w): sum(w * frame mean of grad^2) / (2 sum(w)); d/dx = w_bf * grad / (sum(w) * per-frame
    elements); equal weights give the plain loss; a mask with a weight, or a weight of another shape, is refused."""
    r = np.random.default_rng(1)
    x, grad = (jnp.asarray(r.standard_normal((2, 4, 3, 2, 2)), jnp.float32) for _ in range(2))
    w = jnp.asarray(r.uniform(0.5, 3.0, (2, 4)), jnp.float32)
    g2 = np.mean(np.square(np.asarray(grad)).reshape(2, 4, -1), -1)
    np.testing.assert_allclose(float(losses.dmd_loss(x, grad, frame_weight=w)),
                               0.5 * np.sum(np.asarray(w) * g2) / np.sum(np.asarray(w)), rtol=1e-6)
    dx = jax.grad(lambda y: losses.dmd_loss(y, grad, frame_weight=w))(x)
    np.testing.assert_allclose(np.asarray(dx), np.asarray(grad) * np.asarray(w)[:, :, None, None, None]
                               / (float(np.sum(np.asarray(w))) * 12), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(losses.dmd_loss(x, grad, frame_weight=jnp.full((2, 4), 5.0))),
                               float(losses.dmd_loss(x, grad)), rtol=1e-6)
    with pytest.raises(ValueError, match="not both"):
        losses.dmd_loss(x, grad, mask=jnp.ones((2, 4, 1, 1, 1), bool), frame_weight=w)
    with pytest.raises(ValueError, match=r"must be \[B, F\]"):
        losses.dmd_loss(x, grad, frame_weight=w[:1])


def _dmd_story_return_trainer(tmp_path, stories, weight):
    return tr.Trainer(_cfg("tiny_dmd_story", f"train.video_data_path={stories}", f"train.story_return_weight={weight}",
                           "train.max_iters=1"), str(tmp_path / f"run_{weight}"), log=lambda m: None)


def test_dmd_story_return_weight_data(tmp_path):
    """dmd_story with train.story_return_weight: the prompt-only records carry the stories' return mask, and the
    step's prompt batch has its field."""
    from memflow_jax.storyworld import dataset as D

    stories = _stories(tmp_path)
    t = _dmd_story_return_trainer(tmp_path, stories, 3)
    try:
        recs = D.StoryworldSource(stories).index_records()
        assert "video" not in t.source[0] and t._return_fields() == ("return_mask",)
        for i in range(len(recs)):
            want = tr.return_mask(recs[i]["latent_returns"], 9, 3, 0)
            np.testing.assert_array_equal(t.source[i]["return_mask"], want)
        assert set(t._prompt_batch_sh()) == {"contexts", "switch_frames", "return_mask"}
    finally:
        t.close()


@pytest.mark.slow
def test_dmd_story_return_weight_step(tmp_path):
    """... and a generator step reports the batch's return-frame fraction and, on a batch with a return, updates the
    generator differently from the unweighted step (same initial weights, rollout and draws)."""
    stories, out = _stories(tmp_path), {}
    src = None
    for weight in (0, 3):
        t = _dmd_story_return_trainer(tmp_path, stories, weight)
        try:
            assert t._return_fields() == (("return_mask",) if weight else ())
            if src is None:
                src = tr.StorySource(stories, t.embedder, videos=False, return_min_absent=0)
                items = [src[i] for i in range(len(src))]
                order = sorted(range(len(items)), key=lambda i: -items[i]["return_mask"].sum())[: t.global_batch]
                mask = np.stack([items[i]["return_mask"] for i in order])
                assert mask.any()
            keys = ("contexts", "switch_frames") + t._return_fields()
            batch = {k: jnp.asarray(np.stack([items[i][k] for i in order])) for k in keys}
            out[f"init{weight}"] = jax.tree_util.tree_map(np.asarray, t.gen.params)
            fn = t._gen_step_fn((t.story_frames,))
            gen, _, _, m = fn(t.gen, t.ema, t.gen_base, t.critic.params, t.critic_base, t.teacher, None, batch,
                              t.uncond, jax.random.key(5), np.int32(0), None)
            assert np.isfinite(float(m["generator_loss"])) and float(m["generator_grad_norm"]) > 0
            if weight:
                np.testing.assert_allclose(float(m["return_frame_fraction"]), mask.mean(), rtol=1e-6)
            else:
                assert "return_frame_fraction" not in m
            out[weight] = jax.tree_util.tree_map(np.asarray, gen.params)
        finally:
            t.close()
    chex.assert_trees_all_equal(out["init0"], out["init3"])
    diffs = [float(np.max(np.abs(a - b))) for a, b in zip(jax.tree_util.tree_leaves(out[0]),
                                                          jax.tree_util.tree_leaves(out[3]))]
    assert max(diffs) > 0


def test_ode_story_return_weighted_loss(tmp_path):
    """train.story_return_weight: the ode_story records carry the pairs' return mask, pairs made without
    latent_returns are refused by name, and the step's loss is the frame-weighted mean with weights 1 + w * mask
    of the same teacher-forced predictions."""
    rc = ro.story_config(_cfg("tiny_ode_story"), 2)
    plain = _fake_story_pairs(tmp_path / "plain", rc)
    with pytest.raises(ValueError, match="regenerate the ODE pairs"):
        tr.Trainer(_cfg("tiny_ode_story", f"train.latent_data_path={plain}", "train.story_return_weight=3"),
                   str(tmp_path / "r0"), log=lambda m: None)
    pairs = _fake_story_pairs(tmp_path / "ret", rc, returns=[[], [[0, 3, 6], [1, 6, 2]]])
    t = tr.Trainer(_cfg("tiny_ode_story", f"train.latent_data_path={pairs}", "train.story_return_weight=3",
                        "train.story_return_min_absent=4"), str(tmp_path / "run"), log=lambda m: None)
    try:
        assert t.source[0]["return_mask"].tolist() == [0.0] * 9
        assert t.source[1]["return_mask"].tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 0]
        items = [t.source[i] for i in range(2)]
        batch = {k: jnp.asarray(np.stack([it[k] for it in items])) for k in ("contexts", "switch_frames",
                                                                              "return_mask")}
        traj = jnp.asarray(np.stack([it["ode_latent"] for it in items]))
        latents, states = traj[:, -1], traj[:, :-1]
        params, rng = t.gen.params, jax.random.key(3)
        loss, aux = jax.jit(lambda p: t._story_loss(p, t.rc, latents, batch, rng, states=states))(params)
        pred, _ = ro.teacher_forced_story(params, t.rc, latents, batch["contexts"], batch["switch_frames"], rng,
                                          states=states)
        mask = np.asarray(batch["return_mask"])
        w = 1.0 + 3.0 * mask
        frame_mse = np.mean(np.square(np.asarray(pred) - np.asarray(latents)).reshape(2, 9, -1), -1)
        np.testing.assert_allclose(float(loss), np.sum(w * frame_mse) / np.sum(w), rtol=1e-5)
        np.testing.assert_allclose(float(aux["return_loss"]), np.sum(mask * frame_mse) / np.sum(mask), rtol=1e-5)
        assert t._return_fields() == ("return_mask",)
    finally:
        t.close()
    # min_absent alone (weight 0): the plain loss, its return frames logged
    t = tr.Trainer(_cfg("tiny_ode_story", f"train.latent_data_path={pairs}", "train.story_return_min_absent=4"),
                   str(tmp_path / "run0"), log=lambda m: None)
    try:
        loss0, aux0 = jax.jit(lambda p: t._story_loss(p, t.rc, latents, batch, rng, states=states))(params)
        np.testing.assert_allclose(float(loss0), frame_mse.mean(), rtol=1e-5)
        np.testing.assert_allclose(float(aux0["return_loss"]), float(aux["return_loss"]), rtol=1e-6)
    finally:
        t.close()


@pytest.mark.slow
def test_story_ode_pairs_then_ode_story_run(tmp_path):
    """ode_pairs --stories: one trajectory per story (its length, its prompts and switch frames kept), then the
    ode_story recipe trains on them and resumes."""
    stories, pairs = _stories(tmp_path), tmp_path / "pairs"
    _run(["-m", "memflow_jax.training.ode_pairs", "--config", "configs/tiny_ode_story.yaml", "--stories", stories,
          "--out", str(pairs), "--steps", "8"])
    from memflow_jax.storyworld import dataset as D

    recs = D.StoryworldSource(stories).index_records()
    meta = json.loads((pairs / "ode_pairs.json").read_text())
    assert meta["kind"] == "stories" and meta["count"] == len(recs) == 4 and meta["num_latent"] == 9
    cfg = _cfg("tiny_ode_story")
    h, w = cfg.sampler.latent_hw
    for i, rec in enumerate(recs):
        with np.load(pairs / f"ode_{i:06d}.npz") as z:
            chex.assert_shape(z["ode_latent"], (5, 9, cfg.model.in_dim, h, w))
            assert np.all(np.isfinite(z["ode_latent"]))
            assert [str(p) for p in z["prompts"]] == list(rec["prompts"])
            assert z["latent_switch_frames"].tolist() == list(rec["latent_switch_frames"])
            assert z["latent_returns"].tolist() == list(rec["latent_returns"])  # the return-weighted loss's
    run = tmp_path / "run"
    for end in (2, 3):
        _run(["train.py", "--config", "configs/tiny_ode_story.yaml", "--run-dir", str(run), "run.progress=false",
              f"train.latent_data_path={pairs}", f"train.max_iters={end}"])
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3] and all(np.isfinite(r["story_loss"]) for r in recs)
    assert "3" in os.listdir(run / "checkpoints")


@pytest.mark.slow
def test_tiny_dmd_run_trains_both_models_and_ema(tmp_path):
    cfg = _cfg("tiny_dmd", "run.progress=false", "train.max_iters=3")
    trainer = tr.Trainer(cfg, str(tmp_path / "run"), log=lambda m: None)
    try:
        gen0 = jax.tree_util.tree_map(np.asarray, trainer.gen.params)
        critic0 = jax.tree_util.tree_map(np.asarray, trainer.critic.params)
        history = trainer.train()
        assert [("generator_loss" in h) for h in history] == [True, False, True]  # dfake_gen_update_ratio 2
        assert all(np.isfinite(h["critic_loss"]) for h in history)
        moved = lambda a, b: _tree_norm(jax.tree_util.tree_map(lambda x, y: np.asarray(x) - y, a, b))  # noqa
        assert moved(trainer.gen.params, gen0) > 0 and moved(trainer.critic.params, critic0) > 0
        # EMA (start step 2): blended after the step-2 generator update, so neither the params nor a copy
        assert 0 < moved(trainer.ema, jax.tree_util.tree_map(np.asarray, trainer.gen.params))
    finally:
        trainer.close()
    assert (tmp_path / "run" / "tb").is_dir() and (tmp_path / "run" / "config.json").is_file()
