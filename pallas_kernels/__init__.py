"""Device kernels beside their pure-JAX references. Imports jax only.

The names below are loaded from their modules on first use (PEP 562 `__getattr__`), so that a
jax-free module of this package (`pallas_kernels.backends`) imports without jax: `import
jaxserve.config` reads the backend list from it and must not pull jax in."""

from __future__ import annotations

import typing

__all__ = [
    "BACKENDS",
    "KernelChoice",
    "choose_attention_kernel",
    "choose_fp8_matmul_kernel",
    "choose_mla_kernel",
    "choose_moe_kernel",
    "FP8_DTYPE",
    "dequantize_kv",
    "grouped_matmul_reference",
    "mla_paged_attention",
    "mla_paged_attention_reference",
    "moe_ffn",
    "moe_ffn_reference",
    "quantize_kv",
    "ragged_paged_attention",
    "ragged_paged_attention_reference",
    "write_kv_cache",
    "write_latent_cache",
]

if typing.TYPE_CHECKING:
    from pallas_kernels.backends import BACKENDS
    from pallas_kernels.dispatch import (KernelChoice, choose_attention_kernel, choose_fp8_matmul_kernel, choose_mla_kernel,
                                         choose_moe_kernel)
    from pallas_kernels.kv_cache import FP8_DTYPE, dequantize_kv, quantize_kv, write_kv_cache
    from pallas_kernels.mla_attention import mla_paged_attention, mla_paged_attention_reference, write_latent_cache
    from pallas_kernels.moe import grouped_matmul_reference, moe_ffn, moe_ffn_reference
    from pallas_kernels.paged_attention import ragged_paged_attention, ragged_paged_attention_reference


def __getattr__(name: str):
    if name == "BACKENDS":
        from pallas_kernels import backends as module
    elif name in ("KernelChoice", "choose_attention_kernel", "choose_fp8_matmul_kernel", "choose_mla_kernel",
                  "choose_moe_kernel"):
        from pallas_kernels import dispatch as module
    elif name in ("FP8_DTYPE", "dequantize_kv", "quantize_kv", "write_kv_cache"):
        from pallas_kernels import kv_cache as module
    elif name in ("mla_paged_attention", "mla_paged_attention_reference", "write_latent_cache"):
        from pallas_kernels import mla_attention as module
    elif name in ("grouped_matmul_reference", "moe_ffn", "moe_ffn_reference"):
        from pallas_kernels import moe as module
    elif name in ("ragged_paged_attention", "ragged_paged_attention_reference"):
        from pallas_kernels import paged_attention as module
    else:  # a submodule (`from pallas_kernels import dispatch`) is then imported by the import system
        raise AttributeError(f"module 'pallas_kernels' has no attribute {name!r}")
    value = getattr(module, name)
    globals()[name] = value  # later reads skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
