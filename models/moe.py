"""Mixture-of-experts family: Mixtral (top-2 softmax), Qwen3-MoE (top-k, `norm_topk_prob`),
Qwen2-MoE (shared expert behind a sigmoid gate, DeepSeek-style).

Routing is computed here in float32; the expert computation goes through the single entry point
`pallas_kernels.moe_ffn`, so kernels and expert parallelism swap in at one place.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels
from models.config import ModelConfig
from models.dbo import CollectiveOrder, after
from models.expert_parallel import ep_moe_ffn, to_physical
from models.layers import DenseMLP, Linear, init_param
from models.llama import _strip_model_prefix, kv_spec  # noqa: F401 - the same cache as Llama
from models.transformer import CausalLM


def top_k(values: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """`jax.lax.top_k` over the last axis (same values, same ids, ties to the lower id) as k
    argmax passes: GSPMD partitions those along a token axis split over devices, while it
    all-gathers top_k's input first (a collective per MoE layer under data parallelism)."""
    column = jnp.arange(values.shape[-1], dtype=jnp.int32)
    picked, ids = [], []
    for _ in range(k):
        best = jnp.argmax(values, axis=-1).astype(jnp.int32)
        picked.append(jnp.take_along_axis(values, best[..., None], axis=-1)[..., 0])
        ids.append(best)
        values = jnp.where(column == best[..., None], -jnp.inf, values)
    return jnp.stack(picked, axis=-1), jnp.stack(ids, axis=-1)


class Experts(nnx.Module):
    """Stacked expert weights: gate_proj, up_proj [E, hidden, I]; down_proj [E, I, hidden]."""

    def __init__(self, num_experts, hidden_size, intermediate_size, *, dtype, rngs):
        self.gate_proj = init_param(rngs, (num_experts, hidden_size, intermediate_size), ("expert", "embed", "mlp"), dtype)
        self.up_proj = init_param(rngs, (num_experts, hidden_size, intermediate_size), ("expert", "embed", "mlp"), dtype)
        self.down_proj = init_param(rngs, (num_experts, intermediate_size, hidden_size), ("expert", "mlp", "embed"), dtype)


class SparseMoEBlock(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, rngs, moe_backend="auto"):
        self.config = config
        self.moe_backend = moe_backend
        hidden = config.hidden_size
        # The router is small and every rank routes its tokens: replicated, not split over ep.
        self.gate = Linear(hidden, config.num_experts, ("embed", None), dtype=dtype, rngs=rngs)
        self.experts = Experts(config.num_experts, hidden, config.moe_intermediate_size, dtype=dtype, rngs=rngs)
        if config.shared_expert_intermediate_size:
            self.shared_expert = DenseMLP(hidden, config.shared_expert_intermediate_size, dtype=dtype, rngs=rngs)
            self.shared_expert_gate = Linear(hidden, 1, ("embed", None), dtype=dtype, rngs=rngs)
        else:
            self.shared_expert = self.shared_expert_gate = None
        # Expert parallelism (models/expert_parallel.enable_expert_parallel sets these): the
        # static layout, the logical -> physical expert map and the last step's expert loads.
        self.ep = None
        self.phys_to_logical = self.replica_table = self.replica_count = self.expert_load = None

    def route(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """-> (top-k expert ids int32 [T, K], weights float32 [T, K])."""
        with jax.named_scope("router"):
            logits = x.astype(jnp.float32) @ self.gate.kernel[...].astype(jnp.float32)
            probs = jax.nn.softmax(logits, axis=-1)
            weights, ids = top_k(probs, self.config.num_experts_per_tok)
            if self.config.norm_topk_prob:
                weights = weights / weights.sum(axis=-1, keepdims=True)
            return ids.astype(jnp.int32), weights

    def __call__(self, x, token_mask=None, order: CollectiveOrder | None = None):
        """`token_mask [T]` (real tokens, not bucket padding) restricts the expert load counts,
        which add up over the calls of one forward (two per step under dual-batch overlap,
        models/dbo.py); the step zeroes them first (jaxserve/eplb.py `reset_loads`). `order`:
        dual-batch overlap's collective order (the expert-parallel stages, models/expert_parallel.py;
        a local block orders its compute as a dense MLP does)."""
        if order is not None and self.ep is None:
            x = after(x, order.attention, order.feed_forward)
        ids, weights = self.route(x)
        if self.ep is not None:
            counted = ids if token_mask is None else jnp.where(token_mask[:, None], ids, self.config.num_experts)
            counts = jnp.bincount(counted.reshape(-1), length=self.config.num_experts).astype(jnp.int32)
            self.expert_load[...] = self.expert_load[...] + counts
            phys = to_physical(ids, self.replica_table[...], self.replica_count[...])
            out = ep_moe_ffn(x, phys, weights, self.experts.gate_proj[...], self.experts.up_proj[...],
                             self.experts.down_proj[...], self.ep, order)
        else:
            out = self._local_ffn(x, ids, weights)
        if order is not None and self.ep is None:
            order.feed_forward = out
        if self.shared_expert is not None:
            gate = jax.nn.sigmoid(self.shared_expert_gate(x).astype(jnp.float32)).astype(x.dtype)
            extra = {} if order is None else {"order": order}
            out = out + gate * self.shared_expert(x, **extra)
        return out

    def _local_ffn(self, x, ids, weights):
        return pallas_kernels.moe_ffn(
            x, ids, weights, self.experts.gate_proj[...], self.experts.up_proj[...],
            self.experts.down_proj[...], backend=self.moe_backend,
        )


def build(config: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None, attention_backend="auto") -> CausalLM:
    moe_layers = set(config.moe_layers)

    def make_mlp(cfg, layer_idx, dtype, rngs):
        if layer_idx in moe_layers:
            return SparseMoEBlock(cfg, dtype=dtype, rngs=rngs)
        return DenseMLP(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, rngs=rngs)

    return CausalLM(config, make_mlp, dtype=dtype, rngs=rngs, attention_backend=attention_backend)


# Mixtral's per-expert names -> ours.
_MIXTRAL_EXPERT_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def hf_param_path(name: str) -> tuple[tuple, int | None]:
    """HF tensor name -> (parameter path, expert index or None).

    Handles Mixtral's `block_sparse_moe.experts.E.w1`, Qwen's `mlp.experts.E.gate_proj` (both
    per-expert, [out, in]) and transformers 5's fused `mlp.experts.gate_up_proj` /
    `mlp.experts.down_proj` (stacked; split by models/weights.py).
    """
    path = tuple("mlp" if p == "block_sparse_moe" else p for p in _strip_model_prefix(name))
    if "experts" in path:
        at = path.index("experts")
        rest = path[at + 1:]
        if rest and isinstance(rest[0], int):  # per-expert layout: experts.E.<proj>.weight
            expert, proj = rest[0], rest[1]
            return path[:at + 1] + (_MIXTRAL_EXPERT_NAMES.get(proj, proj),), expert
    return path, None
