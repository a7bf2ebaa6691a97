"""Every Triton module the GPU check builds lowers for CUDA in CI, without a GPU, and passes the MLIR
verifier (what XLA's Triton pipeline checks first on a GPU; lowering alone let a loop bound typed
i1 through, which no GPU compiles):
- the kernel sweep's pairwise cases (the GPU check runs these first) and its smoke cases;
- the decode and MoE benchmark shapes, among them an fp8 cache of 2^31 elements (read as words);
- the engine check's model steps and the end-to-end 8B model's step, with the kernels inside.
"""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from jaxserve.benchmarks import kernel_check, kernels as kernel_bench
from pallas_kernels import FP8_DTYPE
from pallas_kernels.triton_grouped_matmul import grouped_matmul, grouped_matmul_swiglu
from pallas_kernels.triton_paged_attention import ragged_paged_attention_triton
from tests.pallas_kernels.cuda_lowering import captured_triton_modules, lower_and_verify, lower_for_cuda
from models.kv_spec import KVCache

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")
spec = jax.ShapeDtypeStruct


def test_sweep_cases_lower_and_verify():
    cases = kernel_check.pairwise(kernel_check.ATTENTION_FACTORS)
    smoke = [dict(group=4, head_dim=128, block_size=16, window=None, cap=None, splits=2, kind=kind)
             for kind in ("bf16", "fp8", "f32")]
    for case in cases + smoke:
        fn, args = kernel_check.attention_lowering(case, "triton")
        _, names = lower_and_verify(fn, *args)
        assert len(names) == 1, (case, names)
    for case in kernel_check.pairwise(kernel_check.GROUPED_FACTORS):
        fn, args = kernel_check.grouped_lowering(case, "triton")
        _, names = lower_and_verify(fn, *args)
        assert len(names) == 2, (case, names)


