"""Pieces the Triton and Mosaic GPU kernels share: they trace inside either lowering (plain jnp)."""

from __future__ import annotations

import jax.numpy as jnp

# Logit of a masked slot. Finite, so `m_prev - m_new` never is inf - inf.
MASKED = -1e30


def masked_logits(logits, key_pos, q_pos, kv_len, row_ok, *, soft_cap, sliding_window):
    """Soft cap, then causal / written / sliding-window masking of a tile of logits [rows, keys]
    (key_pos and q_pos broadcast to it, HF conventions: a window of W sees the W most recent keys,
    itself included). Returns (logits with MASKED where not visible, visible)."""
    if soft_cap is not None:
        logits = soft_cap * jnp.tanh(logits / soft_cap)
    visible = row_ok & (key_pos <= q_pos) & (key_pos < kv_len)
    if sliding_window is not None:
        visible &= key_pos > q_pos - sliding_window
    return jnp.where(visible, logits, MASKED), visible


def check_grouped_shapes(lhs, rhs_list, group_sizes) -> tuple[int, int, int, int]:
    """(M, K, N, G) of a grouped matmul [M, K] x G x [K, N]; a clear error for shapes that disagree."""
    num_rows, k_dim = lhs.shape
    num_groups, rhs_k, n_dim = rhs_list[0].shape
    if rhs_k != k_dim:
        raise ValueError(f"rhs K ({rhs_k}) must equal lhs K ({k_dim})")
    if group_sizes.shape != (num_groups,):
        raise ValueError(f"group_sizes must have shape ({num_groups},), got {group_sizes.shape}")
    return num_rows, k_dim, n_dim, num_groups
