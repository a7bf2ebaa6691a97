"""The decoder-only skeleton every family shares; a family supplies its feed-forward block and,
if not the standard one, its attention (DeepSeek's MLA).

Built with a parallel layout (models/layout.py), the model runs over its mesh: the layout reaches
every attention layer (DP attention) and, through the family's feed-forward factory, every MoE
block (expert parallelism); with `dbo_min_tokens` the layers run as two microbatches
(models/dbo.py). Without a layout it is the single-device model."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from models import dbo
from models.config import ModelConfig
from models.kv_spec import KVCache
from models.layers import Attention, AttentionMetadata, Embedding, Linear, RMSNorm
from models.layout import ParallelLayout

# (config, layer index, dtype, rngs) -> feed-forward module
FeedForwardFactory = Callable[[ModelConfig, int, jnp.dtype, nnx.Rngs | None], nnx.Module]


# (config, dtype, rngs) -> attention module (standard Attention when a family gives none)
AttentionFactory = Callable[[ModelConfig, jnp.dtype, nnx.Rngs | None], nnx.Module]


class DecoderLayer(nnx.Module):
    def __init__(self, config, layer_idx, make_mlp: FeedForwardFactory, *, dtype, rngs, attention_backend,
                 layout: ParallelLayout | None = None, make_attention: AttentionFactory | None = None):
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, rngs=rngs)
        if make_attention is None:
            self.self_attn = Attention(config, dtype=dtype, rngs=rngs, attention_backend=attention_backend,
                                       layout=layout)
        else:
            self.self_attn = make_attention(config, dtype, rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.mlp = make_mlp(config, layer_idx, dtype, rngs)

    def __call__(self, x, positions, kv_cache: KVCache, meta: AttentionMetadata):
        """x + attention(norm(x)), then + mlp(norm(x)); and the updated cache."""
        with jax.named_scope("attention"):
            attn_out, kv_cache = self.self_attn(self.input_layernorm(x), positions, kv_cache, meta)
        x = x + attn_out
        return x + self.mlp(self.post_attention_layernorm(x), token_mask=meta.token_mask), kv_cache


class CausalLM(nnx.Module):
    """Embedding, decoder layers (unrolled: one K and one V array per layer, donated and
    updated in place; a `lax.scan` over layers would copy the cache), final norm, LM head."""

    def __init__(
        self,
        config: ModelConfig,
        make_mlp: FeedForwardFactory,
        *,
        make_attention: AttentionFactory | None = None,
        dtype=jnp.float32,
        rngs: nnx.Rngs | None,
        attention_backend: str = "auto",
        moe_backend: str = "auto",
        layout: ParallelLayout | None = None,
    ):
        """`make_mlp` receives what the family needs (`moe_backend`, `layout`) from its closure;
        they are kept here too, so that `models.registry.with_layout` can build the same model
        with another layout."""
        self.config = config
        self.attention_backend = attention_backend
        self.moe_backend = moe_backend
        self.layout = layout
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([
            DecoderLayer(config, i, make_mlp, dtype=dtype, rngs=rngs, attention_backend=attention_backend,
                         layout=layout, make_attention=make_attention)
            for i in range(config.num_layers)
        ])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.lm_head = (
            None if config.tie_word_embeddings
            else Linear(config.hidden_size, config.vocab_size, ("embed", "vocab"), dtype=dtype, rngs=rngs)
        )

    def __call__(
        self,
        input_ids: jax.Array,
        positions: jax.Array,
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
        capture: tuple[int, ...] = (),
    ):
        """input_ids, positions [T] -> final hidden states [T, hidden] and the updated caches; with
        `capture` (layer indices), also the residual streams entering those layers, concatenated
        in that order [T, len(capture) * hidden] (an EAGLE-3 draft head's input; the layers then
        run as one batch, without dual-batch overlap)."""
        x = self.embed_tokens(input_ids)
        if not capture and self.layout is not None and dbo.splits(self.layout, x.shape[0]):
            x, new_caches = dbo.run_layers(self.layers, x, positions, kv_caches, meta, self.layout.dp_size)
            return self.norm(x), new_caches
        new_caches, streams = [], {}
        for index, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches)):
            if index in capture:
                streams[index] = x
            with jax.named_scope(f"layer{index}"):
                x, kv_cache = layer(x, positions, kv_cache, meta)
            new_caches.append(kv_cache)
        if capture:
            return self.norm(x), new_caches, jnp.concatenate([streams[i] for i in capture], axis=-1)
        return self.norm(x), new_caches

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        """[N, hidden] -> float32 logits [N, vocab]."""
        if self.lm_head is None:
            logits = self.embed_tokens.attend(hidden)
        else:
            logits = self.lm_head(hidden)
        return logits.astype(jnp.float32)
