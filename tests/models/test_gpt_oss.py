"""The gpt-oss family through the engine: tiny random gpt-oss checkpoints against transformers
(tests/fixtures/parity, tools/make_parity_fixtures.py) served by `LLM.generate` with prompts longer
than the sliding window, chunked prefill, prefix-cache hits and preemption; the per-layer windows
of its KV spec; the clamped SwiGLU, the router and the biased experts against numpy; the
checkpoint's fused expert layout; parallel layouts against one device (8 fake devices in a
subprocess)."""

from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.config import ModelConfig
from models.gpt_oss import GptOssMoE, layer_windows, rotary
from models.registry import kv_spec
from models.weights import iter_safetensors, load_state
from pallas_kernels.moe import ExpertActivation
from tests.helpers import run_parallel_worker
from tests.jaxserve.parallel_worker import GPT_OSS_CASES
from tests.models.served import (
    FIXTURES, check_generate_matches_transformers, check_preemption_keeps_greedy_outputs, fixture, prompts_of)

SERVED = ["gpt_oss", "gpt_oss_gqa4"]


@pytest.mark.parametrize("name", SERVED)
def test_generate_matches_transformers(name):
    """tests/models/served.py, over prompts of 17 and 40 tokens past the window of 8 (the 40-token
    prompt plus its 16 tokens cross it 6 times): chunked prefill, prefix hits and n = 2."""
    loaded, ref = fixture(name)
    assert 8 in layer_windows(loaded.config) and None in layer_windows(loaded.config)
    assert max(len(p) for p in prompts_of(ref)) == 40
    check_generate_matches_transformers(name, loaded, ref)


def test_preemption_keeps_greedy_outputs():
    check_preemption_keeps_greedy_outputs(*fixture("gpt_oss"))


def test_kv_spec_gives_each_layer_its_window():
    """K and V in every layer; sliding layers carry their window (the handshake signature says
    so), full layers none."""
    config = ModelConfig.from_folder(FIXTURES / "gpt_oss")
    spec = kv_spec(config)
    assert [layer.sliding_window for layer in spec.layers] == [8, None, 8]
    assert spec.signature() == "1x[k:2x24,v:2x24]@w8+1x[k:2x24,v:2x24]+1x[k:2x24,v:2x24]@w8"
    loaded, _ = fixture("gpt_oss")
    assert [layer.self_attn.sliding_window for layer in loaded.model.layers] == [8, None, 8]


def gpt_oss_20b_config() -> dict:
    """openai/gpt-oss-20b's config.json, the fields the model reads (its MXFP4
    quantization_config left out: models/quantization.py reads it)."""
    return dict(architectures=["GptOssForCausalLM"], attention_bias=True, head_dim=64, hidden_size=2880,
                intermediate_size=2880, layer_types=["sliding_attention", "full_attention"] * 12,
                max_position_embeddings=131072, num_attention_heads=64, num_experts_per_tok=4, num_hidden_layers=24,
                num_key_value_heads=8, num_local_experts=32, rms_norm_eps=1e-5, sliding_window=128,
                swiglu_limit=7.0, tie_word_embeddings=False, vocab_size=201088, rope_theta=150000,
                rope_scaling=dict(beta_fast=32.0, beta_slow=1.0, factor=32.0, original_max_position_embeddings=4096,
                                  rope_type="yarn", truncate=False), eos_token_id=200002)


def test_gpt_oss_20b_config_reads():
    """gpt-oss-20b: 24 layers alternating window 128 and full, 8 KV heads of 64 (2 KiB per token and
    layer in bf16), every layer MoE over 32 experts of 2880, YaRN's cos/sin factor 0.1 ln 32 + 1."""
    cfg = ModelConfig.from_hf(gpt_oss_20b_config())
    assert layer_windows(cfg) == (128, None) * 12
    assert cfg.moe_layers == tuple(range(24)) and cfg.moe_intermediate_size == 2880 and cfg.num_experts == 32
    assert (cfg.swiglu_alpha, cfg.swiglu_limit) == (1.702, 7.0)
    assert kv_spec(cfg).bytes_per_token(jnp.bfloat16) == 24 * 2 * 8 * 64 * 2
    inv_freq, factor = rotary(cfg)
    assert inv_freq.shape == (32,) and factor == pytest.approx(0.1 * np.log(32) + 1)
    default = ModelConfig.from_hf({k: v for k, v in gpt_oss_20b_config().items() if k != "layer_types"})
    assert default.layer_types == cfg.layer_types  # transformers' default: sliding on even layers


