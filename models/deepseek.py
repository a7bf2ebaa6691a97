"""DeepSeek family: DeepSeek-V3 / R1 (and Kimi-K2, the same architecture), DeepSeek-V2 / V2-Lite.

Multi-head latent attention (MLA). Each token is compressed to a latent `c_kv` of `kv_lora_rank`
values plus one rotary key of `qk_rope_head_dim` shared by every head; that 576-value row (V3)
is all the cache holds per token and layer. The per-head keys and values are what `kv_b_proj`
expands the latent to: `k_nope_h = c_kv @ W_UK_h`, `v_h = c_kv @ W_UV_h`. Attention runs in the
absorbed form: each head's query is taken into the latent space (`q_nope_h @ W_UK_h^T`) and joined
to its rotary part, the kernel attends over latent rows that all heads share
(pallas_kernels/mla_attention.py), and its output is taken back through `W_UV_h` here.

Routing: scores from a sigmoid (V3) or a softmax (V2); V3 chooses with the scores plus
`e_score_correction_bias` among the `topk_group` best of `n_group` groups (a group ranked by the sum
of its top two), V2 optionally by each group's best score; the weights come from the uncorrected
scores, renormalised when `norm_topk_prob`, times `routed_scaling_factor`. Shared experts are added
ungated; the first `first_k_dense_replace` layers are dense.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import pallas_kernels
from models.config import ModelConfig
from models.dp_attention import run_per_shard
from models.kv_spec import KVArraySpec, KVCache, KVSpec, LayerKVSpec
from models.layers import AttentionMetadata, DenseMLP, Linear, RMSNorm, apply_rope, init_param
from models.layout import ParallelLayout
from models.moe import SparseMoEBlock, hf_param_path as moe_param_path, top_k
from models.quantization import linear_quant
from models.transformer import CausalLM, DecoderLayer

# DeepseekV2/V3's q_a_layernorm and kv_a_layernorm use this eps whatever the config says.
_LATENT_NORM_EPS = 1e-6


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_tables(config: ModelConfig) -> tuple[np.ndarray, float]:
    """(inverse frequencies of the `qk_rope_head_dim` rotary part, the factor on cos and sin):
    plain RoPE, or YaRN as DeepSeek configures it (`factor`, `original_max_position_embeddings`,
    `beta_fast` / `beta_slow`, `mscale` / `mscale_all_dim`)."""
    dim, base = config.qk_rope_head_dim, config.rope_theta
    inv_freq = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq.astype(np.float32), 1.0
    if scaling["rope_type"] != "yarn":
        raise ValueError(f"DeepSeek: unsupported rope_scaling type {scaling['rope_type']!r}; supported: yarn")
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or config.max_position_embeddings / original
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
                            if mscale and mscale_all_dim else _yarn_mscale(factor))
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / ((high - low) or 0.001), 0, 1)
    extrapolation = 1 - ramp
    blended = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
    return blended.astype(np.float32), float(attention_factor)


def softmax_scale(config: ModelConfig) -> float:
    """1/sqrt(qk_nope + qk_rope), times mscale(factor, mscale_all_dim)^2 under YaRN."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    scaling = config.rope_scaling
    if scaling is not None and scaling.get("mscale_all_dim"):
        factor = scaling.get("factor") or config.max_position_embeddings / scaling["original_max_position_embeddings"]
        scale *= _yarn_mscale(factor, scaling["mscale_all_dim"]) ** 2
    return scale


def apply_rotary(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray, factor: float, interleave: bool):
    """RoPE over x [T, H, R]. Interleaved: pairs (x0, x1), (x2, x3), ... each turn by one frequency,
    the result laid out as [turned evens, turned odds] (transformers' V3 layout; V2's complex pairs
    give the same values interleaved, and q . k is the same either way since q and k share it)."""
    if not interleave:
        out = apply_rope(x, positions, inv_freq)
        return out if factor == 1.0 else (out.astype(jnp.float32) * factor).astype(x.dtype)
    angles = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]
    cos = (jnp.cos(angles) * factor)[:, None, :]
    sin = (jnp.sin(angles) * factor)[:, None, :]
    x32 = x.astype(jnp.float32)
    even, odd = x32[..., 0::2], x32[..., 1::2]
    return jnp.concatenate([even * cos - odd * sin, odd * cos + even * sin], axis=-1).astype(x.dtype)


