"""The Triton-lowered MoE grouped matmul (interpret mode) against jax.lax.ragged_dot and numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import moe_ffn
from pallas_kernels.triton_grouped_matmul import grouped_matmul, grouped_matmul_swiglu
from tests.pallas_kernels.cuda_lowering import lower_for_cuda
from tests.pallas_kernels.test_moe import naive_moe

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")

# Group sizes with empty groups, a group smaller than a tile, one spanning several tiles, and
# (last case) sizes summing to fewer than M rows: the tail rows must come back zero.
CASES = [
    ([0, 5, 40, 0, 19], 64, jnp.float32),
    ([17, 0, 0, 3], 20, jnp.bfloat16),
    ([1, 2, 3], 10, jnp.float32),
]


@pytest.mark.parametrize("sizes,num_rows,dtype", CASES)
def test_grouped_matmul_matches_ragged_dot(sizes, num_rows, dtype):
    rng = np.random.default_rng(sum(sizes))
    k_dim, n_dim = 64, 32
    lhs = jnp.asarray(rng.standard_normal((num_rows, k_dim)), dtype)
    rhs = jnp.asarray(rng.standard_normal((len(sizes), k_dim, n_dim)) * 0.2, dtype)
    groups = jnp.asarray(sizes, jnp.int32)
    out = grouped_matmul(lhs, rhs, groups, block_m=16, interpret=True)
    ref = jax.lax.ragged_dot(lhs.astype(jnp.float32), rhs.astype(jnp.float32), groups)
    # f32: accumulation order only (1e-5). bf16: the kernel rounds its f32 result to bf16 once
    # (2^-8 relative).
    tol = 1e-5 if dtype == jnp.float32 else 8e-3
    scale = float(jnp.max(jnp.abs(ref)))
    assert float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref))) / scale < tol
    assert np.all(np.asarray(out[sum(sizes):]) == 0)


def test_fused_swiglu_matches_unfused():
    rng = np.random.default_rng(3)
    sizes = jnp.asarray([7, 0, 25], jnp.int32)
    lhs = jnp.asarray(rng.standard_normal((32, 32)), jnp.float32)
    w_gate, w_up = (jnp.asarray(rng.standard_normal((3, 32, 48)) * 0.3, jnp.float32) for _ in range(2))
    out = grouped_matmul_swiglu(lhs, w_gate, w_up, sizes, block_m=16, interpret=True)
    ref = jax.nn.silu(jax.lax.ragged_dot(lhs, w_gate, sizes)) * jax.lax.ragged_dot(lhs, w_up, sizes)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_moe_ffn_pallas_matches_naive():
    rng = np.random.default_rng(11)
    num_tokens, num_experts, top_k, hidden, inter = 13, 8, 2, 32, 48
    x = rng.standard_normal((num_tokens, hidden)).astype(np.float32)
    ids = np.stack([rng.choice(4, top_k, replace=False) for _ in range(num_tokens)]).astype(np.int32)
    weights = rng.random((num_tokens, top_k)).astype(np.float32)
    w_gate, w_up = (rng.standard_normal((num_experts, hidden, inter)).astype(np.float32) * 0.2 for _ in range(2))
    w_down = rng.standard_normal((num_experts, inter, hidden)).astype(np.float32) * 0.2
    out = moe_ffn(*map(jnp.asarray, (x, ids, weights, w_gate, w_up, w_down)), backend="pallas", interpret=True)
    ref = naive_moe(x, ids, weights, w_gate, w_up, w_down)
    assert np.max(np.abs(np.asarray(out) - ref)) / np.max(np.abs(ref)) < 1e-5


def test_bad_shapes_name_the_field():
    with pytest.raises(ValueError, match="K"):
        grouped_matmul(jnp.zeros((4, 24)), jnp.zeros((2, 24, 32)), jnp.array([2, 2]), interpret=True)
    with pytest.raises(ValueError, match="group_sizes"):
        grouped_matmul(jnp.zeros((4, 32)), jnp.zeros((2, 32, 32)), jnp.array([4]), interpret=True)


def test_grouped_matmuls_lower_for_cuda():
    spec = jax.ShapeDtypeStruct
    lhs, w = spec((256, 512), jnp.bfloat16), spec((8, 512, 256), jnp.bfloat16)
    sizes = spec((8,), jnp.int32)
    assert "triton" in lower_for_cuda(lambda a, b, g: grouped_matmul(a, b, g), lhs, w, sizes)
    assert "triton" in lower_for_cuda(lambda a, b, c, g: grouped_matmul_swiglu(a, b, c, g), lhs, w, w, sizes)


def test_shared_memory_stays_under_hopper_limit():
    """float32 fused SwiGLU at 3 stages asked for 240 KB, over the 227 KB a block gets on an
    H100/H200: the kernel now runs fewer stages where three do not fit."""
    from pallas_kernels.triton_grouped_matmul import SHARED_MEMORY_BYTES, _fitting_stages, shared_memory_bytes

    assert shared_memory_bytes(64, 128, 64, 2, 4, 3) == 240 * 1024 > SHARED_MEMORY_BYTES
    assert _fitting_stages(64, 128, 64, 2, 4, 3) == 2
    assert _fitting_stages(64, 128, 64, 2, 2, 3) == 3  # bf16 keeps three
    for itemsize in (2, 4):
        for num_rhs in (1, 2):
            stages = _fitting_stages(64, 128, 64, num_rhs, itemsize, 3)
            assert shared_memory_bytes(64, 128, 64, num_rhs, itemsize, stages) <= SHARED_MEMORY_BYTES


def test_float32_swiglu_is_compiled_with_stages_that_fit():
    from tests.pallas_kernels.cuda_lowering import H100
    from jax.sharding import AbstractMesh

    spec = jax.ShapeDtypeStruct
    lhs, w = spec((256, 512), jnp.float32), spec((8, 512, 256), jnp.float32)
    with jax.sharding.use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=H100)):
        text = jax.jit(lambda a, b, c, g: grouped_matmul_swiglu(a, b, c, g)).trace(
            lhs, w, w, spec((8,), jnp.int32)).lower(lowering_platforms=("cuda",)).as_text()
    assert "num_stages = 2 : i32" in text, text[-2000:]
