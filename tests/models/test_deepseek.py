"""The DeepSeek family through the engine: tiny random DeepSeek-V3 / V2-Lite checkpoints against
transformers (tests/fixtures/parity, tools/make_parity_fixtures.py), served by `LLM.generate`
with chunked prefill, prefix-cache hits, preemption and n > 1; the latent KV cache; routing;
parallel layouts against one device (8 fake devices in a subprocess); bad checkpoints."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.sampling_params import SamplingParams
from models.config import ModelConfig
from models.deepseek import DeepseekMoE, _keep_best_groups, softmax_scale
from models.loader import LoadedModel
from models.registry import kv_spec
from models.tokenizer import Tokenizer
from models.weights import iter_safetensors, load_state
from tests.helpers import run_parallel_worker
from tests.jaxserve.parallel_worker import DEEPSEEK_CASES, DEEPSEEK_EPLB_CASES
from tests.models.served import (
    FIXTURES, check_generate_matches_transformers, check_preemption_keeps_greedy_outputs, engine, fixture,
    prompts_of)

SERVED = ["deepseek_v3", "deepseek_v2_lite"]


@pytest.mark.parametrize("name", SERVED)
def test_generate_matches_transformers(name):
    """tests/models/served.py: prompt logprobs and greedy tokens through chunked prefill, prefix
    hits and n = 2."""
    check_generate_matches_transformers(name, *fixture(name))


def test_preemption_keeps_greedy_outputs():
    check_preemption_keeps_greedy_outputs(*fixture("deepseek_v3"))


def test_latent_cache_spec_and_startup_log(caplog):
    """One latent row per token and layer (kv_lora_rank + rope dim), not per-head K and V; the
    start-up log says its size against the per-head form."""
    loaded, _ = fixture("deepseek_v3")
    cfg = loaded.config
    spec = kv_spec(cfg)
    assert [[(a.name, a.token_shape) for a in layer.arrays] for layer in spec.layers] == [[("latent", (40,))]] * 3
    assert spec.bytes_per_token(jnp.bfloat16) == 40 * 3 * 2
    assert spec.expanded_token_elements == 3 * 4 * (16 + 8 + 12)
    with caplog.at_level(logging.INFO, logger="jaxserve"):
        llm = engine(loaded)
    assert "KV cache: 480 bytes per token (3x[latent:40], float32), against 1728 as per-head K and V (3.6x)" \
        in caplog.text
    caches = llm.engine.runner.kv_caches
    assert len(caches) == 3 and caches[0].arrays[0].shape[1:] == (4, 40)


def test_deepseek_v3_full_config_reads():
    """DeepSeek-V3's own config.json (the fields the model reads): 61 layers, the first 3 dense,
    576 latent values per token, YaRN's softmax correction, the MTP layer."""
    hf = dict(architectures=["DeepseekV3ForCausalLM"], vocab_size=129280, hidden_size=7168, intermediate_size=18432,
              moe_intermediate_size=2048, num_hidden_layers=61, num_nextn_predict_layers=1, num_attention_heads=128,
              num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256, routed_scaling_factor=2.5,
              kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128,
              topk_method="noaux_tc", n_group=8, topk_group=4, num_experts_per_tok=8, first_k_dense_replace=3,
              norm_topk_prob=True, scoring_func="sigmoid", max_position_embeddings=163840, rms_norm_eps=1e-6,
              rope_theta=10000, rope_scaling=dict(type="yarn", factor=40, beta_fast=32, beta_slow=1, mscale=1.0,
                                                  mscale_all_dim=1.0, original_max_position_embeddings=4096),
              quantization_config=dict(activation_scheme="dynamic", fmt="e4m3", quant_method="fp8",
                                       weight_block_size=[128, 128]))
    cfg = ModelConfig.from_hf(hf)
    assert cfg.moe_layers == tuple(range(3, 61)) and cfg.num_nextn_predict_layers == 1
    assert cfg.shared_expert_intermediate_size == 2048 and not cfg.shared_expert_gated
    spec = kv_spec(cfg)
    assert spec.bytes_per_token(jnp.bfloat16) == 576 * 61 * 2
    assert cfg.quant_method == "fp8" and cfg.weight_block_size == (128, 128)
    assert softmax_scale(cfg) == pytest.approx(192 ** -0.5 * (0.1 * np.log(40) + 1) ** 2)


