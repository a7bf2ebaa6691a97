"""Placing Hugging Face-named tensors into a model's parameter state.

Sources (safetensors folders, GGUF files) yield `(hf_name, array)` pairs; this module maps each
name to a parameter path, transposes linear weights into `[in, out]` kernels, stacks per-expert
tensors, and checks every shape against what the config implies.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Iterator

import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config import ModelConfig
from models.registry import abstract_model, hf_param_path

# Buffers some checkpoints carry that are derived from the config, not learned.
# FP8 KV scales are read separately (jaxserve/kv/scales.py), not model parameters.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "self_attn.k_scale", "self_attn.v_scale")


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
                for name in f.keys():
                    yield name, np.asarray(f.get_tensor(name)), path
        except WeightError:
            raise
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise WeightError(f"{path}: cannot read safetensors file ({e})") from e


def load_state(
    config: ModelConfig,
    tensors: Iterable[tuple[str, np.ndarray, str]],
    *,
    dtype=jnp.float32,
    attention_backend: str = "auto",
) -> nnx.Module:
    """Build a model from `(hf_name, array, file)` tuples, checking names and shapes."""
    graphdef, state = abstract_model(config, dtype=dtype, attention_backend=attention_backend)
    expected = {path: var.get_value() for path, var in nnx.to_flat_state(state)}
    values: dict[tuple, np.ndarray] = {}
    experts_seen: dict[tuple, set[int]] = {}
    files: set[str] = set()
    for name, array, file in tensors:
        files.add(file)
        if name.endswith(_IGNORED_SUFFIXES) or (config.tie_word_embeddings and name == "lm_head.weight"):
            continue
        for path, expert, value in _targets(config, name, array, expected, file):
            want = expected[path].shape
            if expert is None:
                _check_shape(file, name, value, array, want)
                values[path] = value
            else:
                _check_shape(file, name, value, array, want[1:])
                if path not in values:
                    values[path] = np.zeros(want, np.float32 if value.dtype.itemsize > 2 else value.dtype)
                values[path][expert] = value
                experts_seen.setdefault(path, set()).add(expert)
    missing = [p for p in expected if p not in values]
    source = _describe_files(files)
    if missing:
        names = ", ".join("{} with shape {}".format(*_as_stored(p, expected[p].shape)) for p in missing[:5])
        raise WeightError(f"{source}: checkpoint is missing {len(missing)} tensors, e.g. {names}")
    for path, seen in experts_seen.items():
        if len(seen) != expected[path].shape[0]:
            absent = sorted(set(range(expected[path].shape[0])) - seen)
            name, shape = _as_stored(path, expected[path].shape[1:])
            raise WeightError(f"{source}: checkpoint is missing experts {absent[:8]} of {name}, "
                              f"each expected with shape {shape}")
    pure = {}
    for path, value in values.items():
        node = pure
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jnp.asarray(value, dtype=expected[path].dtype)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def _targets(config, name, array, expected, file):
    """Yield (parameter path, expert index or None, value in our layout) for one HF tensor."""
    path, expert = hf_param_path(config, name)
    if expert is not None:  # per-expert [out, in] -> slice [in, out] of a stacked parameter
        if path not in expected:
            raise WeightError(f"{file}: unexpected tensor {name!r}")
        if expert >= expected[path].shape[0]:
            raise WeightError(f"{file}: unexpected tensor {name!r}: expert {expert} but the config "
                              f"has {expected[path].shape[0]} experts")
        yield path, expert, array.T
        return
    fused = _fused_experts(path, array, expected, file, name)
    if fused is not None:
        yield from fused
    elif path[-1] == "weight" and path[:-1] + ("kernel",) in expected:
        yield path[:-1] + ("kernel",), None, array.T
    elif path in expected:
        yield path, None, array
    else:
        raise WeightError(f"{file}: unexpected tensor {name!r} with shape {tuple(array.shape)}")


def _fused_experts(path, array, expected, file, name):
    """transformers 5 stores experts fused: `experts.gate_up_proj` [E, 2*I, H] and
    `experts.down_proj` [E, H, I] ([out, in] per expert, like nn.Linear)."""
    if len(path) < 2 or path[-2] != "experts" or array.ndim != 3:
        return None
    stem = path[:-1]
    if path[-1] == "gate_up_proj" and stem + ("gate_proj",) in expected:
        num_experts, hidden, intermediate = expected[stem + ("gate_proj",)].shape
        _check_shape(file, name, array, array, (num_experts, 2 * intermediate, hidden))
        gate, up = np.split(array, 2, axis=1)
        return [
            (stem + ("gate_proj",), None, np.swapaxes(gate, 1, 2)),
            (stem + ("up_proj",), None, np.swapaxes(up, 1, 2)),
        ]
    if path[-1] == "down_proj" and stem + ("down_proj",) in expected:
        return [(stem + ("down_proj",), None, np.swapaxes(array, 1, 2))]
    return None


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
    if path[-1] == "kernel":
        return name.removesuffix("kernel") + "weight", shape[::-1]
    if len(path) > 1 and path[-2] == "experts":
        return name, shape[::-1] if len(shape) == 2 else shape[:1] + shape[1:][::-1]
    return name, shape
