"""The MoE router's top-k (models/moe.py) against jax.lax.top_k."""

from __future__ import annotations

import jax
import numpy as np


def test_router_top_k_matches_lax_top_k_with_ties():
    from models.moe import top_k

    values = jax.random.uniform(jax.random.PRNGKey(0), (500, 60))
    values = values.at[:, 5].set(values[:, 7]).at[:3].set(0.5)  # ties, and rows all equal
    for k in (1, 2, 4, 8):
        want_values, want_ids = jax.lax.top_k(values, k)
        got_values, got_ids = top_k(values, k)
        np.testing.assert_array_equal(np.asarray(got_ids), np.asarray(want_ids))
        np.testing.assert_array_equal(np.asarray(got_values), np.asarray(want_values))
