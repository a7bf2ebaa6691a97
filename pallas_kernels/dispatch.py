"""Which kernel runs attention and the MoE experts, and why.

Backends, as `attention_backend=` and the kernels' `backend=` take them:
- "reference": the pure-JAX reference (the CPU production path);
- "triton": the Pallas kernel with the Triton lowering (any NVIDIA GPU; interpret mode on CPU);
- "mosaic": the Pallas kernel with the Mosaic GPU lowering (Hopper, sm_90: both kernels use
  wgmma, which Blackwell replaced with tcgen05);
- "pallas": Mosaic GPU on sm_90 where it takes the shape, else Triton, else the reference;
- "auto": "pallas" on a GPU, "reference" elsewhere (CPU; TPU until a Mosaic TPU kernel exists).

The choice depends only on static facts (platform, shapes, dtypes), so the engine logs at start-up
exactly what its traced steps will run. An explicit "triton" or "mosaic" that cannot take the
shape is an error naming the reason; "pallas" and "auto" fall back and say why.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

BACKENDS = ("auto", "reference", "triton", "mosaic", "pallas")


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


def _mosaic_reason(module: str, **shape) -> str | None:
    """The Mosaic GPU kernel's own verdict, or why it cannot be asked (this jax lacks an API it
    uses: the engine then runs the Triton kernel instead of failing)."""
    import importlib

    try:
        kernels = importlib.import_module(f"pallas_kernels.{module}")
    except (ImportError, AttributeError) as err:
        return f"the Mosaic GPU kernel does not import here ({type(err).__name__}: {err})"
    return kernels.mosaic_unsupported_reason(**shape)


def _choose(kind: str, requested: str, reasons: dict, capability) -> KernelChoice:
    """reasons: backend -> why it cannot take the shape (None: it can)."""
    if requested not in BACKENDS:
        raise ValueError(f"{kind}_backend must be one of {BACKENDS}, got {requested!r}")
    if requested == "reference":
        return KernelChoice("reference", "requested")
    if requested in ("triton", "mosaic"):
        if reasons[requested] is not None:
            raise ValueError(f"{kind}_backend={requested!r} cannot run this model: {reasons[requested]}")
        return KernelChoice(requested, "requested")
    if requested == "auto" and jax.default_backend() != "gpu":
        return KernelChoice("reference", f"no GPU ({jax.default_backend()}): the pure-JAX reference")
    # "pallas", or "auto" on a GPU.
    hopper = capability is not None and capability[0] == 9
    notes = []
    if hopper and reasons["mosaic"] is None:
        return KernelChoice("mosaic", f"Mosaic GPU on sm_{capability[0]}{capability[1]}")
    notes.append("Mosaic GPU: " + (reasons["mosaic"] or "its wgmma kernels need Hopper (sm_90)"
                                    + ("" if capability is None else f", this is sm_{capability[0]}{capability[1]}")))
    if reasons["triton"] is None:
        return KernelChoice("triton", "Triton (" + "; ".join(notes) + ")")
    notes.append("Triton: " + reasons["triton"])
    return KernelChoice("reference", "pure-JAX reference (" + "; ".join(notes) + ")")


def choose_attention_kernel(requested: str, *, num_q_heads: int, num_kv_heads: int, head_dim: int,
                            block_size: int, q_dtype, cache_dtype, capability=...) -> KernelChoice:
    """The ragged paged attention kernel for these shapes (see the module doc)."""
    from pallas_kernels import triton_paged_attention

    shape = dict(num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                 block_size=block_size, q_dtype=jnp.dtype(q_dtype), cache_dtype=jnp.dtype(cache_dtype))
    reasons = {"triton": triton_paged_attention.unsupported_reason(**shape),
               "mosaic": _mosaic_reason("mosaic_paged_attention", **shape)}
    return _choose("attention", requested, reasons, gpu_compute_capability() if capability is ... else capability)


def choose_moe_kernel(requested: str, *, hidden_size: int, intermediate_size: int, num_experts: int,
                      dtype, capability=...) -> KernelChoice:
    """The grouped-matmul kernel of the MoE experts for these shapes (see the module doc)."""
    from pallas_kernels import triton_grouped_matmul

    dtype = jnp.dtype(dtype)
    reasons = {"triton": triton_grouped_matmul.unsupported_reason(
                   hidden_size=hidden_size, intermediate_size=intermediate_size, dtype=dtype),
               "mosaic": _mosaic_reason("mosaic_grouped_matmul", num_rows=1024, k_dim=hidden_size,
                                        n_dim=intermediate_size, num_groups=num_experts, dtype=dtype)}
    return _choose("moe", requested, reasons, gpu_compute_capability() if capability is ... else capability)
