"""Ordering a computation after others without moving data: the dependences dual-batch overlap
chains its collectives with (models/dbo.py, and inside the expert-parallel `shard_map`,
models/expert_parallel.py)."""

from __future__ import annotations

import jax


def after(x, *deps):
    """`x` (an array or a tuple of arrays), ordered after every array of `deps` that is not None
    (an `optimization_barrier`: a dependence, no data moved)."""
    deps = tuple(d for d in deps if d is not None)
    if not deps:
        return x
    return jax.lax.optimization_barrier((x, deps))[0]
