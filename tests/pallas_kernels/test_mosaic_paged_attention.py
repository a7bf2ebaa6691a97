"""The Mosaic GPU ragged paged attention kernel, in Mosaic GPU interpret mode on CPU, against
`ragged_paged_attention_reference`.

Interpret mode simulates shared memory, TMA copies, barriers and wgmma, but not layouts (tiles
are kept at their logical shape, swizzles and tilings are ignored), register or shared-memory
limits: tests/pallas_kernels/mosaic_attention_cases.py lowers the same configurations for a
Hopper target, which checks those. Interpret mode costs ~2 s to compile a kernel and ~50 ms per
tile a program visits, so CI covers the parameter space pairwise on small ragged batches.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxserve.benchmarks.kernel_check import make_batch
from pallas_kernels import FP8_DTYPE, quantize_kv, ragged_paged_attention_reference
from pallas_kernels.mosaic_paged_attention import mosaic_unsupported_reason, ragged_paged_attention_mosaic
from tests.pallas_kernels.mosaic_attention_cases import (
    DECODE_LENS, FACTORS, FAST, NUM_KV_HEADS, PAIRWISE, mixed_lens,
)

# Relative error max|out - ref| / max|ref|. Both sides round the output to bf16 (2^-9 relative);
# the kernel also rounds the scaled query, the probabilities and each split's normalised output
# to bf16 (bf16 caches) or float16 (fp8 caches, 2^-11): a few roundings of 2^-9 add up to ~5e-3
# at worst on these inputs (measured: <= 5.5e-3), against errors of 1e-1 and more for a wrong
# mask, page or merge.
TOLERANCE = 1e-2
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def run_case(head_dim, block_size, kind, group, window, cap, splits, sinks, *, q_lens, kv_lens, seed,
             interpret=None):
    """Kernel and reference outputs (float64) on a fresh random batch, and the live token count."""
    rng = np.random.default_rng(seed)
    q, k, v, lens, tables, cu = make_batch(
        rng, q_lens, kv_lens, num_kv_heads=NUM_KV_HEADS, group=group, head_dim=head_dim,
        block_size=block_size, width=-(-max(kv_lens) // block_size) + 1, pad_rows=1, pad_tokens=3)
    scale = None
    if kind == "bf16":
        k, v = (np.array(jnp.asarray(c, jnp.bfloat16)) for c in (k, v))
    else:
        scale = jnp.float32(np.abs(np.concatenate([k, v])).max() / 448.0)
        k, v = (np.array(quantize_kv(jnp.asarray(c), scale, FP8_DTYPE)) for c in (k, v))
    # Poison the null block and the unwritten slots of every last page: neither may reach the output.
    for cache in (k, v):
        cache[0] = np.nan
        for s, kv_len in enumerate(kv_lens):
            cache[tables[s, (kv_len - 1) // block_size], (kv_len - 1) % block_size + 1:] = np.nan
    opts = dict(sm_scale=head_dim**-0.5, sliding_window=window, soft_cap=cap)
    sinks = jnp.asarray(rng.uniform(-2.0, 5.0, NUM_KV_HEADS * group), jnp.float32) if sinks else None

    def both(*args, k_scale, v_scale, sinks):
        scales = dict(k_scale=k_scale, v_scale=v_scale, sinks=sinks)
        out = ragged_paged_attention_mosaic(*args, **opts, **scales, num_kv_splits=splits,
                                            interpret=interpret or plgpu.InterpretGPUParams())
        return out, ragged_paged_attention_reference(*args, **opts, **scales)

    args = (jnp.asarray(q, jnp.bfloat16), k, v, lens, tables, cu, jnp.int32(len(q_lens)))
    # One compile per case rather than one per eager op, without XLA's costly CPU passes: the
    # interpreted kernel is thousands of callbacks, and optimising them saves nothing.
    compiled = jax.jit(both).lower(*args, k_scale=scale, v_scale=scale, sinks=sinks).compile(FAST_COMPILE)
    out, ref = compiled(*args, k_scale=scale, v_scale=scale, sinks=sinks)
    return np.asarray(out, np.float64), np.asarray(ref, np.float64), int(cu[len(q_lens)])


def check(case, seed, lens=None, interpret=None):
    q_lens, kv_lens = lens or mixed_lens(case[1])
    out, ref, valid = run_case(*case, q_lens=q_lens, kv_lens=kv_lens, seed=seed, interpret=interpret)
    # Interpret mode fills unwritten memory with NaN, so this also catches unwritten partials.
    assert np.all(np.isfinite(out)), f"{case}: NaN/inf in the output (null block, stale slot or unwritten)"
    err = np.max(np.abs(out[:valid] - ref[:valid])) / np.max(np.abs(ref[:valid]))
    assert err < TOLERANCE, f"{case}: relative error {err:.2e}"
    assert np.all(out[valid:] == 0), "padding tokens must be zero"


def case_id(case):
    return "-".join(map(str, case))


@pytest.mark.parametrize("case", FAST, ids=case_id)
def test_kernel_pairwise(case):
    check(case, seed=PAIRWISE.index(case))


@pytest.mark.slow
@pytest.mark.parametrize("case", PAIRWISE[len(FAST):], ids=case_id)
def test_kernel_pairwise_rest(case):
    check(case, seed=PAIRWISE.index(case))


def test_pairwise_table_covers_every_pair():
    for i in range(len(FACTORS)):
        for j in range(i + 1, len(FACTORS)):
            seen = {(row[i], row[j]) for row in PAIRWISE}
            missing = {(a, b) for a in FACTORS[i] for b in FACTORS[j]} - seen
            assert not missing, f"factors {i}, {j}: pairs {missing} not covered"


def test_decode_only_split_without_races():
    """A decode-only step split four ways (flash-decoding, with sinks), with the interpreter's race
    detector on: a read of a shared-memory tile before its TMA copy landed, or a copy into a tile
    still being read, is reported (wgmma operands are not tracked by the detector)."""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call

    check((64, 16, "fp8", 4, None, None, 4, True), seed=11, lens=DECODE_LENS,
          interpret=plgpu.InterpretGPUParams(detect_races=True))
    races = interpret_pallas_call.get_races()
    assert not races.races_found, "the race detector found a data race"


def test_scales_are_runtime_arrays():
    """k_scale / v_scale trace as arrays: changing them never recompiles the kernel."""
    spec = jax.ShapeDtypeStruct
    cache = spec((9, 16, 2, 64), FP8_DTYPE)

    def fn(k_scale, v_scale):
        return ragged_paged_attention_mosaic(
            jnp.ones((4, 8, 64), jnp.bfloat16), jnp.zeros(cache.shape, cache.dtype),
            jnp.zeros(cache.shape, cache.dtype), jnp.full((2,), 20, jnp.int32),
            jnp.ones((2, 4), jnp.int32), jnp.array([0, 1, 4], jnp.int32), jnp.int32(2),
            sm_scale=0.125, k_scale=k_scale, v_scale=v_scale, interpret=True)

    out = jax.eval_shape(fn, spec((), jnp.float32), spec((), jnp.float32))
    assert out.shape == (4, 8, 64) and out.dtype == jnp.bfloat16


@pytest.mark.parametrize("head_dim", FACTORS[0])
@pytest.mark.parametrize("block_size", [8, 16, 32, 64, 128, 256])
def test_supported_shapes(head_dim, block_size):
    for group in (1, 3, 4, 8, 16):
        for cache_dtype in (jnp.bfloat16, FP8_DTYPE):
            reason = mosaic_unsupported_reason(num_q_heads=2 * group, num_kv_heads=2, head_dim=head_dim,
                                               block_size=block_size, q_dtype=jnp.bfloat16,
                                               cache_dtype=cache_dtype)
            assert reason is None, reason


@pytest.mark.parametrize("change,words", [
    (dict(q_dtype=jnp.float32), "q dtype float32"),
    (dict(cache_dtype=jnp.float32), "cache dtype float32"),
    (dict(head_dim=72), "head_dim 72"),
    (dict(head_dim=512), "head_dim 512"),
    (dict(block_size=4), "block_size 4"),
    (dict(block_size=24), "block_size 24"),
    (dict(block_size=96), "block_size 96"),
    (dict(num_q_heads=6, num_kv_heads=4), "multiple of kv heads"),
    (dict(num_q_heads=130, num_kv_heads=1), "GQA group 130"),
])
def test_unsupported_shapes_give_a_reason(change, words):
    shape = dict(num_q_heads=8, num_kv_heads=2, head_dim=128, block_size=16, q_dtype=jnp.bfloat16,
                 cache_dtype=jnp.bfloat16) | change
    reason = mosaic_unsupported_reason(**shape)
    assert reason is not None and words in reason and "\n" not in reason


def test_kernel_refuses_unsupported_shape_and_bad_tuning():
    q = jnp.zeros((2, 4, 64), jnp.bfloat16)
    tables, cu, lens = jnp.ones((1, 2), jnp.int32), jnp.array([0, 2], jnp.int32), jnp.full((1,), 9, jnp.int32)
    small_pages = jnp.zeros((3, 4, 1, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="block_size 4"):
        ragged_paged_attention_mosaic(q, small_pages, small_pages, lens, tables, cu, jnp.int32(1),
                                      sm_scale=1.0, interpret=True)
    cache = jnp.zeros((3, 16, 1, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="block_k"):
        ragged_paged_attention_mosaic(q, cache, cache, lens, tables, cu, jnp.int32(1), sm_scale=1.0,
                                      block_k=48, interpret=True)
    with pytest.raises(ValueError, match="num_kv_splits"):
        ragged_paged_attention_mosaic(q, cache, cache, lens, tables, cu, jnp.int32(1), sm_scale=1.0,
                                      num_kv_splits=0, interpret=True)
