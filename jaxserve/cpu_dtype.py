"""What `dtype="auto"` means: bfloat16 on accelerators, and on a CPU with bf16 matrix units.

XLA:CPU runs a bf16 matmul with f32 accumulation at 1.7-3.4x the f32 rate where the CPU has
avx512_bf16 or AMX (BENCHMARKS.md, "CPU speed"), and bf16 weights halve the bytes every decode
step streams. Norms, softmax, attention scores, logits and sampling stay in float32 in the model
code whatever the weights' dtype. Elsewhere (no bf16 units: XLA:CPU emulates bf16) float32 is
faster and "auto" keeps it. `JAXSERVE_CPU_DTYPE` (float32, bfloat16) overrides the CPU choice;
the test suite sets float32 (parity with transformers is checked in float32).

The quality of the switch is measured by `tools/bf16_quality.py` on the default model (greedy
top-1 agreement with float32 and the logprob drift, BENCHMARKS.md).
"""

from __future__ import annotations

import functools
import os

CPU_DTYPE_ENV = "JAXSERVE_CPU_DTYPE"
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_bf16_units(cpuinfo: str = "/proc/cpuinfo") -> tuple[str, ...]:
    """The bf16 matrix features the CPU reports (Linux /proc/cpuinfo flags; none elsewhere)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return tuple(flag for flag in _BF16_FLAGS if flag in flags)
    except OSError:
        pass
    return ()


def auto_dtype(backend: str, units: tuple[str, ...] | None = None) -> tuple[str, str]:
    """(dtype name, why) that `dtype="auto"` picks on `backend` ("cpu", "gpu", "tpu"); `units`
    stands in for the CPU's bf16 features (default: what this CPU reports)."""
    if backend != "cpu":
        return "bfloat16", f"{backend}: bf16 tensor units"
    forced = os.environ.get(CPU_DTYPE_ENV, "").strip()
    if forced and forced != "auto":
        if forced not in ("float32", "bfloat16"):
            raise ValueError(f"{CPU_DTYPE_ENV} must be float32, bfloat16 or auto, got {forced!r}")
        return forced, f"{CPU_DTYPE_ENV}={forced}"
    units = cpu_bf16_units() if units is None else units
    if units:
        return "bfloat16", f"the CPU has {' and '.join(units)}: bf16 matmuls with f32 accumulation"
    return "float32", "the CPU has no bf16 matrix units (avx512_bf16, AMX): XLA would emulate bf16"
