"""MLA (latent) paged attention as a Pallas kernel with the Triton lowering (GPU; interpret mode
on CPU).

Same contract as `mla_attention.mla_paged_attention`: q [T, H, L + R] in the absorbed form, one
latent row [L + R] per cached token, out [T, H, L]. The batch is cut into *query blocks* as in
triton_paged_attention.py: up to `block_q` consecutive queries of one sequence. A program takes a
query block and a *head block* of `block_h` heads; its `block_q * block_h` query-head pairs are
the rows of every dot, so each latent row it reads serves all of them, first as a key (all L + R
columns) and then, from the same registers, as a value (its first L columns): the cache is read
once per program, and the head blocks of one query block run next to each other (the first grid
axis) so that their reads of the same rows hit L2.

Grid: (head block, query block, KV split). A program walks its share of the sequence's rows in
tiles of `block_k` with an online softmax; with `num_kv_splits > 1` the rows are split across
programs (flash-decoding) and the partial results merged in JAX. A tile names its rows' pages one
row at a time, so any page size works.

Row widths: Triton's dots and loads want power-of-two widths of at least 16. The row is read as
*pieces*: the latent part and the rope part each cut into power-of-two widths (at most
_MAX_PIECE), so L and R must be multiples of 16 (DeepSeek: 512 and 64).

FP8 / scaled caches: rows are cast to the compute dtype in the kernel; the per-layer scale is
folded into the query and into the merged output. An fp8 cache of 2^31 or more elements is read
as 16-bit words (two values each, split in the kernel into even and odd columns), as the
attention kernel does, so every offset stays below 2^31.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.kernel_common import MASKED, block_span, masked_logits, query_blocks
from pallas_kernels.triton_paged_attention import _split_words, reads_words

# Triton's smallest dot and load width; the widest piece of a row read by one load.
_MIN_WIDTH = 16
_MAX_PIECE = 128
_DTYPES = tuple(jnp.dtype(d) for d in (jnp.float32, jnp.bfloat16, jnp.float16, jnp.float8_e4m3fn))


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def row_pieces(kv_lora_rank: int, rope_dim: int, lanes: int = 1) -> tuple[tuple[int, int], ...]:
    """(start, width) in row units (`lanes` columns each) covering the latent part, then the rope
    part: power-of-two widths from 16 to _MAX_PIECE, largest first."""
    pieces = []
    for start, units in ((0, kv_lora_rank // lanes), (kv_lora_rank // lanes, rope_dim // lanes)):
        end = start + units
        while start < end:
            width = min(_MAX_PIECE, 1 << ((end - start).bit_length() - 1))
            pieces.append((start, width))
            start += width
    return tuple(pieces)


def column_layout(kv_lora_rank: int, rope_dim: int, lanes: int) -> np.ndarray:
    """For every kernel column, the row column it holds: piece by piece, and within a piece lane by
    lane (lane j of a 16-bit word holds row column 2 * unit + j). The first L kernel columns are
    the latent ones."""
    return np.concatenate([(np.arange(start, start + width) * lanes + lane)
                           for start, width in row_pieces(kv_lora_rank, rope_dim, lanes)
                           for lane in range(lanes)]).astype(np.int32)


def unsupported_reason(*, num_heads: int, kv_lora_rank: int, rope_dim: int, block_size: int,
                       q_dtype=jnp.bfloat16, cache_dtype=jnp.bfloat16) -> str | None:
    """None when the Triton MLA kernel handles the shape, else why not (the dispatch logs it)."""
    if kv_lora_rank < _MIN_WIDTH or kv_lora_rank % _MIN_WIDTH:
        return f"kv_lora_rank {kv_lora_rank} must be a multiple of {_MIN_WIDTH} (Triton's smallest dot)"
    if rope_dim < 0 or rope_dim % _MIN_WIDTH:
        return f"rope_dim {rope_dim} must be a multiple of {_MIN_WIDTH} (Triton's smallest dot)"
    if num_heads < 1 or block_size < 1:
        return f"num_heads ({num_heads}) and block_size ({block_size}) must be >= 1"
    for name, dtype in (("q", q_dtype), ("cache", cache_dtype)):
        if jnp.dtype(dtype) not in _DTYPES or (name == "q" and jnp.dtype(dtype).itemsize == 1):
            return f"{name} dtype {jnp.dtype(dtype).name} is not supported"
    return None


def _kernel(
    seq_ref, qoff_ref, kv_lens_ref, q_lens_ref, tables_ref,  # scalars per block / sequence
    q_ref, cache_ref,  # q block [M, C]; the whole cache [N, bs, units]
    o_ref, m_ref, l_ref,  # partials [M, L], [M], [M]
    *, block_q: int, block_h: int, num_heads: int, block_k: int, num_splits: int, pieces: tuple,
    num_latent: int, cache_dtype, words: bool, compute_dtype,
):
    head_block, block, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows = q_ref.shape[0]
    block_size = cache_ref.shape[1]
    width = tables_ref.shape[1]
    lanes = 2 if words else 1

    live, seq, kv_len, first_pos, last_pos = block_span(seq_ref, qoff_ref, kv_lens_ref, q_lens_ref, block, block_q)
    end_tile = jnp.where(live, (last_pos + block_k) // block_k, 0)
    per_split = (end_tile + num_splits - 1) // num_splits
    lo = split * per_split
    hi = jnp.minimum(lo + per_split, end_tile)

    row = lax.broadcasted_iota(jnp.int32, (rows, block_k), 0)
    col = lax.broadcasted_iota(jnp.int32, (rows, block_k), 1)
    token = row // block_h
    q_pos = first_pos + token
    row_ok = (first_pos + token < kv_len) & (head_block * block_h + row % block_h < num_heads)
    offsets = np.cumsum([0] + [w * lanes for _, w in pieces])
    queries = [q_ref[:, pl.ds(int(offsets[i]) + lane * w, w)] for i, (_, w) in enumerate(pieces) for lane in range(lanes)]
    key_in_tile = lax.iota(jnp.int32, block_k)

    def visit(tile, carry):
        accs, m_prev, l_prev = carry
        key_pos = tile * block_k + key_in_tile
        blocks = tables_ref[seq, jnp.minimum(key_pos // block_size, width - 1)]
        slots = key_pos % block_size
        # Slots past kv_len hold stale data (possibly NaN), and 0 * NaN is NaN: zero them once,
        # for the keys and the values alike.
        written = (key_pos < kv_len)[:, None]
        loaded = []
        for start, w in pieces:
            units = cache_ref[blocks, slots, pl.ds(start, w)]
            lanes_of = _split_words(units, cache_dtype, compute_dtype) if words else (units.astype(compute_dtype),)
            loaded.extend(jnp.where(written, x, jnp.zeros_like(x)) for x in lanes_of)
        logits = sum(plgpu.dot(q, k, trans_b=True).astype(jnp.float32) for q, k in zip(queries, loaded))
        logits, visible = masked_logits(logits, tile * block_k + col, q_pos, kv_len, row_ok, soft_cap=None,
                                        sliding_window=None)
        m_new = jnp.maximum(m_prev, logits.max(axis=1))
        probs = jnp.where(visible, jnp.exp(logits - m_new[:, None]), 0.0)
        rescale = jnp.exp(m_prev - m_new)
        probs_c = probs.astype(compute_dtype)
        accs = tuple(acc * rescale[:, None] + plgpu.dot(probs_c, v).astype(jnp.float32)
                     for acc, v in zip(accs, loaded[:len(accs)]))
        return accs, m_new, l_prev * rescale + probs.sum(axis=1)

    latent_widths = [w for _, w in pieces[:num_latent] for _ in range(lanes)]
    init = (
        tuple(jnp.zeros((rows, w), jnp.float32) for w in latent_widths),
        jnp.full((rows,), MASKED, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    accs, m, l = lax.fori_loop(lo, jnp.maximum(lo, hi), visit, init)
    for offset, w, acc in zip(np.cumsum([0] + latent_widths), latent_widths, accs):
        o_ref[:, pl.ds(int(offset), w)] = acc
    m_ref[...] = m
    l_ref[...] = l


def mla_paged_attention_triton(
    q, latent_cache, kv_lens, block_tables, cu_q_lens, num_seqs, *, kv_lora_rank, sm_scale, scale=None,
    block_h: int | None = None, block_k: int = 32, num_kv_splits: int | None = None, num_warps: int = 8,
    num_stages: int = 2, read_words: bool | None = None, fp8_compute_dtype=jnp.float16, interpret: bool = False,
):
    """Pallas (Triton lowering) MLA paged attention; see the module docstring.

    block_h: heads per program (power of two; default min(32, heads rounded up): 32 heads keep the
    float32 accumulator [32, 512] and the query in registers at 8 warps). block_k: rows per tile
    (power of two >= 16). num_kv_splits: programs sharing one block's rows (flash-decoding);
    default: enough for ~256 programs (1 in interpret mode), at most 16. read_words: read a 1-byte
    cache as 16-bit words (default: only where its offsets would wrap; tests force it).
    fp8_compute_dtype: the dots' operand type over a 1-byte cache with a 16-bit query (float16: e4m3
    converts to it exactly and cheaply, see triton_paged_attention.py)."""
    num_tokens, num_heads, row_width = q.shape
    num_blocks, block_size, cache_width = latent_cache.shape
    max_seqs, _ = block_tables.shape
    rope_dim = row_width - kv_lora_rank
    if cache_width != row_width:
        raise ValueError(f"latent_cache rows ({cache_width}) must be as wide as q's ({row_width})")
    reason = unsupported_reason(num_heads=num_heads, kv_lora_rank=kv_lora_rank, rope_dim=rope_dim,
                                block_size=block_size, q_dtype=q.dtype, cache_dtype=latent_cache.dtype)
    if reason:
        raise ValueError(f"the Triton MLA kernel cannot take this shape: {reason}")
    block_h = block_h or min(32, _next_pow2(num_heads))
    if block_h < 1 or block_h & (block_h - 1):
        raise ValueError(f"block_h must be a power of two >= 1, got {block_h}")
    if block_k < _MIN_WIDTH or block_k & (block_k - 1):
        raise ValueError(f"block_k must be a power of two >= {_MIN_WIDTH}, got {block_k}")
    block_q = max(1, _MIN_WIDTH // block_h)
    rows = block_q * block_h
    num_hblocks = -(-num_heads // block_h)
    cache_dtype = latent_cache.dtype
    words = reads_words(latent_cache.shape, cache_dtype) if read_words is None else read_words
    if words and (cache_dtype.itemsize != 1 or kv_lora_rank % 32 or rope_dim % 32):
        raise ValueError(f"reading the cache as 16-bit words needs 1-byte elements and kv_lora_rank and rope_dim "
                         f"multiples of 32, got {cache_dtype}, {kv_lora_rank} and {rope_dim}")
    if jnp.dtype(fp8_compute_dtype) not in (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"fp8_compute_dtype must be float16 or bfloat16, got {fp8_compute_dtype}")
    lanes = 2 if words else 1
    if words:  # [N, bs, W] bytes -> [N, bs, W / 2] words; a bitcast, no copy
        latent_cache = lax.bitcast_convert_type(latent_cache.reshape(num_blocks, block_size, row_width // 2, 2),
                                                jnp.uint16)
    pieces = row_pieces(kv_lora_rank, rope_dim, lanes)
    num_latent = len(row_pieces(kv_lora_rank, 0, lanes))
    layout = column_layout(kv_lora_rank, rope_dim, lanes)

    blk_seq, blk_off, q_lens, cu_blocks, num_qblocks = query_blocks(cu_q_lens, num_seqs, max_seqs, num_tokens,
                                                                     block_q)
    if num_kv_splits is None:
        programs = num_qblocks * num_hblocks
        num_kv_splits = 1 if interpret else int(min(16, max(1, 256 // programs)))
    if num_kv_splits < 1:
        raise ValueError(f"num_kv_splits must be >= 1, got {num_kv_splits}")

    compute_dtype = jnp.float32
    if q.dtype.itemsize == 2:
        compute_dtype = q.dtype if cache_dtype.itemsize == 2 else jnp.dtype(fp8_compute_dtype)
    row_scale = 1.0 if scale is None else jnp.asarray(scale, jnp.float32)
    q_rows = jnp.clip(cu_q_lens[jnp.maximum(blk_seq, 0)][:, None] + blk_off[:, None] + jnp.arange(block_q)[None],
                      0, num_tokens - 1)
    qb = (q[q_rows].astype(jnp.float32) * (sm_scale * row_scale))[..., layout]  # [NB, bq, H, C]
    qb = jnp.pad(qb, ((0, 0), (0, 0), (0, num_hblocks * block_h - num_heads), (0, 0)))
    qb = qb.reshape(num_qblocks, block_q, num_hblocks, block_h, row_width).transpose(2, 0, 1, 3, 4)
    qb = qb.reshape(num_hblocks, num_qblocks, rows, row_width).astype(compute_dtype)

    kernel = functools.partial(
        _kernel, block_q=block_q, block_h=block_h, num_heads=num_heads, block_k=block_k, num_splits=num_kv_splits,
        pieces=pieces, num_latent=num_latent, cache_dtype=cache_dtype, words=words, compute_dtype=compute_dtype)
    whole = lambda shape: pl.BlockSpec(shape, lambda h, b, s: (0,) * len(shape))  # noqa: E731
    partial = lambda *tail: pl.BlockSpec((None, None, None, rows) + tail, lambda h, b, s: (s, h, b, 0) + (0,) * len(tail))  # noqa: E731
    partial_shape = lambda *tail: jax.ShapeDtypeStruct(  # noqa: E731
        (num_kv_splits, num_hblocks, num_qblocks, rows) + tail, jnp.float32)
    acc, m, l = pl.pallas_call(
        kernel,
        grid=(num_hblocks, num_qblocks, num_kv_splits),
        in_specs=[
            whole((num_qblocks,)), whole((num_qblocks,)), whole((max_seqs,)), whole((max_seqs,)),
            whole(block_tables.shape),
            pl.BlockSpec((None, None, rows, row_width), lambda h, b, s: (h, b, 0, 0)),
            whole(latent_cache.shape),
        ],
        out_specs=[partial(kv_lora_rank), partial(), partial()],
        out_shape=[partial_shape(kv_lora_rank), partial_shape(), partial_shape()],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"mla_paged_attention_bh{block_h}_bk{block_k}",
    )(blk_seq, blk_off, kv_lens.astype(jnp.int32), q_lens, block_tables.astype(jnp.int32), qb, latent_cache)

    # Merge the KV splits (flash-decoding), then scatter blocks back to tokens.
    m_all = m.max(axis=0)
    weight = jnp.exp(m - m_all[None])
    denom = (weight * l).sum(axis=0)
    out = (weight[..., None] * acc).sum(axis=0) / jnp.where(denom > 0, denom, 1.0)[..., None] * row_scale
    if words:  # kernel columns back to latent columns
        out = jnp.zeros_like(out).at[..., layout[:kv_lora_rank]].set(out)
    out = out.reshape(num_hblocks, num_qblocks, block_q, block_h, kv_lora_rank).transpose(1, 2, 0, 3, 4)
    out = out.reshape(num_qblocks, block_q, num_hblocks * block_h, kv_lora_rank)[:, :, :num_heads]

    token = jnp.arange(num_tokens, dtype=jnp.int32)
    tok_seq = jnp.minimum(jnp.searchsorted(cu_q_lens[1:], token, side="right"), max_seqs - 1)
    tok_off = token - cu_q_lens[tok_seq]
    tok_blk = jnp.clip(cu_blocks[tok_seq] + tok_off // block_q, 0, num_qblocks - 1)
    result = out[tok_blk, tok_off % block_q]
    valid = token < cu_q_lens[num_seqs]
    return jnp.where(valid[:, None, None], result, 0.0).astype(q.dtype)