@pytest.mark.parametrize("change,field", [
    (lambda hf: hf.update(layer_types=["sliding_attention"] * 3), "layer_types"),
    (lambda hf: hf.update(layer_types=["sliding_attention", "chunked_attention"] * 12), "layer_types"),
    (lambda hf: hf.update(sliding_window=None), "sliding_window"),
])
def test_bad_configs_name_the_field(change, field):
    hf = gpt_oss_20b_config()
    change(hf)
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_hf(hf)


def test_clamped_swiglu_against_numpy():
    """gpt-oss's activation, transformers' formula in numpy: gate clamped above at the limit, up
    both sides, (up + 1) * gate * sigmoid(alpha * gate); values on both sides of both limits."""
    rng = np.random.default_rng(0)
    gate, up = (rng.standard_normal((64, 24)).astype(np.float32) * 4 for _ in range(2))
    act = ExpertActivation("gpt_oss_clamped", alpha=1.3, limit=2.5)
    got = np.asarray(act(jnp.asarray(gate), jnp.asarray(up)))
    g, u = np.minimum(gate, 2.5).astype(np.float64), np.clip(up, -2.5, 2.5).astype(np.float64)
    want = (u + 1) * g / (1 + np.exp(-1.3 * g))
    assert (gate > 2.5).any() and (up < -2.5).any() and (up > 2.5).any()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="activation"):
        ExpertActivation("geglu")


def numpy_moe(block: GptOssMoE, x: np.ndarray) -> np.ndarray:
    """The block in float64 numpy, token by token: router logits + bias, top-k, softmax over the
    picked logits; each expert down(act(gate + b, up + b)) + b, weighted."""
    cfg, experts = block.config, block.experts
    w = {name: np.asarray(getattr(experts, name)[...], np.float64)
         for name in ("gate_proj", "up_proj", "down_proj", "gate_proj_bias", "up_proj_bias", "down_proj_bias")}
    logits = x @ np.asarray(block.router.kernel[...], np.float64) + np.asarray(block.router.bias[...], np.float64)
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        ids = np.argsort(-logits[t], kind="stable")[:cfg.num_experts_per_tok]
        weights = np.exp(logits[t, ids] - logits[t, ids].max())
        for e, weight in zip(ids, weights / weights.sum()):
            gate = np.minimum(x[t] @ w["gate_proj"][e] + w["gate_proj_bias"][e], cfg.swiglu_limit)
            up = np.clip(x[t] @ w["up_proj"][e] + w["up_proj_bias"][e], -cfg.swiglu_limit, cfg.swiglu_limit)
            hidden = (up + 1) * gate / (1 + np.exp(-cfg.swiglu_alpha * gate))
            out[t] += weight * (hidden @ w["down_proj"][e] + w["down_proj_bias"][e])
    return out


@pytest.mark.parametrize("name", SERVED)
def test_router_and_experts_against_numpy(name):
    """The loaded fixture's MoE block (gate and up read from the interleaved columns of the
    checkpoint's gate_up_proj) against numpy: router weights and the block's output."""
    loaded, _ = fixture(name)
    block = loaded.model.layers[0].mlp
    cfg = loaded.config
    x = np.asarray(jax.random.normal(jax.random.key(0), (33, cfg.hidden_size)), np.float32) * 2
    ids, weights = block.route(jnp.asarray(x))
    logits = x.astype(np.float64) @ np.asarray(block.router.kernel[...]) + np.asarray(block.router.bias[...])
    want_ids = np.argsort(-logits, axis=-1, kind="stable")[:, :cfg.num_experts_per_tok]
    np.testing.assert_array_equal(np.asarray(ids), want_ids)
    picked = np.take_along_axis(logits, want_ids, -1)
    want = np.exp(picked - picked.max(-1, keepdims=True))
    np.testing.assert_allclose(np.asarray(weights), want / want.sum(-1, keepdims=True), rtol=1e-5)
    ref = numpy_moe(block, x.astype(np.float64))
    got = np.asarray(block(jnp.asarray(x)), np.float64)
    # float32 against float64 over sums of <= 64 terms: 1e-5 of the largest output.
    assert np.abs(got - ref).max() < 1e-5 * np.abs(ref).max()


