"""Which kernel runs attention, MLA (latent) attention and the MoE experts, and why.

Backends, as `attention_backend=` and the kernels' `backend=` take them:
- "reference": the pure-JAX reference (the CPU production path);
- "triton": the Pallas kernel with the Triton lowering (any NVIDIA GPU; interpret mode on CPU);
- "mosaic": the Pallas kernel with the Mosaic GPU lowering (Hopper, sm_90: both kernels use
  wgmma, which Blackwell replaced with tcgen05);
- "pallas": Mosaic GPU on sm_90 where it takes the shape, else Triton, else the reference;
- "auto": on a GPU, the kernel measured fastest there that takes the shape (MEASURED_FASTEST),
  then the other, then the reference; elsewhere (CPU; TPU until a Mosaic TPU kernel exists) the
  reference.

The choice depends only on static facts (platform, shapes, dtypes), so the engine logs at start-up
exactly what its traced steps will run. An explicit "triton" or "mosaic" that cannot take the
shape is an error naming the reason; "pallas" and "auto" fall back and say why. A kernel whose
module does not import on this jax (Triton's lowering is deprecated; Mosaic GPU's API moves) is
one that cannot take the shape, with that reason.
"""

from __future__ import annotations

import dataclasses
import importlib

import jax
import jax.numpy as jnp

from pallas_kernels.backends import BACKENDS

# The faster kernel per compute capability major, measured with `make gpu-check`.
# sm_90: an H200 on 2026-12-04 (benchmarks/results/2026-12-04-nvidia-h200.json): Triton decoded
# at 0.96-1.21x Mosaic GPU's speed in bf16 and 0.89-1.32x in fp8 (batch 8-256, context 4k-32k;
# faster in 8 of 12 rows), and its grouped matmul ran 1.26x Mosaic GPU's on the Mixtral shape
# (equal on Qwen3-MoE). Both kernels agreed with the reference engine.
MEASURED_FASTEST = {9: {"attention": "triton", "moe": "triton"}}


@dataclasses.dataclass(frozen=True)
class KernelChoice:
    backend: str  # "reference", "triton" or "mosaic"
    reason: str


def gpu_compute_capability() -> tuple[int, int] | None:
    """(major, minor) of the default device when it is an NVIDIA GPU, else None."""
    if jax.default_backend() != "gpu":
        return None
    capability = getattr(jax.devices()[0], "compute_capability", None)
    if not capability:
        return None
    major, _, minor = str(capability).partition(".")
    return int(major), int(minor or 0)


def _kernel_reason(module: str, function: str, **shape) -> str | None:
    """The kernel's own verdict on the shape, or why it cannot be asked (its module does not import
    on this jax: the engine then runs another kernel instead of failing)."""
    try:
        kernels = importlib.import_module(f"pallas_kernels.{module}")
    except (ImportError, AttributeError) as err:
        return f"its module does not import here ({type(err).__name__}: {err})"
    return getattr(kernels, function)(**shape)


def _sm(capability) -> str:
    return "no GPU" if capability is None else f"sm_{capability[0]}{capability[1]}"


def _choose(kind: str, requested: str, reasons: dict, capability, platform: str, option: str = "") -> KernelChoice:
    """reasons: backend -> why it cannot take the shape (None: it can). option: the engine option
    that errors name (default `{kind}_backend`)."""
    option = option or f"{kind}_backend"
    if requested not in BACKENDS:
        raise ValueError(f"{option} must be one of {BACKENDS}, got {requested!r}")
    if requested == "reference":
        return KernelChoice("reference", "requested")
    if requested in ("triton", "mosaic"):
        if reasons[requested] is not None:
            raise ValueError(f"{option}={requested!r} cannot run this model: {reasons[requested]}")
        return KernelChoice(requested, "requested")
    if requested == "auto" and platform != "gpu":
        return KernelChoice("reference", f"no GPU ({platform}): the pure-JAX reference")
    reasons = dict(reasons)
    if capability is None or capability[0] != 9:
        reasons["mosaic"] = reasons["mosaic"] or f"its wgmma kernels need Hopper (sm_90), this is {_sm(capability)}"
    fastest = MEASURED_FASTEST.get(capability[0] if capability else None, {}).get(kind)
    if requested == "pallas":
        order, why = ("mosaic", "triton"), "Mosaic GPU first ('pallas')"
    elif fastest:
        order = (fastest,) + tuple(k for k in ("mosaic", "triton") if k != fastest)
        why = f"measured fastest on {_sm(capability)}"
    else:
        order, why = ("triton", "mosaic"), f"no measurement on {_sm(capability)}: Triton first"
    names = {"mosaic": "Mosaic GPU", "triton": "Triton"}
    notes = []
    for backend in order:
        if reasons[backend] is None:
            return KernelChoice(backend, f"{names[backend]} on {_sm(capability)}: " + "; ".join([why] + notes))
        notes.append(f"{names[backend]}: {reasons[backend]}")
    return KernelChoice("reference", "pure-JAX reference (" + "; ".join(notes) + ")")


