"""Flat random draws (``memflow_jax.nn.initializers``, ``tests/rand.py``) are bit-identical to the n-d draws and
Flax initializers they stand in for."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memflow_jax.nn import initializers as init_lib
from tests import rand


def _same(flat, ref, name):
    assert flat.shape == ref.shape and flat.dtype == ref.dtype, name
    np.testing.assert_array_equal(np.asarray(flat, np.float32), np.asarray(ref, np.float32), err_msg=name)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_initializers_equal_flax_initializers(dtype):
    key, shape = jax.random.PRNGKey(5), (3, 5)
    _same(init_lib.xavier_uniform()(key, shape, dtype), nn.initializers.xavier_uniform()(key, shape, dtype),
          "xavier_uniform")
    _same(init_lib.normal(0.3)(key, shape, dtype), nn.initializers.normal(0.3)(key, shape, dtype), "normal")
    _same(init_lib.standard_normal(key, shape, dtype), jax.random.normal(key, shape, dtype), "standard_normal")


def test_test_inputs_equal_nd_draws():
    key, shape = jax.random.PRNGKey(6), (2, 3, 4)
    _same(rand.normal(key, shape), jax.random.normal(key, shape), "normal")
    _same(rand.uniform(key, shape, jnp.float32, -2.0, 3.0), jax.random.uniform(key, shape, jnp.float32, -2.0, 3.0),
          "uniform")
