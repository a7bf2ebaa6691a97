"""Models built with a parallel layout (models/layout.py), on one device: the laid-out model holds
the logical model's weights, runs the same forward, and models/ imports form no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.kv_spec import KVCache
from models.expert_parallel import ExpertLoad, ExpertMap
from models.layout import ExpertParallelOptions, ParallelLayout
from models.mesh import make_mesh
from models.moe import moe_blocks
from models.registry import build_model, with_layout
from tests.engine_utils import tiny_config
from tests.models.test_dbo import BLOCK_SIZE, CASES, ragged_meta

MOE = dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True, intermediate_size=64)


def ep_layout(strategy="allgather", redundant=2, dbo_min_tokens=None):
    options = ExpertParallelOptions(strategy=strategy, num_redundant_experts=redundant)
    return ParallelLayout(make_mesh(), expert_parallel=options, dbo_min_tokens=dbo_min_tokens)


def test_layout_is_a_hashable_value_and_validates():
    assert hash(ep_layout()) == hash(ep_layout()) and ep_layout() == ep_layout()
    assert ep_layout() != ep_layout("all_to_all")
    with pytest.raises(ValueError, match="strategy"):
        ExpertParallelOptions(strategy="ring")
    with pytest.raises(ValueError, match="num_redundant_experts"):
        ExpertParallelOptions(num_redundant_experts=-1)
    with pytest.raises(ValueError, match="dbo_min_tokens"):
        ParallelLayout(make_mesh(), dbo_min_tokens=0)


def test_built_with_a_layout_equals_the_logical_model_moved_into_it():
    """Same seed: the same weights, the expert weights in physical slots (6 experts + 2 redundant
    slots on one expert rank), spare slots zero, the expert map at identity, loads zero."""
    config = tiny_config("Qwen3MoeForCausalLM", **MOE)
    layout = ep_layout()
    built = build_model(config, seed=3, layout=layout)
    moved = with_layout(build_model(config, seed=3), layout)
    assert nnx.graphdef(built) == nnx.graphdef(moved)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(built), nnx.state(moved))
    for block in moe_blocks(moved):
        assert block.ep.num_physical == 8 and block.ep.max_replicas == 3
        assert block.experts.gate_proj[...].shape[0] == 8 and not block.experts.gate_proj[...][6:].any()
        np.testing.assert_array_equal(block.phys_to_logical[...], [0, 1, 2, 3, 4, 5, -1, -1])
        np.testing.assert_array_equal(block.replica_count[...], np.ones(6))
        assert not block.expert_load[...].any()
    assert len(nnx.state(moved, ExpertMap, ExpertLoad)) > 0
    assert with_layout(moved, layout) is moved


@pytest.mark.parametrize("strategy", ["allgather", "all_to_all"])
@pytest.mark.parametrize("dbo_min_tokens", [None, 2])
def test_laid_out_forward_matches_the_single_device_model(strategy, dbo_min_tokens):
    """Expert parallelism over one rank (the shard_map dispatch, physical slots) and dual-batch
    overlap against the model without a layout: hidden states within 1e-5 (float32, sums in
    another order), every real token counted once in the expert loads."""
    config = tiny_config("Qwen3MoeForCausalLM", **MOE)
    model = build_model(config, seed=1)
    laid_out = with_layout(model, ep_layout(strategy, dbo_min_tokens=dbo_min_tokens))
    prior, q_lens, num_tokens, num_rows = CASES[0]
    meta, positions = ragged_meta(prior, q_lens, num_tokens, num_rows)
    ids = jnp.asarray(np.random.default_rng(1).integers(2, config.vocab_size, num_tokens), jnp.int32)
    shape = (32, BLOCK_SIZE, config.num_kv_heads, config.head_dim)
    caches = [KVCache((jnp.zeros(shape), jnp.zeros(shape))) for _ in range(config.num_layers)]

    @jax.jit
    def forward(m):
        hidden, _ = m(ids, positions, caches, meta)
        return hidden, [block.expert_load[...] for block in moe_blocks(m) if block.ep is not None]

    want, _ = forward(model)
    got, loads = forward(laid_out)
    mask = np.asarray(meta.token_mask)
    np.testing.assert_allclose(np.asarray(got)[mask], np.asarray(want)[mask], rtol=1e-5, atol=1e-5)
    assert [int(load.sum()) for load in loads] == [int(mask.sum()) * MOE["num_experts_per_tok"]] * config.num_layers


def test_models_imports_form_no_cycle():
    """Module-level and function-local imports between models/ modules: a graph without cycles."""
    root = Path(__file__).resolve().parents[2] / "models"
    graph = {}
    for path in root.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "models":
                    deps.update(alias.name for alias in node.names)
                elif node.module.startswith("models."):
                    deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps.update(a.name.split(".")[1] for a in node.names if a.name.startswith("models."))
        graph[path.stem] = deps & {p.stem for p in root.glob("*.py")}
    done, active = set(), []

    def visit(module):
        assert module not in active, f"import cycle: {' -> '.join(active[active.index(module):] + [module])}"
        if module in done:
            return
        active.append(module)
        for dep in sorted(graph[module]):
            visit(dep)
        active.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)
