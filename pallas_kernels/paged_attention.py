"""Ragged paged attention: one call for a flat batch mixing prefill chunks and decodes.

Layout (DESIGN.md, "Model runner"): `q` [T, Hq, D] holds the new tokens of every sequence back to
back; sequence s owns rows `cu_q_lens[s]:cu_q_lens[s+1]`, its KV (already written, this step's
tokens included) is `kv_lens[s]` long and lives in the blocks `block_tables[s]`. Query j of
sequence s sits at position `kv_lens[s] - q_len_s + j` and attends causally. Rows past
`cu_q_lens[num_seqs]` are padding; their output is zero.

This file holds the pure-JAX reference, which is also the CPU production path, and the dispatch
that picks a backend.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.kv_cache import dequantize_kv

BACKENDS = ("auto", "reference", "pallas")

# Keys visited per online-softmax chunk, times the number of query tokens. Each token gathers its
# own sequence's keys, so a chunk's working set is [T, keys, Hkv, D]: small chunks keep it in
# cache. Measured on a 2-core CPU (SmolLM2 heads): 64 keys best for a 32-token decode, 16-32 for
# 256-token prefills; larger chunks were up to 10x slower.
_CHUNK_TOKEN_KEYS = 2048


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
    backend: str = "auto",
    interpret: bool = False,
) -> jax.Array:
    """Attention of `q` over the paged caches; returns [T, Hq, D] in `q.dtype`.

    backend: "reference" (pure JAX), "pallas" (the Triton-lowered kernel in
    triton_paged_attention.py; `interpret=True` runs it on CPU), or "auto" (Pallas on GPU/TPU,
    the reference on CPU).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":  # the kernel wants power-of-two block_size and head_dim >= 16
        block_size, head_dim = k_cache.shape[1], k_cache.shape[3]
        fits = all(n >= 16 and n & (n - 1) == 0 for n in (block_size, head_dim))
        backend = "pallas" if fits and jax.default_backend() != "cpu" else "reference"
    if backend == "pallas":
        from pallas_kernels.triton_paged_attention import ragged_paged_attention_triton

        return ragged_paged_attention_triton(
            q, k_cache, v_cache, kv_lens, block_tables, cu_q_lens, num_seqs,
            sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
            k_scale=k_scale, v_scale=v_scale, interpret=interpret,
        )
    return ragged_paged_attention_reference(
        q, k_cache, v_cache, kv_lens, block_tables, cu_q_lens, num_seqs,
        sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
        k_scale=k_scale, v_scale=v_scale,
    )


def ragged_paged_attention_reference(
    q, k_cache, v_cache, kv_lens, block_tables, cu_q_lens, num_seqs, *,
    sm_scale, sliding_window=None, soft_cap=None, k_scale=None, v_scale=None,
):
    """Pure-JAX reference with the same signature as the kernel.

    Each token gathers the blocks of its own sequence's table, so it can only ever read blocks
    its sequence holds. Keys are visited in chunks with an online softmax, which bounds memory
    for long prefills; a decode batch usually fits in one chunk.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    max_seqs, width = block_tables.shape
    group = num_q_heads // num_kv_heads

    token = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(cu_q_lens[1:], token, side="right"), max_seqs - 1)
    valid = token < cu_q_lens[num_seqs]
    q_start = cu_q_lens[seq]
    q_len = cu_q_lens[seq + 1] - q_start
    seq_len = kv_lens[seq]
    q_pos = seq_len - q_len + (token - q_start)  # [T]
    tables = block_tables[seq]  # [T, W]

    chunk_blocks = _chunk_blocks(num_tokens, width, block_size)
    num_chunks = math.ceil(width / chunk_blocks)
    tables = jnp.pad(tables, ((0, 0), (0, num_chunks * chunk_blocks - width)))
    query = q.astype(jnp.float32).reshape(num_tokens, num_kv_heads, group, head_dim) * sm_scale

    def visit_chunk(carry, chunk):
        running_max, denom, acc = carry
        ids = lax.dynamic_slice_in_dim(tables, chunk * chunk_blocks, chunk_blocks, axis=1)
        keys = _gather(k_cache, ids, k_scale)  # [T, C*bs, Hkv, D]
        values = _gather(v_cache, ids, v_scale)
        logits = jnp.einsum("tkgd,tlkd->tkgl", query, keys)
        if soft_cap is not None:
            logits = soft_cap * jnp.tanh(logits / soft_cap)
        key_pos = chunk * chunk_blocks * block_size + jnp.arange(chunk_blocks * block_size)
        # Slots past a sequence's length hold stale data (possibly NaN): 0 * NaN would leak.
        values = jnp.where((key_pos[None, :] < seq_len[:, None])[..., None, None], values, 0.0)
        visible = key_pos[None, :] <= q_pos[:, None]
        if sliding_window is not None:
            visible &= key_pos[None, :] > q_pos[:, None] - sliding_window
        logits = jnp.where(visible[:, None, None, :], logits, -jnp.inf)
        new_max = jnp.maximum(running_max, logits.max(axis=-1))
        safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
        probs = jnp.exp(logits - safe_max[..., None])
        rescale = jnp.exp(running_max - safe_max)
        denom = denom * rescale + probs.sum(axis=-1)
        acc = acc * rescale[..., None] + jnp.einsum("tkgl,tlkd->tkgd", probs, values)
        return (new_max, denom, acc), None

    init = (
        jnp.full((num_tokens, num_kv_heads, group), -jnp.inf, jnp.float32),
        jnp.zeros((num_tokens, num_kv_heads, group), jnp.float32),
        jnp.zeros((num_tokens, num_kv_heads, group, head_dim), jnp.float32),
    )
    if num_chunks == 1:
        (_, denom, acc), _ = visit_chunk(init, 0)
    else:
        # Visit only the chunks the longest sequence reaches: the trip count is dynamic, so a
        # wide block table (long max_model_len) costs nothing for short sequences.
        longest = jnp.max(jnp.where(jnp.arange(max_seqs) < num_seqs, kv_lens, 0))
        needed = jnp.minimum((longest + chunk_blocks * block_size - 1) // (chunk_blocks * block_size), num_chunks)
        _, denom, acc = lax.fori_loop(0, needed, lambda c, carry: visit_chunk(carry, c)[0], init)
    out = acc / jnp.where(denom > 0, denom, 1.0)[..., None]
    out = jnp.where(valid[:, None, None, None], out, 0.0)
    return out.reshape(num_tokens, num_q_heads, head_dim).astype(q.dtype)


def _chunk_blocks(num_tokens: int, width: int, block_size: int) -> int:
    keys = max(block_size, _CHUNK_TOKEN_KEYS // max(1, num_tokens))
    return max(1, min(width, keys // block_size))


def _gather(cache, block_ids, scale):
    num_tokens, num_blocks = block_ids.shape
    _, block_size, num_kv_heads, head_dim = cache.shape
    rows = cache[block_ids].reshape(num_tokens, num_blocks * block_size, num_kv_heads, head_dim)
    return dequantize_kv(rows, scale, jnp.float32)
