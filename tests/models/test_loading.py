"""Configs, safetensors loading errors, the orbax cache and `jaxserve convert`."""

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from models import checkpoint
from models.config import ModelConfig
from models.loader import convert, load_model, resolve_model_path
from models.weights import WeightError, iter_safetensors, load_state
from tests.engine_utils import tiny_tokenizer
from tests.helpers import sequence_logits

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "parity")


def fixture_copy(tmp_path, name="llama"):
    dst = tmp_path / name
    shutil.copytree(os.path.join(FIXTURES, name), dst)
    return dst


def test_config_reads_both_rope_conventions():
    base = dict(architectures=["LlamaForCausalLM"], vocab_size=10, hidden_size=8, intermediate_size=16,
                num_hidden_layers=1, num_attention_heads=2)
    old = ModelConfig.from_hf({**base, "rope_theta": 5e5, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}})
    new = ModelConfig.from_hf({**base, "rope_parameters": {
        "rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32}})
    assert old == new and new.rope_theta == 5e5 and new.rope_scaling["rope_type"] == "llama3"
    assert ModelConfig.from_hf({**base, "rope_parameters": {"rope_theta": 1e4, "rope_type": "default"}}).rope_scaling is None
    assert new.num_kv_heads == 2 and new.head_dim == 4  # defaults: MHA, hidden / heads


def test_config_family_details_from_fixtures():
    cfg = {name: ModelConfig.from_folder(os.path.join(FIXTURES, name)) for name in
           ("smollm2", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral")}
    assert cfg["smollm2"].tie_word_embeddings and cfg["smollm2"].num_queries_per_kv == 3
    assert cfg["mistral"].sliding_window == 8
    assert cfg["qwen2"].attention_bias and cfg["qwen2"].sliding_window is None
    assert cfg["qwen3"].qk_norm and cfg["qwen3"].head_dim == 32
    assert cfg["qwen2_moe"].sliding_window is None  # "sliding_window": 0 with use_sliding_window false
    assert cfg["qwen2_moe"].shared_expert_intermediate_size == 72 and not cfg["qwen2_moe"].norm_topk_prob
    assert cfg["qwen3_moe"].norm_topk_prob and cfg["qwen3_moe"].moe_layers == (0, 1)
    assert cfg["mixtral"].num_experts == 4 and cfg["mixtral"].num_experts_per_tok == 2


def test_moe_layers_follow_sparse_step_and_dense_layers():
    hf = dict(architectures=["Qwen3MoeForCausalLM"], vocab_size=10, hidden_size=8, intermediate_size=16,
              num_hidden_layers=6, num_attention_heads=2, num_experts=4, num_experts_per_tok=2,
              moe_intermediate_size=4, decoder_sparse_step=2, mlp_only_layers=[3])
    assert ModelConfig.from_hf(hf).moe_layers == (1, 5)


def test_unsupported_architecture_lists_supported_ones():
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'.*LlamaForCausalLM"):
        ModelConfig.from_hf({"architectures": ["GPT2LMHeadModel"]})


def _rewrite(folder, edit):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)
    return str(path)


@pytest.mark.parametrize("case", ["missing", "wrong_shape", "unexpected", "truncated"])
def test_bad_safetensors_name_file_tensor_and_shape(tmp_path, case):
    folder = fixture_copy(tmp_path)
    config = ModelConfig.from_folder(folder)
    name = "model.layers.1.self_attn.k_proj.weight"
    if case == "missing":
        _rewrite(folder, lambda t: t.pop(name))
        match = r"missing 1 tensors, e.g. layers.1.self_attn.k_proj.kernel \(64, 32\)"
    elif case == "wrong_shape":
        path = _rewrite(folder, lambda t: t.update({name: np.zeros((31, 64), np.float32)}))
        match = rf"{path}: tensor '{name}' has shape \(31, 64\), expected \(32, 64\)"
    elif case == "unexpected":
        _rewrite(folder, lambda t: t.update({"model.layers.0.mlp.extra.weight": np.zeros(3, np.float32)}))
        match = "unexpected tensor 'model.layers.0.mlp.extra.weight'"
    else:
        path = folder / "model.safetensors"
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        match = "model.safetensors: cannot read safetensors file"
    with pytest.raises(WeightError, match=match):
        load_state(config, iter_safetensors(folder))


def test_missing_expert_is_reported(tmp_path):
    folder = fixture_copy(tmp_path, "qwen3_moe")
    _rewrite(folder, lambda t: t.pop("model.layers.0.mlp.experts.5.up_proj.weight"))
    with pytest.raises(WeightError, match=r"missing experts \[5\] of layers.0.mlp.experts.up_proj"):
        load_state(ModelConfig.from_folder(folder), iter_safetensors(folder))


def test_tied_model_accepts_redundant_lm_head_and_ignores_rotary_buffers(tmp_path):
    folder = fixture_copy(tmp_path, "smollm2")
    _rewrite(folder, lambda t: t.update({
        "lm_head.weight": t["model.embed_tokens.weight"].copy(),
        "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)}))
    load_state(ModelConfig.from_folder(folder), iter_safetensors(folder))


def with_tokenizer(folder, vocab_size):
    tiny_tokenizer(vocab_size).save(str(folder))
    return folder


def test_orbax_cache_converts_once_then_restores(tmp_path, monkeypatch):
    folder = with_tokenizer(fixture_copy(tmp_path, "qwen3"), 160)
    cache = tmp_path / "cache"
    first = load_model(str(folder), cache_dir=str(cache))
    cached = checkpoint.cache_path_for(str(folder), np.float32, str(cache))
    assert checkpoint.is_checkpoint(cached)

    import models.loader

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again although a cached checkpoint exists")

    monkeypatch.setattr(models.loader, "_convert", no_conversion)
    second = load_model(str(folder), cache_dir=str(cache))
    ids = list(range(3, 40))
    np.testing.assert_array_equal(sequence_logits(first.model, ids), sequence_logits(second.model, ids))
    os.utime(folder, ns=(0, 0))  # a changed source gets a new cache entry
    assert checkpoint.cache_path_for(str(folder), np.float32, str(cache)) != cached


def test_jaxserve_convert_writes_a_loadable_folder(tmp_path):
    from jaxserve.cli import main

    src = with_tokenizer(fixture_copy(tmp_path, "mixtral"), 160)
    dst = tmp_path / "converted"
    assert main(["convert", str(src), str(dst)]) == 0
    assert resolve_model_path(str(dst)) == str(dst)
    loaded = load_model(str(dst), use_cache=False)
    direct = load_model(str(src), use_cache=False)
    ids = list(range(3, 30))
    np.testing.assert_array_equal(sequence_logits(loaded.model, ids), sequence_logits(direct.model, ids))
    assert loaded.tokenizer.encode("w5 w7") == [5, 7]
    with open(dst / checkpoint.CONFIG_FILE) as f:
        assert json.load(f)["hf_config"]["architectures"] == ["MixtralForCausalLM"]


def test_unknown_model_names_the_accepted_forms():
    with pytest.raises(FileNotFoundError, match="known alias.*gguf.*config.json"):
        resolve_model_path("no-such-model")
