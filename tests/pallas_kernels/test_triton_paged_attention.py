"""The Triton-lowered ragged paged attention kernel (interpret mode) against the reference.

Interpret mode is slow (~0.25 ms per grid step), so CI covers the parameter space pairwise (every
pair of values of any two factors: GQA group, head size 64/80/96/128/192/256, page size
8/16/64/128, cache dtype, window, soft cap, KV splits, 16-bit word reads of fp8, attention
sinks) plus a seeded
random sample; the GPU check runs the pairwise cases first, then the full product.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.benchmarks.kernel_check import ATTENTION_FACTORS, pairwise
from pallas_kernels import FP8_DTYPE, quantize_kv, ragged_paged_attention
from pallas_kernels.triton_paged_attention import (
    column_layout,
    head_chunks,
    ragged_paged_attention_triton,
    reads_words,
    unsupported_reason,
)
from tests.pallas_kernels.test_ragged_paged_attention import make_batch, naive_attention

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")

# Decodes, short and long prefill chunks, a chunk continuing a prefix, kv_lens at a 16-block
# boundary and one either side (15, 16, 17, 32, 33), a context over several 64-key tiles.
Q_LENS = [1, 1, 1, 9, 20, 5, 1, 3]
KV_LENS = [15, 16, 17, 9, 52, 33, 32, 150]

# The GPU sweep's factors, with 16-bit word reads of fp8 forced as a fourth cache kind, and sinks.
FACTORS = {**ATTENTION_FACTORS, "kind": ATTENTION_FACTORS["kind"] + ["fp8-words"], "splits": [1, 3],
           "sinks": [False, True]}
PAIRWISE = [tuple(c.values()) for c in pairwise(FACTORS)]


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


def run_case(group, head_dim, block_size, kind, window, cap, splits, sinks, seed, interpret=True):
    rng = np.random.default_rng(seed)
    width = max(-(-kv // block_size) for kv in KV_LENS) + 1
    q, k, v, lens, tables, cu = make_batch(rng, Q_LENS, KV_LENS, num_kv_heads=2, group=group,
                                           head_dim=head_dim, block_size=block_size, width=width,
                                           pad_rows=2, pad_tokens=3)
    # Poison the stale slots and the null block: they must never reach the output.
    k_cache, k_scale, k_view = cast_cache(k, kind.removesuffix("-words"))
    v_cache, v_scale, v_view = cast_cache(v, kind.removesuffix("-words"))
    k_cache = k_cache.at[0].set(jnp.nan)
    v_cache = v_cache.at[0].set(jnp.nan)
    num_seqs = len(Q_LENS)
    sm_scale = head_dim ** -0.5
    sinks = rng.uniform(-2.0, 5.0, q.shape[1]).astype(np.float32) if sinks else None
    out = ragged_paged_attention_triton(
        jnp.asarray(q), k_cache, v_cache, jnp.asarray(lens), jnp.asarray(tables), jnp.asarray(cu),
        jnp.int32(num_seqs), sm_scale=sm_scale, sliding_window=window, soft_cap=cap,
        k_scale=k_scale, v_scale=v_scale, sinks=sinks, num_kv_splits=splits, read_words=kind.endswith("-words"),
        interpret=interpret)
    ref = naive_attention(q, k_view, v_view, lens, tables, cu, num_seqs, sm_scale=sm_scale,
                          sliding_window=window, soft_cap=cap, sinks=sinks)
    return np.asarray(out, np.float64), ref, int(cu[num_seqs])


def check(case, seed):
    out, ref, valid = run_case(*case, seed=seed)
    # The naive attention sees the same (rounded) cache values and q is float32, so only the
    # kernel's float32 accumulation order differs: 1e-4 relative to the output's scale.
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
    case = tuple(rng.choice(np.asarray(values, dtype=object)) for values in FACTORS.values())
    check(case, seed=seed)


def test_head_chunks_cover_every_column_once():
    for head_dim in (16, 32, 40, 64, 72, 80, 96, 112, 128, 160, 192, 200, 256):
        chunks = head_chunks(head_dim)
        assert all(width >= 16 and width & (width - 1) == 0 for _, width, _ in chunks), chunks
        covered = [c for start, width, skip in chunks for c in range(start + skip, start + width)]
        assert covered == list(range(head_dim)), (head_dim, chunks)
        for words in (False, True) if head_dim >= 32 else (False,):
            layout = column_layout(head_dim, words)
            assert sorted(x for x in layout if x < head_dim) == list(range(head_dim)), (head_dim, words)
    assert head_chunks(80) == ((0, 64, 0), (64, 16, 0))
    assert head_chunks(72) == ((0, 64, 0), (56, 16, 8))
    with pytest.raises(ValueError, match="at least 16"):
        head_chunks(8)


def test_large_fp8_caches_are_read_as_words():
    """Pallas-Triton computes offsets in 32 bits below 2^32 bytes: a 1-byte cache of 2^31 or more
    elements would wrap. Such a cache reaches the kernel as 16-bit words, so that no kernel operand
    holds 2^31 elements or more under 32-bit offsets (checked on the traced pallas_call, with
    abstract caches of 2^31 + one block, 3 GiB and 5 GiB)."""
    block = 16 * 8 * 128  # elements of one [16, 8, 128] page
    for pages, words in (((1 << 31) // block + 1, True), (3 * (1 << 30) // block, True),
                         (5 * (1 << 30) // block, False), (1000, False)):
        shape = (pages, 16, 8, 128)
        assert reads_words(shape, FP8_DTYPE) == words, pages
        assert not reads_words(shape, jnp.bfloat16)
        cache = jax.ShapeDtypeStruct(shape, FP8_DTYPE)
        spec = jax.ShapeDtypeStruct
        jaxpr = jax.make_jaxpr(lambda q, k, v, lens, tables, cu, n, scale: ragged_paged_attention_triton(
            q, k, v, lens, tables, cu, n, sm_scale=0.1, k_scale=scale, v_scale=scale))(
            spec((4, 32, 128), jnp.bfloat16), cache, cache, spec((4,), jnp.int32), spec((4, 64), jnp.int32),
            spec((5,), jnp.int32), spec((), jnp.int32), spec((), jnp.float32))
        (call,) = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "pallas_call"]
        for var in call.invars:
            elements, nbytes = var.aval.size, var.aval.size * var.aval.dtype.itemsize
            assert elements < 2**31 or nbytes > 2**32, (shape, var.aval)


def test_unsupported_shapes_name_the_reason():
    assert unsupported_reason(num_q_heads=8, num_kv_heads=2, head_dim=80, block_size=8) is None
    assert "head_dim" in unsupported_reason(num_q_heads=8, num_kv_heads=2, head_dim=8, block_size=16)
    assert "multiple" in unsupported_reason(num_q_heads=6, num_kv_heads=4, head_dim=64, block_size=16)
    q, cache = jnp.zeros((2, 4, 8)), jnp.zeros((3, 16, 1, 8))
    with pytest.raises(ValueError, match="head_dim 8"):
        ragged_paged_attention_triton(q, cache, cache, jnp.ones(1, jnp.int32), jnp.zeros((1, 1), jnp.int32),
                                      jnp.array([0, 2], jnp.int32), jnp.int32(1), sm_scale=1.0, interpret=True)


def test_dispatch_runs_kernel_with_interpret():
    rng = np.random.default_rng(7)
    q, k, v, lens, tables, cu = make_batch(rng, [1, 4], [17, 20], num_kv_heads=1, group=4,
                                           head_dim=64, block_size=16)
    args = [jnp.asarray(a) for a in (q, k, v, lens, tables, cu)] + [jnp.int32(2)]
    pallas = ragged_paged_attention(*args, sm_scale=0.125, backend="pallas", interpret=True)
    reference = ragged_paged_attention(*args, sm_scale=0.125, backend="reference")
    np.testing.assert_allclose(np.asarray(pallas), np.asarray(reference), rtol=1e-4, atol=1e-5)
