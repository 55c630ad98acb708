"""Self-Forcing backward simulation with the generator's cached causal forward, as pure jittable functions.

Per chunk of ``chunk_frames`` latent frames (reference ``SelfForcingTrainingPipeline`` /
``StreamingSwitchTrainingPipeline``), with the memory semantics of :mod:`memflow_jax.sampling.streaming`:

1. an exit step ``e`` is drawn among the ``S`` denoising steps (one ``randint`` per chunk from a key shared by
   all processes; ``same_step_across_blocks`` uses the first draw for every chunk of the window,
   ``last_step_only`` always ``S - 1``);
2. steps ``0 .. e-1`` run the generator on ``stop_gradient`` params and re-noise ``x0`` to the next warped
   timestep (a ``while`` loop of dynamic length; NAM prototype insertion at step 0);
3. step ``e`` runs with live params: its ``x0`` is the chunk's output and the only place gradients enter;
4. the clean-context pass ``G(add_noise(sg(x0), ε, context_noise), context_noise)`` on ``stop_gradient``
   params writes the chunk's K/V into the cache (and records the bank prototype).

The cache, bank and history are carried detached (``stop_gradient``) from chunk to chunk and window to window.
Prompt switches re-encode the last ``min(window, frame)`` generated frames with the new prompt (one forward)
before the first chunk at or after the switch frame.

Reference quirks matched (training pipelines, which differ from inference):
* the context pass always calls ``add_noise`` at ``t = context_noise`` — also for 0, where σ is the table's
  smallest entry (~0.005), not 0 (``ctx_noise_always``);
* the context pass repeats the exit step's ``q_bank`` flag, so when the exit step is 0 the prototype insertion /
  NAM compression runs a second time on the already-updated bank (``ctx_qbank_quirk``);
* the switch pipeline's ``global_sink`` attribute is read from a tuple and is always False: the self-attention
  cache K/V are zeroed before the re-cache, so after a switch at a frame > 0 the (write-protected) sink slots
  hold zeros (``reset_cache_at_switch``);
* frames before the switch inside the switching window get no gradient through their exit step
  (``start_gradient_frame_index = switch index``) although the loss mask keeps them;
* the streaming window's first frame is the VAE re-encoding of the last decoded pixel frame of the frames before
  the window (``_process_first_frame_encoding``); supplied by the caller as ``reencode_fn``.

:func:`teacher_forced_story` is the ground-truth counterpart (the ``story`` recipe): the same chunk loop with the
sampler's memory semantics, the context built from ground-truth latents and one live forward per chunk on the
ground truth noised to a drawn step.

Latent layout is the pipeline's ``[B, F, C, H, W]`` (the DiT takes ``[B, C, F, H, W]``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from memflow_jax.config import Config, MemoryConfig, ModelConfig
from memflow_jax.diffusion import scheduler as sch
from memflow_jax.memory.cache import (CacheSpec, ForwardPlan, KVCache, commit, init_cache, record_chunk,
                                      with_bank, zero_window)
from memflow_jax.nn import dit
from memflow_jax.sampling.streaming import PromptKV, StreamState, memory_forward

NO_SWITCH = 1 << 30  # switch_frame of a sequence without a prompt switch


def segment_of_frames(switch_frames: jnp.ndarray, num_frames: int) -> jnp.ndarray:
    """The prompt segment of every latent frame: ``[B, P - 1]`` switch frames (``NO_SWITCH`` padding) -> ``[B, F]``
    int32, segment ``k`` from ``switch_frames[k - 1]`` on (the rule of :func:`teacher_forced_story`)."""
    frames = jnp.arange(num_frames, dtype=jnp.int32)
    return jnp.sum(switch_frames[:, None, :] <= frames[None, :, None], axis=-1).astype(jnp.int32)


def frame_contexts(contexts: jnp.ndarray, switch_frames: jnp.ndarray, num_frames: int,
                   patch_t: int = 1) -> jnp.ndarray:
    """A story's prompt per latent frame: ``contexts [B, P, T, D]`` (one embedding per segment), ``switch_frames
    [B, P - 1]`` -> ``[B, F, T, D]``; with ``patch_t`` (``model.patch_size[0]``) one per patch frame
    ``[B, F / patch_t, T, D]`` (the bidirectional DiT's per-frame conditioning, :func:`nn.dit.forward`)."""
    seg = segment_of_frames(switch_frames, num_frames)[:, ::patch_t]
    return jnp.take_along_axis(contexts, seg[:, :, None, None], axis=1)
# (latents [B, n, C, h, w], latent index j) -> VAE re-encoding [B, 1, C, h, w] of latent j's last pixel frame
ReencodeFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]

sg = lax.stop_gradient


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """Static description of a training rollout (hashable: usable as a ``jit`` static argument)."""

    model: ModelConfig
    memory: MemoryConfig
    chunk_frames: int
    timesteps: tuple[float, ...]  # warped denoising timesteps (the generator is conditioned on these)
    timestep_shift: float  # generator table shift (reference model_kwargs.timestep_shift)
    num_train_timesteps: int
    context_noise: float
    latent_shape: tuple[int, int, int]  # (C, h, w)
    batch: int  # global batch
    same_step_across_blocks: bool = True
    last_step_only: bool = False
    ctx_noise_always: bool = True
    ctx_qbank_quirk: bool = True
    reset_cache_at_switch: bool = True

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def spec(self) -> CacheSpec:
        _, h, w = self.latent_shape
        return CacheSpec.from_config(
            self.memory, num_layers=self.model.num_layers, batch=self.batch,
            tokens_per_frame=dit.tokens_per_frame(self.model, h, w), num_heads=self.model.num_heads,
            head_dim=self.model.head_dim, chunk_frames=self.chunk_frames)

    @property
    def cache_dtype(self) -> Any:
        return jnp.dtype(self.model.dtype)

    def schedule(self) -> sch.FlowMatchSchedule:
        return sch.make_schedule(self.timestep_shift, num_train_timesteps=self.num_train_timesteps)