def choose_attention_kernel(requested: str, *, num_q_heads: int, num_kv_heads: int, head_dim: int,
                            block_size: int, q_dtype, cache_dtype, capability=..., platform=None) -> KernelChoice:
    """The ragged paged attention kernel for these shapes (see the module doc); `capability` and
    `platform` default to the default device's."""
    shape = dict(num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                 block_size=block_size, q_dtype=jnp.dtype(q_dtype), cache_dtype=jnp.dtype(cache_dtype))
    reasons = {"triton": _kernel_reason("triton_paged_attention", "unsupported_reason", **shape),
               "mosaic": _kernel_reason("mosaic_paged_attention", "mosaic_unsupported_reason", **shape)}
    return _choose("attention", requested, reasons, gpu_compute_capability() if capability is ... else capability,
                   platform or jax.default_backend())


def choose_moe_kernel(requested: str, *, hidden_size: int, intermediate_size: int, num_experts: int,
                      dtype, weight_dtype=None, scale_block: tuple[int, int] | None = None, capability=...,
                      platform=None) -> KernelChoice:
    """The grouped-matmul kernel of the MoE experts for these shapes (see the module doc). `dtype`
    is the activations'; `weight_dtype` the experts' (default: `dtype`), float8_e4m3fn for
    block-FP8 experts in blocks of `scale_block`, which the Triton kernel dequantizes tile by tile
    and the Mosaic GPU one does not take; uint8 for MXFP4 experts, which the Triton MXFP4 grouped
    matmul unpacks tile by tile (pallas_kernels/triton_mxfp4_grouped_matmul.py)."""
    dtype = jnp.dtype(dtype)
    weight_dtype = dtype if weight_dtype is None else jnp.dtype(weight_dtype)
    fp8 = weight_dtype == jnp.dtype(jnp.float8_e4m3fn)
    capability = gpu_compute_capability() if capability is ... else capability
    if weight_dtype == jnp.dtype(jnp.uint8):  # MXFP4 experts (pallas_kernels/mxfp4.py): Triton's W4A16 kernel
        reasons = {"triton": _kernel_reason("triton_mxfp4_grouped_matmul", "unsupported_reason",
                                            hidden_size=hidden_size, intermediate_size=intermediate_size),
                   "mosaic": "MXFP4 (uint8) weights: the Mosaic GPU grouped matmul multiplies bf16/f16 weights only"}
        return _choose("moe", requested, reasons, capability, platform or jax.default_backend())
    triton = _kernel_reason("triton_grouped_matmul", "unsupported_reason", hidden_size=hidden_size,
                            intermediate_size=intermediate_size, dtype=dtype, weight_dtype=weight_dtype,
                            scale_block=scale_block)
    if fp8 and triton is None and capability is not None and capability < (8, 9):
        triton = f"its fp8 -> bf16 conversion needs sm_89 or newer, this is {_sm(capability)}"
    reasons = {"triton": triton,
               "mosaic": ("float8_e4m3fn weights: the Mosaic GPU grouped matmul multiplies bf16/f16 weights only"
                          if fp8 else
                          _kernel_reason("mosaic_grouped_matmul", "mosaic_unsupported_reason", num_rows=1024,
                                         k_dim=hidden_size, n_dim=intermediate_size, num_groups=num_experts,
                                         dtype=dtype))}
    return _choose("moe", requested, reasons, capability, platform or jax.default_backend())


# MLA kernels per backend: (module, its verdict function), or the reason there is none.
MLA_KERNELS = {"triton": ("triton_mla_attention", "unsupported_reason"),
               "mosaic": "no Mosaic GPU MLA kernel exists (the Triton one runs on every NVIDIA GPU)"}


def choose_mla_kernel(requested: str, *, num_heads: int, kv_lora_rank: int, rope_dim: int, block_size: int,
                      q_dtype, cache_dtype, capability=..., platform=None) -> KernelChoice:
    """The MLA (latent) attention kernel for these shapes, by attention's rules (module doc); a
    backend without an MLA kernel is one that cannot take the shape, with that reason."""
    shape = dict(num_heads=num_heads, kv_lora_rank=kv_lora_rank, rope_dim=rope_dim, block_size=block_size,
                 q_dtype=jnp.dtype(q_dtype), cache_dtype=jnp.dtype(cache_dtype))
    reasons = {backend: kernel if isinstance(kernel, str) else _kernel_reason(*kernel, **shape)
               for backend, kernel in MLA_KERNELS.items()}
    return _choose("mla", requested, reasons, gpu_compute_capability() if capability is ... else capability,
                   platform or jax.default_backend(), option="attention_backend")


def choose_fp8_matmul_kernel(requested: str, *, k_dim: int, n_dim: int, weight_block, dtype, capability=...,
                             platform=None) -> KernelChoice:
    """The block-scaled fp8 matmul kernel for an fp8 weight [k_dim, n_dim] in blocks `weight_block`
    with `dtype` activations (models.quantization.block_fp8_matmul), by attention's rules (module
    doc). "auto" on a GPU takes the Triton kernel where it takes the shape: unmeasured until a GPU
    run (`make gpu-check`, part fp8_matmul); "reference" is the XLA product."""
    capability = gpu_compute_capability() if capability is ... else capability
    reasons = {"triton": _kernel_reason("triton_fp8_matmul", "unsupported_reason", k_dim=k_dim, n_dim=n_dim,
                                        weight_block=tuple(weight_block), dtype=jnp.dtype(dtype), capability=capability),
               "mosaic": "no Mosaic GPU block-FP8 matmul exists (the Triton one runs on sm_89 and newer)"}
    return _choose("fp8_matmul", requested, reasons, capability, platform or jax.default_backend(),
                   option="block_fp8_matmul's kernel")
