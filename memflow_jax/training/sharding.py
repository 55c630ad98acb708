"""Device mesh, logical-axis sharding rules and multi-host helpers.

One table (:data:`PARAM_RULES`) names every param dimension with a *logical* axis (``'layers'``, ``'embed'``,
``'heads'``, ``'mlp'``, ...); a second table (:data:`LOGICAL_TO_MESH`) maps logical axes to mesh axes of a
``('data', 'fsdp'[, 'tensor'])`` mesh. On top of that every param is fully sharded (FSDP / ZeRO-3) over
``'fsdp'`` on its largest dimension that the ``'fsdp'`` size divides (never the stacked ``'layers'`` axis, which
``lax.scan`` slices); a param with no such dimension stays replicated, so tiny dims never fail.

The same function serves any param tree (generator, critic, teacher, LoRA trees, EMA copies): paths the table
does not name fall back to "all dims unnamed" (plus ``'layers'`` first under ``blocks/``), and optimizer states
take the sharding of the param they mirror (:func:`opt_state_shardings`).

Reference: FSDP ``sharding_strategy: hybrid_full`` (shard within a node, replicate across nodes) is
``make_mesh(data=num_hosts, fsdp=devices_per_host)``; ``full`` is ``make_mesh(data=1, fsdp=-1)``.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, FSDP, TENSOR = "data", "fsdp", "tensor"

Logical = tuple[Any, ...]  # entries: logical axis name | None | Ellipsis (the remaining dims, unnamed)

# --------------------------------------------------------------------------------------------------
# The rules table (path regex, searched in the "/"-joined param path -> logical axis per dim)
# --------------------------------------------------------------------------------------------------

_ATTN = r"blocks/(?:.*/)?(?:self_attn|cross_attn)"
PARAM_RULES: tuple[tuple[str, Logical], ...] = (
    # per-layer stacks: every leaf under blocks/ has a leading [num_layers] axis
    (_ATTN + r"/(?:q|k|v)/kernel$", ("layers", "embed", "heads")),   # [L, dim, dim]
    (_ATTN + r"/(?:q|k|v)/bias$", ("layers", "heads")),              # [L, dim]
    (_ATTN + r"/o/kernel$", ("layers", "heads", "embed")),           # [L, dim, dim]
    (_ATTN + r"/o/bias$", ("layers", "embed")),
    (_ATTN + r"/norm_(?:q|k)/scale$", ("layers", "heads")),          # qk-norm over the full dim
    (r"blocks/(?:.*/)?ffn_0/kernel$", ("layers", "embed", "mlp")),   # [L, dim, ffn_dim]
    (r"blocks/(?:.*/)?ffn_0/bias$", ("layers", "mlp")),
    (r"blocks/(?:.*/)?ffn_2/kernel$", ("layers", "mlp", "embed")),   # [L, ffn_dim, dim]
    (r"blocks/(?:.*/)?ffn_2/bias$", ("layers", "embed")),
    (r"blocks/(?:.*/)?modulation$", ("layers", None, "embed")),      # [L, 6, dim]
    # UMT5 text encoder (memflow_jax.nn.t5): blocks/attn, blocks/ffn
    (r"blocks/(?:.*/)?attn/(?:q|k|v)/kernel$", ("layers", "embed", "heads")),
    (r"blocks/(?:.*/)?attn/o/kernel$", ("layers", "heads", "embed")),
    (r"blocks/(?:.*/)?ffn/(?:gate|fc1)/kernel$", ("layers", "embed", "mlp")),
    (r"blocks/(?:.*/)?ffn/fc2/kernel$", ("layers", "mlp", "embed")),
    (r"(?:^|/)blocks/", ("layers", ...)),                            # norm3, LoRA factors, anything else
    # outer layers
    (r"head/modulation$", (None, "embed")),                          # [2, dim]
    (r"(?:patch_embedding|text_embedding_0|time_embedding_0)/kernel$", (None, "embed")),
    (r"(?:text_embedding_2|time_embedding_2)/kernel$", ("embed", None)),
    (r"time_projection/kernel$", ("embed", None)),                   # [dim, 6*dim]
    (r"head/head/kernel$", ("embed", None)),
)

# logical axis -> mesh axes (absent or size-1 mesh axes are dropped). Activations use the same names.
LOGICAL_TO_MESH: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", (DATA, FSDP)),
    ("heads", (TENSOR,)),
    ("mlp", (TENSOR,)),
    ("layers", ()),
    ("embed", ()),
    ("seq", ()),
    ("frames", ()),
    ("kv", ()),
)


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Param rules + logical->mesh map + the FSDP policy."""

    params: tuple[tuple[str, Logical], ...] = PARAM_RULES
    logical_to_mesh: tuple[tuple[str, tuple[str, ...]], ...] = LOGICAL_TO_MESH
    fsdp_axis: str = FSDP
    no_fsdp: tuple[str, ...] = ("layers",)  # logical axes never sharded over fsdp (scan slices them)

    def mesh_axes(self, logical: str | None) -> tuple[str, ...]:
        if logical is None:
            return ()
        for name, axes in self.logical_to_mesh:
            if name == logical:
                return axes
        return ()

    def logical_axes(self, path: str, ndim: int) -> tuple[str | None, ...]:
        """Logical name per dim of the leaf at ``path``: first rule whose regex matches and rank fits."""
        for pattern, logical in self.params:
            if re.search(pattern, path) and (expanded := _expand(logical, ndim)) is not None:
                return expanded
        return (None,) * ndim


