"""EAGLE-3 draft heads (Li et al. 2025, "EAGLE-3: Scaling up Inference Acceleration of Large
Language Models via Training-Time Test"), in the published checkpoint format.

A head drafts the target's next tokens from the target's own hidden states. One decoder layer
whose attention reads `[input_layernorm(embed(next token)), hidden_norm(feature)]` (2H wide);
the feature of a target position is `fc` of the residual streams entering three of the target's
layers (low, middle, high), concatenated; the head's output hidden state (before its final norm)
is the feature of its next draft step. Its LM head covers a smaller draft vocabulary, mapped to
the target's by `d2t` (target id = draft id + d2t[draft id]).

The folder (yuhuili/EAGLE3-*, the format vLLM and SGLang load): `config.json` with
`architectures` ["LlamaForCausalLMEagle3"], the Llama fields of its one layer, `draft_vocab_size`
and, optionally, `eagle_config.eagle_aux_hidden_state_layer_ids` (vLLM's default otherwise: 2,
L // 2, L - 3 of an L-layer target); safetensors with

    fc.weight [H, 3H]                       midlayer.self_attn.{q,k,v}_proj.weight [*, 2H]
    midlayer.input_layernorm.weight         midlayer.self_attn.o_proj.weight
    midlayer.hidden_norm.weight             midlayer.mlp.{gate,up,down}_proj.weight
    midlayer.post_attention_layernorm.weight
    norm.weight   lm_head.weight [draft_vocab, H]   d2t [draft_vocab]   t2d [vocab] (unused)
    embed_tokens.weight (optional: the target's embedding otherwise)

(`layers.0.` is read as `midlayer.`). Drafts are the head's argmax: one-hot proposals, which the
verifier accepts exactly (jaxserve/spec_decode/rejection_sampler.py).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config import ModelConfig
from models.kv_spec import KVCache, KVSpec, LayerKVSpec
from models.layers import Attention, AttentionMetadata, DenseMLP, Embedding, Linear, RMSNorm
from models.weights import WeightError, iter_safetensors, merge_values

ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM")


@dataclasses.dataclass(frozen=True)
class Eagle3Config:
    layer: ModelConfig  # the one decoder layer (Llama fields; vocab_size: the target's)
    draft_vocab_size: int
    aux_layers: tuple[int, ...]  # target layers whose input residual streams feed `fc`, in this order
    target_hidden_size: int

    @classmethod
    def from_hf(cls, hf: dict, target: ModelConfig) -> Eagle3Config:
        architecture = (hf.get("architectures") or [None])[0]
        if architecture not in ARCHITECTURES:
            raise ValueError(f"speculative_config.model: an EAGLE-3 head's config.json names architectures "
                             f"{list(ARCHITECTURES)}, got {architecture!r}")
        layer = ModelConfig.from_hf({**hf, "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1,
                                     "vocab_size": target.vocab_size, "tie_word_embeddings": False})
        num_layers = target.num_layers
        ids = (hf.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
        ids = tuple(ids) if ids else (2, num_layers // 2, num_layers - 3)
        if len(ids) != 3 or not all(isinstance(i, int) and 0 <= i < num_layers for i in ids):
            raise ValueError(f"speculative_config.model: eagle_aux_hidden_state_layer_ids must be three layers of "
                             f"the target's {num_layers}, got {list(ids)} (set it in the head's config.json)")
        if layer.hidden_size != target.hidden_size:
            raise ValueError(f"speculative_config.model: the head's hidden_size ({layer.hidden_size}) must be the "
                             f"target's ({target.hidden_size})")
        return cls(layer, int(hf.get("draft_vocab_size") or target.vocab_size), ids, target.hidden_size)


class Eagle3Layer(nnx.Module):
    """A Llama decoder layer whose q/k/v projections read 2H: the normed embedding and feature."""

    def __init__(self, config: ModelConfig, *, dtype, rngs, attention_backend: str, sliding_window: int | None):
        hidden = config.hidden_size
        self.input_layernorm = RMSNorm(hidden, config.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.hidden_norm = RMSNorm(hidden, config.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.self_attn = Attention(config, dtype=dtype, rngs=rngs, attention_backend=attention_backend,
                                   sliding_window=sliding_window)
        q_size, kv_size = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        self.self_attn.q_proj = Linear(2 * hidden, q_size, (None, "q_heads"), dtype=dtype, rngs=rngs)
        self.self_attn.k_proj = Linear(2 * hidden, kv_size, (None, "kv_heads"), dtype=dtype, rngs=rngs)
        self.self_attn.v_proj = Linear(2 * hidden, kv_size, (None, "kv_heads"), dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(hidden, config.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.mlp = DenseMLP(hidden, config.intermediate_size, dtype=dtype, rngs=rngs)


class Eagle3Head(nnx.Module):
    """The draft head. `sliding_window`: the keys its attention may read (the target's KV group
    whose blocks its cache shares; None: all)."""

    def __init__(self, config: Eagle3Config, *, dtype=jnp.float32, rngs: nnx.Rngs | None, attention_backend="auto",
                 sliding_window: int | None = None, own_embedding: bool = False):
        layer = config.layer
        self.aux_layers = config.aux_layers
        self.fc = Linear(3 * config.target_hidden_size, layer.hidden_size, (None, "embed"), dtype=dtype, rngs=rngs)
        self.midlayer = Eagle3Layer(layer, dtype=dtype, rngs=rngs, attention_backend=attention_backend,
                                    sliding_window=sliding_window)
        self.norm = RMSNorm(layer.hidden_size, layer.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.lm_head = Linear(layer.hidden_size, config.draft_vocab_size, ("embed", None), dtype=dtype, rngs=rngs)
        self.d2t = nnx.Variable(jnp.zeros((config.draft_vocab_size,), jnp.int32))
        self.embed_tokens = (Embedding(layer.vocab_size, layer.hidden_size, dtype=dtype, rngs=rngs)
                             if own_embedding else None)
        self.kv_layer = KVSpec.standard(1, layer.num_kv_heads, layer.head_dim, sliding_window).layers[0]

    def project(self, model, captured: jax.Array) -> jax.Array:
        """The target's captured streams [T, 3H] -> the first pass's features [T, H]."""
        del model
        return self.fc(captured)

    def __call__(self, model, feature, next_ids, positions, kv_cache: KVCache, meta: AttentionMetadata):
        """Features [T, H] of positions p and the tokens at p + 1 -> (the head's hidden states [T, H],
        the updated cache); the hidden state at p drafts the token at p + 2."""
        layer = self.midlayer
        embed = (self.embed_tokens or model.embed_tokens)(next_ids).astype(feature.dtype)
        joined = jnp.concatenate([layer.input_layernorm(embed), layer.hidden_norm(feature)], axis=-1)
        attn_out, kv_cache = layer.self_attn(joined, positions, kv_cache, meta)
        x = feature + attn_out
        return x + layer.mlp(layer.post_attention_layernorm(x)), kv_cache

    def draft_tokens(self, model, hidden: jax.Array) -> jax.Array:
        """Hidden states [N, H] -> the drafted target token ids [N]."""
        del model
        logits = jax.lax.dot_general(self.norm(hidden), self.lm_head.kernel[...], (((1,), (0,)), ((), ())),
                                     preferred_element_type=jnp.float32)
        ids = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return ids + self.d2t[...][ids]


def load_eagle3(folder: str | os.PathLike, target: ModelConfig, *, dtype=jnp.float32, attention_backend="auto",
                sliding_window: int | None = None) -> Eagle3Head:
    """The head in `folder` (see the module docstring), for `target`; errors name the tensor."""
    with open(os.path.join(folder, "config.json")) as f:
        config = Eagle3Config.from_hf(json.load(f), target)
    tensors = {name: (array, file) for name, array, file in iter_safetensors(folder)}
    head = nnx.eval_shape(lambda: Eagle3Head(
        config, dtype=dtype, rngs=nnx.Rngs(0), own_embedding="embed_tokens.weight" in tensors,
        attention_backend=attention_backend, sliding_window=sliding_window))
    graphdef, state = nnx.split(head)
    wanted = {tuple(path): var for path, var in nnx.to_flat_state(state)}
    values = {}
    for name, (array, file) in tensors.items():
        path = _param_path(name)
        if path is None:
            continue
        if path not in wanted:
            raise WeightError(f"{file}: tensor {name!r} is not part of an EAGLE-3 head")
        values[path] = _converted(path, np.asarray(array), wanted[path], name, file, target.vocab_size, dtype)
    if ("d2t",) not in values:
        if config.draft_vocab_size != target.vocab_size:
            raise WeightError(f"{folder}: a draft vocabulary of {config.draft_vocab_size} (not the target's "
                              f"{target.vocab_size}) needs the d2t mapping")
        values[("d2t",)] = jnp.zeros((config.draft_vocab_size,), jnp.int32)
    missing = sorted(".".join(map(str, p)) for p in wanted if p not in values)
    if missing:
        raise WeightError(f"{folder}: the EAGLE-3 head lacks {', '.join(missing)}")
    return merge_values(graphdef, state, values)


def _param_path(name: str) -> tuple | None:
    """A published tensor name -> its parameter path here (None: not loaded)."""
    if name == "t2d":  # the target -> draft vocabulary mask: greedy drafts do not need it
        return None
    if name == "d2t":
        return ("d2t",)
    name = name.removeprefix("model.")
    if name.startswith("layers.0."):
        name = "midlayer." + name[len("layers.0."):]
    parts = tuple(name.split("."))
    if parts[-1] == "weight" and (parts[-2].endswith("_proj") or parts[:-1] in (("fc",), ("lm_head",))):
        parts = parts[:-1] + ("kernel",)
    return parts


def _converted(path, array, var, name, file, vocab_size, dtype):
    """A stored tensor in this parameter's layout (Linear weights transposed), shape-checked."""
    if path == ("d2t",):
        ids = np.arange(array.shape[0]) + array
        if array.shape != var.shape or ids.min() < 0 or ids.max() >= vocab_size:
            raise WeightError(f"{file}: d2t must map {var.shape[0]} draft ids into the target's vocabulary of "
                              f"{vocab_size}")
        return jnp.asarray(array, jnp.int32)
    if path[-1] == "kernel":
        array = array.T
    if array.shape != var.shape:
        raise WeightError(f"{file}: tensor {name!r} has shape {tuple(np.shape(array))}, expected "
                          f"{tuple(var.shape)[::-1] if path[-1] == 'kernel' else tuple(var.shape)}")
    return jnp.asarray(array, dtype)