def rollout_config(cfg: Config, batch: int, *, model: ModelConfig | None = None,
                   bank_record_rule: str | None = None, **overrides: Any) -> RolloutConfig:
    """:class:`RolloutConfig` from the ``model`` / ``memory`` / ``sampler`` / ``train`` sections.

    ``bank_record_rule`` overrides ``memory.bank_record_rule`` (the reference's non-streaming training pipeline
    updates the pending prototype every chunk — ``single`` —, the streaming one only on record chunks —
    ``interactive``). ``overrides`` set any other field.
    """
    s = cfg.sampler
    model = model or cfg.model
    schedule = sch.make_schedule(s.timestep_shift, num_train_timesteps=s.num_train_timesteps)
    steps = list(s.denoising_step_list)
    if steps and steps[-1] == 0:  # reference: the trailing 0 of an inference step list is dropped
        steps = steps[:-1]
    ts = (sch.warp_denoising_steps(steps, schedule) if s.warp_denoising_step
          else np.asarray(steps, np.float32))
    mem = cfg.memory if bank_record_rule is None else dataclasses.replace(cfg.memory,
                                                                          bank_record_rule=bank_record_rule)
    train = getattr(cfg, "train", None)
    kw: dict[str, Any] = {}
    if train is not None:
        kw.update(same_step_across_blocks=train.same_step_across_blocks, last_step_only=train.last_step_only)
        if train.independent_first_frame:
            raise ValueError("train.independent_first_frame=true is not supported (MemFlow trains without it)")
    h, w = s.latent_hw
    kw.update(overrides)
    return RolloutConfig(model=model, memory=mem, chunk_frames=s.chunk_frames,
                         timesteps=tuple(float(t) for t in ts), timestep_shift=float(s.timestep_shift),
                         num_train_timesteps=int(s.num_train_timesteps), context_noise=float(s.context_noise),
                         latent_shape=(model.in_dim, h, w), batch=batch, **kw)


# --------------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------------


def init_state(rc: RolloutConfig) -> StreamState:
    """Empty cache, zero history, frame 0 (a fresh video)."""
    spec = rc.spec
    c, h, w = rc.latent_shape
    hist = jnp.zeros((rc.batch, spec.window, c, h, w), jnp.float32)
    return StreamState(init_cache(spec, rc.cache_dtype), hist, jnp.array(0, jnp.int32), jnp.array(False))


def prompt_kv(params: dit.Params, rc: RolloutConfig, context: jnp.ndarray) -> PromptKV:
    """Per-layer cross-attention K/V of prompt embeddings [B, T, text_dim] (differentiable w.r.t. params)."""
    want = (rc.batch, rc.model.text_len, rc.model.text_dim)
    if tuple(context.shape) != want:
        raise ValueError(f"prompt embeddings have shape {tuple(context.shape)}, expected {want} "
                         "(global batch, model.text_len, model.text_dim)")
    return PromptKV(*dit.text_kv(params, rc.model, context))


def _forward(params: dit.Params, rc: RolloutConfig, cache: KVCache, x: jnp.ndarray, t: Any, plan: ForwardPlan,
             text: PromptKV, update_cache: bool, bank: tuple | None = None):
    """:func:`sampling.streaming.memory_forward` with the rollout's static configuration."""
    return memory_forward(params, rc.model, rc.spec, rc.memory, cache, x, t, plan, text, update_cache, bank=bank)


def recache(params: dit.Params, rc: RolloutConfig, state: StreamState, text: PromptKV, n: int) -> StreamState:
    """Prompt switch at ``state.frame``: re-encode the last ``n`` (static, ``min(window, frame)``) generated
    frames with the new prompt in one forward (no gradient). Zeroes the self-attention K/V first when
    ``reset_cache_at_switch`` (reference training quirk)."""
    spec = rc.spec
    cache = state.cache
    params, text = sg(params), sg(text)
    if rc.reset_cache_at_switch:
        cache = zero_window(cache)  # the bank (the cache's last K slots) is kept
    zero = rc.memory.nam_switch_query == "zeroed"
    if n > 0:
        csf = state.frame
        start = csf - n
        frames = jnp.take(state.history, jnp.mod(start + jnp.arange(n), spec.window), axis=1)
        plan = ForwardPlan(start=start, q_bank=jnp.array(True), recompute=start > 0,
                           zero_text_query=jnp.array(zero))
        _, _, outs, (new_slots, placement) = _forward(params, rc, cache, frames, rc.context_noise, plan, text, True)
        cache = commit(cache, outs, new_slots, csf, placement)
    return StreamState(sg(cache), state.history, state.frame, jnp.array(zero))


def draw_exit_steps(rng: jax.Array, rc: RolloutConfig, num_chunks: int) -> jnp.ndarray:
    """[num_chunks] int32 exit steps in ``[0, S)`` (reference ``generate_and_sync_list``; one key for all
    processes, so every process draws the same steps)."""
    s = rc.num_steps
    steps = jax.random.randint(rng, (num_chunks,), 0, s, dtype=jnp.int32)
    if rc.last_step_only:
        steps = jnp.full_like(steps, s - 1)
    if rc.same_step_across_blocks:
        steps = jnp.full_like(steps, steps[0])
    return steps


