"""Streaming multi-prompt sampler: one jitted chunk step (denoising loop + clean-context pass inside), prompt
switches with re-cache, and the Python generator loop around them.

Per chunk (reference semantics): ``x = noise``; for each warped timestep ``t_s``: ``x0 = x - σ(t_s)·G(x, t_s)``
(cache read-only; step 0 also inserts the pending prototype into the bank / runs NAM), then re-noise
``x = (1-σ_{s+1})·x0 + σ_{s+1}·ε``; finally the ctx pass ``G(x0, context_noise)`` writes the chunk's K/V.
Latents use the pipeline layout ``[B, F, C, H, W]`` (the DiT takes ``[B, C, F, H, W]``).
"""
from __future__ import annotations

import functools
from typing import Callable, Iterator, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from memflow_jax.config import Config, MemoryConfig, ModelConfig, SamplerConfig
from memflow_jax.diffusion import scheduler as sch
from memflow_jax.memory import nam as nam_lib
from memflow_jax.memory import sma as sma_lib
from memflow_jax.memory.attend import LayerMemory, in_place_fast_segments, keys_all_valid, make_attend_fn
from memflow_jax.memory.cache import (CacheSpec, ForwardPlan, KVCache, commit, init_cache, kv_carry, kv_in_place,
                                      recache_dead_frames, record_chunk)
from memflow_jax.nn import dit
from memflow_jax.nn import initializers as init_lib


@flax.struct.dataclass
class StreamState:
    cache: KVCache
    history: jnp.ndarray  # [B, W, C, h, w] last W output latent frames, slot = frame mod W (for re-cache)
    frame: jnp.ndarray  # [] int32, first frame of the next chunk
    zero_query_next: jnp.ndarray  # [] bool, NAM of the next step 0 uses an all-zero text query


@flax.struct.dataclass
class PromptKV:
    k: jnp.ndarray  # [L, B, T, H, D] per-layer cross-attention keys (also NAM's text query)
    v: jnp.ndarray


_COMPILED: dict[tuple, "ChunkSteps"] = {}  # static sampler configuration -> its compiled steps


def to_model_layout(x: jnp.ndarray) -> jnp.ndarray:
    """[B, F, C, H, W] (pipeline) <-> [B, C, F, H, W] (DiT): the same swap both ways."""
    return x.transpose(0, 2, 1, 3, 4)


def memory_forward(params: dit.Params, mcfg: ModelConfig, spec: CacheSpec, mem: MemoryConfig, cache: KVCache,
                   x: jnp.ndarray, t: float | jnp.ndarray, plan: ForwardPlan, text: PromptKV, update_cache: bool,
                   bank: tuple | None = None, kv_splits: int = 1, in_place: bool = False,
                   cand_mean: jnp.ndarray | None = None, chunk_aligned: bool = False, debug: bool = False,
                   need_flow: bool = True, keys_valid: bool | None = None):
    """One causal DiT forward over ``x [B, n, C, h, w]`` against the memory (sampler and training rollout).

    ``bank`` overrides the cache's bank (the denoising loop carries the bank NAM updated at step 0).
    ``kv_splits``: split-KV self-attention (:func:`nn.attention.attention`; forward only, the sampler's
    ``attention_kv_splits``; differentiated training forwards keep 1). ``in_place`` (the sampler's chunk
    forwards; needs ``plan.q_bank=False``): the forward writes its frames into the cache before attending, also when
    it does not ``update_cache`` (the chunk's clean pass overwrites them), and attention reads the keys in place;
    the written K/V come back in ``outputs["carry"]``. ``cand_mean`` (in place with SMA, [L, B, S + K, H, D]): the
    sink and bank slots' SMA descriptors, computed once per chunk (:func:`memory.sma.slot_descriptors`).
    ``chunk_aligned``: ``plan.start`` is a multiple of the forward's frames and nothing is recomputed (see
    :func:`memory.attend.make_attend_fn`). A cache-writing forward (``update_cache``) writes its K/V frames into
    the cache in place, layer by layer (:func:`memory.cache.kv_carry`); the written K/V come back in
    ``outputs["carry"]``. ``need_flow=False`` (a cache-writing forward run for its K/V only: the clean pass, a
    re-cache): flow is None and the last layer computes only its K/V (:func:`nn.dit.run_blocks`). ``keys_valid``:
    see :func:`memory.attend.make_attend_fn`.
    Returns (flow [B, n, C, h, w], t [B, n], per-layer outputs of the memory attention,
    (new slot map, placement) for :func:`memory.cache.commit`).
    """
    n = x.shape[1]
    # no override: attention reads the bank from the cache's bank slots (LayerMemory.bank_k None)
    bank_k, bank_v, bank_frame = bank if bank is not None else (None, None, cache.bank_frame)
    attend = make_attend_fn(
        spec, mem, plan, n, slot_frame=cache.slot_frame, bank_pointer=cache.bank_pointer,
        proto_frame=cache.proto_frame, update_cache=update_cache, attention_impl=mcfg.attention_impl,
        precision=dit.matmul_precision(mcfg), kv_splits=kv_splits, in_place=in_place, chunk_aligned=chunk_aligned,
        keys_valid=keys_valid, debug=debug)
    # a cache-writing forward carries the K/V through its layer scan and writes each layer's frames in place
    if in_place:
        carry = dit.LayerCarry(*kv_in_place(cache), ordered=False)
    else:
        carry = dit.LayerCarry(*kv_carry(cache, attend.placement)) if update_cache else None
    k, v = (cache.k, cache.v) if carry is None else (None, None)  # None: read from the carry layer by layer
    layers = LayerMemory(k, v, bank_k, bank_v, bank_frame, cache.proto_k, cache.proto_v,
                         text.k.astype(cache.k.dtype), cand_mean=cand_mean)
    tt = jnp.full((x.shape[0], n), t, jnp.float32)
    flow, outs = dit.chunk_forward(params, mcfg, to_model_layout(x), tt, plan.start, text.k, text.v, attend,
                                   layers, carry, need_flow=need_flow)
    return None if flow is None else to_model_layout(flow), tt, outs, (attend.new_slot_frame, attend.placement)


