"""Device kernels beside their pure-JAX references. Imports jax only."""

from pallas_kernels.dispatch import BACKENDS, KernelChoice, choose_attention_kernel, choose_moe_kernel
from pallas_kernels.kv_cache import FP8_DTYPE, dequantize_kv, quantize_kv, write_kv_cache
from pallas_kernels.moe import grouped_matmul_reference, moe_ffn, moe_ffn_reference
from pallas_kernels.paged_attention import (
    ragged_paged_attention,
    ragged_paged_attention_reference,
)

__all__ = [
    "BACKENDS",
    "KernelChoice",
    "choose_attention_kernel",
    "choose_moe_kernel",
    "FP8_DTYPE",
    "dequantize_kv",
    "grouped_matmul_reference",
    "moe_ffn",
    "moe_ffn_reference",
    "quantize_kv",
    "ragged_paged_attention",
    "ragged_paged_attention_reference",
    "write_kv_cache",
]
