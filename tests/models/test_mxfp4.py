"""MXFP4 expert weights (models/quantization.py, models/weights.py): every e2m1 code and e8m0
exponent against values computed from the format's definition, dequantization against transformers'
formula, and tiny MXFP4 checkpoints (written here as gpt-oss's are: `X_blocks` + `X_scales` uint8,
everything else plain) loaded against the same model loaded from the dequantized weights: equal
parameters, in float32 and bfloat16, since every MXFP4 value is exact in both."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from models.config import ModelConfig
from models.loader import load_model
from models.quantization import (
    E8M0_NAN, FP4_VALUES, MXFP4_BITS, e8m0_to_float, mxfp4_checkpoint_summary, mxfp4_dequantize, mxfp4_quantize,
    unpack_fp4, weight_summary,
)
from models.registry import build_model
from models.tokenizer import Tokenizer
from models.weights import WeightError, iter_safetensors, load_state
from tests.jaxserve.parallel_worker import GPT_OSS_MXFP4_CASES
from tests.models.test_fp8_weights import QWEN3_MOE, _fuse_experts, hf_tensors

# Expert dims multiples of MXFP4's 32-value blocks: hidden 64, expert intermediate 64.
MOE = dict(QWEN3_MOE, moe_intermediate_size=64)
# gpt-oss's list, in the MoE family's names (its router is `mlp.gate`).
MXFP4_CONFIG = dict(quant_method="mxfp4", modules_to_not_convert=[
    "model.layers.*.self_attn", "model.layers.*.mlp.gate", "model.embed_tokens", "lm_head"])
EXPERTS = "model.layers.0.mlp.experts"
FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "parity"


def e2m1(code: int) -> float:
    """The OCP MX definition: sign bit 3, exponent bits 2-1 (bias 1), mantissa bit 0; exponent 0
    is subnormal (0.5 * mantissa)."""
    sign, exponent, mantissa = code >> 3, (code >> 1) & 3, code & 1
    magnitude = 0.5 * mantissa if exponent == 0 else (1 + 0.5 * mantissa) * 2.0 ** (exponent - 1)
    return -magnitude if sign else magnitude


def transformers_dequantize(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """transformers' `_convert_moe_packed_tensors` (integrations/mxfp4.py) in numpy: LUT of the
    low nibbles into the even columns and of the high nibbles into the odd ones, ldexp by
    scale - 127, rows back to [E, R, G * 32], axes 1 and 2 swapped."""
    lut = np.array([+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
                    -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)  # transformers' FP4_VALUES
    *prefix, groups, width = blocks.shape
    rows = blocks.reshape(-1, width)
    out = np.empty((rows.shape[0], 2 * width), np.float32)
    out[:, 0::2] = lut[rows & 0x0F]
    out[:, 1::2] = lut[rows >> 4]
    with np.errstate(over="ignore"):
        out = np.ldexp(out, scales.reshape(-1, 1).astype(np.int32) - 127)
    return out.reshape(*prefix, groups * 2 * width).swapaxes(1, 2)


# ---- the format ----

def test_the_value_table_is_e2m1():
    assert [float(v) for v in FP4_VALUES] == [e2m1(code) for code in range(16)]
    assert np.signbit(FP4_VALUES[8]) and not np.signbit(FP4_VALUES[0])


@pytest.mark.parametrize("device", [False, True])
def test_unpack_every_code_in_both_nibble_positions(device):
    """All 256 bytes: the low nibble is the first value, the high nibble the second."""
    codes = np.arange(256, dtype=np.uint8)
    packed = codes.reshape(16, 16)
    got = np.asarray(unpack_fp4(jnp.asarray(packed) if device else packed))
    assert got.shape == (16, 32) and got.dtype == np.float32
    pairs = got.reshape(256, 2)
    np.testing.assert_array_equal(pairs[:, 0], [e2m1(int(b) & 15) for b in codes])
    np.testing.assert_array_equal(pairs[:, 1], [e2m1(int(b) >> 4) for b in codes])
    np.testing.assert_array_equal(np.signbit(pairs), [[(b & 15) == 8 or (b & 15) > 8, b >> 4 >= 8] for b in codes])


@pytest.mark.parametrize("device", [False, True])
def test_e8m0_scales_are_powers_of_two(device):
    exponents = np.arange(256, dtype=np.uint8)
    got = np.asarray(e8m0_to_float(jnp.asarray(exponents) if device else exponents))
    assert got.dtype == np.float32 and got[127] == 1.0
    np.testing.assert_array_equal(got[:255], [np.float32(2.0 ** (e - 127)) for e in range(255)])
    assert np.isnan(got[E8M0_NAN])


def test_dequantize_every_code_at_every_exponent():
    """One block per exponent 0..254, each holding all 16 codes twice: value * 2^(e - 127), exact
    on the host (subnormal results included, overflow to inf at 254). On device, equal wherever
    the result is a normal float32 or zero; XLA on CPU flushes subnormal results to zero."""
    codes = np.tile(np.arange(16, dtype=np.uint8), 2)
    row = (codes[0::2] | (codes[1::2] << 4)).astype(np.uint8)  # [16] bytes: 32 values
    blocks = np.broadcast_to(row, (255, 16)).copy()
    scales = np.arange(255, dtype=np.uint8)
    with np.errstate(over="ignore"):
        want = np.array([[np.float32(e2m1(int(c)) * 2.0 ** (e - 127)) for c in codes] for e in range(255)])
    host = mxfp4_dequantize(blocks[:, None], scales[:, None])  # 255 rows of one block -> [255, 32]
    np.testing.assert_array_equal(host, want)
    np.testing.assert_array_equal(np.signbit(host), np.signbit(want))
    assert np.isinf(host[254]).sum() == 2 * 8 and np.all(host[127] == FP4_VALUES[codes])
    device = np.asarray(mxfp4_dequantize(jnp.asarray(blocks[:, None]), jnp.asarray(scales[:, None])))
    normal = (np.abs(want) >= np.finfo(np.float32).tiny) | (want == 0)
    np.testing.assert_array_equal(device[normal], want[normal])
    assert np.all((device[~normal] == want[~normal]) | (device[~normal] == 0))


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_dequantize_matches_transformers_formula(dtype):
    """Stacked experts [E, rows, G, 16]: ours is [E, rows, G * 32] (the file's [out, in]);
    transformers' is its transpose, gpt-oss's [E, in, out] parameter. Scales around 1 plus both
    extremes; bf16 holds every value exactly (at most 2 significant bits)."""
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (3, 10, 4, 16), dtype=np.uint8)
    scales = rng.integers(110, 140, (3, 10, 4), dtype=np.uint8)
    scales[0, 0, :3] = (0, 1, 253)
    want = transformers_dequantize(blocks, scales)
    got = mxfp4_dequantize(blocks, scales, dtype)
    assert got.dtype == dtype and got.shape == (3, 10, 128)
    np.testing.assert_array_equal(np.swapaxes(got, 1, 2).astype(np.float32), want.astype(dtype).astype(np.float32))
    device = mxfp4_dequantize(jnp.asarray(blocks[1:]), jnp.asarray(scales[1:]), dtype)  # normal range only
    assert device.dtype == dtype
    np.testing.assert_array_equal(np.asarray(device, np.float32), got[1:].astype(np.float32))


def test_dequantize_refuses_mismatched_blocks_and_scales():
    with pytest.raises(ValueError, match=re.escape("need scales [..., G]; got blocks (2, 3, 16) and scales (2, 4)")):
        mxfp4_dequantize(np.zeros((2, 3, 16), np.uint8), np.zeros((2, 4), np.uint8))


def test_quantize_rounds_to_the_nearest_e2m1_value():
    """Each block's scale the least power of two that brings its largest value within 6: the
    error is at most half a step of the grid {0, .5, 1, 1.5, 2, 3, 4, 6} * scale, so within
    max(scale / 4, |x| / 4); values already on the grid come back exact."""
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((5, 96)).astype(np.float32) * np.exp(rng.uniform(-8, 8, (5, 1)))
    weight[0, :32] = 0
    blocks, scales = mxfp4_quantize(weight)
    assert blocks.shape == (5, 3, 16) and scales.shape == (5, 3) and blocks.dtype == scales.dtype == np.uint8
    back = mxfp4_dequantize(blocks, scales)
    unit = np.repeat(e8m0_to_float(scales), 32, axis=-1)
    assert np.all(np.abs(back - weight) <= np.maximum(unit / 4, np.abs(weight) / 4))
    assert np.all(np.max(np.abs(back), axis=-1) >= np.max(np.abs(weight), axis=-1) / 2)  # no block under-scaled
    np.testing.assert_array_equal(back[0, :32], 0)
    np.testing.assert_array_equal(mxfp4_dequantize(*mxfp4_quantize(back)), back)
    with pytest.raises(ValueError, match="blocks of 32, got length 40"):
        mxfp4_quantize(np.zeros((2, 40), np.float32))


# ---- config ----

def test_config_reads_mxfp4_and_the_built_model_is_plain_outside_gpt_oss():
    config = ModelConfig.from_hf(dict(MOE, quantization_config=MXFP4_CONFIG))
    assert config.quant_method == "mxfp4" and config.weight_block_size is None
    assert config.modules_to_not_convert == tuple(MXFP4_CONFIG["modules_to_not_convert"])
    plain = ModelConfig.from_hf(dict(MOE, quantization_config=dict(quant_method="mxfp4")))
    assert plain.modules_to_not_convert == ()
    for fp8_weights in ("keep", "dequantize"):
        model = build_model(config, seed=None, fp8_weights=fp8_weights)
        assert model.config.quant_method is None and model.config.modules_to_not_convert == ()
        assert model.layers[0].mlp.experts.gate_proj[...].dtype == jnp.float32
    with pytest.raises(ValueError, match="quantization_config.modules_to_not_convert must be a list"):
        ModelConfig.from_hf(dict(MOE, quantization_config=dict(quant_method="mxfp4", modules_to_not_convert="lm_head")))


# ---- checkpoints ----

def mxfp4_tensors(tensors: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """(the checkpoint's tensors with the fused experts as MXFP4 blocks and scales, the same with
    the experts dequantized)."""
    stored, plain = {}, {}
    for name, value in tensors.items():
        if ".experts." in name:
            blocks, scales = mxfp4_quantize(value)
            stored[name + "_blocks"], stored[name + "_scales"] = blocks, scales
            plain[name] = mxfp4_dequantize(blocks, scales)
        else:
            stored[name] = plain[name] = value
    return stored, plain


def write_folder(folder, hf_config: dict, tensors: dict[str, np.ndarray], sharded: bool = False) -> None:
    """An HF folder; `sharded`: two files, the blocks in the second, after their scales."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf_config))
    Tokenizer.word_level(hf_config["vocab_size"]).save(str(folder))
    if not sharded:
        save_file({n: np.ascontiguousarray(v) for n, v in tensors.items()}, str(folder / "model.safetensors"))
        return
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    files = {name: second if name.endswith("_blocks") else first for name in tensors}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": files}))
    for file in (first, second):
        save_file({n: np.ascontiguousarray(v) for n, v in tensors.items() if files[n] == file}, str(folder / file))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(MXFP4 folder in two shards, scales before blocks; the plain float32 folder of its
    dequantized weights)."""
    root = tmp_path_factory.mktemp("mxfp4")
    config = ModelConfig.from_hf(MOE)
    stored, plain = mxfp4_tensors(_fuse_experts(hf_tensors(config), config.num_experts))
    write_folder(root / "mxfp4", dict(MOE, quantization_config=MXFP4_CONFIG), stored, sharded=True)
    write_folder(root / "plain", MOE, plain)
    return root / "mxfp4", root / "plain"


def params(model) -> dict:
    return {path: np.asarray(var.get_value(), np.float32) for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mxfp4_checkpoint_loads_as_its_dequantized_weights(folders, dtype):
    mxfp4, plain = folders
    got = load_state(ModelConfig.from_folder(mxfp4), iter_safetensors(mxfp4), dtype=dtype)
    want = load_state(ModelConfig.from_folder(plain), iter_safetensors(plain), dtype=dtype)
    assert got.config.quant_method is None and got.layers[0].mlp.experts.up_proj[...].dtype == dtype
    got_params, want_params = params(got), params(want)
    assert got_params.keys() == want_params.keys()
    for path, value in want_params.items():
        np.testing.assert_array_equal(got_params[path], value, err_msg=str(path))


def test_load_log_gives_the_checkpoint_bytes(folders, caplog):
    """Loaded: every weight in float32. In the checkpoint: the experts at 4.25 bits a weight,
    the rest in bf16."""
    with caplog.at_level(logging.INFO, logger="jaxserve.models"):
        loaded = load_model(str(folders[0]), use_cache=False)
    summary = mxfp4_checkpoint_summary(loaded.model)
    config = loaded.config
    experts = len(config.moe_layers) * config.num_experts * 3 * config.hidden_size * config.moe_intermediate_size
    total = weight_summary(loaded.model).params
    assert summary.formats == {"mxfp4": experts, "bfloat16": total - experts}
    assert summary.bytes == int(experts * MXFP4_BITS / 8 + (total - experts) * 2)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded "))
    assert line.endswith(f"weights {weight_summary(loaded.model, stored_as='mxfp4')}")
    assert "4.00 bytes/param (float32); in the checkpoint " in line and "(mxfp4 " in line


# gpt-oss: experts fused [in, out], gate and up interleaved in gate_up_proj's columns, with biases;
# MXFP4 packs each [out, in] (transformers' `convert_moe_packed_tensors` transposes them back).
GPT_OSS = dict(architectures=["GptOssForCausalLM"], vocab_size=96, hidden_size=64, intermediate_size=64,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
               max_position_embeddings=256, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
               layer_types=["sliding_attention", "full_attention"], attention_bias=True, tie_word_embeddings=False)
GPT_OSS_MXFP4 = dict(quant_method="mxfp4", modules_to_not_convert=[
    "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"])


def gpt_oss_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """A random tiny gpt-oss's weights under the checkpoint's names and layouts."""
    model = build_model(ModelConfig.from_hf(GPT_OSS), seed=seed)
    flat = {path: np.asarray(var.get_value(), np.float32) for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    tensors = {}
    for path, value in flat.items():
        name = ("" if path[0] == "lm_head" else "model.") + ".".join(map(str, path))
        if path[-2] == "experts" and path[-1].startswith(("gate_proj", "up_proj")):
            if path[-1].startswith("gate_proj"):
                up = flat[path[:-1] + (path[-1].replace("gate_proj", "up_proj"),)]
                fused = np.stack([value, up], axis=-1).reshape(*value.shape[:-1], 2 * value.shape[-1])
                tensors[name.replace("gate_proj", "gate_up_proj")] = fused  # columns gate0, up0, gate1, ...
        elif path[-1] == "kernel":
            tensors[name.removesuffix("kernel") + "weight"] = value.T
        else:
            tensors[name] = value
    return tensors


def test_gpt_oss_mxfp4_checkpoint_loads_as_its_dequantized_weights(tmp_path):
    """transformers' layout end to end: the packed tensors are the [in, out] experts transposed, and
    load as transformers dequantizes them ([E, in, out], gate and up interleaved)."""
    stored, plain = {}, {}
    for name, value in gpt_oss_tensors().items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = mxfp4_quantize(np.swapaxes(value, 1, 2))
            stored[name + "_blocks"], stored[name + "_scales"] = blocks, scales
            plain[name] = transformers_dequantize(blocks, scales)
        else:
            stored[name] = plain[name] = value
    write_folder(tmp_path / "mxfp4", dict(GPT_OSS, quantization_config=GPT_OSS_MXFP4), stored)
    write_folder(tmp_path / "plain", GPT_OSS, plain)
    got, want = (load_state(ModelConfig.from_folder(tmp_path / f), iter_safetensors(tmp_path / f))
                 for f in ("mxfp4", "plain"))
    got_params, want_params = params(got), params(want)
    assert got_params.keys() == want_params.keys()
    for path, value in want_params.items():
        np.testing.assert_array_equal(got_params[path], value, err_msg=str(path))
    experts = got.layers[1].mlp.experts
    gate_up = plain["model.layers.1.mlp.experts.gate_up_proj"]
    np.testing.assert_array_equal(np.asarray(experts.up_proj[...]), gate_up[..., 1::2])
    summary = mxfp4_checkpoint_summary(got)
    assert summary.formats["mxfp4"] == 2 * 4 * 3 * 64 * 64  # the expert biases stay bf16
    name = "model.layers.0.mlp.experts.gate_up_proj"
    stored.update({name + "_blocks": stored[name + "_blocks"][:, :64], name + "_scales": stored[name + "_scales"][:, :64]})
    config = ModelConfig.from_hf(dict(GPT_OSS, quantization_config=GPT_OSS_MXFP4))
    with pytest.raises(WeightError, match=re.escape(
            f"tensor '{name}' has shape (4, 64, 64), expected (4, 64, 128) from the config (gpt-oss experts are stored "
            f"[in, out], gate and up interleaved) (stored as MXFP4: '{name}_blocks' (4, 64, 2, 16), '{name}_scales' "
            "(4, 64, 2))")):
        load_state(config, ((n, v, "model.safetensors") for n, v in stored.items()))


def test_gpt_oss_mxfp4_fixture_matches_transformers():
    """tests/fixtures/parity/gpt_oss_mxfp4 (tools/make_parity_fixtures.py): a tiny gpt-oss whose
    experts are stored as MXFP4, its reference from transformers 5.24 loading that folder itself
    (its quantizer dequantizes on CPU). Logits within 1e-4 of transformers' (relative; measured
    3.5e-7 to 4.3e-7, float32 reordering), and 16 greedy tokens through LLM.generate equal its."""
    from jaxserve.sampling_params import SamplingParams
    from tests.helpers import relative_error, sequence_logits
    from tests.models.served import engine, fixture, prompts_of

    loaded, ref = fixture("gpt_oss_mxfp4")
    assert ModelConfig.from_folder(FIXTURES / "gpt_oss_mxfp4").quant_method == "mxfp4"
    prompts = prompts_of(ref)
    for i, ids in enumerate(prompts):
        assert relative_error(sequence_logits(loaded.model, ids, block_size=4, chunk=7), ref[f"logits_{i}"]) < 1e-4
    outputs = engine(loaded).generate([{"prompt_token_ids": p} for p in prompts],
                                      SamplingParams(max_tokens=16, temperature=0, ignore_eos=True), use_tqdm=False)
    for i, out in enumerate(outputs):
        assert out.outputs[0].token_ids == ref[f"greedy_{i}"].tolist(), f"prompt {i}"


# ---- errors name the tensor ----

def load_tensors(tensors: dict[str, np.ndarray], quantization=MXFP4_CONFIG):
    """load_state over in-memory tensors, in the dict's order, as if from one file."""
    config = ModelConfig.from_hf(dict(MOE, quantization_config=quantization) if quantization else MOE)
    return load_state(config, ((n, v, "model.safetensors") for n, v in tensors.items()))


