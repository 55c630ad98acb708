"""Training checkpoints: an Orbax ``CheckpointManager`` over a dict of named pytrees.

One checkpoint step (``<dir>/<step>/``) holds

* one Orbax item per named pytree of the state (``generator``, ``critic``, ``ema``, ``generator_lora``,
  ``generator_opt``, ``critic_opt``, ``rng``, ... — any names), saved asynchronously from sharded arrays;
* ``meta``: JSON (the step, the item names, the caller's metadata such as the config);
* ``data_iter`` (optional): the data iterator state as JSON, one file per process
  (``process_<i>-of-<n>.json``), captured synchronously when ``save`` is called.

Orbax writes each step into ``<step>.orbax-checkpoint-tmp*`` and renames it when every item is written
(on object stores it writes ``commit_success.txt`` last instead), so a crash mid-save leaves an
incomplete step that :meth:`TrainCheckpointer.restore_latest` ignores: at most the steps since the last
complete save are lost. Incomplete step folders newer than the newest complete one are moved to
``<dir>/_incomplete/`` when the checkpointer opens, so the step numbers can be saved again.

Reference: ``Trainer.save`` writes ``checkpoint_model_<step>/model.pt`` every ``log_iters`` steps with
``generator``, ``critic``, ``generator_ema`` (only once ``step > ema_start_step``), both optimizer states and
``step`` (LoRA runs: ``generator_lora``, ``critic_lora``, ``step``), keeps ``max_checkpoints``, and resumes
from the highest-numbered folder that has a ``model.pt``. It does not save the data loader position or
RNG state; we do.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np

META = "meta"
DATA_ITER = "data_iter"
RESERVED = (META, DATA_ITER)
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or restored as asked."""


# --------------------------------------------------------------------------------------------------
# Iterator state as JSON (grain DatasetIterator: dict state; grain DataLoaderIterator: JSON bytes)
# --------------------------------------------------------------------------------------------------


def _json_default(x: Any) -> Any:
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, bytes):
        return x.decode()
    raise TypeError(f"iterator state value {x!r} of type {type(x).__name__} is not JSON serialisable")


def iterator_state_json(iterator: Any) -> str:
    """``iterator.get_state()`` as a JSON string."""
    state = iterator.get_state()
    if isinstance(state, (bytes, bytearray)):
        return bytes(state).decode()
    return json.dumps(state, default=_json_default, sort_keys=True)


def _layout(state: Any) -> Any:
    """The shape of an iterator state: its keys and the lengths of its lists (a Grain loader's depends on its
    worker count), not its positions."""
    if isinstance(state, dict):
        return {k: _layout(v) for k, v in state.items()}
    if isinstance(state, list):
        return len(state)
    return None


def set_iterator_state_json(iterator: Any, text: str) -> None:
    """Inverse of :func:`iterator_state_json` (bytes-state iterators get the encoded JSON back). A saved state laid
    out for another loader (e.g. another ``train.data_workers``) is refused by name instead of failing later inside
    the loader."""
    if isinstance(iterator.get_state(), (bytes, bytearray)):
        iterator.set_state(text.encode())
        return
    saved = json.loads(text)
    if _layout(saved) != _layout(json.loads(iterator_state_json(iterator))):
        raise CheckpointError("the checkpoint's data-iterator state is laid out for another data loader than this "
                              "run's (a different train.data_workers?): resume with the loader settings the run was "
                              "saved with")
    iterator.set_state(saved)


_ITER_ARGS: tuple[type, type] | None = None


