"""Model families by name, and building a model from a config."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from models import llama, moe
from models.config import ModelConfig
from models.kv_spec import KVSpec
from models.transformer import CausalLM

FAMILIES = {"llama": llama, "moe": moe}


def build_model(
    config: ModelConfig,
    *,
    dtype=jnp.float32,
    seed: int | None = 0,
    attention_backend: str = "auto",
) -> CausalLM:
    """A model with random N(0, 0.02) weights (`seed`), or all zeros when `seed` is None."""
    rngs = None if seed is None else nnx.Rngs(seed)
    return FAMILIES[config.family].build(config, dtype=dtype, rngs=rngs, attention_backend=attention_backend)


def abstract_model(config: ModelConfig, *, dtype=jnp.float32, attention_backend: str = "auto"):
    """(graphdef, abstract state): shapes and dtypes only, nothing allocated."""
    model = nnx.eval_shape(
        lambda: build_model(config, dtype=dtype, seed=0, attention_backend=attention_backend)
    )
    return nnx.split(model)


def hf_param_path(config: ModelConfig, name: str) -> tuple[tuple, int | None]:
    return FAMILIES[config.family].hf_param_path(name)


def kv_spec(config: ModelConfig) -> KVSpec:
    """What the family caches per token and layer (models/kv_spec.py)."""
    return FAMILIES[config.family].kv_spec(config)
