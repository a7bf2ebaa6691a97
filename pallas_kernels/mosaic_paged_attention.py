"""Ragged paged attention as a Pallas Mosaic GPU kernel (Hopper: TMA + wgmma; interpret mode on CPU).

Same contract as `paged_attention.ragged_paged_attention_reference`. The wrapper (plain JAX) cuts
the batch into *query blocks* like the Triton kernel does: a block holds up to `block_q`
consecutive queries of one sequence, and its rows are laid out as [blocks, Hkv, 64, D] with row
r = token (r // group) x query head (r % group) of the GQA group sharing one KV head. wgmma wants
M % 64 == 0, so block_q = 64 // group and the spare rows (64 % group, or the whole block past the
sequence's last query) are dead: their logits are masked and their output is dropped. A decode
uses `group` of the 64 rows; decode attention is bound by reading the cache, not by the tensor
cores, so the padding costs little.

Grid: (query block, KV head, KV split), one warpgroup per program. A program walks its share of
the sequence's keys in tiles of `block_k` (64) keys through a ring of `num_stages` shared-memory
slots: a tile's keys and values arrive by TMA copies of the pages the block table names (one copy
per page when pages are smaller than a tile, a 64-key slice of the page when they are larger), all
arriving on the slot's barrier, up to `num_stages` tiles in flight while the warpgroup runs
S = Q K^T and O += P V on wgmma with an online softmax in registers. P goes to shared memory
before its wgmma (8 KiB per tile; the interpreter's wgmma takes shared-memory operands only).
With `num_kv_splits > 1` the tiles are split across programs (flash-decoding); each program
writes its output normalised over its keys with its running max and denominator, and the splits
are merged in JAX; this keeps the GPU busy when a decode batch is small. Attention sinks
(`sinks` [Hq], gpt-oss) join that merge once per row, whatever the split count (see
`_merge_splits`): exact, and the kernel never sees them.

Keys a tile holds but a query may not see (past kv_len, before the sliding window, past the causal
bound) are masked in the logits with a select, so stale or NaN keys never matter; their *values*
would (0 * NaN = NaN in P V), so value rows outside [window start, kv_len) are zeroed in shared
memory before the P V wgmma. Pages past the sequence's last page are never copied: a tile
reaching past kv_len repeats the last page instead, so the null block 0 is never read.

FP8 caches: wgmma cannot mix 16-bit and fp8 operands, and fp8 wgmma needs K-major operands (V is
not), so fp8 tiles land in their own ring and are converted (and masked) into one 16-bit tile per
operand right before each wgmma. The 16-bit type is float16: fp8 e4m3 converts to it exactly and
in hardware (to bf16 only through f32 with the ptxas Mosaic GPU targets), and the query and P
follow it. `k_scale` is folded into the query and `v_scale` into the merged output, so the scales
are runtime arrays that never force a recompile.

Head sizes: tiles are [rows, head_dim] with the largest shared-memory swizzle (128, 64 or 32
bytes) dividing a row, so 64, 80, 96, 128, 192 and 256 need no padding; wgmma wants both
shared-memory operands with one swizzle, so the P tile takes V's.

Shared memory per program (defaults): query 64 x D, P 64 x 64, two ring buffers of
num_stages x 64 x D (plus two 64 x D f16 tiles for fp8), ~4.5 KiB besides. num_stages is the
largest of 4, 3, 2 that keeps a program within half an SM (two programs per SM), else 2: bf16
D=128 runs 2 stages (92 KiB), fp8 D=128 3 stages (108 KiB), D=256 2 stages (172 KiB, one per SM).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.kernel_common import MASKED, checked_sinks, masked_logits, query_blocks, sink_rows
from pallas_kernels.kv_cache import FP8_DTYPE

# Rows of a query block: wgmma's M.
_ROWS = 64
# Shared memory one program may use (H100/H200: 227 KiB per block), and the share the default
# tuning aims at so that two programs fit on one SM (228 KiB per SM).
_SMEM_LIMIT = 227 * 1024
_SMEM_TWO_PER_SM = 113 * 1024
_SMEM_OVERHEAD = 4 * 1024
_BLOCK_K = 64
_HEAD_DIMS = (64, 80, 96, 128, 192, 256)
_CACHE_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(FP8_DTYPE))


def _swizzle(row_bytes: int) -> int | None:
    """Largest TMA/wgmma swizzle (bytes) that divides a tile row, None if none does."""
    return next((s for s in (128, 64, 32) if row_bytes % s == 0), None)


def _tile(shape, dtype, swizzle: int | None = None):
    """A shared-memory tile [..., rows, cols] laid out as wgmma and TMA want it: by default with
    the largest swizzle a row allows (the fp8 ring of an 80-wide head, which no wgmma reads, is
    left plain)."""
    itemsize = jnp.dtype(dtype).itemsize
    swizzle = swizzle or _swizzle(shape[-1] * itemsize)
    if swizzle is None:
        return plgpu.SMEM(shape, dtype)
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, swizzle // itemsize)),
                                                plgpu.SwizzleTransform(swizzle)))


def _smem_bytes(head_dim: int, block_k: int, num_stages: int, cache_dtype) -> int:
    """Shared memory of one program: the query tile (reused for the output), the KV ring, the
    f16 tiles an fp8 ring is converted into, the max / denominator rows, and what Mosaic GPU
    adds (barriers, a 2 KiB reduction scratch, alignment)."""
    itemsize = jnp.dtype(cache_dtype).itemsize
    ring = 2 * num_stages * block_k * head_dim * itemsize
    converted = 2 * block_k * head_dim * 2 if itemsize == 1 else 0
    return _ROWS * (head_dim + block_k) * 2 + ring + converted + 2 * _ROWS * 4 + _SMEM_OVERHEAD


def mosaic_unsupported_reason(*, num_q_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                              q_dtype=jnp.bfloat16, cache_dtype=jnp.bfloat16) -> str | None:
    """None when the Mosaic GPU kernel handles the shape, else a one-line reason (the dispatch
    falls back to the Triton kernel and logs it)."""
    if num_kv_heads < 1 or num_q_heads % num_kv_heads:
        return f"q heads ({num_q_heads}) must be a multiple of kv heads ({num_kv_heads})"
    group = num_q_heads // num_kv_heads
    if group > _ROWS:
        return f"GQA group {group} > {_ROWS} (the query heads of one KV head must fit one wgmma tile)"
    if jnp.dtype(q_dtype) != jnp.bfloat16:
        return (f"q dtype {jnp.dtype(q_dtype).name}: the kernel runs bf16 wgmma (float32 would need "
                f"the tf32 path with K-major V, which the kernel does not implement)")
    if jnp.dtype(cache_dtype) not in _CACHE_DTYPES:
        return (f"cache dtype {jnp.dtype(cache_dtype).name}: supported are bfloat16 and "
                f"float8_e4m3fn (float32 would need tf32 wgmma)")
    if head_dim not in _HEAD_DIMS:
        return f"head_dim {head_dim} not in {_HEAD_DIMS}"
    if block_size < 8 or block_size % 8 or (block_size < 64 and 64 % block_size) or (
            block_size > 64 and block_size % 64):
        return f"block_size {block_size}: pages must be 8, 16, 32 or a multiple of 64 keys"
    if _smem_bytes(head_dim, _BLOCK_K, 2, cache_dtype) > _SMEM_LIMIT:
        return f"head_dim {head_dim} needs more shared memory than a block has"
    return None


def _softmax_step(logits, visible, acc, m_prev, l_prev):
    """Online softmax over one tile of masked logits [64, block_k]: the unnormalised
    probabilities, the accumulator rescaled to the new running max, and the new max and
    denominator."""
    m_new = jnp.maximum(m_prev, logits.max(axis=1))
    probs = jnp.where(visible, jnp.exp(logits - lax.broadcast_in_dim(m_new, logits.shape, [0])), 0.0)
    rescale = jnp.exp(m_prev - m_new)
    l_new = l_prev * rescale + probs.sum(axis=1)
    return probs, acc * lax.broadcast_in_dim(rescale, acc.shape, [0]), m_new, l_new


def _accumulate(acc, probs_smem, values_smem, interpret: bool):
    """acc + probs @ values. On the GPU wgmma accumulates into `acc` in place (pl.run_state);
    the interpreter has no rule for run_state (a TODO in jax), so there the product goes into a
    fresh accumulator and is added: the same sum, one more register tile."""
    if interpret:
        def product(acc_ref):
            plgpu.wgmma(acc_ref, probs_smem, values_smem)
            return acc_ref[...]

        return acc + pl.run_scoped(product, plgpu.ACC(acc.shape, jnp.float32))

    def accumulate(acc_ref):
        plgpu.wgmma(acc_ref, probs_smem, values_smem)

    return pl.run_state(accumulate)(plgpu.ACC.init(acc))


def _kernel(
    seq_ref, qoff_ref, kv_lens_ref, q_lens_ref, tables_ref,  # int32 metadata in GMEM
    q_ref, k_ref, v_ref,  # q blocks [NB, Hkv, 64, D] bf16; whole caches [N, bs, Hkv, D]
    o_ref, m_ref, l_ref,  # partials: normalised output [splits, NB, Hkv, 64, D]; max, denominator
    q_smem, p_smem, k_ring, v_ring, m_smem, l_smem, q_barrier, kv_barriers, *fp8_tiles,
    block_q: int, block_k: int, group: int, num_stages: int, num_splits: int,
    sliding_window: int | None, soft_cap: float | None, interpret: bool,
):
    block, head, split = lax.axis_index("block"), lax.axis_index("head"), lax.axis_index("split")
    block_size = k_ref.shape[1]
    width = tables_ref.shape[1]
    fp8 = bool(fp8_tiles)
    k_tile, v_tile = fp8_tiles or (None, None)
    compute_dtype = q_smem.dtype

    seq = seq_ref[block]
    live = seq >= 0
    seq = jnp.maximum(seq, 0)
    qoff = qoff_ref[block]
    kv_len = kv_lens_ref[seq]
    num_queries = jnp.clip(q_lens_ref[seq] - qoff, 0, block_q)
    first_pos = kv_len - q_lens_ref[seq] + qoff
    last_pos = first_pos + num_queries - 1
    start_key = 0 if sliding_window is None else jnp.maximum(first_pos - sliding_window + 1, 0)
    first_tile = start_key // block_k
    end_tile = jnp.where(live & (num_queries > 0), (last_pos + block_k) // block_k, first_tile)
    per_split = (end_tile - first_tile + num_splits - 1) // num_splits
    lo = first_tile + split * per_split
    num_tiles = jnp.maximum(jnp.minimum(lo + per_split, end_tile) - lo, 0)
    last_page = jnp.clip((kv_len - 1) // block_size, 0, width - 1)

    def issue(tile, slot):
        """TMA copies of one tile's keys and values into ring slot `slot`."""
        first_key = tile * block_k
        if block_size >= block_k:
            page = tables_ref[seq, jnp.minimum(first_key // block_size, last_page)]
            rows = pl.ds(first_key % block_size, block_k)
            plgpu.copy_gmem_to_smem(k_ref.at[page, rows, head], k_ring.at[slot], kv_barriers.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[page, rows, head], v_ring.at[slot], kv_barriers.at[slot])
            return
        for p in range(block_k // block_size):
            page = tables_ref[seq, jnp.minimum(first_key // block_size + p, last_page)]
            rows = pl.ds(p * block_size, block_size)
            plgpu.copy_gmem_to_smem(k_ref.at[page, :, head], k_ring.at[slot, rows], kv_barriers.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[page, :, head], v_ring.at[slot, rows], kv_barriers.at[slot])

    plgpu.copy_gmem_to_smem(q_ref.at[block, head], q_smem, q_barrier)
    for s in range(num_stages):
        pl.when(s < num_tiles)(functools.partial(issue, lo + s, s))
    plgpu.barrier_wait(q_barrier)

    row = plgpu.broadcasted_iota(jnp.int32, (_ROWS, block_k), 0, layout=plgpu.Layout.WGMMA)
    col = plgpu.broadcasted_iota(jnp.int32, (_ROWS, block_k), 1, layout=plgpu.Layout.WGMMA)
    q_pos = first_pos + row // group
    row_ok = (row < block_q * group) & (row // group < num_queries)

    def ready_tile(slot, first_key):
        """The slot's keys and values as wgmma operands, values outside [start_key, kv_len) zero."""
        def key_ok(shape):
            key = first_key + lax.broadcasted_iota(jnp.int32, shape, 0)
            return (key >= start_key) & (key < kv_len)

        if fp8:  # fp8 -> f16 tiles (wgmma takes no fp8 V, nor mixed operands)
            k_tile[...] = k_ring[slot].astype(compute_dtype)
            v_tile[...] = jnp.where(key_ok(v_tile.shape), v_ring[slot].astype(compute_dtype), 0)
            plgpu.commit_smem()
            return k_tile, v_tile
        values = v_ring.at[slot]

        @pl.when((first_key < start_key) | (first_key + block_k > kv_len))
        def _zero_stale_values():
            values[...] = jnp.where(key_ok(values.shape), values[...], 0)
            plgpu.commit_smem()

        return k_ring.at[slot], values

    def visit(i, carry):
        acc, m_prev, l_prev = carry
        slot = lax.rem(i, num_stages)
        tile = lo + i
        plgpu.barrier_wait(kv_barriers.at[slot])
        keys, values = ready_tile(slot, tile * block_k)

        def scores(acc_ref):
            plgpu.wgmma(acc_ref, q_smem, keys.transpose((1, 0)))
            return acc_ref[...]

        logits = pl.run_scoped(scores, plgpu.ACC((_ROWS, block_k), jnp.float32))
        logits, visible = masked_logits(logits, tile * block_k + col, q_pos, kv_len, row_ok, soft_cap=soft_cap,
                                        sliding_window=sliding_window)
        probs, acc, m_new, l_new = _softmax_step(logits, visible, acc, m_prev, l_prev)
        # P goes through shared memory (8 KiB per tile): the interpreter's wgmma takes
        # shared-memory operands only, and one code path keeps the interpret tests honest.
        p_smem[...] = probs.astype(compute_dtype)
        plgpu.commit_smem()
        acc = _accumulate(acc, p_smem, values, interpret)

        @pl.when(i + num_stages < num_tiles)
        def _refill():
            issue(tile + num_stages, slot)

        return acc, m_new, l_new

    head_dim = q_smem.shape[1]
    init = (
        plgpu.layout_cast(jnp.zeros((_ROWS, head_dim), jnp.float32), plgpu.Layout.WGMMA),
        plgpu.layout_cast(jnp.full((_ROWS,), MASKED, jnp.float32), plgpu.Layout.WGMMA.reduce(1)),
        plgpu.layout_cast(jnp.zeros((_ROWS,), jnp.float32), plgpu.Layout.WGMMA.reduce(1)),
    )
    acc, m, l = lax.fori_loop(0, num_tiles, visit, init)
    # The query tile is free now; the normalised output goes out through it.
    q_smem[...] = (acc / lax.broadcast_in_dim(jnp.where(l > 0, l, 1.0), acc.shape, [0])).astype(compute_dtype)
    m_smem[...] = m
    l_smem[...] = l
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem, o_ref.at[split, block, head])
    plgpu.copy_smem_to_gmem(m_smem, m_ref.at[split, block, head])
    plgpu.copy_smem_to_gmem(l_smem, l_ref.at[split, block, head])
    plgpu.wait_smem_to_gmem(0)


def _query_blocks(cu_q_lens, num_seqs, max_seqs: int, num_tokens: int, block_q: int):
    """Per query block: its sequence (-1 past the last block) and the offset of its first query,
    plus each token's block; the block count is static (a bound over every batch of this shape)."""
    block_seq, block_off, q_lens, cu_blocks, num_blocks = query_blocks(
        cu_q_lens, num_seqs, max_seqs, num_tokens, block_q)
    tokens = jnp.arange(num_tokens, dtype=jnp.int32)
    token_seq = jnp.minimum(jnp.searchsorted(cu_q_lens[1:], tokens, side="right"), max_seqs - 1)
    token_off = tokens - cu_q_lens[token_seq]
    token_block = jnp.clip(cu_blocks[token_seq] + token_off // block_q, 0, num_blocks - 1)
    return q_lens, block_seq, block_off, token_block, token_off % block_q


def _query_tiles(q, cu_q_lens, block_seq, block_off, num_kv_heads: int, block_q: int, scale):
    """q [T, Hq, D] -> scaled float32 query tiles [NB, Hkv, 64, D]: row r holds token r // group
    of the block and query head r % group of the KV head; rows past block_q * group are zero."""
    num_tokens, num_q_heads, head_dim = q.shape
    group = num_q_heads // num_kv_heads
    num_blocks = block_seq.shape[0]
    index = jnp.clip(cu_q_lens[jnp.maximum(block_seq, 0)][:, None] + block_off[:, None]
                     + jnp.arange(block_q)[None], 0, num_tokens - 1)
    tiles = (q[index].astype(jnp.float32) * scale).reshape(num_blocks, block_q, num_kv_heads, group, head_dim)
    tiles = tiles.transpose(0, 2, 1, 3, 4).reshape(num_blocks, num_kv_heads, block_q * group, head_dim)
    return jnp.pad(tiles, ((0, 0), (0, 0), (0, _ROWS - block_q * group), (0, 0)))


def _tiling(block_k, num_stages, head_dim: int, block_size: int, cache_dtype) -> tuple[int, int]:
    """Checked block_k and num_stages, defaults filled in (see ragged_paged_attention_mosaic)."""
    block_k = block_k or _BLOCK_K
    if block_k % 64 or (block_k % block_size and block_size % block_k):
        raise ValueError(f"block_k must be a multiple of 64 that is a multiple or a divisor of the "
                         f"page size {block_size}, got {block_k}")
    if num_stages is None:
        fits = [s for s in (4, 3, 2) if _smem_bytes(head_dim, block_k, s, cache_dtype) <= _SMEM_TWO_PER_SM]
        num_stages = fits[0] if fits else 2
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    if _smem_bytes(head_dim, block_k, num_stages, cache_dtype) > _SMEM_LIMIT:
        raise ValueError(f"block_k {block_k} x num_stages {num_stages} exceed shared memory at "
                         f"head_dim {head_dim}")
    return block_k, num_stages


def _merge_splits(out, m, l, row_sinks=None):
    """Flash-decoding merge: split s holds its keys' softmax-normalised output out[s] [..., D],
    running max m[s] and denominator l[s] [...]; returns the output over all keys (float32).
    row_sinks (broadcast to [...]): one more logit per row in the denominator, counted once; the
    max is taken with it first, so e^(sink - max) <= 1 never overflows."""
    if row_sinks is None:
        weight = jnp.exp(m - m.max(axis=0)[None]) * l
        total = weight.sum(axis=0)
    else:
        m_all = jnp.maximum(m.max(axis=0), row_sinks)
        weight = jnp.exp(m - m_all[None]) * l
        total = weight.sum(axis=0) + jnp.exp(row_sinks - m_all)
    return (weight[..., None] * out.astype(jnp.float32)).sum(axis=0) / jnp.where(total > 0, total, 1.0)[..., None]


def ragged_paged_attention_mosaic(
    q, k_cache, v_cache, kv_lens, block_tables, cu_q_lens, num_seqs, *,
    sm_scale, sliding_window=None, soft_cap=None, k_scale=None, v_scale=None, sinks=None, interpret=False,
    block_k: int | None = None, num_stages: int | None = None, num_kv_splits: int | None = None,
):
    """Pallas Mosaic GPU ragged paged attention; see the module docstring.

    interpret: False (compile for the GPU), True or a `plgpu.InterpretGPUParams` (run on CPU).
    block_k: keys per tile (a multiple of 64 that is a multiple or a divisor of the page size;
    default 64). num_stages: tiles in flight (default: the most, up to 4, that fit two programs
    per SM, else 2; see the module docstring). num_kv_splits: programs sharing
    one block's keys (flash-decoding); default: enough for ~264 programs (two per SM of an H100),
    at most 16, and 1 in interpret mode.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_pages, block_size, num_kv_heads, cache_dim = k_cache.shape
    max_seqs, _ = block_tables.shape
    if cache_dim != head_dim or v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"k_cache/v_cache {k_cache.shape}/{v_cache.shape} must both be "
                         f"[num_blocks, block_size, Hkv, {head_dim}] of one dtype")
    reason = mosaic_unsupported_reason(
        num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size,
        q_dtype=q.dtype, cache_dtype=k_cache.dtype)
    if reason:
        raise ValueError(f"the Mosaic GPU attention kernel cannot take this shape: {reason}")
    group = num_q_heads // num_kv_heads
    block_q = _ROWS // group
    sinks = checked_sinks(sinks, num_q_heads)
    block_k, num_stages = _tiling(block_k, num_stages, head_dim, block_size, k_cache.dtype)
    q_lens, block_seq, block_off, token_block, token_row = _query_blocks(
        cu_q_lens, num_seqs, max_seqs, num_tokens, block_q)
    num_blocks = block_seq.shape[0]
    if num_kv_splits is None:
        num_kv_splits = 1 if interpret else int(min(16, max(1, 264 // (num_blocks * num_kv_heads))))
    if num_kv_splits < 1:
        raise ValueError(f"num_kv_splits must be >= 1, got {num_kv_splits}")

    # fp8 converts exactly to f16 (and not, in hardware, to bf16); the query follows the cache.
    fp8 = k_cache.dtype.itemsize == 1
    compute_dtype = jnp.float16 if fp8 else jnp.bfloat16
    scale = sm_scale * (1.0 if k_scale is None else jnp.asarray(k_scale, jnp.float32))
    qb = _query_tiles(q, cu_q_lens, block_seq, block_off, num_kv_heads, block_q, scale).astype(compute_dtype)

    kernel = functools.partial(
        _kernel, block_q=block_q, block_k=block_k, group=group, num_stages=num_stages,
        num_splits=num_kv_splits, sliding_window=sliding_window, soft_cap=soft_cap,
        interpret=bool(interpret))
    partial_shape = (num_kv_splits, num_blocks, num_kv_heads, _ROWS)
    out, m, l = plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct(partial_shape + (head_dim,), compute_dtype),
                  jax.ShapeDtypeStruct(partial_shape, jnp.float32),
                  jax.ShapeDtypeStruct(partial_shape, jnp.float32)),
        scratch_types=(
            _tile((_ROWS, head_dim), compute_dtype),
            # wgmma's two operands from shared memory must share a swizzle: P's is V's.
            _tile((_ROWS, block_k), compute_dtype, swizzle=_swizzle(head_dim * 2)),
            _tile((num_stages, block_k, head_dim), k_cache.dtype),
            _tile((num_stages, block_k, head_dim), k_cache.dtype),
            plgpu.SMEM((_ROWS,), jnp.float32),
            plgpu.SMEM((_ROWS,), jnp.float32),
            plgpu.Barrier(),
            plgpu.Barrier(num_arrivals=2 * max(1, block_k // block_size), num_barriers=num_stages),
        ) + (_tile((block_k, head_dim), compute_dtype),) * (2 if fp8 else 0),
        grid=(num_blocks, num_kv_heads, num_kv_splits),
        grid_names=("block", "head", "split"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=(plgpu.InterpretGPUParams() if interpret is True else interpret) or None,
    )(block_seq, block_off, kv_lens.astype(jnp.int32), q_lens, block_tables.astype(jnp.int32),
      qb, k_cache, v_cache)

    out = _merge_splits(out, m, l, None if sinks is None else sink_rows(sinks, num_kv_heads, block_q, group, _ROWS))
    if v_scale is not None:
        out = out * jnp.asarray(v_scale, jnp.float32)
    out = out[:, :, :block_q * group].reshape(num_blocks, num_kv_heads, block_q, group, head_dim)
    out = out.transpose(0, 2, 1, 3, 4).reshape(num_blocks, block_q, num_q_heads, head_dim)
    result = out[token_block, token_row]
    valid = jnp.arange(num_tokens) < cu_q_lens[num_seqs]
    return jnp.where(valid[:, None, None], result, 0.0).astype(q.dtype)
