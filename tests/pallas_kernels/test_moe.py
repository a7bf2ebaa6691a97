"""The MoE entry point's reference against a per-token dense numpy computation."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import moe_ffn


def naive_moe(x, ids, weights, w_gate, w_up, w_down):
    x = x.astype(np.float64)
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for e, w in zip(ids[t], weights[t]):
            gate = x[t] @ w_gate[e]
            hidden = gate / (1 + np.exp(-gate)) * (x[t] @ w_up[e])
            out[t] += w * (hidden @ w_down[e])
    return out


@pytest.mark.parametrize("num_tokens,num_experts,top_k", [(1, 4, 2), (13, 8, 2), (33, 6, 3), (5, 16, 1)])
def test_moe_reference_matches_naive(num_tokens, num_experts, top_k):
    rng = np.random.default_rng(num_tokens * 100 + num_experts)
    hidden, inter = 32, 24
    x = rng.standard_normal((num_tokens, hidden)).astype(np.float32)
    # Unbalanced routing, some experts empty: each row picks distinct experts from a small subset.
    ids = np.stack([rng.choice(max(top_k, num_experts // 2), top_k, replace=False) for _ in range(num_tokens)])
    weights = rng.random((num_tokens, top_k)).astype(np.float32)
    w_gate, w_up = (rng.standard_normal((num_experts, hidden, inter)).astype(np.float32) * 0.2 for _ in range(2))
    w_down = rng.standard_normal((num_experts, inter, hidden)).astype(np.float32) * 0.2
    out = moe_ffn(*map(jnp.asarray, (x, ids.astype(np.int32), weights, w_gate, w_up, w_down)), backend="reference")
    ref = naive_moe(x, ids, weights, w_gate, w_up, w_down)
    # float32 matmuls of length <= 32 against float64: 1e-5 relative.
    assert np.max(np.abs(np.asarray(out) - ref)) / np.max(np.abs(ref)) < 1e-5


def test_moe_rejects_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        moe_ffn(jnp.zeros((1, 2)), jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1)),
                jnp.zeros((1, 2, 2)), jnp.zeros((1, 2, 2)), jnp.zeros((1, 2, 2)), backend="cuda")
