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


def naive_biased_moe(x, ids, weights, w_gate, w_up, w_down, biases, alpha, limit):
    """gpt-oss's experts per token in float64: biases on gate, up and down, the clamped SwiGLU."""
    b_gate, b_up, b_down = (np.asarray(b, np.float64) for b in biases)
    x = x.astype(np.float64)
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for e, w in zip(ids[t], weights[t]):
            gate = np.minimum(x[t] @ w_gate[e] + b_gate[e], limit)
            up = np.clip(x[t] @ w_up[e] + b_up[e], -limit, limit)
            out[t] += w * (((up + 1) * gate / (1 + np.exp(-alpha * gate))) @ w_down[e] + b_down[e])
    return out


def biased_case(num_tokens, num_experts, top_k, hidden=32, inter=48, seed=0):
    """Random routed tokens and biased experts whose gate and up cross the clamp (limit 1.5)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_tokens, hidden)).astype(np.float32)
    ids = np.stack([rng.choice(max(top_k, num_experts // 2), top_k, replace=False)
                    for _ in range(num_tokens)]).astype(np.int32)
    weights = rng.random((num_tokens, top_k)).astype(np.float32)
    w_gate, w_up = (rng.standard_normal((num_experts, hidden, inter)).astype(np.float32) * 0.4 for _ in range(2))
    w_down = rng.standard_normal((num_experts, inter, hidden)).astype(np.float32) * 0.2
    biases = tuple(rng.standard_normal((num_experts, n)).astype(np.float32) * 0.5 for n in (inter, inter, hidden))
    return (x, ids, weights, w_gate, w_up, w_down), biases


@pytest.mark.parametrize("num_tokens,num_experts,top_k", [(1, 4, 2), (13, 8, 2), (33, 6, 3)])
def test_biased_clamped_experts_match_naive(num_tokens, num_experts, top_k):
    """Expert biases and gpt-oss's clamped SwiGLU in the reference against numpy."""
    from pallas_kernels.moe import ExpertActivation

    args, biases = biased_case(num_tokens, num_experts, top_k, seed=num_tokens)
    activation = ExpertActivation("gpt_oss_clamped", alpha=1.702, limit=1.5)
    out = moe_ffn(*map(jnp.asarray, args), biases=tuple(map(jnp.asarray, biases)), activation=activation,
                  backend="reference")
    ref = naive_biased_moe(*args, biases, 1.702, 1.5)
    # float32 matmuls of length <= 48 against float64: 1e-5 relative.
    assert np.max(np.abs(np.asarray(out) - ref)) / np.max(np.abs(ref)) < 1e-5


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")
@pytest.mark.parametrize("kernel,dtype,tolerance", [
    ("triton", jnp.float32, 1e-5),  # accumulation order only
    # Mosaic GPU multiplies bf16: the inputs, gate/up and the activation's output rounded to bf16
    # (2^-8 relative each), 2e-2 of the largest output bounds them, as for its SwiGLU path.
    ("mosaic", jnp.bfloat16, 2e-2),
])
def test_biased_clamped_experts_on_the_pallas_grouped_matmuls(kernel, dtype, tolerance):
    """The Pallas path (interpret mode) takes biases and the clamped activation through unfused
    gate and up grouped matmuls: equal to the float32 reference."""
    from pallas_kernels.moe import ExpertActivation, moe_ffn_pallas, moe_ffn_reference

    (x, ids, weights, *experts), biases = biased_case(13, 8, 2, hidden=64, inter=128, seed=5)
    x, weights, w_gate, w_up, w_down, *biases = (jnp.asarray(a, dtype) for a in (x, weights, *experts, *biases))
    activation = ExpertActivation("gpt_oss_clamped", alpha=1.702, limit=1.5)
    out = moe_ffn_pallas(x, jnp.asarray(ids), weights, w_gate, w_up, w_down, biases=tuple(biases),
                         activation=activation, kernel=kernel, interpret=True)
    f32 = [a.astype(jnp.float32) for a in (x, weights, w_gate, w_up, w_down, *biases)]
    ref = moe_ffn_reference(f32[0], jnp.asarray(ids), *f32[1:5], biases=tuple(f32[5:]), activation=activation)
    assert float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref))) < tolerance * float(jnp.max(jnp.abs(ref)))


def test_bad_expert_biases_name_the_shape():
    args, biases = biased_case(3, 4, 2)
    with pytest.raises(ValueError, match=r"down bias .* must have shape \(4, 32\)"):
        moe_ffn(*map(jnp.asarray, args), biases=(biases[0], biases[1], biases[2][:, :8]), backend="reference")
