"""Ragged paged attention as a Pallas kernel with the Triton lowering (GPU; interpret mode on CPU).

Same contract as `paged_attention.ragged_paged_attention`. The batch is cut into *query blocks*:
each holds up to `block_q` consecutive queries of one sequence, so a decode is one block and a
prefill chunk of 40 tokens is ceil(40 / block_q) blocks. The wrapper (plain JAX) computes, for
every block, its sequence and the offset of its first query, and lays the queries out as
[blocks, Hkv, block_q * group_pad, D]: the query heads sharing a KV head (the GQA group, padded to
a power of two as Triton wants) become rows of the same dot, so each KV page is read once per
block and KV head.

Grid: (query block, KV head, KV split). A program walks its share of the sequence's pages with an
online softmax (the loop over pages sits inside the program: interpret mode costs ~0.25 ms per
grid step). With `num_kv_splits > 1` the pages are split across programs (flash-decoding) and the
partial results are merged in JAX; this keeps a GPU busy when the batch is small.

FP8 / scaled caches: K and V are cast to the compute dtype inside the kernel; the per-layer
`k_scale` is folded into the query (logits = q . (k * k_scale) = (q * k_scale) . k) and `v_scale`
into the merged output, so the scales are runtime arrays that never force a recompile.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# Logit of a masked slot. Finite, so `m_prev - m_new` never is inf - inf.
_MASKED = -1e30


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _kernel(
    seq_ref, qoff_ref, kv_lens_ref, q_lens_ref, tables_ref,  # scalars per block / sequence
    q_ref, k_ref, v_ref,  # q block [M, D]; whole caches [N, bs, Hkv, D]
    o_ref, m_ref, l_ref,  # partials [M, D], [M], [M]
    *, block_q: int, group: int, group_pad: int, num_splits: int,
    sliding_window: int | None, soft_cap: float | None, compute_dtype,
):
    block, head, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows, head_dim = q_ref.shape
    block_size = k_ref.shape[1]

    seq = seq_ref[block]
    live = seq >= 0
    seq = jnp.maximum(seq, 0)
    qoff = qoff_ref[block]
    kv_len = kv_lens_ref[seq]
    q_len = q_lens_ref[seq]
    first_pos = kv_len - q_len + qoff
    last_pos = jnp.minimum(first_pos + block_q, kv_len) - 1
    start_key = 0 if sliding_window is None else jnp.maximum(first_pos - sliding_window + 1, 0)
    first_page = start_key // block_size
    end_page = jnp.where(live, (last_pos + block_size) // block_size, first_page)
    per_split = (end_page - first_page + num_splits - 1) // num_splits
    lo = first_page + split * per_split
    hi = jnp.minimum(lo + per_split, end_page)

    row = lax.broadcasted_iota(jnp.int32, (rows, block_size), 0)
    col = lax.broadcasted_iota(jnp.int32, (rows, block_size), 1)
    token = row // group_pad
    q_pos = first_pos + token
    row_ok = (qoff + token < q_len) & (row % group_pad < group)
    q = q_ref[...]

    def visit(page, carry):
        acc, m_prev, l_prev = carry
        block_id = tables_ref[seq, page]
        k = k_ref[block_id, :, head, :].astype(compute_dtype)  # [bs, D]
        v = v_ref[block_id, :, head, :].astype(compute_dtype)
        logits = plgpu.dot(q, k, trans_b=True).astype(jnp.float32)  # [M, bs]
        if soft_cap is not None:
            logits = soft_cap * jnp.tanh(logits / soft_cap)
        key_pos = page * block_size + col
        visible = row_ok & (key_pos <= q_pos) & (key_pos < kv_len)
        if sliding_window is not None:
            visible &= key_pos > q_pos - sliding_window
        logits = jnp.where(visible, logits, _MASKED)
        m_new = jnp.maximum(m_prev, logits.max(axis=1))
        probs = jnp.where(visible, jnp.exp(logits - m_new[:, None]), 0.0)
        rescale = jnp.exp(m_prev - m_new)
        # Slots past kv_len hold stale data (possibly NaN), and 0 * NaN is NaN.
        key_ok = (page * block_size + lax.broadcasted_iota(jnp.int32, (block_size, head_dim), 0)) < kv_len
        v = jnp.where(key_ok, v, jnp.zeros_like(v))
        acc = acc * rescale[:, None] + plgpu.dot(probs.astype(compute_dtype), v).astype(jnp.float32)
        return acc, m_new, l_prev * rescale + probs.sum(axis=1)

    init = (
        jnp.zeros((rows, head_dim), jnp.float32),
        jnp.full((rows,), _MASKED, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    acc, m, l = lax.fori_loop(lo, jnp.maximum(lo, hi), visit, init)
    o_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def ragged_paged_attention_triton(
    q, k_cache, v_cache, kv_lens, block_tables, cu_q_lens, num_seqs, *,
    sm_scale, sliding_window=None, soft_cap=None, k_scale=None, v_scale=None,
    block_q: int | None = None, num_kv_splits: int | None = None, num_warps: int = 4, num_stages: int = 2,
    interpret: bool = False,
):
    """Pallas (Triton lowering) ragged paged attention; see the module docstring.

    block_q: queries of one sequence per program (power of two; default so that block_q times
    the padded GQA group is at least 16, Triton's smallest dot). num_kv_splits: programs sharing
    one block's pages (flash-decoding); default: enough for ~256 programs (1 in interpret mode),
    at most 16, so a small decode batch still fills the GPU.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, cache_dim = k_cache.shape
    max_seqs, _ = block_tables.shape
    if cache_dim != head_dim or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache/v_cache shape {k_cache.shape}/{v_cache.shape} must be "
                         f"[num_blocks, block_size, Hkv, {head_dim}]")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"q heads ({num_q_heads}) must be a multiple of kv heads ({num_kv_heads})")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16 for the Triton kernel, got {block_size}")
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 16 for the Triton kernel, got {head_dim}")
    group = num_q_heads // num_kv_heads
    group_pad = _next_pow2(group)
    if block_q is None:
        block_q = max(1, 16 // group_pad)
    if block_q < 1 or block_q & (block_q - 1):
        raise ValueError(f"block_q must be a power of two >= 1, got {block_q}")
    rows = block_q * group_pad
    if num_kv_splits is None:
        programs = (num_tokens // block_q + min(max_seqs, num_tokens)) * num_kv_heads
        num_kv_splits = 1 if interpret else int(min(16, max(1, 256 // programs)))
    if num_kv_splits < 1:
        raise ValueError(f"num_kv_splits must be >= 1, got {num_kv_splits}")
    if rows < 16:
        raise ValueError(f"block_q * padded GQA group must be >= 16, got {block_q} * {group_pad}")

    # Query blocks: sequence s owns blocks cu_blocks[s]:cu_blocks[s+1].
    seq_ids = jnp.arange(max_seqs, dtype=jnp.int32)
    q_lens = jnp.where(seq_ids < num_seqs, cu_q_lens[1:] - cu_q_lens[:-1], 0).astype(jnp.int32)
    kv_lens = kv_lens.astype(jnp.int32)
    per_seq = (q_lens + block_q - 1) // block_q
    cu_blocks = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(per_seq, dtype=jnp.int32)])
    num_qblocks = num_tokens // block_q + min(max_seqs, num_tokens)
    blk = jnp.arange(num_qblocks, dtype=jnp.int32)
    blk_seq = jnp.minimum(jnp.searchsorted(cu_blocks[1:], blk, side="right"), max_seqs - 1).astype(jnp.int32)
    blk_off = ((blk - cu_blocks[blk_seq]) * block_q).astype(jnp.int32)
    blk_seq_or_dead = jnp.where(blk < cu_blocks[-1], blk_seq, -1).astype(jnp.int32)

    compute_dtype = jnp.bfloat16 if (q.dtype == jnp.bfloat16 and k_cache.dtype.itemsize <= 2) else jnp.float32
    scale = sm_scale * (1.0 if k_scale is None else jnp.asarray(k_scale, jnp.float32))
    q_rows = jnp.clip(cu_q_lens[blk_seq][:, None] + blk_off[:, None] + jnp.arange(block_q)[None], 0, num_tokens - 1)
    qb = q[q_rows].astype(jnp.float32) * scale  # [NB, bq, Hq, D]
    qb = qb.reshape(num_qblocks, block_q, num_kv_heads, group, head_dim)
    qb = jnp.pad(qb, ((0, 0), (0, 0), (0, 0), (0, group_pad - group), (0, 0)))
    qb = qb.transpose(0, 2, 1, 3, 4).reshape(num_qblocks, num_kv_heads, rows, head_dim).astype(compute_dtype)

    kernel = functools.partial(
        _kernel, block_q=block_q, group=group, group_pad=group_pad, num_splits=num_kv_splits,
        sliding_window=sliding_window, soft_cap=soft_cap, compute_dtype=compute_dtype,
    )
    whole = lambda shape: pl.BlockSpec(shape, lambda b, h, s: (0,) * len(shape))  # noqa: E731
    acc, m, l = pl.pallas_call(
        kernel,
        grid=(num_qblocks, num_kv_heads, num_kv_splits),
        in_specs=[
            whole((num_qblocks,)), whole((num_qblocks,)), whole((max_seqs,)), whole((max_seqs,)),
            whole(block_tables.shape),
            pl.BlockSpec((None, None, rows, head_dim), lambda b, h, s: (b, h, 0, 0)),
            whole(k_cache.shape), whole(v_cache.shape),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, rows, head_dim), lambda b, h, s: (s, b, h, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda b, h, s: (s, b, h, 0)),
            pl.BlockSpec((None, None, None, rows), lambda b, h, s: (s, b, h, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((num_kv_splits, num_qblocks, num_kv_heads, rows, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((num_kv_splits, num_qblocks, num_kv_heads, rows), jnp.float32),
            jax.ShapeDtypeStruct((num_kv_splits, num_qblocks, num_kv_heads, rows), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"ragged_paged_attention_bq{block_q}_g{group_pad}",
    )(blk_seq_or_dead, blk_off, kv_lens, q_lens, block_tables.astype(jnp.int32), qb, k_cache, v_cache)

    # Merge the KV splits (flash-decoding), then scatter blocks back to tokens.
    m_all = m.max(axis=0)
    weight = jnp.exp(m - m_all[None])
    denom = (weight * l).sum(axis=0)
    out = (weight[..., None] * acc).sum(axis=0) / jnp.where(denom > 0, denom, 1.0)[..., None]
    if v_scale is not None:
        out = out * jnp.asarray(v_scale, jnp.float32)
    out = out.reshape(num_qblocks, num_kv_heads, block_q, group_pad, head_dim)[:, :, :, :group]
    out = out.transpose(0, 2, 1, 3, 4).reshape(num_qblocks, block_q, num_q_heads, head_dim)

    token = jnp.arange(num_tokens, dtype=jnp.int32)
    tok_seq = jnp.minimum(jnp.searchsorted(cu_q_lens[1:], token, side="right"), max_seqs - 1)
    tok_off = token - cu_q_lens[tok_seq]
    tok_blk = jnp.clip(cu_blocks[tok_seq] + tok_off // block_q, 0, num_qblocks - 1)
    result = out[tok_blk, tok_off % block_q]
    valid = token < cu_q_lens[num_seqs]
    return jnp.where(valid[:, None, None], result, 0.0).astype(q.dtype)