class MLAttention(nnx.Module):
    """Multi-head latent attention over a paged latent cache (module doc). Attribute names are
    the checkpoint's; `attend_heads` / `o_proj` split like the standard Attention's for dual-batch
    overlap (models/dbo.py)."""

    def __init__(self, config: ModelConfig, *, dtype, rngs, attention_backend="auto",
                 layout: ParallelLayout | None = None):
        self.config = config
        self.attention_backend = attention_backend
        hidden, heads = config.hidden_size, config.num_heads
        latent, rope = config.kv_lora_rank, config.qk_rope_head_dim
        qk_dim = config.qk_nope_head_dim + rope
        bias = config.attention_bias
        linear = dict(dtype=dtype, rngs=rngs, quant=linear_quant(config, layout=layout))  # block-FP8 when kept
        if config.q_lora_rank:
            self.q_a_proj = Linear(hidden, config.q_lora_rank, ("embed", None), bias=bias, **linear)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, _LATENT_NORM_EPS, dtype=dtype, rngs=rngs)
            self.q_b_proj = Linear(config.q_lora_rank, heads * qk_dim, (None, "q_heads"), **linear)
            self.q_proj = None
        else:
            self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
            self.q_proj = Linear(hidden, heads * qk_dim, ("embed", "q_heads"), **linear)
        self.kv_a_proj_with_mqa = Linear(hidden, latent + rope, ("embed", None), bias=bias, **linear)
        self.kv_a_layernorm = RMSNorm(latent, _LATENT_NORM_EPS, dtype=dtype, rngs=rngs)
        self.kv_b_proj = Linear(latent, heads * (config.qk_nope_head_dim + config.v_head_dim), (None, "q_heads"),
                                **linear)
        self.o_proj = Linear(heads * config.v_head_dim, hidden, ("q_heads", "embed"), bias=bias, **linear)
        self.dp_mesh = layout.mesh if layout is not None and layout.dp_attention else None

    def __call__(self, x, positions, kv_cache: KVCache, meta: AttentionMetadata):
        heads, kv_cache = self.attend_heads(x, positions, kv_cache, meta)
        return self.o_proj(heads), kv_cache

    def absorbed_weights(self) -> tuple[jax.Array, jax.Array]:
        """kv_b_proj's two halves per head: W_UK [L, H, nope] and W_UV [L, H, v]."""
        cfg = self.config
        w = self.kv_b_proj.dense_kernel().reshape(cfg.kv_lora_rank, cfg.num_heads, cfg.qk_nope_head_dim + cfg.v_head_dim)
        return w[..., :cfg.qk_nope_head_dim], w[..., cfg.qk_nope_head_dim:]

    def attend_heads(self, x, positions, kv_cache: KVCache, meta: AttentionMetadata):
        """-> (attention output [T, heads * v_head_dim] before o_proj, updated cache)."""
        cfg = self.config
        num_tokens = x.shape[0]
        if self.q_proj is not None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.reshape(num_tokens, cfg.num_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
        q_nope, q_rope = q[..., :cfg.qk_nope_head_dim], q[..., cfg.qk_nope_head_dim:]
        compressed = self.kv_a_proj_with_mqa(x)
        c_kv = self.kv_a_layernorm(compressed[:, :cfg.kv_lora_rank])
        k_rope = compressed[:, None, cfg.kv_lora_rank:]
        inv_freq, factor = rope_tables(cfg)
        q_rope = apply_rotary(q_rope, positions, inv_freq, factor, cfg.rope_interleave)
        k_rope = apply_rotary(k_rope, positions, inv_freq, factor, cfg.rope_interleave)[:, 0]
        w_uk, w_uv = self.absorbed_weights()
        with jax.named_scope("absorb_q"):
            q_latent = jnp.einsum("thn,lhn->thl", q_nope, w_uk.astype(q_nope.dtype))
        query = jnp.concatenate([q_latent, q_rope.astype(q_latent.dtype)], axis=-1)
        row = jnp.concatenate([c_kv, k_rope.astype(c_kv.dtype)], axis=-1)
        if self.dp_mesh is None:
            out, kv_cache = self._attend(query, row, kv_cache, meta)
        else:
            out, kv_cache = run_per_shard(self._attend, (query, row), kv_cache, meta, self.dp_mesh)
        with jax.named_scope("unabsorb_v"):
            heads = jnp.einsum("thl,lhv->thv", out, w_uv.astype(out.dtype))
        return heads.reshape(num_tokens, -1), kv_cache

    def _attend(self, query, row, kv_cache: KVCache, meta: AttentionMetadata):
        """Write the new latent rows into the cache, then MLA over it: -> ([T, H, L], cache)."""
        cfg = self.config
        (cache,) = kv_cache.arrays  # models/kv_spec.py: one latent row per token
        scale = kv_cache.scales[0] if kv_cache.scales else None
        cache = pallas_kernels.write_latent_cache(cache, row, meta.slot_mapping, scale)
        out = pallas_kernels.mla_paged_attention(
            query, cache, meta.seq_lens, meta.block_tables, meta.query_start_loc, meta.num_seqs,
            kv_lora_rank=cfg.kv_lora_rank, sm_scale=softmax_scale(cfg), scale=scale,
            backend=self.attention_backend)
        return out, kv_cache.replace(cache)


class Router(nnx.Module):
    """The MoE gate: `kernel` [hidden, experts] and, for V3, `e_score_correction_bias` [experts]
    (added to the scores for choosing only)."""

    def __init__(self, hidden: int, num_experts: int, *, corrected: bool, dtype, rngs):
        self.kernel = init_param(rngs, (hidden, num_experts), ("embed", None), dtype)
        # small random values in random builds, so tests see it act
        self.e_score_correction_bias = (
            init_param(rngs, (num_experts,), (None,), jnp.float32, std=0.05) if corrected else None)


class DeepseekMoE(SparseMoEBlock):
    """SparseMoEBlock with DeepSeek's router (module doc); expert parallelism, EPLB and DBO
    reach it through `route` like any other MoE block."""

    def __init__(self, config: ModelConfig, *, dtype, rngs, moe_backend="auto", layout: ParallelLayout | None = None):
        super().__init__(config, dtype=dtype, rngs=rngs, moe_backend=moe_backend, layout=layout)
        self.gate = Router(config.hidden_size, config.num_experts, corrected=config.topk_method == "noaux_tc",
                           dtype=dtype, rngs=rngs)

    def route(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """-> (top-k expert ids int32 [T, K], weights float32 [T, K])."""
        cfg = self.config
        with jax.named_scope("router"):
            logits = x.astype(jnp.float32) @ self.gate.kernel[...].astype(jnp.float32)
            scores = jax.nn.sigmoid(logits) if cfg.scoring_func == "sigmoid" else jax.nn.softmax(logits, axis=-1)
            choice = scores
            if self.gate.e_score_correction_bias is not None:
                choice = scores + self.gate.e_score_correction_bias[...].astype(jnp.float32)
            if cfg.topk_method != "greedy" and cfg.n_group > 1:
                choice = _keep_best_groups(choice, cfg.n_group, cfg.topk_group, by_top2=cfg.topk_method == "noaux_tc")
            _, ids = top_k(choice, cfg.num_experts_per_tok)
            weights = jnp.take_along_axis(scores, ids, axis=-1)
            if cfg.norm_topk_prob:
                weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
            return ids.astype(jnp.int32), weights * cfg.routed_scaling_factor


def _keep_best_groups(choice: jax.Array, n_group: int, topk_group: int, *, by_top2: bool) -> jax.Array:
    """choice [T, E] with the experts outside each token's `topk_group` best groups at -inf; a
    group ranks by the sum of its top two scores (V3) or by its best (V2)."""
    num_tokens, num_experts = choice.shape
    grouped = choice.reshape(num_tokens, n_group, num_experts // n_group)
    group_scores = top_k(grouped, 2)[0].sum(axis=-1) if by_top2 else grouped.max(axis=-1)
    _, best = top_k(group_scores, topk_group)  # [T, topk_group]
    keep = (best[:, :, None] == jnp.arange(n_group, dtype=best.dtype)).any(axis=1)  # [T, G]
    keep = jnp.repeat(keep, num_experts // n_group, axis=1)
    return jnp.where(keep, choice, -jnp.inf)


class MTPHead(nnx.Module):
    """`shared_head`: the MTP layer's final norm (its LM head is the main model's)."""

    def __init__(self, config: ModelConfig, *, dtype, rngs):
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, rngs=rngs)


class MTPLayer(nnx.Module):
    """DeepSeek-V3's multi-token-prediction module (checkpoint layer `num_hidden_layers + i`): the
    next token's embedding (`enorm`) and the main model's last hidden state (`hnorm`) joined by
    `eh_proj`, one more decoder layer (MLA + MoE), `shared_head.norm`, then the main model's LM
    head. Loaded and kept for speculative decoding, which gives it its own KV cache layer; the
    embedding and head copies the checkpoint repeats are not loaded (the main model's are used)."""

    def __init__(self, config: ModelConfig, layer_idx: int, make_mlp, make_attention, *, dtype, rngs,
                 attention_backend, layout: ParallelLayout | None = None):
        hidden = config.hidden_size
        self.enorm = RMSNorm(hidden, config.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.hnorm = RMSNorm(hidden, config.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.eh_proj = Linear(2 * hidden, hidden, (None, "embed"), dtype=dtype, rngs=rngs,
                              quant=linear_quant(config, layout=layout))
        self.decoder = DecoderLayer(config, layer_idx, make_mlp, dtype=dtype, rngs=rngs,
                                    attention_backend=attention_backend, make_attention=make_attention)
        self.shared_head = MTPHead(config, dtype=dtype, rngs=rngs)
        self.kv_layer = kv_spec(config).layers[0]  # its own cache layer: a latent row per token

    def __call__(self, model: CausalLM, hidden, next_ids, positions, kv_cache: KVCache, meta: AttentionMetadata):
        """Hidden states [T, H] of positions p (the main model's final ones, or this layer's own
        from the draft step before) and the tokens at p + 1 -> (this layer's hidden states [T, H],
        which draft the tokens at p + 2; the MTP layer's updated cache)."""
        joined = jnp.concatenate([self.enorm(model.embed_tokens(next_ids)), self.hnorm(hidden)], axis=-1)
        return self.decoder(self.eh_proj(joined), positions, kv_cache, meta)

    def logits(self, model: CausalLM, hidden) -> jax.Array:
        """This layer's hidden states [N, H] -> float32 logits [N, vocab] (the main model's LM head)."""
        return model.compute_logits(self.shared_head.norm(hidden))

    # The draft-head interface of speculative decoding (jaxserve/spec_decode/draft_head.py).
    aux_layers = None  # reads the main model's final hidden states, not inner layers'

    def project(self, model: CausalLM, captured):
        del model
        return captured

    def draft_tokens(self, model: CausalLM, hidden) -> jax.Array:
        return jnp.argmax(self.logits(model, hidden), axis=-1).astype(jnp.int32)


def build(config: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None, attention_backend="auto",
          moe_backend="auto", layout: ParallelLayout | None = None) -> CausalLM:
    moe_layers = set(config.moe_layers) | set(range(config.num_layers, config.num_layers + config.num_nextn_predict_layers))

    def make_mlp(cfg, layer_idx, dtype, rngs):
        if layer_idx in moe_layers:
            return DeepseekMoE(cfg, dtype=dtype, rngs=rngs, moe_backend=moe_backend, layout=layout)
        return DenseMLP(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, rngs=rngs,
                        quant=linear_quant(cfg, layout=layout))

    def make_attention(cfg, dtype, rngs):
        return MLAttention(cfg, dtype=dtype, rngs=rngs, attention_backend=attention_backend, layout=layout)

    model = CausalLM(config, make_mlp, make_attention=make_attention, dtype=dtype, rngs=rngs,
                     attention_backend=attention_backend, moe_backend=moe_backend, layout=layout)
    if config.num_nextn_predict_layers:
        model.mtp = nnx.List([
            MTPLayer(config, config.num_layers + i, make_mlp, make_attention, dtype=dtype, rngs=rngs,
                     attention_backend=attention_backend, layout=layout)
            for i in range(config.num_nextn_predict_layers)])
    return model


def kv_spec(config: ModelConfig) -> KVSpec:
    """One latent row per token and layer: c_kv then the rotary key (576 values for V3), shared by
    every head, so not split over tensor parallelism."""
    row = KVArraySpec("latent", (config.kv_lora_rank + config.qk_rope_head_dim,), (None,))
    per_head = config.num_heads * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim)
    return KVSpec(tuple(LayerKVSpec((row,)) for _ in range(config.num_layers)),
                  expanded_token_elements=per_head * config.num_layers)


def attention_kernel(config: ModelConfig, requested: str, *, block_size: int, q_dtype, cache_dtype):
    """Which MLA kernel the attention layers run (pallas_kernels/dispatch.py)."""
    return pallas_kernels.choose_mla_kernel(
        requested, num_heads=config.num_heads, kv_lora_rank=config.kv_lora_rank,
        rope_dim=config.qk_rope_head_dim, block_size=block_size, q_dtype=q_dtype, cache_dtype=cache_dtype)


# The MTP layer's copies of the main model's embedding and LM head.
_MTP_SHARED = (("embed_tokens", "weight"), ("shared_head", "head", "weight"))


def hf_param_path(name: str, config: ModelConfig | None = None) -> tuple[tuple | None, int | None]:
    """HF tensor name -> (parameter path, expert index or None): the MoE names (per-expert and
    fused experts), `shared_experts` as our `shared_expert`; layer `num_hidden_layers + i` as MTP
    layer i (`mtp.i`, its decoder parts under `decoder`), whose embedding and head copies map to
    None (not loaded)."""
    path, expert = moe_param_path(name)
    path = tuple("shared_expert" if p == "shared_experts" else p for p in path)
    if config is not None and len(path) > 2 and path[0] == "layers" and path[1] >= config.num_layers:
        rest = path[2:]
        if rest in _MTP_SHARED:
            return None, None
        own = rest[0] in ("enorm", "hnorm", "eh_proj", "shared_head")
        path = ("mtp", path[1] - config.num_layers) + (rest if own else ("decoder",) + rest)
    return path, expert

