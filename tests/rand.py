"""Random test inputs: ``jax.random.normal`` / ``jax.random.uniform`` drawn flat and reshaped.

The values are those of ``jax.random.normal(key, shape, dtype)`` (threefry numbers the elements by their flat
index whatever the shape; tests/unit/test_flat_draws.py checks it), but an n-d draw costs XLA 1-3 s of CPU compile
time per distinct shape while a flat one compiles in a fraction of that (and is shared by every shape of the same
size); the tests draw dozens of shapes.
"""
from __future__ import annotations

import math
from typing import Any

import jax

from memflow_jax.nn import initializers as init_lib


def normal(key: jax.Array, shape: tuple[int, ...], dtype: Any = None) -> jax.Array:
    """``jax.random.normal(key, shape, dtype)``."""
    return init_lib.standard_normal(key, shape, dtype)  # dtype None: jax's default float, as jax.random.normal


def uniform(key: jax.Array, shape: tuple[int, ...], dtype: Any = None, minval: float = 0.0,
            maxval: float = 1.0) -> jax.Array:
    """``jax.random.uniform(key, shape, dtype, minval, maxval)`` (scalar bounds)."""
    return jax.random.uniform(key, (math.prod(shape),), dtype, minval, maxval).reshape(shape)
