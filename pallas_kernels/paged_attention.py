"""Ragged paged attention: one call for a flat batch mixing prefill chunks and decodes.

Layout (DESIGN.md, "Model runner"): `q` [T, Hq, D] holds the new tokens of every sequence back to
back; sequence s owns rows `cu_q_lens[s]:cu_q_lens[s+1]`, its KV (already written, this step's
tokens included) is `kv_lens[s]` long and lives in the blocks `block_tables[s]`. Query j of
sequence s sits at position `kv_lens[s] - q_len_s + j` and attends causally. Rows past
`cu_q_lens[num_seqs]` are padding; their output is zero.

Attention sinks (gpt-oss): `sinks` [Hq] float32 gives every query head one more logit that joins
the softmax's denominator and attends to nothing, out_h = sum_j e^(s_hj - m) v_j /
(e^(sink_h - m) + sum_j e^(s_hj - m)), m the max over the row's logits and the sink. Every
backend folds it in once, after the keys (the kernels in their flash-decoding merge).

This file holds the pure-JAX reference, which is also the CPU production path, and the dispatch
that picks a backend.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.dispatch import BACKENDS, choose_attention_kernel
from pallas_kernels.interpret import interpreting
from pallas_kernels.kernel_common import checked_sinks
from pallas_kernels.kv_cache import dequantize_kv


# Sizes of the reference's two passes, measured on a 2-core CPU with SmolLM2 heads (3 KV heads,
# GQA 3, head_dim 64). Single-token rows gather their own keys all at once, ~2048 keys in total per
# chunk (64 keys for 32 rows): larger chunks fall out of cache and ran up to 10x slower.
# Multi-token rows run in tiles of 64 queries that gather their row's keys once, 128 at a time:
# a 512-token prefill step's attention went from 16 ms to ~4 ms per layer against per-token
# gathers, whose cost grows with tokens x context.
_DECODE_CHUNK_KEYS = 2048
# Decode chunks hold at most this many keys per row: one row of 128-256 keys visited a 1024-key
# chunk of mostly null blocks (30 layers, bf16, 2-core CPU: 6.6-13.2 ms against 3.9-4.7 ms in
# 512-key chunks, tools/decode_attention_bench.py). Per key, 512-key chunks cost what 1024-key
# ones do; 256-key ones about 1.3x more.
_DECODE_ROW_KEYS = 512
_TILE_QUERIES = 64
_TILE_KEYS = 128
# Rows of 2 to _SHORT_ROW_QUERIES queries run in tiles of _SHORT_TILE_QUERIES.
_SHORT_ROW_QUERIES = 16
_SHORT_TILE_QUERIES = 8


def ragged_paged_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    kv_lens: jax.Array,
    block_tables: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    k_scale: jax.Array | float | None = None,
    v_scale: jax.Array | float | None = None,
    sinks: jax.Array | None = None,
    backend: str = "auto",
    interpret: bool = False,
) -> jax.Array:
    """Attention of `q` over the paged caches; returns [T, Hq, D] in `q.dtype`.

    backend: one of dispatch.BACKENDS ("auto", "reference", "triton", "mosaic", "pallas"; see
    pallas_kernels/dispatch.py for what each picks). `interpret=True` (or `interpret_mode()`) runs
    a Pallas kernel in interpret mode on CPU. sinks: [Hq] float32 learned sink logits (module
    doc), a runtime array; None: no sink.
    """
    interpret = interpret or interpreting()
    choice = choose_attention_kernel(
        backend, num_q_heads=q.shape[1], num_kv_heads=k_cache.shape[2], head_dim=q.shape[2],
        block_size=k_cache.shape[1], q_dtype=q.dtype, cache_dtype=k_cache.dtype)
    args = (q, k_cache, v_cache, kv_lens, block_tables, cu_q_lens, num_seqs)
    options = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
                   k_scale=k_scale, v_scale=v_scale, sinks=sinks)
    if choice.backend == "triton":
        from pallas_kernels.triton_paged_attention import ragged_paged_attention_triton

        return ragged_paged_attention_triton(*args, **options, interpret=interpret)
    if choice.backend == "mosaic":
        from pallas_kernels.mosaic_paged_attention import ragged_paged_attention_mosaic

        return ragged_paged_attention_mosaic(*args, **options, interpret=interpret)
    return ragged_paged_attention_reference(*args, **options)


# A jitted function of its own: a model calls it once per layer with the same shapes, and jax then
# traces it once per program instead of once per layer (its loops were 85% of the default model's
# tracing, 2.2 of 2.6 s per step program on the 2-core CPU). XLA inlines the call: the compiled
# program is the one a plain call gave.
@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap"))
def ragged_paged_attention_reference(
    q, k_cache, v_cache, kv_lens, block_tables, cu_q_lens, num_seqs, *,
    sm_scale, sliding_window=None, soft_cap=None, k_scale=None, v_scale=None, sinks=None,
):
    """Pure-JAX reference with the same signature as the kernel.

    Two passes over the rows, each reading a row's keys only through its own block table, with an
    online softmax over chunks of keys (memory stays bounded for long contexts):
    - rows with one query (decodes) run together, each gathering its own keys, as far as the
      longest such row reaches;
    - rows with several queries (prefill chunks) run one tile of queries at a time; a tile gathers
      its row's keys once for all its queries, and only up to its last query's position.
    A sink joins each row's softmax after its last chunk (`_softmax_finish`).
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    keys = _PagedKeys(k_cache, v_cache, k_scale, v_scale, soft_cap, sliding_window)
    sinks = checked_sinks(sinks, num_q_heads)
    sinks = None if sinks is None else sinks.reshape(num_kv_heads, group)
    query = (q.astype(jnp.float32) * sm_scale).reshape(num_tokens, num_kv_heads, group, head_dim)
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    live = jnp.arange(block_tables.shape[0]) < num_seqs

    # Outputs carry _TILE_QUERIES spare rows so that a tile never needs clipping at the end.
    out = jnp.zeros((num_tokens + _TILE_QUERIES, num_kv_heads, group, head_dim), jnp.float32)
    single = live & (q_lens == 1)
    first = jnp.minimum(cu_q_lens[:-1], num_tokens - 1)
    decoded = _single_query_rows(keys, query[first], kv_lens, single, block_tables, sinks)
    out = out.at[jnp.where(single, first, out.shape[0])].set(decoded, mode="drop")
    # Short multi-query rows (speculative decoding's drafts, short chunks) in small tiles: a row
    # of 6 queries in a 64-query tile cost as much as 10 decode rows. A pass that no row can need
    # at this many tokens (a row holds at most `num_tokens`) is left out of the program: attention
    # is ~3/4 of a model program's compile time, each pass about a third of that.
    if num_tokens > 1:
        short = live & (q_lens > 1) & (q_lens <= _SHORT_ROW_QUERIES)
        out = _multi_query_rows(keys, query, out, kv_lens, jnp.where(short, q_lens, 0), cu_q_lens, block_tables,
                                sinks, tile_queries=_SHORT_TILE_QUERIES)
    if num_tokens > _SHORT_ROW_QUERIES:
        out = _multi_query_rows(keys, query, out, kv_lens, jnp.where(live & (q_lens > _SHORT_ROW_QUERIES), q_lens, 0),
                                cu_q_lens, block_tables, sinks)
    return out[:num_tokens].reshape(num_tokens, num_q_heads, head_dim).astype(q.dtype)


