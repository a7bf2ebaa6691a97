"""Read a GGUF file: metadata → HF `config.json` dict, tensors → HF names, float32, HF layout.

The header is parsed here with `struct` (gguf's `GGUFReader` builds a numpy view per
vocabulary string and takes seconds on the default model); tensor bytes are memory-mapped and
dequantized one tensor at a time with `gguf.quants.dequantize`.

Shape checking happens inside `load_gguf`: every tensor's shape (known from the header, before any
dequantizing) is compared with `expected_shapes(hf_config)`, so a missing, misshapen or unexpected
tensor fails at load time, not halfway through `tensors()`.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import re
import struct
from typing import Any, Iterator

import numpy as np
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen2moe", "qwen3moe")

# GGUF arch -> (HF architecture, HF model_type); llama with experts becomes Mixtral.
_HF_ARCHITECTURE = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "qwen2moe": ("Qwen2MoeForCausalLM", "qwen2_moe"),
    "qwen3moe": ("Qwen3MoeForCausalLM", "qwen3_moe"),
}

# Per-layer GGUF tensor name (after "blk.N.", before ".weight"/".bias") -> HF name after
# "model.layers.N.".
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_MIXTRAL_MOE_NAMES = {
    "ffn_gate_inp": "block_sparse_moe.gate",
    "ffn_gate_exps": "block_sparse_moe.experts.{e}.w1",
    "ffn_up_exps": "block_sparse_moe.experts.{e}.w3",
    "ffn_down_exps": "block_sparse_moe.experts.{e}.w2",
}
_QWEN_MOE_NAMES = {
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.{e}.gate_proj",
    "ffn_up_exps": "mlp.experts.{e}.up_proj",
    "ffn_down_exps": "mlp.experts.{e}.down_proj",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Older Mixtral GGUFs store one tensor per expert: blk.N.ffn_gate.E.weight.
_OLD_MIXTRAL_EXPERT = {"ffn_gate": "w1", "ffn_up": "w3", "ffn_down": "w2"}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+?)(?:\.(\d+))?\.(weight|bias)$")

_HEADER = struct.Struct("<4sIQQ")
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                   10: "<Q", 11: "<q", 12: "<d"}
_ARRAY_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
                 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY, _FLOAT32 = 8, 9, 6


@dataclasses.dataclass(frozen=True)
class _TensorInfo:
    gguf_name: str
    shape: tuple[int, ...]  # numpy order (GGUF stores dimensions innermost first)
    qtype: GGMLQuantizationType
    start: int  # absolute byte offset in the file
    nbytes: int


@dataclasses.dataclass
class GGUFCheckpoint:
    """A parsed GGUF file. Tensor data stays on disk until `tensors()` reads it.

    `shapes` maps every HF name that `tensors()` will yield to its (already checked) shape.
    """

    path: str
    hf_config: dict[str, Any]
    metadata: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]
    _infos: list[_TensorInfo] = dataclasses.field(repr=False)

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yield `(hf_name, float32 array)` one at a time, in file order, HF layout.

        Each array is a fresh copy owned by the caller; only one GGUF tensor is dequantized at a
        time (a stacked expert tensor is dequantized once and yielded expert by expert).
        """
        num_heads = self.hf_config["num_attention_heads"]
        num_kv_heads = self.hf_config["num_key_value_heads"]
        unpermute = self.metadata["general.architecture"] == "llama"
        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            for info in self._infos:
                names = _hf_names(self.hf_config, info.gguf_name)
                if not names:
                    continue
                array = self._dequantize(mm, info)
                if unpermute and info.gguf_name.endswith((".attn_q.weight", ".attn_q.bias")):
                    array = unpermute_qk(array, num_heads)
                elif unpermute and info.gguf_name.endswith((".attn_k.weight", ".attn_k.bias")):
                    array = unpermute_qk(array, num_kv_heads)
                if len(names) == 1:
                    yield names[0], array.reshape(self.shapes[names[0]])
                else:
                    for expert, name in enumerate(names):
                        yield name, array[expert].copy()
                del array

    def _dequantize(self, mm: mmap.mmap, info: _TensorInfo) -> np.ndarray:
        raw = np.frombuffer(mm, dtype=np.uint8, count=info.nbytes, offset=info.start)
        raw = raw.reshape(quants.quant_shape_to_byte_shape(info.shape, info.qtype))
        try:
            array = quants.dequantize(raw, info.qtype)
        except NotImplementedError:
            raise NotImplementedError(
                f"{self.path}: tensor {info.gguf_name} has quantization type "
                f"{info.qtype.name}, which gguf.quants cannot dequantize") from None
        # F32 dequantizes to a view of the mapped file: copy so the file can be closed.
        return np.array(array, dtype=np.float32, copy=True).reshape(info.shape)