def test_fused_experts_load_as_gate_and_up_columns():
    """`experts.gate_up_proj` [E, H, 2I] holds gate in its even columns and up in its odd ones (as
    transformers splits it); `down_proj` is [E, I, H] as stored; the biases split the same way."""
    from safetensors.numpy import load_file

    loaded, _ = fixture("gpt_oss_gqa4")
    tensors = load_file(FIXTURES / "gpt_oss_gqa4" / "model.safetensors")
    experts = loaded.model.layers[1].mlp.experts
    stem = "model.layers.1.mlp.experts."
    np.testing.assert_array_equal(np.asarray(experts.gate_proj[...]), tensors[stem + "gate_up_proj"][..., 0::2])
    np.testing.assert_array_equal(np.asarray(experts.up_proj[...]), tensors[stem + "gate_up_proj"][..., 1::2])
    np.testing.assert_array_equal(np.asarray(experts.down_proj[...]), tensors[stem + "down_proj"])
    np.testing.assert_array_equal(np.asarray(experts.up_proj_bias[...]), tensors[stem + "gate_up_proj_bias"][:, 1::2])
    np.testing.assert_array_equal(np.asarray(experts.down_proj_bias[...]), tensors[stem + "down_proj_bias"])


def test_transposed_experts_name_the_tensor(tmp_path):
    """A gate_up_proj stored [E, 2I, H] (the [out, in] of other MoE checkpoints) is refused naming
    the tensor and the layout expected."""
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "gpt_oss"
    shutil.copytree(FIXTURES / "gpt_oss", folder)
    tensors = load_file(folder / "model.safetensors")
    name = "model.layers.2.mlp.experts.gate_up_proj"
    tensors[name] = np.ascontiguousarray(np.swapaxes(tensors[name], 1, 2))
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"layers\.2\.mlp\.experts\.gate_up_proj.*\[in, out\]"):
        load_state(ModelConfig.from_folder(folder), iter_safetensors(folder))


def test_weight_cache_restores_the_converted_model(tmp_path, monkeypatch):
    """The HF folder converts once (experts split at load); the orbax cache then restores the same
    parameters: equal logits, no second conversion."""
    from models.loader import load_model
    from tests.helpers import sequence_logits
    from tests.models.test_checkpoint import count_conversions, fixture_copy

    folder = fixture_copy(tmp_path, "gpt_oss")
    conversions = count_conversions(monkeypatch)
    first = load_model(str(folder), use_cache=True, cache_dir=str(tmp_path / "cache"))
    second = load_model(str(folder), use_cache=True, cache_dir=str(tmp_path / "cache"))
    assert conversions == [str(folder)]
    ids = [5, 9, 31, 2, 77, 140, 8, 1, 2, 3, 4, 5]
    np.testing.assert_array_equal(sequence_logits(first.model, ids), sequence_logits(second.model, ids))


@pytest.fixture(scope="module")
def parallel_results():
    return run_parallel_worker("gpt_oss", timeout=1800)


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in GPT_OSS_CASES if c != "single"])
def test_parallel_layouts_equal_one_device(parallel_results, case):
    """EP (both dispatch strategies), EP x TP (the down bias added once), DP attention with the
    heads and sinks over tp, DBO, wide EP: the single device's greedy tokens and logprobs; no extra
    executables."""
    from tests.jaxserve.test_parallel import _compare

    got, ref = parallel_results["gpt_oss"][case], parallel_results["gpt_oss"]["single"]
    assert got["tokens"] == ref["tokens"], case
    _compare(got, ref, f"gpt_oss/{case}")
    assert got["step_executables"] == ref["step_executables"]


@pytest.mark.slow
def test_eplb_rebalances_skewed_gpt_oss_routing(parallel_results):
    """A router bias sends every token to experts 0 and 1: EPLB replicates them (their biases move
    with them), and the outputs stay the single device's."""
    skewed = parallel_results["gpt_oss_skewed"]
    assert skewed["ep8_eplb"]["tokens"] == skewed["single"]["tokens"]
    history = skewed["ep8_eplb"]["eplb"]
    assert history and history[0]["before"] < 0.5 and history[0]["after"] >= 0.9


@pytest.mark.slow
def test_expert_parallel_kernel_takes_biases_and_the_clamp(parallel_results):
    """ep_moe_ffn with biases and the clamped SwiGLU (both dispatch strategies, all_to_all
    overflowing; tp splitting gate's and up's biases) against moe_ffn_reference: 1e-5 relative
    (float32, sums of <= 16 terms reordered)."""
    errors = parallel_results["gpt_oss_kernel"]
    assert len(errors) == 6 and max(errors.values()) < 1e-5, errors
