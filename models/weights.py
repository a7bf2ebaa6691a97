"""Placing Hugging Face-named tensors into a model's parameter state.

Sources (safetensors folders, GGUF files) yield `(hf_name, array)` pairs; this module maps each
name to a parameter path, transposes linear weights into `[in, out]` kernels, stacks per-expert
tensors, and checks every shape against what the config implies.

Block-FP8 checkpoints (models/quantization.py): each float8_e4m3fn tensor `X` comes with
`X_scale_inv` (`...proj.weight_scale_inv`, per expert too, and transformers 5's fused
`experts.gate_up_proj_scale_inv`), paired here whatever their order or file. Where the model keeps
fp8 the pair becomes the fp8 parameter and its scales: a Linear's kernel and `kernel_scale`, stacked
MoE experts' `gate_proj` and `gate_proj_scale` (per expert or fused); elsewhere the tensor is
dequantized on the host, one tensor (one expert) at a time, into the parameter's dtype.

MXFP4 checkpoints (gpt-oss): each MoE expert weight `X` is stored as `X_blocks` uint8
[E, out, in/32, 16] and `X_scales` uint8 [E, out, in/32] (models/quantization.py), paired here like
fp8 tensors and their scales. Where the model keeps MXFP4 (`fp8_weights` "keep", gpt-oss) the pair
is handed to the family's `hf_tensors` as `X_blocks` and `X_scales` in the kept layout, packed
uint8 [E, in/2, out] and [E, in/32, out] (pallas_kernels/mxfp4.py: the same bytes, transposed),
which splits gate and up there (columns of the [in, out] layout, never inside a byte or a scale's
block) and names them as the experts' `gate_proj` and `gate_proj_scale`; they are placed as given.
Elsewhere the pair is dequantized on the host, one expert at a time, into the parameter's dtype, to
the tensor a bf16 checkpoint of the family stores as `X`, and placed as that tensor would be (fused
`gate_up_proj` split into the stacked experts' gate and up).
Every tensor is placed on the device as it comes: the model is never held whole on the host.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from typing import Iterable, Iterator

import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config import ModelConfig
from models.quantization import (E8M0_NAN, FP8, MXFP4_BLOCK, config_for_weights, dequantize, mxfp4_dequantize,
                                 quantize, scale_shape, to_kernel_layout)
from models.registry import abstract_model, hf_param_path, hf_tensors

logger = logging.getLogger(__name__)

# Buffers some checkpoints carry that are derived from the config, not learned.
# FP8 KV scales are read separately (jaxserve/kv/scales.py), not model parameters.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "self_attn.k_scale", "self_attn.v_scale")
SCALE_SUFFIX = "_scale_inv"  # `X_scale_inv` holds the block scales of the float8 tensor `X`
# An MXFP4 tensor `X` is stored as the uint8 pair `X_blocks` (e2m1 codes) and `X_scales` (e8m0).
BLOCKS_SUFFIX, SCALES_SUFFIX = "_blocks", "_scales"
# Families whose plain checkpoints store fused experts [E, in, out] (gpt-oss), not [E, out, in] as
# MXFP4 packs them: the layout an MXFP4 tensor is dequantized to.
_EXPERTS_STORED_IN_OUT = ("gpt_oss",)
# safetensors dtypes its numpy and flax readers cannot return (numpy has no float8): read here.
_RAW_DTYPES = {"F8_E4M3": FP8}


class WeightError(ValueError):
    """A checkpoint does not match its config: names the file, the tensor and the shape."""


def iter_safetensors(folder: str | os.PathLike) -> Iterator[tuple[str, np.ndarray, str]]:
    """(name, array, file) for every tensor of an HF folder, sharded (index.json) or not."""
    from safetensors import safe_open

    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(p for p in os.listdir(folder) if p.endswith(".safetensors"))
    if not files:
        raise WeightError(f"{folder}: no .safetensors files found")
    for file in files:
        path = os.path.join(folder, file)
        try:
            with safe_open(path, framework="flax") as f:
                header = None
                for name in f.keys():
                    if f.get_slice(name).get_dtype() in _RAW_DTYPES:
                        header = header or _safetensors_header(path)
                        yield name, _raw_tensor(path, header, name), path
                    else:
                        yield name, np.asarray(f.get_tensor(name)), path
        except WeightError:
            raise
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise WeightError(f"{path}: cannot read safetensors file ({e})") from e


def _safetensors_header(path: str) -> tuple[int, dict]:
    """(offset of the data, the JSON header) of a safetensors file."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return 8 + size, json.loads(f.read(size))


