"""Engine-side parallel setup: the mesh from the engine options, the model switched to expert
parallelism, (dp > 1) data-parallel attention and (enable_dbo) dual-batch overlap, parameters placed by the logical-axis rules
(models/mesh.py)."""

from __future__ import annotations

from flax import nnx
from jax.sharding import Mesh

from jaxserve.config import EngineConfig
from models.dbo import enable_dbo
from models.dp_attention import enable_dp_attention
from models.expert_parallel import enable_expert_parallel
from models.mesh import make_mesh


def parallel_model(model: nnx.Module, config: EngineConfig) -> tuple[nnx.Module, Mesh]:
    """A copy of `model` laid out for `config`'s mesh (the caller's model is left untouched)."""
    mesh = make_mesh(config.data_parallel_size, config.expert_parallel_size, config.tensor_parallel_size)
    model = nnx.clone(model)
    if getattr(model.config, "num_experts", 0):
        enable_expert_parallel(
            model, mesh, strategy=config.expert_dispatch,
            num_redundant_experts=config.num_redundant_experts if config.enable_eplb else 0,
            capacity_factor=config.expert_capacity_factor)
    if config.data_parallel_size > 1:
        enable_dp_attention(model, mesh)
    if config.enable_dbo:
        enable_dbo(model, mesh, config.dbo_min_tokens)
    return model, mesh