@functools.partial(jax.jit, static_argnums=0)
def _prompt_kv(mcfg: ModelConfig, params, context: jnp.ndarray) -> PromptKV:
    return PromptKV(*dit.text_kv(params, mcfg, context))


class ChunkSteps:
    """The jitted pieces of streaming generation; they depend only on static configuration (no params), so
    samplers with the same configuration share one instance and its compiled code."""

    def __init__(self, mcfg: ModelConfig, mem: MemoryConfig, scfg: SamplerConfig, spec: CacheSpec,
                 timesteps: np.ndarray, debug: bool):
        self.mcfg, self.mem, self.scfg, self.spec, self.debug = mcfg, mem, scfg, spec, debug
        self.timesteps = timesteps
        self.schedule = sch.make_schedule(scfg.timestep_shift, num_train_timesteps=scfg.num_train_timesteps)
        self.traces = 0
        self.chunk = jax.jit(functools.partial(self._chunk_impl, None), donate_argnums=(1,))
        # where the in-place cuDNN path exists (GPU): a second chunk program for the steady state, whose layers read
        # their keys in place without checking slot validity per layer (see StreamingSampler.chunk)
        self.fast_path = scfg.attention_kv_splits != 1 and in_place_fast_segments(
            spec, mem, spec.chunk_frames, dtype=mcfg.dtype, cache_dtype=mcfg.dtype,
            attention_impl=mcfg.attention_impl, kv_splits=scfg.attention_kv_splits) > 0
        self.chunk_steady = jax.jit(functools.partial(self._chunk_impl, True), donate_argnums=(1,))
        self.steady = jax.jit(self._steady_impl)
        self._precompiled: set = set()
        self.prompt_kv = functools.partial(_prompt_kv, mcfg)  # depends on the model config only: shared
        self.recache: dict[tuple[int, int], Callable] = {}

    def recache_fn(self, n: int, drop: int = 0) -> Callable:
        if (n, drop) not in self.recache:
            self.recache[n, drop] = jax.jit(functools.partial(self._recache_impl, n, drop), donate_argnums=(1,))
        return self.recache[n, drop]

    # ------------------------------------------------------------------ the steady program (fast path only)
    def precompile_steady(self, args: tuple) -> None:
        """Compile the steady chunk program for these chunk arguments now (with the first chunk), not in the middle
        of a stream."""
        leaves, tree = jax.tree_util.tree_flatten(args)
        key = (tree, tuple((x.shape, jnp.dtype(x.dtype).name) for x in leaves))
        if key not in self._precompiled:
            self.chunk_steady.lower(*args).compile()
            self._precompiled.add(key)

    def _steady_impl(self, state: StreamState) -> jnp.ndarray:
        """[] bool: every key slot of the next chunk's forwards is valid (:func:`memory.attend.keys_all_valid`;
        NAM before them changes neither the slot map nor the bank pointer)."""
        plan = ForwardPlan(start=state.frame, q_bank=False, recompute=jnp.array(False),
                           zero_text_query=jnp.array(False))
        return keys_all_valid(self.spec, plan, self.spec.chunk_frames, state.cache.slot_frame,
                              state.cache.bank_pointer)

    # ------------------------------------------------------------------ one forward
    def _forward(self, params, cache: KVCache, x: jnp.ndarray, t: float | jnp.ndarray, plan: ForwardPlan,
                 text: PromptKV, update_cache: bool, in_place: bool = False, cand_mean=None,
                 keys_valid: bool | None = None):
        # chunk forwards start at a multiple of the chunk (state.frame, see StreamingSampler.chunk) and recompute
        # nothing; a cache-writing forward (clean pass, re-cache) is run for its K/V only
        aligned = in_place and x.shape[1] == self.spec.chunk_frames
        return memory_forward(params, self.mcfg, self.spec, self.mem, cache, x, t, plan, text, update_cache,
                              kv_splits=self.scfg.attention_kv_splits, in_place=in_place, cand_mean=cand_mean,
                              chunk_aligned=aligned, debug=self.debug, need_flow=not update_cache,
                              keys_valid=keys_valid)

    def _nam(self, cache: KVCache, text: PromptKV, zero_query: jnp.ndarray) -> tuple[KVCache, dict]:
        """The pending prototype enters the bank (NAM compresses once it is full), every layer, in place in the
        cache's bank slots; returns the cache and, when debugging, the traces ``nam_scores``/``nam_kept`` [L, ...]."""
        if not self.spec.bank:
            return cache, {}
        tq = nam_lib.text_query_for(text.k.astype(cache.k.dtype), zero_query)
        k, v, bf, scores, kept = nam_lib.bank_update_layers(
            cache.k, cache.v, cache.window, cache.bank_frame, cache.proto_k, cache.proto_v, cache.proto_frame,
            cache.bank_pointer, tq, self.mem.nam_aggregate)
        return cache.replace(k=k, v=v, bank_frame=bf), ({"nam_scores": scores, "nam_kept": kept} if self.debug else {})

    # ------------------------------------------------------------------ chunk step (jitted)
    def _chunk_impl(self, keys_valid: bool | None, params, state: StreamState, text: PromptKV, noise: jnp.ndarray,
                    step_noise: jnp.ndarray, ctx_noise: jnp.ndarray):
        """noise: [B, F, C, h, w]; step_noise: [S-1, B, F, C, h, w]; ctx_noise: like noise (used iff
        context_noise > 0); keys_valid: see :func:`memory.attend.make_attend_fn` (True: the steady program).
        Returns (new state, x0 [B, F, C, h, w], debug dict)."""
        self.traces += 1
        cache = state.cache
        cs = state.frame
        nsteps = len(self.timesteps)
        ts = jnp.asarray(self.timesteps)
        f = noise.shape[1]
        # NAM (release: lazily at step 0) once, for every layer, before the forwards; traces as if of step 0
        cache, nam_dbg = self._nam(cache, text, state.zero_query_next)
        nam_dbg = {key: val[None] for key, val in nam_dbg.items()}  # [1, L, ...]
        # in place (split-KV on): every forward writes its frames into their cache slots and attends there (with
        # SMA only each head's top-k sink/bank frames are gathered; the window is read in place)
        in_place = self.scfg.attention_kv_splits != 1
        cand_mean = None
        if in_place and self.mem.sma and self.spec.sink + self.spec.bank > 0:
            cand_mean = sma_lib.slot_descriptors(cache.k, self.spec.sink, self.spec.window, jnp.dtype(self.mcfg.dtype))

        def body(carry, s):
            x, kv = carry
            plan = ForwardPlan(start=cs, q_bank=False, recompute=jnp.array(False),
                               zero_text_query=state.zero_query_next)
            c = cache.replace(k=kv[0], v=kv[1])
            flow, tt, outs, _ = self._forward(params, c, x, ts[s], plan, text, False, in_place, cand_mean,
                                              keys_valid)
            x0 = sch.flow_to_x0(self.schedule, flow, x, tt)
            nxt = jnp.minimum(s + 1, nsteps - 1)
            renoised = sch.add_noise(self.schedule, x0, step_noise[jnp.minimum(s, nsteps - 2)],
                                     jnp.full_like(tt, ts[nxt]))
            x = jnp.where(s < nsteps - 1, renoised, x)
            dbg = {k: v for k, v in outs.items() if k.startswith("sma_")}
            return (x, outs.get("carry", kv)), (x0, dbg)

        (_, kv), (x0s, dbg_steps) = jax.lax.scan(body, (noise, (cache.k, cache.v)), jnp.arange(nsteps))
        cache = cache.replace(k=kv[0], v=kv[1])
        dbg_steps = {**dbg_steps, **nam_dbg}
        x0 = x0s[-1]
        # clean-context pass: writes the chunk's K/V (and records the bank prototype)
        x_ctx = x0
        if self.scfg.context_noise > 0:
            tctx = jnp.full((x0.shape[0], f), self.scfg.context_noise, jnp.float32)
            x_ctx = sch.add_noise(self.schedule, x0, ctx_noise, tctx)
        plan = ForwardPlan(start=cs, q_bank=False, recompute=jnp.array(False), zero_text_query=jnp.array(False))
        _, _, outs, (new_slots, placement) = self._forward(params, cache, x_ctx, self.scfg.context_noise, plan,
                                                            text, True, in_place, cand_mean, keys_valid)
        cache = commit(cache, outs, new_slots, cs + f, placement)
        cache = record_chunk(cache, outs, cs, self.spec, self.mem.bank_record_rule)
        hist_slots = jnp.mod(cs + jnp.arange(f), self.spec.window)
        history = state.history.at[:, hist_slots].set(x0.astype(state.history.dtype))
        dbg = {"x0_steps": x0s, "steps": dbg_steps,
               "ctx": {k: v for k, v in outs.items() if k.startswith(("nam_", "sma_"))}}
        new_state = StreamState(cache, history, cs + f, jnp.array(False))
        return new_state, x0, dbg

    # ------------------------------------------------------------------ re-cache at a prompt switch
    def _recache_impl(self, n: int, drop: int, params, state: StreamState, text: PromptKV):
        """Re-encode the last ``n`` frames with the new prompt, skipping the first ``drop`` (dead, see
        :func:`memory.cache.recache_dead_frames`): one forward over ``n - drop`` frames."""
        cache = state.cache
        csf = state.frame
        start = csf - n + drop
        frames = jnp.take(state.history, jnp.mod(start + jnp.arange(n - drop), self.spec.window), axis=1)
        zero = self.mem.nam_switch_query == "zeroed"
        # the forward's q_bank update (prototype in / NAM) needs only the cache and the prompt: done first, in place
        cache, nam_dbg = self._nam(cache, text, jnp.array(zero))
        plan = ForwardPlan(start=start, q_bank=False, recompute=start > 0, zero_text_query=jnp.array(zero))
        _, _, outs, (new_slots, placement) = self._forward(params, cache, frames, self.scfg.context_noise, plan,
                                                            text, True)
        cache = commit(cache, outs, new_slots, csf, placement)
        dbg = {**{k: v for k, v in outs.items() if k.startswith("sma_")}, **nam_dbg}
        return StreamState(cache, state.history, csf, jnp.array(zero)), dbg

