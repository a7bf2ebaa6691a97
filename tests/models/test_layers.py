"""Shared layers: bf16 products of one row (padded to two on CPU) against a float64 reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.layers import Embedding, Linear


def reference(x, weight):
    """float64 product of the bf16 values."""
    return np.asarray(x.astype(jnp.float32), np.float64) @ np.asarray(weight.astype(jnp.float32), np.float64)


@pytest.mark.parametrize("shape", [(1, 96), (1, 1, 96), (3, 96)])
def test_bf16_linear_rows_match_reference(shape):
    layer = Linear(96, 40, ("embed", "mlp"), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), shape, jnp.float32).astype(jnp.bfloat16)
    y = jax.jit(lambda x: layer(x))(x)
    assert y.shape == shape[:-1] + (40,) and y.dtype == jnp.bfloat16
    # bf16 output: one rounding of a value of size ~0.2 (weights ~0.02 x 96 terms).
    np.testing.assert_allclose(np.asarray(y, np.float64), reference(x, layer.kernel[...]), atol=4e-3, rtol=1e-2)


def test_bf16_tied_head_one_row_equals_its_row_in_a_batch():
    embedding = Embedding(500, 64, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (4, 64), jnp.float32).astype(jnp.bfloat16)
    attend = jax.jit(lambda x: embedding.attend(x))
    one, batch = attend(x[:1]), attend(x)
    assert one.shape == (1, 500) and one.dtype == jnp.float32
    expected = reference(x, embedding.weight[...].T)
    np.testing.assert_allclose(np.asarray(one, np.float64), expected[:1], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(batch, np.float64), expected, atol=1e-5, rtol=1e-5)
