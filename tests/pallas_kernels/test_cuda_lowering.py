"""Every Triton kernel lowers for CUDA in CI without a GPU."""


import jax
import jax.numpy as jnp
import pytest

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")

from pallas_kernels import FP8_DTYPE
from pallas_kernels.triton_paged_attention import ragged_paged_attention_triton
from tests.pallas_kernels.cuda_lowering import lower_for_cuda


@pytest.mark.parametrize("cache_dtype,group,head_dim,splits", [
    (jnp.bfloat16, 4, 128, 1), (FP8_DTYPE, 3, 64, 4), (jnp.bfloat16, 8, 64, None),
])
def test_ragged_paged_attention_lowers_for_cuda(cache_dtype, group, head_dim, splits):
    tokens, kv_heads, blocks, block_size, seqs, width = 24, 2, 12, 16, 4, 6
    spec = jax.ShapeDtypeStruct
    args = (
        spec((tokens, kv_heads * group, head_dim), jnp.bfloat16),
        spec((blocks, block_size, kv_heads, head_dim), cache_dtype),
        spec((blocks, block_size, kv_heads, head_dim), cache_dtype),
        spec((seqs,), jnp.int32), spec((seqs, width), jnp.int32), spec((seqs + 1,), jnp.int32),
        spec((), jnp.int32), spec((), jnp.float32), spec((), jnp.float32),
    )

    def fn(q, k, v, lens, tables, cu, n, k_scale, v_scale):
        return ragged_paged_attention_triton(q, k, v, lens, tables, cu, n, sm_scale=0.1,
                                             sliding_window=64, soft_cap=30.0, k_scale=k_scale,
                                             v_scale=v_scale, num_kv_splits=splits)

    text = lower_for_cuda(fn, *args)
    assert "__gpu$xla.gpu.triton" in text or "triton" in text