DEFAULT_RULES = ShardingRules()


def _expand(logical: Logical, ndim: int) -> tuple[str | None, ...] | None:
    if Ellipsis in logical:
        i = logical.index(Ellipsis)
        head, tail = logical[:i], logical[i + 1:]
        if len(head) + len(tail) > ndim:
            return None
        return tuple(head) + (None,) * (ndim - len(head) - len(tail)) + tuple(tail)
    return tuple(logical) if len(logical) == ndim else None


# --------------------------------------------------------------------------------------------------
# Mesh
# --------------------------------------------------------------------------------------------------


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``('data', 'fsdp')`` mesh (``('data', 'fsdp', 'tensor')`` when ``tensor > 1``).

    One of ``data`` / ``fsdp`` may be ``-1``: it takes all remaining devices. Devices default to
    ``jax.devices()`` (all processes), ordered so each process's devices are contiguous in the mesh.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if tensor < 1:
        raise ValueError(f"tensor={tensor} must be >= 1")
    if data == -1 and fsdp == -1:
        raise ValueError("only one of data / fsdp may be -1 (the axis that takes the remaining devices)")
    if data == -1 or fsdp == -1:
        known = (fsdp if data == -1 else data) * tensor
        if known < 1 or n % known:
            raise ValueError(f"{n} devices cannot be split into data={data} x fsdp={fsdp} x tensor={tensor}")
        data, fsdp = (n // known, fsdp) if data == -1 else (data, n // known)
    if min(data, fsdp) < 1 or data * fsdp * tensor != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} x tensor={tensor} = {data * fsdp * tensor} devices, "
                         f"but {n} are available; make the product equal the device count (or use -1)")
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    shape, names = ((data, fsdp, tensor), (DATA, FSDP, TENSOR)) if tensor > 1 else ((data, fsdp), (DATA, FSDP))
    grid = np.asarray(devices, dtype=object).reshape(shape)
    axis_types = getattr(jax.sharding, "AxisType", None)
    if axis_types is not None:  # Auto: shardings are hints to the partitioner (jax.make_mesh defaults to Explicit)
        return Mesh(grid, names, axis_types=(axis_types.Auto,) * len(names))
    return Mesh(grid, names)