@pytest.fixture(scope="module")
def stored():
    config = ModelConfig.from_hf(MOE)
    return mxfp4_tensors(_fuse_experts(hf_tensors(config), config.num_experts))[0]


def without(tensors: dict, *names: str) -> dict:
    return {n: v for n, v in tensors.items() if n not in names}


def test_blocks_and_scales_pair_in_either_order(stored):
    first = load_tensors(stored)
    reordered = dict(sorted(stored.items(), key=lambda item: not item[0].endswith("_scales")))
    assert list(reordered).index(f"{EXPERTS}.down_proj_scales") < list(reordered).index(f"{EXPERTS}.down_proj_blocks")
    second = load_tensors(reordered)
    np.testing.assert_array_equal(second.layers[0].mlp.experts.down_proj[...], first.layers[0].mlp.experts.down_proj[...])


@pytest.mark.parametrize("change, message", [
    (lambda t: without(t, f"{EXPERTS}.gate_up_proj_scales"),
     f"tensor '{EXPERTS}.gate_up_proj_blocks' holds MXFP4 blocks but the checkpoint has no "
     f"'{EXPERTS}.gate_up_proj_scales'"),
    (lambda t: without(t, f"{EXPERTS}.down_proj_blocks"),
     f"unexpected tensor '{EXPERTS}.down_proj_scales': the checkpoint has no MXFP4 blocks "
     f"'{EXPERTS}.down_proj_blocks'"),
    (lambda t: dict(t, **{f"{EXPERTS}.down_proj_scales": t[f"{EXPERTS}.down_proj_scales"][:, :, :1]}),
     f"tensor '{EXPERTS}.down_proj_blocks' has shape (4, 64, 2, 16) and '{EXPERTS}.down_proj_scales' "
     "(in model.safetensors) (4, 64, 1)"),
    (lambda t: dict(t, **{f"{EXPERTS}.down_proj_blocks": t[f"{EXPERTS}.down_proj_blocks"].reshape(4, 64, 1, 32),
                          f"{EXPERTS}.down_proj_scales": t[f"{EXPERTS}.down_proj_scales"][:, :, :1]}),
     f"tensor '{EXPERTS}.down_proj_blocks' has shape (4, 64, 1, 32)"),
    (lambda t: dict(t, **{f"{EXPERTS}.down_proj_blocks": t[f"{EXPERTS}.down_proj_blocks"][:, :32],
                          f"{EXPERTS}.down_proj_scales": t[f"{EXPERTS}.down_proj_scales"][:, :32]}),
     f"tensor '{EXPERTS}.down_proj' has shape (4, 32, 64), expected (4, 64, 64) from the config (stored as MXFP4: "
     f"'{EXPERTS}.down_proj_blocks' (4, 32, 2, 16), '{EXPERTS}.down_proj_scales' (4, 32, 2))"),
    (lambda t: dict(t, **{f"{EXPERTS}.gate_up_proj_blocks": t[f"{EXPERTS}.gate_up_proj_blocks"][:, :64],
                          f"{EXPERTS}.gate_up_proj_scales": t[f"{EXPERTS}.gate_up_proj_scales"][:, :64]}),
     f"tensor '{EXPERTS}.gate_up_proj' has shape (4, 64, 64), expected (4, 128, 64) from the config (stored as "
     "MXFP4"),
    (lambda t: dict(t, **{"model.layers.0.mlp.gate.weight_blocks": np.zeros((4, 2, 16), np.uint8),
                          "model.layers.0.mlp.gate.weight_scales": np.full((4, 2), 127, np.uint8)}),
     "tensor 'model.layers.0.mlp.gate.weight_blocks' holds MXFP4 blocks but config.json's "
     "quantization_config.modules_to_not_convert keeps 'model.layers.0.mlp.gate' unquantized "
     "('model.layers.*.mlp.gate')"),
    (lambda t: dict(t, **{f"{EXPERTS}.down_proj_scales": np.full((4, 64, 2), E8M0_NAN, np.uint8)}),
     f"tensor '{EXPERTS}.down_proj_scales' holds the e8m0 code 255 (NaN)"),
])
def test_bad_mxfp4_tensors_are_named(stored, change, message):
    with pytest.raises(WeightError, match=re.escape(message)):
        load_tensors(change(dict(stored)))


