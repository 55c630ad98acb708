"""Fixed-size KV cache pytree: frame sink | rolling local window | memory bank | pending prototype | cursors.

Layout (sizes in latent frames, N = tokens per frame, all derived from config + resolution):
* ``k, v``: ``[L, B, W + K, N, H, D]`` — every frame a chunk attends to, in one buffer per layer: slots ``[0, S)``
  are the sink (frames ``0..S-1``), slots ``[S, W)`` a ring buffer for the rolling window (``W =
  local_attn_size``): frame ``f >= S`` lives in slot ``S + (f - S) mod (W - S)``, so the window rolls without moving
  data (the reference shifts its buffer left; attention is order-invariant, and :func:`reference_slot_order` maps
  our slots to the reference's order); slots ``[W, W + K)`` the memory bank (``K = bank_size``; the
  :attr:`KVCache.bank_k` / ``bank_v`` views). One contiguous region per layer lets attention read the keys in
  place (``memory.attend``: no gather once every slot is valid).
* ``bank_frame [L, B, K]``: the source frame of each bank slot (-1 empty; bookkeeping for tests and debugging).
* ``proto_k, proto_v``: ``[L, B, N, H, D]`` the pending prototype (first frame of the latest recorded chunk),
  inserted lazily at the next ``q_bank`` forward; ``proto_frame`` its source frame (-1: none yet).
* cursors (int32 arrays, shared over layers and batch): ``slot_frame [W]`` (frame held by each window slot, -1
  empty), ``end_frame`` (frames written so far), ``bank_pointer`` (number of recorded chunks; the bank holds
  ``min(bank_pointer, K)`` frames).

Shapes never change during a video: one compiled chunk step serves chunk 1 and chunk 10 000.
Memory modes: ``none`` (S = 0, K = 0), ``sink`` (S > 0, K = 0), ``nam`` (S > 0, K > 0).
"""
from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax

from memflow_jax.config import MemoryConfig


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """Static sizes of a cache (hashable; derived from config + resolution)."""

    num_layers: int
    batch: int
    window: int  # W: local_attn_size slots, sink included
    sink: int  # S
    bank: int  # K
    tokens_per_frame: int  # N
    num_heads: int
    head_dim: int
    chunk_frames: int
    record_interval: int

    @property
    def ring(self) -> int:
        return self.window - self.sink

    @property
    def slots(self) -> int:
        """Key slots per layer: window (sink + ring) then bank."""
        return self.window + self.bank

    @staticmethod
    def from_config(mem: MemoryConfig, *, num_layers: int, batch: int, tokens_per_frame: int, num_heads: int,
                    head_dim: int, chunk_frames: int) -> "CacheSpec":
        sink = 0 if mem.mode == "none" else mem.sink_size
        bank = mem.bank_size if mem.mode == "nam" else 0
        if mem.local_attn_size - sink < chunk_frames:
            raise ValueError(
                f"memory.local_attn_size={mem.local_attn_size} leaves {mem.local_attn_size - sink} window frames "
                f"after the sink ({sink}); a chunk of {chunk_frames} frames must fit: raise local_attn_size")
        return CacheSpec(num_layers, batch, mem.local_attn_size, sink, bank, tokens_per_frame, num_heads,
                         head_dim, chunk_frames, mem.record_interval)


@flax.struct.dataclass
class KVCache:
    k: jnp.ndarray  # [L, B, W + K, N, H, D] window slots [0, W) then bank slots [W, W + K)
    v: jnp.ndarray  # [L, B, W + K, N, H, D]
    bank_frame: jnp.ndarray  # [L, B, K] int32
    proto_k: jnp.ndarray  # [L, B, N, H, D]
    proto_v: jnp.ndarray  # [L, B, N, H, D]
    proto_frame: jnp.ndarray  # [] int32
    slot_frame: jnp.ndarray  # [W] int32
    end_frame: jnp.ndarray  # [] int32
    bank_pointer: jnp.ndarray  # [] int32

    @property
    def window(self) -> int:
        """W: window slots (sink + ring) in front of the bank."""
        return self.k.shape[2] - self.bank_frame.shape[2]

    @property
    def bank_k(self) -> jnp.ndarray:  # [L, B, K, N, H, D] (a view of k's bank slots)
        return self.k[:, :, self.window:]

    @property
    def bank_v(self) -> jnp.ndarray:
        return self.v[:, :, self.window:]

    @property
    def window_k(self) -> jnp.ndarray:  # [L, B, W, N, H, D] sink + ring slots
        return self.k[:, :, :self.window]

    @property
    def window_v(self) -> jnp.ndarray:
        return self.v[:, :, :self.window]