def test_group_limited_routing_against_numpy():
    """Groups ranked by the sum of their top two (V3) or their best (V2); experts outside the
    kept groups are never chosen."""
    rng = np.random.default_rng(0)
    scores = rng.random((64, 16)).astype(np.float32)
    for by_top2 in (True, False):
        got = np.asarray(_keep_best_groups(jnp.asarray(scores), 4, 2, by_top2=by_top2))
        grouped = scores.reshape(64, 4, 4)
        rank = np.sort(grouped, -1)[..., -2:].sum(-1) if by_top2 else grouped.max(-1)
        keep = np.zeros((64, 4), bool)
        np.put_along_axis(keep, np.argsort(-rank, -1)[:, :2], True, -1)
        want = np.where(np.repeat(keep, 4, 1), scores, -np.inf)
        np.testing.assert_array_equal(got, want)


def test_router_weights_ignore_the_correction_bias():
    """The bias moves the choice, not the weights: weights are the chosen experts' sigmoid scores,
    renormalised, times routed_scaling_factor."""
    loaded, _ = fixture("deepseek_v3")
    block = loaded.model.layers[1].mlp
    assert isinstance(block, DeepseekMoE)
    x = jax.random.normal(jax.random.key(0), (32, 64), jnp.float32)
    ids, weights = block.route(x)
    scores = jax.nn.sigmoid(x @ block.gate.kernel[...])
    picked = np.take_along_axis(np.asarray(scores), np.asarray(ids), -1)
    np.testing.assert_allclose(np.asarray(weights), 2.5 * picked / picked.sum(-1, keepdims=True), rtol=1e-6)
    bias = np.zeros(8, np.float32)
    bias[[6, 7]] = 10.0  # experts 6 and 7 (one group) now win every token
    block.gate.e_score_correction_bias[...] = jnp.asarray(bias)
    ids, _ = block.route(x)
    assert {6, 7} <= set(np.asarray(ids)[0].tolist()) and all({6, 7} <= set(row) for row in np.asarray(ids).tolist())


@pytest.mark.parametrize("change,field", [
    (lambda hf: hf.update(quantization_config=dict(quant_method="gptq", bits=4)), "quantization_config.quant_method"),
    (lambda hf: hf.update(topk_group=5, n_group=4, topk_method="noaux_tc"), "topk_group"),
    (lambda hf: hf.update(scoring_func="softplus"), "scoring_func"),
])
def test_bad_configs_name_the_field(change, field):
    hf = json.loads((FIXTURES / "deepseek_v3" / "config.json").read_text())
    change(hf)
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        ModelConfig.from_hf(hf)


@pytest.fixture(scope="module")
def parallel_results():
    return run_parallel_worker("deepseek")


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in DEEPSEEK_CASES if c != "single" and "fp8" not in c])
def test_parallel_layouts_equal_one_device(parallel_results, case):
    """EP (both dispatch strategies), TP, DP attention over the latent cache, DBO: the single
    device's greedy tokens, token for token, and its logprobs; no extra executables."""
    from tests.jaxserve.test_parallel import _compare

    got, ref = parallel_results["deepseek"][case], parallel_results["deepseek"]["single"]
    assert got["tokens"] == ref["tokens"], case
    _compare(got, ref, f"deepseek/{case}")
    assert got["step_executables"] == ref["step_executables"]


@pytest.mark.slow
def test_fp8_latent_cache_on_dp_shards_equals_one_device(parallel_results):
    got, ref = parallel_results["deepseek"]["dp2_fp8"], parallel_results["deepseek"]["single_fp8"]
    from tests.jaxserve.test_parallel import _compare

    _compare(got, ref, "deepseek/fp8", near_tie=1e-3, logprob_tolerance=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in DEEPSEEK_EPLB_CASES if c != "single"])
