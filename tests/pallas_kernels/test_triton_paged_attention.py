"""The Triton-lowered ragged paged attention kernel (interpret mode) against the reference.

Interpret mode is slow (~0.25 ms per grid step), so CI covers the parameter space pairwise plus
a seeded random sample; `make gpu-check` runs the full sweep on a GPU.
"""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import FP8_DTYPE, quantize_kv, ragged_paged_attention
from pallas_kernels.triton_paged_attention import ragged_paged_attention_triton
from tests.pallas_kernels.test_ragged_paged_attention import make_batch, naive_attention

BLOCK = 16
# Decodes, short and long prefill chunks, a chunk continuing a prefix, kv_lens at a block
# boundary and one either side (15, 16, 17, 32, 33).
Q_LENS = [1, 1, 1, 9, 20, 5, 1]
KV_LENS = [15, 16, 17, 9, 52, 33, 32]

# Pairwise (all pairs of values of any two factors appear) over
# group x head_dim x cache dtype x sliding window x soft cap x kv splits.
PAIRWISE = [
    (1, 64, "f32", None, None, 1),
    (1, 128, "bf16", 24, 20.0, 2),
    (1, 64, "fp8", 24, None, 2),
    (3, 128, "f32", 24, None, 2),
    (3, 64, "bf16", None, 20.0, 1),
    (3, 128, "fp8", None, 20.0, 1),
    (4, 64, "f32", None, 20.0, 2),
    (4, 128, "bf16", 24, None, 1),
    (4, 64, "fp8", 24, 20.0, 1),
    (8, 128, "f32", 24, 20.0, 1),
    (8, 64, "bf16", None, None, 2),
    (8, 128, "fp8", None, None, 2),
]
FULL = list(itertools.product([1, 3, 4, 8], [64, 128], ["f32", "bf16", "fp8"], [None, 24],
                              [None, 20.0], [1, 2]))


def cast_cache(cache, kind):
    """Returns (stored cache, scale, float64 view the naive attention sees)."""
    if kind == "f32":
        return jnp.asarray(cache), None, np.asarray(cache, np.float64)
    if kind == "bf16":
        stored = jnp.asarray(cache, jnp.bfloat16)
        return stored, None, np.asarray(stored.astype(jnp.float32), np.float64)
    scale = float(np.abs(cache).max() / 448.0)
    stored = quantize_kv(jnp.asarray(cache), scale, FP8_DTYPE)
    return stored, jnp.float32(scale), np.asarray(stored.astype(jnp.float32), np.float64) * scale


def run_case(group, head_dim, kind, window, cap, splits, seed, interpret=True):
    rng = np.random.default_rng(seed)
    q, k, v, lens, tables, cu = make_batch(rng, Q_LENS, KV_LENS, num_kv_heads=2, group=group,
                                           head_dim=head_dim, block_size=BLOCK, width=5,
                                           pad_rows=2, pad_tokens=3)
    # Poison the stale slots and the null block: they must never reach the output.
    k_cache, k_scale, k_view = cast_cache(k, kind)
    v_cache, v_scale, v_view = cast_cache(v, kind)
    k_cache = k_cache.at[0].set(jnp.nan)
    v_cache = v_cache.at[0].set(jnp.nan)
    num_seqs = len(Q_LENS)
    sm_scale = head_dim ** -0.5
    out = ragged_paged_attention_triton(
        jnp.asarray(q), k_cache, v_cache, jnp.asarray(lens), jnp.asarray(tables), jnp.asarray(cu),
        jnp.int32(num_seqs), sm_scale=sm_scale, sliding_window=window, soft_cap=cap,
        k_scale=k_scale, v_scale=v_scale, num_kv_splits=splits, interpret=interpret)
    ref = naive_attention(q, k_view, v_view, lens, tables, cu, num_seqs, sm_scale=sm_scale,
                          sliding_window=window, soft_cap=cap)
    return np.asarray(out, np.float64), ref, int(cu[num_seqs])


def check(case, seed):
    out, ref, valid = run_case(*case, seed=seed)
    # The naive attention sees the same (rounded) cache values, so only the kernel's float32
    # accumulation order differs: 1e-4 relative to the output's scale.
    assert np.all(np.isfinite(out)), "NaN/inf reached the output (stale or null-block slots)"
    err = np.max(np.abs(out[:valid] - ref[:valid])) / np.max(np.abs(ref[:valid]))
    assert err < 1e-4, f"{case}: relative error {err:.2e}"
    assert np.all(out[valid:] == 0), "padding rows must be zero"


@pytest.mark.parametrize("case", PAIRWISE, ids=lambda c: "-".join(map(str, c)))
def test_kernel_pairwise(case):
    check(case, seed=hash(case) % 2**31)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(2))
def test_kernel_random_sample(seed):
    rng = np.random.default_rng(1234 + seed)
    case = FULL[rng.integers(len(FULL))]
    check(case, seed=seed)


def test_dispatch_runs_kernel_with_interpret():
    rng = np.random.default_rng(7)
    q, k, v, lens, tables, cu = make_batch(rng, [1, 4], [17, 20], num_kv_heads=1, group=4,
                                           head_dim=64, block_size=BLOCK)
    args = [jnp.asarray(a) for a in (q, k, v, lens, tables, cu)] + [jnp.int32(2)]
    pallas = ragged_paged_attention(*args, sm_scale=0.125, backend="pallas", interpret=True)
    reference = ragged_paged_attention(*args, sm_scale=0.125, backend="reference")
    np.testing.assert_allclose(np.asarray(pallas), np.asarray(reference), rtol=1e-4, atol=1e-5)


def test_bad_block_size_names_field():
    q = jnp.zeros((2, 4, 64))
    cache = jnp.zeros((3, 8, 1, 64))
    with pytest.raises(ValueError, match="block_size"):
        ragged_paged_attention_triton(q, cache, cache, jnp.ones(1, jnp.int32), jnp.zeros((1, 1), jnp.int32),
                                      jnp.array([0, 2], jnp.int32), jnp.int32(1), sm_scale=1.0,
                                      interpret=True)
