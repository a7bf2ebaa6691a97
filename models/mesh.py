"""The device mesh and the one table that maps logical axes to mesh axes.

Mesh axes: `dp` (data parallel: batch and KV cache blocks, models/dp_attention.py), `ep`
(expert parallel: experts split over `dp` x `ep`, the expert group spanning the dp shards,
models/expert_parallel.py), `tp`
(tensor parallel: attention heads, KV heads, MLP and expert intermediate dims, vocab). Every
parameter carries `logical_axes` metadata (models/layers.py); `LOGICAL_RULES` decides each one's
`PartitionSpec`, and the KV cache's.
A mesh axis is dropped from a spec when it does not divide the dimension (e.g. 2 KV heads over
tp=4 stay replicated), so every layout is valid.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("dp", "ep", "tp")
# Auto axes: the compiler propagates shardings through the forward pass (GSPMD); the MoE block
# is the one place that takes manual control (jax.shard_map, models/expert_parallel.py).
AXIS_TYPES = (AxisType.Auto, AxisType.Auto, AxisType.Auto)

# Logical axis -> mesh axis (None: replicated). The single place that decides every layout.
LOGICAL_RULES: dict[str | None, str | None] = {
    "vocab": "tp",
    "embed": None,
    "q_heads": "tp",
    "kv_heads": "tp",
    "mlp": "tp",
    "expert": ("dp", "ep"),  # the expert group spans the dp shards (wide EP, models/expert_parallel.py)
    "norm": None,
    "batch": ("dp", "ep"),
    "cache_blocks": "dp",  # each dp shard holds its own blocks (models/dp_attention.py)
    "cache_heads": "tp",
    None: None,
}


def make_mesh(data_parallel_size: int = 1, expert_parallel_size: int = 1, tensor_parallel_size: int = 1,
              devices=None) -> Mesh:
    """A (dp, ep, tp) mesh over the first dp*ep*tp devices (or `devices`)."""
    sizes = {"data_parallel_size": data_parallel_size, "expert_parallel_size": expert_parallel_size,
             "tensor_parallel_size": tensor_parallel_size}
    for name, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    need = data_parallel_size * expert_parallel_size * tensor_parallel_size
    devices = list(jax.devices() if devices is None else devices)
    if need > len(devices):
        raise ValueError(
            f"data_parallel_size * expert_parallel_size * tensor_parallel_size = {need} exceeds the "
            f"{len(devices)} available devices")
    grid = np.asarray(devices[:need], dtype=object).reshape(data_parallel_size, expert_parallel_size,
                                                            tensor_parallel_size)
    return Mesh(grid, MESH_AXES, axis_types=AXIS_TYPES)


def spec_for(logical_axes, shape, mesh: Mesh, rules=None) -> P:
    """PartitionSpec for a value with `logical_axes`; mesh axes that do not divide a dim drop."""
    rules = LOGICAL_RULES if rules is None else rules
    entries = []
    used: set[str] = set()
    for axis, dim in zip(logical_axes, shape):
        target = rules.get(axis)
        names = (target,) if isinstance(target, str) else tuple(target or ())
        names = tuple(n for n in names if n not in used and mesh.shape[n] > 1)
        if names and dim % math.prod(mesh.shape[n] for n in names) == 0:
            used.update(names)
            entries.append(names[0] if len(names) == 1 else names)
        else:
            entries.append(None)
    return P(*entries)


def param_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
    """The NamedSharding of every variable in `state` (Params by their logical axes; other
    variables, e.g. expert maps, replicated)."""

    def one(var):
        axes = var.get_metadata().get("logical_axes") if isinstance(var, nnx.Variable) else None
        value = var[...] if isinstance(var, nnx.Variable) else var
        if axes is None:
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, spec_for(axes, value.shape, mesh))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_state(state: nnx.State, mesh: Mesh) -> nnx.State:
    """Place every variable of `state` on the mesh with its sharding."""
    shardings = param_shardings(state, mesh)

    def put(var, sharding):
        if not isinstance(var, nnx.Variable):
            return var
        value = var[...]
        if not sharding.is_fully_addressable and isinstance(value, jax.Array) and value.committed:
            # Multi-host: jax places only host values (every process holding the same) on devices
            # of other processes; weights restored by orbax sit committed on a local device.
            value = np.asarray(value)
        return var.replace(jax.device_put(value, sharding))

    return jax.tree.map(put, state, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


@dataclasses.dataclass(frozen=True)
class SizeReport:
    """Per-device bytes of a sharded pytree of shapes (nothing allocated)."""

    total_bytes: int
    per_device_bytes: int


def per_device_bytes(shape, dtype, spec: P, mesh: Mesh) -> int:
    """Bytes one device holds of an array of `shape` sharded by `spec`."""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    for entry in spec:
        for name in ((entry,) if isinstance(entry, str) else tuple(entry or ())):
            n //= mesh.shape[name]
    return n


def host_value(array) -> np.ndarray:
    """A replicated array's value on this host; works when the mesh spans other processes'
    devices too (multi-host), where `np.asarray` refuses non-addressable arrays."""
    if isinstance(array, jax.Array) and not array.is_fully_addressable:
        return np.asarray(array.addressable_data(0))
    return np.asarray(array)
