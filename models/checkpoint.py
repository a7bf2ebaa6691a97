"""orbax checkpoints of converted weights: the first load of a GGUF or HF model converts and
saves one, later loads restore it (no dequantization, no transposes).

A checkpoint folder holds `jaxserve_config.json` (the HF-style config plus the parameter dtype),
the orbax `state/` directory and, written last, `jaxserve_manifest.json`: the format version,
the source it was converted from and the size of every weight and config file. A folder without
a manifest is unfinished; one whose files disagree with it (a truncated data file) is refused
before orbax reads it. `save_checkpoint` writes into a temporary sibling folder and renames it
into place, so the checkpoint's path never holds half a checkpoint. Tokenizer files sit beside
them when known, so a converted folder is a complete model that `LLM(model=folder)` can serve.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import time
import traceback
import uuid
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig
from models.atomic_files import atomic_write_json
from models.quantization import FP8, QuantScale, dequantize, expert_quant, resolve_fp8_weights
from models.registry import abstract_model
from models.weights import merge_values
from pallas_kernels.moe import dequantize_expert_weight

CONFIG_FILE = "jaxserve_config.json"
MANIFEST_FILE = "jaxserve_manifest.json"
# Bump when the parameter layout changes so stale caches are not restored.
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint folder that is unfinished or does not match its manifest."""


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder that `save_checkpoint` finished (its manifest is written last)."""
    return os.path.isfile(os.path.join(path, MANIFEST_FILE))


def looks_like_checkpoint(path: str | os.PathLike) -> bool:
    """A finished checkpoint, or what is left of one (a config without a manifest)."""
    return is_checkpoint(path) or os.path.isfile(os.path.join(path, CONFIG_FILE))


def default_cache_dir() -> str:
    return os.environ.get("JAXSERVE_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "jaxserve"))


def cache_path_for(source: str, dtype, cache_dir: str | None = None, *, variant: str | None = None) -> str:
    """Where the converted checkpoint of `source` (a file or folder) lives; keyed by its path
    and the size and modification time of its files, so an edited source is converted again,
    and by `variant` (e.g. "fp8": block-FP8 weights kept) when given."""
    source = os.path.abspath(source)
    key = [source, _file_stamps(source), jnp.dtype(dtype).name, FORMAT_VERSION] + ([variant] if variant else [])
    key = json.dumps(key)
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


def save_checkpoint(path: str, model: nnx.Module, hf_config: dict, *, source: str | None = None,
                    add_files: Callable[[str], None] | None = None, replace: bool = True) -> bool:
    """Write `model` as a checkpoint folder at `path`, converted from `source` (recorded in the
    manifest). `add_files(folder)` writes more files (a tokenizer) into it; the manifest lists
    the weight and config files only, so those may be edited later. A checkpoint already at
    `path` is replaced, or kept when not `replace` (another process cached the same model
    first). Returns whether the folder now at `path` is the one this call wrote."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _remove_abandoned_folders(path)
    tmp = _temporary_sibling(path)
    os.makedirs(tmp)
    try:
        state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        dtype = jnp.dtype(model.embed_tokens.weight.dtype).name  # fp8 kernels and their scales aside
        fp8_weights = "keep" if model.config.quant_method in ("fp8", "mxfp4") else "dequantize"
        with _quiet_orbax():
            checkpointer = ocp.StandardCheckpointer()
            checkpointer.save(os.path.join(tmp, "state"), _stringify_keys(state))
            checkpointer.wait_until_finished()
        atomic_write_json(os.path.join(tmp, CONFIG_FILE),
                          {"hf_config": hf_config, "dtype": dtype, "fp8_weights": fp8_weights,
                           "format_version": FORMAT_VERSION})
        files = _file_sizes(tmp)
        if add_files is not None:
            add_files(tmp)
        source_files = _file_stamps(os.path.abspath(source)) if source else None
        atomic_write_json(os.path.join(tmp, MANIFEST_FILE), {
            "format_version": FORMAT_VERSION, "dtype": dtype,
            "source": {"path": os.path.abspath(source), "files": source_files} if source else None,
            "files": files,
        }, indent=1)
        return _move_into_place(tmp, path, replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when it was moved into place


def check_replaceable(path: str | os.PathLike) -> None:
    """`save_checkpoint` may replace `path`: it is absent, an empty folder or a checkpoint.
    Anything else is the user's and is never deleted."""
    if os.path.exists(path) and not (os.path.isdir(path) and (not os.listdir(path) or looks_like_checkpoint(path))):
        raise FileExistsError(f"{path} exists and is not a jaxserve checkpoint; give a new or empty folder")


def verify_checkpoint(path: str) -> dict:
    """The manifest of the checkpoint at `path`, once every file it lists is there with its
    recorded size: a quick check that catches truncated and missing files before orbax does."""
    if not os.path.isfile(os.path.join(path, MANIFEST_FILE)):
        raise CheckpointError(f"no {MANIFEST_FILE}: the checkpoint is unfinished or was written by an older jaxserve")
    manifest = _read_json(path, MANIFEST_FILE)
    _check_format(path, manifest)
    for name, size in manifest["files"].items():
        try:
            actual = os.path.getsize(os.path.join(path, name))
        except OSError:
            raise CheckpointError(f"{name} is missing") from None
        if actual != size:
            raise CheckpointError(f"{name} has {actual} bytes, the manifest says {size}")
    return manifest


def load_checkpoint(path: str, *, dtype=None, attention_backend: str = "auto",
                    fp8_weights: str = "auto") -> tuple[nnx.Module, dict]:
    """Restore a model saved by `save_checkpoint`; returns (model, hf_config). Raises
    CheckpointError when the folder does not match its manifest, or its config or data cannot
    be read. Block-FP8 weights saved kept are dequantized when `fp8_weights` resolves to
    "dequantize"; weights saved dequantized stay so."""
    path = os.path.abspath(path)
    verify_checkpoint(path)
    meta = _read_json(path, CONFIG_FILE)
    _check_format(path, meta)
    try:
        config = ModelConfig.from_hf(meta["hf_config"])
        saved_dtype = jnp.dtype(meta["dtype"])
        saved_fp8 = resolve_fp8_weights(meta.get("fp8_weights", "dequantize"))
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{CONFIG_FILE} is damaged: {error_summary(error)}") from None
    graphdef, state = abstract_model(config, dtype=saved_dtype, attention_backend=attention_backend,
                                     fp8_weights=saved_fp8)
    # Onto this process's first device: under multi-host every process restores its own copy
    # (orbax would otherwise place arrays as saved, on the saving process's device).
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = _stringify_keys(jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=local),
                                          nnx.to_pure_dict(state)))
    restored = _restore_state(os.path.join(path, "state"), target)
    nnx.replace_by_pure_dict(state, _restore_int_keys(restored))
    model = nnx.merge(graphdef, state)
    if dtype is not None and jnp.dtype(dtype) != saved_dtype:
        cast_params(model, dtype)
    if saved_fp8 == "keep" and resolve_fp8_weights(fp8_weights) == "dequantize":
        model = dequantize_model(model, attention_backend)
    return model, meta["hf_config"]