def test_mxfp4_tensors_need_an_mxfp4_config(stored):
    with pytest.raises(WeightError, match=re.escape(
            f"holds MXFP4 blocks (uint8) but config.json has no quantization_config with quant_method 'mxfp4'")):
        load_tensors(stored, quantization=None)


# ---- MXFP4 experts kept packed (fp8_weights "keep") ----

def test_gpt_oss_mxfp4_fixture_kept_packed_equals_dequantized_and_transformers():
    """Kept, every expert weight of the fixture is packed uint8 [E, in/2, out] with e8m0 scales
    [E, in/32, out], the experts about 0.53 bytes a weight (4.25 bits); the in-step dequantization
    gives the loader's very values, so float32 logits are bit-identical to the dequantized load's,
    and within 1e-4 of transformers'."""
    from models.moe import Experts, moe_blocks
    from models.quantization import QuantScale
    from tests.helpers import relative_error, sequence_logits

    config = ModelConfig.from_folder(FIXTURES / "gpt_oss_mxfp4")
    kept = load_state(config, iter_safetensors(FIXTURES / "gpt_oss_mxfp4"), fp8_weights="keep")
    dequantized = load_state(config, iter_safetensors(FIXTURES / "gpt_oss_mxfp4"), fp8_weights="dequantize")
    assert kept.config.quant_method == "mxfp4" and dequantized.config.quant_method is None
    weights = expert_bytes = 0
    for block, plain in zip(moe_blocks(kept), moe_blocks(dequantized)):
        for name in Experts.NAMES:
            packed, scale = getattr(block.experts, name)[...], getattr(block.experts, name + "_scale")
            want = getattr(plain.experts, name)[...]
            assert packed.dtype == jnp.uint8 and isinstance(scale, QuantScale) and scale[...].dtype == jnp.uint8
            assert packed.shape == (want.shape[0], want.shape[1] // 2, want.shape[2])
            assert scale[...].shape == (want.shape[0], want.shape[1] // 32, want.shape[2])
            weights += want.size
            expert_bytes += packed.size + scale[...].size
    assert expert_bytes / weights == pytest.approx(MXFP4_BITS / 8)  # 0.53 bytes a weight
    summary = weight_summary(kept)
    assert summary.formats["mxfp4 with e8m0 scales"] == weights and "mxfp4 with e8m0 scales" in str(summary)
    ref = np.load(FIXTURES / "gpt_oss_mxfp4" / "reference.npz")
    for i in range(2):
        ids = ref[f"input_ids_{i}"].tolist()
        got = np.asarray(sequence_logits(kept, ids, block_size=4, chunk=7))
        np.testing.assert_array_equal(got, np.asarray(sequence_logits(dequantized, ids, block_size=4, chunk=7)))
        assert relative_error(got, ref[f"logits_{i}"]) < 1e-4


def test_packed_experts_dequantize_on_device_as_on_the_host():
    """`dequantize_packed_experts` of the kept layout = the host's `mxfp4_dequantize` of the file's
    pair, transposed; a tensor-parallel shard (rows from inside a scale's block, columns from an
    offset) dequantizes as its slice of the whole."""
    import jax

    from pallas_kernels.mxfp4 import dequantize_packed_experts, to_kernel_layout

    rng = np.random.default_rng(3)
    blocks, scales = mxfp4_quantize(rng.normal(size=(3, 24, 96)).astype(np.float32) * 2.0 ** rng.integers(-9, 9))
    whole = np.swapaxes(mxfp4_dequantize(blocks, scales), 1, 2)  # [E, in 96, out 24]
    packed, kept = to_kernel_layout(blocks, scales)
    assert packed.shape == (3, 48, 24) and kept.shape == (3, 3, 24)
    got = dequantize_packed_experts(jnp.asarray(packed), jnp.asarray(kept), jnp.float32)
    np.testing.assert_array_equal(np.asarray(got), whole)
    shard = jax.jit(lambda p, s, r, c: dequantize_packed_experts(p, s, jnp.float32, row_offset=r, col_offset=c))(
        jnp.asarray(packed[:, 12:36, 8:16]), jnp.asarray(kept), jnp.int32(24), jnp.int32(8))
    np.testing.assert_array_equal(np.asarray(shard), whole[:, 24:72, 8:16])


def test_layout_pads_mxfp4_experts_and_eplb_moves_their_scales(monkeypatch):
    """Expert parallelism on one device (the gpt-oss fixture's 6 experts + 2 redundant slots):
    padding slots hold zero codes with unit scales; a forced EPLB placement moves packed weights
    and scales together, and the logits stay the logical model's."""
    from models.layout import ExpertParallelOptions, ParallelLayout
    from models.mesh import make_mesh
    from models.moe import moe_blocks
    from models.quantization import E8M0_ONE, QuantScale
    from models.registry import with_layout
    from tests.helpers import assert_eplb_moves_every_slot_param, relative_error, sequence_logits

    config = ModelConfig.from_folder(FIXTURES / "gpt_oss_mxfp4")
    model = load_state(config, iter_safetensors(FIXTURES / "gpt_oss_mxfp4"), fp8_weights="keep")
    laid_out = with_layout(model, ParallelLayout(make_mesh(), expert_parallel=ExpertParallelOptions(
        num_redundant_experts=2)))
    for block, logical in zip(moe_blocks(laid_out), moe_blocks(model)):
        for param, source in zip(block.experts.slot_params(), logical.experts.slot_params()):
            value = np.asarray(param[...])
            assert value.shape[0] == 8 and value.dtype == np.asarray(source[...]).dtype
            np.testing.assert_array_equal(value[:6], np.asarray(source[...]))
            np.testing.assert_array_equal(value[6:], E8M0_ONE if isinstance(param, QuantScale) and
                                          value.dtype == np.uint8 else 0)
    prompt = list(range(1, 12))
    assert relative_error(sequence_logits(laid_out, prompt), sequence_logits(model, prompt)) < 1e-5
    assert_eplb_moves_every_slot_param(laid_out, prompt, monkeypatch)


def test_moe_kernel_choice_sends_mxfp4_experts_to_triton():
    """Packed MXFP4 experts: the Triton MXFP4 grouped matmul on a GPU ("auto", "pallas"), the
    reference on CPU; Mosaic GPU refused saying why."""
    from pallas_kernels.dispatch import choose_moe_kernel

    shape = dict(hidden_size=2880, intermediate_size=2880, num_experts=128, dtype=jnp.bfloat16,
                 weight_dtype=jnp.uint8, scale_block=(32, 1))
    for requested in ("auto", "pallas"):
        assert choose_moe_kernel(requested, **shape, capability=(9, 0), platform="gpu").backend == "triton"
    assert choose_moe_kernel("auto", **shape, capability=None, platform="cpu").backend == "reference"
    with pytest.raises(ValueError, match="MXFP4"):
        choose_moe_kernel("mosaic", **shape, capability=(9, 0), platform="gpu")
    odd = choose_moe_kernel("auto", **dict(shape, intermediate_size=2880 + 16), capability=(9, 0), platform="gpu")
    assert odd.backend == "reference" and "multiple of 32" in odd.reason


def test_moe_ffn_triton_mxfp4_matches_the_reference():
    """moe_ffn with gpt-oss's biases and clamped SwiGLU over MXFP4 experts: the Triton kernels
    (interpret mode) against the reference's in-step dequantization (float32: reordering only)."""
    import jax

    from pallas_kernels.moe import ExpertActivation, moe_ffn, moe_ffn_reference

    rng = np.random.default_rng(4)
    experts, hidden, inter, tokens = 4, 64, 32, 9
    packed = [jnp.asarray(rng.integers(0, 256, (experts, k // 2, n)), jnp.uint8)
              for k, n in ((hidden, inter), (hidden, inter), (inter, hidden))]
    scales = tuple(jnp.asarray(rng.integers(120, 126, (experts, p.shape[1] // 16, p.shape[2])), jnp.uint8)
                   for p in packed)
    biases = tuple(jnp.asarray(rng.standard_normal((experts, n)), jnp.float32) * 0.1 for n in (inter, inter, hidden))
    x = jnp.asarray(rng.standard_normal((tokens, hidden)), jnp.float32)
    ids = jnp.asarray(np.stack([rng.permutation(experts)[:2] for _ in range(tokens)]), jnp.int32)
    weights = jax.nn.softmax(jnp.asarray(rng.standard_normal((tokens, 2)), jnp.float32), axis=-1)
    options = dict(scales=scales, scale_block=(32, 1), biases=biases,
                   activation=ExpertActivation("gpt_oss_clamped", alpha=1.702, limit=0.5))
    out = moe_ffn(x, ids, weights, *packed, **options, backend="triton", interpret=True)
    ref = moe_ffn_reference(x, ids, weights, *packed, **options)
    assert float(jnp.max(jnp.abs(out - ref))) / float(jnp.max(jnp.abs(ref))) < 1e-5


@pytest.fixture(scope="module")
def parallel_results():
    from tests.helpers import run_parallel_worker

    return run_parallel_worker("gpt_oss_mxfp4")


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in GPT_OSS_MXFP4_CASES if c != "single"])
def test_expert_parallel_mxfp4_experts_equal_one_device(parallel_results, case):
    """8 fake devices, a tiny gpt-oss with MXFP4 experts kept (tests/jaxserve/parallel_worker.py):
    both dispatch strategies, a tp shard starting inside a scale's block, dual-batch overlap; the
    single device's greedy tokens and logprobs, no extra executables."""
    from tests.jaxserve.test_parallel import _compare

    got, ref = parallel_results["gpt_oss_mxfp4"][case], parallel_results["gpt_oss_mxfp4"]["single"]
    assert got["tokens"] == ref["tokens"], case
    _compare(got, ref, f"gpt_oss_mxfp4/{case}")
    assert got["step_executables"] == ref["step_executables"]


@pytest.mark.slow
def test_eplb_rebalance_of_mxfp4_experts_keeps_outputs(parallel_results):
    """Skewed routing: EPLB replicates experts 0 and 1 (packed weights and scales) and the outputs
    stay the single device's."""
    skewed = parallel_results["gpt_oss_mxfp4_skewed"]
    assert skewed["ep8_eplb"]["tokens"] == skewed["single"]["tokens"]
    history = skewed["ep8_eplb"]["eplb"]
    assert history and history[0]["before"] < 0.5 and history[0]["after"] >= 0.9
