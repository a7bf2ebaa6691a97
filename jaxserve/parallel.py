"""Engine-side parallel setup: the parallel layout (models/layout.py) from the engine options, and
the model built with it; the runner then places parameters by the logical-axis rules
(models/mesh.py)."""

from __future__ import annotations

from jax.sharding import Mesh

from jaxserve.config import EngineConfig
from models.layout import ExpertParallelOptions, ParallelLayout
from models.mesh import make_mesh
from models.registry import with_layout
from models.transformer import CausalLM


def parallel_layout(config: EngineConfig) -> ParallelLayout:
    """The mesh (dp, ep, tp) of the engine options; DP attention when dp > 1; MoE blocks split
    their experts over it (with EPLB's redundant slots when `enable_eplb`); dual-batch overlap
    when `enable_dbo`."""
    mesh = make_mesh(config.data_parallel_size, config.expert_parallel_size, config.tensor_parallel_size)
    expert_parallel = ExpertParallelOptions(
        strategy=config.expert_dispatch, capacity_factor=config.expert_capacity_factor,
        num_redundant_experts=config.num_redundant_experts if config.enable_eplb else 0)
    return ParallelLayout(mesh, dp_attention=config.data_parallel_size > 1, expert_parallel=expert_parallel,
                          dbo_min_tokens=config.dbo_min_tokens if config.enable_dbo else None)


def parallel_model(model: CausalLM, config: EngineConfig) -> tuple[CausalLM, Mesh]:
    """`model` (built without a layout, e.g. loaded) as built with `config`'s layout, and its mesh;
    the caller's model is left untouched."""
    layout = parallel_layout(config)
    return with_layout(model, layout), layout.mesh
