"""Lower a jitted function for CUDA on a machine without a GPU (REFERENCES.md §4), and verify the
Triton modules that lowering builds.

Traces under an abstract mesh whose device is an H100, then lowers for "cuda": this runs the
Pallas Triton lowering (block shapes, dot shapes, dtype rules) without PTX or a run. Lowering
alone accepts modules no GPU can compile (a loop bound typed i1 passed it, and every CUDA
lowering test, in session 5): `lower_and_verify` also runs the MLIR verifier on every Triton
module, as XLA's Triton pipeline does first on a GPU.
"""

from __future__ import annotations

import contextlib

import jax
from jax.sharding import AbstractDevice, AbstractMesh

H100 = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="gpu")


def lower_for_cuda(fn, *args) -> str:
    mesh = AbstractMesh((1,), ("x",), abstract_device=H100)
    with jax.sharding.use_abstract_mesh(mesh):
        lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    return lowered.as_text()


@contextlib.contextmanager
def captured_triton_modules():
    """Collects every Triton module built while the block runs (a list of (name, module))."""
    from jax._src.pallas.triton import lowering

    modules = []
    original = lowering.lower_jaxpr_to_triton_module

    def capture(jaxpr, *args, **kwargs):
        result = original(jaxpr, *args, **kwargs)
        modules.append((jaxpr.debug_info.func_name, result.module))
        return result

    lowering.lower_jaxpr_to_triton_module = capture
    try:
        yield modules
    finally:
        lowering.lower_jaxpr_to_triton_module = original


def lower_and_verify(fn, *args) -> tuple[str, list[str]]:
    """Lowers `fn` for CUDA and verifies each Triton module it builds; returns (StableHLO text,
    names of the verified kernels). Raises AssertionError naming the kernel that fails."""
    with captured_triton_modules() as modules:
        text = lower_for_cuda(fn, *args)
    for name, module in modules:
        try:
            module.operation.verify()
        except Exception as err:  # noqa: BLE001 - MLIRError; report the kernel and the first lines
            raise AssertionError(f"Triton module of {name} fails MLIR verification: {str(err)[:800]}") from None
    return text, [name for name, _ in modules]
