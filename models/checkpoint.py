"""orbax checkpoints of converted weights: the first load of a GGUF or HF model converts and
saves one, later loads restore it (no dequantization, no transposes).

A checkpoint folder holds `jaxserve_config.json` (the HF-style config plus the parameter dtype)
and the orbax `state/` directory. Tokenizer files sit beside them when known, so a converted
folder is a complete model that `LLM(model=folder)` can serve.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig
from models.registry import abstract_model

CONFIG_FILE = "jaxserve_config.json"
# Bump when the parameter layout changes so stale caches are not restored.
FORMAT_VERSION = 1


def is_checkpoint(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


def default_cache_dir() -> str:
    return os.environ.get("JAXSERVE_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "jaxserve"))


def cache_path_for(source: str, dtype, cache_dir: str | None = None) -> str:
    """Where the converted checkpoint of `source` (a file or folder) lives; keyed by its path
    and the size and modification time of its files, so an edited source is converted again."""
    source = os.path.abspath(source)
    key = json.dumps([source, _file_stamps(source), jnp.dtype(dtype).name, FORMAT_VERSION])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    name = os.path.basename(source.rstrip("/")).removesuffix(".gguf")
    return os.path.join(cache_dir or default_cache_dir(), "checkpoints", f"{name}-{digest}")


def _file_stamps(source: str) -> list:
    """[name, size, mtime] of the file, or of every file in the folder: overwriting a weight
    file in place leaves the folder's own size and mtime unchanged."""
    paths = sorted(os.path.join(source, n) for n in os.listdir(source)) if os.path.isdir(source) else [source]
    stamps = []
    for path in paths:
        if os.path.isfile(path):  # follows symlinks, as HF hub snapshots use them
            stat = os.stat(path)
            stamps.append([os.path.basename(path), stat.st_size, stat.st_mtime_ns])
    return stamps


def save_checkpoint(path: str, model: nnx.Module, hf_config: dict) -> None:
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    dtype = jax.tree.leaves(state)[0].dtype
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(path, "state"), _stringify_keys(state), force=True)
    checkpointer.wait_until_finished()
    # Written last: a checkpoint without its config file is treated as absent.
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump({"hf_config": hf_config, "dtype": jnp.dtype(dtype).name, "format_version": FORMAT_VERSION}, f)


def load_checkpoint(path: str, *, dtype=None, attention_backend: str = "auto") -> tuple[nnx.Module, dict]:
    """Restore a model saved by `save_checkpoint`; returns (model, hf_config)."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    with open(os.path.join(path, CONFIG_FILE)) as f:
        meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {meta.get('format_version')}, expected {FORMAT_VERSION}")
    config = ModelConfig.from_hf(meta["hf_config"])
    saved_dtype = jnp.dtype(meta["dtype"])
    graphdef, state = abstract_model(config, dtype=saved_dtype, attention_backend=attention_backend)
    # Onto this process's first device: under multi-host every process restores its own copy
    # (orbax would otherwise place arrays as saved, on the saving process's device).
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = _stringify_keys(jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=local),
                                          nnx.to_pure_dict(state)))
    restored = ocp.StandardCheckpointer().restore(os.path.join(path, "state"), target)
    nnx.replace_by_pure_dict(state, _restore_int_keys(restored))
    model = nnx.merge(graphdef, state)
    if dtype is not None and jnp.dtype(dtype) != saved_dtype:
        cast_params(model, dtype)
    return model, meta["hf_config"]


def cast_params(model: nnx.Module, dtype) -> None:
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: x.astype(dtype), params))


def _stringify_keys(tree):
    if isinstance(tree, dict):
        return {str(k): _stringify_keys(v) for k, v in tree.items()}
    return tree


def _restore_int_keys(tree):
    if isinstance(tree, dict):
        return {int(k) if k.isdigit() else k: _restore_int_keys(v) for k, v in tree.items()}
    return tree
