"""Block-FP8 MoE experts in the kernels: the reference's in-step dequantization, the Triton grouped
matmul that dequantizes each weight tile (interpret mode) against it, the dispatch, and the CUDA
lowering of the fp8 kernels (fp8 tiles loaded, the MLIR verifier passed)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import moe_ffn, moe_ffn_reference
from pallas_kernels.dispatch import choose_moe_kernel
from pallas_kernels.moe import dequantize_experts, moe_ffn_pallas
from pallas_kernels.triton_grouped_matmul import grouped_matmul, grouped_matmul_swiglu
from tests.pallas_kernels.cuda_lowering import captured_triton_modules, lower_and_verify
from tests.pallas_kernels.test_moe import naive_moe

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")
FP8 = jnp.float8_e4m3fn
HOPPER = dict(capability=(9, 0), platform="gpu")


def quantized(rng, shape, block, std=0.2):
    """(fp8 [G, K, N], float32 scales [G, ceil(K/bk), ceil(N/bn)]): random e4m3 values times
    random per-block scales (no structure a missing scale could hide behind)."""
    weight = jnp.asarray(np.clip(rng.standard_normal(shape) * 100, -448, 448), FP8)
    scale_shape = (shape[0], -(-shape[1] // block[0]), -(-shape[2] // block[1]))
    return weight, jnp.asarray(rng.uniform(0.5, 2.0, scale_shape) * std / 100, jnp.float32)


def reference_dequantize(weight, scale, block):
    """Element by element in numpy, as the format defines it."""
    w = np.asarray(weight, np.float32)
    rows = np.arange(w.shape[1]) // block[0]
    cols = np.arange(w.shape[2]) // block[1]
    return w * np.asarray(scale)[:, rows][:, :, cols]


@pytest.mark.parametrize("shape, block", [((3, 64, 96), (32, 32)), ((2, 40, 50), (16, 48)), ((1, 5, 7), (128, 128))])
def test_dequantize_experts_whole_blocks_and_ragged(shape, block):
    w, s = quantized(np.random.default_rng(0), shape, block)
    want = reference_dequantize(w, s, block)
    np.testing.assert_array_equal(np.asarray(dequantize_experts(w, s, block, jnp.float32)), want)


@pytest.mark.parametrize("block", [(16, 32), (16, 24), (16, 12)])
def test_dequantize_a_tensor_parallel_shard(block):
    """A shard of the columns (or rows), dequantized with the whole weight's scales and its offset,
    equals that slice of the whole weight: shards that start on a block, or inside one."""
    w, s = quantized(np.random.default_rng(1), (2, 32, 48), block)
    whole = reference_dequantize(w, s, block)
    for shard in range(2):
        cols = dequantize_experts(w[:, :, shard * 24:(shard + 1) * 24], s, block, jnp.float32,
                                  col_offset=jnp.int32(shard * 24))
        np.testing.assert_array_equal(np.asarray(cols), whole[:, :, shard * 24:(shard + 1) * 24])
        rows = dequantize_experts(w[:, shard * 16:(shard + 1) * 16], s, block, jnp.float32, row_offset=shard * 16)
        np.testing.assert_array_equal(np.asarray(rows), whole[:, shard * 16:(shard + 1) * 16])


def routed(rng, num_tokens, num_experts, top_k, hidden):
    x = rng.standard_normal((num_tokens, hidden)).astype(np.float32)
    # Unbalanced routing, some experts empty.
    ids = np.stack([rng.choice(max(top_k, num_experts // 2), top_k, replace=False) for _ in range(num_tokens)])
    return x, ids.astype(np.int32), rng.random((num_tokens, top_k)).astype(np.float32)


def fp8_experts(rng, num_experts, hidden, inter, block):
    gate, up = (quantized(rng, (num_experts, hidden, inter), block) for _ in range(2))
    down = quantized(rng, (num_experts, inter, hidden), block)
    return (gate[0], up[0], down[0]), (gate[1], up[1], down[1])


@pytest.mark.parametrize("num_tokens,block", [(1, (32, 16)), (13, (16, 16)), (33, (48, 32))])
def test_reference_with_fp8_experts_is_the_dequantized_experts(num_tokens, block):
    """In-step dequantization in float32 is the dequantized weights exactly: the same logits as
    running on weights dequantized beforehand, and the naive float64 loop to 1e-5."""
    rng = np.random.default_rng(num_tokens)
    x, ids, weights = routed(rng, num_tokens, 6, 2, 64)
    ws, scales = fp8_experts(rng, 6, 64, 48, block)
    out = moe_ffn(jnp.asarray(x), jnp.asarray(ids), jnp.asarray(weights), *ws, scales=scales, scale_block=block,
                  backend="reference")
    dense = [reference_dequantize(w, s, block) for w, s in zip(ws, scales)]
    np.testing.assert_array_equal(np.asarray(out), np.asarray(moe_ffn_reference(
        jnp.asarray(x), jnp.asarray(ids), jnp.asarray(weights), *map(jnp.asarray, dense))))
    ref = naive_moe(x, ids, weights, *dense)
    assert np.max(np.abs(np.asarray(out) - ref)) / np.max(np.abs(ref)) < 1e-5


# Group sizes with empty groups, one group smaller than a tile, one spanning tiles, and sizes
# summing to fewer than M rows (the tail rows must come back zero). Blocks: K = 64 in blocks of
# 48 (ragged: 48 + 16; tiles of 16), N = 96 in blocks of 32.
CASES = [([0, 5, 40, 0, 19], 64, jnp.float32), ([17, 0, 0, 3], 20, jnp.bfloat16), ([1, 2, 3], 10, jnp.float32)]
BLOCK = (48, 32)


@pytest.mark.parametrize("sizes,num_rows,dtype", CASES)
def test_triton_fp8_grouped_matmul_matches_the_reference(sizes, num_rows, dtype):
    rng = np.random.default_rng(sum(sizes))
    lhs = jnp.asarray(rng.standard_normal((num_rows, 64)), dtype)
    rhs, scale = quantized(rng, (len(sizes), 64, 96), BLOCK)
    groups = jnp.asarray(sizes, jnp.int32)
    out = grouped_matmul(lhs, rhs, groups, rhs_scale=scale, scale_block=BLOCK, block_m=16, interpret=True)
    assert out.dtype == dtype
    ref = jax.lax.ragged_dot(lhs.astype(jnp.float32), jnp.asarray(reference_dequantize(rhs, scale, BLOCK)), groups)
    # f32: accumulation order only (1e-5). bf16: each dequantized weight and the result rounded
    # to bf16 once (2^-8 relative each, as the reference's bf16 path does).
    tol = 1e-5 if dtype == jnp.float32 else 1.6e-2
    assert float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref))) / float(jnp.max(jnp.abs(ref))) < tol
    assert np.all(np.asarray(out[sum(sizes):]) == 0)


def test_triton_fp8_fused_swiglu_matches_the_reference():
    rng = np.random.default_rng(3)
    sizes = jnp.asarray([7, 0, 25], jnp.int32)
    lhs = jnp.asarray(rng.standard_normal((32, 64)), jnp.float32)
    (w_gate, s_gate), (w_up, s_up) = (quantized(rng, (3, 64, 96), BLOCK) for _ in range(2))
    out = grouped_matmul_swiglu(lhs, w_gate, w_up, sizes, scales=(s_gate, s_up), scale_block=BLOCK, block_m=16,
                                interpret=True)
    gate, up = (jax.lax.ragged_dot(lhs, jnp.asarray(reference_dequantize(w, s, BLOCK)), sizes)
                for w, s in ((w_gate, s_gate), (w_up, s_up)))
    np.testing.assert_allclose(np.asarray(out), np.asarray(jax.nn.silu(gate) * up), rtol=1e-5, atol=1e-5)


def test_moe_ffn_triton_fp8_matches_the_reference():
    rng = np.random.default_rng(11)
    x, ids, weights = routed(rng, 13, 8, 2, 64)
    block = (32, 16)
    ws, scales = fp8_experts(rng, 8, 64, 48, block)
    args = (jnp.asarray(x), jnp.asarray(ids), jnp.asarray(weights), *ws)
    out = moe_ffn(*args, scales=scales, scale_block=block, backend="triton", interpret=True)
    ref = moe_ffn_reference(*args, scales=scales, scale_block=block)
    assert float(jnp.max(jnp.abs(out - ref))) / float(jnp.max(jnp.abs(ref))) < 1e-5


def test_fp8_experts_without_scales_or_with_wrong_ones_name_the_problem():
    rng = np.random.default_rng(5)
    x, ids, weights = routed(rng, 4, 4, 2, 32)
    ws, scales = fp8_experts(rng, 4, 32, 32, (16, 16))
    args = (jnp.asarray(x), jnp.asarray(ids), jnp.asarray(weights), *ws)
    with pytest.raises(ValueError, match="float8_e4m3fn expert weights need their block scales"):
        moe_ffn(*args, backend="reference")
    with pytest.raises(ValueError, match=r"in blocks of \(32, 16\) must have shape \(4, 1, 2\), got \(4, 2, 2\)"):
        moe_ffn(*args, scales=scales, scale_block=(32, 16), backend="reference")
    with pytest.raises(ValueError, match="Mosaic GPU grouped matmul takes no fp8 weights"):
        moe_ffn_pallas(*args, scales=scales, scale_block=(16, 16), kernel="mosaic", interpret=True)
    with pytest.raises(ValueError, match="both must be multiples of 16"):
        grouped_matmul(jnp.zeros((4, 32)), ws[0], jnp.asarray([1, 1, 1, 1]), rhs_scale=jnp.ones((4, 4, 4)),
                       scale_block=(8, 8), interpret=True)


def test_dispatch_sends_fp8_experts_to_triton():
    shape = dict(hidden_size=7168, intermediate_size=2048, num_experts=256, dtype=jnp.bfloat16)
    for requested in ("pallas", "auto"):
        choice = choose_moe_kernel(requested, **shape, weight_dtype=FP8, scale_block=(128, 128), **HOPPER)
        assert choice.backend == "triton", choice
    assert "Mosaic GPU: float8_e4m3fn weights" in choose_moe_kernel(
        "pallas", **shape, weight_dtype=FP8, scale_block=(128, 128), **HOPPER).reason
    assert choose_moe_kernel("pallas", **shape, **HOPPER).backend == "mosaic"  # bf16 weights: as before
    with pytest.raises(ValueError, match="moe_backend='mosaic' cannot run this model: float8_e4m3fn weights"):
        choose_moe_kernel("mosaic", **shape, weight_dtype=FP8, scale_block=(128, 128), **HOPPER)
    odd = choose_moe_kernel("auto", **shape, weight_dtype=FP8, scale_block=(128, 8), **HOPPER)
    assert odd.backend == "reference" and "fp8 weight blocks (128, 8) must be multiples of 16" in odd.reason
    assert choose_moe_kernel("auto", **shape, weight_dtype=FP8, scale_block=(128, 128),
                             capability=None, platform="cpu").backend == "reference"
    ampere = choose_moe_kernel("auto", **shape, weight_dtype=FP8, scale_block=(128, 128), capability=(8, 0),
                               platform="gpu")
    assert ampere.backend == "reference"
    assert "fp8 -> bf16 conversion needs sm_89 or newer, this is sm_80" in ampere.reason


def test_fp8_grouped_matmuls_lower_for_cuda_reading_fp8_tiles():
    """DeepSeek-V3's experts (7168 -> 2048 -> 7168, 128 x 128 blocks, 256 experts, bf16
    activations) lower for CUDA and pass the MLIR verifier; the weight tiles are loaded as
    f8E4M3FN (1 byte per weight from memory) and converted in registers."""
    spec = jax.ShapeDtypeStruct
    experts, hidden, inter, block = 256, 7168, 2048, (128, 128)
    rows = 1024 * 8
    x = spec((rows, hidden), jnp.bfloat16)
    gate, down = spec((experts, hidden, inter), FP8), spec((experts, inter, hidden), FP8)
    gate_scale, down_scale = spec((experts, 56, 16), jnp.float32), spec((experts, 16, 56), jnp.float32)

    def experts_ffn(x, g, u, d, sg, su, sd, sizes):
        hidden_rows = grouped_matmul_swiglu(x, g, u, sizes, scales=(sg, su), scale_block=block)
        return grouped_matmul(hidden_rows, d, sizes, rhs_scale=sd, scale_block=block)

    with captured_triton_modules() as modules:
        _, names = lower_and_verify(experts_ffn, x, gate, gate, down, gate_scale, gate_scale, down_scale,
                                    spec((experts,), jnp.int32))
    assert names == ["grouped_matmul_swiglu_fp8_bm64", "grouped_matmul_fp8_bm64"]
    for (_, module), num_weights in zip(modules, (2, 1)):
        loads = [line for line in str(module).splitlines() if "tt.load" in line and "tensor<" in line]
        assert sum("x!tt.ptr<f8E4M3FN>>" in line for line in loads) == num_weights, loads