class StreamingSampler:
    """Chunk-by-chunk generation with a fixed-size cache; everything shape-static and jitted once."""

    def __init__(self, params: dit.Params, model_cfg: ModelConfig, mem_cfg: MemoryConfig,
                 sampler_cfg: SamplerConfig, batch_size: int = 1, latent_hw: tuple[int, int] | None = None,
                 debug: bool = False):
        self.params = dit.fuse_self_qkv(params)  # the sampler's layout: q/k/v kernels side by side
        self.mcfg, self.mem, self.scfg = model_cfg, mem_cfg, sampler_cfg
        self.batch = batch_size
        self.latent_hw = latent_hw or sampler_cfg.latent_hw
        self.debug = debug
        h, w = self.latent_hw
        self.tokens_per_frame = dit.tokens_per_frame(model_cfg, h, w)
        self.spec = CacheSpec.from_config(
            mem_cfg, num_layers=model_cfg.num_layers, batch=batch_size, tokens_per_frame=self.tokens_per_frame,
            num_heads=model_cfg.num_heads, head_dim=model_cfg.head_dim, chunk_frames=sampler_cfg.chunk_frames)
        schedule = sch.make_schedule(sampler_cfg.timestep_shift,
                                     num_train_timesteps=sampler_cfg.num_train_timesteps)
        self.timesteps = np.asarray(sch.warp_denoising_steps(sampler_cfg.denoising_step_list, schedule)
                                    if sampler_cfg.warp_denoising_step
                                    else np.asarray(sampler_cfg.denoising_step_list, np.float32), np.float32)
        self.cache_dtype = jnp.dtype(model_cfg.dtype)
        # compiled steps depend only on static configuration: samplers with the same key share them
        key = (model_cfg, mem_cfg, sampler_cfg, self.spec, tuple(self.timesteps.tolist()), debug)
        if key not in _COMPILED:
            _COMPILED[key] = ChunkSteps(model_cfg, mem_cfg, sampler_cfg, self.spec, self.timesteps, debug)
        self.steps = _COMPILED[key]
        self._zeros: dict[tuple, jnp.ndarray] = {}

    @property
    def trace_count(self) -> int:
        """Times the chunk step was traced (= compiled) for this sampler's static configuration (with the steady
        program, where it exists: 2 after the first chunk)."""
        return self.steps.traces

    # ------------------------------------------------------------------ state
    def init_state(self) -> StreamState:
        h, w = self.latent_hw
        hist = jnp.zeros((self.batch, self.spec.window, self.mcfg.in_dim, h, w), jnp.float32)
        return StreamState(init_cache(self.spec, self.cache_dtype), hist, jnp.array(0, jnp.int32),
                           jnp.array(False))

    def prompt_kv(self, context: jnp.ndarray) -> PromptKV:
        """Per-layer cross-attention K/V of prompt embeddings [B, T, text_dim], computed once per prompt."""
        context = jnp.asarray(context)
        want = (self.batch, self.mcfg.text_len, self.mcfg.text_dim)
        if context.shape != want:
            raise ValueError(f"prompt embeddings have shape {tuple(context.shape)}, expected {want} "
                             "(batch, model.text_len, model.text_dim): check the text encoder / model config")
        return self.steps.prompt_kv(self.params, context)

    def recache(self, state: StreamState, text: PromptKV, prune: bool = True) -> tuple[StreamState, dict]:
        """Re-encode the last min(W, frame) output frames with the new prompt (one forward). ``prune``: leave out
        the leading frames nothing reads (:func:`memory.cache.recache_dead_frames`; exact, none under SMA)."""
        frame = int(state.frame)
        n = min(self.spec.window, frame)
        drop = recache_dead_frames(self.spec, frame, self.mem.sma) if prune else 0
        return self.steps.recache_fn(n, drop)(self.params, state, text)

    def chunk(self, state: StreamState, text: PromptKV, noise: jnp.ndarray, step_noise: jnp.ndarray,
              ctx_noise: jnp.ndarray | None = None) -> tuple[StreamState, jnp.ndarray, dict]:
        if noise.shape[1] != self.spec.chunk_frames:  # chunks start at multiples of the chunk (cache slots rely on it)
            raise ValueError(f"chunk noise has {noise.shape[1]} latent frames, the sampler makes chunks of "
                             f"sampler.chunk_frames={self.spec.chunk_frames}: noise must be [B, "
                             f"{self.spec.chunk_frames}, C, h, w]")
        if ctx_noise is None:  # one zero array per shape (not a new one, an eager op, every chunk)
            key = (noise.shape, jnp.dtype(noise.dtype).name)
            if key not in self._zeros:
                self._zeros[key] = jnp.zeros_like(noise)
            ctx_noise = self._zeros[key]
        args = (self.params, state, text, noise, step_noise, ctx_noise)
        program = self.steps.chunk
        if self.steps.fast_path:
            # every key slot valid (the steady state, checked exactly on the device): the program without per-layer
            # validity conditionals. The [] bool read waits for the previous chunk (one sync a chunk, never a step;
            # a caller that writes each chunk's frames waits for it anyway). Until then the steady program compiles
            # with the first chunks, not mid-stream
            if bool(self.steps.steady(state)):
                program = self.steps.chunk_steady
            else:
                self.steps.precompile_steady(args)
        return program(*args)

    # ------------------------------------------------------------------ the generator loop
    def stream(self, contexts: Sequence[jnp.ndarray], switch_frames: Sequence[int], num_frames: int, *,
               rng: jax.Array | None = None, init_noise: np.ndarray | None = None,
               step_noise: np.ndarray | None = None,
               on_state: Callable[[int, StreamState], StreamState] | None = None
               ) -> Iterator[tuple[int, jnp.ndarray, dict]]:
        """Yield ``(chunk_index, x0 [B, F, C, h, w], debug)`` chunk by chunk.

        contexts: one prompt-embedding array [B, T, text_dim] per segment; switch_frames: the latent frames where
        segments 2.. start (len = len(contexts) - 1, multiples of the chunk size). Noise comes from ``rng`` or from
        explicit arrays (``init_noise [B, num_frames, C, h, w]``, ``step_noise [chunks, S-1, B, F, C, h, w]``)
        to replay another implementation's draws. ``on_state(chunk_index, state) -> state`` sees (and may replace,
        same shapes) the state each chunk starts from, after any prompt switch's re-cache: a probe's hook, e.g. to
        record the memory bank or swap in another run's (``benchmarks/storyworld_bank_probe.py``).
        """
        c = self.scfg.chunk_frames
        validate_schedule(switch_frames, len(contexts), num_frames, c)
        h, w = self.latent_hw
        nsteps = len(self.timesteps)
        if init_noise is None and rng is None:
            raise ValueError("give rng or explicit init_noise/step_noise")
        texts = [self.prompt_kv(ctx) for ctx in contexts]
        state = self.init_state()
        seg = 0
        for ci in range(num_frames // c):
            f0 = ci * c
            if seg + 1 < len(contexts) and f0 >= switch_frames[seg]:
                seg += 1
                state, rdbg = self.recache(state, texts[seg])
                self.current_state = state
                if self.debug:
                    yield -1, None, {"recache": rdbg, "chunk": ci}
            if init_noise is not None:
                noise = jnp.asarray(init_noise[:, f0:f0 + c], jnp.float32)
                sn = jnp.asarray(step_noise[ci], jnp.float32)
                cn = None
            else:
                rng, noise, sn, cn = _chunk_noise(rng, (self.batch, c, self.mcfg.in_dim, h, w), nsteps)
            if on_state is not None:
                state = on_state(ci, state)
            state, x0, dbg = self.chunk(state, texts[seg], noise, sn, cn)
            self.current_state = state
            yield ci, x0, dbg


@functools.partial(jax.jit, static_argnums=(1, 2))
def _chunk_noise(rng: jax.Array, shape: tuple[int, ...], nsteps: int):
    """One chunk's draws: ``split(rng, 4)`` -> (next rng, ``normal(k1, shape)``, ``normal(k2, (nsteps - 1,) +
    shape)``, ``normal(k3, shape)``), as one compiled program; the same values as ``jax.random.normal``, drawn flat
    (``nn.initializers.standard_normal``: far less XLA compile time on CPU)."""
    rng, k1, k2, k3 = jax.random.split(rng, 4)
    normal = init_lib.standard_normal
    return rng, normal(k1, shape), normal(k2, (nsteps - 1,) + shape), normal(k3, shape)


def validate_schedule(switch_frames: Sequence[int], num_segments: int, num_frames: int, chunk: int) -> None:
    """Clear errors for a frame count or switch points that do not fit the chunking."""
    if num_segments < 1:
        raise ValueError("at least one prompt is needed")
    if num_frames <= 0 or num_frames % chunk:
        raise ValueError(f"num_frames={num_frames} is not a positive multiple of the chunk size {chunk} "
                         "latent frames; use a multiple")
    if len(switch_frames) != num_segments - 1:
        raise ValueError(f"{num_segments} prompts need {num_segments - 1} switch frames, got {list(switch_frames)}")
    prev = 0
    for f in switch_frames:
        if f % chunk:
            raise ValueError(f"switch frame {f} is not on a chunk boundary (multiple of {chunk}); round it")
        if f <= prev or f >= num_frames:
            raise ValueError(f"switch frames {list(switch_frames)} must increase strictly inside (0, {num_frames})")
        prev = f


def sampler_from_config(params: dit.Params, cfg: Config, batch_size: int | None = None,
                        debug: bool = False) -> StreamingSampler:
    return StreamingSampler(params, cfg.model, cfg.memory, cfg.sampler,
                            batch_size=batch_size or cfg.sampler.batch_size, debug=debug)
