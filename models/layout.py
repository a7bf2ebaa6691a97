"""The parallel layout a model is built with: one frozen, hashable value (part of the model's graph
definition), passed to `models.registry.build_model` and from there to every layer that needs it,
as jax-llm-examples passes its sharding config.

- `mesh`: the (dp, ep, tp) device mesh (models/mesh.py); parameters are placed on it by the
  logical-axis rules (`LOGICAL_RULES`);
- `dp_attention`: each dp shard attends to its own requests against its own slice of the KV
  cache (models/dp_attention.py);
- `expert_parallel`: MoE blocks split their experts over the dp x ep devices and dispatch tokens
  to them (models/expert_parallel.py); None keeps every expert on every device;
- `dbo_min_tokens`: dual-batch overlap, the step's decoder layers run as two microbatches from
  this many tokens per dp shard (models/dbo.py); None: never.

No layout (None) is the single-device model.
"""

from __future__ import annotations

import dataclasses

from jax.sharding import AbstractMesh, Mesh

from models.expert_dispatch import STRATEGIES  # expert-parallel token dispatch (models/expert_parallel.py)


def check_dispatch(strategy: str, capacity_factor: float) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"expert dispatch strategy must be one of {STRATEGIES}, got {strategy!r}")
    if capacity_factor < 0:
        raise ValueError(f"expert capacity_factor must be >= 0 (0: worst case), got {capacity_factor}")


@dataclasses.dataclass(frozen=True)
class ExpertParallelOptions:
    """How MoE blocks split their experts (models/expert_parallel.py)."""

    strategy: str = "allgather"  # token dispatch: "allgather" or "all_to_all"
    num_redundant_experts: int = 0  # physical slots beyond the logical experts, for EPLB replicas
    capacity_factor: float = 0.0  # all_to_all rows per destination / (assignments / ep); 0: worst case
    allow_drop: bool = False  # all_to_all: one round only, overflow dropped

    def __post_init__(self):
        check_dispatch(self.strategy, self.capacity_factor)
        if self.num_redundant_experts < 0:
            raise ValueError(f"num_redundant_experts must be >= 0, got {self.num_redundant_experts}")


@dataclasses.dataclass(frozen=True)
class ParallelLayout:
    """Where a model's forward pass runs and how it splits (module docstring)."""

    mesh: Mesh | AbstractMesh
    dp_attention: bool = False
    expert_parallel: ExpertParallelOptions | None = None
    dbo_min_tokens: int | None = None

    def __post_init__(self):
        if self.dbo_min_tokens is not None and self.dbo_min_tokens < 1:
            raise ValueError(f"dbo_min_tokens must be >= 1, got {self.dbo_min_tokens}")

    @property
    def dp_size(self) -> int:
        return self.mesh.shape["dp"]
