"""MLA (DeepSeek multi-head latent attention) over a paged latent cache, in the absorbed form.

Every token of a layer caches one latent row `[c_kv (kv_lora_rank L), k_rope (rope_dim R)]`; the
cache is `[num_blocks, block_size, L + R]`. The model folds each head's no-rope query into the
latent space (q_nope_h @ W_UK_h) and appends the roped part, so the query is `[T, H, L + R]`, and
per head: logits = q_h . row (all L + R columns), softmax, out_h = p . row[:L]. The model maps
out_h back through W_UV_h. All heads share every row: it is multi-query attention with one "KV
head" of width L + R whose value is its first L columns.

The batch layout is that of `paged_attention.ragged_paged_attention`: sequence s owns query rows
`cu_q_lens[s]:cu_q_lens[s+1]`, its cache (this step's rows already written) is `kv_lens[s]` long
in the blocks `block_tables[s]`, queries attend causally, rows past `cu_q_lens[num_seqs]` are
padding and come out zero.

This file holds the cache write, the pure-JAX reference (also the CPU production path) and the
dispatch to a kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.dispatch import choose_mla_kernel
from pallas_kernels.interpret import interpreting
from pallas_kernels.kv_cache import quantize_kv
from pallas_kernels.paged_attention import _softmax_finish, _softmax_init, _softmax_update, decode_chunks

# Sizes of the reference's two passes, measured on the 2-core CPU with DeepSeek-V2-Lite's MLA
# (16 heads, 512 + 64 latent): a decode chunk gathers ~1024 latent rows over all decoding sequences
# (2.4 MB in float32; 512 to 2048 ran within 10%, 256 and 4096 up to 3x slower). A prefill tile
# holds up to 64 queries and at most _TILE_ROWS query-head pairs: a 512-token prefill ran 83 ms
# (16 heads) and 750 ms (128 heads) at 2048 rows against 105 ms and 1150 ms at 512.
_DECODE_CHUNK_KEYS = 1024
_TILE_ROWS = 2048
_TILE_QUERIES = 64
_TILE_KEYS = 128


def write_latent_cache(
    cache: jax.Array, latent: jax.Array, slot_mapping: jax.Array, scale: jax.Array | float | None = None
) -> jax.Array:
    """Scatter `latent` [T, L + R] into `cache` [num_blocks, block_size, L + R] at `slot_mapping`
    [T] (block_id * block_size + offset; padding tokens point into block 0, the null block).

    scale: the per-layer float32 scale of an fp8 cache (stored = latent / scale, clipped to the
    fp8 range) or None. Donate `cache` to the caller's jit: the scatter then updates it in place."""
    num_blocks, block_size, width = cache.shape
    if latent.ndim != 2 or latent.shape[1] != width:
        raise ValueError(f"latent must be [T, {width}] to match the cache, got {latent.shape}")
    rows = quantize_kv(latent, 1.0 if scale is None else scale, cache.dtype)
    flat = cache.reshape(num_blocks * block_size, width).at[slot_mapping].set(rows, mode="drop")
    return flat.reshape(num_blocks, block_size, width)


def mla_paged_attention(
    q: jax.Array,
    latent_cache: jax.Array,
    kv_lens: jax.Array,
    block_tables: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    kv_lora_rank: int,
    sm_scale: float,
    scale: jax.Array | float | None = None,
    backend: str = "auto",
    interpret: bool = False,
) -> jax.Array:
    """Absorbed MLA of `q` [T, H, L + R] over the paged latent cache; returns [T, H, L] in q.dtype.

    scale: the fp8 cache's per-layer scale (None for a bf16 / f32 cache). backend: one of
    dispatch.BACKENDS, chosen as for attention (pallas_kernels/dispatch.py). `interpret=True` (or
    `interpret_mode()`) runs a Pallas kernel in interpret mode on CPU."""
    interpret = interpret or interpreting()
    choice = choose_mla_kernel(
        backend, num_heads=q.shape[1], kv_lora_rank=kv_lora_rank, rope_dim=q.shape[2] - kv_lora_rank,
        block_size=latent_cache.shape[1], q_dtype=q.dtype, cache_dtype=latent_cache.dtype)
    args = (q, latent_cache, kv_lens, block_tables, cu_q_lens, num_seqs)
    options = dict(kv_lora_rank=kv_lora_rank, sm_scale=sm_scale, scale=scale)
    if choice.backend == "triton":
        from pallas_kernels.triton_mla_attention import mla_paged_attention_triton

        return mla_paged_attention_triton(*args, **options, interpret=interpret)
    return mla_paged_attention_reference(*args, **options)


