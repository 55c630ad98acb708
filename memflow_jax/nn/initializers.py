"""Parameter initializers that draw their random numbers flat: the same values as the Flax/JAX initializers they
replace, at a fraction of the XLA compile time on CPU.

JAX's threefry numbers the elements of a draw by their flat (row-major) index whatever the shape, so
``jax.random.uniform(key, shape)`` equals ``jax.random.uniform(key, (prod(shape),)).reshape(shape)`` bit for bit;
but an n-d draw lowers its counters through n iotas and 64-bit index arithmetic, which XLA's CPU backend takes
seconds to compile (a fresh init program per model config and process). tests/unit/test_dit.py checks the
equality against ``flax.linen.initializers``.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]


def _flat_shape(shape: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    shape = tuple(int(d) for d in shape)
    return shape, (math.prod(shape),)


def xavier_uniform() -> Initializer:
    """``nn.initializers.xavier_uniform()`` (variance scaling 1, fan_avg, uniform) of a Dense kernel
    ``[..., in, out]``."""

    def init(key: jax.Array, shape: Any, dtype: Any = jnp.float32) -> jax.Array:
        shape, flat = _flat_shape(shape)
        receptive = math.prod(shape[:-2])
        fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
        variance = jnp.array(1.0 / ((fan_in + fan_out) / 2), dtype=dtype)
        return (jax.random.uniform(key, flat, dtype, -1) * jnp.sqrt(3 * variance)).reshape(shape)

    return init


def normal(stddev: float = 1e-2) -> Initializer:
    """``nn.initializers.normal(stddev)``."""

    def init(key: jax.Array, shape: Any, dtype: Any = jnp.float32) -> jax.Array:
        shape, flat = _flat_shape(shape)
        return (jax.random.normal(key, flat, dtype) * jnp.array(stddev, dtype)).reshape(shape)

    return init


def standard_normal(key: jax.Array, shape: Any, dtype: Any = jnp.float32) -> jax.Array:
    """``jax.random.normal(key, shape, dtype)``."""
    shape, flat = _flat_shape(shape)
    return jax.random.normal(key, flat, dtype).reshape(shape)
