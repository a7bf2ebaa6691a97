"""Block-FP8 weights (models/quantization.py): the block math against numpy references, the
block-scaled matmul against dequantize-then-matmul, and tiny block-FP8 checkpoints (written here
as DeepSeek-V3's are: float8_e4m3fn weights, float32 `weight_scale_inv`) loaded dequantized and
kept, against the same model loaded from the dequantized weights."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import quantization
from models.checkpoint import load_checkpoint
from models.config import ModelConfig
from models.loader import convert, load_model
from models.quantization import FP8, BlockFP8, block_fp8_matmul, dequantize, quantize, quantize_activations
from models.registry import build_model
from models.tokenizer import Tokenizer
from models.weights import WeightError, iter_safetensors, load_state
from tests.helpers import relative_error, sequence_logits

LLAMA = dict(architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=80, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=160, rms_norm_eps=1e-6,
             max_position_embeddings=256, tie_word_embeddings=False)
QWEN3_MOE = dict(LLAMA, architectures=["Qwen3MoeForCausalLM"], num_experts=4, num_experts_per_tok=2,
                 moe_intermediate_size=40, norm_topk_prob=True, intermediate_size=80)
# Blocks that leave ragged last blocks everywhere: hidden 64 = 32 + 32 but 48 + 16 over inputs,
# intermediate 80 = 32 + 32 + 16, expert intermediate 40 = 32 + 8.
BLOCK = [32, 48]
FP8_CONFIG = dict(quant_method="fp8", fmt="e4m3", activation_scheme="dynamic", weight_block_size=BLOCK)
PROMPT = [3, 17, 42, 99, 5, 150, 8, 77, 23]


def reference_dequantize(weight: np.ndarray, scale: np.ndarray, block) -> np.ndarray:
    """Element by element, as the format defines it."""
    out = np.empty(weight.shape, np.float32)
    for i in range(weight.shape[0]):
        for j in range(weight.shape[1]):
            out[i, j] = np.float32(weight[i, j]) * scale[i // block[0], j // block[1]]
    return out


# ---- the block math ----

@pytest.mark.parametrize("shape, block", [((64, 96), (32, 48)), ((70, 50), (32, 48)), ((300, 129), (128, 128)),
                                          ((1, 5), (128, 128))])
def test_dequantize_matches_the_reference_incl_ragged_blocks(shape, block):
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal(shape) * 100).astype(FP8)
    scale = rng.uniform(0.5, 2.0, (-(-shape[0] // block[0]), -(-shape[1] // block[1]))).astype(np.float32)
    want = reference_dequantize(weight, scale, block)
    np.testing.assert_array_equal(dequantize(weight, scale, block), want)
    np.testing.assert_array_equal(np.asarray(dequantize(jnp.asarray(weight), jnp.asarray(scale), block)), want)
    stacked = dequantize(np.stack([weight, weight]), np.stack([scale, 2 * scale]), block, jnp.bfloat16)
    assert stacked.dtype == jnp.bfloat16
    np.testing.assert_array_equal(stacked[1].astype(np.float32), (2 * want).astype(jnp.bfloat16).astype(np.float32))


@pytest.mark.parametrize("shape, block", [((70, 50), (32, 48)), ((3, 256, 130), (128, 128))])
def test_quantize_rounds_each_weight_to_e4m3(shape, block):
    """e4m3 keeps 3 mantissa bits: a normal value rounds by at most 2^-4 of itself; values below
    the normal range (2^-6 of a block's scale unit) by at most half a subnormal step (2^-10)."""
    weight = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    weight[..., :3, :3] = 0  # an all-zero corner stays exact
    q, scale = quantize(weight, block)
    assert q.dtype == FP8 and scale.shape == shape[:-2] + (-(-shape[-2] // block[0]), -(-shape[-1] // block[1]))
    back = dequantize(q, scale, block)
    unit = quantization.expand_scales(scale, shape, block)
    assert np.all(np.abs(back - weight) <= np.maximum(2.0**-4 * np.abs(weight), 2.0**-10 * unit))
    q_jax, scale_jax = quantize(jnp.asarray(weight), block)  # XLA divides by 448 to within an ulp
    np.testing.assert_allclose(np.asarray(scale_jax), scale, rtol=1e-6)
    back = np.asarray(dequantize(q_jax, scale_jax, block))
    assert np.all(np.abs(back - weight) <= np.maximum(2.0**-4 * np.abs(weight), 2.0**-10 * unit))


def test_activation_quantization_per_token_group():
    x = jax.random.normal(jax.random.PRNGKey(0), (5, 300), jnp.float32) * jnp.arange(1, 301)
    q, scale = quantize_activations(x, 128)
    assert q.shape == (5, 384) and q.dtype == FP8 and scale.shape == (5, 3)
    back = (q.astype(jnp.float32).reshape(5, 3, 128) * scale[..., None]).reshape(5, 384)
    np.testing.assert_array_equal(np.asarray(back[:, 300:]), 0)
    assert float(jnp.max(jnp.abs(back[:, :300] - x) / jnp.abs(x))) <= 2.0**-4
    np.testing.assert_allclose(np.asarray(jnp.max(jnp.abs(q.astype(jnp.float32)), axis=-1)), 448.0)


# The scaled product rounds every activation to e4m3 (3 mantissa bits: at most 2^-4 relative, about
# 2^-4/sqrt(3) = 3.6% rms). Those errors add in quadrature over the inputs as the products do, so
# the output is off by ~3.6% of its typical size; the largest over a few thousand outputs stays
# well within 10% of the largest output (measured: 2.0-2.8%, f32 and bf16).
SCALED_TOLERANCE = 0.1


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("tokens, k, n, block", [(1, 128, 256, (128, 128)), (7, 300, 200, (128, 128)),
                                                 (33, 256, 130, (64, 32)), (4, 40, 96, (32, 48))])
def test_block_scaled_matmul_against_dequantize_then_matmul(dtype, tokens, k, n, block):
    key = jax.random.PRNGKey(tokens)
    quant = BlockFP8(block)
    kernel, scale = quantize(jax.random.normal(key, (k, n)) * 0.05, quant.kernel_block)
    x = jax.random.normal(jax.random.fold_in(key, 1), (tokens, k)).astype(dtype)
    want = x.astype(jnp.float32) @ dequantize(kernel, scale, quant.kernel_block)
    dequantized = jax.jit(lambda *a: block_fp8_matmul(*a, quant, "dequantize"))(x, kernel, scale)
    scaled = jax.jit(lambda *a: block_fp8_matmul(*a, quant, "scaled"))(x, kernel, scale)
    assert dequantized.dtype == scaled.dtype == dtype and scaled.shape == (tokens, n)
    exact = 1e-6 if dtype == jnp.float32 else 1e-2  # bf16: the weight and the output rounded to 8 bits (0.2-0.4%)
    assert relative_error(dequantized, want) < exact
    assert relative_error(scaled, want) < SCALED_TOLERANCE


def test_scaled_matmul_in_chunks_equals_one_chunk(monkeypatch):
    """Chunks of input blocks (a scan, the last chunk padded with zero blocks) bound the partial
    products' memory; the sum is the same up to float32 reordering."""
    quant = BlockFP8((32, 32))
    key = jax.random.PRNGKey(3)
    kernel, scale = quantize(jax.random.normal(key, (7 * 32 + 5, 64)), quant.kernel_block)  # 8 blocks
    x = jax.random.normal(jax.random.fold_in(key, 1), (2, 3, kernel.shape[0]))  # leading axes kept
    whole = block_fp8_matmul(x, kernel, scale, quant, "scaled")
    monkeypatch.setattr(quantization, "SCALED_CHUNK_BYTES", 3 * 6 * 64 * 4)  # 3 blocks per chunk
    chunked = block_fp8_matmul(x, kernel, scale, quant, "scaled")
    assert chunked.shape == (2, 3, 64)
    assert relative_error(chunked, whole) < 1e-6


# ---- checkpoints ----

def save_safetensors(tensors: dict[str, np.ndarray], path) -> None:
    """The safetensors format written directly: the library's numpy writer has no float8."""
    names = {np.dtype(np.float32): "F32", np.dtype(FP8): "F8_E4M3"}
    header, offset, blobs = {}, 0, []
    for name, array in tensors.items():
        data = np.ascontiguousarray(array).tobytes()
        header[name] = dict(dtype=names[array.dtype], shape=list(array.shape),
                            data_offsets=[offset, offset + len(data)])
        offset += len(data)
        blobs.append(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + b"".join(blobs))


def hf_tensors(config: ModelConfig, seed: int = 0, weight_scale: float = 4.0) -> dict[str, np.ndarray]:
    """A random model's weights under their HF names ([out, in] linears, per-expert tensors)."""
    model = build_model(config, seed=seed)
    tensors = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = np.asarray(var.get_value(), np.float32)
        name = "model." + ".".join(map(str, path))
        if path[0] == "lm_head":
            name = name.removeprefix("model.")
        if path[-1] == "kernel":
            tensors[name.removesuffix("kernel") + "weight"] = weight_scale * value.T
        elif "experts" in path:
            for e in range(value.shape[0]):
                tensors[name.replace("experts.", f"experts.{e}.") + ".weight"] = weight_scale * value[e].T
        else:
            tensors[name] = value
    return tensors


def quantized(name: str) -> bool:
    """The tensors a block-FP8 checkpoint quantizes: linear weights but the router and the LM head."""
    return name.endswith("proj.weight") or (".experts." in name and name.endswith("_proj"))


def write_checkpoint(folder, hf_config: dict, tensors: dict[str, np.ndarray], *, fp8: bool) -> dict:
    """An HF folder (config, safetensors, tokenizer); with `fp8`, the quantized tensors stored as
    block FP8. Returns the dequantized tensors (what the fp8 checkpoint holds, as floats)."""
    folder.mkdir()
    stored, plain = {}, dict(tensors)
    for name, value in tensors.items():
        if fp8 and quantized(name):
            q, scale = quantize(value, BLOCK)
            stored[name], stored[name + "_scale_inv"] = q, scale
            plain[name] = dequantize(q, scale, BLOCK)
        else:
            stored[name] = value
    config = dict(hf_config, quantization_config=FP8_CONFIG) if fp8 else hf_config
    (folder / "config.json").write_text(json.dumps(config))
    save_safetensors(stored, folder / "model.safetensors")
    Tokenizer.word_level(hf_config["vocab_size"]).save(str(folder))
    return plain


@pytest.fixture(scope="module")
def llama_folders(tmp_path_factory):
    """(block-FP8 folder, the same weights dequantized in a plain float32 folder)."""
    root = tmp_path_factory.mktemp("fp8")
    tensors = hf_tensors(ModelConfig.from_hf(LLAMA))
    dequantized = write_checkpoint(root / "fp8", LLAMA, tensors, fp8=True)
    write_checkpoint(root / "plain", LLAMA, dequantized, fp8=False)
    return root / "fp8", root / "plain"


def load(folder, fp8_weights="dequantize"):
    return load_state(ModelConfig.from_folder(folder), iter_safetensors(folder), fp8_weights=fp8_weights)


def test_llama_fp8_checkpoint_dequantized_equals_the_dequantized_weights(llama_folders):
    fp8, plain = llama_folders
    model = load(fp8, "dequantize")
    assert model.config.quant_method is None and model.layers[0].mlp.gate_proj.kernel.dtype == jnp.float32
    np.testing.assert_allclose(sequence_logits(model, PROMPT), sequence_logits(load(plain), PROMPT),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("matmul", ["dequantize", "scaled"])
def test_llama_fp8_checkpoint_kept_is_close(llama_folders, monkeypatch, matmul):
    """Kept fp8: the in-step dequantization gives the same product as the dequantized weights
    (float32 reordering); the scaled product rounds activations to e4m3 (SCALED_TOLERANCE)."""
    monkeypatch.setattr(quantization, "DEFAULT_MATMUL", matmul)
    fp8, plain = llama_folders
    model = load(fp8, "keep")
    proj = model.layers[1].self_attn.o_proj
    assert proj.kernel.dtype == FP8 and proj.kernel.shape == (64, 64) and proj.kernel_scale.shape == (2, 2)
    assert model.lm_head.kernel.dtype == jnp.float32 and model.config.quant_method == "fp8"
    err = relative_error(sequence_logits(model, PROMPT), sequence_logits(load(plain), PROMPT))
    assert err < (1e-5 if matmul == "dequantize" else SCALED_TOLERANCE), err


def test_kept_weights_take_about_a_byte_per_weight(llama_folders):
    kept = quantization.weight_summary(load(llama_folders[0], "keep"))
    plain = quantization.weight_summary(load(llama_folders[1]))
    assert plain.bytes_per_param == 4.0 and str(plain).endswith("4.00 bytes/param (float32)")
    linear = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 80)  # q, o; k, v; gate, up, down; 2 layers
    assert kept.formats["fp8 with block scales"] == linear and kept.params == plain.params
    assert kept.bytes < plain.bytes - 2.9 * linear  # 1 byte instead of 4, plus a few scales
    assert "fp8 with block scales" in str(kept)


def test_cache_and_checkpoint_keep_fp8_and_restore_dequantized(llama_folders, tmp_path):
    fp8, plain = llama_folders
    want = sequence_logits(load(plain), PROMPT)
    cached = load_model(str(fp8), fp8_weights="keep", cache_dir=str(tmp_path / "cache")).model
    restored = load_model(str(fp8), fp8_weights="keep", cache_dir=str(tmp_path / "cache")).model  # from the cache
    assert restored.layers[0].mlp.down_proj.kernel.dtype == FP8
    assert restored.layers[0].mlp.down_proj.kernel_scale[...].dtype == jnp.float32
    np.testing.assert_array_equal(sequence_logits(restored, PROMPT), sequence_logits(cached, PROMPT))
    folder = convert(str(fp8), str(tmp_path / "converted"), fp8_weights="keep")
    model, _ = load_checkpoint(folder, fp8_weights="dequantize")
    assert model.config.quant_method is None and model.layers[0].mlp.down_proj.kernel.dtype == jnp.float32
    np.testing.assert_allclose(sequence_logits(model, PROMPT), want, rtol=0, atol=1e-6)


def test_missing_scale_names_the_tensor(llama_folders, tmp_path):
    tensors = _read(llama_folders[0])
    del tensors["model.layers.1.mlp.up_proj.weight_scale_inv"]
    folder = _rewritten(tmp_path, tensors)
    with pytest.raises(WeightError, match=re.escape(
            "tensor 'model.layers.1.mlp.up_proj.weight' is float8_e4m3fn but the checkpoint has no "
            "'model.layers.1.mlp.up_proj.weight_scale_inv'")):
        load(folder)


def test_scale_of_the_wrong_shape_names_the_tensor(llama_folders, tmp_path):
    tensors = _read(llama_folders[0])
    tensors["model.layers.0.mlp.down_proj.weight_scale_inv"] = np.ones((2, 1), np.float32)
    folder = _rewritten(tmp_path, tensors)
    with pytest.raises(WeightError, match=re.escape(
            "tensor 'model.layers.0.mlp.down_proj.weight_scale_inv' has shape (2, 1), expected (2, 2) for "
            "'model.layers.0.mlp.down_proj.weight' of shape (64, 80) in blocks of (32, 48)")):
        load(folder, "keep")


def test_scale_without_its_weight_is_unexpected(llama_folders, tmp_path):
    tensors = _read(llama_folders[0])
    tensors["model.norm.weight_scale_inv"] = np.ones((1,), np.float32)
    with pytest.raises(WeightError, match=re.escape("unexpected tensor 'model.norm.weight_scale_inv'")):
        load(_rewritten(tmp_path, tensors))


def test_unsupported_quant_method_fails_at_load_naming_the_field(llama_folders, tmp_path):
    folder = _rewritten(tmp_path, _read(llama_folders[1]), quantization_config={"quant_method": "gptq", "bits": 4})
    with pytest.raises(ValueError, match=re.escape("quantization_config.quant_method 'gptq' is not supported")):
        load_model(str(folder), use_cache=False)


def test_a_layer_left_unquantized_is_quantized_where_fp8_is_kept(llama_folders, tmp_path):
    tensors = _read(llama_folders[0])
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors[name] = dequantize(tensors[name], tensors.pop(name + "_scale_inv"), BLOCK)
    model = load(_rewritten(tmp_path, tensors), "keep")
    assert model.layers[0].self_attn.q_proj.kernel.dtype == FP8
    assert relative_error(sequence_logits(model, PROMPT), sequence_logits(load(llama_folders[1]), PROMPT)) < 1e-5


@pytest.mark.parametrize("fused", [False, True])
def test_moe_fp8_checkpoint_per_expert_and_fused(tmp_path, fused):
    """Qwen3-MoE-like: per-expert `experts.E.gate_proj.weight` (or transformers 5's fused
    `experts.gate_up_proj`, quantized as one tensor) with scales, the router unquantized. Kept,
    the experts stay fp8 too (tests/models/test_fp8_experts.py); the fused tensor's halves share a
    block here (intermediate 40, 32-row blocks), so each is requantized: e4m3 rounding (<= 2^-4 of
    a weight) instead of float32 reordering."""
    tensors = hf_tensors(ModelConfig.from_hf(QWEN3_MOE))
    if fused:
        tensors = _fuse_experts(tensors, QWEN3_MOE["num_experts"])
    dequantized = write_checkpoint(tmp_path / "fp8", QWEN3_MOE, tensors, fp8=True)
    write_checkpoint(tmp_path / "plain", QWEN3_MOE, dequantized, fp8=False)
    want = sequence_logits(load(tmp_path / "plain"), PROMPT)
    np.testing.assert_allclose(sequence_logits(load(tmp_path / "fp8"), PROMPT), want, rtol=0, atol=1e-6)
    kept = load(tmp_path / "fp8", "keep")
    assert kept.layers[0].self_attn.q_proj.kernel.dtype == FP8
    assert kept.layers[0].mlp.experts.gate_proj.dtype == FP8
    assert kept.layers[0].mlp.gate.kernel.dtype == jnp.float32
    assert relative_error(sequence_logits(kept, PROMPT), want) < (2e-2 if fused else 1e-5)


def test_fp8_weights_option_flag_and_llm_keyword():
    from jaxserve.config import EngineConfig
    from jaxserve.engine_flags import add_engine_flags, engine_config_from_args
    import argparse

    assert EngineConfig().fp8_weights == "auto" and EngineConfig(fp8_weights="keep").load.fp8_weights == "keep"
    with pytest.raises(ValueError, match="fp8_weights must be one of 'auto', 'dequantize', 'keep', got 'fp16'"):
        EngineConfig(fp8_weights="fp16")
    parser = argparse.ArgumentParser()
    add_engine_flags(parser)
    assert engine_config_from_args(parser.parse_args(["--fp8-weights", "dequantize"])).fp8_weights == "dequantize"
    assert quantization.resolve_fp8_weights("auto", "gpu") == "keep"
    assert quantization.resolve_fp8_weights("auto", "cpu") == "dequantize"


def test_engine_serves_kept_fp8_weights(llama_folders):
    """LLM(fp8_weights="keep") on CPU: greedy tokens of the dequantized weights' model."""
    from jaxserve.llm import LLM
    from jaxserve.sampling_params import SamplingParams

    fp8, plain = llama_folders
    llm = LLM(str(fp8), fp8_weights="keep", use_weight_cache=False, max_model_len=64, max_num_seqs=2,
              max_num_batched_tokens=32, token_buckets=(32,), request_buckets=(2,), compile_at_startup=False)
    assert llm.engine.loaded.model.layers[0].self_attn.q_proj.kernel.dtype == FP8
    out = llm.generate([{"prompt_token_ids": PROMPT}], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0].token_ids
    model, ids = load(plain), list(PROMPT)
    for _ in range(4):
        ids.append(int(np.argmax(sequence_logits(model, ids)[-1])))
    assert list(out) == ids[len(PROMPT):]


def _read(folder) -> dict[str, np.ndarray]:
    return {name: np.array(array) for name, array, _ in iter_safetensors(folder)}


def _rewritten(tmp_path, tensors, **config_changes):
    folder = tmp_path / "edited"
    hf = {**LLAMA, "quantization_config": FP8_CONFIG, **config_changes}
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf))
    save_safetensors(tensors, folder / "model.safetensors")
    Tokenizer.word_level(LLAMA["vocab_size"]).save(str(folder))
    return folder


def _fuse_experts(tensors: dict, num_experts: int) -> dict:
    """Per-expert tensors as transformers 5 stores them: `experts.gate_up_proj` [E, 2I, H] and
    `experts.down_proj` [E, H, I]."""
    fused = {n: v for n, v in tensors.items() if ".experts." not in n}
    layers = {n.split(".experts.")[0] for n in tensors if ".experts." in n}
    for stem in layers:
        per = lambda proj: [tensors[f"{stem}.experts.{e}.{proj}.weight"] for e in range(num_experts)]  # noqa: E731
        fused[f"{stem}.experts.gate_up_proj"] = np.stack([np.concatenate([g, u]) for g, u in
                                                          zip(per("gate_proj"), per("up_proj"))])
        fused[f"{stem}.experts.down_proj"] = np.stack(per("down_proj"))
    return fused


def test_the_gpu_checks_fp8_matmul_part_at_tiny_sizes(tmp_path):
    """`make gpu-check`'s part (jaxserve/benchmarks/gpu_parts.py) on CPU: every method timed and
    checked against the bf16 product."""
    from jaxserve.benchmarks import gpu_parts

    out = tmp_path / "fp8_matmul.json"
    assert gpu_parts.main(["fp8_matmul", "--out", str(out), "--seconds", "60", "--tiny"]) == 0
    result = json.loads(out.read_text())
    assert result["dense_fp8_tflop_s"] > 0 and [row["tokens"] for row in result["rows"]] == [8, 40]
    for row in result["rows"]:
        assert all(row[f"{method}_ms"] > 0 for method in ("bf16", "dequantize", "scaled"))
        assert row["dequantize_rel_err"] < 1e-2 and row["scaled_rel_err"] < SCALED_TOLERANCE
