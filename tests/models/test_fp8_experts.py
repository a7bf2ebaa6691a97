"""Block-FP8 MoE experts kept as fp8 (models/moe.py `Experts`): built, loaded from block-FP8
checkpoints (per expert and fused), padded into expert-parallel slots, moved by EPLB, and run
through the MoE forward (dequantized in the step on CPU), against the same checkpoint loaded
dequantized. In float32 the in-step dequantization gives the very weights the loader's would, so
logits agree to float32 reordering: 1e-4 relative (measured: below 1e-6)."""

from __future__ import annotations

import logging
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.config import ModelConfig
from models.layout import ExpertParallelOptions, ParallelLayout
from models.loader import random_model
from models.mesh import make_mesh
from models.moe import Experts, moe_blocks
from models.quantization import FP8, BlockFP8, QuantScale, dequantize, weight_summary
from models.registry import with_layout
from models.weights import iter_safetensors, load_state
from tests.helpers import assert_eplb_moves_every_slot_param, relative_error, run_parallel_worker, sequence_logits
from tests.jaxserve.parallel_worker import DEEPSEEK_EPLB_CASES, DEEPSEEK_FP8_CASES
from tests.models.test_fp8_weights import BLOCK, PROMPT, QWEN3_MOE, _fuse_experts, hf_tensors, write_checkpoint

ROOT = Path(__file__).resolve().parents[2]
DEEPSEEK_FP8 = ROOT / "tests" / "fixtures" / "parity" / "deepseek_v3_fp8"
TOLERANCE = 1e-4
# The fused gate_up_proj splits on a block boundary when the expert intermediate (64) is a
# multiple of the block's 32 rows; QWEN3_MOE's 40 is not (tests/models/test_fp8_weights.py).
ALIGNED = dict(QWEN3_MOE, moe_intermediate_size=64)


def load(folder, fp8_weights):
    return load_state(ModelConfig.from_folder(folder), iter_safetensors(folder), fp8_weights=fp8_weights)


def expert_params(model) -> list[nnx.Variable]:
    return [p for block in moe_blocks(model) for p in block.experts.slot_params()]