def _raw_tensor(path: str, header: tuple[int, dict], name: str) -> np.ndarray:
    """One tensor mapped from the file (read when used), in its dtype."""
    data, entries = header
    entry = entries[name]
    start, end = entry["data_offsets"]
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=data + start, shape=(end - start,))
    return raw.view(_RAW_DTYPES[entry["dtype"]]).reshape(entry["shape"])


def load_state(
    config: ModelConfig,
    tensors: Iterable[tuple[str, np.ndarray, str]],
    *,
    dtype=jnp.float32,
    attention_backend: str = "auto",
    fp8_weights: str = "auto",
) -> nnx.Module:
    """Build a model from `(hf_name, array, file)` tuples, checking names and shapes. A block-FP8
    checkpoint's layers keep fp8 where `fp8_weights` resolves to "keep" (models/quantization.py)."""
    graphdef, state = abstract_model(config, dtype=dtype, attention_backend=attention_backend,
                                     fp8_weights=fp8_weights)
    expected = {path: var.get_value() for path, var in nnx.to_flat_state(state)}
    note: list[str] = []  # how the checkpoint stores the tensor being placed, when it is MXFP4
    try:
        keep_mxfp4 = config_for_weights(config, fp8_weights).quant_method == "mxfp4"
        placed, stacks, experts_seen, files = _place(config, _mxfp4_pairs(config, tensors, dtype, note, keep_mxfp4),
                                                     expected, dtype)
    except ValueError as error:
        if not note:
            raise
        raise WeightError(f"{error} ({note[0]})") from None
    missing = [p for p in expected if p not in placed and p not in stacks]
    source = _describe_files(files)
    if missing and all(p[0] == "mtp" for p in missing) and not any(p[0] == "mtp" for p in placed):
        # DeepSeek's multi-token-prediction layer is optional: checkpoints converted by transformers
        # drop it but keep num_nextn_predict_layers.
        logger.info("%s: no multi-token-prediction layer in the checkpoint (config.num_nextn_predict_layers=%d): "
                    "loaded without it", source, config.num_nextn_predict_layers)
        config = dataclasses.replace(config, num_nextn_predict_layers=0)
        graphdef, state = abstract_model(config, dtype=dtype, attention_backend=attention_backend,
                                         fp8_weights=fp8_weights)
        expected = {path: var.get_value() for path, var in nnx.to_flat_state(state)}
        missing = [p for p in expected if p not in placed and p not in stacks]
    if missing:
        names = ", ".join("{} with shape {}".format(*_as_stored(p, expected[p].shape)) for p in missing[:5])
        raise WeightError(f"{source}: checkpoint is missing {len(missing)} tensors, e.g. {names}")
    for path in stacks:
        absent = sorted(set(range(expected[path].shape[0])) - experts_seen[path])
        name, shape = _as_stored(path, expected[path].shape[1:])
        raise WeightError(f"{source}: checkpoint is missing experts {absent[:8]} of {name}, "
                          f"each expected with shape {shape}")
    return merge_values(graphdef, state, placed)


