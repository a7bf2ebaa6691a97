"""Per-device memory of a sharded layout, computed from the shardings (nothing allocated).

`python -m jaxserve.benchmarks.memory_table` prints, for Qwen3-235B-A22B (bf16) on 8 x H200 and
DeepSeek-V3-671B (block-FP8 weights, as its checkpoint ships) on 8 to 32 H200s, the parameter
bytes and the free KV bytes per device under TP=8 versus EP=N with attention DP (mesh dp=N,
ep=1, tp=1: experts split over the dp shards, attention weights replicated, each device serving
its own requests: `data_parallel_size=N`), and how many tokens of KV the whole system holds in
each layout.
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
# DeepSeek-V3's config.json (the fields the model zoo reads); DeepSeek-R1 and Kimi-K2 (384 experts,
# 64 heads) have the same architecture.
DEEPSEEK_V3 = dict(architectures=["DeepseekV3ForCausalLM"], vocab_size=129280, hidden_size=7168,
                   intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61,
                   num_nextn_predict_layers=1, num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1,
                   n_routed_experts=256, routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536,
                   qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, topk_method="noaux_tc", n_group=8,
                   topk_group=4, num_experts_per_tok=8, first_k_dense_replace=3, norm_topk_prob=True,
                   scoring_func="sigmoid", max_position_embeddings=163840, rms_norm_eps=1e-6, rope_theta=10000,
                   rope_scaling=dict(type="yarn", factor=40, beta_fast=32, beta_slow=1, mscale=1.0,
                                     mscale_all_dim=1.0, original_max_position_embeddings=4096),
                   tie_word_embeddings=False,
                   quantization_config=dict(activation_scheme="dynamic", fmt="e4m3", quant_method="fp8",
                                            weight_block_size=[128, 128]))
H200_BYTES = 141 * 10**9  # HBM3e per H200 (decimal GB)


def quantized(path: tuple, config: ModelConfig) -> bool:
    """Whether a block-FP8 checkpoint stores this parameter in FP8: the projections of attention,
    dense MLPs and experts; not embeddings, norms, the router or the LM head."""
    return (config.quant_method == "fp8" and path[-1] in ("kernel", "gate_proj", "up_proj", "down_proj")
            and ("self_attn" in path or "mlp" in path) and "gate" not in path)


def param_bytes(path: tuple, shape, config: ModelConfig, dtype) -> float:
    """Bytes per element of a parameter: 1 plus its share of a float32 scale per block for FP8,
    else the dtype's."""
    if quantized(path, config):
        block = config.weight_block_size
        return 1 + 4 / (block[0] * block[1])
    return jnp.dtype(dtype).itemsize


def param_bytes_per_device(config: ModelConfig, mesh: AbstractMesh, dtype=jnp.bfloat16) -> tuple[int, int]:
    """(total parameter bytes, bytes on one device) of the model built with experts split over
    the mesh (padded to the physical slots)."""
    layout = ParallelLayout(mesh, expert_parallel=ExpertParallelOptions())
    # Shapes of plain weights whatever the platform ("auto" would build fp8 kernels on a GPU):
    # the bytes of FP8 ones are counted per parameter below.
    _, state = abstract_model(config, dtype=dtype, layout=layout, fp8_weights="dequantize")
    total = per_dev = 0
    for path, var in nnx.to_flat_state(nnx.filter_state(state, nnx.Param)):
        shape = tuple(var.get_value().shape)
        axes = var.get_metadata().get("logical_axes") or (None,) * len(shape)
        element = param_bytes(tuple(path), shape, config, dtype)
        total += int(np.prod(shape)) * element
        per_dev += per_device_bytes(shape, jnp.int8, spec_for(axes, shape, mesh), mesh) * element
    return int(total), int(per_dev)


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


def table(hf: dict, devices: int = 8, hbm: int = H200_BYTES, utilization: float = 0.9,
          ep_sizes: tuple[int, ...] | None = None) -> list[dict]:
    """TP=`devices`, then EP=N + attention DP for each N of `ep_sizes` (default: `devices`)."""
    config = ModelConfig.from_hf(hf)
    rows = []
    # TP: one batch, every device holds (its heads of) every sequence. DP attention with the experts
    # split over the dp shards: each device holds its own sequences and 1/N of the experts (the
    # engine's data_parallel_size=N).
    layouts = [(f"TP={devices}", (1, 1, devices), 1)] + [
        (f"EP={n} + attention DP", (n, 1, 1), n) for n in (ep_sizes or (devices,))]
    for name, (dp, ep, tp), kv_groups in layouts:
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
    tables = {"Qwen3-235B-A22B, bf16": table(QWEN3_235B),
              "DeepSeek-V3-671B, block-FP8 weights, bf16 KV": table(DEEPSEEK_V3, ep_sizes=(8, 16, 32))}
    print(f"H200 ({H200_BYTES / 1e9:.0f} GB, 90% usable); nothing allocated")
    for title, rows in tables.items():
        print(f"\n{title}")
        print(f"{'layout':<26}{'params/device':>15}{'free KV/device':>16}{'KV B/token/dev':>16}"
              f"{'KV tokens/dev':>15}{'KV tokens total':>17}{'KV GB / 1k tok/dev':>20}")
        for r in rows:
            print(f"{r['layout']:<26}{r['param_bytes_per_device'] / 1e9:>13.2f}GB"
                  f"{r['free_kv_bytes_per_device'] / 1e9:>14.2f}GB{r['kv_bytes_per_token_per_device']:>16,}"
                  f"{r['kv_tokens_per_device']:>15,}{r['kv_tokens_system']:>17,}"
                  f"{r['kv_bytes_per_token_per_device'] * 1000 / 1e9:>20.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(tables, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