def init_cache(spec: CacheSpec, dtype=jnp.float32) -> KVCache:
    s = spec
    kv = (s.num_layers, s.batch, s.slots, s.tokens_per_frame, s.num_heads, s.head_dim)
    proto = (s.num_layers, s.batch, s.tokens_per_frame, s.num_heads, s.head_dim)
    return KVCache(
        k=jnp.zeros(kv, dtype), v=jnp.zeros(kv, dtype),
        bank_frame=jnp.full((s.num_layers, s.batch, s.bank), -1, jnp.int32),
        proto_k=jnp.zeros(proto, dtype), proto_v=jnp.zeros(proto, dtype),
        proto_frame=jnp.array(-1, jnp.int32),
        slot_frame=jnp.full((s.window,), -1, jnp.int32),
        end_frame=jnp.array(0, jnp.int32), bank_pointer=jnp.array(0, jnp.int32))


def abstract_cache(spec: CacheSpec, dtype=jnp.float32) -> KVCache:
    return jax.eval_shape(lambda: init_cache(spec, dtype))


def slot_of(frame: jnp.ndarray, spec: CacheSpec) -> jnp.ndarray:
    """Cache slot of an absolute frame index: sink slots for f < S, else the ring position."""
    s = spec.sink
    return jnp.where(frame < s, frame, s + jnp.mod(frame - s, spec.ring))


@flax.struct.dataclass
class ForwardPlan:
    """Dynamic description of one forward over ``n`` frames starting at frame ``start``.

    ``q_bank``: insert / NAM-compress the pending prototype before attention (step 0 and recache forwards); a
    Python ``False`` says statically that the bank is only read (the sampler updates it before the chunk).
    ``recompute``: re-encoding already cached frames with ``start > 0`` (sink slots protected).
    ``zero_text_query``: NAM scores with an all-zero text query (release behaviour right after a switch).
    """

    start: jnp.ndarray  # [] int32
    q_bank: jnp.ndarray | bool  # [] bool
    recompute: jnp.ndarray  # [] bool
    zero_text_query: jnp.ndarray  # [] bool (or [B]: per sample, teacher-forced stories)