def test_eplb_rebalances_skewed_deepseek_routing(parallel_results, case):
    """A correction bias sends every token to experts 0 and 1: EPLB replicates them, and the
    outputs stay the single device's."""
    skewed = parallel_results["deepseek_skewed"]
    assert skewed[case]["tokens"] == skewed["single"]["tokens"]
    history = skewed[case]["eplb"]
    assert history and history[0]["before"] < 0.5 and history[0]["after"] >= 0.9


def test_missing_tensor_names_it(tmp_path):
    folder = tmp_path / "v3"
    shutil.copytree(FIXTURES / "deepseek_v3", folder)
    from safetensors.numpy import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.gate.e_score_correction_bias"]
    save_file(tensors, folder / "model.safetensors")
    from models.weights import WeightError

    with pytest.raises(WeightError, match="e_score_correction_bias"):
        load_state(ModelConfig.from_folder(folder), iter_safetensors(folder))


def test_memory_table_for_deepseek_v3_on_h200s():
    """From the real config: ~671B parameters, FP8 projections at 1 byte (plus a float32 scale per
    128 x 128 block); the latent cache is 576 x 61 x 2 bytes per token on a device in every layout
    (replicated over TP, one device's own requests under attention DP)."""
    from jaxserve.benchmarks.memory_table import DEEPSEEK_V3, table

    tp, ep8, ep16, ep32 = table(DEEPSEEK_V3, ep_sizes=(8, 16, 32))
    assert 6.6e11 < tp["param_bytes_total"] < 7.0e11
    assert all(r["kv_bytes_per_token_per_device"] == 576 * 61 * 2 for r in (tp, ep8, ep16, ep32))
    assert ep8["param_bytes_per_device"] > ep16["param_bytes_per_device"] > ep32["param_bytes_per_device"]
    assert ep32["kv_tokens_system"] == 32 * ep32["kv_tokens_per_device"] > tp["kv_tokens_system"]


@pytest.fixture(scope="module")
def tiny_deepseek():
    from tests.engine_utils import tiny_deepseek_config, tiny_loaded_model

    return tiny_loaded_model(tiny_deepseek_config())


def test_a_per_head_kv_engine_fails_the_handshake_with_a_latent_one(tiny_deepseek):
    """Disaggregated prefill between DeepSeek engines moves latent blocks
    (tests/jaxserve/kv/test_kv_transfer.py); an engine of a per-head K/V model fails the handshake
    naming the KV layout."""
    from jaxserve.kv.disagg_connector import DecodeConnector, PrefillConnector
    from jaxserve.kv.transfer import InProcessTransport, KVHandshakeError
    from tests.engine_utils import tiny_engine, tiny_loaded_model

    transport = InProcessTransport()
    prefill = tiny_engine(tiny_deepseek, kv_connector=PrefillConnector(transport))
    assert prefill.kv_layout.block_bytes == 4 * kv_spec(tiny_deepseek.config).bytes_per_token(jnp.float32)
    with pytest.raises(KVHandshakeError, match=r"kv_spec \(local .2x\[k:2x16,v:2x16\]., remote .2x\[latent:40\]."):
        tiny_engine(tiny_loaded_model(), kv_connector=DecodeConnector(transport, 4))


