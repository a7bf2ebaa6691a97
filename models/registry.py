"""Model families by name, and building a model from a config and a parallel layout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels
from models import deepseek, gpt_oss, llama, moe
from models.config import ModelConfig
from models.kv_spec import KVSpec
from models.layout import ParallelLayout
from models.quantization import E8M0_ONE, QuantScale, config_for_weights
from models.transformer import CausalLM

FAMILIES = {"llama": llama, "moe": moe, "deepseek": deepseek, "gpt_oss": gpt_oss}


def build_model(
    config: ModelConfig,
    *,
    dtype=jnp.float32,
    seed: int | None = 0,
    attention_backend: str = "auto",
    moe_backend: str = "auto",
    layout: ParallelLayout | None = None,
    fp8_weights: str = "auto",
) -> CausalLM:
    """A model with random N(0, 0.02) weights (`seed`), or all zeros when `seed` is None, laid out
    by `layout` (None: one device). Physical expert slots past the logical experts are zeros, so
    with one seed every layout holds the same weights (`with_layout`).

    A block-FP8 `config` (`quant_method` "fp8") is built with its quantized layers keeping fp8
    kernels and block scales when `fp8_weights` resolves to "keep" (models/quantization.py), with
    plain layers otherwise; `model.config` is the config it was built with (no quantization when
    plain)."""
    rngs = None if seed is None else nnx.Rngs(seed)
    config = config_for_weights(config, fp8_weights)
    return FAMILIES[config.family].build(config, dtype=dtype, rngs=rngs, attention_backend=attention_backend,
                                         moe_backend=moe_backend, layout=layout)


def abstract_model(config: ModelConfig, *, dtype=jnp.float32, attention_backend: str = "auto",
                   moe_backend: str = "auto", layout: ParallelLayout | None = None, fp8_weights: str = "auto"):
    """(graphdef, abstract state): shapes and dtypes only, nothing allocated."""
    model = nnx.eval_shape(lambda: build_model(config, dtype=dtype, seed=0, attention_backend=attention_backend,
                                               moe_backend=moe_backend, layout=layout, fp8_weights=fp8_weights))
    return nnx.split(model)


def with_layout(model: CausalLM, layout: ParallelLayout | None) -> CausalLM:
    """`model`'s weights in the same model built with `layout` (`model` is left untouched).

    The laid-out model is built abstractly; each parameter takes `model`'s value, expert weights
    zero-padded to the physical slots where the layout adds them; every other variable (the
    expert map at identity, the expert loads) takes the value a fresh build gives it. Used for
    models loaded from weights, which are built without a layout (models/loader.py). The weight
    format stays `model`'s: its config says whether it keeps fp8 weights."""
    if model.layout == layout:
        return model
    options = dict(dtype=model.embed_tokens.weight.dtype, attention_backend=model.attention_backend,
                   moe_backend=model.moe_backend, layout=layout, fp8_weights="keep")
    abstract = nnx.eval_shape(lambda: build_model(model.config, **options))
    graphdef, abstract_params, _ = nnx.split(abstract, nnx.Param, ...)
    # Small (expert maps and loads): computed for real; the zero parameters of this build are unused.
    rest = jax.jit(lambda: nnx.split(build_model(model.config, seed=None, **options), nnx.Param, ...)[2])()
    params = jax.tree.map(_to_layout, nnx.state(model, nnx.Param), abstract_params,
                          is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdef, params, rest)


def _to_layout(param: nnx.Variable, target: nnx.Variable) -> nnx.Variable:
    """A parameter's value in `target`'s shape: the same, or expert slots appended as zeros (unit
    block scales for fp8 and MXFP4 experts, models.moe.Experts)."""
    value, shape = param[...], target.get_value().shape
    if value.shape != shape:
        axes = param.get_metadata().get("logical_axes") or ()
        if not axes or axes[0] != "expert" or value.shape[1:] != shape[1:] or value.shape[0] > shape[0]:
            raise ValueError(f"parameter of shape {value.shape} (axes {axes}) does not fit the layout's {shape}")
        fill = (E8M0_ONE if value.dtype == jnp.uint8 else 1) if isinstance(param, QuantScale) else 0
        value = jnp.pad(value, ((0, shape[0] - value.shape[0]),) + ((0, 0),) * (value.ndim - 1), constant_values=fill)
    return param.replace(value)


def hf_param_path(config: ModelConfig, name: str) -> tuple[tuple, int | None]:
    """HF tensor name -> (parameter path or None for a tensor the family does not load, expert index or None)."""
    return FAMILIES[config.family].hf_param_path(name, config)


def hf_tensors(config: ModelConfig, tensors):
    """A checkpoint's (name, array, file) tuples in the layout the loader reads: the family's own
    conversion where it has one (gpt-oss's fused, interleaved experts), else as stored."""
    family = FAMILIES[config.family]
    return family.hf_tensors(tensors, config) if hasattr(family, "hf_tensors") else tensors


def kv_spec(config: ModelConfig) -> KVSpec:
    """What the family caches per token and layer (models/kv_spec.py)."""
    return FAMILIES[config.family].kv_spec(config)


def attention_kernel(config: ModelConfig, requested: str, *, block_size: int, q_dtype, cache_dtype):
    """Which kernel the family's attention layers run, and why (pallas_kernels/dispatch.py): the
    family's own choice (MLA) or the ragged paged attention's."""
    family = FAMILIES[config.family]
    if hasattr(family, "attention_kernel"):
        return family.attention_kernel(config, requested, block_size=block_size, q_dtype=q_dtype,
                                       cache_dtype=cache_dtype)
    return pallas_kernels.choose_attention_kernel(
        requested, num_q_heads=config.num_heads, num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
        block_size=block_size, q_dtype=q_dtype, cache_dtype=cache_dtype)