def chunk_placement(plan: ForwardPlan, n: int, spec: CacheSpec) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Target slot and write flag of each of the forward's ``n`` frames: ([n] int32, [n] bool).

    A frame is written when it lands in the window (the last W - S frames up to the forward's end) or, unless
    recomputing, in the sink. Frames older than the window (first frames of a long recache) are not written.
    """
    frames = plan.start + jnp.arange(n, dtype=jnp.int32)
    end = plan.start + n
    lo = jnp.maximum(spec.sink, end - spec.ring)
    in_window = frames >= lo
    in_sink = (frames < spec.sink) & jnp.logical_not(plan.recompute)
    return slot_of(frames, spec), in_window | in_sink


def recache_dead_frames(spec: CacheSpec, frame: int, sma: bool) -> int:
    """Leading frames of a re-cache at ``frame`` (over the last ``min(W, frame)`` frames) that no one reads: older
    than the window and not sink frames, they are not written (:func:`chunk_placement`) and, since keys come only
    from cache slots, no query attends to them. Dropping them from the forward is exact — except under SMA, whose
    query descriptor pools every query of the forward (then 0). Host-side (``frame`` a Python int)."""
    n = min(spec.window, frame)
    start = frame - n
    if sma or start == 0:  # from frame 0 the sink frames are (re)written
        return 0
    return max(spec.sink, frame - spec.ring) - start


def effective_slots(slot_frame: jnp.ndarray, plan: ForwardPlan, n: int, spec: CacheSpec,
                    placement: tuple[jnp.ndarray, jnp.ndarray] | None = None
                    ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Which slots take a frame of this forward, and the slot->frame map after the writes.

    ``placement``: :func:`chunk_placement` of the forward, if the caller already has it.
    Returns (src [W] int32 index into the forward's frames, has [W] bool, new_slot_frame [W] int32).
    """
    target, write = placement if placement is not None else chunk_placement(plan, n, spec)
    match = (target[None, :] == jnp.arange(spec.window, dtype=jnp.int32)[:, None]) & write[None, :]  # [W, n]
    has = jnp.any(match, axis=1)
    src = jnp.argmax(match, axis=1).astype(jnp.int32)
    frames = plan.start + jnp.arange(n, dtype=jnp.int32)
    new_slot_frame = jnp.where(has, frames[src], slot_frame)
    return src, has, new_slot_frame


def slot_valid(slot_frame: jnp.ndarray, end: jnp.ndarray, spec: CacheSpec) -> jnp.ndarray:
    """[W] bool: slot holds a frame of the sink or of the window ending at ``end`` (exclusive)."""
    lo = jnp.maximum(spec.sink, end - spec.ring)
    idx = jnp.arange(spec.window)
    sink_ok = (idx < spec.sink) & (slot_frame >= 0) & (slot_frame < end)
    ring_ok = (idx >= spec.sink) & (slot_frame >= lo) & (slot_frame < end)
    return sink_ok | ring_ok


def reference_slot_order(slot_frame: jnp.ndarray, spec: CacheSpec) -> jnp.ndarray:
    """Permutation of our slots into the reference's buffer order (sink, then window frames oldest first;
    empty slots last)."""
    key = jnp.where(slot_frame < 0, jnp.iinfo(jnp.int32).max, slot_frame)
    key = jnp.where(jnp.arange(spec.window) < spec.sink, jnp.arange(spec.window) - spec.window, key)
    return jnp.argsort(key)


def put_frames(buf: jnp.ndarray, frames: jnp.ndarray, placement: tuple[jnp.ndarray, jnp.ndarray],
               layer: jnp.ndarray | None = None, contiguous: bool = False) -> jnp.ndarray:
    """Write a forward's frames into their window slots of ``buf [L, B, W + K, N, H, D]`` with
    ``dynamic_update_slice`` (in place when ``buf`` is donated or scan-carried).
    ``frames``: ``[L, B, n, N, H, D]``, or ``[B, n, N, H, D]`` for the single layer ``layer``. ``placement`` =
    (target slot [n], write flag [n]). One write per frame (a frame with its flag off keeps the slot's old
    content), or with ``contiguous`` (the caller guarantees ``target = target[0] + arange(n)`` and every flag on,
    see :func:`chunk_slots_contiguous`) one write of all n frames.
    """
    target, write = placement
    if layer is not None:
        frames = frames[None]
    lead = (0,) if layer is None else (layer,)
    if contiguous:
        return lax.dynamic_update_slice(buf, frames.astype(buf.dtype), lead + (0, target[0], 0, 0, 0))
    for j in range(frames.shape[2]):  # static: n frames (a chunk, or the re-cache window)
        start, frame = lead + (0, target[j], 0, 0, 0), frames[:, :, j][:, :, None]
        old = lax.dynamic_slice(buf, start, frame.shape)
        buf = lax.dynamic_update_slice(buf, jnp.where(write[j], frame.astype(buf.dtype), old), start)
    return buf


def chunk_slots_contiguous(spec: CacheSpec, n: int) -> bool:
    """Whether a forward over ``n`` frames starting at a multiple of ``n`` (a chunk of the sampler, not a re-cache)
    always lands in ``n`` consecutive slots, every frame written: true when the sink and the ring are multiples of
    ``n`` (the chunk never straddles the sink's end or the ring's wrap) and the chunk fits the ring. Static."""
    return n <= spec.ring and spec.sink % n == 0 and spec.ring % n == 0


def kv_carry(cache: KVCache, placement: tuple[jnp.ndarray, jnp.ndarray]):
    """In-place K/V writes for a cache-writing forward: ``(state, read, write)`` for ``nn.dit.LayerCarry``.

    The cache's K/V ride through the layer scan whole; layer ``i`` reads its slices (``read`` fills the
    ``k``/``v`` fields of its layer inputs) and ``write`` puts its frames (``outputs["kv"]``) into their slots, so
    the forward never holds a stacked copy of all layers' new frames (the re-cache's peak memory).
    :func:`commit` takes the written cache from ``outputs["carry"]``.
    """
    def read(state, i, layer):
        k, v = state
        return layer.replace(k=lax.dynamic_index_in_dim(k, i, 0, keepdims=False),
                             v=lax.dynamic_index_in_dim(v, i, 0, keepdims=False))

    def write(state, i, outputs):
        outputs = dict(outputs)
        new_k, new_v = outputs.pop("kv")
        return (put_frames(state[0], new_k, placement, i), put_frames(state[1], new_v, placement, i)), outputs

    return (cache.k, cache.v), read, write


def kv_in_place(cache: KVCache):
    """``(state, read, write)`` for ``nn.dit.LayerCarry`` when attention itself writes the forward's frames into
    the cache and reads its keys there (``memory.attend.make_attend_fn(in_place=True)``): layer ``i`` gets the
    whole stacked K/V and its index, and hands the written K/V back in ``outputs["kv_state"]``."""
    def read(state, i, layer):
        return layer.replace(k=state[0], v=state[1], index=i)

    def write(state, i, outputs):
        outputs = dict(outputs)
        return outputs.pop("kv_state"), outputs

    return (cache.k, cache.v), read, write


def commit(cache: KVCache, outputs: dict, new_slot_frame: jnp.ndarray, end: jnp.ndarray,
           placement: tuple[jnp.ndarray, jnp.ndarray]) -> KVCache:
    """Persist a cache-updating forward: its K/V frames (``outputs["kv"]``, [L, B, n, N, H, D]) go into their slots
    (``placement`` = (target slot [n], write flag [n]) from :func:`chunk_placement`) — or, when the forward wrote
    them in place (:func:`kv_carry`), the written K/V come from ``outputs["carry"]`` — and take the bank as updated
    by a ``q_bank`` forward, the slot map and the end cursor."""
    if "carry" in outputs:
        k, v = outputs["carry"]
    else:
        new_k, new_v = outputs["kv"]
        k, v = put_frames(cache.k, new_k, placement), put_frames(cache.v, new_v, placement)
    cache = cache.replace(k=k, v=v, slot_frame=new_slot_frame, end_frame=jnp.maximum(cache.end_frame, end))
    return with_bank(cache, outputs)


def with_bank(cache: KVCache, outputs: dict) -> KVCache:
    """Take the (possibly NAM-updated) bank from a forward's outputs, if the cache has a bank."""
    if "bank" not in outputs:
        return cache
    bk, bv, bf = outputs["bank"]
    return replace_bank(cache, bk, bv, bf)


def replace_bank(cache: KVCache, bank_k: jnp.ndarray, bank_v: jnp.ndarray, bank_frame: jnp.ndarray) -> KVCache:
    """The cache with new bank slots ``[L, B, K, N, H, D]`` (written in place into k/v when donated)."""
    w = cache.window
    # the new bank is usually gathered from the old bank slots: materialise it first, so XLA writes the slots in
    # place instead of copying the whole cache (H100, nam: a 3.3 ms copy of k and v per chunk)
    bank_k, bank_v = lax.optimization_barrier((bank_k, bank_v))
    return cache.replace(k=lax.dynamic_update_slice_in_dim(cache.k, bank_k.astype(cache.k.dtype), w, axis=2),
                         v=lax.dynamic_update_slice_in_dim(cache.v, bank_v.astype(cache.v.dtype), w, axis=2),
                         bank_frame=bank_frame)


def zero_window(cache: KVCache) -> KVCache:
    """The cache with its window slots (sink + ring) zeroed and the bank kept."""
    return cache.replace(k=cache.k.at[:, :, :cache.window].set(0), v=cache.v.at[:, :, :cache.window].set(0))


def record_chunk(cache: KVCache, outputs: dict, start: jnp.ndarray, spec: CacheSpec, rule: str) -> KVCache:
    """After a chunk's clean-context pass: advance the bank pointer on record chunks
    (``chunk % record_interval == 0``) and take the chunk's first frame as the pending prototype — at every chunk
    (``rule="single"``, CausalInferencePipeline) or only at record chunks (``"interactive"``)."""
    if spec.bank == 0:
        return cache
    record = jnp.mod(start // spec.chunk_frames, spec.record_interval) == 0
    update = record if rule == "interactive" else jnp.array(True)
    pk, pv = outputs["first_frame"]
    return cache.replace(
        bank_pointer=cache.bank_pointer + record.astype(jnp.int32),
        proto_k=jnp.where(update, pk.astype(cache.proto_k.dtype), cache.proto_k),
        proto_v=jnp.where(update, pv.astype(cache.proto_v.dtype), cache.proto_v),
        proto_frame=jnp.where(update, start, cache.proto_frame))
