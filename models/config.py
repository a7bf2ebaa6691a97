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
    "DeepseekV2ForCausalLM": "deepseek",
    "DeepseekV3ForCausalLM": "deepseek",
    "GptOssForCausalLM": "gpt_oss",
}

# Weight formats a checkpoint's `quantization_config.quant_method` may name.
SUPPORTED_QUANT_METHODS = ("fp8", "mxfp4")
# What loading does with block-FP8 weights (models/quantization.py): "auto" keeps them on a GPU.
FP8_WEIGHTS = ("auto", "dequantize", "keep")


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
    # Per-layer attention (gpt-oss): "sliding_attention" layers see `sliding_window` keys,
    # "full_attention" layers all; empty for families whose layers are all alike.
    layer_types: tuple[str, ...] = ()
    # Mixture of experts (num_experts == 0 means dense).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    shared_expert_intermediate_size: int = 0
    moe_layers: tuple[int, ...] = ()
    shared_expert_gated: bool = True  # Qwen2-MoE's sigmoid gate on the shared expert; DeepSeek adds it ungated
    # Routing: scores from "softmax" or "sigmoid"; top-k "greedy", DeepSeek-V2's "group_limited_greedy"
    # (groups ranked by their best score) or V3's "noaux_tc" (sigmoid scores plus the
    # `e_score_correction_bias` choose, groups ranked by the sum of their top two).
    scoring_func: str = "softmax"
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    # gpt-oss's clamped SwiGLU experts: (up + 1) * gate * sigmoid(alpha * gate), gate <= limit, |up| <= limit.
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    # Multi-head latent attention (DeepSeek-V2/V3; kv_lora_rank == 0 means standard attention).
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False  # rotary pairs (x0, x1), (x2, x3), ... instead of halves
    num_nextn_predict_layers: int = 0  # DeepSeek-V3's multi-token-prediction (MTP) layers
    # Block-quantized weights: `quant_method` "fp8" stores float8_e4m3fn weights with a
    # `weight_scale_inv` per `weight_block_size` block ([out, in]); None: plain weights.
    # "mxfp4" (gpt-oss) stores the MoE experts' weights as `X_blocks` (e2m1 pairs) + `X_scales`
    # (e8m0 per 32 values), models/quantization.py; `modules_to_not_convert` names modules the
    # checkpoint keeps unquantized (transformers' patterns: prefixes, regexes, suffixes).
    quant_method: str | None = None
    weight_block_size: tuple[int, int] | None = None
    modules_to_not_convert: tuple[str, ...] = ()
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

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

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
        num_experts = hf.get("num_local_experts") or hf.get("num_experts") or hf.get("n_routed_experts") or 0
        eos = hf.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        sliding_window = hf.get("sliding_window")
        if architecture.startswith("Qwen") and not hf.get("use_sliding_window", False):
            sliding_window = None  # Qwen configs carry a window they do not use by default.
        config = cls(
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
        return dataclasses.replace(config, **_deepseek_fields(architecture, hf, num_experts),
                                   **_gpt_oss_fields(architecture, hf, num_layers), **_quantization(hf))

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
    if architecture.startswith("Deepseek"):
        first_moe = hf.get("first_k_dense_replace") or 0
        step = hf.get("moe_layer_freq", 1) or 1
        return tuple(i for i in range(first_moe, num_layers) if i % step == 0)
    step = hf.get("decoder_sparse_step", 1) or 1
    dense_only = set(hf.get("mlp_only_layers") or [])
    return tuple(i for i in range(num_layers) if i not in dense_only and (i + 1) % step == 0)


def _gpt_oss_fields(architecture: str, hf: dict, num_layers: int) -> dict:
    """gpt-oss's per-layer attention kinds (transformers' default when absent: sliding on even
    layers, full on odd ones) and its clamped SwiGLU's constants."""
    if architecture != "GptOssForCausalLM":
        return {}
    kinds = ("sliding_attention", "full_attention")
    layer_types = tuple(hf.get("layer_types") or (kinds[i % 2] for i in range(num_layers)))
    if len(layer_types) != num_layers or not set(layer_types) <= set(kinds):
        raise ValueError(f"config.json: layer_types must list one of {kinds} for each of the {num_layers} layers, "
                         f"got {list(layer_types)}")
    if "sliding_attention" in layer_types and not hf.get("sliding_window"):
        raise ValueError("config.json: sliding_window must be a positive window for sliding_attention layers, "
                         f"got {hf.get('sliding_window')!r}")
    return dict(layer_types=layer_types, swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)),
                swiglu_limit=float(hf.get("swiglu_limit", 7.0)))


