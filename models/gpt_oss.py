"""gpt-oss family (openai/gpt-oss-20b and -120b): transformers' GptOssForCausalLM.

A decoder with the standard K/V cache and three differences from Llama-like models:
- attention: q/k/v/o projections with biases; YaRN rotary over the whole head (`truncate` as the
  config says); layers alternate between a sliding window (`sliding_window` keys, HF's convention:
  the query itself included) and full attention, as `layer_types` lists them; each head has a
  learned sink logit (`sinks`) that joins the softmax's denominator and attends to nothing
  (`pallas_kernels.ragged_paged_attention(..., sinks=)`).
- routing: `mlp.router` (a linear layer with bias) scores the experts; the top-k logits are
  softmaxed into the weights.
- experts: biased gate/up/down projections and a clamped SwiGLU, `(up + 1) * gate *
  sigmoid(alpha * gate)` with gate clamped above at `swiglu_limit` and up to +-`swiglu_limit`
  (`pallas_kernels.moe.ExpertActivation("gpt_oss_clamped")`), through the same expert entry points
  as every MoE (`SparseMoEBlock`), so expert parallelism, EPLB and DBO take it as they are.

Checkpoints store the experts fused and [in, out] (`experts.gate_up_proj` [E, H, 2I] with gate and
up interleaved in its columns, `experts.down_proj` [E, I, H], biases `gate_up_proj_bias` [E, 2I]
and `down_proj_bias` [E, H]); `hf_tensors` hands them to the loader as separate gate and up. The
MXFP4 checkpoints OpenAI ships keep them packed on device where `fp8_weights` resolves to "keep"
(GPU): gate and up split from the packed columns (`_packed_experts`).
Every layer caches K and V; a sliding layer's window is in its KV spec, but the engine keeps all
of its blocks (freeing blocks that left every window is the KV manager's work, not done yet).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config import ModelConfig
from models.deepseek import apply_rotary, rope_tables
from models.kv_spec import KVSpec, LayerKVSpec
from models.layers import Attention, Linear, init_param
from models.layout import ParallelLayout
from models.llama import _strip_model_prefix
from models.moe import SparseMoEBlock, top_k
from models.transformer import CausalLM
from pallas_kernels.moe import ExpertActivation


def layer_windows(config: ModelConfig) -> tuple[int | None, ...]:
    """Each layer's sliding window: `sliding_window` for a "sliding_attention" layer, None (all
    keys) for a "full_attention" one; `sliding_window` everywhere without `layer_types`."""
    kinds = config.layer_types or ("sliding_attention",) * config.num_layers
    return tuple(config.sliding_window if kind == "sliding_attention" else None for kind in kinds)


def rotary(config: ModelConfig) -> tuple[np.ndarray, float]:
    """(inverse frequencies over head_dim, the factor on cos and sin): YaRN as transformers
    computes it (DeepSeek's tables, here over the whole head), or plain RoPE."""
    return rope_tables(dataclasses.replace(config, qk_rope_head_dim=config.head_dim))


class GptOssAttention(Attention):
    """Standard paged attention with an o_proj bias, YaRN rotary, its layer's own window and
    per-head sinks (module doc)."""

    def __init__(self, config: ModelConfig, sliding_window: int | None, *, dtype, rngs, attention_backend="auto",
                 layout: ParallelLayout | None = None):
        super().__init__(config, dtype=dtype, rngs=rngs, attention_backend=attention_backend, layout=layout,
                         sliding_window=sliding_window, o_proj_bias=config.attention_bias)
        self.sinks = init_param(rngs, (config.num_heads,), ("q_heads",), dtype, std=0.5)

    def rotate(self, q, k, positions):
        inv_freq, factor = rotary(self.config)
        return (apply_rotary(q, positions, inv_freq, factor, interleave=False),
                apply_rotary(k, positions, inv_freq, factor, interleave=False))

    def attention_sinks(self, num_heads: int) -> jax.Array:
        """The sinks of the `num_heads` query heads this call sees, float32: all of them, or under
        DP attention with the heads split over tp (models/dp_attention.py) this tp rank's."""
        sinks = self.sinks[...].astype(jnp.float32)
        if num_heads == sinks.shape[0]:
            return sinks
        return jax.lax.dynamic_slice_in_dim(sinks, jax.lax.axis_index("tp") * num_heads, num_heads)


class GptOssMoE(SparseMoEBlock):
    """SparseMoEBlock with gpt-oss's router (`router`: linear with bias, softmax over the top-k
    logits) and biased experts with the clamped SwiGLU."""

    def __init__(self, config: ModelConfig, *, dtype, rngs, moe_backend="auto", layout: ParallelLayout | None = None):
        activation = ExpertActivation("gpt_oss_clamped", alpha=config.swiglu_alpha, limit=config.swiglu_limit)
        super().__init__(config, dtype=dtype, rngs=rngs, moe_backend=moe_backend, layout=layout, expert_bias=True,
                         activation=activation)
        self.gate = None  # the router is `router`, as the checkpoint names it
        self.router = Linear(config.hidden_size, config.num_experts, ("embed", None), bias=True, dtype=dtype,
                             rngs=rngs)

    def route(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """-> (top-k expert ids int32 [T, K], weights float32 [T, K]: softmax of their logits)."""
        with jax.named_scope("router"):
            logits = x.astype(jnp.float32) @ self.router.kernel[...].astype(jnp.float32)
            logits = logits + self.router.bias[...].astype(jnp.float32)
            picked, ids = top_k(logits, self.config.num_experts_per_tok)
            return ids.astype(jnp.int32), jax.nn.softmax(picked, axis=-1)


def build(config: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None, attention_backend="auto",
          moe_backend="auto", layout: ParallelLayout | None = None) -> CausalLM:
    windows = iter(layer_windows(config))

    def make_attention(cfg, dtype, rngs):  # CausalLM builds its layers in order: layer i takes window i
        return GptOssAttention(cfg, next(windows), dtype=dtype, rngs=rngs, attention_backend=attention_backend,
                               layout=layout)

    def make_mlp(cfg, layer_idx, dtype, rngs):
        del layer_idx  # every layer is MoE
        return GptOssMoE(cfg, dtype=dtype, rngs=rngs, moe_backend=moe_backend, layout=layout)

    return CausalLM(config, make_mlp, make_attention=make_attention, dtype=dtype, rngs=rngs,
                    attention_backend=attention_backend, moe_backend=moe_backend, layout=layout)


def kv_spec(config: ModelConfig) -> KVSpec:
    """K and V per token in every layer, each layer with its window."""
    arrays = KVSpec.standard(1, config.num_kv_heads, config.head_dim).layers[0].arrays
    return KVSpec(tuple(LayerKVSpec(arrays, window) for window in layer_windows(config)))


def hf_param_path(name: str, config: ModelConfig | None = None) -> tuple[tuple, int | None]:
    """HF tensor name -> (parameter path, None): names map one to one, the experts' as `hf_tensors`
    renames them (`experts.gate_proj`, `experts.up_proj_bias`, ...)."""
    return _strip_model_prefix(name), None


def hf_tensors(tensors: Iterable[tuple[str, np.ndarray, str]], config: ModelConfig
               ) -> Iterator[tuple[str, np.ndarray, str]]:
    """The checkpoint's (name, array, file) in the layout the loader reads (models/weights.py):
    the fused [in, out] experts split into gate (even columns of `gate_up_proj`) and up (odd
    columns), [E, H, I] each, as `experts.gate_proj` / `experts.up_proj` (placed as they are),
    their biases as `experts.gate_proj_bias` / `experts.up_proj_bias`, and `experts.down_proj`
    [E, I, H] handed over as transformers 5's fused [E, H, I] (which the loader turns back). Other
    tensors pass unchanged. MXFP4 checkpoints' experts arrive here dequantized, already [in, out]
    (models/weights.py), or kept (`_packed_experts`)."""
    experts, hidden, inter = config.num_experts, config.hidden_size, config.moe_intermediate_size
    for name, array, file in tensors:
        stem, _, leaf = name.rpartition(".")
        if stem.endswith("mlp.experts") and leaf in _PACKED:
            yield from _packed_experts(stem, leaf, array, file, config)
            continue
        if not stem.endswith("mlp.experts") or leaf not in ("gate_up_proj", "gate_up_proj_bias", "down_proj"):
            yield name, array, file
            continue
        want = {"gate_up_proj": (experts, hidden, 2 * inter), "gate_up_proj_bias": (experts, 2 * inter),
                "down_proj": (experts, inter, hidden)}[leaf]
        if tuple(array.shape) != want:
            raise ValueError(f"{file}: tensor {name!r} has shape {tuple(array.shape)}, expected {want} from the "
                             "config (gpt-oss experts are stored [in, out], gate and up interleaved)")
        if leaf == "down_proj":
            yield name, np.swapaxes(array, 1, 2), file
            continue
        suffix = "_bias" if leaf.endswith("_bias") else ""
        yield f"{stem}.gate_proj{suffix}", array[..., 0::2], file
        yield f"{stem}.up_proj{suffix}", array[..., 1::2], file


_PACKED = ("gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks", "down_proj_scales")


def _packed_experts(stem: str, leaf: str, array: np.ndarray, file: str, config: ModelConfig
                    ) -> Iterator[tuple[str, np.ndarray, str]]:
    """Kept MXFP4 experts as models/weights.py hands them over: packed uint8 [E, in/2, out] and
    e8m0 scales [E, in/32, out] (pallas_kernels/mxfp4.py). Gate and up are the even and odd
    columns of gate_up's: columns are never packed together, nor share a scale, so the split is
    exact. Named as the experts' parameters (`experts.gate_proj`, `experts.gate_proj_scale`)."""
    experts, hidden, inter = config.num_experts, config.hidden_size, config.moe_intermediate_size
    tensor, kind = leaf.rsplit("_", 1)
    rows, cols = (hidden, 2 * inter) if tensor == "gate_up_proj" else (inter, hidden)
    want = (experts, rows // 2 if kind == "blocks" else rows // 32, cols)
    if tuple(array.shape) != want:
        raise ValueError(f"{file}: tensor {stem}.{tensor}_{kind} has shape {tuple(array.shape)} as kept, expected "
                         f"{want} from the config (gpt-oss MXFP4 experts kept [in/2, out] packed, scales "
                         "[in/32, out])")
    suffix = "" if kind == "blocks" else "_scale"
    if tensor == "down_proj":
        yield f"{stem}.down_proj{suffix}", array, file
        return
    yield f"{stem}.gate_proj{suffix}", np.ascontiguousarray(array[..., 0::2]), file
    yield f"{stem}.up_proj{suffix}", np.ascontiguousarray(array[..., 1::2]), file
