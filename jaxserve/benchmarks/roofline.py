"""Device ceilings measured in the same run as a benchmark, so a number means something anywhere."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp


def best_time(fn, *args, repeats: int = 5) -> float:
    """Fastest of `repeats` timed calls after one warm-up call (compile excluded)."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def measure_copy_bandwidth(num_bytes: int = 256 << 20, repeats: int = 5) -> float:
    """Bytes per second of an in-place streaming update (`a + 1` with `a` donated; read + write
    counted).

    In place, because a fresh output buffer measures the allocator instead of memory: on the
    2-core development CPU a new 256 MB output is first-touched page by page and `a + 1` ran at
    ~7 GB/s, against ~50-80 GB/s in place (numpy's in-place add: ~47 GB/s on one core)."""
    step = jax.jit(lambda a: a + 1.0, donate_argnums=0)
    x = step(jnp.zeros((num_bytes // 4,), jnp.float32))
    x.block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x = step(x)
        x.block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * num_bytes / best


def measure_matmul_rate(size: int = 1024, dtype=jnp.float32) -> float:
    """FLOP per second of a square matmul in `dtype`."""
    a = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    return 2 * size**3 / best_time(matmul, a, a)


def measure_ceilings(dtype=jnp.float32) -> dict:
    """Copy bandwidth and the matmul rate in `dtype` (the model's weights'). Sizes per platform:
    on a GPU a 1024^2 matmul or a 256 MB copy is too short to leave the launch overhead behind."""
    on_cpu = jax.default_backend() == "cpu"
    return {
        "device": jax.devices()[0].device_kind,
        "copy_bandwidth_gb_s": measure_copy_bandwidth(256 << 20 if on_cpu else 2 << 30) / 1e9,
        "matmul_gflop_s": measure_matmul_rate(1024 if on_cpu else 8192, dtype=dtype) / 1e9,
    }
