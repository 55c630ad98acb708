"""Training data: random-access sources (prompts, switch prompts, cached text embeddings, video latents,
ODE trajectories) and :func:`make_loader`, a Grain pipeline with per-process sharding and checkpointable state.

Sources need no grain; grain is imported only by :func:`make_loader` (and ArrayRecord reading), so sampling
code can import this package without it.
"""
from __future__ import annotations

from typing import Any

from memflow_jax.data.latents import (ArrayRecordSource, LatentSource, OdeTrajectorySource, list_latent_files,
                                      write_array_record)
from memflow_jax.data.prompts import (DataError, MultiPromptSource, PromptSource, SwitchPromptSource, all_prompts,
                                      read_prompt_file)

__all__ = [
    "ArrayRecordSource", "CachedEmbeddingSource", "DataError", "LatentSource", "MultiPromptSource",
    "OdeTrajectorySource", "PromptSource", "SwitchPromptSource", "TextEmbeddingCache", "all_prompts",
    "build_cache", "list_latent_files", "make_loader", "read_prompt_file", "write_array_record",
]


_TEXT_CACHE_NAMES = ("CachedEmbeddingSource", "TextEmbeddingCache", "build_cache")


def __getattr__(name: str) -> Any:
    """The text-cache names load on first use, so ``python -m memflow_jax.data.text_cache`` does not find its own
    module already imported by this package (runpy's RuntimeWarning)."""
    if name in _TEXT_CACHE_NAMES:
        from memflow_jax.data import text_cache

        return getattr(text_cache, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _grain() -> Any:
    try:
        import grain
    except ImportError:
        raise ImportError("training data loading needs grain: pip install grain") from None
    if not hasattr(grain, "MapDataset"):  # older releases expose the API under grain.python
        import grain.python as grain
    return grain


def make_loader(source: Any, batch_size: int, seed: int = 0, shuffle: bool = True, num_epochs: int | None = None,
                shard_index: int | None = None, shard_count: int | None = None, drop_remainder: bool = True,
                num_threads: int = 4, prefetch_buffer_size: int = 16, worker_count: int = 0) -> Any:
    """A Grain iterator of batches (dicts of numpy arrays, leading dim ``batch_size``) for this shard.

    * Every shard applies the same seeded permutation, keeps ``len // shard_count * shard_count`` records
      and takes every ``shard_count``-th from ``shard_index`` — so shards are disjoint and equally long
      (reference: ``DistributedSampler(shuffle=True, drop_last=True)``). The permutation changes every epoch
      (the reference never calls ``set_epoch``, so it replays one order; we do not copy that).
    * ``num_epochs=None`` repeats forever (reference ``cycle(dataloader)``); batches run across epoch
      boundaries, so every batch is full (static shapes for ``jit``); ``drop_remainder`` drops only the last
      partial batch of a finite run.
    * ``shard_index`` / ``shard_count`` default to ``jax.process_index()`` / ``jax.process_count()``;
      ``batch_size`` is this shard's (per-process) batch.
    * The iterator's ``get_state()`` is a small JSON-able dict; ``set_state`` on a fresh iterator built with
      the same arguments resumes exactly (:mod:`memflow_jax.training.checkpoint` saves it).
    """
    grain = _grain()
    if shard_index is None or shard_count is None:
        import jax

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count})")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs={num_epochs} must be >= 1 (or None to repeat forever)")
    n = len(source)
    per_shard = n // shard_count
    if per_shard == 0:
        raise ValueError(f"the data has {n} records, fewer than the {shard_count} shards; add data or use fewer "
                         "processes")
    if drop_remainder and num_epochs is not None and per_shard * num_epochs < batch_size:
        raise ValueError(f"{per_shard} records per shard x {num_epochs} epochs < batch_size={batch_size}: no full "
                         "batch; lower the batch size or use more epochs")
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if per_shard * shard_count != n:
        ds = ds[:per_shard * shard_count]
    if shard_count > 1:
        ds = ds[shard_index::shard_count]
    ds = ds.repeat(num_epochs)  # an epoch index > 0 re-seeds the shuffle above
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size))
    if worker_count > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags; plain scripts never parse them
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(it)
