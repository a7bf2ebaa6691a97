"""Mixture-of-experts FFN over routed tokens: sort by expert, grouped matmuls, unsort.

The entry point takes already-routed tokens (top-k ids and weights), so routing policy stays in
the model and expert placement (EPLB, expert parallelism) can remap ids before the call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.dispatch import BACKENDS, choose_moe_kernel
from pallas_kernels.interpret import interpreting



def moe_ffn(
    x: jax.Array,
    topk_ids: jax.Array,
    topk_weights: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    *,
    backend: str = "auto",
    interpret: bool = False,
) -> jax.Array:
    """SwiGLU experts: sum_k w_k * down_e(silu(gate_e(x)) * up_e(x)) with e = topk_ids[:, k].

    x [T, H]; topk_ids int32 [T, K]; topk_weights [T, K]; w_gate, w_up [E, H, I];
    w_down [E, I, H]. Returns [T, H] in x.dtype.
    """
    choice = choose_moe_kernel(backend, hidden_size=x.shape[-1], intermediate_size=w_gate.shape[-1],
                               num_experts=w_gate.shape[0], dtype=w_gate.dtype)
    if choice.backend == "reference":
        return moe_ffn_reference(x, topk_ids, topk_weights, w_gate, w_up, w_down)
    return moe_ffn_pallas(x, topk_ids, topk_weights, w_gate, w_up, w_down, kernel=choice.backend,
                          interpret=interpret or interpreting())


def grouped_matmul_reference(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Rows of `lhs` [M, K] sorted by group times per-group `rhs` [G, K, N] -> [M, N]."""
    return jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32))


def moe_ffn_reference(x, topk_ids, topk_weights, w_gate, w_up, w_down):
    num_tokens, top_k = topk_ids.shape
    num_experts = w_gate.shape[0]
    flat_ids = topk_ids.reshape(-1)
    order = jnp.argsort(flat_ids, stable=True)
    rows = x[order // top_k]  # each (token, k) assignment, grouped by expert
    group_sizes = jnp.bincount(flat_ids, length=num_experts)
    with jax.named_scope("experts"):
        gate = grouped_matmul_reference(rows, w_gate, group_sizes)
        up = grouped_matmul_reference(rows, w_up, group_sizes)
        hidden = jax.nn.silu(gate) * up
        out = grouped_matmul_reference(hidden.astype(w_down.dtype), w_down, group_sizes)
    with jax.named_scope("combine"):
        unsorted = jnp.zeros_like(out).at[order].set(out)
        weighted = unsorted.reshape(num_tokens, top_k, -1) * topk_weights[..., None].astype(out.dtype)
        return weighted.sum(axis=1).astype(x.dtype)


def moe_ffn_pallas(x, topk_ids, topk_weights, w_gate, w_up, w_down, *, kernel="triton", interpret=False):
    """moe_ffn with Pallas grouped matmuls (`kernel`: "triton" or "mosaic"): gate/up fused with
    SiLU-and-multiply, then down."""
    if kernel == "mosaic":
        from pallas_kernels.mosaic_grouped_matmul import (
            grouped_matmul_mosaic as grouped_matmul,
            grouped_matmul_swiglu_mosaic as grouped_matmul_swiglu,
        )
    else:
        from pallas_kernels.triton_grouped_matmul import grouped_matmul, grouped_matmul_swiglu

    num_tokens, top_k = topk_ids.shape
    num_experts = w_gate.shape[0]
    flat_ids = topk_ids.reshape(-1)
    order = jnp.argsort(flat_ids, stable=True)
    rows = x[order // top_k]
    group_sizes = jnp.bincount(flat_ids, length=num_experts)
    hidden = grouped_matmul_swiglu(rows, w_gate, w_up, group_sizes, interpret=interpret)
    out = grouped_matmul(hidden.astype(w_down.dtype), w_down, group_sizes, interpret=interpret)
    unsorted = jnp.zeros_like(out).at[order].set(out)
    weighted = unsorted.reshape(num_tokens, top_k, -1) * topk_weights[..., None].astype(out.dtype)
    return weighted.sum(axis=1).astype(x.dtype)
