"""Dense Llama family: Llama 2 / 3 / 3.1, Mistral, Qwen2 / 2.5, Qwen3, SmolLM2.

The variants differ only in configuration (models/config.py): llama3 RoPE scaling, Mistral's
sliding window, Qwen2's q/k/v bias, Qwen3's q/k RMSNorm, tied embeddings, any GQA ratio.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig
from models.kv_spec import KVSpec
from models.layers import DenseMLP
from models.layout import ParallelLayout
from models.quantization import linear_quant
from models.transformer import CausalLM


def build(config: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None, attention_backend="auto",
          moe_backend="auto", layout: ParallelLayout | None = None) -> CausalLM:
    def dense_mlp(cfg: ModelConfig, layer_idx: int, dtype, rngs):
        del layer_idx
        return DenseMLP(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, rngs=rngs,
                        quant=linear_quant(cfg, layout=layout))

    return CausalLM(config, dense_mlp, dtype=dtype, rngs=rngs, attention_backend=attention_backend,
                    moe_backend=moe_backend, layout=layout)


def kv_spec(config: ModelConfig) -> KVSpec:
    """K and V per token in every layer; Mistral's window, when set, in every layer."""
    return KVSpec.standard(config.num_layers, config.num_kv_heads, config.head_dim, config.sliding_window)


def hf_param_path(name: str, config: ModelConfig | None = None) -> tuple[tuple, int | None]:
    """HF tensor name -> (parameter path, expert index or None). Dense names map one to one."""
    return _strip_model_prefix(name), None


def _strip_model_prefix(name: str) -> tuple:
    parts = name.split(".")
    if parts[0] == "model":
        parts = parts[1:]
    return tuple(int(p) if p.isdigit() else p for p in parts)