def _iter_args() -> tuple[type, type]:
    """Orbax args + handler writing/reading one JSON file per process (registered once)."""
    global _ITER_ARGS
    if _ITER_ARGS is not None:
        return _ITER_ARGS
    import orbax.checkpoint as ocp
    from etils import epath

    def _file(directory: Any) -> Any:
        return epath.Path(directory) / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

    class IteratorStateHandler(ocp.CheckpointHandler):
        def save(self, directory, args):  # type: ignore[override]
            epath.Path(directory).mkdir(parents=True, exist_ok=True)
            _file(directory).write_text(args.state_json)

        def restore(self, directory, args=None):  # type: ignore[override]
            path = _file(directory)
            if not path.exists():
                raise CheckpointError(
                    f"{path} missing: the checkpoint was written by a different number of processes "
                    f"(now {jax.process_count()}); restore without data_iterator to start the data anew")
            return path.read_text()

        def metadata(self, directory):  # type: ignore[override]
            return None

        def finalize(self, directory):  # type: ignore[override]
            pass

        def close(self):  # type: ignore[override]
            pass

    @ocp.args.register_with_handler(IteratorStateHandler, for_save=True)
    @dataclasses.dataclass
    class IteratorStateSave(ocp.args.CheckpointArgs):
        state_json: str

    @ocp.args.register_with_handler(IteratorStateHandler, for_restore=True)
    @dataclasses.dataclass
    class IteratorStateRestore(ocp.args.CheckpointArgs):
        pass

    _ITER_ARGS = (IteratorStateSave, IteratorStateRestore)
    return _ITER_ARGS


# --------------------------------------------------------------------------------------------------
# PRNG keys (typed keys are stored as their uint32 key data)
# --------------------------------------------------------------------------------------------------


_LEAF = "value"


def _is_leaf(tree: Any) -> bool:
    return jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(tree))


def _is_typed_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _strip_keys(tree: Any) -> tuple[Any, dict[str, str]]:
    impls: dict[str, str] = {}

    def one(path, x):
        if _is_typed_key(x):
            impls[jax.tree_util.keystr(path)] = str(jax.random.key_impl(x))
            return jax.random.key_data(x)
        return x

    return jax.tree_util.tree_map_with_path(one, tree), impls


# --------------------------------------------------------------------------------------------------
# The checkpointer
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Restored:
    step: int
    state: dict[str, Any]          # name -> restored pytree (sharded jax.Arrays)
    metadata: dict[str, Any]       # the caller's metadata as saved
    data_iterator_restored: bool


def _step_complete(step_dir: Any) -> bool:
    """Orbax's commit markers: ``commit_success.txt`` or a commit time in ``_CHECKPOINT_METADATA``."""
    if (step_dir / "commit_success.txt").exists():
        return True
    try:
        return json.loads((step_dir / "_CHECKPOINT_METADATA").read_text()).get("commit_timestamp_nsecs") is not None
    except (OSError, ValueError, FileNotFoundError):
        return False


def _is_remote(path: str) -> bool:
    return "://" in path