def dequantize_model(model: nnx.Module, attention_backend: str = "auto") -> nnx.Module:
    """The same weights in the model built without block-FP8 layers (a checkpoint saved with fp8
    kept, restored where fp8 is dequantized): each kernel, and each stacked expert weight, dequantized
    on its own."""
    dtype = model.embed_tokens.weight.dtype
    graphdef, state = abstract_model(model.config, dtype=dtype, attention_backend=attention_backend,
                                     moe_backend=model.moe_backend, layout=model.layout, fp8_weights="dequantize")
    source = dict(nnx.to_flat_state(nnx.state(model)))
    values = {}
    block = expert_quant(model.config).kernel_block
    for path, _ in nnx.to_flat_state(state):
        values[path] = source[path].get_value()
        scale = source.get(path[:-1] + ("kernel_scale",)) if path[-1] == "kernel" else (
            source.get(path[:-1] + (path[-1] + "_scale",)))  # stacked experts: <name>_scale
        if scale is not None and values[path].ndim == 2:
            values[path] = dequantize(values[path], scale.get_value(), block, dtype)
        elif scale is not None:
            values[path] = dequantize_expert_weight(values[path], scale.get_value(), block, dtype)
    return merge_values(graphdef, state, values)


def error_summary(error: BaseException, limit: int = 400) -> str:
    """`Type: first line` of the error's root cause, in one line: orbax wraps the telling error
    (`OUT_OF_RANGE: Error reading "layers.21.mlp.up_proj.kernel/0.0" ...`) in one whose message
    is a page of TensorStore spec."""
    while error.__cause__ is not None or (error.__context__ is not None and not error.__suppress_context__):
        error = error.__cause__ or error.__context__
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def remove_checkpoint(path: str) -> None:
    """Rename the folder aside (`<name>.corrupt-<time>`), which frees its path at once (a process
    still reading it keeps its open files), then delete it: a cache can be converted again, and
    copies of a large model kept after each failure would fill the disk. The aside folder stays
    only where it could not be deleted."""
    aside = f"{path}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:  # another process got there first
        return
    shutil.rmtree(aside, ignore_errors=True)