def assert_fp8_experts(model, block_shape):
    """Every expert weight float8 with its float32 scales [S, ceil(in/bi), ceil(out/bo)], and the
    experts about 1 byte per weight (scales included)."""
    weights = scales = 0
    for block in moe_blocks(model):
        experts = block.experts
        assert experts.scale_block == block_shape
        for name in Experts.NAMES:
            weight, scale = getattr(experts, name), getattr(experts, name + "_scale")
            assert weight[...].dtype == FP8 and isinstance(scale, QuantScale) and scale[...].dtype == jnp.float32
            s, rows, cols = weight[...].shape
            assert scale[...].shape == (s, -(-rows // block_shape[0]), -(-cols // block_shape[1]))
            weights += weight[...].size
            scales += scale[...].size * 4
    assert weights and 1.0 <= (weights + scales) / weights < 1.05
    summary = weight_summary(model)
    assert summary.formats["fp8 with block scales"] >= weights and "fp8 with block scales" in str(summary)


def test_experts_built_with_fp8_hold_fp8_weights_scales_and_padding_slots():
    quant = BlockFP8((32, 48))  # (out, in) as the file: [in, out] blocks of (48, 32)
    experts = Experts(3, 64, 40, dtype=jnp.float32, rngs=nnx.Rngs(0), num_slots=4, quant=quant)
    assert experts.gate_proj[...].shape == (4, 64, 40) and experts.down_proj[...].shape == (4, 40, 64)
    assert experts.gate_proj_scale[...].shape == (4, 2, 2) and experts.down_proj_scale[...].shape == (4, 1, 2)
    for param in experts.slot_params():
        padding = np.asarray(param[...][3], np.float32)
        np.testing.assert_array_equal(padding, 1.0 if isinstance(param, QuantScale) else 0.0)
    assert np.asarray(experts.gate_proj[...][:3], np.float32).any()  # random, quantized
    shapes_only = Experts(3, 64, 40, dtype=jnp.float32, rngs=None, quant=quant)
    assert shapes_only.up_proj[...].dtype == FP8 and not np.asarray(shapes_only.up_proj[...], np.float32).any()
    assert Experts(3, 64, 40, dtype=jnp.float32, rngs=None).scales() is None


@pytest.fixture(scope="module")
def qwen3_moe_folders(tmp_path_factory):
    """{name: (block-FP8 folder, the same weights dequantized in a plain folder)} for per-expert
    and fused experts (the fused split on a block boundary)."""
    root = tmp_path_factory.mktemp("fp8_experts")
    folders = {}
    for name, hf, fuse in (("per_expert", QWEN3_MOE, False), ("fused", ALIGNED, True)):
        tensors = hf_tensors(ModelConfig.from_hf(hf))
        if fuse:
            tensors = _fuse_experts(tensors, hf["num_experts"])
        dequantized = write_checkpoint(root / f"{name}_fp8", hf, tensors, fp8=True)
        write_checkpoint(root / f"{name}_plain", hf, dequantized, fp8=False)
        folders[name] = root / f"{name}_fp8", root / f"{name}_plain"
    return folders


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_qwen3_moe_checkpoint_keeps_fp8_experts_and_matches_dequantized(qwen3_moe_folders, layout):
    fp8, plain = qwen3_moe_folders[layout]
    kept = load(fp8, "keep")
    assert_fp8_experts(kept, (48, 32))
    want = sequence_logits(load(plain, "dequantize"), PROMPT)
    assert relative_error(sequence_logits(kept, PROMPT), want) < TOLERANCE
    dequantized = load(fp8, "dequantize")  # unchanged: float experts, the same logits
    assert dequantized.layers[0].mlp.experts.gate_proj[...].dtype == jnp.float32
    assert dequantized.layers[0].mlp.experts.scales() is None


def test_fused_experts_split_inside_a_block_are_requantized_and_say_so(tmp_path, caplog):
    tensors = _fuse_experts(hf_tensors(ModelConfig.from_hf(QWEN3_MOE)), QWEN3_MOE["num_experts"])
    dequantized = write_checkpoint(tmp_path / "fp8", QWEN3_MOE, tensors, fp8=True)
    write_checkpoint(tmp_path / "plain", QWEN3_MOE, dequantized, fp8=False)
    with caplog.at_level(logging.WARNING, logger="models.weights"):
        kept = load(tmp_path / "fp8", "keep")
    assert "moe_intermediate_size 40 is not a multiple of the weight block's 32 rows" in caplog.text
    assert_fp8_experts(kept, (48, 32))
    # Requantized: each weight moves by at most an e4m3 step (2^-4 of itself).
    want = sequence_logits(load(tmp_path / "plain", "dequantize"), PROMPT)
    assert relative_error(sequence_logits(kept, PROMPT), want) < 2e-2


def test_unquantized_experts_are_quantized_where_fp8_is_kept(qwen3_moe_folders, tmp_path):
    """A checkpoint whose experts were left unquantized (only some layers quantized) loads into
    fp8 experts: each expert quantized in blocks at load."""
    from tests.models.test_fp8_weights import save_safetensors
    from models.tokenizer import Tokenizer

    fp8, _ = qwen3_moe_folders["per_expert"]
    tensors = {name: np.array(array) for name, array, _ in iter_safetensors(fp8)}
    for name in [n for n in tensors if ".experts.0." in n and n.endswith("weight")]:
        tensors[name] = dequantize(tensors[name], tensors.pop(name + "_scale_inv"), BLOCK)
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "config.json").write_text((fp8 / "config.json").read_text())
    save_safetensors(tensors, folder / "model.safetensors")
    Tokenizer.word_level(QWEN3_MOE["vocab_size"]).save(str(folder))
    kept = load(folder, "keep")
    assert_fp8_experts(kept, (48, 32))
    want = sequence_logits(load(fp8, "keep"), PROMPT)
    assert relative_error(sequence_logits(kept, PROMPT), want) < 1e-5  # e4m3 values requantize exactly


def test_deepseek_v3_fp8_fixture_keeps_fp8_experts_and_matches_dequantized():
    """The V3 FP8 fixture (16 x 16 blocks, expert intermediate 24: ragged): kept, the routed
    experts of both MoE layers are fp8; logits match the dequantized load's and transformers'
    (run on the dequantized weights, reference.npz)."""
    config = ModelConfig.from_folder(DEEPSEEK_FP8)
    kept = load_state(config, iter_safetensors(DEEPSEEK_FP8), fp8_weights="keep")
    assert len(moe_blocks(kept)) == 2
    assert_fp8_experts(kept, (16, 16))
    dequantized = load_state(config, iter_safetensors(DEEPSEEK_FP8), fp8_weights="dequantize")
    ref = np.load(DEEPSEEK_FP8 / "reference.npz")
    ids = ref["input_ids_0"].tolist()
    got = sequence_logits(kept, ids, block_size=4, chunk=7)
    assert relative_error(got, sequence_logits(dequantized, ids, block_size=4, chunk=7)) < TOLERANCE
    assert relative_error(got, ref["logits_0"]) < TOLERANCE


# A Qwen3-MoE-like random model with fp8 experts; blocks (out 32, in 24): ragged everywhere.
RANDOM = dict(architectures=["Qwen3MoeForCausalLM"], vocab_size=96, hidden_size=64, intermediate_size=64,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
              max_position_embeddings=256, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
              norm_topk_prob=True, quantization_config=dict(quant_method="fp8", weight_block_size=[32, 24]))


def one_device_ep_layout():
    """Expert parallelism on one device: 6 experts + 2 redundant slots, the EP forward path."""
    return ParallelLayout(make_mesh(), expert_parallel=ExpertParallelOptions(num_redundant_experts=2))


def test_layout_pads_fp8_experts_with_zero_weights_and_unit_scales():
    model = random_model(ModelConfig.from_hf(RANDOM), fp8_weights="keep").model
    laid_out = with_layout(model, one_device_ep_layout())
    for block, logical in zip(moe_blocks(laid_out), moe_blocks(model)):
        for param, source in zip(block.experts.slot_params(), logical.experts.slot_params()):
            value = np.asarray(param[...], np.float32)
            assert value.shape[0] == 8 and type(param) is type(source)
            np.testing.assert_array_equal(value[:6], np.asarray(source[...], np.float32))
            np.testing.assert_array_equal(value[6:], 1.0 if isinstance(param, QuantScale) else 0.0)
    assert relative_error(sequence_logits(laid_out, PROMPT), sequence_logits(model, PROMPT)) < 1e-5


def test_eplb_moves_scales_with_their_weights(monkeypatch):
    """A forced placement (experts 0 and 2 replicated, every expert in another slot): each slot
    holds its logical expert's weights and scales, and the logits stay the same."""
    model = with_layout(random_model(ModelConfig.from_hf(RANDOM), fp8_weights="keep").model, one_device_ep_layout())
    assert_eplb_moves_every_slot_param(model, PROMPT, monkeypatch)


@pytest.fixture(scope="module")
def parallel_results():
    return run_parallel_worker("deepseek_fp8")


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in DEEPSEEK_FP8_CASES if c != "single"])
def test_expert_parallel_fp8_experts_equal_one_device(parallel_results, case):
    """8 fake devices, the tiny DeepSeek with fp8 experts (tests/jaxserve/parallel_worker.py): both
    dispatch strategies, a tp shard starting inside a block, dual-batch overlap; the single
    device's greedy tokens and logprobs, no extra executables."""
    from tests.jaxserve.test_parallel import _compare

    got, ref = parallel_results["deepseek_fp8"][case], parallel_results["deepseek_fp8"]["single"]
    assert got["tokens"] == ref["tokens"], case
    _compare(got, ref, f"deepseek_fp8/{case}")
    assert got["step_executables"] == ref["step_executables"]


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in DEEPSEEK_EPLB_CASES if c != "single"])
def test_eplb_rebalance_of_fp8_experts_keeps_outputs(parallel_results, case):
    """Skewed routing: EPLB replicates experts 0 and 1 (weights and scales) and the outputs stay
    the single device's (with the scales left behind they do not: checked once by hand)."""
    skewed = parallel_results["deepseek_fp8_skewed"]
    assert skewed[case]["tokens"] == skewed["single"]["tokens"]
    history = skewed[case]["eplb"]
    assert history and history[0]["before"] < 0.5 and history[0]["after"] >= 0.9