class _PagedKeys:
    """Reads keys and values through block tables and folds them into an online softmax."""

    def __init__(self, k_cache, v_cache, k_scale, v_scale, soft_cap, sliding_window):
        self.k_cache, self.v_cache = k_cache, v_cache
        self.k_scale, self.v_scale = k_scale, v_scale
        self.soft_cap, self.sliding_window = soft_cap, sliding_window
        self.block_size = k_cache.shape[1]

    def gather(self, block_ids):
        """block_ids [..., n] -> keys, values [..., n * block_size, Hkv, D] in float32."""
        shape = block_ids.shape[:-1] + (block_ids.shape[-1] * self.block_size,) + self.k_cache.shape[2:]
        keys = dequantize_kv(self.k_cache[block_ids].reshape(shape), self.k_scale, jnp.float32)
        values = dequantize_kv(self.v_cache[block_ids].reshape(shape), self.v_scale, jnp.float32)
        return keys, values

    def mask(self, logits, values, key_pos, q_pos, seq_len):
        """Soft-cap and causal / window masking of logits [Q, Hkv, G, L] (key_pos [L], q_pos [Q]).

        Also zeroes values at slots past `seq_len` (a scalar for values [L, Hkv, D], one per query
        for values [Q, L, Hkv, D]): they hold stale data, possibly NaN, and 0 * NaN would leak."""
        if self.soft_cap is not None:
            logits = self.soft_cap * jnp.tanh(logits / self.soft_cap)
        visible = key_pos[None, :] <= q_pos[:, None]
        if self.sliding_window is not None:
            visible &= key_pos[None, :] > q_pos[:, None] - self.sliding_window
        logits = jnp.where(visible[:, None, None, :], logits, -jnp.inf)
        written = key_pos < jnp.asarray(seq_len)[..., None]
        return logits, jnp.where(written[..., None, None], values, 0.0)


