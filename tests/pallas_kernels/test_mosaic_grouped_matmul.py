"""The Mosaic GPU MoE grouped matmul: interpret mode on CPU against jax.lax.ragged_dot in float32,
its row-tile schedule, its shape support, its shared memory, and its lowering for a Hopper GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import moe_ffn_reference
from pallas_kernels.moe import moe_ffn_pallas
from pallas_kernels.mosaic_grouped_matmul import (
    ROW_ALIGN,
    SHARED_MEMORY_BYTES,
    grouped_matmul_mosaic,
    grouped_matmul_swiglu_mosaic,
    mosaic_unsupported_reason,
    pick_tiling,
    shared_memory_bytes,
    tile_table,
)
from tests.pallas_kernels.cuda_lowering import lower_for_cuda
from tests.pallas_kernels.mosaic_moe_cases import (
    INTERPRET_CASES,
    MIXTRAL_8X7B,
    QWEN3_30B_A3B,
    lowering_case_list,
    model_cases,
)


def _inputs(case, seed):
    rng = np.random.default_rng(seed)
    lhs = jnp.asarray(rng.standard_normal((case.num_rows, case.k_dim)), case.dtype)
    rhs = [jnp.asarray(rng.standard_normal((case.num_groups, case.k_dim, case.n_dim)) * 0.1, case.dtype)
           for _ in range(2 if case.fused else 1)]
    return lhs, rhs, jnp.asarray(case.group_sizes, jnp.int32)


def _ragged_dot_f32(lhs, rhs, sizes):
    return jax.lax.ragged_dot(lhs.astype(jnp.float32), rhs.astype(jnp.float32), sizes)


@pytest.mark.parametrize("case", INTERPRET_CASES, ids=lambda case: case.name)
def test_matches_ragged_dot_in_float32(case):
    lhs, rhs, sizes = _inputs(case, seed=len(case.name))
    # interpret mode poisons outputs with NaN (`uninitialized_memory="nan"`): an unwritten row
    # shows up as NaN below. Three simulated SMs each loop over several work items.
    interpret = plgpu.InterpretGPUParams()
    if case.fused:
        out = grouped_matmul_swiglu_mosaic(lhs, *rhs, sizes, interpret=interpret, **dict(case.tuning))
        ref = jax.nn.silu(_ragged_dot_f32(lhs, rhs[0], sizes)) * _ragged_dot_f32(lhs, rhs[1], sizes)
    else:
        out = grouped_matmul_mosaic(lhs, rhs[0], sizes, interpret=interpret, **dict(case.tuning))
        ref = _ragged_dot_f32(lhs, rhs[0], sizes)
    assert out.shape == ref.shape and out.dtype == lhs.dtype
    out, ref = np.asarray(out.astype(jnp.float32)), np.asarray(ref)
    # bf16 inputs are exact in float32 and the kernel accumulates in float32: what remains is one
    # rounding of the result to bfloat16 (at most 2^-8 of its magnitude; float16 rounds finer)
    # and summation order (float32, K <= 384 terms: far below 1e-5 of the largest output).
    scale = np.max(np.abs(ref)) or 1.0
    np.testing.assert_allclose(out, ref, rtol=2**-8, atol=1e-5 * scale)
    assert np.all(out[sum(case.group_sizes):] == 0), "rows past sum(group_sizes) must be zero"


def test_no_shared_memory_races_in_the_pipeline():
    """The interpreter's race detector (TMA copies run on their own threads) sees no unordered
    access to a buffer across K steps, work items, and the epilogue's stores. Caveat: it runs
    wgmma synchronously, so it cannot see a buffer refilled under a wgmma still in flight."""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call

    case = INTERPRET_CASES[2]  # fused, 64-row tiles, 3 K steps, tiles straddling groups
    lhs, rhs, sizes = _inputs(case, seed=1)
    out = grouped_matmul_swiglu_mosaic(lhs, *rhs, sizes, interpret=plgpu.InterpretGPUParams(detect_races=True),
                                       block_m=64, stages=2)
    assert bool(jnp.all(jnp.isfinite(out)))
    assert not interpret_pallas_call.get_races().races_found


def _group_of_rows(sizes, num_rows):
    ends = np.minimum(np.cumsum(sizes), num_rows)
    return np.searchsorted(ends, np.arange(num_rows), side="right")  # len(sizes): padding


@pytest.mark.parametrize("block_m", [64, 128])
def test_tile_table_covers_every_row_once_with_its_group(block_m):
    """Random group sizes (empty groups, padding rows, sizes summing past M): each row lies in
    exactly one tile of its own group, and every TMA window is 8-row aligned and inside lhs."""
    rng = np.random.default_rng(block_m)
    table = jax.jit(tile_table, static_argnums=(1, 2))
    for trial in range(90):
        num_rows, num_groups = [(5, 3), (130, 17), (699, 33)][trial % 3]
        cuts = np.sort(rng.integers(0, num_rows + (trial % 4) * 40, num_groups))  # some overshoot M
        sizes = np.diff(np.concatenate([[0], cuts])) * (rng.random(num_groups) < 0.7)
        first, count, window, group = np.asarray(table(jnp.asarray(sizes, jnp.int32), num_rows, block_m))
        padded_rows = max(-(-num_rows // ROW_ALIGN) * ROW_ALIGN, block_m)
        live = count > 0
        assert np.all(window % ROW_ALIGN == 0) and np.all((window >= 0) & (window + block_m <= padded_rows))
        assert np.all(first[live] >= window[live]) and np.all(first[live] + count[live] <= window[live] + block_m)
        owner = np.full(num_rows, -1)
        for f, c, g in zip(first[live], count[live], group[live]):
            assert np.all(owner[f:f + c] == -1), "a row lies in two tiles"
            owner[f:f + c] = g
        np.testing.assert_array_equal(owner, _group_of_rows(sizes, num_rows))


def test_fused_moe_ffn_matches_the_reference():
    """moe_ffn_pallas with the Mosaic kernels: routing, fused gate/up, down and combine."""
    rng = np.random.default_rng(5)
    num_tokens, num_experts, top_k, hidden, inter = 13, 8, 2, 64, 128
    x = jnp.asarray(rng.standard_normal((num_tokens, hidden)), jnp.bfloat16)
    ids = jnp.asarray(np.stack([rng.choice(5, top_k, replace=False) for _ in range(num_tokens)]), jnp.int32)
    weights = jnp.asarray(rng.random((num_tokens, top_k)), jnp.bfloat16)
    w_gate, w_up = (jnp.asarray(rng.standard_normal((num_experts, hidden, inter)) * 0.2, jnp.bfloat16)
                    for _ in range(2))
    w_down = jnp.asarray(rng.standard_normal((num_experts, inter, hidden)) * 0.2, jnp.bfloat16)
    out = moe_ffn_pallas(x, ids, weights, w_gate, w_up, w_down, kernel="mosaic", interpret=True)
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    ref = moe_ffn_reference(f32(x), ids, f32(weights), f32(w_gate), f32(w_up), f32(w_down))
    # Both roundings to bfloat16 inside (the SwiGLU output, the down output and the weighted sum
    # over top_k) cost 2^-8 relative each: 2e-2 of the largest output bounds them.
    assert float(jnp.max(jnp.abs(f32(out) - ref))) < 2e-2 * float(jnp.max(jnp.abs(ref)))


def test_unsupported_reason_names_the_field():
    ok = dict(num_rows=1024, k_dim=2048, n_dim=768, num_groups=128, dtype=jnp.bfloat16)
    assert mosaic_unsupported_reason(**ok) is None
    assert mosaic_unsupported_reason(**{**ok, "dtype": jnp.float16}) is None
    assert "float32" in mosaic_unsupported_reason(**{**ok, "dtype": jnp.float32})
    assert "K (2040)" in mosaic_unsupported_reason(**{**ok, "k_dim": 2040})
    assert "N (96)" in mosaic_unsupported_reason(**{**ok, "n_dim": 96})
    assert "num_rows" in mosaic_unsupported_reason(**{**ok, "num_rows": 0})
    for model in (MIXTRAL_8X7B, QWEN3_30B_A3B):
        for k_dim, n_dim in ((model["hidden"], model["intermediate"]), (model["intermediate"], model["hidden"])):
            assert mosaic_unsupported_reason(num_rows=8, k_dim=k_dim, n_dim=n_dim,
                                             num_groups=model["num_experts"], dtype=jnp.bfloat16) is None


def test_bad_shapes_raise_naming_the_field():
    with pytest.raises(ValueError, match="K"):
        grouped_matmul_mosaic(jnp.zeros((4, 128), jnp.bfloat16), jnp.zeros((2, 64, 64), jnp.bfloat16),
                              jnp.array([2, 2]), interpret=True)
    with pytest.raises(ValueError, match="group_sizes"):
        grouped_matmul_mosaic(jnp.zeros((4, 64), jnp.bfloat16), jnp.zeros((2, 64, 64), jnp.bfloat16),
                              jnp.array([4]), interpret=True)
    with pytest.raises(ValueError, match="float32"):
        grouped_matmul_mosaic(jnp.zeros((4, 64)), jnp.zeros((2, 64, 64)), jnp.array([2, 2]), interpret=True)
    with pytest.raises(ValueError, match="block_m"):
        grouped_matmul_mosaic(jnp.zeros((4, 64), jnp.bfloat16), jnp.zeros((2, 64, 64), jnp.bfloat16),
                              jnp.array([2, 2]), interpret=True, block_m=32)


@pytest.mark.parametrize("num_tokens", [1, 4, 16, 64, 256, 1024, 4096])
def test_default_tiles_fit_in_shared_memory(num_tokens):
    """Every tiling the defaults pick for the production models, M = tokens * top_k from 2 to
    32768 rows, stays under Hopper's 227 KB of shared memory per block."""
    for model, name in ((MIXTRAL_8X7B, "mixtral"), (QWEN3_30B_A3B, "qwen3")):
        for case in model_cases(model, name, num_tokens):
            tiling = case.tiling(num_sms=132)
            num_rhs = 2 if case.fused else 1
            used = shared_memory_bytes(tiling.block_m, tiling.block_n, tiling.block_k, num_rhs, 2, tiling.stages)
            assert used <= SHARED_MEMORY_BYTES, (case.name, tiling, used)
            assert tiling.stages >= 3, (case.name, tiling)  # at least two K steps in flight


