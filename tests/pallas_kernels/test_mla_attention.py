"""MLA (absorbed latent attention) reference against a naive numpy MLA over expanded per-head K/V,
the latent cache write, and the MLA dispatch."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.benchmarks.kernel_check import make_batch
from pallas_kernels import (
    FP8_DTYPE,
    choose_mla_kernel,
    mla_paged_attention,
    mla_paged_attention_reference,
    quantize_kv,
    ragged_paged_attention_reference,
    write_latent_cache,
)

# Small DeepSeek-like sizes: latent rank L, rope dim R, per-head no-rope query and value dims.
RANK, ROPE, NOPE, VALUE = 64, 32, 32, 24
# (q_lens, kv_lens): decodes, prefill chunks, a chunk continuing a prefix, lengths 1 and at block
# boundaries (16, 17, 32, 33, and 4-key pages crossed many times).
MIXED = ([1, 1, 1, 9, 17, 5, 1, 2], [1, 16, 17, 9, 40, 33, 32, 70])
VALID = sum(MIXED[0])


def make_mla_batch(rng, q_lens, kv_lens, *, num_heads, block_size, pad_rows=2, pad_tokens=3, width=None):
    """A ragged batch with a latent cache [N, bs, L + R] and expansion weights W_UK [L, H, nope],
    W_UV [L, H, v]; q [T, H, nope + R] is the model's per-head query (no-rope part, roped part)."""
    q, cache, _, lens, tables, cu = make_batch(rng, q_lens, kv_lens, num_kv_heads=1, group=num_heads,
                                               head_dim=RANK + ROPE, block_size=block_size, width=width,
                                               pad_rows=pad_rows, pad_tokens=pad_tokens)
    q = np.concatenate([q[..., :NOPE], q[..., RANK:]], axis=-1)
    w_uk = rng.standard_normal((RANK, num_heads, NOPE)).astype(np.float32) / np.sqrt(RANK)
    w_uv = rng.standard_normal((RANK, num_heads, VALUE)).astype(np.float32) / np.sqrt(RANK)
    return q, cache[:, :, 0], lens, tables, cu, w_uk, w_uv


def absorbed_query(q, w_uk):
    """[T, H, nope + R] -> [T, H, L + R]: q_nope_h @ W_UK_h^T, then the roped part."""
    latent = np.einsum("thd,lhd->thl", q[..., :NOPE], w_uk)
    return np.concatenate([latent, q[..., NOPE:]], axis=-1).astype(np.float32)