# Jitted on its own, as the attention reference (pallas_kernels/paged_attention.py): traced once
# per program, not once per layer.
@functools.partial(jax.jit, static_argnames=("kv_lora_rank", "sm_scale"))
def mla_paged_attention_reference(
    q, latent_cache, kv_lens, block_tables, cu_q_lens, num_seqs, *, kv_lora_rank, sm_scale, scale=None,
):
    """Pure-JAX reference with the kernel's signature; float32 inside.

    Two passes, each reading a sequence's rows only through its own block table, with an online
    softmax over chunks of rows (memory stays bounded for long contexts):
    - sequences with one query (decodes) run together, each gathering its own rows, as far as the
      longest of them reaches;
    - sequences with several queries (prefill chunks) run one tile of queries at a time; a tile
      gathers its sequence's rows once for all its queries and heads, up to its last query.
    An fp8 cache's scale is folded into the query and the output, not applied to every row read."""
    num_tokens, num_heads, width = q.shape
    if latent_cache.shape[2] != width or not 0 < kv_lora_rank <= width:
        raise ValueError(f"q [T, H, {width}] and latent_cache {latent_cache.shape} must share the row width "
                         f"L + R, with 0 < kv_lora_rank ({kv_lora_rank}) <= it")
    row_scale = 1.0 if scale is None else jnp.asarray(scale, jnp.float32)
    query = q.astype(jnp.float32) * (sm_scale * row_scale)
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    live = jnp.arange(block_tables.shape[0]) < num_seqs
    tile_queries = max(1, min(_TILE_QUERIES, _TILE_ROWS // num_heads))

    # Outputs carry tile_queries spare rows so that a tile never needs clipping at the end.
    out = jnp.zeros((num_tokens + tile_queries, num_heads, kv_lora_rank), jnp.float32)
    single = live & (q_lens == 1)
    first = jnp.minimum(cu_q_lens[:-1], num_tokens - 1)
    decoded = _single_query_rows(latent_cache, query[first], kv_lens, single, block_tables, kv_lora_rank)
    out = out.at[jnp.where(single, first, out.shape[0])].set(decoded, mode="drop")
    if num_tokens > 1:  # else no row can hold several queries: the pass is left out of the program
        out = _multi_query_rows(latent_cache, query, out, kv_lens, jnp.where(live & (q_lens > 1), q_lens, 0),
                                cu_q_lens, block_tables, tile_queries)
    return (out[:num_tokens] * row_scale).astype(q.dtype)


def _gather(cache, block_ids, written):
    """block_ids [..., n] -> rows [..., n * block_size, L + R] in float32, zero where not
    `written` [..., n * block_size]: stale slots may hold NaN, and 0 * NaN is NaN."""
    rows = cache[block_ids].reshape(written.shape + cache.shape[2:]).astype(jnp.float32)
    return jnp.where(written[..., None], rows, 0.0)


def _single_query_rows(cache, query, kv_lens, active, block_tables, kv_lora_rank):
    """query [R, H, L + R], one per sequence at position kv_len - 1; sequences not `active` see no
    row and return zeros [R, H, L]."""
    tables, chunk_blocks, chunk, num_chunks = decode_chunks(block_tables, cache.shape[1], _DECODE_CHUNK_KEYS)
    seq_lens = jnp.where(active, kv_lens, 0)

    def visit(c, carry):
        ids = lax.dynamic_slice_in_dim(tables, c * chunk_blocks, chunk_blocks, axis=1)
        written = c * chunk + jnp.arange(chunk) < seq_lens[:, None]
        rows = _gather(cache, ids, written)  # [R, n, L + R]
        logits = jnp.einsum("rhd,rnd->rhn", query, rows)
        logits = jnp.where(written[:, None, :], logits, -jnp.inf)
        return _softmax_update(carry, logits, lambda p: jnp.einsum("rhn,rnl->rhl", p, rows[..., :kv_lora_rank]))

    init = _softmax_init(query.shape[:2] + (kv_lora_rank,))
    needed = jnp.minimum((jnp.max(seq_lens) + chunk - 1) // chunk, num_chunks)
    return _softmax_finish(lax.fori_loop(0, needed, visit, init))


def _multi_query_rows(cache, query, out, kv_lens, q_lens, cu_q_lens, block_tables, tile_queries):
    """Writes into `out` the attention of every sequence with q_lens > 0, one tile of
    `tile_queries` queries at a time (only the tiles that exist are visited)."""
    num_heads, kv_lora_rank = out.shape[1:]
    tile_blocks = max(1, _TILE_KEYS // cache.shape[1])
    tile_keys = tile_blocks * cache.shape[1]
    tables = jnp.pad(block_tables, ((0, 0), (0, tile_blocks)))
    query = jnp.pad(query, ((0, tile_queries), (0, 0), (0, 0)))
    tiles = -(-q_lens // tile_queries)
    tile_ends = jnp.cumsum(tiles)

    def visit_tile(i, out):
        row = jnp.sum(tile_ends <= i)  # a compare-and-sum compiles smaller than searchsorted
        offset = (i - tile_ends[row] + tiles[row]) * tile_queries
        start = cu_q_lens[row] + offset
        num_valid = jnp.minimum(tile_queries, q_lens[row] - offset)
        q_tile = lax.dynamic_slice_in_dim(query, start, tile_queries)  # [Q, H, L + R]
        q_pos = kv_lens[row] - q_lens[row] + offset + jnp.arange(tile_queries)

        def visit_keys(c, carry):
            ids = lax.dynamic_slice_in_dim(tables[row], c * tile_blocks, tile_blocks)
            key_pos = c * tile_keys + jnp.arange(tile_keys)
            rows = _gather(cache, ids, key_pos < kv_lens[row])  # [K, L + R]
            logits = jnp.einsum("qhd,kd->qhk", q_tile, rows)
            logits = jnp.where((key_pos[None, :] <= q_pos[:, None])[:, None, :], logits, -jnp.inf)
            return _softmax_update(carry, logits, lambda p: jnp.einsum("qhk,kl->qhl", p, rows[:, :kv_lora_rank]))

        last_chunk = (q_pos[0] + num_valid + tile_keys - 1) // tile_keys
        carry = lax.fori_loop(0, last_chunk, visit_keys, _softmax_init((tile_queries, num_heads, kv_lora_rank)))
        written = (jnp.arange(tile_queries) < num_valid)[:, None, None]
        previous = lax.dynamic_slice_in_dim(out, start, tile_queries)
        return lax.dynamic_update_slice_in_dim(out, jnp.where(written, _softmax_finish(carry), previous), start, 0)

    return lax.fori_loop(0, tile_ends[-1], visit_tile, out)
