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


def query_blocks(cu_q_lens, num_seqs, max_seqs: int, num_tokens: int, block_q: int):
    """The ragged batch's queries cut into blocks of `block_q` (outside the kernels): (each block's
    sequence, -1 past the last block; the offset of its first query in its sequence; q_lens [S];
    cu_blocks [S + 1]: sequence s owns blocks cu_blocks[s]:cu_blocks[s+1]; the static block count,
    a bound over every batch of this shape)."""
    seq_ids = jnp.arange(max_seqs, dtype=jnp.int32)
    q_lens = jnp.where(seq_ids < num_seqs, cu_q_lens[1:] - cu_q_lens[:-1], 0).astype(jnp.int32)
    per_seq = (q_lens + block_q - 1) // block_q
    cu_blocks = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(per_seq, dtype=jnp.int32)])
    num_qblocks = num_tokens // block_q + min(max_seqs, num_tokens)
    blocks = jnp.arange(num_qblocks, dtype=jnp.int32)
    block_seq = jnp.minimum(jnp.searchsorted(cu_blocks[1:], blocks, side="right"), max_seqs - 1).astype(jnp.int32)
    block_off = ((blocks - cu_blocks[block_seq]) * block_q).astype(jnp.int32)
    return jnp.where(blocks < cu_blocks[-1], block_seq, -1).astype(jnp.int32), block_off, q_lens, cu_blocks, num_qblocks


def block_span(seq_ref, qoff_ref, kv_lens_ref, q_lens_ref, block, block_q: int):
    """Inside a kernel, query block `block`'s (live, sequence, kv_len, first query position, last
    query position): a block past the batch (sequence -1) is not live and reads sequence 0."""
    seq = seq_ref[block]
    live = seq >= 0
    seq = jnp.maximum(seq, 0)
    kv_len = kv_lens_ref[seq]
    first_pos = kv_len - q_lens_ref[seq] + qoff_ref[block]
    last_pos = jnp.minimum(first_pos + block_q, kv_len) - 1
    return live, seq, kv_len, first_pos, last_pos


def checked_sinks(sinks, num_q_heads: int):
    """Attention sinks as float32 [num_q_heads], or None; a clear error for another shape."""
    if sinks is None:
        return None
    sinks = jnp.asarray(sinks, jnp.float32)
    if sinks.shape != (num_q_heads,):
        raise ValueError(f"sinks must have shape ({num_q_heads},) (one per query head), got {sinks.shape}")
    return sinks


def sink_rows(sinks, num_kv_heads: int, block_q: int, group_pad: int, rows: int):
    """sinks [Hq] -> [Hkv, rows]: the sink of every row of a query block laid out as token
    r // group_pad x query head r % group_pad of the KV head's GQA group; pad rows get 0 (their
    output is dropped)."""
    group = sinks.shape[0] // num_kv_heads
    per_head = jnp.pad(sinks.reshape(num_kv_heads, group), ((0, 0), (0, group_pad - group)))
    return jnp.pad(jnp.tile(per_head, (1, block_q)), ((0, 0), (0, rows - block_q * group_pad)))


def check_grouped_shapes(lhs, rhs_list, group_sizes) -> tuple[int, int, int, int]:
    """(M, K, N, G) of a grouped matmul [M, K] x G x [K, N]; a clear error for shapes that disagree."""
    num_rows, k_dim = lhs.shape
    num_groups, rhs_k, n_dim = rhs_list[0].shape
    if rhs_k != k_dim:
        raise ValueError(f"rhs K ({rhs_k}) must equal lhs K ({k_dim})")
    if group_sizes.shape != (num_groups,):
        raise ValueError(f"group_sizes must have shape ({num_groups},), got {group_sizes.shape}")
    return num_rows, k_dim, n_dim, num_groups
