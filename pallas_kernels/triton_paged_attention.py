"""Ragged paged attention as a Pallas kernel with the Triton lowering (GPU; interpret mode on CPU).

Same contract as `paged_attention.ragged_paged_attention`. The batch is cut into *query blocks*:
each holds up to `block_q` consecutive queries of one sequence, so a decode is one block and a
prefill chunk of 40 tokens is ceil(40 / block_q) blocks. The wrapper (plain JAX) computes, for
every block, its sequence and the offset of its first query, and lays the queries out as
[blocks, Hkv, block_q * group_pad, columns]: the query heads sharing a KV head (the GQA group,
padded to a power of two as Triton wants) become rows of the same dot, so each key is read once
per block and KV head.

Grid: (query block, KV head, KV split). A program walks its share of the sequence's keys in tiles
of `block_k` keys with an online softmax (the loop sits inside the program: interpret mode costs
~0.25 ms per grid step). A tile names its keys' pages and slots one key at a time, so any page
size works (8 to 128 and beyond): a tile may span several small pages or part of a large one.
With `num_kv_splits > 1` the keys are split across programs (flash-decoding) and the partial
results are merged in JAX; this keeps a GPU busy when the batch is small.

Attention sinks (`sinks` [Hq], gpt-oss) join that merge, once per row whatever the split count:
the merged max is taken over the splits' maxima and the row's sink, and the denominator gains
e^(sink - max). Exact (the sink is one more term of the same sum), and the kernel never sees it.

Head sizes: Triton's dots and loads want power-of-two widths of at least 16, real models use 64,
80, 96, 128, 192 and 256. The head is read as *chunks* of power-of-two widths (80 = 64 + 16,
192 = 128 + 64); a remainder under 16 is read as the last 16 columns, overlapping the chunk
before, with the overlap's query columns zeroed. Every load stays inside the cache and contiguous.

FP8 / scaled caches: K and V are cast to the compute dtype inside the kernel; the per-layer
`k_scale` is folded into the query (logits = q . (k * k_scale) = (q * k_scale) . k) and `v_scale`
into the merged output, so the scales are runtime arrays that never force a recompile.

Large 1-byte caches: Pallas computes element offsets in 32 bits unless an array exceeds 2^32
*bytes*, so an fp8 cache of 2^31 or more elements (2-4 GiB, one layer of a small model on a large
card) would wrap. Such a cache is read as 16-bit words (two fp8 values each, split in the kernel:
the even and odd head columns become two dots), which keeps every offset below 2^31.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.kernel_common import MASKED, block_span, checked_sinks, masked_logits, query_blocks, sink_rows

# Triton's smallest dot and load width.
_MIN_WIDTH = 16
# Offsets Pallas-Triton computes in 32 bits (see the module doc).
_I32_OFFSETS = 2**31


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def head_chunks(units: int) -> tuple[tuple[int, int, int], ...]:
    """(start, width, skip) pieces covering columns [0, units): power-of-two widths >= 16, largest
    first; a remainder under 16 becomes the last 16 columns with its first `skip` already covered."""
    if units < _MIN_WIDTH:
        raise ValueError(f"a head must span at least {_MIN_WIDTH} cache elements, got {units}")
    chunks, start = [], 0
    while units - start >= _MIN_WIDTH:
        width = 1 << ((units - start).bit_length() - 1)
        chunks.append((start, width, 0))
        start += width
    if start < units:
        chunks.append((units - _MIN_WIDTH, _MIN_WIDTH, start - (units - _MIN_WIDTH)))
    return tuple(chunks)


def reads_words(cache_shape, cache_dtype) -> bool:
    """Whether a cache is read as 16-bit words (1-byte elements whose offsets would wrap)."""
    elements = int(np.prod(cache_shape))
    nbytes = elements * jnp.dtype(cache_dtype).itemsize
    return jnp.dtype(cache_dtype).itemsize == 1 and elements >= _I32_OFFSETS and nbytes <= 2**32


def column_layout(head_dim: int, words: bool) -> np.ndarray:
    """For every kernel column, the head column it holds (head_dim: none, a zero column). Pieces
    are laid out chunk by chunk, and within a chunk lane by lane (lane j of a 16-bit word holds
    head column 2 * unit + j)."""
    lanes = 2 if words else 1
    layout = []
    for start, width, skip in head_chunks(head_dim // lanes):
        for lane in range(lanes):
            units = np.arange(start, start + width)
            layout.extend(np.where(units - start < skip, head_dim, units * lanes + lane))
    return np.asarray(layout, np.int32)


def _split_words(words, cache_dtype, compute_dtype):
    """uint16 [.., n] -> the low and high byte of every word as `cache_dtype` values, cast."""
    low = lax.bitcast_convert_type((words & 0xFF).astype(jnp.uint8), cache_dtype)
    high = lax.bitcast_convert_type((words >> 8).astype(jnp.uint8), cache_dtype)
    return low.astype(compute_dtype), high.astype(compute_dtype)


def _kernel(
    seq_ref, qoff_ref, kv_lens_ref, q_lens_ref, tables_ref,  # scalars per block / sequence
    q_ref, k_ref, v_ref,  # q block [M, C]; whole caches [N, bs, Hkv, units]
    o_ref, m_ref, l_ref,  # partials [M, C], [M], [M]
    *, block_q: int, block_k: int, group: int, group_pad: int, num_splits: int,
    chunks: tuple, cache_dtype, words: bool,
    sliding_window: int | None, soft_cap: float | None, compute_dtype,
):
    block, head, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows = q_ref.shape[0]
    block_size = k_ref.shape[1]
    width = tables_ref.shape[1]
    lanes = 2 if words else 1

    live, seq, kv_len, first_pos, last_pos = block_span(seq_ref, qoff_ref, kv_lens_ref, q_lens_ref, block, block_q)
    start_key = 0 if sliding_window is None else jnp.maximum(first_pos - sliding_window + 1, 0)
    first_tile = start_key // block_k
    end_tile = jnp.where(live, (last_pos + block_k) // block_k, first_tile)
    per_split = (end_tile - first_tile + num_splits - 1) // num_splits
    lo = first_tile + split * per_split
    hi = jnp.minimum(lo + per_split, end_tile)

    row = lax.broadcasted_iota(jnp.int32, (rows, block_k), 0)
    col = lax.broadcasted_iota(jnp.int32, (rows, block_k), 1)
    token = row // group_pad
    q_pos = first_pos + token
    row_ok = (first_pos + token < kv_len) & (row % group_pad < group)
    # Query pieces: (kernel column offset, width) per chunk and lane, in column_layout's order.
    pieces = [(sum(w for _, w, _ in chunks[:c]) * lanes + lane * w, w)
              for c, (_, w, _) in enumerate(chunks) for lane in range(lanes)]
    queries = [q_ref[:, pl.ds(offset, w)] for offset, w in pieces]
    key_in_tile = lax.iota(jnp.int32, block_k)

    def read(ref, blocks, slots, start, w):
        """One chunk of the tile's keys or values: [block_k, w] per lane, in the compute dtype."""
        units = ref[blocks, slots, head, pl.ds(start, w)]
        if words:
            return _split_words(units, cache_dtype, compute_dtype)
        return (units.astype(compute_dtype),)

    def visit(tile, carry):
        accs, m_prev, l_prev = carry
        key_pos = tile * block_k + key_in_tile
        blocks = tables_ref[seq, jnp.minimum(key_pos // block_size, width - 1)]
        slots = key_pos % block_size
        keys = [k for start, w, _ in chunks for k in read(k_ref, blocks, slots, start, w)]
        logits = sum(plgpu.dot(q, k, trans_b=True).astype(jnp.float32) for q, k in zip(queries, keys))
        logits, visible = masked_logits(logits, tile * block_k + col, q_pos, kv_len, row_ok, soft_cap=soft_cap,
                                        sliding_window=sliding_window)
        m_new = jnp.maximum(m_prev, logits.max(axis=1))
        probs = jnp.where(visible, jnp.exp(logits - m_new[:, None]), 0.0)
        rescale = jnp.exp(m_prev - m_new)
        probs_c = probs.astype(compute_dtype)
        # Slots past kv_len hold stale data (possibly NaN), and 0 * NaN is NaN.
        written = (key_pos < kv_len)[:, None]
        values = [v for start, w, _ in chunks for v in read(v_ref, blocks, slots, start, w)]
        accs = tuple(
            acc * rescale[:, None]
            + plgpu.dot(probs_c, jnp.where(written, v, jnp.zeros_like(v))).astype(jnp.float32)
            for acc, v in zip(accs, values))
        return accs, m_new, l_prev * rescale + probs.sum(axis=1)

    init = (
        tuple(jnp.zeros((rows, w), jnp.float32) for _, w in pieces),
        jnp.full((rows,), MASKED, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    accs, m, l = lax.fori_loop(lo, jnp.maximum(lo, hi), visit, init)
    for (offset, w), acc in zip(pieces, accs):
        o_ref[:, pl.ds(offset, w)] = acc
    m_ref[...] = m
    l_ref[...] = l


def unsupported_reason(*, num_q_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                       q_dtype=jnp.bfloat16, cache_dtype=jnp.bfloat16) -> str | None:
    """None when the Triton kernel handles the shape, else why not (the dispatch logs it)."""
    if num_q_heads % num_kv_heads:
        return f"q heads ({num_q_heads}) must be a multiple of kv heads ({num_kv_heads})"
    if head_dim < _MIN_WIDTH:
        return f"head_dim {head_dim} < {_MIN_WIDTH} (Triton's smallest dot)"
    if block_size < 1:
        return f"block_size must be >= 1, got {block_size}"
    return None


def ragged_paged_attention_triton(
    q, k_cache, v_cache, kv_lens, block_tables, cu_q_lens, num_seqs, *,
    sm_scale, sliding_window=None, soft_cap=None, k_scale=None, v_scale=None, sinks=None,
    block_q: int | None = None, block_k: int | None = None, num_kv_splits: int | None = None,
    num_warps: int = 4, num_stages: int = 2, read_words: bool | None = None, fp8_compute_dtype=jnp.float16,
    interpret: bool = False,
):
    """Pallas (Triton lowering) ragged paged attention; see the module docstring.

    block_q: queries of one sequence per program (power of two; default so that block_q times
    the padded GQA group is at least 16, Triton's smallest dot). block_k: keys per tile (power of
    two >= 16; default 64, 32 for heads over 128). num_kv_splits: programs sharing one block's
    keys (flash-decoding); default: enough for ~256 programs (1 in interpret mode), at most 16,
    so a small decode batch still fills the GPU. read_words: read a 1-byte cache as 16-bit words
    (default: only where its offsets would wrap; tests force it on small caches).
    fp8_compute_dtype: the dots' operand type over a 1-byte cache with a bf16 query. float16 by
    default: e4m3 converts to it exactly and in one instruction per pair on sm_89+, while to
    bfloat16 it goes through float32; on an H200 fp8 decode ran at 0.82-1.17x bf16's speed with
    bfloat16 operands (conversion-bound). The GPU check measures both.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, cache_dim = k_cache.shape
    max_seqs, _ = block_tables.shape
    if cache_dim != head_dim or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache/v_cache shape {k_cache.shape}/{v_cache.shape} must be "
                         f"[num_blocks, block_size, Hkv, {head_dim}]")
    reason = unsupported_reason(num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                                block_size=block_size, q_dtype=q.dtype, cache_dtype=k_cache.dtype)
    if reason:
        raise ValueError(f"the Triton attention kernel cannot take this shape: {reason}")
    group = num_q_heads // num_kv_heads
    group_pad = _next_pow2(group)
    sinks = checked_sinks(sinks, num_q_heads)
    if block_q is None:
        block_q = max(1, _MIN_WIDTH // group_pad)
    if block_q < 1 or block_q & (block_q - 1):
        raise ValueError(f"block_q must be a power of two >= 1, got {block_q}")
    if block_k is None:
        block_k = 64 if head_dim <= 128 else 32
    if block_k < _MIN_WIDTH or block_k & (block_k - 1):
        raise ValueError(f"block_k must be a power of two >= {_MIN_WIDTH}, got {block_k}")
    rows = block_q * group_pad
    if num_kv_splits is None:
        programs = (num_tokens // block_q + min(max_seqs, num_tokens)) * num_kv_heads
        num_kv_splits = 1 if interpret else int(min(16, max(1, 256 // programs)))
    if num_kv_splits < 1:
        raise ValueError(f"num_kv_splits must be >= 1, got {num_kv_splits}")
    if rows < _MIN_WIDTH:
        raise ValueError(f"block_q * padded GQA group must be >= {_MIN_WIDTH}, got {block_q} * {group_pad}")
    words = reads_words(k_cache.shape, k_cache.dtype) if read_words is None else read_words
    if jnp.dtype(fp8_compute_dtype) not in (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"fp8_compute_dtype must be float16 or bfloat16, got {fp8_compute_dtype}")
    if words and (k_cache.dtype.itemsize != 1 or head_dim % 2 or head_dim < 2 * _MIN_WIDTH):
        raise ValueError(f"reading the cache as 16-bit words needs 1-byte elements and an even head_dim >= "
                         f"{2 * _MIN_WIDTH}, got {k_cache.dtype} and {head_dim}")
    cache_dtype = k_cache.dtype
    if words:  # [N, bs, Hkv, D] bytes -> [N, bs, Hkv, D / 2] words; a bitcast, no copy
        k_cache, v_cache = (lax.bitcast_convert_type(c.reshape(*c.shape[:3], head_dim // 2, 2), jnp.uint16)
                            for c in (k_cache, v_cache))
    chunks = head_chunks(head_dim // (2 if words else 1))
    layout = column_layout(head_dim, words)

    # Query blocks: sequence s owns blocks cu_blocks[s]:cu_blocks[s+1].
    blk_seq_or_dead, blk_off, q_lens, cu_blocks, num_qblocks = query_blocks(
        cu_q_lens, num_seqs, max_seqs, num_tokens, block_q)
    blk_seq = jnp.maximum(blk_seq_or_dead, 0)
    kv_lens = kv_lens.astype(jnp.int32)

    compute_dtype = jnp.float32
    if q.dtype == jnp.bfloat16 and cache_dtype.itemsize == 2:
        compute_dtype = jnp.bfloat16
    elif q.dtype == jnp.bfloat16 and cache_dtype.itemsize == 1:
        compute_dtype = jnp.dtype(fp8_compute_dtype)
    scale = sm_scale * (1.0 if k_scale is None else jnp.asarray(k_scale, jnp.float32))
    q_rows = jnp.clip(cu_q_lens[blk_seq][:, None] + blk_off[:, None] + jnp.arange(block_q)[None], 0, num_tokens - 1)
    qb = q[q_rows].astype(jnp.float32) * scale  # [NB, bq, Hq, D]
    qb = jnp.pad(qb, ((0, 0), (0, 0), (0, 0), (0, 1)))[..., layout]  # kernel columns; head_dim = zero
    columns = layout.shape[0]
    qb = qb.reshape(num_qblocks, block_q, num_kv_heads, group, columns)
    qb = jnp.pad(qb, ((0, 0), (0, 0), (0, 0), (0, group_pad - group), (0, 0)))
    qb = qb.transpose(0, 2, 1, 3, 4).reshape(num_qblocks, num_kv_heads, rows, columns).astype(compute_dtype)

    kernel = functools.partial(
        _kernel, block_q=block_q, block_k=block_k, group=group, group_pad=group_pad,
        num_splits=num_kv_splits, chunks=chunks, cache_dtype=cache_dtype, words=words,
        sliding_window=sliding_window, soft_cap=soft_cap, compute_dtype=compute_dtype,
    )
    whole = lambda shape: pl.BlockSpec(shape, lambda b, h, s: (0,) * len(shape))  # noqa: E731
    acc, m, l = pl.pallas_call(
        kernel,
        grid=(num_qblocks, num_kv_heads, num_kv_splits),
        in_specs=[
            whole((num_qblocks,)), whole((num_qblocks,)), whole((max_seqs,)), whole((max_seqs,)),
            whole(block_tables.shape),
            pl.BlockSpec((None, None, rows, columns), lambda b, h, s: (b, h, 0, 0)),
            whole(k_cache.shape), whole(v_cache.shape),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, rows, columns), lambda b, h, s: (s, b, h, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda b, h, s: (s, b, h, 0)),
            pl.BlockSpec((None, None, None, rows), lambda b, h, s: (s, b, h, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((num_kv_splits, num_qblocks, num_kv_heads, rows, columns), jnp.float32),
            jax.ShapeDtypeStruct((num_kv_splits, num_qblocks, num_kv_heads, rows), jnp.float32),
            jax.ShapeDtypeStruct((num_kv_splits, num_qblocks, num_kv_heads, rows), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"ragged_paged_attention_bq{block_q}_bk{block_k}_g{group_pad}",
    )(blk_seq_or_dead, blk_off, kv_lens, q_lens, block_tables.astype(jnp.int32), qb, k_cache, v_cache)

    # Merge the KV splits (flash-decoding), then scatter blocks back to tokens.
    m_all = m.max(axis=0)
    if sinks is not None:  # [Hkv, rows], broadcast over the query blocks
        row_sinks = sink_rows(sinks, num_kv_heads, block_q, group_pad, rows)
        m_all = jnp.maximum(m_all, row_sinks)
    weight = jnp.exp(m - m_all[None])
    denom = (weight * l).sum(axis=0)
    if sinks is not None:
        denom = denom + jnp.exp(row_sinks - m_all)
    out = (weight[..., None] * acc).sum(axis=0) / jnp.where(denom > 0, denom, 1.0)[..., None]
    if v_scale is not None:
        out = out * jnp.asarray(v_scale, jnp.float32)
    # Kernel columns back to head columns; overlap columns land in the spare column head_dim.
    out = jnp.zeros(out.shape[:-1] + (head_dim + 1,), out.dtype).at[..., layout].set(out)[..., :head_dim]
    out = out.reshape(num_qblocks, num_kv_heads, block_q, group_pad, head_dim)[:, :, :, :group]
    out = out.transpose(0, 2, 1, 3, 4).reshape(num_qblocks, block_q, num_q_heads, head_dim)

    token = jnp.arange(num_tokens, dtype=jnp.int32)
    tok_seq = jnp.minimum(jnp.searchsorted(cu_q_lens[1:], token, side="right"), max_seqs - 1)
    tok_off = token - cu_q_lens[tok_seq]
    tok_blk = jnp.clip(cu_blocks[tok_seq] + tok_off // block_q, 0, num_qblocks - 1)
    result = out[tok_blk, tok_off % block_q]
    valid = token < cu_q_lens[num_seqs]
    return jnp.where(valid[:, None, None], result, 0.0).astype(q.dtype)
