"""Model configuration: one dataclass for every supported family, read from HF `config.json`."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

# HF `architectures[0]` -> model family module name (see models/registry.py).
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
    "Qwen3ForCausalLM": "llama",
    "MixtralForCausalLM": "moe",
    "Qwen2MoeForCausalLM": "moe",
    "Qwen3MoeForCausalLM": "moe",
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the forward pass needs to know about a model; nothing about serving."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before RoPE (Qwen3)
    sliding_window: int | None = None
    # Mixture of experts (num_experts == 0 means dense).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    shared_expert_intermediate_size: int = 0
    moe_layers: tuple[int, ...] = ()
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()

    @property
    def family(self) -> str:
        return SUPPORTED_ARCHITECTURES[self.architecture]

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Build from a Hugging Face `config.json` dict (transformers 4 or 5 conventions)."""
        architecture = (hf.get("architectures") or [None])[0]
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {architecture!r}; supported: "
                f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        num_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
        rope_theta, rope_scaling = _rope_settings(hf)
        num_layers = hf["num_hidden_layers"]
        num_experts = hf.get("num_local_experts") or hf.get("num_experts") or 0
        eos = hf.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        sliding_window = hf.get("sliding_window")
        if architecture.startswith("Qwen") and not hf.get("use_sliding_window", False):
            sliding_window = None  # Qwen configs carry a window they do not use by default.
        return cls(
            architecture=architecture,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf.get("intermediate_size") or 0,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=architecture.startswith("Qwen2") or bool(hf.get("attention_bias", False)),
            qk_norm=architecture.startswith("Qwen3"),
            sliding_window=sliding_window,
            num_experts=num_experts,
            num_experts_per_tok=hf.get("num_experts_per_tok", 0) if num_experts else 0,
            moe_intermediate_size=(
                hf.get("moe_intermediate_size") or hf.get("intermediate_size") or 0
            ) if num_experts else 0,
            norm_topk_prob=_norm_topk_prob(architecture, hf),
            shared_expert_intermediate_size=hf.get("shared_expert_intermediate_size") or 0,
            moe_layers=_moe_layers(architecture, hf, num_layers, num_experts),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos,
        )

    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> "ModelConfig":
        with open(os.path.join(path, "config.json")) as f:
            return cls.from_hf(json.load(f))


def _rope_settings(hf: dict) -> tuple[float, dict | None]:
    """transformers 5 writes `rope_parameters {rope_theta, rope_type, ...}`; 4 writes
    `rope_theta` and `rope_scaling`. Accept both; return (theta, scaling or None)."""
    params = hf.get("rope_parameters") or {}
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or {k: v for k, v in params.items() if k != "rope_theta"}
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type in (None, "default"):
        return float(theta), None
    return float(theta), {**scaling, "rope_type": rope_type}


def _norm_topk_prob(architecture: str, hf: dict) -> bool:
    if architecture == "MixtralForCausalLM":
        return True  # Mixtral's softmax over the top-k logits equals renormalised top-k.
    return bool(hf.get("norm_topk_prob", False))


def _moe_layers(architecture: str, hf: dict, num_layers: int, num_experts: int) -> tuple[int, ...]:
    if not num_experts:
        return ()
    if architecture == "MixtralForCausalLM":
        return tuple(range(num_layers))
    step = hf.get("decoder_sparse_step", 1) or 1
    dense_only = set(hf.get("mlp_only_layers") or [])
    return tuple(i for i in range(num_layers) if i not in dense_only and (i + 1) % step == 0)