def _place(config, tensors, expected, dtype):
    """Every tensor to its parameter path: (placed device arrays, per-expert stacks still missing
    experts, the experts seen of each stack, the files read)."""
    placed: dict[tuple, jnp.ndarray] = {}
    stacks: dict[tuple, np.ndarray] = {}  # per-expert tensors gathered on the host until complete
    experts_seen: dict[tuple, set[int]] = {}
    files: set[str] = set()
    for name, array, scale, file in _with_scales(config, hf_tensors(config, tensors)):
        files.add(file)
        if name.endswith(_IGNORED_SUFFIXES) or (config.tie_word_embeddings and name == "lm_head.weight"):
            continue
        for path, expert, value in _targets(config, name, array, scale, expected, file, dtype):
            want = expected[path]
            if expert is None:
                _check_shape(file, name, value, array, want.shape)
                placed[path] = jnp.asarray(value, dtype=want.dtype)
                continue
            _check_shape(file, name, value, array, want.shape[1:])
            if path not in stacks:
                stacks[path] = np.zeros(want.shape, np.dtype(want.dtype))
            stacks[path][expert] = value
            experts_seen.setdefault(path, set()).add(expert)
            if len(experts_seen[path]) == want.shape[0]:
                placed[path] = jnp.asarray(stacks.pop(path))
    return placed, stacks, experts_seen, files


def merge_values(graphdef, state, values: dict[tuple, jnp.ndarray]) -> nnx.Module:
    """The model of `graphdef` with `state`'s variables set to `values` (parameter path -> array)."""
    pure = {}
    for path, value in values.items():
        node = pure
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def _pair_up(tensors, half_of, unpaired):
    """Tensors that come in pairs, matched by name in whatever order and files the two come.
    `half_of(name, array)` is (stem, 0 or 1) for a half of the pair `stem`, None for a tensor on
    its own; `unpaired(stem, half, file)` words the error for a half whose other never came.
    Yields (name, (array, file), None) for a tensor on its own, (stem, half 0, half 1) for a pair."""
    waiting: dict[tuple[str, int], tuple] = {}
    for name, array, file in tensors:
        half = half_of(name, array)
        if half is None:
            yield name, (array, file), None
            continue
        stem, side = half
        other = waiting.pop((stem, 1 - side), None)
        if other is None:
            waiting[stem, side] = (array, file)
        else:
            yield (stem, (array, file), other) if side == 0 else (stem, other, (array, file))
    for (stem, side), (_, file) in waiting.items():
        raise WeightError(unpaired(stem, side, file))


def _with_scales(config, tensors):
    """(name, array, block scales or None, file): each float8 tensor with its `_scale_inv`, in
    whatever order and files the two come."""
    for name, first, second in _pair_up(tensors, _fp8_half, _fp8_unpaired):
        yield (name, first[0], None, first[1]) if second is None else _paired(config, name, *first, *second)


def _fp8_half(name, array):
    if name.endswith(SCALE_SUFFIX):
        return name.removesuffix(SCALE_SUFFIX), 1
    return (name, 0) if array.dtype == FP8 else None


def _fp8_unpaired(name, side, file):
    if side == 0:
        return (f"{file}: tensor {name!r} is float8_e4m3fn but the checkpoint has no "
                f"{name + SCALE_SUFFIX!r} (its block scales)")
    return (f"{file}: unexpected tensor {name + SCALE_SUFFIX!r}: the checkpoint has no "
            f"float8_e4m3fn tensor {name!r} for it to scale")