def chunk_noise(rng: jax.Array, rc: RolloutConfig, chunk: jnp.ndarray | int
                ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """The draws of chunk ``chunk`` of a window: (initial noise [B, c, C, h, w], re-noise draws
    [S-1, B, c, C, h, w], context-pass noise [B, c, C, h, w]) — the arrays ``StreamingSampler.chunk`` takes."""
    k0, k1, k2 = jax.random.split(jax.random.fold_in(rng, chunk), 3)
    shape = (rc.batch, rc.chunk_frames) + tuple(rc.latent_shape)
    return (jax.random.normal(k0, shape, jnp.float32),
            jax.random.normal(k1, (max(rc.num_steps - 1, 1),) + shape, jnp.float32),
            jax.random.normal(k2, shape, jnp.float32))


def _select_text(second: jnp.ndarray, t1: PromptKV, t2: PromptKV) -> PromptKV:
    return jax.tree_util.tree_map(lambda a, b: jnp.where(second, b, a), t1, t2)


def denoised_timestep_range(rc: RolloutConfig, exit_step: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Reference ``denoised_timestep_from / to`` of an exit step (integer table positions counted from the
    end: ``T - argmin|table - t|``; ``to`` is 0 at the last step). Used by ``ts_schedule``."""
    schedule = rc.schedule()
    ts = jnp.asarray(rc.timesteps, jnp.float32)
    n = rc.num_train_timesteps
    s = rc.num_steps
    frm = n - sch.timestep_index(schedule, ts[exit_step])
    nxt = jnp.minimum(exit_step + 1, s - 1)
    to = jnp.where(exit_step == s - 1, 0, n - sch.timestep_index(schedule, ts[nxt]))
    return frm.astype(jnp.int32), to.astype(jnp.int32)


# --------------------------------------------------------------------------------------------------
# One window of chunks
# --------------------------------------------------------------------------------------------------


def _denoise_chunk(params: dit.Params, rc: RolloutConfig, state: StreamState, text: PromptKV,
                   draws: tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray], exit_step: jnp.ndarray,
                   pin: Callable[[jnp.ndarray, int], jnp.ndarray]) -> tuple[StreamState, jnp.ndarray]:
    """Backward simulation of the chunk at ``state.frame`` (Self-Forcing): denoise the chunk's noise with
    detached params down to ``exit_step``, one forward with live params there (the chunk's only differentiable
    one), then the clean-context pass writes its K/V and records the bank prototype. ``draws``:
    :func:`chunk_noise`'s (noise, re-noise draws, context-pass noise). Returns (new detached state, x0
    [B, c, C, h, w] float32)."""
    c, nsteps = rc.chunk_frames, rc.num_steps
    schedule = rc.schedule()
    ts = jnp.asarray(rc.timesteps, jnp.float32)
    params_ng = sg(params)
    frame = state.frame
    text_ng = sg(text)
    noise, step_noise, ctx_noise = draws
    noise, step_noise, ctx_noise = pin(noise, 0), pin(step_noise, 1), pin(ctx_noise, 0)
    cache = state.cache
    bank0 = (cache.bank_k, cache.bank_v, cache.bank_frame)

    def no_grad_step(s, carry):
        x, bank = carry
        plan = ForwardPlan(start=frame, q_bank=s == 0, recompute=jnp.array(False),
                           zero_text_query=state.zero_query_next)
        flow, tt, outs, _ = _forward(params_ng, rc, cache, x, ts[s], plan, text_ng, False, bank)
        x0 = sch.flow_to_x0(schedule, flow, x, tt)
        nxt = jnp.minimum(s + 1, nsteps - 1)
        x = sch.add_noise(schedule, x0, step_noise[jnp.minimum(s, nsteps - 2)], jnp.full_like(tt, ts[nxt]))
        if "bank" in outs:
            bank = tuple(b.astype(b0.dtype) for b, b0 in zip(outs["bank"], bank0))
        return x, bank

    x, bank = lax.fori_loop(0, exit_step, no_grad_step, (noise, bank0))
    x, bank = pin(sg(x), 0), sg(bank)
    # the exit step: live params and prompt K/V, the only differentiable forward of the chunk
    plan = ForwardPlan(start=frame, q_bank=exit_step == 0, recompute=jnp.array(False),
                       zero_text_query=state.zero_query_next)
    flow, tt, outs, _ = _forward(params, rc, cache, x, ts[exit_step], plan, text, False, bank)
    x0 = pin(sch.flow_to_x0(schedule, flow, x, tt), 0)
    if "bank" in outs:
        bank = tuple(sg(b).astype(b0.dtype) for b, b0 in zip(outs["bank"], bank0))
    cache = with_bank(cache, {"bank": bank} if rc.spec.bank else {})
    # clean-context pass: writes the chunk's K/V (no gradient)
    x_ctx = sg(x0)
    if rc.ctx_noise_always or rc.context_noise > 0:
        x_ctx = sch.add_noise(schedule, x_ctx, ctx_noise, jnp.full_like(tt, rc.context_noise))
    q_bank = (exit_step == 0) if rc.ctx_qbank_quirk else jnp.array(False)
    plan = ForwardPlan(start=frame, q_bank=q_bank, recompute=jnp.array(False), zero_text_query=jnp.array(False))
    _, _, outs, (new_slots, placement) = _forward(params_ng, rc, cache, x_ctx, rc.context_noise, plan, text_ng, True)
    cache = commit(cache, outs, new_slots, frame + c, placement)
    cache = record_chunk(cache, outs, frame, rc.spec, rc.memory.bank_record_rule)
    slots = jnp.mod(frame + jnp.arange(c), rc.spec.window)
    history = state.history.at[:, slots].set(sg(x0).astype(state.history.dtype))
    zq = jnp.zeros_like(state.zero_query_next)
    return StreamState(sg(cache), history, frame + c, zq), x0


def generate_window(params: dit.Params, rc: RolloutConfig, state: StreamState, text: PromptKV,
                    rng: jax.Array, *, num_frames: int, text2: PromptKV | None = None,
                    switch_frame: jnp.ndarray | int = NO_SWITCH, n_recache: int = 0,
                    grad_from_frame: jnp.ndarray | int = 0, skip_chunks: jnp.ndarray | int = 0,
                    constrain: Callable[[jnp.ndarray, int], jnp.ndarray] | None = None
                    ) -> tuple[jnp.ndarray, StreamState, dict]:
    """Generate ``num_frames`` (static, whole chunks) frames after ``state.frame`` with backward simulation.

    Args:
      params: generator params (merged LoRA included); gradients flow only through each chunk's exit step.
      state: carried memory (treated as constant: never differentiated).
      text / text2: prompt K/V before / from ``switch_frame`` (absolute, chunk-aligned; ``NO_SWITCH``: none).
      n_recache: frames re-encoded at the switch (static; ``min(window, switch_frame)``).
      grad_from_frame: chunks starting before this absolute frame return ``stop_gradient`` outputs.
      skip_chunks: the first ``skip_chunks`` (dynamic) chunk slots generate nothing (zeros, memory untouched):
        one compiled window serves every number of new frames.
      constrain: ``constrain(x, batch_axis)`` pins activations to the batch sharding (e.g.
        ``with_sharding_constraint``), so the partitioner all-gathers FSDP params instead of resharding activations.
    Returns: (x0 [B, num_frames, C, h, w] float32, new state (detached), aux with ``exit_steps`` [chunks],
      ``denoised_timestep_from`` / ``_to`` (of the first chunk's exit step)).
    """
    c = rc.chunk_frames
    if num_frames <= 0 or num_frames % c:
        raise ValueError(f"num_frames={num_frames} is not a positive multiple of the chunk size {c}")
    nc = num_frames // c
    text2 = text if text2 is None else text2
    switch_frame = jnp.asarray(switch_frame, jnp.int32)
    grad_from_frame = jnp.asarray(grad_from_frame, jnp.int32)
    k_exit, k_noise = jax.random.split(rng)
    exit_steps = draw_exit_steps(k_exit, rc, nc)
    params_ng = sg(params)
    state = sg(state)
    pin = constrain if constrain is not None else (lambda x, axis=0: x)

    def chunk(state: StreamState, i):
        frame = state.frame
        is_switch = (frame >= switch_frame) & (frame - c < switch_frame)
        state = lax.cond(is_switch, lambda s: recache(params_ng, rc, s, text2, n_recache), lambda s: s, state)
        text_live = _select_text(frame >= switch_frame, text, text2)
        new_state, x0 = _denoise_chunk(params, rc, state, text_live, chunk_noise(k_noise, rc, i), exit_steps[i],
                                       pin)
        x0 = jnp.where(frame >= grad_from_frame, x0, sg(x0))
        return new_state, x0

    never_skip = isinstance(skip_chunks, int) and skip_chunks == 0
    skip_chunks = jnp.asarray(skip_chunks, jnp.int32)

    def body(state: StreamState, i):
        if never_skip:
            return chunk(state, i)
        return lax.cond(i >= skip_chunks, chunk,
                        lambda st, _: (st, jnp.zeros((rc.batch, c) + tuple(rc.latent_shape), jnp.float32)), state, i)

    state, x0s = lax.scan(body, state, jnp.arange(nc))  # x0s [nc, B, c, C, h, w]
    x = jnp.moveaxis(x0s, 0, 1).reshape((rc.batch, num_frames) + tuple(rc.latent_shape))
    frm, to = denoised_timestep_range(rc, exit_steps[0])
    return x, state, {"exit_steps": exit_steps, "denoised_timestep_from": frm, "denoised_timestep_to": to}


def _contexts(contexts: Any) -> list[jnp.ndarray]:
    if isinstance(contexts, (list, tuple)):
        if not 1 <= len(contexts) <= 2:
            raise ValueError(f"give one or two prompt embeddings (before / after the switch), got {len(contexts)}")
        return list(contexts)
    return [contexts]


def rollout(params: dit.Params, rc: RolloutConfig, rng: jax.Array, contexts: jnp.ndarray | Sequence[jnp.ndarray],
            *, num_frames: int, switch_frame: int | None = None, state: StreamState | None = None,
            grad_from_frame: int = 0, constrain: Callable[[jnp.ndarray, int], jnp.ndarray] | None = None
            ) -> tuple[jnp.ndarray, jnp.ndarray, dict]:
    """Backward simulation of ``num_frames`` frames from a fresh (or given) memory state.

    Args:
      contexts: prompt embeddings [B, T, text_dim], or ``(first, second)`` with ``switch_frame`` (static int,
        chunk-aligned; the re-cache covers ``min(window, switch_frame)`` frames).
    Returns: (latents [B, F, C, h, w] float32, gradient mask [B, F, 1, 1, 1] bool (frames whose exit step
      carries a gradient), aux: ``state`` (the detached memory after the last chunk), ``exit_steps``,
      ``denoised_timestep_from`` / ``_to``).
    """
    ctx = _contexts(contexts)
    if len(ctx) == 2 and switch_frame is None:
        raise ValueError("two prompts need switch_frame (the latent frame where the second one starts)")
    if switch_frame is not None and switch_frame % rc.chunk_frames:
        raise ValueError(f"switch_frame={switch_frame} is not a multiple of the chunk size {rc.chunk_frames}")
    state = init_state(rc) if state is None else state
    t1 = prompt_kv(params, rc, ctx[0])
    t2 = prompt_kv(params, rc, ctx[-1]) if len(ctx) == 2 else None
    sw = NO_SWITCH if switch_frame is None else int(switch_frame)
    n_re = 0 if switch_frame is None else min(rc.spec.window, int(switch_frame))
    x, state, aux = generate_window(params, rc, state, t1, rng, num_frames=num_frames, text2=t2, switch_frame=sw,
                                    n_recache=n_re, grad_from_frame=grad_from_frame, constrain=constrain)
    frames = state.frame - num_frames + jnp.arange(num_frames)
    mask = jnp.broadcast_to((frames >= grad_from_frame)[None, :, None, None, None], (rc.batch, num_frames, 1, 1, 1))
    aux["state"] = state
    return x, mask, aux


# --------------------------------------------------------------------------------------------------
# Streaming long tuning: window by window, detached memory carried across windows
# --------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class StreamCarry:
    """Device state of one long streaming sequence (checkpointed for exact resume)."""

    state: StreamState
    prev: jnp.ndarray  # [B, Wc, C, h, w] the last window's frames (detached): overlap + first-frame re-encode
    cond: jnp.ndarray  # [B, T, text_dim] first prompt
    cond2: jnp.ndarray  # [B, T, text_dim] prompt after the switch (= cond without a switch)
    switch_frame: jnp.ndarray  # [] int32 (NO_SWITCH: none)


def start_stream(rc: RolloutConfig, window: int, cond: jnp.ndarray, cond2: jnp.ndarray | None = None,
                 switch_frame: int | jnp.ndarray = NO_SWITCH) -> StreamCarry:
    """A fresh sequence: empty memory, prompts, switch frame."""
    c, h, w = rc.latent_shape
    cond2 = cond if cond2 is None else cond2
    return StreamCarry(init_state(rc), jnp.zeros((rc.batch, window, c, h, w), jnp.float32),
                       jnp.asarray(cond), jnp.asarray(cond2), jnp.asarray(switch_frame, jnp.int32))


def abstract_stream(rc: RolloutConfig, window: int, cond_dtype: Any = jnp.float32) -> StreamCarry:
    def make():
        cond = jnp.zeros((rc.batch, rc.model.text_len, rc.model.text_dim), cond_dtype)
        return start_stream(rc, window, cond, cond)
    return jax.eval_shape(make)


def streaming_window(params: dit.Params, rc: RolloutConfig, carry: StreamCarry, rng: jax.Array, *,
                     window: int, n_new: jnp.ndarray | int, has_prev: jnp.ndarray | bool, n_recache: int,
                     reencode_fn: ReencodeFn | None = None,
                     constrain: Callable[[jnp.ndarray, int], jnp.ndarray] | None = None
                     ) -> tuple[jnp.ndarray, jnp.ndarray, StreamCarry, dict]:
    """Extend the sequence by ``n_new`` frames and return the ``window``-frame training window
    (reference ``StreamingTrainingModel.generate_next_chunk``).

    First window (``has_prev`` False): ``n_new == window`` new frames, all in the loss. Later windows:
    ``[re-encoded first frame | window - n_new - 1 previous frames | n_new new frames]``, the mask selecting the
    new frames; without ``reencode_fn`` the first frame is the plain previous latent.
    ``window`` / ``n_recache`` are static; ``n_new`` (a multiple of the chunk size, ``<= window``) and
    ``has_prev`` may be traced: the window's chunk slots before the new frames are skipped.
    ``reencode_fn(latents [B, window, C, h, w], j)`` must return the VAE re-encoding of the last pixel frame of
    latent ``j`` decoded after latents ``0..j`` (``[B, 1, C, h, w]``).

    Returns: (window latents [B, window, C, h, w], mask [B, window, 1, 1, 1] bool, new carry, aux with
      ``use_second`` (the loss uses the second prompt: the switch frame lies before the window's end),
      ``start_frame``, ``exit_steps``, ``denoised_timestep_from`` / ``_to``).
    """
    c = rc.chunk_frames
    if window % c:
        raise ValueError(f"window={window} is not a multiple of the chunk size {c}")
    n_new = jnp.asarray(n_new, jnp.int32)
    has_prev = jnp.asarray(has_prev, bool)
    start = carry.state.frame
    t1 = prompt_kv(params, rc, carry.cond)
    t2 = prompt_kv(params, rc, carry.cond2)
    sw = carry.switch_frame
    in_window = (sw >= start) & (sw < start + n_new)
    grad_from = jnp.where(in_window, sw, start)  # reference: start_gradient_frame_index = switch index
    overlap = window - n_new
    x_slots, state, aux = generate_window(params, rc, carry.state, t1, rng, num_frames=window, text2=t2,
                                          switch_frame=sw, n_recache=n_recache, grad_from_frame=grad_from,
                                          skip_chunks=overlap // c, constrain=constrain)
    pos = jnp.arange(window)
    prev = sg(carry.prev)
    # window position p < overlap holds previous frame n_new + p (the last `overlap` frames of the last window)
    prev_part = jnp.take(prev, jnp.clip(n_new + pos, 0, window - 1), axis=1)
    is_prev = (pos < overlap)[None, :, None, None, None]
    win = jnp.where(is_prev, prev_part, x_slots)
    save = sg(win)  # reference frames_to_save: the last `window` frames, before the first-frame re-encode
    if reencode_fn is not None:
        first = lax.cond(has_prev, lambda p: reencode_fn(p, n_new).astype(p.dtype),
                         lambda p: jnp.zeros_like(p[:, :1]), prev)
        win = jnp.where((has_prev & (pos == 0))[None, :, None, None, None], first, win)
    mask = jnp.broadcast_to((pos >= overlap)[None, :, None, None, None], (rc.batch, window, 1, 1, 1))
    new_carry = carry.replace(state=state, prev=save)
    aux.update(use_second=sw < start + n_new, start_frame=start)
    return win, mask, new_carry, aux


@dataclasses.dataclass
class StreamHost:
    """Host bookkeeping of the streaming sequence (JSON in the checkpoint metadata)."""

    active: bool = False
    length: int = 0  # frames generated so far (reference current_length)
    max_length: int = 0  # this sequence's length (reference temp_max_length)
    switch_frame: int = NO_SWITCH

    def can_generate_more(self, min_new_frame: int) -> bool:
        return self.active and self.length < self.max_length and self.length + min_new_frame <= self.max_length

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def new_frame_choices(host: StreamHost, window: int, min_new_frame: int, chunk: int) -> list[int]:
    """Candidate frame counts of the next window (reference ``possible_new_frames``); the first window always
    generates ``window`` frames."""
    if min_new_frame >= window:
        raise ValueError(f"train.streaming_min_new_frame={min_new_frame} must be < train.streaming_chunk_size="
                         f"{window} (later windows overlap the previous one; the reference crashes here)")
    if min_new_frame % chunk or window % chunk:
        raise ValueError(f"train.streaming_min_new_frame={min_new_frame} and streaming_chunk_size={window} must be "
                         f"multiples of sampler.chunk_frames={chunk}")
    if host.length == 0:
        return [window]
    hi = min(host.max_length - host.length + 1, window)
    return list(range(min_new_frame, hi, chunk))


def choose_switch_frame(train: Any, max_length: int, chunk: int, rng: np.random.Generator) -> int:
    """The reference ``_get_switch_frame_index`` (modes random_choice | fixed | random), host-side."""
    mode = train.switch_mode
    if mode == "fixed":
        sw = int(train.fixed_switch_index)
        if not sw < max_length:
            raise ValueError(f"train.fixed_switch_index={sw} must be < the sequence length {max_length}")
    elif mode == "random_choice":
        choices = [int(c) for c in train.switch_choices if c < max_length]
        if not choices:
            raise ValueError(f"no train.switch_choices {list(train.switch_choices)} below the length {max_length}")
        sw = choices[int(rng.integers(len(choices)))]
    elif mode == "random":
        lo, hi = int(train.min_switch_frame_index), int(train.max_switch_frame_index)
        if lo == hi:
            sw = lo
        else:
            choices = [c for c in range(lo, hi, chunk) if c < max_length]
            if not choices:
                raise ValueError(f"no switch frame in range({lo}, {hi}, {chunk}) below the length {max_length}")
            sw = choices[int(rng.integers(len(choices)))]
    else:
        raise ValueError(f"unknown train.switch_mode {mode!r}")
    if sw % chunk:
        raise ValueError(f"switch frame {sw} is not a multiple of sampler.chunk_frames={chunk}; use chunk-aligned "
                         "train.switch_choices / fixed_switch_index / min_switch_frame_index")
    return sw


# --------------------------------------------------------------------------------------------------
# Teacher forcing on ground-truth stories (the ``story`` recipe)
# --------------------------------------------------------------------------------------------------


def story_config(cfg: Config, batch: int, *, model: ModelConfig | None = None) -> RolloutConfig:
    """:class:`RolloutConfig` of teacher-forced story training: the SAMPLER's memory semantics (the context pass
    on clean latents, no second NAM update in it, sink kept at a switch), so the memory the generator learns to
    read is the memory it reads when sampling."""
    return rollout_config(cfg, batch, model=model, ctx_noise_always=False, ctx_qbank_quirk=False,
                          reset_cache_at_switch=False)


def _where_samples(pred: jnp.ndarray, a: StreamState, b: StreamState) -> StreamState:
    """Per sample ``[B]``: ``a`` where ``pred`` else ``b``. The cache's shared cursors (slot map, end, bank
    pointer, prototype frame) are taken from ``b``: a re-cache re-encodes frames in the slots they occupy and
    records no chunk, so it leaves them as they were (``tests/unit/test_training.py`` checks it)."""
    def sel(x, y, axis):
        shape = [1] * x.ndim
        shape[axis] = -1
        return jnp.where(pred.reshape(shape), x, y)

    ca, cb = a.cache, b.cache
    cache = cb.replace(k=sel(ca.k, cb.k, 1), v=sel(ca.v, cb.v, 1), bank_frame=sel(ca.bank_frame, cb.bank_frame, 1),
                       proto_k=sel(ca.proto_k, cb.proto_k, 1), proto_v=sel(ca.proto_v, cb.proto_v, 1))
    zq = jnp.where(pred, a.zero_query_next, b.zero_query_next)
    return StreamState(cache, b.history, b.frame, zq)


def _check_story(rc: RolloutConfig, b: int, f: int, contexts: jnp.ndarray, switch_frames: jnp.ndarray) -> None:
    """Shape checks shared by the story functions (``b`` samples of ``f`` latent frames)."""
    c = rc.chunk_frames
    if b != rc.batch or f <= 0 or f % c:
        raise ValueError(f"a story batch of {b} x {f} latent frames must be [{rc.batch}, k*{c}] (global batch, "
                         "whole chunks)")
    p = contexts.shape[1]
    if contexts.shape[0] != b or tuple(contexts.shape[2:]) != (rc.model.text_len, rc.model.text_dim):
        raise ValueError(f"contexts {tuple(contexts.shape)} must be [{b}, P, {rc.model.text_len}, "
                         f"{rc.model.text_dim}] (one prompt embedding per segment)")
    if tuple(switch_frames.shape) != (b, p - 1):
        raise ValueError(f"switch_frames {tuple(switch_frames.shape)} must be [{b}, {p - 1}] (one per prompt after "
                         "the first)")


class _StoryPrompts:
    """A story batch's prompts for chunk-by-chunk generation: every segment's cross-attention K/V once, the
    segment of every frame, and the per-sample re-cache at switches (the streaming sampler's rule)."""

    def __init__(self, params: dit.Params, rc: RolloutConfig, contexts: jnp.ndarray, switch_frames: jnp.ndarray,
                 num_frames: int):
        b, p = contexts.shape[:2]
        self.rc, self.b = rc, b
        self.params_ng = sg(params)
        self.switch_frames = jnp.asarray(switch_frames, jnp.int32)
        tk, tv = dit.text_kv(params, rc.model, contexts.reshape((b * p,) + tuple(contexts.shape[2:])))
        self.tk, self.tv = (x.reshape((x.shape[0], b, p) + x.shape[2:]) for x in (tk, tv))  # [L, B, P, T, H, D]
        self.frame_seg = segment_of_frames(self.switch_frames, num_frames)  # [B, F]
        c, window = rc.chunk_frames, rc.spec.window
        # re-cache lengths min(window, frame) of the chunk starts, one compiled forward each
        self.lengths = sorted({min(window, k * c) for k in range(1, num_frames // c)}) if window else []

    def text_at(self, frame: jnp.ndarray) -> PromptKV:
        """The prompt K/V [L, B, T, H, D] of each sample's segment at latent ``frame``."""
        seg = lax.dynamic_index_in_dim(self.frame_seg, frame, axis=1, keepdims=False)  # [B]
        pick = lambda x: jnp.take_along_axis(x, seg[None, :, None, None, None, None], axis=2)[:, :, 0]
        return PromptKV(pick(self.tk), pick(self.tv))

    def switch(self, state: StreamState, frame: jnp.ndarray, text: PromptKV) -> StreamState:
        """The samples whose prompt switches at ``frame`` re-encode the last ``min(window, frame)`` frames with
        ``text`` (their new prompt); the others keep their state."""
        if not self.lengths:
            return state
        rc, b, text_ng = self.rc, self.b, sg(text)
        switching = jnp.any(self.switch_frames == frame, axis=1)  # [B]
        branch = jnp.searchsorted(jnp.asarray(self.lengths, jnp.int32), jnp.minimum(frame, rc.spec.window))

        def do_recache(st):
            redone = lax.switch(branch, [lambda s_, n=n: recache(self.params_ng, rc, s_, text_ng, n)
                                         for n in self.lengths], st)
            redone = StreamState(redone.cache, redone.history, redone.frame,
                                 jnp.broadcast_to(redone.zero_query_next, (b,)))
            return _where_samples(switching, redone, st)

        return lax.cond(jnp.any(switching) & (frame > 0), do_recache, lambda st: st, state)


def _story_state(rc: RolloutConfig) -> StreamState:
    """A fresh memory whose NAM text-query flag is per sample ``[B]`` (stories switch per sample)."""
    state = init_state(rc)
    return StreamState(state.cache, state.history, state.frame, jnp.zeros((rc.batch,), bool))


def story_rollout(params: dit.Params, rc: RolloutConfig, rng: jax.Array, contexts: jnp.ndarray,
                  switch_frames: jnp.ndarray, *, num_frames: int,
                  constrain: Callable[[jnp.ndarray, int], jnp.ndarray] | None = None) -> tuple[jnp.ndarray, dict]:
    """Backward simulation of whole stories from a fresh memory: :func:`generate_window`'s chunks (the same draws
    per chunk) with each sample's own prompt switches (re-cache per sample, as :func:`teacher_forced_story`).
    With one switch shared by every sample it equals :func:`rollout` with two prompts.

    Args:
      contexts: ``[B, P, text_len, text_dim]`` the segments' prompt embeddings; switch_frames ``[B, P - 1]``
        int32 chunk multiples in ``(0, num_frames)``, increasing, ``NO_SWITCH`` padding.
    Returns: (latents ``[B, num_frames, C, h, w]`` float32, aux: ``exit_steps`` [chunks],
      ``denoised_timestep_from`` / ``_to``).
    """
    c = rc.chunk_frames
    _check_story(rc, contexts.shape[0], num_frames, contexts, switch_frames)
    nc = num_frames // c
    pin = constrain if constrain is not None else (lambda x, axis=0: x)
    k_exit, k_noise = jax.random.split(rng)
    exit_steps = draw_exit_steps(k_exit, rc, nc)
    story = _StoryPrompts(params, rc, contexts, switch_frames, num_frames)

    def chunk(state: StreamState, i):
        frame = i * c
        text = story.text_at(frame)
        state = story.switch(state, frame, text)
        return _denoise_chunk(params, rc, state, text, chunk_noise(k_noise, rc, i), exit_steps[i], pin)

    _, x0s = lax.scan(chunk, _story_state(rc), jnp.arange(nc))  # [nc, B, c, C, h, w]
    x = jnp.moveaxis(x0s, 0, 1).reshape((rc.batch, num_frames) + tuple(rc.latent_shape))
    frm, to = denoised_timestep_range(rc, exit_steps[0])
    return x, {"exit_steps": exit_steps, "denoised_timestep_from": frm, "denoised_timestep_to": to}


def teacher_forced_story(params: dit.Params, rc: RolloutConfig, latents: jnp.ndarray, contexts: jnp.ndarray,
                         switch_frames: jnp.ndarray, rng: jax.Array, *, exit_choices: Sequence[int] = (),
                         states: jnp.ndarray | None = None,
                         constrain: Callable[[jnp.ndarray, int], jnp.ndarray] | None = None
                         ) -> tuple[jnp.ndarray, dict]:
    """The generator's denoising predictions on ground-truth stories whose memory holds the ground truth.

    Chunk by chunk, as the streaming sampler: a prompt switch re-encodes the last ``min(window, frame)``
    frames with the new prompt (per sample: only the samples that switch at this chunk take the re-cache); one
    forward with live params denoises the ground-truth chunk noised to the warped timestep of a drawn step
    (per sample and chunk, from ``exit_choices``; empty = every step) with NAM's bank update of the chunk's
    first step; then the context pass writes the ground-truth chunk's K/V (no gradient) and records the bank
    prototype. So when an object comes back, the frames the memory kept of it are in the context, and the
    regression target shows it as it was: the loss rewards reading the memory.

    Args:
      latents: ``[B, F, C, h, w]`` ground-truth latents (normalised), ``F`` a multiple of the chunk.
      contexts: ``[B, P, text_len, text_dim]`` prompt embeddings of the P segments (rows past a story's last
        segment are never selected).
      switch_frames: ``[B, P - 1]`` int32 latent frames where prompts ``1..`` start: chunk multiples in
        ``(0, F)``, increasing; unused entries ``NO_SWITCH``.
      states: optional ``[B, S, F, C, h, w]`` noisy inputs, one per denoising step (a teacher's ODE trajectory at
        ``rc.timesteps``, whose end is ``latents``): the drawn step's state replaces fresh noise on ``latents``,
        so the regression target is a deterministic function of the input (the ``ode_story`` recipe).
    Returns: (x0 predictions ``[B, F, C, h, w]`` float32, aux: ``exit_steps`` ``[chunks, B]`` int32).
    """
    c = rc.chunk_frames
    b, f = latents.shape[:2]
    if tuple(latents.shape[2:]) != tuple(rc.latent_shape):
        want = ", ".join(map(str, rc.latent_shape))
        raise ValueError(f"latents {tuple(latents.shape)} must be [{rc.batch}, k*{c}, {want}] (global batch, whole "
                         "chunks, the latent shape)")
    _check_story(rc, b, f, contexts, switch_frames)
    if states is not None and tuple(states.shape) != (b, rc.num_steps) + tuple(latents.shape[1:]):
        raise ValueError(f"states {tuple(states.shape)} must be [{b}, {rc.num_steps}, {f}, "
                         f"{', '.join(map(str, rc.latent_shape))}]: one noisy state per denoising step "
                         "(sampler.denoising_step_list) of the latents' frames; regenerate the ODE pairs")
    choices = tuple(range(rc.num_steps)) if not exit_choices else tuple(int(s) for s in exit_choices)
    if not choices or min(choices) < 0 or max(choices) >= rc.num_steps:
        raise ValueError(f"exit_choices {list(exit_choices)} must be step indices in [0, {rc.num_steps})")
    nc = f // c
    spec = rc.spec
    schedule = rc.schedule()
    ts = jnp.asarray(rc.timesteps, jnp.float32)
    pin = constrain if constrain is not None else (lambda x, axis=0: x)
    params_ng = sg(params)
    latents = sg(latents.astype(jnp.float32))
    states = None if states is None else sg(states)
    k_exit, k_noise = jax.random.split(rng)
    exit_steps = jnp.asarray(choices, jnp.int32)[jax.random.randint(k_exit, (nc, b), 0, len(choices))]
    story = _StoryPrompts(params, rc, contexts, switch_frames, f)

    def chunk(state: StreamState, i):
        frame = i * c
        text = story.text_at(frame)
        text_ng = sg(text)
        state = story.switch(state, frame, text)
        noise, _, ctx_noise = chunk_noise(k_noise, rc, i)
        noise, ctx_noise = pin(noise, 0), pin(ctx_noise, 0)
        gt = pin(lax.dynamic_slice_in_dim(latents, frame, c, axis=1), 0)  # [B, c, C, h, w]
        t = ts[exit_steps[i]][:, None]  # [B, 1]
        if states is None:
            x_t = sch.add_noise(schedule, gt, noise, jnp.broadcast_to(t, (b, c)))
        else:  # the trajectory's state at the drawn step, this chunk's frames
            at = lax.dynamic_slice_in_dim(states, frame, c, axis=2)  # [B, S, c, C, h, w]
            x_t = pin(jnp.take_along_axis(at, exit_steps[i][:, None, None, None, None, None], axis=1)[:, 0]
                      .astype(jnp.float32), 0)
        cache = state.cache
        plan = ForwardPlan(start=frame, q_bank=jnp.array(True), recompute=jnp.array(False),
                           zero_text_query=state.zero_query_next)
        flow, tt, outs, _ = _forward(params, rc, cache, x_t, t, plan, text, False)
        x0 = pin(sch.flow_to_x0(schedule, flow, x_t, tt), 0)
        if "bank" in outs:
            cache = with_bank(cache, {"bank": tuple(sg(x).astype(y.dtype) for x, y in zip(
                outs["bank"], (cache.bank_k, cache.bank_v, cache.bank_frame)))})
        x_ctx = gt
        if rc.ctx_noise_always or rc.context_noise > 0:
            x_ctx = sch.add_noise(schedule, x_ctx, ctx_noise, jnp.full((b, c), rc.context_noise, jnp.float32))
        plan = ForwardPlan(start=frame, q_bank=jnp.array(False), recompute=jnp.array(False),
                           zero_text_query=jnp.array(False))
        _, _, outs, (new_slots, placement) = _forward(params_ng, rc, cache, x_ctx, rc.context_noise, plan, text_ng,
                                                      True)
        cache = commit(cache, outs, new_slots, frame + c, placement)
        cache = record_chunk(cache, outs, frame, spec, rc.memory.bank_record_rule)
        slots = jnp.mod(frame + jnp.arange(c), spec.window)
        history = state.history.at[:, slots].set(gt.astype(state.history.dtype))
        return StreamState(sg(cache), history, frame + c, jnp.zeros((b,), bool)), x0

    _, x0s = lax.scan(chunk, _story_state(rc), jnp.arange(nc))  # [nc, B, c, C, h, w]
    x = jnp.moveaxis(x0s, 0, 1).reshape(latents.shape)
    return x, {"exit_steps": exit_steps}


__all__ = [
    "NO_SWITCH", "RolloutConfig", "StreamCarry", "StreamHost", "abstract_stream", "choose_switch_frame",
    "chunk_noise", "denoised_timestep_range", "draw_exit_steps", "frame_contexts", "generate_window", "init_state",
    "new_frame_choices", "prompt_kv", "recache", "rollout", "rollout_config", "segment_of_frames", "start_stream",
    "story_config", "story_rollout", "streaming_window", "teacher_forced_story",
]
