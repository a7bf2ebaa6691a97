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


@pytest.mark.parametrize("case,kv_dtype", [("llama-gqa3", jnp.bfloat16), ("llama-gqa3", FP8_DTYPE),
                                           ("mixtral-8x2", jnp.bfloat16)])
def test_a_model_step_with_the_kernels_inside_lowers_for_cuda(case, kv_dtype):
    """The engine check's models in bfloat16 (what they run as on a GPU): forward and logits of a
    mixed step, with both kernels selected, lower for CUDA: the kernels in the model's context
    (bf16 activations, fp8 caches with scales, routed tokens) pass the Triton lowering."""
    from flax import nnx

    from jaxserve.benchmarks.engine_check import CASES, model_config
    from models.layers import AttentionMetadata
    from models.loader import random_model

    architecture, extra, _ = CASES[case]
    config = model_config(architecture, extra, tiny=False)
    graphdef, state = nnx.split(nnx.eval_shape(
        lambda: random_model(config, dtype=jnp.bfloat16, attention_backend="pallas", moe_backend="pallas").model))
    spec = jax.ShapeDtypeStruct
    tokens, rows, width, blocks = 128, 16, 32, 64
    cache = spec((blocks, 16, config.num_kv_heads, config.head_dim), kv_dtype)
    layer_cache = (cache, cache) + ((spec((), jnp.float32),) * 2 if kv_dtype == FP8_DTYPE else ())
    meta = AttentionMetadata(
        slot_mapping=spec((tokens,), jnp.int32), query_start_loc=spec((rows + 1,), jnp.int32),
        seq_lens=spec((rows,), jnp.int32), block_tables=spec((rows, width), jnp.int32),
        num_seqs=spec((), jnp.int32), token_mask=spec((tokens,), jnp.bool_))

    def step(state, caches, ids, positions, meta):
        model = nnx.merge(graphdef, state)
        hidden, caches = model(ids, positions, caches, meta)
        return model.compute_logits(hidden), caches

    text = lower_for_cuda(step, state, [layer_cache] * config.num_layers, spec((tokens,), jnp.int32),
                          spec((tokens,), jnp.int32), meta)
    kernels = text.count("triton")
    assert kernels >= config.num_layers * (2 if config.is_moe else 1), kernels
