"""Per-device memory of a sharded layout, computed from the shardings (nothing allocated).

`python -m jaxserve.benchmarks.memory_table` prints, for Qwen3-235B-A22B on 8 x H200, the
parameter bytes and the free KV bytes per device under TP=8 versus EP=8 with attention DP
(mesh dp=8, ep=1, tp=1: experts split over the dp shards, attention weights replicated, each
device serving its own requests: `data_parallel_size=8`), and how
many tokens of KV the whole system holds in each layout.
"""

from __future__ import annotations

import argparse
import json

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh

from models.config import ModelConfig
from models.layout import ExpertParallelOptions, ParallelLayout
from models.mesh import MESH_AXES, per_device_bytes, spec_for
from models.registry import abstract_model, kv_spec

# Qwen3-235B-A22B's config.json (the fields the model zoo reads).
QWEN3_235B = dict(architectures=["Qwen3MoeForCausalLM"], vocab_size=151936, hidden_size=4096,
                  intermediate_size=12288, moe_intermediate_size=1536, num_hidden_layers=94,
                  num_attention_heads=64, num_key_value_heads=4, head_dim=128, num_experts=128,
                  num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=40960,
                  rope_theta=1000000.0, tie_word_embeddings=False, decoder_sparse_step=1, mlp_only_layers=[])
H200_BYTES = 141 * 10**9  # HBM3e per H200 (decimal GB)


def param_bytes_per_device(config: ModelConfig, mesh: AbstractMesh, dtype=jnp.bfloat16) -> tuple[int, int]:
    """(total parameter bytes, bytes on one device) of the model built with experts split over
    the mesh (padded to the physical slots)."""
    layout = ParallelLayout(mesh, expert_parallel=ExpertParallelOptions())
    _, state = abstract_model(config, dtype=dtype, layout=layout)
    total = per_dev = 0
    for _, var in nnx.to_flat_state(nnx.filter_state(state, nnx.Param)):
        shape = tuple(var.get_value().shape)
        axes = var.get_metadata().get("logical_axes") or (None,) * len(shape)
        total += int(np.prod(shape)) * jnp.dtype(dtype).itemsize
        per_dev += per_device_bytes(shape, dtype, spec_for(axes, shape, mesh), mesh)
    return total, per_dev


def kv_bytes_per_token_per_device(config: ModelConfig, mesh: AbstractMesh, dtype=jnp.bfloat16) -> int:
    """KV bytes one device stores per token of a sequence it holds, as the family's KV spec lays
    it out (KV heads over tp when they divide)."""
    total = 0
    for layer in kv_spec(config).layers:
        for array in layer.arrays:
            shape = (1, 1, *array.token_shape)
            spec = spec_for(("cache_blocks", None, *array.logical_axes), shape, mesh)
            total += per_device_bytes(shape, dtype, spec, mesh)
    return total


def table(hf: dict, devices: int = 8, hbm: int = H200_BYTES, utilization: float = 0.9) -> list[dict]:
    config = ModelConfig.from_hf(hf)
    rows = []
    for name, (dp, ep, tp), kv_groups in [
        (f"TP={devices}", (1, 1, devices), 1),  # one batch, every device holds (its heads of) every sequence
        # DP attention with the experts split over the dp shards: each device holds its own
        # sequences and 1/8 of the experts (the engine's data_parallel_size=8)
        (f"EP={devices} + attention DP", (devices, 1, 1), devices),
    ]:
        mesh = AbstractMesh((dp, ep, tp), MESH_AXES)
        total, per_dev = param_bytes_per_device(config, mesh)
        kv_tok = kv_bytes_per_token_per_device(config, mesh)
        free = int(hbm * utilization) - per_dev
        rows.append({"layout": name, "param_bytes_total": total, "param_bytes_per_device": per_dev,
                     "free_kv_bytes_per_device": free, "kv_bytes_per_token_per_device": kv_tok,
                     "kv_tokens_per_device": free // kv_tok, "kv_tokens_system": kv_groups * (free // kv_tok)})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    rows = table(QWEN3_235B)
    print(f"Qwen3-235B-A22B, bf16, 8 x H200 ({H200_BYTES / 1e9:.0f} GB, 90% usable); nothing allocated")
    print(f"{'layout':<26}{'params/device':>15}{'free KV/device':>16}{'KV B/token/dev':>16}{'KV tokens/dev':>15}{'KV tokens total':>17}")
    for r in rows:
        print(f"{r['layout']:<26}{r['param_bytes_per_device'] / 1e9:>13.2f}GB{r['free_kv_bytes_per_device'] / 1e9:>14.2f}GB"
              f"{r['kv_bytes_per_token_per_device']:>16,}{r['kv_tokens_per_device']:>15,}{r['kv_tokens_system']:>17,}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