def _mxfp4_pairs(config, tensors, dtype, note: list[str], keep: bool):
    """(name, array, file) with each MXFP4 pair `X_blocks` + `X_scales` (in any order or file)
    either kept (`keep`): `X_blocks` and `X_scales` in the kept layout (module doc), or as `X`,
    dequantized on the host, one expert at a time, into `dtype` and laid out as a plain checkpoint
    of the family stores `X` ([E, out, in] as packed, [E, in, out] for `_EXPERTS_STORED_IN_OUT`).
    While the consumer handles such a tensor, `note` says how the checkpoint stores it (load_state
    adds that to errors)."""
    for name, first, second in _pair_up(tensors, _mxfp4_half, _mxfp4_unpaired):
        if second is None:
            yield name, *first
            continue
        blocks, scales, file = _mxfp4_checked(config, name, *first, *second)
        note.append(f"stored as MXFP4: {name + BLOCKS_SUFFIX!r} {tuple(blocks.shape)}, "
                    f"{name + SCALES_SUFFIX!r} {tuple(scales.shape)}")
        if keep and blocks.ndim == 4:
            packed, kept_scales = to_kernel_layout(np.asarray(blocks), scales)
            yield name + BLOCKS_SUFFIX, packed, file
            yield name + SCALES_SUFFIX, kept_scales, file
        else:
            value = mxfp4_dequantize(blocks, scales, np.dtype(dtype))
            if config.family in _EXPERTS_STORED_IN_OUT and value.ndim == 3:
                value = np.swapaxes(value, 1, 2)
            yield name, value, file
        note.clear()


def _mxfp4_half(name, array):
    if array.dtype != np.uint8:
        return None
    if name.endswith(BLOCKS_SUFFIX):
        return name.removesuffix(BLOCKS_SUFFIX), 0
    return (name.removesuffix(SCALES_SUFFIX), 1) if name.endswith(SCALES_SUFFIX) else None


def _mxfp4_unpaired(name, side, file):
    if side == 0:
        return (f"{file}: tensor {name + BLOCKS_SUFFIX!r} holds MXFP4 blocks but the checkpoint has no "
                f"{name + SCALES_SUFFIX!r} (their scales)")
    return (f"{file}: unexpected tensor {name + SCALES_SUFFIX!r}: the checkpoint has no MXFP4 blocks "
            f"{name + BLOCKS_SUFFIX!r} for it to scale")


def _mxfp4_checked(config, name, blocks, file, scales, scales_file):
    """(uint8 blocks [..., G, 16], uint8 scales [..., G], file) of the MXFP4 tensor `name`, checked
    against the config and each other."""
    blocks_name, scales_name = name + BLOCKS_SUFFIX, name + SCALES_SUFFIX
    if config.quant_method != "mxfp4":
        raise WeightError(f"{file}: tensor {blocks_name!r} holds MXFP4 blocks (uint8) but config.json has no "
                          "quantization_config with quant_method 'mxfp4'")
    if blocks.ndim < 2 or blocks.shape[-1] != MXFP4_BLOCK // 2 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise WeightError(f"{file}: tensor {blocks_name!r} has shape {tuple(blocks.shape)} and {scales_name!r} "
                          f"(in {scales_file}) {tuple(scales.shape)}: MXFP4 stores blocks [..., G, "
                          f"{MXFP4_BLOCK // 2}] (two 4-bit values a byte) and one scale per block, [..., G]")
    module = name.rpartition(".")[0]
    pattern = next((p for p in config.modules_to_not_convert if _module_matches(module, p)), None)
    if pattern is not None:
        raise WeightError(f"{file}: tensor {blocks_name!r} holds MXFP4 blocks but config.json's "
                          f"quantization_config.modules_to_not_convert keeps {module!r} unquantized ({pattern!r})")
    scales = np.asarray(scales)
    if (scales == E8M0_NAN).any():
        raise WeightError(f"{scales_file}: tensor {scales_name!r} holds the e8m0 code {E8M0_NAN} (NaN) as a scale")
    return blocks, scales, file


def _module_matches(module: str, pattern: str) -> bool:
    """transformers' `modules_to_not_convert` rule: `pattern` matches `module` from the start up to a
    module boundary (as a regex: "model.layers.*.self_attn"), or as its suffix."""
    return bool(re.match(rf"(?:{pattern})(?:(?<=\.)|(?=\.|$))", module)) or module.endswith(pattern)