@pytest.mark.parametrize("fp8_weights", ["dequantize", "keep"])
def test_block_fp8_checkpoint_matches_transformers_on_dequantized_weights(fp8_weights):
    """deepseek_v3's projections stored as block FP8 (16 x 16 blocks, ragged at the edges; experts
    per expert) against transformers run on the dequantized weights, dequantized at load or kept as
    fp8 kernels with block scales (the product then dequantizes in the step on CPU, the
    DEFAULT_MATMUL there): logits within 1e-4 and 16 greedy tokens through LLM.generate."""
    from models.quantization import FP8
    from tests.helpers import relative_error, sequence_logits

    folder = FIXTURES / "deepseek_v3_fp8"
    config = ModelConfig.from_folder(folder)
    assert config.quant_method == "fp8" and config.weight_block_size == (16, 16)
    model = load_state(config, iter_safetensors(folder), fp8_weights=fp8_weights)
    kernel = model.layers[1].self_attn.kv_b_proj.kernel[...]
    assert kernel.dtype == (FP8 if fp8_weights == "keep" else jnp.float32)
    ref = np.load(folder / "reference.npz")
    errors = [relative_error(sequence_logits(model, ref[f"input_ids_{i}"].tolist(), block_size=4, chunk=7),
                             ref[f"logits_{i}"]) for i in range(int(ref["num_prompts"]))]
    assert max(errors) < 1e-4, errors
    built = config if fp8_weights == "keep" else dataclasses.replace(config, quant_method=None, weight_block_size=None)
    loaded = LoadedModel(model=model, config=built, tokenizer=Tokenizer.word_level(config.vocab_size, eos_id=2),
                         generation_config={}, source=f"fixture-fp8-{fp8_weights}", name="fp8")
    outputs = engine(loaded).generate([{"prompt_token_ids": p} for p in prompts_of(ref)],
                                      SamplingParams(max_tokens=16, temperature=0, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [ref[f"greedy_{i}"].tolist() for i in range(3)]


def test_mtp_layer_loads_and_a_checkpoint_without_it_loads_too(tmp_path, caplog):
    """The checkpoint's layer `num_hidden_layers` is the MTP layer: its decoder, norms and eh_proj
    load into `model.mtp[0]` (its embedding and head copies are not loaded), and its forward joins
    the next token's embedding with the hidden state; the fixture, which transformers saved without
    it, loads without it and says so."""
    from safetensors.numpy import load_file, save_file

    with caplog.at_level(logging.INFO, logger="models.weights"):
        loaded, _ = fixture("deepseek_v3")
    assert "no multi-token-prediction layer" in caplog.text and not hasattr(loaded.model, "mtp")

    folder = tmp_path / "v3_mtp"
    shutil.copytree(FIXTURES / "deepseek_v3", folder)
    tensors = load_file(folder / "model.safetensors")
    rng = np.random.default_rng(0)
    for name in [n for n in tensors if n.startswith("model.layers.1.")]:
        tensors[name.replace("model.layers.1.", "model.layers.3.")] = tensors[name] + 0.01
    extra = {"enorm.weight": (64,), "hnorm.weight": (64,), "eh_proj.weight": (64, 128),
             "shared_head.norm.weight": (64,), "embed_tokens.weight": (160, 64), "shared_head.head.weight": (160, 64)}
    for name, shape in extra.items():
        tensors[f"model.layers.3.{name}"] = (rng.standard_normal(shape) * 0.1 + (1 if "norm" in name else 0)).astype(
            np.float32)
    save_file(tensors, folder / "model.safetensors")
    model = load_state(ModelConfig.from_folder(folder), iter_safetensors(folder))
    mtp = model.mtp[0]
    np.testing.assert_array_equal(np.asarray(mtp.eh_proj.kernel[...]), tensors["model.layers.3.eh_proj.weight"].T)
    np.testing.assert_array_equal(np.asarray(mtp.decoder.self_attn.kv_b_proj.kernel[...]),
                                  tensors["model.layers.3.self_attn.kv_b_proj.weight"].T)
    np.testing.assert_array_equal(np.asarray(mtp.decoder.mlp.gate.e_score_correction_bias[...]),
                                  tensors["model.layers.3.mlp.gate.e_score_correction_bias"])
    # The forward runs over its own latent cache layer and uses both of its inputs.
    from models.kv_spec import allocate
    from models.layers import AttentionMetadata

    cache = allocate(kv_spec(model.config).layers[0], num_blocks=4, block_size=4, dtype=jnp.float32)
    meta = AttentionMetadata(slot_mapping=jnp.arange(4, 9, dtype=jnp.int32), query_start_loc=jnp.asarray([0, 5]),
                             seq_lens=jnp.asarray([5]), block_tables=jnp.asarray([[1, 2, 3]]),
                             num_seqs=jnp.asarray(1), token_mask=jnp.ones(5, bool))
    hidden = jax.random.normal(jax.random.key(1), (5, 64), jnp.float32)
    ids, positions = jnp.asarray([3, 9, 27, 81, 2], jnp.int32), jnp.arange(5, dtype=jnp.int32)
    out, new_cache = mtp(model, hidden, ids, positions, cache, meta)
    logits = mtp.logits(model, out)
    assert out.shape == (5, 64) and logits.shape == (5, 160) and np.isfinite(np.asarray(logits)).all()
    assert np.abs(np.asarray(new_cache.arrays[0][1:3])).sum() > 0  # its rows were written
    other_ids = mtp.logits(model, mtp(model, hidden, ids[::-1], positions, cache, meta)[0])
    other_hidden = mtp.logits(model, mtp(model, hidden[::-1], ids, positions, cache, meta)[0])
    assert not np.allclose(logits, other_ids) and not np.allclose(logits, other_hidden)


@pytest.mark.parametrize("fp8_weights", ["keep", "dequantize"])
def test_jaxserve_convert_keeps_or_dequantizes_block_fp8(tmp_path, fp8_weights):
    """`jaxserve convert --fp8-weights keep|dequantize` on the FP8 DeepSeek-V3 fixture: the folder
    loads with the weights as asked and the logits of the source."""
    from models import checkpoint
    from models.loader import load_model
    from models.quantization import FP8
    from server.main import main
    from tests.helpers import sequence_logits
    from tests.models.test_checkpoint import fixture_copy

    src = fixture_copy(tmp_path, "deepseek_v3_fp8")
    dst = tmp_path / "converted"
    assert main(["convert", str(src), str(dst), "--fp8-weights", fp8_weights]) == 0
    assert checkpoint.is_checkpoint(dst)
    loaded = load_model(str(dst), use_cache=False, fp8_weights=fp8_weights)
    kernel = loaded.model.layers[1].self_attn.q_b_proj.kernel[...]
    assert kernel.dtype == (FP8 if fp8_weights == "keep" else jnp.float32)
    ref = np.load(FIXTURES / "deepseek_v3_fp8" / "reference.npz")
    from tests.helpers import relative_error

    ids = ref["input_ids_1"].tolist()
    assert relative_error(sequence_logits(loaded.model, ids), ref["logits_1"]) < 1e-4


def test_weight_cache_of_a_checkpoint_without_mtp_restores(tmp_path, monkeypatch):
    """A DeepSeek folder whose config names an MTP layer its weights lack converts once; the cache
    then restores (its config says what was built) instead of failing and converting every time."""
    from models.loader import load_model
    from tests.helpers import sequence_logits
    from tests.models.test_checkpoint import count_conversions, fixture_copy

    folder = fixture_copy(tmp_path, "deepseek_v3")
    conversions = count_conversions(monkeypatch)
    first = load_model(str(folder), use_cache=True, cache_dir=str(tmp_path / "cache"))
    second = load_model(str(folder), use_cache=True, cache_dir=str(tmp_path / "cache"))
    assert conversions == [str(folder)]
    assert second.config.num_nextn_predict_layers == 0 and not hasattr(second.model, "mtp")
    ids = [5, 9, 31, 2, 77, 140, 8]
    np.testing.assert_array_equal(sequence_logits(first.model, ids), sequence_logits(second.model, ids))


def test_checkpoint_saved_with_fp8_experts_restores_dequantized(tmp_path):
    """`jaxserve convert --fp8-weights keep` then a load that dequantizes: the stacked experts'
    block scales are applied too, and the logits are transformers' (dequantized weights)."""
    from models import checkpoint
    from models.loader import load_model
    from server.main import main
    from tests.helpers import relative_error, sequence_logits
    from tests.models.test_checkpoint import fixture_copy

    src = fixture_copy(tmp_path, "deepseek_v3_fp8")
    dst = tmp_path / "kept"
    assert main(["convert", str(src), str(dst), "--fp8-weights", "keep"]) == 0
    loaded = load_model(str(dst), use_cache=False, fp8_weights="dequantize")
    assert loaded.model.layers[1].mlp.experts.gate_proj[...].dtype == jnp.float32
    ref = np.load(FIXTURES / "deepseek_v3_fp8" / "reference.npz")
    assert relative_error(sequence_logits(loaded.model, ref["input_ids_2"].tolist()), ref["logits_2"]) < 1e-4
    assert checkpoint.is_checkpoint(dst)