def _recording_smem_estimates(estimate_resources, seen):
    """Wraps Pallas' resource estimate to record the shared memory it reserves per kernel."""
    def estimate(ctx, jaxpr):
        resources = estimate_resources(ctx, jaxpr)
        seen.append(resources.smem_scratch_bytes)
        return resources

    return estimate


@pytest.mark.parametrize("case", lowering_case_list(), ids=lambda case: case.name)
def test_lowers_for_hopper(case, monkeypatch):
    """Pallas -> Mosaic GPU dialect -> layout inference -> lowered and verified module, for an
    H100 target, on this CPU (see mosaic_moe_cases). The shared memory Pallas reserves is the
    kernel's own count and fits in 227 KB."""
    from jax._src.pallas.mosaic_gpu import lowering

    seen = []
    monkeypatch.setattr(lowering, "_estimate_resources",
                        _recording_smem_estimates(lowering._estimate_resources, seen))
    text = lower_for_cuda(case.fn(), *case.arg_specs())
    assert text.count("mosaic_gpu_v2") == 1
    tiling = case.tiling(num_sms=132)
    k_steps = case.k_dim // tiling.block_k
    stages = min(tiling.stages, k_steps)  # emit_pipeline allocates no more buffers than steps
    expected = shared_memory_bytes(tiling.block_m, tiling.block_n, tiling.block_k, 2 if case.fused else 1,
                                   jnp.dtype(case.dtype).itemsize, stages)
    assert max(seen) == expected <= SHARED_MEMORY_BYTES


def test_pick_tiling_sizes():
    qwen = pick_tiling(8192, 2048, 768, 128, 2, 2, num_sms=132)
    assert (qwen.block_m, qwen.block_n) == (128, 128)  # one 128-row tile per ~64-row expert
    decode = pick_tiling(8, 2048, 768, 128, 2, 2, num_sms=132)
    assert (decode.block_m, decode.block_n) == (64, 64)  # 8 busy experts x 12 N blocks
