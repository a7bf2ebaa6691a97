"""Every Mosaic GPU kernel configuration the tests and the GPU check use lowers for a Hopper target
in CI, without a GPU.

How far that goes (jax 0.11.2 and 0.12, no CUDA plugin needed: jaxlib carries the Mosaic GPU
dialect): tracing under an abstract H100 mesh and lowering for "cuda" runs the Pallas-to-Mosaic
GPU lowering, layout inference and the dialect lowering to gpu/nvvm/llvm ops (TMA copies,
mbarriers, wgmma), with the MLIR verifier on every module, and checks shared memory against 227 KiB.
What needs the GPU: XLA's compile of the custom call (LLVM, PTX, ptxas: registers and spills), the
TMA descriptors built at run time, and running it.
"""

import pytest

import pallas_kernels.mosaic_paged_attention as attention_module
from jaxserve.benchmarks import kernel_check, kernels as kernel_bench
from tests.pallas_kernels import mosaic_attention_cases, mosaic_moe_cases
from tests.pallas_kernels.mosaic_attention_cases import lower_mosaic_for_cuda
from tests.pallas_kernels.test_cuda_lowering import decode_specs


def test_the_attention_kernels_test_configurations_lower():
    for name, fn, args in mosaic_attention_cases.lowering_cases():
        _, modules = lower_mosaic_for_cuda(fn, *args)
        assert modules >= 1, name


def test_the_grouped_matmul_test_and_model_shapes_lower():
    for fn, args in mosaic_moe_cases.lowering_cases():
        _, modules = lower_mosaic_for_cuda(fn, *args)
        assert modules >= 1


def test_the_gpu_checks_mosaic_cases_lower():
    """The smoke cases, the grouped sweep and the decode benchmark's grid (abstract caches up to
    34 GB); the attention sweep's configurations are the kernel tests' own (above)."""
    cases = [dict(group=4, head_dim=128, block_size=16, window=None, cap=None, splits=2, kind=kind)
             for kind in ("bf16", "fp8")]
    for case in cases:
        fn, args = kernel_check.attention_lowering(case, "mosaic")
        lower_mosaic_for_cuda(fn, *args)
    for case in kernel_check.pairwise(kernel_check.GROUPED_FACTORS):
        if not kernel_check.grouped_unsupported("mosaic", case):
            fn, args = kernel_check.grouped_lowering(case, "mosaic")
            lower_mosaic_for_cuda(fn, *args)
    sizes = kernel_bench.REDUCED_SIZES
    attention = kernel_check.attention_kernel("mosaic")
    for kv_dtype, batch, context in kernel_bench.decode_grid(sizes):
        splits = kernel_bench._kv_splits(batch, sizes["kv_heads"])
        lower_mosaic_for_cuda(lambda *a: attention(*a[:7], sm_scale=0.1, k_scale=a[7], v_scale=a[7],
                                                   num_kv_splits=splits),
                              *decode_specs(batch, context, sizes, kv_dtype))


def test_a_broken_module_fails_the_lowering(monkeypatch):
    """Negative control: a P tile whose swizzle differs from V's (the bug interpret mode missed for
    head_dim 80 and 96: wgmma wants both shared-memory operands alike) stops the lowering."""
    (_, fn, args), = [c for c in mosaic_attention_cases.lowering_cases() if c[0] == "decode-d128-bs16-bf16"]
    lower_mosaic_for_cuda(fn, *args)
    original = attention_module._tile

    def mismatched(shape, dtype, swizzle=None):
        return original(shape, dtype, swizzle=32 if tuple(shape) == (64, 64) else swizzle)

    monkeypatch.setattr(attention_module, "_tile", mismatched)
    with pytest.raises(Exception, match="(?i)swizzle|layout|transform"):
        lower_mosaic_for_cuda(lambda *a: fn(*a), *args)  # a new function: not the cached trace