class TrainCheckpointer:
    """Save / restore a dict of named pytrees (+ JSON metadata + data iterator state) every N steps.

    Args:
      directory: the run's checkpoint folder (created).
      save_interval_steps: ``save(step, ...)`` writes only when ``step % save_interval_steps == 0``
        (or ``force=True``).
      max_to_keep: newest complete steps kept (reference ``max_checkpoints``); ``None`` keeps all.
      async_save: write in a background thread (``save`` returns once arrays are copied off device).
    """

    def __init__(self, directory: str | os.PathLike, save_interval_steps: int = 1,
                 max_to_keep: int | None = 3, async_save: bool = True):
        import orbax.checkpoint as ocp

        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps={save_interval_steps} must be >= 1")
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep={max_to_keep} must be >= 1 (or None to keep every step)")
        from etils import epath

        directory = os.fspath(directory)
        self.directory = directory if _is_remote(directory) else os.path.abspath(directory)
        self._path = epath.Path(self.directory)
        self.save_interval_steps = save_interval_steps
        if jax.process_index() == 0:
            self._path.mkdir(parents=True, exist_ok=True)
            self._quarantine_incomplete()
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("memflow_jax.checkpoint.open")
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=1, max_to_keep=max_to_keep, create=True,
            enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
        self._mgr = ocp.CheckpointManager(self.directory, options=options)

    # ---------------------------------------------------------------------------------------------

    def _step_dirs(self) -> dict[int, Any]:
        return {int(p.name): p for p in self._path.iterdir() if p.name.isdigit() and p.is_dir()}

    def _quarantine_incomplete(self) -> None:
        """Move unfinished numbered step folders newer than the newest complete step to ``_incomplete/``.

        Orbax's own tmp folders (and, on object stores, steps without ``commit_success.txt``) are removed by
        ``cleanup_tmp_directories``; this also covers a numbered folder left without commit markers.
        """
        if _is_remote(self.directory):
            return  # object stores: orbax deletes uncommitted steps itself
        dirs = self._step_dirs()
        complete = [s for s, p in dirs.items() if _step_complete(p)]
        if dirs and not complete:
            raise CheckpointError(
                f"{self.directory}: step folders {sorted(dirs)} exist but none has a commit marker "
                "(commit_success.txt / _CHECKPOINT_METADATA commit time): they are not checkpoints written "
                "by this code; move them away or pick another checkpoint directory")
        newest = max(complete, default=-1)
        for step, path in dirs.items():
            if step > newest:
                dest = os.path.join(self.directory, "_incomplete", f"{step}.{time.time_ns()}")
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                shutil.move(os.fspath(path), dest)

    def all_steps(self) -> list[int]:
        """Complete steps, ascending (temporary and unfinished step folders excluded)."""
        dirs = self._step_dirs()
        return sorted(s for s in self._mgr.all_steps() if s in dirs and _step_complete(dirs[s]))

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    @classmethod
    def from_config(cls, train: Any) -> "TrainCheckpointer":
        """From the ``train`` config section (``ckpt_dir``, ``save_interval``, ``max_to_keep``, async)."""
        if not train.ckpt_dir:
            raise CheckpointError("train.ckpt_dir is empty; set it to the run's checkpoint folder")
        return cls(train.ckpt_dir, train.save_interval, train.max_to_keep, train.async_checkpointing)

    def should_save(self, step: int) -> bool:
        return step % self.save_interval_steps == 0

    # ---------------------------------------------------------------------------------------------

    def save(self, step: int, state: Mapping[str, Any], metadata: Mapping[str, Any] | None = None,
             data_iterator: Any = None, force: bool = False) -> bool:
        """Start saving ``state`` (name -> pytree; ``None`` values are skipped) at ``step``.

        Returns whether a save was started. The data iterator's state is read now, so advancing it
        while the arrays are written in the background is safe.
        """
        import orbax.checkpoint as ocp

        if not (force or self.should_save(step)):
            return False
        bad = sorted(set(state) & set(RESERVED))
        if bad:
            raise CheckpointError(f"state names {bad} are reserved ({list(RESERVED)}); rename them")
        items: dict[str, Any] = {}
        keys: dict[str, dict[str, str]] = {}
        for name, tree in state.items():
            if tree is None:
                continue
            if _is_leaf(tree):  # Orbax saves containers only: a bare array / scalar goes in as {"value": x}
                tree = {_LEAF: tree}
            tree, impls = _strip_keys(tree)
            if impls:
                keys[name] = impls
            items[name] = ocp.args.StandardSave(tree)
        meta = {"format_version": FORMAT_VERSION, "step": int(step), "items": sorted(items),
                "prng_keys": keys, "process_count": jax.process_count(),
                "has_data_iter": data_iterator is not None, "user": dict(metadata or {})}
        try:
            json.dumps(meta)
        except TypeError as e:
            raise CheckpointError(f"checkpoint metadata is not JSON serialisable: {e}") from None
        items[META] = ocp.args.JsonSave(meta)
        if data_iterator is not None:
            save_args, _ = _iter_args()
            items[DATA_ITER] = save_args(iterator_state_json(data_iterator))
        if step in self._mgr.all_steps():
            raise CheckpointError(f"{self.directory}: step {step} is already saved")
        return bool(self._mgr.save(step, args=ocp.args.Composite(**items), force=True))

    def restore(self, step: int, abstract_state: Mapping[str, Any], shardings: Mapping[str, Any] | None = None,
                data_iterator: Any = None, optional: Sequence[str] = ()) -> Restored:
        """Restore ``step``: every name of ``abstract_state`` (arrays or ``ShapeDtypeStruct``s), placed with
        ``shardings[name]`` (else the abstract leaves' own ``.sharding``, else the first local device).

        Names in ``optional`` that the step lacks (e.g. ``ema`` before ``ema_start_step``) come back as
        ``None``; any other missing name is an error. The data iterator's state is set when given.
        """
        import orbax.checkpoint as ocp

        self._mgr.wait_until_finished()
        if step not in self.all_steps():
            raise CheckpointError(f"{self.directory}: no complete checkpoint for step {step} "
                                  f"(complete steps: {self.all_steps()})")
        meta = self._mgr.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
        saved = set(meta["items"])
        missing = sorted(n for n in abstract_state if n not in saved and n not in optional)
        if missing:
            raise CheckpointError(f"{self.directory}/{step}: has no item(s) {missing} (saved: {sorted(saved)}); "
                                  "mark them optional or restore from a matching checkpoint")
        shardings = dict(shardings or {})
        args: dict[str, Any] = {}
        for name, abstract in abstract_state.items():
            if name in saved:
                if _is_leaf(abstract):
                    abstract = {_LEAF: abstract}
                    if shardings.get(name) is not None:
                        shardings[name] = {_LEAF: shardings[name]}
                target = _restore_target(abstract, shardings.get(name))
                args[name] = ocp.args.StandardRestore(target)
        want_iter = data_iterator is not None and meta.get("has_data_iter", False)
        if want_iter:
            _, restore_args = _iter_args()
            args[DATA_ITER] = restore_args()
        try:
            out = self._mgr.restore(step, args=ocp.args.Composite(**args))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{self.directory}/{step}: restore failed ({type(e).__name__}: {e}); does the "
                                  "abstract state match the one saved (same model config / optimizer)?") from e
        state: dict[str, Any] = {}
        for name, abstract in abstract_state.items():
            if name not in saved:
                state[name] = None
                continue
            leaf = _is_leaf(abstract)
            abstract = {_LEAF: abstract} if leaf else abstract
            value = _rewrap_keys(out[name], abstract, meta.get("prng_keys", {}).get(name, {}))
            state[name] = value[_LEAF] if leaf else value
        if want_iter:
            set_iterator_state_json(data_iterator, out[DATA_ITER])
        return Restored(int(step), state, meta.get("user", {}), want_iter)

    def restore_latest(self, abstract_state: Mapping[str, Any], shardings: Mapping[str, Any] | None = None,
                       data_iterator: Any = None, optional: Sequence[str] = ()) -> Restored | None:
        """:meth:`restore` the newest complete step; ``None`` when there is none (a fresh run)."""
        self._mgr.wait_until_finished()
        step = self.latest_step()
        if step is None:
            return None
        return self.restore(step, abstract_state, shardings, data_iterator, optional)

    def read_metadata(self, step: int | None = None) -> dict[str, Any] | None:
        """The caller's metadata of ``step`` (default: latest complete), without reading arrays."""
        import orbax.checkpoint as ocp

        step = self.latest_step() if step is None else step
        if step is None:
            return None
        return self._mgr.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]["user"]

    def wait_until_finished(self) -> None:
        self._mgr.wait_until_finished()

    def close(self) -> None:
        self._mgr.wait_until_finished()
        self._mgr.close()

    def __enter__(self) -> "TrainCheckpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _restore_target(abstract: Any, shardings: Any) -> Any:
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def leaf(x, s=None):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            return x  # Python scalars restore as saved
        sharding = s if s is not None else getattr(x, "sharding", None)
        if isinstance(x, np.ndarray) or sharding is None:
            sharding = s if s is not None else default
        if _is_typed_key(x):  # stored as key data; keys are tiny, so restore them replicated
            shape = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype)).shape
            if hasattr(sharding, "mesh"):
                sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
            return jax.ShapeDtypeStruct(shape, np.uint32, sharding=sharding)
        return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype, sharding=sharding)

    if shardings is None:
        return jax.tree_util.tree_map(leaf, abstract)
    return jax.tree_util.tree_map(leaf, abstract, shardings)


def _rewrap_keys(restored: Any, abstract: Any, impls: Mapping[str, str]) -> Any:
    if not impls:
        return restored
    flat_abs = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]}

    def one(path, x):
        k = jax.tree_util.keystr(path)
        if k in impls and _is_typed_key(flat_abs.get(k)):
            return jax.random.wrap_key_data(x, impl=impls[k])
        return x

    return jax.tree_util.tree_map_with_path(one, restored)