def _softmax_init(shape):
    return (jnp.full(shape[:-1], -jnp.inf, jnp.float32), jnp.zeros(shape[:-1], jnp.float32),
            jnp.zeros(shape, jnp.float32))


def _softmax_update(carry, logits, weighted_values):
    """Folds logits [..., L] into (running max, denominator, accumulator); `weighted_values(p)`
    returns p @ values for the unnormalised probabilities p."""
    running_max, denom, acc = carry
    new_max = jnp.maximum(running_max, logits.max(axis=-1))
    safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
    probs = jnp.exp(logits - safe_max[..., None])
    rescale = jnp.exp(running_max - safe_max)
    denom = denom * rescale + probs.sum(axis=-1)
    acc = acc * rescale[..., None] + weighted_values(probs)
    return new_max, denom, acc


def _softmax_finish(carry, sinks=None):
    """The normalised output; `sinks` [Hkv, G] (broadcast over the leading axes) join the
    denominator: both sides are rescaled to max(running max, sink), so nothing overflows, and a
    row without keys gets 0 / e^0 = 0."""
    running_max, denom, acc = carry
    if sinks is not None:
        new_max = jnp.maximum(running_max, sinks)
        safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
        rescale = jnp.exp(running_max - safe_max)
        denom = denom * rescale + jnp.exp(sinks - safe_max)
        acc = acc * rescale[..., None]
    return acc / jnp.where(denom > 0, denom, 1.0)[..., None]


