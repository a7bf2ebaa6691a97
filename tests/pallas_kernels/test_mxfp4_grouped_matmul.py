"""The MXFP4 grouped matmul (pallas_kernels/triton_mxfp4_grouped_matmul.py): interpret mode against
ragged_dot on the dequantized experts, every code and scale decoded in registers as the format
defines it, and the CUDA lowering at gpt-oss-120b's expert shape (uint8 tiles, MLIR verifier)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.mxfp4 import dequantize_packed_experts, e8m0_to_float, FP4_VALUES
from pallas_kernels.triton_mxfp4_grouped_matmul import e2m1_to_float, e8m0_to_scale, grouped_matmul_mxfp4
from tests.pallas_kernels.cuda_lowering import captured_triton_modules, lower_and_verify

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")


def mxfp4_experts(rng, num_groups, k_dim, n_dim):
    """Random packed codes (every code) and scales around 2^-4 (packed [G, K/2, N], scales [G, K/32, N])."""
    packed = jnp.asarray(rng.integers(0, 256, (num_groups, k_dim // 2, n_dim)), jnp.uint8)
    scales = jnp.asarray(rng.integers(120, 127, (num_groups, k_dim // 32, n_dim)), jnp.uint8)
    return packed, scales


def test_bit_decoding_is_the_value_table():
    codes = jnp.arange(16, dtype=jnp.int32)
    np.testing.assert_array_equal(np.asarray(e2m1_to_float(codes)), FP4_VALUES)
    exponents = np.arange(255, dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(e8m0_to_scale(jnp.asarray(exponents, jnp.int32))),
                                  e8m0_to_float(exponents))


# Group sizes with empty groups and ragged tiles (block_m 16); K 96 (3 scale blocks), N 48.
CASES = [([0, 5, 40, 0, 19], 64, jnp.float32), ([17, 0, 0, 3], 20, jnp.bfloat16), ([1, 2, 3], 10, jnp.float32)]


@pytest.mark.parametrize("sizes,num_rows,dtype", CASES)
def test_mxfp4_grouped_matmul_matches_ragged_dot_on_the_dequantized_experts(sizes, num_rows, dtype):
    rng = np.random.default_rng(sum(sizes))
    lhs = jnp.asarray(rng.standard_normal((num_rows, 96)), dtype)
    packed, scales = mxfp4_experts(rng, len(sizes), 96, 48)
    groups = jnp.asarray(sizes, jnp.int32)
    out = grouped_matmul_mxfp4(lhs, packed, scales, groups, block_m=16, block_n=16, interpret=True)
    assert out.dtype == dtype
    ref = jax.lax.ragged_dot(lhs, dequantize_packed_experts(packed, scales, dtype), groups,
                             preferred_element_type=jnp.float32)
    # The same weights in `dtype` (exact in both: at most 2 significant bits); f32: accumulation
    # order only; bf16: the result rounded once (2^-8 relative).
    tol = 1e-5 if dtype == jnp.float32 else 8e-3
    assert float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref))) / float(jnp.max(jnp.abs(ref))) < tol
    assert np.all(np.asarray(out[sum(sizes):]) == 0)


def test_mxfp4_grouped_matmul_refuses_mismatched_scales():
    packed, scales = mxfp4_experts(np.random.default_rng(0), 2, 64, 32)
    with pytest.raises(ValueError, match=r"must have shape \(2, 2, 32\), got \(2, 1, 32\)"):
        grouped_matmul_mxfp4(jnp.zeros((4, 64)), packed, scales[:, :1], jnp.asarray([2, 2]), interpret=True)


def test_mxfp4_grouped_matmul_lowers_for_cuda_at_gpt_oss_120b_shape():
    """gpt-oss-120b's experts (hidden 2880, intermediate 2880 -> gate and up 2880 x 2880 each, down
    2880 x 2880, 128 experts), bf16 activations: lowers for CUDA, passes the MLIR verifier, and
    loads its weight tiles as i8 (half a byte per weight) with no float weight loads."""
    spec = jax.ShapeDtypeStruct
    experts, hidden, inter, rows = 128, 2880, 2880, 1024 * 4
    x = spec((rows, hidden), jnp.bfloat16)
    packed, scales = spec((experts, hidden // 2, inter), jnp.uint8), spec((experts, hidden // 32, inter), jnp.uint8)
    with captured_triton_modules() as modules:
        _, names = lower_and_verify(lambda x, w, s, g: grouped_matmul_mxfp4(x, w, s, g), x, packed, scales,
                                    spec((experts,), jnp.int32))
    assert names == ["grouped_matmul_mxfp4_bm64"]
    loads = [line for line in str(modules[0][1]).splitlines() if "tt.load" in line and "tensor<" in line]
    assert sum("!tt.ptr<i8>>" in line for line in loads) == 2, loads  # packed tile and scales


def test_the_gpu_checks_mxfp4_moe_part_at_tiny_sizes(tmp_path):
    """`make gpu-check`'s part (jaxserve/benchmarks/gpu_parts.py) on CPU, kernels in interpret mode:
    every method timed and checked against the float32 product of the same weights."""
    import json

    from jaxserve.benchmarks import gpu_parts

    out = tmp_path / "mxfp4_moe.json"
    assert gpu_parts.main(["mxfp4_moe", "--out", str(out), "--seconds", "60", "--tiny"]) == 0
    result = json.loads(out.read_text())
    assert [row["tokens"] for row in result["rows"]] == [8, 40]
    for row in result["rows"]:
        assert row["mxfp4_speed_of_bf16"] > 0
        for method in ("bf16_triton", "bf16_xla", "mxfp4_triton", "mxfp4_dequantize"):
            assert row[f"{method}_ms"] > 0 and row[f"{method}_rel_err"] < 1e-2, (method, row)