def _paired(config, name, array, file, scale, scale_file):
    if config.quant_method != "fp8":
        raise WeightError(f"{file}: tensor {name!r} is float8_e4m3fn but config.json has no "
                          "quantization_config with quant_method 'fp8'")
    block = config.weight_block_size
    want = scale_shape(array.shape, block)
    if tuple(scale.shape) != want:
        raise WeightError(f"{scale_file}: tensor {name + SCALE_SUFFIX!r} has shape {tuple(scale.shape)}, expected "
                          f"{want} for {name!r} of shape {tuple(array.shape)} in blocks of {tuple(block)} "
                          "(quantization_config.weight_block_size)")
    return name, array, np.asarray(scale, np.float32), file


def _targets(config, name, array, scale, expected, file, dtype):
    """Yield (parameter path, expert index or None, value in our layout) for one HF tensor and,
    when it is block-FP8, its scales."""
    path, expert = hf_param_path(config, name)
    if path is None:  # a copy of another tensor (DeepSeek's MTP embedding and head)
        return
    kernel = path[:-1] + ("kernel",)
    if expert is None and path[-1] == "weight" and kernel in expected and expected[kernel].dtype == FP8:
        if scale is None:  # a layer the checkpoint left unquantized, in a layer kept as fp8
            array, scale = quantize(np.asarray(array, np.float32), config.weight_block_size)
        yield kernel, None, array.T
        yield path[:-1] + ("kernel_scale",), None, scale.T
        return
    if path in expected and expected[path].dtype == np.uint8:  # kept MXFP4 experts: in our layout already
        yield path, None, array
        return
    stacked = path[:-1] + ("gate_proj",) if path[-1] == "gate_up_proj" else path  # fused: gate's format
    if stacked in expected and expected[stacked].dtype == FP8:  # stacked experts kept as fp8
        yield from _fp8_experts(config, path, expert, name, array, scale, expected, file)
        return
    if scale is not None:
        array = dequantize(array, scale, config.weight_block_size, np.dtype(dtype))
    if expert is not None:  # per-expert [out, in] -> slice [in, out] of a stacked parameter
        _check_expert(path, expert, name, expected, file)
        yield path, expert, array.T
        return
    fused = _fused_experts(path, array, expected, file, name)
    if fused is not None:
        yield from fused
    elif path[-1] == "weight" and kernel in expected:
        yield kernel, None, array.T
    elif path in expected:
        yield path, None, array
    else:
        raise WeightError(f"{file}: unexpected tensor {name!r} with shape {tuple(array.shape)}")


def _check_expert(path, expert, name, expected, file):
    if path not in expected:
        raise WeightError(f"{file}: unexpected tensor {name!r}")
    if expert >= expected[path].shape[0]:
        raise WeightError(f"{file}: unexpected tensor {name!r}: expert {expert} but the config "
                          f"has {expected[path].shape[0]} experts")


def _fp8_experts(config, path, expert, name, array, scale, expected, file):
    """Expert weights where the model keeps them as fp8 (models.moe.Experts): the fp8 tensor and
    its scales, transposed to [in, out] ([ceil(in/bi), ceil(out/bo)]), into the stacked weight
    and its `_scale` (a tensor the checkpoint left unquantized is quantized here)."""
    block = config.weight_block_size
    if scale is None:
        array, scale = quantize(np.asarray(array, np.float32), block)
    if expert is not None:  # one expert's [out, in]
        _check_expert(path, expert, name, expected, file)
        yield path, expert, array.T
        yield path[:-1] + (path[-1] + "_scale",), expert, scale.T
        return
    fused = _fused_experts(path, array, expected, file, name, scale, block)
    if fused is None:
        raise WeightError(f"{file}: unexpected tensor {name!r} with shape {tuple(array.shape)}")
    yield from fused