def naive_expanded_mla(q, cache, lens, tables, cu, num_seqs, w_uk, w_uv, *, sm_scale):
    """Float64 attention over explicit per-head keys k_h = [c_kv @ W_UK_h, k_rope] and values
    v_h = c_kv @ W_UV_h, one sequence at a time; returns [T, H, v]."""
    out = np.zeros(q.shape[:2] + (VALUE,), np.float64)
    block_size = cache.shape[1]
    for s in range(num_seqs):
        kv_len = lens[s]
        rows = cache[tables[s, :-(-kv_len // block_size)]].reshape(-1, RANK + ROPE)[:kv_len].astype(np.float64)
        c_kv, k_rope = rows[:, :RANK], rows[:, RANK:]
        keys = np.concatenate([np.einsum("nl,lhd->nhd", c_kv, w_uk),
                               np.broadcast_to(k_rope[:, None], (kv_len, q.shape[1], ROPE))], axis=-1)
        values = np.einsum("nl,lhv->nhv", c_kv, w_uv)
        tokens = np.arange(cu[s], cu[s + 1])
        logits = np.einsum("thd,nhd->thn", q[tokens].astype(np.float64), keys) * sm_scale
        q_pos = kv_len - len(tokens) + np.arange(len(tokens))
        logits = np.where((np.arange(kv_len)[None, :] <= q_pos[:, None])[:, None], logits, -np.inf)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        out[tokens] = np.einsum("thn,nhv->thv", probs / probs.sum(-1, keepdims=True), values)
    return out


def run_absorbed(q, cache, lens, tables, cu, num_seqs, w_uk, w_uv, *, scale=None, **options):
    """The kernel on the absorbed query, mapped back through W_UV: [T, H, v] float64, and [T, H, L]."""
    latent_out = mla_paged_attention(
        jnp.asarray(absorbed_query(q, w_uk)), jnp.asarray(cache), *map(jnp.asarray, (lens, tables, cu)),
        jnp.int32(num_seqs), kv_lora_rank=RANK, sm_scale=(NOPE + ROPE) ** -0.5, scale=scale, **options)
    latent_out = np.asarray(latent_out.astype(jnp.float32), np.float64)
    return np.einsum("thl,lhv->thv", latent_out, w_uv), latent_out


def rel_err(out, ref):
    return float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))


def check_against_expanded(rng, q_lens, kv_lens, *, num_heads, block_size, tolerance=1e-5, width=None):
    q, cache, lens, tables, cu, w_uk, w_uv = make_mla_batch(rng, q_lens, kv_lens, num_heads=num_heads,
                                                            block_size=block_size, width=width)
    out, latent_out = run_absorbed(q, cache, lens, tables, cu, len(q_lens), w_uk, w_uv, backend="reference")
    ref = naive_expanded_mla(q, cache, lens, tables, cu, len(q_lens), w_uk, w_uv, sm_scale=(NOPE + ROPE) ** -0.5)
    valid = sum(q_lens)
    # float32 over <= 70 keys and a 64-wide latent dot against float64: 1e-5 is ~100 ulps.
    assert rel_err(out[:valid], ref[:valid]) < tolerance
    assert not np.any(latent_out[valid:]), "padding rows must be zero"


@pytest.mark.parametrize("block_size", [16, 4])
@pytest.mark.parametrize("num_heads", [1, 8])
def test_reference_matches_expanded_mla(block_size, num_heads):
    check_against_expanded(np.random.default_rng(block_size * 10 + num_heads), *MIXED, num_heads=num_heads,
                           block_size=block_size)


def test_reference_many_chunks_and_tiles(monkeypatch):
    """One page per decode chunk and key tile, and 2-query tiles: the online softmax runs over many
    chunks, prefill rows split into several tiles (the last one partial)."""
    import pallas_kernels.mla_attention as mla

    monkeypatch.setattr(mla, "_DECODE_CHUNK_KEYS", 1)
    monkeypatch.setattr(mla, "_TILE_KEYS", 1)
    monkeypatch.setattr(mla, "_TILE_ROWS", 8)  # 2 queries of 4 heads
    check_against_expanded(np.random.default_rng(3), [1, 7, 1, 2], [150, 61, 33, 2], num_heads=4,
                           block_size=8, width=24)


def test_reference_ignores_nan_past_sequence_end():
    """Stale slots past kv_len and the null block (here NaN, as a poisoned freed block) must not
    reach the output."""
    rng = np.random.default_rng(13)
    q, cache, lens, tables, cu, w_uk, w_uv = make_mla_batch(rng, *MIXED, num_heads=4, block_size=16)
    ref = naive_expanded_mla(q, cache, lens, tables, cu, 8, w_uk, w_uv, sm_scale=(NOPE + ROPE) ** -0.5)
    for s, kv_len in enumerate(lens):
        for pos in range(kv_len, tables.shape[1] * 16):
            cache[tables[s, pos // 16], pos % 16] = np.nan
    cache[0] = np.nan
    out, latent_out = run_absorbed(q, cache, lens, tables, cu, 8, w_uk, w_uv)
    assert np.all(np.isfinite(latent_out))
    assert rel_err(out[:VALID], ref[:VALID]) < 1e-5


@pytest.mark.parametrize("cache_dtype,scale,tolerance", [(jnp.bfloat16, None, 2e-2), (FP8_DTYPE, 0.05, 1e-1)])
def test_reference_low_precision_cache(cache_dtype, scale, tolerance):
    """The cache is written through write_latent_cache (fp8: divided by the scale and clipped);
    against the naive MLA on the dequantized rows (tight) and on the float32 rows (loose: bf16
    keeps 8 mantissa bits, e4m3 3)."""
    rng = np.random.default_rng(11)
    q, cache, lens, tables, cu, w_uk, w_uv = make_mla_batch(rng, *MIXED, num_heads=4, block_size=16)
    slots = np.arange(cache.shape[0] * 16)
    stored = write_latent_cache(jnp.zeros(cache.shape, cache_dtype), jnp.asarray(cache.reshape(-1, RANK + ROPE)),
                                jnp.asarray(slots), scale)
    dequantized = np.asarray(stored.astype(jnp.float32)) * (scale or 1.0)
    out, _ = run_absorbed(q, stored, lens, tables, cu, 8, w_uk, w_uv, scale=scale)
    sm_scale = (NOPE + ROPE) ** -0.5
    assert rel_err(out[:VALID], naive_expanded_mla(q, dequantized, lens, tables, cu, 8, w_uk, w_uv,
                                                sm_scale=sm_scale)[:VALID]) < 1e-5
    assert rel_err(out[:VALID], naive_expanded_mla(q, cache, lens, tables, cu, 8, w_uk, w_uv,
                                                sm_scale=sm_scale)[:VALID]) < tolerance


def test_reference_is_mqa_with_one_latent_head():
    """The same batch through the ragged attention reference, with the latent row as the only KV
    head and its first L columns as the value: equal outputs, in bf16 q too (output dtype kept)."""
    rng = np.random.default_rng(5)
    q, cache, lens, tables, cu, w_uk, _ = make_mla_batch(rng, *MIXED, num_heads=4, block_size=16)
    batch = (jnp.asarray(absorbed_query(q, w_uk), jnp.bfloat16), jnp.asarray(cache), *map(jnp.asarray, (lens, tables, cu)),
             jnp.int32(8))
    out = mla_paged_attention_reference(*batch, kv_lora_rank=RANK, sm_scale=0.1)
    values = jnp.asarray(cache).at[..., RANK:].set(0.0)[:, :, None]
    mqa = ragged_paged_attention_reference(batch[0], batch[1][:, :, None], values, *batch[2:], sm_scale=0.1)
    assert out.dtype == jnp.bfloat16 and out.shape == (VALID + 3, 4, RANK)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(mqa[..., :RANK]))


def test_write_latent_cache_scatters_at_slots_and_padding_hits_the_null_block():
    rng = np.random.default_rng(5)
    cache = jnp.asarray(rng.standard_normal((6, 4, 20)).astype(np.float32))
    latent = jnp.asarray(rng.standard_normal((3, 20)).astype(np.float32))
    slots = jnp.asarray([4 * 3 + 1, 4 * 5 + 3, 2])  # block 3 offset 1, block 5 offset 3, padding
    new = np.asarray(write_latent_cache(cache, latent, slots))
    np.testing.assert_array_equal(new[3, 1], latent[0])
    np.testing.assert_array_equal(new[5, 3], latent[1])
    np.testing.assert_array_equal(new[0, 2], latent[2])
    untouched = np.ones((6, 4), bool)
    untouched[3, 1] = untouched[5, 3] = untouched[0, 2] = False
    np.testing.assert_array_equal(new[untouched], np.asarray(cache)[untouched])
    with pytest.raises(ValueError, match=r"latent must be \[T, 20\]"):
        write_latent_cache(cache, latent[:, :16], slots)


def test_write_latent_cache_fp8_divides_by_the_scale_and_clips():
    cache = jnp.zeros((2, 4, 4), FP8_DTYPE)
    latent = jnp.asarray([[1.0, -2.0, 1e3, -1e6], [0.5, 0.25, 4.0, 300.0]])
    new = write_latent_cache(cache, latent, jnp.asarray([5, 6]), jnp.float32(2.0)).astype(jnp.float32)
    np.testing.assert_array_equal(np.asarray(new[1, 1]), [0.5, -1.0, 448.0, -448.0])  # 500 would be NaN
    np.testing.assert_array_equal(np.asarray(new[1, 2]), quantize_kv(latent[1], 2.0, FP8_DTYPE).astype(jnp.float32))
    assert not np.any(np.asarray(new[0]))


DEEPSEEK = dict(num_heads=128, kv_lora_rank=512, rope_dim=64, block_size=64, q_dtype=jnp.bfloat16,
                cache_dtype=jnp.bfloat16)


def test_dispatch_takes_the_reference_on_cpu_and_names_missing_kernels():
    choice = choose_mla_kernel("auto", **DEEPSEEK)
    assert choice.backend == "reference" and "no GPU" in choice.reason
    assert choose_mla_kernel("reference", **DEEPSEEK, capability=(9, 0), platform="gpu").reason == "requested"
    with pytest.raises(ValueError, match="attention_backend='mosaic' cannot run this model: no Mosaic GPU MLA"):
        choose_mla_kernel("mosaic", **DEEPSEEK, capability=(9, 0), platform="gpu")
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        choose_mla_kernel("flash", **DEEPSEEK)