def decode_specs(batch, context, sizes, kv_dtype):
    """The decode benchmark's arguments (kernels.decode_case) as abstract values: no memory."""
    bs, hkv, hq, d = sizes["block_size"], sizes["kv_heads"], sizes["q_heads"], sizes["head_dim"]
    per_seq = -(-context // bs)
    cache = spec((batch * per_seq + 1, bs, hkv, d), FP8_DTYPE if kv_dtype == "fp8" else jnp.bfloat16)
    return (spec((batch, hq, d), jnp.bfloat16), cache, cache, spec((batch,), jnp.int32), spec((batch, per_seq), jnp.int32),
            spec((batch + 1,), jnp.int32), spec((), jnp.int32), spec((), jnp.float32))


def test_decode_benchmark_shapes_lower_and_verify():
    sizes = kernel_bench.REDUCED_SIZES
    words = 0
    for kv_dtype, batch, context in kernel_bench.decode_grid(sizes):
        args = decode_specs(batch, context, sizes, kv_dtype)
        splits = kernel_bench._kv_splits(batch, sizes["kv_heads"])
        with captured_triton_modules() as modules:
            _, names = lower_and_verify(lambda *a: ragged_paged_attention_triton(
                *a[:7], sm_scale=0.1, k_scale=a[7], v_scale=a[7], num_kv_splits=splits), *args)
        words += any("i16" in str(module) for _, module in modules)
        assert names, (kv_dtype, batch, context)
    assert words == 1  # fp8 at batch 64 x 32k: 2^31 elements and one block, read as 16-bit words


def test_moe_benchmark_shapes_lower_and_verify():
    for experts, top_k, hidden, inter in kernel_bench.MOE_SHAPES.values():
        rows = 1024 * top_k
        x, gate, down = spec((rows, hidden), jnp.bfloat16), spec((experts, hidden, inter), jnp.bfloat16), \
            spec((experts, inter, hidden), jnp.bfloat16)
        sizes = spec((experts,), jnp.int32)
        _, names = lower_and_verify(lambda x, g, u, d, s: grouped_matmul(grouped_matmul_swiglu(x, g, u, s), d, s),
                                    x, gate, gate, down, sizes)
        assert len(names) == 2


def _model_step_specs(config, kv_dtype, tokens, rows, width, blocks, block_size=16):
    from models.layers import AttentionMetadata

    cache = spec((blocks, block_size, config.num_kv_heads, config.head_dim), kv_dtype)
    layer_cache = KVCache((cache, cache), (spec((), jnp.float32),) * 2 if kv_dtype == FP8_DTYPE else ())
    meta = AttentionMetadata(
        slot_mapping=spec((tokens,), jnp.int32), query_start_loc=spec((rows + 1,), jnp.int32),
        seq_lens=spec((rows,), jnp.int32), block_tables=spec((rows, width), jnp.int32),
        num_seqs=spec((), jnp.int32), token_mask=spec((tokens,), jnp.bool_))
    return [layer_cache] * config.num_layers, spec((tokens,), jnp.int32), spec((tokens,), jnp.int32), meta


def _lower_model_step(config, kv_dtype, backend, tokens, rows, width, blocks):
    from flax import nnx

    from models.loader import random_model

    graphdef, state = nnx.split(nnx.eval_shape(
        lambda: random_model(config, dtype=jnp.bfloat16, attention_backend=backend, moe_backend=backend).model))

    def step(state, caches, ids, positions, meta):
        model = nnx.merge(graphdef, state)
        hidden, caches = model(ids, positions, caches, meta)
        return model.compute_logits(hidden), caches

    return lower_and_verify(step, state, *_model_step_specs(config, kv_dtype, tokens, rows, width, blocks))


def _kernel_calls(text: str, backend: str) -> int:
    """Pallas custom calls of one backend in lowered StableHLO text."""
    return text.count("__gpu$xla.gpu.triton") if backend == "triton" else text.count("mosaic_gpu")


@pytest.mark.parametrize("backend", ["triton", "mosaic"])
@pytest.mark.parametrize("case,kv_dtype", [("llama-gqa3", jnp.bfloat16), ("llama-gqa3", FP8_DTYPE),
                                           ("mixtral-8x2", jnp.bfloat16)])
def test_the_engine_check_steps_lower_and_verify(case, kv_dtype, backend):
    """The engine check's models in bfloat16 (what they run as on a GPU): forward and logits of a
    mixed step, with each Pallas backend selected, lower for CUDA (Triton modules also verified):
    the kernels in the model's context (bf16 activations, fp8 caches with scales, routed tokens)."""
    from jaxserve.benchmarks.engine_check import CASES, model_config

    architecture, extra, _ = CASES[case]
    config = model_config(architecture, extra, tiny=False)
    text, names = _lower_model_step(config, kv_dtype, backend, tokens=128, rows=16, width=32, blocks=64)
    calls = config.num_layers * (3 if config.is_moe else 1)
    assert _kernel_calls(text, backend) >= calls and len(names) == (calls if backend == "triton" else 0), names


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["triton", "mosaic"])
def test_the_end_to_end_8b_step_lowers_and_verifies(backend):
    from jaxserve.benchmarks.end_to_end import LLAMA_8B
    from models.config import ModelConfig

    config = dataclasses.replace(ModelConfig.from_hf(LLAMA_8B), num_layers=2)  # every layer is the same
    for tokens, rows in ((16, 1), (256, 256)):
        text, _ = _lower_model_step(config, jnp.bfloat16, backend, tokens=tokens, rows=rows, width=64, blocks=4096)
        assert _kernel_calls(text, backend) >= 2


def test_the_verifier_catches_a_module_no_gpu_compiles(monkeypatch):
    """Negative control: the grouped matmul's K loop with its bound typed as the predicate (i1),
    as `jnp.where(end > start, k_dim // block_k, 0)` lowered before the fix."""
    import pallas_kernels.triton_grouped_matmul as module

    monkeypatch.setattr(module, "_steps", lambda start, end, steps: jnp.where(end > start, steps, 0))
    with pytest.raises(AssertionError, match="fails MLIR verification"):
        lower_and_verify(lambda a, b, s: grouped_matmul(a, b, s), spec((64, 256), jnp.bfloat16),
                         spec((4, 256, 128), jnp.bfloat16), spec((4,), jnp.int32))


def test_lower_for_cuda_still_names_triton():
    text = lower_for_cuda(lambda a, b, s: grouped_matmul(a, b, s), spec((64, 256), jnp.bfloat16),
                          spec((4, 256, 128), jnp.bfloat16), spec((4,), jnp.int32))
    assert "triton" in text
