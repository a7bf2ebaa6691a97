"""Lower a jitted function for CUDA on a machine without a GPU (REFERENCES.md §4).

Traces under an abstract mesh whose device is an H100, then lowers for "cuda": this runs the
Pallas Triton lowering (block shapes, dot shapes, dtype rules) without PTX or a run.
"""

import jax
from jax.sharding import AbstractDevice, AbstractMesh


def lower_for_cuda(fn, *args) -> str:
    device = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="gpu")
    mesh = AbstractMesh((1,), ("x",), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    return lowered.as_text()