def _move_into_place(tmp: str, path: str, replace: bool) -> bool:
    try:
        os.rename(tmp, path)  # atomic; replaces an empty folder, fails on a non-empty one
        return True
    except OSError:
        if not os.path.isdir(path):
            raise
    if not replace:
        return False
    check_replaceable(path)
    old = _temporary_sibling(path)
    os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return True


def _temporary_sibling(path: str) -> str:
    """A hidden folder beside `path` (same file system, so a rename moves it), named after this
    host and process so that `_remove_abandoned_folders` can tell when its writer died."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.tmp.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}")


def _remove_abandoned_folders(path: str) -> None:
    """Delete temporary folders for `path` left by processes of this host that have died (a
    conversion killed half-way would otherwise leave a model-sized folder behind)."""
    folder, name = os.path.split(path)
    prefix = f".{name}.tmp."
    for entry in os.listdir(folder):
        if not entry.startswith(prefix):
            continue
        host, _, pid = entry[len(prefix):].rpartition(".")[0].rpartition(".")
        if host == socket.gethostname() and pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(os.path.join(folder, entry), ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


def _file_sizes(folder: str) -> dict[str, int]:
    sizes = {}
    for root, _, names in os.walk(folder):
        for name in names:
            full = os.path.join(root, name)
            sizes[os.path.relpath(full, folder)] = os.path.getsize(full)
    return dict(sorted(sizes.items()))


def _check_format(path: str, meta: dict) -> None:
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format_version')}, expected {FORMAT_VERSION}")


def _read_json(folder: str, name: str) -> dict:
    try:
        with open(os.path.join(folder, name)) as f:
            return json.load(f)
    except (OSError, ValueError) as error:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{name} is unreadable: {error}") from None


def _restore_state(path: str, target):
    """orbax's restore, its failure summarized in one line. orbax reads arrays concurrently:
    when one read fails, the others are abandoned, and each reported itself as it ended or was
    collected, a page of traceback each ("Exception ignored in: <coroutine ...>", "Task
    exception was never retrieved", "Event loop is closed"): they are let finish here, silenced."""
    import orbax.checkpoint as ocp

    with _quiet_orbax(path) as dropped:
        try:
            return ocp.StandardCheckpointer().restore(path, target)
        except Exception as error:
            if _out_of_memory(error):  # not the checkpoint's fault
                raise
            failure = error_summary(error)
        _let_abandoned_reads_finish(dropped)  # the error and its frames are released by now
    raise CheckpointError(f"state/ could not be read: {failure}")


def _out_of_memory(error: BaseException | None) -> bool:
    while error is not None:
        if isinstance(error, MemoryError) or "RESOURCE_EXHAUSTED" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _let_abandoned_reads_finish(dropped: list[float], quiet_s: float = 0.3, limit_s: float = 3.0) -> None:
    """Collect garbage until no abandoned read has reported for `quiet_s` (at most `limit_s`)."""
    start = time.monotonic()
    while time.monotonic() - start < limit_s:
        gc.collect()
        if time.monotonic() - max(dropped, default=start) >= quiet_s:
            return
        time.sleep(0.05)


_RETIRED_HOOKS: list = []


@contextlib.contextmanager
def _quiet_orbax(path: str | None = None):
    """orbax narrates every save and restore in some 30 INFO lines (through absl's logger):
    kept to its warnings and errors. Reports of abandoned reads (of `path`) are dropped; yields
    the times they came."""
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(max(level, logging.WARNING))
    dropped: list[float] = []
    hook = sys.unraisablehook

    def drop_abandoned_reads(unraisable):
        code = getattr(unraisable.object, "cr_code", None)
        if "orbax" in getattr(code, "co_filename", "") or str(unraisable.exc_value) == "Event loop is closed":
            dropped.append(time.monotonic())
        else:
            hook(unraisable)

    def drop_abandoned_tasks(record: logging.LogRecord) -> bool:
        if _raised_in_orbax(record) or (path is not None and os.fspath(path) in record.getMessage()):
            dropped.append(time.monotonic())
            return False
        return True

    asyncio_logger = logging.getLogger("asyncio")
    # CPython 3.12 calls the hook through a borrowed reference: a TensorStore thread may still be
    # inside this closure when the context ends and the main thread puts `hook` back. Kept alive
    # for the process (a few bytes per restore), it is never freed under that thread (a segfault
    # seen once in CI's suite).
    _RETIRED_HOOKS.append(drop_abandoned_reads)
    sys.unraisablehook = drop_abandoned_reads
    asyncio_logger.addFilter(drop_abandoned_tasks)
    try:
        yield dropped
    finally:
        asyncio_logger.removeFilter(drop_abandoned_tasks)
        sys.unraisablehook = hook
        absl_logger.setLevel(level)


def _raised_in_orbax(record: logging.LogRecord) -> bool:
    """asyncio's "... exception was never retrieved" for an orbax read: the message names orbax's
    coroutine, or (a gathering future's) only its traceback does. (TensorStore's own futures
    name neither: they are known by the checkpoint path in their error.)"""
    if "orbax" in record.getMessage():
        return True
    error = record.exc_info[1] if record.exc_info else None
    while error is not None:
        frames = traceback.extract_tb(error.__traceback__)
        if any("orbax" in frame.filename for frame in frames):
            return True
        error = error.__cause__ or error.__context__
    return False


def cast_params(model: nnx.Module, dtype) -> None:
    """Parameters to `dtype`; fp8 kernels, packed MXFP4 experts and their scales stay as they are."""

    def cast(var: nnx.Variable) -> nnx.Variable:
        value = var.get_value()
        kept = isinstance(var, QuantScale) or value.dtype in (FP8, jnp.uint8)  # fp8, packed MXFP4
        return var if kept else var.replace(value.astype(dtype))

    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(cast, params, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def _stringify_keys(tree):
    if isinstance(tree, dict):
        return {str(k): _stringify_keys(v) for k, v in tree.items()}
    return tree


def _restore_int_keys(tree):
    if isinstance(tree, dict):
        return {int(k) if k.isdigit() else k: _restore_int_keys(v) for k, v in tree.items()}
    return tree