def load_gguf(path: str | os.PathLike) -> GGUFCheckpoint:
    """Parse a GGUF file's header, derive the HF config, and check every tensor's shape.

    Raises ValueError for an unsupported `general.architecture`, a truncated or corrupt file, a
    missing, unexpected or misshapen tensor; NotImplementedError for a quantization type that
    `gguf.quants` cannot dequantize. Messages name the file and the tensor.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        if file_size < _HEADER.size:
            raise ValueError(f"{path}: file is truncated ({file_size} bytes), not a GGUF file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            metadata, infos = _parse_header(path, mm, file_size)
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ValueError(f"{path}: unsupported GGUF architecture {arch!r}; supported: "
                         f"{', '.join(SUPPORTED_GGUF_ARCHITECTURES)}")
    for info in infos:
        if info.gguf_name == "rope_freqs.weight":
            raise NotImplementedError(
                f"{path}: tensor rope_freqs.weight (Llama-3-style RoPE frequency factors) is not "
                f"supported yet")
    hf_config = _hf_config(metadata, infos)
    shapes = _check_shapes(path, hf_config, infos)
    _check_dequantizable(path, infos)
    return GGUFCheckpoint(path=path, hf_config=hf_config, metadata=metadata, shapes=shapes,
                          _infos=infos)


def unpermute_qk(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's `LlamaModel.permute` on q/k rows (weights or biases).

    The converter maps HF's rotate-half row order to interleaved pairs with
    `w.reshape(num_heads, 2, half, *rest).swapaxes(1, 2)`; the inverse views rows as
    (num_heads, half, 2) and swaps the two row axes back.
    """
    rows = weight.shape[0]
    assert rows % (2 * num_heads) == 0, (rows, num_heads)
    half = rows // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def permute_qk(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute` (HF order → GGUF order); the inverse of `unpermute_qk`."""
    half = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def expected_shapes(hf_config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every parameter's HF name → shape ([out_features, in_features] for Linear weights) for
    the llama-like families (Llama, Mistral, Qwen2, Qwen3 and their MoE variants, Mixtral).

    Optional keys read: `attention_bias`, `num_local_experts`/`num_experts`,
    `moe_intermediate_size`, `shared_expert_intermediate_size`, `mlp_only_layers`,
    `decoder_sparse_step`.
    """
    model_type = hf_config.get("model_type", "llama")
    hidden = hf_config["hidden_size"]
    vocab = hf_config["vocab_size"]
    num_heads = hf_config["num_attention_heads"]
    num_kv_heads = hf_config.get("num_key_value_heads") or num_heads
    head_dim = hf_config.get("head_dim") or hidden // num_heads
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not hf_config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (vocab, hidden)
    has_bias = model_type.startswith("qwen2") or hf_config.get("attention_bias", False)
    for layer in range(hf_config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
        for name, size in (("q_proj", q_size), ("k_proj", kv_size), ("v_proj", kv_size)):
            shapes[f"{p}self_attn.{name}.weight"] = (size, hidden)
            if has_bias:
                shapes[f"{p}self_attn.{name}.bias"] = (size,)
        shapes[p + "self_attn.o_proj.weight"] = (hidden, q_size)
        if model_type.startswith("qwen3"):
            shapes[p + "self_attn.q_norm.weight"] = (head_dim,)
            shapes[p + "self_attn.k_norm.weight"] = (head_dim,)
        if _is_moe_layer(hf_config, layer):
            shapes.update(_moe_shapes(hf_config, p))
        else:
            shapes.update(_mlp_shapes(p + "mlp.", _GATE_UP_DOWN, hf_config["intermediate_size"], hidden))
    return shapes


def _is_moe_layer(hf_config: dict[str, Any], layer: int) -> bool:
    if not (hf_config.get("num_local_experts") or hf_config.get("num_experts")):
        return False
    if hf_config.get("model_type") == "mixtral":
        return True
    step = hf_config.get("decoder_sparse_step") or 1
    return layer not in (hf_config.get("mlp_only_layers") or []) and (layer + 1) % step == 0


def _moe_shapes(hf_config: dict[str, Any], prefix: str) -> dict[str, tuple[int, ...]]:
    hidden = hf_config["hidden_size"]
    num_experts = hf_config.get("num_local_experts") or hf_config["num_experts"]
    if hf_config.get("model_type") == "mixtral":
        shapes = {prefix + "block_sparse_moe.gate.weight": (num_experts, hidden)}
        for e in range(num_experts):
            shapes.update(_mlp_shapes(f"{prefix}block_sparse_moe.experts.{e}.", ("w1", "w3", "w2"),
                                      hf_config["intermediate_size"], hidden))
        return shapes
    shapes = {prefix + "mlp.gate.weight": (num_experts, hidden)}
    for e in range(num_experts):
        shapes.update(_mlp_shapes(f"{prefix}mlp.experts.{e}.", _GATE_UP_DOWN,
                                  hf_config["moe_intermediate_size"], hidden))
    shared = hf_config.get("shared_expert_intermediate_size") or 0
    if shared:
        shapes.update(_mlp_shapes(prefix + "mlp.shared_expert.", _GATE_UP_DOWN, shared, hidden))
        shapes[prefix + "mlp.shared_expert_gate.weight"] = (1, hidden)
    return shapes


_GATE_UP_DOWN = ("gate_proj", "up_proj", "down_proj")


def _mlp_shapes(prefix: str, names: tuple[str, str, str], inter: int,
                hidden: int) -> dict[str, tuple[int, ...]]:
    gate, up, down = names
    return {f"{prefix}{gate}.weight": (inter, hidden), f"{prefix}{up}.weight": (inter, hidden),
            f"{prefix}{down}.weight": (hidden, inter)}


def _hf_names(hf_config: dict[str, Any], gguf_name: str) -> list[str]:
    """HF names for one GGUF tensor: one name, one per expert for a stacked expert tensor, or
    none for a tensor with no HF counterpart. Unknown names raise KeyError."""
    if gguf_name in _GLOBAL_NAMES:
        return [_GLOBAL_NAMES[gguf_name]]
    match = _LAYER_RE.match(gguf_name)
    if match is None:
        raise KeyError(gguf_name)
    layer, base, expert, kind = match.groups()
    prefix = f"model.layers.{layer}."
    if expert is not None:
        if base not in _OLD_MIXTRAL_EXPERT:
            raise KeyError(gguf_name)
        return [f"{prefix}block_sparse_moe.experts.{expert}.{_OLD_MIXTRAL_EXPERT[base]}.{kind}"]
    if base in _LAYER_NAMES:
        return [f"{prefix}{_LAYER_NAMES[base]}.{kind}"]
    moe_names = _MIXTRAL_MOE_NAMES if hf_config["model_type"] == "mixtral" else _QWEN_MOE_NAMES
    if base not in moe_names:
        raise KeyError(gguf_name)
    template = f"{prefix}{moe_names[base]}.{kind}"
    if "{e}" not in template:
        return [template]
    num_experts = hf_config.get("num_local_experts") or hf_config["num_experts"]
    return [template.format(e=e) for e in range(num_experts)]


def _check_shapes(path: str, hf_config: dict[str, Any],
                  infos: list[_TensorInfo]) -> dict[str, tuple[int, ...]]:
    expected = expected_shapes(hf_config)
    shapes: dict[str, tuple[int, ...]] = {}
    for info in infos:
        try:
            names = _hf_names(hf_config, info.gguf_name)
        except KeyError:
            raise ValueError(f"{path}: unexpected tensor {info.gguf_name} (shape {info.shape}); "
                             f"no Hugging Face name is known for it") from None
        shape = info.shape[1:] if len(names) > 1 else info.shape
        if len(names) > 1 and info.shape[0] != len(names):
            raise ValueError(f"{path}: tensor {info.gguf_name} has shape {info.shape}, expected "
                             f"{len(names)} stacked experts on the first axis")
        for name in names:
            want = expected.get(name)
            if want is None:
                raise ValueError(f"{path}: unexpected tensor {info.gguf_name} → {name} "
                                 f"(shape {shape}) for this configuration")
            if tuple(shape) != want and not (name.endswith("shared_expert_gate.weight")
                                             and tuple(shape) == want[1:]):
                raise ValueError(f"{path}: tensor {info.gguf_name} → {name} has shape {shape}, "
                                 f"expected shape {want}")
            shapes[name] = want
    missing = [name for name in expected if name not in shapes]
    if missing:
        name = missing[0]
        raise ValueError(f"{path}: missing tensor {name} (GGUF {_gguf_name_hint(name)}), expected "
                         f"shape {expected[name]}" + (f"; {len(missing) - 1} more missing"
                                                      if len(missing) > 1 else ""))
    return shapes


def _gguf_name_hint(hf_name: str) -> str:
    """Best-effort GGUF name for an HF name, for error messages."""
    for gguf_name, hf in _GLOBAL_NAMES.items():
        if hf == hf_name:
            return gguf_name
    match = re.match(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$", hf_name)
    if match:
        layer, rest, kind = match.groups()
        rest = re.sub(r"\.experts\.\d+\.", ".experts.{e}.", rest)
        for table in (_LAYER_NAMES, _MIXTRAL_MOE_NAMES, _QWEN_MOE_NAMES):
            for gguf_base, hf_base in table.items():
                if hf_base == rest:
                    return f"blk.{layer}.{gguf_base}.{kind}"
    return "?"


def _check_dequantizable(path: str, infos: list[_TensorInfo]) -> None:
    """Dequantize one zero block of each type present, so an unsupported type fails at load."""
    checked: set[GGMLQuantizationType] = set()
    for info in infos:
        if info.qtype in checked:
            continue
        _, type_size = GGML_QUANT_SIZES[info.qtype]
        try:
            quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), info.qtype)
        except NotImplementedError:
            raise NotImplementedError(
                f"{path}: tensor {info.gguf_name} has quantization type {info.qtype.name}, which "
                f"gguf.quants cannot dequantize") from None
        checked.add(info.qtype)


def _hf_config(metadata: dict[str, Any], infos: list[_TensorInfo]) -> dict[str, Any]:
    """A transformers `config.json`-style dict from GGUF metadata (and tensor presence)."""
    arch = metadata["general.architecture"]

    def get(key: str, default: Any = None) -> Any:
        return metadata.get(f"{arch}.{key}", default)

    names = {info.gguf_name: info for info in infos}
    architecture, model_type = _HF_ARCHITECTURE[arch]
    num_experts = get("expert_count", 0) or 0
    if arch == "llama" and num_experts:
        architecture, model_type = "MixtralForCausalLM", "mixtral"
    hidden = get("embedding_length")
    num_heads = get("attention.head_count")
    num_kv_heads = get("attention.head_count_kv", num_heads)
    if isinstance(num_kv_heads, list):  # per-layer list in some files; must be uniform here
        assert len(set(num_kv_heads)) == 1, "per-layer head_count_kv is not supported"
        num_kv_heads = num_kv_heads[0]
    vocab = get("vocab_size")
    if vocab is None:
        embed = names.get("token_embd.weight")
        vocab = embed.shape[0] if embed else len(metadata.get("tokenizer.ggml.tokens", []))
    config: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length", 0),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": get("attention.key_length") or hidden // num_heads,
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": get("rope.freq_base", 10000.0),
        "max_position_embeddings": get("context_length", 4096),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    if arch == "llama" and "blk.0.attn_q.bias" in names:
        config["attention_bias"] = True
    rope_scaling = _rope_scaling(get)
    if rope_scaling:
        config["rope_scaling"] = rope_scaling
    if get("attention.sliding_window"):
        config["sliding_window"] = get("attention.sliding_window")
        config["use_sliding_window"] = True
    if num_experts:
        config["num_local_experts" if model_type == "mixtral" else "num_experts"] = num_experts
        config["num_experts_per_tok"] = get("expert_used_count")
        if model_type != "mixtral":
            config["moe_intermediate_size"] = get("expert_feed_forward_length")
            config["shared_expert_intermediate_size"] = get("expert_shared_feed_forward_length", 0)
            # llama.cpp renormalises the top-k weights for qwen3moe, not for qwen2moe.
            config["norm_topk_prob"] = bool(get("expert_weights_norm", arch == "qwen3moe"))
            config["decoder_sparse_step"] = 1
            config["mlp_only_layers"] = sorted(
                layer for layer in range(config["num_hidden_layers"])
                if f"blk.{layer}.ffn_gate_inp.weight" not in names)
    return config


def _rope_scaling(get: Any) -> dict[str, Any] | None:
    rope_type = get("rope.scaling.type")
    if rope_type in (None, "none"):
        return None
    scaling: dict[str, Any] = {"rope_type": rope_type, "factor": get("rope.scaling.factor", 1.0)}
    if get("rope.scaling.original_context_length"):
        scaling["original_max_position_embeddings"] = get("rope.scaling.original_context_length")
    return scaling


def _parse_header(path: str, mm: mmap.mmap, file_size: int) -> tuple[dict, list[_TensorInfo]]:
    magic, version, num_tensors, num_kv = _HEADER.unpack_from(mm, 0)
    if magic != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file (magic {magic!r})")
    if version not in (2, 3):
        raise ValueError(f"{path}: GGUF version {version} is not supported (2 or 3; a big-endian "
                         f"file also reads as an unknown version)")
    reader = _Reader(mm, _HEADER.size)
    metadata: dict[str, Any] = {}
    key = "<header>"
    try:
        for _ in range(num_kv):
            key = reader.string()
            metadata[key] = reader.value(reader.scalar("<I"))
        raw_infos = []
        for _ in range(num_tensors):
            key = reader.string()
            dims = [reader.scalar("<Q") for _ in range(reader.scalar("<I"))]
            raw_infos.append((key, tuple(reversed(dims)), reader.scalar("<I"), reader.scalar("<Q")))
    except (struct.error, IndexError, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: file is truncated or corrupt while reading {key!r}: {e}") from None
    alignment = metadata.get("general.alignment", 32)
    data_start = -(-reader.pos // alignment) * alignment
    infos = []
    for name, shape, type_id, offset in raw_infos:
        try:
            qtype = GGMLQuantizationType(type_id)
            block_size, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise ValueError(f"{path}: tensor {name} has unknown quantization type id {type_id}; "
                             f"known types: {', '.join(t.name for t in GGML_QUANT_SIZES)}") from None
        if shape[-1] % block_size:
            raise ValueError(f"{path}: tensor {name} has rows of {shape[-1]} values, not a "
                             f"multiple of the {qtype.name} block size {block_size}")
        nbytes = int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block_size) * type_size
        start = data_start + offset
        if start + nbytes > file_size:
            raise ValueError(f"{path}: file is truncated: tensor {name} needs bytes "
                             f"[{start}, {start + nbytes}) but the file has {file_size}")
        infos.append(_TensorInfo(name, shape, qtype, start, nbytes))
    return metadata, infos


class _Reader:
    """Little-endian cursor over the GGUF header."""

    def __init__(self, buffer: mmap.mmap, pos: int):
        self.buffer, self.pos = buffer, pos

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buffer, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.scalar("<Q")
        end = self.pos + length
        if end > len(self.buffer):
            raise IndexError(f"string of {length} bytes runs past the end of the file")
        text = self.buffer[self.pos:end].decode("utf-8", errors="replace")
        self.pos = end
        return text

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type, count = self.scalar("<I"), self.scalar("<Q")
            if item_type in _ARRAY_DTYPES:
                dtype = np.dtype(_ARRAY_DTYPES[item_type])
                values = np.frombuffer(self.buffer, dtype=dtype, count=count, offset=self.pos)
                self.pos += count * dtype.itemsize
                if item_type == _FLOAT32:
                    return [_short_float(v) for v in values]
                return values.tolist()
            return [self.value(item_type) for _ in range(count)]
        if vtype not in _SCALAR_FORMATS:
            raise ValueError(f"unknown GGUF value type {vtype}")
        value = self.scalar(_SCALAR_FORMATS[vtype])
        return _short_float(value) if vtype == _FLOAT32 else value


def _short_float(value: float) -> float:
    """The shortest decimal that round-trips the float32 (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))