def _deepseek_fields(architecture: str, hf: dict, num_experts: int) -> dict:
    """MLA and routing fields of DeepSeek-V2 / V3 configs; checks what the forward pass relies on,
    naming the field."""
    if not architecture.startswith("Deepseek"):
        return {}
    v3 = architecture == "DeepseekV3ForCausalLM"
    fields = dict(
        q_lora_rank=hf.get("q_lora_rank"),
        kv_lora_rank=hf["kv_lora_rank"],
        qk_nope_head_dim=hf["qk_nope_head_dim"],
        qk_rope_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"],
        head_dim=hf["qk_rope_head_dim"],  # as transformers sets it: the rotary width
        # V3 configs say rope_interleave (default true); V2 rotates complex pairs, the same thing.
        rope_interleave=bool(hf.get("rope_interleave", True)),
        num_nextn_predict_layers=hf.get("num_nextn_predict_layers") or 0,
        shared_expert_gated=False,
        scoring_func=hf.get("scoring_func") or ("sigmoid" if v3 else "softmax"),
        topk_method=hf.get("topk_method") or ("noaux_tc" if v3 else "greedy"),
        n_group=hf.get("n_group") or 1,
        topk_group=hf.get("topk_group") or 1,
        routed_scaling_factor=float(hf.get("routed_scaling_factor") or 1.0),
        norm_topk_prob=bool(hf.get("norm_topk_prob", v3)),
        shared_expert_intermediate_size=(hf.get("moe_intermediate_size") or 0) * (hf.get("n_shared_experts") or 0),
    )
    if fields["scoring_func"] not in ("softmax", "sigmoid"):
        raise ValueError(f"config.json: scoring_func {fields['scoring_func']!r} is not supported; supported: "
                         "softmax, sigmoid")
    if fields["topk_method"] not in ("greedy", "group_limited_greedy", "noaux_tc"):
        raise ValueError(f"config.json: topk_method {fields['topk_method']!r} is not supported; supported: "
                         "greedy, group_limited_greedy, noaux_tc")
    if fields["topk_method"] != "greedy" and num_experts:
        n_group, topk_group = fields["n_group"], fields["topk_group"]
        if num_experts % n_group:
            raise ValueError(f"config.json: n_group ({n_group}) must divide n_routed_experts ({num_experts})")
        if not 1 <= topk_group <= n_group:
            raise ValueError(f"config.json: topk_group ({topk_group}) must be in [1, n_group] (n_group = {n_group})")
        if fields["topk_method"] == "noaux_tc" and num_experts // n_group < 2:
            raise ValueError(f"config.json: n_group ({n_group}) leaves fewer than two experts per group, which "
                             "noaux_tc ranks by their top two")
        if hf.get("num_experts_per_tok", 0) > topk_group * (num_experts // n_group):
            raise ValueError(f"config.json: num_experts_per_tok ({hf.get('num_experts_per_tok')}) exceeds the "
                             f"experts of topk_group ({topk_group}) groups")
    return fields


def _quantization(hf: dict) -> dict:
    """`quantization_config`: block FP8 (DeepSeek-V3/R1, Kimi-K2, Qwen3 FP8), MXFP4 experts (gpt-oss)
    or refused naming the method."""
    quant = hf.get("quantization_config")
    if not quant:
        return {}
    method = quant.get("quant_method")
    if method not in SUPPORTED_QUANT_METHODS:
        raise ValueError(f"config.json: quantization_config.quant_method {method!r} is not supported; "
                         f"supported: {', '.join(SUPPORTED_QUANT_METHODS)}")
    if method == "mxfp4":
        keep = quant.get("modules_to_not_convert") or ()
        if isinstance(keep, str) or not all(isinstance(pattern, str) for pattern in keep):
            raise ValueError("config.json: quantization_config.modules_to_not_convert must be a list of module "
                             f"names or patterns, got {keep!r}")
        return dict(quant_method=method, modules_to_not_convert=tuple(keep))
    block = quant.get("weight_block_size") or (128, 128)
    if len(block) != 2 or min(block) < 1:
        raise ValueError(f"config.json: quantization_config.weight_block_size must be two positive sizes, got {block}")
    fmt = quant.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ValueError(f"config.json: quantization_config.fmt {fmt!r} is not supported; supported: e4m3")
    return dict(quant_method=method, weight_block_size=tuple(int(b) for b in block))
