"""Shapes the Mosaic GPU grouped matmul must take, shared by its interpret-mode tests and the CUDA
lowering check (which CI may run in a subprocess with the CUDA plugin on the path).

`lowering_cases()` gives (fn, arg ShapeDtypeStructs) pairs to lower for a Hopper target. Lowering
without a GPU (`lower_for_cuda`: an abstract H100 mesh, platform "cuda") runs the whole Python
side of Mosaic GPU: the Pallas lowering to the Mosaic GPU dialect, layout inference, the dialect
lowering, and `module.operation.verify()` on the result (inside `lower_mgpu_module`), then
serializes the module into a `mosaic_gpu_v2` custom call. What stays for the GPU is XLA's compile
of that custom call (LLVM, PTX, ptxas), the shared-memory limit check, and of course running it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.mosaic_grouped_matmul import (
    grouped_matmul_mosaic,
    grouped_matmul_swiglu_mosaic,
    pick_tiling,
)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    fused: bool  # grouped_matmul_swiglu_mosaic, else grouped_matmul_mosaic
    num_rows: int
    k_dim: int
    n_dim: int
    num_groups: int
    tuning: tuple = ()  # (name, value) pairs passed to the kernel; the rest are chosen by it
    group_sizes: tuple = ()  # what the interpret-mode test runs (runtime values: lowering ignores them)
    dtype: object = jnp.bfloat16

    def fn(self):
        tuning = dict(self.tuning)
        if self.fused:
            return lambda lhs, w_gate, w_up, sizes: grouped_matmul_swiglu_mosaic(lhs, w_gate, w_up, sizes, **tuning)
        return lambda lhs, rhs, sizes: grouped_matmul_mosaic(lhs, rhs, sizes, **tuning)

    def arg_specs(self):
        spec = jax.ShapeDtypeStruct
        rhs = spec((self.num_groups, self.k_dim, self.n_dim), self.dtype)
        return (spec((self.num_rows, self.k_dim), self.dtype), *([rhs] * (2 if self.fused else 1)),
                spec((self.num_groups,), jnp.int32))

    def tiling(self, num_sms=None):
        tuning = dict(self.tuning)
        return pick_tiling(self.num_rows, self.k_dim, self.n_dim, self.num_groups, 2 if self.fused else 1,
                           jnp.dtype(self.dtype).itemsize, num_sms=tuning.pop("num_sms", num_sms), **tuning)


# The configurations the interpret-mode tests run (small K and N keep them fast on a CPU), with
# their group sizes: empty groups, groups smaller than, straddling and spanning several row tiles,
# rows past sum(group_sizes) (must come back zero), a single group, many one-row groups, fewer rows
# than a tile, and more K steps than pipeline stages.
_SPREAD = (70, 0, 3, 100)  # 173 of 200 rows: 27 padding rows
_ONE_ROW = tuple([1, 0, 1, 1] * 10)  # 30 one-row groups among 40, 18 padding rows of 48
INTERPRET_CASES = [
    Case("bm64-empty-groups-padding", False, 200, 128, 128, 4, (("block_m", 64),), _SPREAD),
    Case("bm128-empty-groups-padding", False, 200, 128, 128, 4, (("block_m", 128),), _SPREAD),
    Case("swiglu-bm64-bn64", True, 200, 192, 128, 4, (("block_m", 64), ("block_n", 64)), _SPREAD),
    Case("swiglu-bm128", True, 200, 128, 128, 4, (("block_m", 128),), (0, 131, 0, 69)),
    Case("single-group-odd-rows", False, 150, 128, 64, 1, (("block_m", 64),), (150,)),
    Case("one-row-groups", True, 48, 64, 64, 40, (("block_m", 64),), _ONE_ROW),
    Case("decode-many-experts", False, 8, 128, 64, 128, (("block_m", 64),), (0,) * 5 + (1, 2) + (0,) * 120 + (4,)),
    Case("k-steps-over-stages", False, 72, 384, 64, 3, (("block_m", 64), ("stages", 2)), (9, 0, 60)),
    Case("all-rows-padding", False, 24, 64, 64, 2, (("block_m", 64),), (0, 0)),
    Case("float16-swiglu", True, 40, 128, 64, 3, (("block_m", 64),), (17, 0, 23), jnp.float16),
]

# The production shapes at 1024 tokens (M = 1024 * top_k), with the kernel's own tiling.
MIXTRAL_8X7B = dict(num_experts=8, top_k=2, hidden=4096, intermediate=14336)
QWEN3_30B_A3B = dict(num_experts=128, top_k=8, hidden=2048, intermediate=768)


def model_cases(model: dict, name: str, num_tokens: int = 1024) -> list[Case]:
    """The MoE block's two grouped matmuls: gate/up fused ([M, H] x [E, H, I]) and down ([M, I] x [E, I, H])."""
    rows, experts = num_tokens * model["top_k"], model["num_experts"]
    return [Case(f"{name}-gate-up-{num_tokens}t", True, rows, model["hidden"], model["intermediate"], experts),
            Case(f"{name}-down-{num_tokens}t", False, rows, model["intermediate"], model["hidden"], experts)]


MODEL_CASES = model_cases(MIXTRAL_8X7B, "mixtral-8x7b") + model_cases(QWEN3_30B_A3B, "qwen3-30b-a3b")


def lowering_case_list() -> list[Case]:
    return INTERPRET_CASES + MODEL_CASES


def lowering_cases() -> list[tuple]:
    """(fn, arg ShapeDtypeStructs) for every configuration the tests cover plus the production shapes."""
    return [(case.fn(), case.arg_specs()) for case in lowering_case_list()]
