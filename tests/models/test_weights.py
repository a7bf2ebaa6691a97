"""Reading safetensors into a model: bad files name the file, the tensor and the expected shape."""

import os
import re
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from models.config import ModelConfig
from models.weights import WeightError, iter_safetensors, load_state

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "parity")
K_PROJ = "model.layers.1.self_attn.k_proj.weight"  # llama fixture: [out 32, in 64]


def fixture_copy(tmp_path, name="llama"):
    dst = tmp_path / name
    shutil.copytree(os.path.join(FIXTURES, name), dst)
    return dst


def rewrite(folder, edit, file="model.safetensors"):
    """Apply `edit` to the tensors of one file of `folder`; returns the file's path."""
    path = str(folder / file)
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)
    return path


def load(folder):
    return load_state(ModelConfig.from_folder(folder), iter_safetensors(folder))


def test_missing_tensor_names_file_tensor_and_expected_shape(tmp_path):
    folder = fixture_copy(tmp_path)
    path = rewrite(folder, lambda t: t.pop(K_PROJ))
    with pytest.raises(WeightError, match=re.escape(
            f"{path}: checkpoint is missing 1 tensors, e.g. layers.1.self_attn.k_proj.weight with shape (32, 64)")):
        load(folder)


def test_missing_untied_lm_head(tmp_path):
    folder = fixture_copy(tmp_path)
    rewrite(folder, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(WeightError, match=re.escape("lm_head.weight with shape (160, 64)")):
        load(folder)


def test_missing_tensor_in_sharded_folder_names_the_folder(tmp_path):
    folder = fixture_copy(tmp_path, "mixtral_sharded_legacy")
    rewrite(folder, lambda t: t.pop("model.norm.weight"), "model-00003-of-00003.safetensors")
    with pytest.raises(WeightError, match=re.escape(f"{folder} (3 files): checkpoint is missing 1 tensors, "
                                                    "e.g. norm.weight with shape (64,)")):
        load(folder)


@pytest.mark.parametrize("name, bad, want", [
    (K_PROJ, (31, 64), (32, 64)),  # transposed into a kernel: reported as the file stores it
    (K_PROJ, (64, 32), (32, 64)),  # the transpose itself is not accepted
    ("model.layers.0.input_layernorm.weight", (63,), (64,)),
    ("model.embed_tokens.weight", (161, 64), (160, 64)),
])
def test_wrong_shape_names_file_tensor_and_expected_shape(tmp_path, name, bad, want):
    folder = fixture_copy(tmp_path)
    path = rewrite(folder, lambda t: t.update({name: np.zeros(bad, np.float32)}))
    with pytest.raises(WeightError, match=re.escape(
            f"{path}: tensor '{name}' has shape {bad}, expected {want} from the config")):
        load(folder)


@pytest.mark.parametrize("name, bad, want", [
    ("model.layers.0.mlp.experts.gate_up_proj", (4, 81, 64), (4, 80, 64)),  # odd: cannot split in two
    ("model.layers.0.mlp.experts.gate_up_proj", (3, 80, 64), (4, 80, 64)),
    ("model.layers.1.mlp.experts.down_proj", (4, 64, 41), (4, 64, 40)),
])
def test_wrong_shape_of_fused_experts(tmp_path, name, bad, want):
    folder = fixture_copy(tmp_path, "mixtral")
    path = rewrite(folder, lambda t: t.update({name: np.zeros(bad, np.float32)}))
    with pytest.raises(WeightError, match=re.escape(
            f"{path}: tensor '{name}' has shape {bad}, expected {want} from the config")):
        load(folder)


def test_wrong_shape_of_one_expert(tmp_path):
    folder = fixture_copy(tmp_path, "qwen3_moe")
    name = "model.layers.0.mlp.experts.3.up_proj.weight"
    path = rewrite(folder, lambda t: t.update({name: np.zeros((41, 64), np.float32)}))
    with pytest.raises(WeightError, match=re.escape(f"{path}: tensor '{name}' has shape (41, 64), expected (40, 64)")):
        load(folder)


@pytest.mark.parametrize("name", ["model.layers.0.mlp.extra.weight", "model.layers.2.mlp.up_proj.weight",
                                  "model.layers.0.mlp.experts.0.up_proj.weight"])
def test_unexpected_tensor_names_file_and_tensor(tmp_path, name):
    folder = fixture_copy(tmp_path)
    path = rewrite(folder, lambda t: t.update({name: np.zeros((3, 4), np.float32)}))
    with pytest.raises(WeightError, match=re.escape(f"{path}: unexpected tensor '{name}'")):
        load(folder)


def test_expert_index_beyond_the_config(tmp_path):
    folder = fixture_copy(tmp_path, "qwen3_moe")
    name = "model.layers.0.mlp.experts.8.up_proj.weight"
    path = rewrite(folder, lambda t: t.update({name: np.zeros((40, 64), np.float32)}))
    with pytest.raises(WeightError, match=re.escape(f"{path}: unexpected tensor '{name}': expert 8 but the config "
                                                    "has 8 experts")):
        load(folder)


@pytest.mark.parametrize("damage", ["half", "header_only", "garbage", "empty", "bad_header_length"])
def test_corrupt_safetensors_names_the_file(tmp_path, damage):
    folder = fixture_copy(tmp_path)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    damaged = {
        "half": data[: len(data) // 2],
        "header_only": data[:5],
        "garbage": b"not a safetensors file at all" * 10,
        "empty": b"",
        "bad_header_length": (10**12).to_bytes(8, "little") + data[8:],
    }[damage]
    path.write_bytes(damaged)
    with pytest.raises(WeightError, match=re.escape(f"{path}: cannot read safetensors file")):
        load(folder)


def test_truncated_shard_of_a_sharded_folder(tmp_path):
    folder = fixture_copy(tmp_path, "mixtral_sharded_legacy")
    path = folder / "model-00002-of-00003.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(WeightError, match=re.escape(f"{path}: cannot read safetensors file")):
        load(folder)


def test_shard_named_by_index_but_absent(tmp_path):
    folder = fixture_copy(tmp_path, "mixtral_sharded_legacy")
    (folder / "model-00003-of-00003.safetensors").unlink()
    with pytest.raises(WeightError, match="model-00003-of-00003.safetensors: cannot read safetensors file"):
        load(folder)


def test_folder_without_safetensors(tmp_path):
    shutil.copy(os.path.join(FIXTURES, "llama", "config.json"), tmp_path)
    with pytest.raises(WeightError, match=re.escape(f"{tmp_path}: no .safetensors files found")):
        load(tmp_path)


@pytest.mark.parametrize("name, expert, proj", [
    ("qwen3_moe", 5, "up_proj"),  # Qwen per-expert names
    ("qwen2_moe", 0, "down_proj"),
])
def test_missing_expert_is_reported(tmp_path, name, expert, proj):
    folder = fixture_copy(tmp_path, name)
    path = rewrite(folder, lambda t: t.pop(f"model.layers.1.mlp.experts.{expert}.{proj}.weight"))
    shape = (64, 40) if proj == "down_proj" else (40, 64)
    with pytest.raises(WeightError, match=re.escape(
            f"{path}: checkpoint is missing experts [{expert}] of layers.1.mlp.experts.{proj}, "
            f"each expected with shape {shape}")):
        load(folder)


def test_missing_expert_in_sharded_mixtral_layout(tmp_path):
    folder = fixture_copy(tmp_path, "mixtral_sharded_legacy")
    rewrite(folder, lambda t: t.pop("model.layers.0.block_sparse_moe.experts.2.w3.weight"),
            "model-00002-of-00003.safetensors")
    with pytest.raises(WeightError, match=re.escape(
            f"{folder} (3 files): checkpoint is missing experts [2] of layers.0.mlp.experts.up_proj")):
        load(folder)


def test_tied_model_accepts_redundant_lm_head_and_ignores_rotary_buffers(tmp_path):
    folder = fixture_copy(tmp_path, "smollm2")
    embed = load_file(str(folder / "model.safetensors"))["model.embed_tokens.weight"]
    rewrite(folder, lambda t: t.update({
        "lm_head.weight": np.zeros_like(embed),  # ignored: tied models use the embedding
        "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32),
        "model.layers.1.self_attn.rotary_emb.inv_freq": np.ones(3, np.float32)}))
    model = load(folder)
    assert model.lm_head is None
    np.testing.assert_array_equal(np.asarray(model.embed_tokens.weight[...]), embed)


def test_rotary_buffers_ignored_in_untied_model(tmp_path):
    """A rotary buffer in an untied checkpoint loads nothing: every variable of the model equals
    the one loaded from the file without it, and the untied head is the file's own lm_head."""
    folder = fixture_copy(tmp_path)
    path = rewrite(folder, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)}))
    model = load(folder)
    reference = load(os.path.join(FIXTURES, "llama"))
    got, want = (variables(m) for m in (model, reference))
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    lm_head = load_file(path)["lm_head.weight"]  # [vocab, hidden], stored as the [hidden, vocab] kernel
    np.testing.assert_array_equal(np.asarray(model.lm_head.kernel[...]), lm_head.T)


def test_sharded_and_fused_layouts_load_the_same_weights():
    """Mixtral per-expert (sharded, w1/w2/w3) and transformers 5 fused layouts of one model."""
    sharded = load(os.path.join(FIXTURES, "mixtral_sharded_legacy"))
    fused = load(os.path.join(FIXTURES, "mixtral"))
    for a, b in zip(*(leaves(m) for m in (sharded, fused))):
        np.testing.assert_array_equal(a, b)


def test_half_precision_file_is_cast_to_the_requested_dtype(tmp_path):
    folder = fixture_copy(tmp_path)
    rewrite(folder, lambda t: t.update({k: v.astype(np.float16) for k, v in t.items()}))
    model = load(folder)
    reference = load(os.path.join(FIXTURES, "llama"))
    for a, b in zip(leaves(model), leaves(reference)):
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, b.astype(np.float16).astype(np.float32))


def variables(model) -> dict[str, np.ndarray]:
    """Every variable of `model` (parameters and any buffers), by its path."""
    from flax import nnx

    return {"/".join(map(str, path)): np.asarray(var.get_value()) for path, var in nnx.to_flat_state(nnx.state(model))}


def leaves(model):
    import jax
    from flax import nnx

    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]
