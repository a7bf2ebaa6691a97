"""ModelConfig from HF config.json: every fixture family, both rope conventions, MoE layer rules."""

import json
import os

import pytest

from models.config import SUPPORTED_ARCHITECTURES, ModelConfig

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "parity")
ARCHS = ["llama", "llama3", "smollm2", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe", "qwen2_moe",
         "mixtral_sharded_legacy"]


def fixture_config(name: str) -> ModelConfig:
    return ModelConfig.from_folder(os.path.join(FIXTURES, name))


def raw_config(name: str) -> dict:
    with open(os.path.join(FIXTURES, name, "config.json")) as f:
        return json.load(f)


# name -> (architecture, family, num_heads, num_kv_heads, head_dim, tied, attention_bias, qk_norm,
#          sliding_window, num_experts)
EXPECTED = {
    "llama": ("LlamaForCausalLM", "llama", 4, 2, 16, False, False, False, None, 0),
    "llama3": ("LlamaForCausalLM", "llama", 4, 2, 16, False, False, False, None, 0),
    "smollm2": ("LlamaForCausalLM", "llama", 6, 2, 16, True, False, False, None, 0),
    "mistral": ("MistralForCausalLM", "llama", 4, 2, 16, False, False, False, 8, 0),
    "qwen2": ("Qwen2ForCausalLM", "llama", 4, 2, 16, False, True, False, None, 0),
    "qwen3": ("Qwen3ForCausalLM", "llama", 4, 2, 32, False, False, True, None, 0),
    "mixtral": ("MixtralForCausalLM", "moe", 4, 2, 16, False, False, False, None, 4),
    "mixtral_sharded_legacy": ("MixtralForCausalLM", "moe", 4, 2, 16, False, False, False, None, 4),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "moe", 4, 2, 32, False, False, True, None, 8),
    "qwen2_moe": ("Qwen2MoeForCausalLM", "moe", 4, 2, 16, False, True, False, None, 4),
}


@pytest.mark.parametrize("name", ARCHS)
def test_fixture_config_fields(name):
    cfg, hf = fixture_config(name), raw_config(name)
    arch, family, heads, kv_heads, head_dim, tied, bias, qk_norm, window, experts = EXPECTED[name]
    assert (cfg.architecture, cfg.family) == (arch, family)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (heads, kv_heads, head_dim)
    assert cfg.num_queries_per_kv == heads // kv_heads
    assert cfg.tie_word_embeddings is tied
    assert cfg.attention_bias is bias
    assert cfg.qk_norm is qk_norm
    assert cfg.sliding_window == window
    assert cfg.num_experts == experts and cfg.is_moe == (experts > 0)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers) == (
        hf["vocab_size"], hf["hidden_size"], hf["num_hidden_layers"])
    assert cfg.rms_norm_eps == hf["rms_norm_eps"]
    assert cfg.rope_theta == hf["rope_parameters"]["rope_theta"]
    assert cfg.max_position_embeddings == hf["max_position_embeddings"]
    assert cfg.bos_token_id == 1 and cfg.eos_token_id == (2,)


def test_smollm2_fixture_has_the_default_models_gqa_ratio():
    assert fixture_config("smollm2").num_queries_per_kv == 3


def test_null_head_dim_is_hidden_over_heads():
    hf = raw_config("mixtral")
    assert hf["head_dim"] is None
    assert fixture_config("mixtral").head_dim == hf["hidden_size"] // hf["num_attention_heads"]


def test_explicit_head_dim_wins_over_hidden_over_heads():
    cfg = fixture_config("qwen3")  # hidden 64 / 4 heads = 16, but head_dim 32
    assert cfg.head_dim == 32 and cfg.num_heads * cfg.head_dim != cfg.hidden_size


def test_moe_fixture_details():
    mixtral, qwen3_moe, qwen2_moe = (fixture_config(n) for n in ("mixtral", "qwen3_moe", "qwen2_moe"))
    assert mixtral.num_experts_per_tok == 2 and mixtral.moe_layers == (0, 1)
    assert mixtral.norm_topk_prob  # softmax over the top-k logits == renormalised top-k
    assert mixtral.moe_intermediate_size == 40 and mixtral.shared_expert_intermediate_size == 0
    assert qwen3_moe.norm_topk_prob and qwen3_moe.moe_layers == (0, 1)
    assert qwen3_moe.moe_intermediate_size == 40 and qwen3_moe.intermediate_size == 80
    assert not qwen2_moe.norm_topk_prob
    assert qwen2_moe.shared_expert_intermediate_size == 72 and qwen2_moe.moe_layers == (0, 1)


def test_dense_config_has_no_moe_fields():
    cfg = fixture_config("llama")
    assert (cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.moe_layers) == (0, 0, ())


BASE = dict(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=6, num_attention_heads=2)


def hf(architecture, **fields):
    return {"architectures": [architecture], **BASE, **fields}


@pytest.mark.parametrize("architecture", ["Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen2MoeForCausalLM",
                                          "Qwen3MoeForCausalLM"])
@pytest.mark.parametrize("window", [None, 0, 4096])
def test_qwen_window_unused_unless_use_sliding_window(architecture, window):
    assert ModelConfig.from_hf(hf(architecture, sliding_window=window, use_sliding_window=False)).sliding_window is None
    assert ModelConfig.from_hf(hf(architecture, sliding_window=window)).sliding_window is None