def decode_chunks(block_tables, block_size: int, chunk_keys: int):
    """How single-query rows visit their keys together: (block tables padded to whole chunks,
    blocks per chunk, keys per chunk, chunks), a chunk holding about `chunk_keys` keys over all
    rows, at least one block of each."""
    num_rows, width = block_tables.shape
    chunk_blocks = max(1, min(width, max(block_size, chunk_keys // num_rows) // block_size))
    num_chunks = math.ceil(width / chunk_blocks)
    tables = jnp.pad(block_tables, ((0, 0), (0, num_chunks * chunk_blocks - width)))
    return tables, chunk_blocks, chunk_blocks * block_size, num_chunks


def _single_query_rows(keys, query, kv_lens, active, block_tables, sinks):
    """query [R, Hkv, G, D], one per row at position kv_len - 1; rows not `active` see no key
    and return zeros.

    Written as multiply-and-reduce: on XLA:CPU that ran 1.5 ms per layer against 2.3 ms for the
    einsum form (32 rows, contexts 150-300). Sorting rows by length and visiting groups of
    similar length gained nothing measurable at that spread. On the 2-core CPU (bf16 cache,
    tools/decode_attention_bench.py) a batched dot_general over a block-diagonal query, bf16
    K/V without the float32 copy, and picking the chunk size at run time (`lax.switch`: the
    long branch ran slower inside the conditional) were no faster."""
    num_rows = block_tables.shape[0]
    chunk_keys = min(_DECODE_CHUNK_KEYS, _DECODE_ROW_KEYS * num_rows)
    tables, chunk_blocks, chunk, num_chunks = decode_chunks(block_tables, keys.block_size, chunk_keys)
    seq_lens = jnp.where(active, kv_lens, 0)

    def visit(c, carry):
        ids = lax.dynamic_slice_in_dim(tables, c * chunk_blocks, chunk_blocks, axis=1)
        k, v = keys.gather(ids)  # [R, L, Hkv, D]
        logits = jnp.sum(query[:, None] * k[:, :, :, None, :], axis=-1).transpose(0, 2, 3, 1)
        logits, v = keys.mask(logits, v, c * chunk + jnp.arange(chunk), seq_lens - 1, seq_lens)
        pv = lambda p: jnp.sum(p.transpose(0, 3, 1, 2)[..., None] * v[:, :, :, None, :], axis=1)
        return _softmax_update(carry, logits, pv)

    needed = jnp.minimum((jnp.max(seq_lens) + chunk - 1) // chunk, num_chunks)
    return _softmax_finish(lax.fori_loop(0, needed, visit, _softmax_init(query.shape)), sinks)


def _multi_query_rows(keys, query, out, kv_lens, q_lens, cu_q_lens, block_tables, sinks,
                      tile_queries: int = _TILE_QUERIES):
    """Writes into `out` the attention of every row with q_lens > 0, one tile of `tile_queries`
    queries at a time (a dynamic number of tiles: only the tiles that exist are visited)."""
    num_kv_heads, group, head_dim = query.shape[1:]
    tile_blocks = max(1, _TILE_KEYS // keys.block_size)
    tile_keys = tile_blocks * keys.block_size
    tables = jnp.pad(block_tables, ((0, 0), (0, tile_blocks)))
    query = jnp.pad(query, ((0, tile_queries), (0, 0), (0, 0), (0, 0)))
    tiles = -(-q_lens // tile_queries)
    tile_ends = jnp.cumsum(tiles)

    def visit_tile(i, out):
        row = jnp.sum(tile_ends <= i)  # a compare-and-sum compiles smaller than searchsorted
        offset = (i - tile_ends[row] + tiles[row]) * tile_queries
        start = cu_q_lens[row] + offset
        num_valid = jnp.minimum(tile_queries, q_lens[row] - offset)
        q_tile = lax.dynamic_slice_in_dim(query, start, tile_queries)  # [Q, Hkv, G, D]
        q_heads = q_tile.transpose(1, 2, 0, 3).reshape(num_kv_heads, group * tile_queries, head_dim)
        q_pos = kv_lens[row] - q_lens[row] + offset + jnp.arange(tile_queries)
        lowest = 0 if keys.sliding_window is None else jnp.maximum(0, q_pos[0] - keys.sliding_window + 1)

        def visit_keys(c, carry):
            ids = lax.dynamic_slice_in_dim(tables[row], c * tile_blocks, tile_blocks)
            k, v = keys.gather(ids)  # [L, Hkv, D]
            logits = jnp.einsum("kqd,lkd->kql", q_heads, k)
            logits = logits.reshape(num_kv_heads, group, tile_queries, tile_keys).transpose(2, 0, 1, 3)
            logits, v = keys.mask(logits, v, c * tile_keys + jnp.arange(tile_keys), q_pos, kv_lens[row])
            return _softmax_update(carry, logits, lambda p: jnp.einsum("qkgl,lkd->qkgd", p, v))

        first_chunk = lowest // tile_keys
        last_chunk = (q_pos[0] + num_valid + tile_keys - 1) // tile_keys
        carry = lax.fori_loop(first_chunk, last_chunk, visit_keys, _softmax_init(q_tile.shape))
        written = (jnp.arange(tile_queries) < num_valid)[:, None, None, None]
        previous = lax.dynamic_slice_in_dim(out, start, tile_queries)
        tile_out = jnp.where(written, _softmax_finish(carry, sinks), previous)
        return lax.dynamic_update_slice_in_dim(out, tile_out, start, 0)

    return lax.fori_loop(0, tile_ends[-1], visit_tile, out)