def _axis_size(mesh: Mesh, axis: str) -> int:
    return int(mesh.shape[axis]) if axis in mesh.axis_names else 1


# --------------------------------------------------------------------------------------------------
# Param / state shardings
# --------------------------------------------------------------------------------------------------


def _key_str(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_str(path: Sequence[Any]) -> str:
    """A ``jax.tree_util`` key path as ``"a/b/0/c"``."""
    return "/".join(_key_str(k) for k in path)


def spec_for(path: str, shape: Sequence[int], mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> P:
    """PartitionSpec of one leaf: logical rules first, then FSDP on the largest divisible free dim."""
    shape = tuple(int(s) for s in shape)
    logical = rules.logical_axes(path, len(shape))
    used: set[str] = set()
    spec: list[list[str]] = []
    for size, name in zip(shape, logical):
        axes = [a for a in rules.mesh_axes(name) if _axis_size(mesh, a) > 1 and a not in used]
        while axes and size % math.prod(_axis_size(mesh, a) for a in axes):
            axes.pop()  # not divisible: drop mesh axes from the end until it is
        used.update(axes)
        spec.append(axes)
    f = rules.fsdp_axis
    nf = _axis_size(mesh, f)
    if nf > 1 and f not in used:
        best = None
        for i, (size, name) in enumerate(zip(shape, logical)):
            if name in rules.no_fsdp:
                continue
            if size % (math.prod(_axis_size(mesh, a) for a in spec[i]) * nf):
                continue
            key = (not spec[i], size, -i)  # prefer a dim not sharded yet, then the largest, then the first
            if best is None or key > best[0]:
                best = (key, i)
        if best is not None:
            spec[best[1]].append(f)
    return P(*[None if not a else (a[0] if len(a) == 1 else tuple(a)) for a in spec])


def param_shardings(tree: Any, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> Any:
    """Pytree of ``NamedSharding`` for a param tree of arrays or ``jax.ShapeDtypeStruct``.

    Non-array leaves (Python scalars) are replicated.
    """
    def one(path, x):
        return NamedSharding(mesh, spec_for(path_str(path), np.shape(x), mesh, rules))

    return jax.tree_util.tree_map_with_path(one, tree)


def opt_state_shardings(optimizer: Any, params_abstract: Any, param_shardings_tree: Any,
                        rules: ShardingRules = DEFAULT_RULES) -> Any:
    """Shardings of ``optimizer.init(params)`` (via ``jax.eval_shape``; nothing is allocated).

    A state leaf whose key path ends with a param's key path and has its shape (Adam ``mu``/``nu``, EMA-like
    copies) takes that param's sharding; scalars (``count``) are replicated; anything else follows ``rules``.
    """
    state_abstract = jax.eval_shape(optimizer.init, params_abstract)
    return state_shardings_like(state_abstract, params_abstract, param_shardings_tree, rules)


def state_shardings_like(state_abstract: Any, params_abstract: Any, param_shardings_tree: Any,
                         rules: ShardingRules = DEFAULT_RULES) -> Any:
    """Shardings for any tree whose leaves mirror params (optimizer states, EMA trees) — see above."""
    p_leaves = jax.tree_util.tree_flatten_with_path(params_abstract)[0]
    s_leaves = jax.tree_util.tree_leaves(param_shardings_tree)
    if len(p_leaves) != len(s_leaves):
        raise ValueError(f"param_shardings has {len(s_leaves)} leaves but params have {len(p_leaves)}; "
                         "pass the shardings computed for these params")
    if not s_leaves:
        raise ValueError("empty param tree: cannot infer the mesh for the optimizer state")
    mesh = s_leaves[0].mesh
    by_path = {tuple(_key_str(k) for k in path): (tuple(np.shape(x)), s)
               for (path, x), s in zip(p_leaves, s_leaves)}

    def one(path, x):
        keys = tuple(_key_str(k) for k in path)
        shape = tuple(np.shape(x))
        for i in range(len(keys)):
            hit = by_path.get(keys[i:])
            if hit is not None and hit[0] == shape:
                return hit[1]
        if not shape:
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, spec_for("/".join(keys), shape, mesh, rules))

    return jax.tree_util.tree_map_with_path(one, state_abstract)


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """``jax.ShapeDtypeStruct`` tree carrying ``shardings`` (for sharded restore / ``jit`` out_shardings)."""
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(np.shape(x), _dtype_of(x), sharding=s), tree, shardings)


def _dtype_of(x: Any) -> Any:
    return x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype


def shard_params(params: Any, shardings: Any) -> Any:
    """Place a tree on the mesh: host (numpy) leaves — and process-local arrays bound for a multi-process mesh —
    through a per-shard callback (each process materialises only its shards; every process must hold the
    same values), global ``jax.Array`` leaves through ``jax.device_put`` (resharding)."""
    def one(x, s):
        if isinstance(x, jax.Array) and (x.is_fully_addressable == s.is_fully_addressable):
            return jax.device_put(x, s)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])

    return jax.tree_util.tree_map(one, params, shardings)