def _fused_experts(path, array, expected, file, name, scale=None, block=None):
    """transformers 5 stores experts fused: `experts.gate_up_proj` [E, 2*I, H] and
    `experts.down_proj` [E, H, I] ([out, in] per expert, like nn.Linear). With fp8 experts kept,
    `scale` holds the tensor's block scales (in `block`, the file's (out, in)); each projection
    comes with its scales (`<name>_scale`, [E, ceil(in/bi), ceil(out/bo)])."""
    if len(path) < 2 or path[-2] != "experts" or array.ndim != 3:
        return None
    stem = path[:-1]
    if path[-1] == "gate_up_proj" and stem + ("gate_proj",) in expected:
        num_experts, hidden, intermediate = expected[stem + ("gate_proj",)].shape
        _check_shape(file, name, array, array, (num_experts, 2 * intermediate, hidden))
        if scale is None:
            parts = {proj: (half, None) for proj, half in zip(("gate_proj", "up_proj"), np.split(array, 2, axis=1))}
        else:
            parts = _split_fp8_gate_up(array, scale, block, intermediate, name)
    elif path[-1] == "down_proj" and stem + ("down_proj",) in expected:
        parts = {"down_proj": (array, scale)}
    else:
        return None
    out = []
    for proj, (weight, weight_scale) in parts.items():
        out.append((stem + (proj,), None, np.swapaxes(weight, 1, 2)))
        if weight_scale is not None:
            out.append((stem + (proj + "_scale",), None, np.swapaxes(weight_scale, 1, 2)))
    return out


def _split_fp8_gate_up(array, scale, block, intermediate, name) -> dict:
    """The fused block-FP8 gate_up_proj [E, 2I, H] as gate and up, each (fp8, scales). Exact when
    I is a multiple of the block's rows; otherwise one block straddles the two halves, and each
    half is requantized in its own blocks from the dequantized values (logged)."""
    if intermediate % block[0] == 0:
        rows = intermediate // block[0]
        return {"gate_proj": (array[:, :intermediate], scale[:, :rows]),
                "up_proj": (array[:, intermediate:], scale[:, rows:])}
    logger.warning("%s: moe_intermediate_size %d is not a multiple of the weight block's %d rows: the fused "
                   "tensor's gate and up halves share a block, each requantized in its own blocks (not bit-exact)",
                   name, intermediate, block[0])
    value = dequantize(array, scale, block)
    return {proj: quantize(half, block) for proj, half in zip(("gate_proj", "up_proj"), np.split(value, 2, axis=1))}


def _check_shape(file, name, value, array, want):
    """Compare in our layout, report in the file's: a transposed kernel's expectation (the
    last two axes swapped, `value` being a transposed view of `array`) is reported transposed
    back ([out, in], as the file stores it)."""
    if tuple(value.shape) != tuple(want):
        if value is not array and value.ndim >= 2:
            want = tuple(want)[:-2] + tuple(want)[-2:][::-1]
        raise WeightError(
            f"{file}: tensor {name!r} has shape {tuple(array.shape)}, expected {tuple(want)} from the config"
        )


def _describe_files(files: set[str]) -> str:
    if len(files) == 1:
        return next(iter(files))
    if not files:
        return "<no tensors>"
    return f"{os.path.commonpath(sorted(files))} ({len(files)} files)"


def _as_stored(path: tuple, shape) -> tuple[str, tuple]:
    """Our parameter path and shape as a checkpoint names and stores it: linear kernels
    ([in, out] here) are `weight` tensors stored [out, in]."""
    name = ".".join(map(str, path))
    shape = tuple(shape)
    if path[-1] in ("kernel", "kernel_scale"):
        stored = "weight" if path[-1] == "kernel" else "weight" + SCALE_SUFFIX
        return name.removesuffix(path[-1]) + stored, shape[::-1]
    if len(path) > 1 and path[-2] == "experts" and path[-1].endswith("_scale"):  # fp8 experts' scales
        name = name.removesuffix("_scale") + SCALE_SUFFIX
    if len(path) > 1 and path[-2] == "experts":
        return name, shape[::-1] if len(shape) == 2 else shape[:1] + shape[1:][::-1]
    return name, shape