def test_qwen_window_used_when_asked():
    cfg = ModelConfig.from_hf(hf("Qwen2ForCausalLM", sliding_window=16, use_sliding_window=True))
    assert cfg.sliding_window == 16


def test_mistral_null_window_is_full_attention():
    assert ModelConfig.from_hf(hf("MistralForCausalLM", sliding_window=None)).sliding_window is None
    assert ModelConfig.from_hf(hf("MistralForCausalLM", sliding_window=4096)).sliding_window == 4096


def test_attention_bias_follows_the_config_outside_qwen2():
    assert ModelConfig.from_hf(hf("LlamaForCausalLM", attention_bias=True)).attention_bias
    assert not ModelConfig.from_hf(hf("Qwen3ForCausalLM", attention_bias=False)).attention_bias
    assert ModelConfig.from_hf(hf("Qwen2ForCausalLM")).attention_bias  # Qwen2 always has q/k/v bias


def test_defaults_mha_and_untied():
    cfg = ModelConfig.from_hf(hf("LlamaForCausalLM"))
    assert cfg.num_kv_heads == 2 and cfg.num_queries_per_kv == 1 and cfg.head_dim == 4
    assert not cfg.tie_word_embeddings and cfg.rope_theta == 10000.0 and cfg.rope_scaling is None


def test_eos_token_id_list_or_int():
    assert ModelConfig.from_hf(hf("LlamaForCausalLM", eos_token_id=[2, 7])).eos_token_id == (2, 7)
    assert ModelConfig.from_hf(hf("LlamaForCausalLM", eos_token_id=3)).eos_token_id == (3,)
    assert ModelConfig.from_hf(hf("LlamaForCausalLM")).eos_token_id == ()


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32}


def test_rope_theta_and_rope_parameters_agree():
    v4 = ModelConfig.from_hf(hf("LlamaForCausalLM", rope_theta=5e5))
    v5 = ModelConfig.from_hf(hf("LlamaForCausalLM", rope_parameters={"rope_theta": 5e5, "rope_type": "default"}))
    assert v4 == v5 and v5.rope_theta == 5e5 and v5.rope_scaling is None


def test_llama3_scaling_in_both_conventions():
    v4 = ModelConfig.from_hf(hf("LlamaForCausalLM", rope_theta=5e5, rope_scaling=LLAMA3_SCALING))
    v5 = ModelConfig.from_hf(hf("LlamaForCausalLM", rope_parameters={"rope_theta": 5e5, **LLAMA3_SCALING}))
    assert v4 == v5
    assert v5.rope_theta == 5e5 and v5.rope_scaling == LLAMA3_SCALING  # rope_theta not kept in scaling


def test_transformers4_scaling_with_type_key():
    """Older configs write `type` instead of `rope_type`."""
    cfg = ModelConfig.from_hf(hf("LlamaForCausalLM", rope_scaling={"type": "linear", "factor": 2.0}))
    assert cfg.rope_scaling["rope_type"] == "linear" and cfg.rope_scaling["factor"] == 2.0


def test_llama3_fixture_scaling():
    cfg = fixture_config("llama3")
    assert cfg.rope_scaling == {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                "original_max_position_embeddings": 32, "rope_type": "llama3"}
    assert cfg.rope_theta == 10000.0
    assert fixture_config("llama").rope_scaling is None


MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=4)


@pytest.mark.parametrize("step, dense_only, expected", [
    (1, [], (0, 1, 2, 3, 4, 5)),
    (2, [], (1, 3, 5)),
    (1, [0, 4], (1, 2, 3, 5)),
    (2, [3], (1, 5)),
    (3, None, (2, 5)),
])
def test_moe_layers_follow_sparse_step_and_mlp_only_layers(step, dense_only, expected):
    for arch in ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"):
        cfg = ModelConfig.from_hf(hf(arch, decoder_sparse_step=step, mlp_only_layers=dense_only, **MOE))
        assert cfg.moe_layers == expected


def test_mixtral_every_layer_is_moe():
    cfg = ModelConfig.from_hf(hf("MixtralForCausalLM", num_local_experts=4, num_experts_per_tok=2))
    assert cfg.moe_layers == tuple(range(6)) and cfg.moe_intermediate_size == 16  # intermediate_size


def test_norm_topk_prob():
    assert not ModelConfig.from_hf(hf("Qwen3MoeForCausalLM", **MOE)).norm_topk_prob  # transformers' default
    assert ModelConfig.from_hf(hf("Qwen3MoeForCausalLM", norm_topk_prob=True, **MOE)).norm_topk_prob
    assert ModelConfig.from_hf(hf("MixtralForCausalLM", num_local_experts=4, num_experts_per_tok=2,
                                  norm_topk_prob=False)).norm_topk_prob


@pytest.mark.parametrize("architectures", [["GPT2LMHeadModel"], [], None])
def test_unsupported_architecture_lists_supported_ones(architectures):
    with pytest.raises(ValueError, match="unsupported architecture") as info:
        ModelConfig.from_hf({**BASE, "architectures": architectures})
    for supported in SUPPORTED_ARCHITECTURES:
        assert supported in str(info.value)


def test_from_folder_without_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_folder(tmp_path)