def describe(tree: Any, shardings: Any) -> str:
    """One line per leaf ``path shape -> spec`` (for logs)."""
    lines = []
    for (path, x), s in zip(jax.tree_util.tree_flatten_with_path(tree)[0], jax.tree_util.tree_leaves(shardings)):
        lines.append(f"{path_str(path)} {tuple(np.shape(x))} -> {tuple(s.spec)}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Activations / batches
# --------------------------------------------------------------------------------------------------


def logical_sharding(mesh: Mesh, logical: Sequence[str | None],
                     rules: ShardingRules = DEFAULT_RULES) -> NamedSharding:
    """``NamedSharding`` for an activation named per dim, e.g. ``('batch', 'seq', 'embed')``."""
    spec = []
    for name in logical:
        axes = tuple(a for a in rules.mesh_axes(name) if _axis_size(mesh, a) > 1)
        spec.append(None if not axes else (axes[0] if len(axes) == 1 else axes))
    return NamedSharding(mesh, P(*spec))


def with_logical_constraint(x: jax.Array, logical: Sequence[str | None], mesh: Mesh,
                            rules: ShardingRules = DEFAULT_RULES) -> jax.Array:
    return jax.lax.with_sharding_constraint(x, logical_sharding(mesh, logical, rules))


def batch_sharding(mesh: Mesh, batch_size: int | None = None,
                   rules: ShardingRules = DEFAULT_RULES) -> NamedSharding:
    """Leading (batch) dim over ``('data', 'fsdp')``, the rest replicated; checks divisibility if given."""
    sharding = logical_sharding(mesh, ("batch",), rules)
    if batch_size is not None:
        n = math.prod(_axis_size(mesh, a) for a in rules.mesh_axes("batch"))
        if batch_size % n:
            raise ValueError(f"global batch size {batch_size} is not divisible by the {n} data-parallel devices "
                             f"(mesh {dict(mesh.shape)}); use a multiple of {n}")
    return sharding


def process_batch_slice(global_batch_size: int, mesh: Mesh | None = None,
                        rules: ShardingRules = DEFAULT_RULES) -> slice:
    """Rows of the global batch that this process loads.

    With a mesh: the rows held by this process's devices under :func:`batch_sharding` (must be contiguous,
    as :func:`make_mesh` arranges). Without: an even split by ``jax.process_index()``.
    """
    if mesh is None:
        count, index = jax.process_count(), jax.process_index()
        if global_batch_size % count:
            raise ValueError(f"global batch {global_batch_size} is not divisible by {count} processes")
        per = global_batch_size // count
        return slice(index * per, (index + 1) * per)
    sharding = batch_sharding(mesh, global_batch_size, rules)
    rows = set()
    for idx in sharding.addressable_devices_indices_map((global_batch_size,)).values():
        rows.update(range(*idx[0].indices(global_batch_size)))
    lo, hi = min(rows), max(rows) + 1
    if len(rows) != hi - lo:
        raise ValueError("this process's batch rows are not contiguous in the mesh; build it with make_mesh()")
    return slice(lo, hi)


def make_global_batch(local_batch: Any, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> Any:
    """Per-process host batch (rows of :func:`process_batch_slice`) -> global sharded ``jax.Array`` tree."""
    sharding = logical_sharding(mesh, ("batch",), rules)
    n_proc = jax.process_count()

    def one(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(sharding, x, (x.shape[0] * n_proc,) + x.shape[1:])

    return jax.tree_util.tree_map(one, local_batch)


# --------------------------------------------------------------------------------------------------
# Multi-host
# --------------------------------------------------------------------------------------------------


def _int_env(env: Mapping[str, str], name: str, default: int = 0) -> int:
    try:
        return int(env.get(name, default))
    except ValueError:
        raise ValueError(f"environment variable {name}={env.get(name)!r} is not an integer") from None


def maybe_initialize_distributed(env: Mapping[str, str] | None = None,
                                 initialize: Callable[..., None] | None = None) -> bool:
    """Call ``jax.distributed.initialize()`` when launched as several processes; returns whether it did.

    Must run before anything touches a JAX backend. Recognised launches:

    * ``JAX_COORDINATOR_ADDRESS`` (+ ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``): explicit JAX launch;
    * torchrun-style ``WORLD_SIZE`` > 1, ``RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` (what the reference's
      ``launch_distributed_job`` reads); ``LOCAL_WORLD_SIZE`` > 1 means one process per GPU (``LOCAL_RANK``);
    * SLURM (``SLURM_NTASKS`` > 1), Open MPI (``OMPI_COMM_WORLD_SIZE`` > 1), multi-host Cloud TPU
      (``TPU_WORKER_HOSTNAMES`` with several hosts, ``MEGASCALE_COORDINATOR_ADDRESS``): JAX auto-detection.
    """
    env = os.environ if env is None else env
    initialize = initialize or jax.distributed.initialize
    is_init = getattr(jax.distributed, "is_initialized", None)
    if initialize is jax.distributed.initialize and is_init is not None and is_init():
        return True
    if env.get("JAX_COORDINATOR_ADDRESS"):
        kw: dict[str, Any] = {"coordinator_address": env["JAX_COORDINATOR_ADDRESS"]}
        if env.get("JAX_NUM_PROCESSES"):
            kw["num_processes"] = _int_env(env, "JAX_NUM_PROCESSES")
        if env.get("JAX_PROCESS_ID"):
            kw["process_id"] = _int_env(env, "JAX_PROCESS_ID")
        initialize(**kw)
        return True
    if _int_env(env, "WORLD_SIZE", 1) > 1:
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
        if missing:
            raise ValueError(f"WORLD_SIZE={env['WORLD_SIZE']} but {missing} not set; launch with torchrun or set "
                             "JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID")
        host = env["MASTER_ADDR"]
        host = f"[{host}]" if ":" in host and not host.startswith("[") else host  # IPv6 literal
        kw = {"coordinator_address": f"{host}:{env['MASTER_PORT']}",
              "num_processes": _int_env(env, "WORLD_SIZE"), "process_id": _int_env(env, "RANK")}
        if _int_env(env, "LOCAL_WORLD_SIZE", 1) > 1:
            kw["local_device_ids"] = [_int_env(env, "LOCAL_RANK")]
        initialize(**kw)
        return True
    if (_int_env(env, "SLURM_NTASKS", 1) > 1 or _int_env(env, "OMPI_COMM_WORLD_SIZE", 1) > 1
            or "," in env.get("TPU_WORKER_HOSTNAMES", "") or env.get("MEGASCALE_COORDINATOR_ADDRESS")):
        initialize()
        return True
    return False
