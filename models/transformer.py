"""The decoder-only skeleton every family shares; a family supplies its feed-forward block."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig
from models.dbo import run_layers
from models.kv_spec import KVCache
from models.layers import Attention, AttentionMetadata, Embedding, Linear, RMSNorm

# (config, layer index, dtype, rngs) -> feed-forward module
FeedForwardFactory = Callable[[ModelConfig, int, jnp.dtype, nnx.Rngs | None], nnx.Module]


class DecoderLayer(nnx.Module):
    def __init__(self, config, layer_idx, make_mlp: FeedForwardFactory, *, dtype, rngs, attention_backend):
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.self_attn = Attention(config, dtype=dtype, rngs=rngs, attention_backend=attention_backend)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.mlp = make_mlp(config, layer_idx, dtype, rngs)

    def __call__(self, x, positions, kv_cache: KVCache, meta: AttentionMetadata):
        x, kv_cache = self.attention_stage(x, positions, kv_cache, meta)
        return self.feed_forward_stage(x, meta.token_mask), kv_cache

    def attention_stage(self, x, positions, kv_cache: KVCache, meta: AttentionMetadata, order=None):
        """x + attention(norm(x)) and the updated cache; `order`: models/dbo.py."""
        with jax.named_scope("attention"):
            attn_out, kv_cache = self.self_attn(self.input_layernorm(x), positions, kv_cache, meta, order)
        return x + attn_out, kv_cache

    def feed_forward_stage(self, x, token_mask, order=None):
        """x + mlp(norm(x)); `order`: models/dbo.py."""
        extra = {} if order is None else {"order": order}
        return x + self.mlp(self.post_attention_layernorm(x), token_mask=token_mask, **extra)


class CausalLM(nnx.Module):
    """Embedding, decoder layers (unrolled: one K and one V array per layer, donated and
    updated in place; a `lax.scan` over layers would copy the cache), final norm, LM head."""

    def __init__(
        self,
        config: ModelConfig,
        make_mlp: FeedForwardFactory,
        *,
        dtype=jnp.float32,
        rngs: nnx.Rngs | None,
        attention_backend: str = "auto",
    ):
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([
            DecoderLayer(config, i, make_mlp, dtype=dtype, rngs=rngs, attention_backend=attention_backend)
            for i in range(config.num_layers)
        ])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.lm_head = (
            None if config.tie_word_embeddings
            else Linear(config.hidden_size, config.vocab_size, ("embed", "vocab"), dtype=dtype, rngs=rngs)
        )
        self.dbo = None  # DualBatchOverlap (models/dbo.py): the layers run as two microbatches

    def __call__(
        self,
        input_ids: jax.Array,
        positions: jax.Array,
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
    ) -> tuple[jax.Array, list[KVCache]]:
        """input_ids, positions [T] -> final hidden states [T, hidden] and the updated caches."""
        x = self.embed_tokens(input_ids)
        if self.dbo is not None and self.dbo.applies(x.shape[0]):
            x, new_caches = run_layers(self.layers, x, positions, kv_caches, meta, self.dbo)
            return self.norm(x), new_caches
        new_caches = []
        for index, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches)):
            with jax.named_scope(f"layer{index}"):
                x, kv_cache = layer(x, positions, kv_cache, meta)
            new_caches.append(kv_cache)
        return self.norm(x), new_caches

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        """[N, hidden] -> float32 logits [N, vocab]."""
        if self.lm_head is None:
            logits = self.embed_tokens.attend(hidden)
        else:
            logits = self.lm_head(hidden)
        return logits.astype(jnp.float32)
