"""The ragged paged attention reference against a naive dense numpy attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.benchmarks.kernel_check import make_batch
from pallas_kernels import FP8_DTYPE, quantize_kv, ragged_paged_attention, write_kv_cache


def naive_attention(q, k_cache, v_cache, kv_lens, tables, cu, num_seqs, *, sm_scale,
                    sliding_window=None, soft_cap=None, sinks=None):
    """Dense per-sequence attention in float64 numpy; `sinks` [Hq] join each row's denominator."""
    out = np.zeros(q.shape, np.float64)
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // num_kv_heads
    for s in range(num_seqs):
        kv_len = kv_lens[s]
        n_blocks = -(-kv_len // block_size)
        keys = k_cache[tables[s, :n_blocks]].reshape(-1, num_kv_heads, q.shape[2])[:kv_len]
        values = v_cache[tables[s, :n_blocks]].reshape(-1, num_kv_heads, q.shape[2])[:kv_len]
        keys = np.repeat(keys.astype(np.float64), group, axis=1)
        values = np.repeat(values.astype(np.float64), group, axis=1)
        rows = np.arange(cu[s], cu[s + 1])
        q_pos = kv_len - len(rows) + np.arange(len(rows))
        logits = np.einsum("thd,lhd->thl", q[rows].astype(np.float64), keys) * sm_scale
        if soft_cap is not None:
            logits = soft_cap * np.tanh(logits / soft_cap)
        key_pos = np.arange(kv_len)
        mask = key_pos[None, :] <= q_pos[:, None]
        if sliding_window is not None:
            mask &= key_pos[None, :] > q_pos[:, None] - sliding_window
        logits = np.where(mask[:, None, :], logits, -np.inf)
        if sinks is not None:  # one more logit per head that attends to nothing
            sink = np.broadcast_to(np.asarray(sinks, np.float64)[None, :, None], (len(rows), q.shape[1], 1))
            logits = np.concatenate([logits, sink], axis=-1)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        probs = probs[..., :kv_len]
        out[rows] = np.einsum("thl,lhd->thd", probs, values)
    return out


def rel_err(out, ref):
    return float(np.max(np.abs(np.asarray(out, np.float64) - ref)) / np.max(np.abs(ref)))


BLOCK = 8
# (q_lens, kv_lens): decodes, prefill chunks, a chunk continuing a prefix, block boundaries ±1.
MIXED = ([1, 1, 1, 9, 17, 5, 1], [1, 8, 9, 9, 40, 23, 7])
LONG = ([3, 70], [300, 70])


@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_reference_matches_naive_gqa(group, head_dim):
    rng = np.random.default_rng(group * 1000 + head_dim)
    q_lens, kv_lens = MIXED
    batch = make_batch(rng, q_lens, kv_lens, num_kv_heads=2, group=group, head_dim=head_dim,
                       block_size=BLOCK, pad_rows=2, pad_tokens=5)
    scale = head_dim**-0.5
    out = ragged_paged_attention(*map(jnp.asarray, batch), jnp.int32(len(q_lens)), sm_scale=scale,
                                 backend="reference")
    ref = naive_attention(*batch, len(q_lens), sm_scale=scale)
    # float32 accumulation over <= 40 keys against a float64 reference: 1e-5 is ~100 ulps.
    assert rel_err(out, ref) < 1e-5
    assert np.all(np.asarray(out)[sum(q_lens):] == 0), "padding rows must be zero"


@pytest.mark.parametrize("sliding_window,soft_cap", [(None, None), (16, None), (None, 5.0), (7, 30.0)])
def test_reference_window_and_soft_cap(sliding_window, soft_cap):
    rng = np.random.default_rng(7)
    for q_lens, kv_lens in (MIXED, LONG):
        batch = make_batch(rng, q_lens, kv_lens, num_kv_heads=3, group=3, head_dim=64, block_size=BLOCK)
        out = ragged_paged_attention(*map(jnp.asarray, batch), jnp.int32(len(q_lens)), sm_scale=0.125,
                                     sliding_window=sliding_window, soft_cap=soft_cap)
        ref = naive_attention(*batch, len(q_lens), sm_scale=0.125, sliding_window=sliding_window,
                              soft_cap=soft_cap)
        assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("sliding_window", [None, 50])
def test_reference_many_chunks_and_tiles(monkeypatch, sliding_window):
    """Force one block per key chunk and 16-query tiles, so that the online softmax runs over many
    chunks, long rows split into several tiles (the last one partial), and a window skips chunks."""
    import pallas_kernels.paged_attention as rpa

    monkeypatch.setattr(rpa, "_DECODE_CHUNK_KEYS", 1)
    monkeypatch.setattr(rpa, "_TILE_KEYS", 1)
    monkeypatch.setattr(rpa, "_TILE_QUERIES", 16)
    rng = np.random.default_rng(3)
    q_lens, kv_lens = [1, 37, 1, 16, 2], [150, 121, 33, 16, 64]
    batch = make_batch(rng, q_lens, kv_lens, num_kv_heads=2, group=4, head_dim=64, block_size=BLOCK,
                       width=40, pad_rows=2, pad_tokens=5)
    out = ragged_paged_attention(*map(jnp.asarray, batch), jnp.int32(len(q_lens)), sm_scale=0.125,
                                 sliding_window=sliding_window)
    ref = naive_attention(*batch, len(q_lens), sm_scale=0.125, sliding_window=sliding_window)
    assert rel_err(out, ref) < 1e-5
    assert not np.any(np.asarray(out)[sum(q_lens):])


@pytest.mark.parametrize("cache_dtype,tolerance", [(jnp.bfloat16, 2e-2), (FP8_DTYPE, 1e-1)])
def test_reference_low_precision_cache(cache_dtype, tolerance):
    """The reference dequantizes inside; compare against naive attention on the dequantized
    cache (tight) and on the float32 cache (loose: bf16 has 8 mantissa bits, e4m3 has 3)."""
    rng = np.random.default_rng(11)
    q, k_cache, v_cache, lens, tables, cu = make_batch(
        rng, *MIXED, num_kv_heads=2, group=3, head_dim=64, block_size=BLOCK)
    k_scale, v_scale = (0.5, 0.25) if cache_dtype == FP8_DTYPE else (None, None)
    kq = quantize_kv(jnp.asarray(k_cache), k_scale or 1.0, cache_dtype)
    vq = quantize_kv(jnp.asarray(v_cache), v_scale or 1.0, cache_dtype)
    out = ragged_paged_attention(jnp.asarray(q), kq, vq, jnp.asarray(lens), jnp.asarray(tables),
                                 jnp.asarray(cu), jnp.int32(7), sm_scale=0.125, k_scale=k_scale, v_scale=v_scale)
    k_deq = np.asarray(kq.astype(jnp.float32)) * (k_scale or 1.0)
    v_deq = np.asarray(vq.astype(jnp.float32)) * (v_scale or 1.0)
    assert rel_err(out, naive_attention(q, k_deq, v_deq, lens, tables, cu, 7, sm_scale=0.125)) < 1e-5
    assert rel_err(out, naive_attention(q, k_cache, v_cache, lens, tables, cu, 7, sm_scale=0.125)) < tolerance


def test_fp8_quantize_clips_instead_of_nan():
    x = jnp.asarray([0.0, 1.0, 500.0, -1e6, 300.0])
    q = quantize_kv(x, 1.0, FP8_DTYPE).astype(jnp.float32)
    assert np.all(np.isfinite(np.asarray(q)))
    assert float(q[2]) == 448.0 and float(q[3]) == -448.0


@pytest.mark.parametrize("kv_lens", [[1, 17], [512, 3], [513, 40], [1000, 512]])
def test_reference_decode_rows_each_chunk_size(kv_lens):
    """Two decode rows (and a padding row) in a 1024-key table, read in chunks of 512 keys per
    row: within one chunk, at and just past its edge, two chunks; the padding row stays zero."""
    rng = np.random.default_rng(sum(kv_lens))
    batch = make_batch(rng, [1, 1], kv_lens, num_kv_heads=3, group=3, head_dim=64, block_size=BLOCK, width=128,
                       pad_rows=1, pad_tokens=1)
    out = ragged_paged_attention(*map(jnp.asarray, batch), jnp.int32(2), sm_scale=0.125)
    ref = naive_attention(*batch, 2, sm_scale=0.125)
    assert rel_err(out, ref) < 1e-5
    assert not np.any(np.asarray(out)[2:])


def test_write_kv_cache_scatters_at_slots_and_padding_hits_null_block():
    rng = np.random.default_rng(5)
    k_cache = jnp.asarray(rng.standard_normal((6, 4, 2, 8)).astype(np.float32))
    v_cache = k_cache + 1
    k = jnp.asarray(rng.standard_normal((3, 2, 8)).astype(np.float32))
    slots = jnp.asarray([4 * 3 + 1, 4 * 5 + 3, 0])  # block 3 offset 1, block 5 offset 3, padding
    new_k, new_v = write_kv_cache(k_cache, v_cache, k, k * 2, slots)
    np.testing.assert_array_equal(new_k[3, 1], k[0])
    np.testing.assert_array_equal(new_v[5, 3], k[1] * 2)
    untouched = np.ones((6, 4), bool)
    untouched[3, 1] = untouched[5, 3] = untouched[0, 0] = False
    np.testing.assert_array_equal(np.asarray(new_k)[untouched], np.asarray(k_cache)[untouched])


def test_write_kv_cache_one_token_writes_only_its_slot():
    """A single token (padded to two inside, the second dropped) lands at its slot, jitted with
    the caches donated as the engine runs it, and nothing else changes."""
    rng = np.random.default_rng(6)
    k_cache = rng.standard_normal((6, 4, 2, 8)).astype(np.float32)
    k = rng.standard_normal((1, 2, 8)).astype(np.float32)
    write = jax.jit(write_kv_cache, donate_argnums=(0, 1))
    new_k, new_v = write(jnp.asarray(k_cache), jnp.asarray(k_cache + 1), jnp.asarray(k), jnp.asarray(k * 2),
                         jnp.asarray([4 * 5 + 3], jnp.int32))  # block 5 offset 3: the last slot
    expected_k, expected_v = k_cache.copy(), k_cache + 1
    expected_k[5, 3], expected_v[5, 3] = k[0], k[0] * 2
    np.testing.assert_array_equal(np.asarray(new_k), expected_k)
    np.testing.assert_array_equal(np.asarray(new_v), expected_v)


def test_reference_ignores_nan_past_sequence_end():
    """Stale slots past kv_len (here NaN, as a poisoned freed block) must not reach the output."""
    rng = np.random.default_rng(13)
    q, k_cache, v_cache, lens, tables, cu = make_batch(
        rng, *MIXED, num_kv_heads=2, group=2, head_dim=64, block_size=BLOCK)
    ref = naive_attention(q, k_cache, v_cache, lens, tables, cu, 7, sm_scale=0.125)
    for s, kv_len in enumerate(lens):
        for pos in range(kv_len, tables.shape[1] * BLOCK):
            block = tables[s, pos // BLOCK]
            k_cache[block, pos % BLOCK] = np.nan
            v_cache[block, pos % BLOCK] = np.nan
    k_cache[0] = v_cache[0] = np.nan  # the null block too
    out = ragged_paged_attention(*map(jnp.asarray, (q, k_cache, v_cache, lens, tables, cu)), jnp.int32(7),
                                 sm_scale=0.125)
    assert np.all(np.isfinite(np.asarray(out)))
    assert rel_err(out, ref) < 1e-5
