"""Mixture-of-experts family: Mixtral (top-2 softmax), Qwen3-MoE (top-k, `norm_topk_prob`),
Qwen2-MoE (shared expert behind a sigmoid gate). DeepSeek's router and ungated shared experts
build on SparseMoEBlock (models/deepseek.py).

Routing is computed here in float32; the expert computation goes through the single entry point
`pallas_kernels.moe_ffn`, or with a layout that has `expert_parallel` options (models/layout.py)
through `models.expert_parallel.ep_moe_ffn` over physical expert slots.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels
from models.config import ModelConfig
from models.expert_parallel import ExpertLoad, ExpertMap, ExpertParallel, ep_moe_ffn, identity_map, to_physical
from models.layers import DenseMLP, Linear, init_param
from models.layout import ParallelLayout
from models.quantization import linear_quant
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
    """Stacked expert weights: gate_proj, up_proj [S, hidden, I]; down_proj [S, I, hidden]. S is the
    slot count: the experts, then (expert parallelism) zero-filled slots up to the physical count."""

    def __init__(self, num_experts, hidden_size, intermediate_size, *, dtype, rngs, num_slots=None):
        slots = num_slots or num_experts

        def stacked(shape, axes):
            param = init_param(rngs, (num_experts, *shape), axes, dtype)
            if slots == num_experts:
                return param
            padding = ((0, slots - num_experts),) + ((0, 0),) * len(shape)
            return nnx.Param(jnp.pad(param[...], padding), logical_axes=axes)

        self.gate_proj = stacked((hidden_size, intermediate_size), ("expert", "embed", "mlp"))
        self.up_proj = stacked((hidden_size, intermediate_size), ("expert", "embed", "mlp"))
        self.down_proj = stacked((intermediate_size, hidden_size), ("expert", "mlp", "embed"))

    def weights(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        return self.gate_proj[...], self.up_proj[...], self.down_proj[...]


class SparseMoEBlock(nnx.Module):
    """Routed experts, plus a gated shared expert where the config has one. With expert
    parallelism (`ep`, from the layout) the experts sit in physical slots split over the dp x ep
    devices; the logical -> physical map (ExpertMap variables, identity when built) and the
    step's per-expert loads (an ExpertLoad variable) are device arrays, so EPLB
    (jaxserve/eplb.py) rebalances by changing inputs, never the compiled step."""

    def __init__(self, config: ModelConfig, *, dtype, rngs, moe_backend="auto", layout: ParallelLayout | None = None):
        self.config = config
        self.moe_backend = moe_backend
        hidden = config.hidden_size
        # The router is small and every rank routes its tokens: replicated, not split over ep.
        self.gate = Linear(hidden, config.num_experts, ("embed", None), dtype=dtype, rngs=rngs)
        self.ep = ExpertParallel.for_layout(layout, config.num_experts)
        num_slots = None if self.ep is None else self.ep.num_physical
        self.experts = Experts(config.num_experts, hidden, config.moe_intermediate_size, dtype=dtype, rngs=rngs,
                               num_slots=num_slots)
        shared = config.shared_expert_intermediate_size
        self.shared_expert = (DenseMLP(hidden, shared, dtype=dtype, rngs=rngs, quant=linear_quant(config))
                              if shared else None)
        self.shared_expert_gate = (Linear(hidden, 1, ("embed", None), dtype=dtype, rngs=rngs)
                                   if shared and config.shared_expert_gated else None)
        if self.ep is not None:
            placement = identity_map(config.num_experts, self.ep.num_physical, self.ep.max_replicas)
            self.phys_to_logical = ExpertMap(jnp.asarray(placement["phys_to_logical"]))
            self.replica_table = ExpertMap(jnp.asarray(placement["replica_table"]))
            self.replica_count = ExpertMap(jnp.asarray(placement["replica_count"]))
            self.expert_load = ExpertLoad(jnp.zeros(config.num_experts, jnp.int32))

    def __call__(self, x, token_mask=None):
        """`token_mask [T]` (real tokens, not bucket padding) restricts the expert load counts
        (`assign`)."""
        if self.ep is None:
            out = self.local_ffn(x)
        else:
            out, _, _ = ep_moe_ffn(x, *self.assign(x, token_mask), *self.experts.weights(), self.ep)
        if self.shared_expert is not None:
            out = out + self.shared_gate(x) * self.shared_expert(x)
        return out

    def route(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """-> (top-k expert ids int32 [T, K], weights float32 [T, K])."""
        with jax.named_scope("router"):
            logits = x.astype(jnp.float32) @ self.gate.kernel[...].astype(jnp.float32)
            probs = jax.nn.softmax(logits, axis=-1)
            weights, ids = top_k(probs, self.config.num_experts_per_tok)
            if self.config.norm_topk_prob:
                weights = weights / weights.sum(axis=-1, keepdims=True)
            return ids.astype(jnp.int32), weights

    def assign(self, x, token_mask=None) -> tuple[jax.Array, jax.Array]:
        """Expert parallelism: route, add the real tokens' assignments to the expert loads (which
        add up over the calls of one forward, two per step under dual-batch overlap; the step
        zeroes them first, jaxserve/eplb.py) -> (physical slots int32 [T, K], weights [T, K])."""
        ids, weights = self.route(x)
        counted = ids if token_mask is None else jnp.where(token_mask[:, None], ids, self.config.num_experts)
        counts = jnp.bincount(counted.reshape(-1), length=self.config.num_experts).astype(jnp.int32)
        self.expert_load[...] = self.expert_load[...] + counts
        return to_physical(ids, self.replica_table[...], self.replica_count[...]), weights

    def local_ffn(self, x):
        """The routed experts, all on this device."""
        ids, weights = self.route(x)
        return pallas_kernels.moe_ffn(x, ids, weights, *self.experts.weights(), backend=self.moe_backend)

    def shared_gate(self, x):
        """The shared expert's sigmoid gate per token [T, 1]; 1 where it is ungated (DeepSeek)."""
        if self.shared_expert_gate is None:
            return 1.0
        return jax.nn.sigmoid(self.shared_expert_gate(x).astype(jnp.float32)).astype(x.dtype)


def build(config: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None, attention_backend="auto",
          moe_backend="auto", layout: ParallelLayout | None = None) -> CausalLM:
    moe_layers = set(config.moe_layers)

    def make_mlp(cfg, layer_idx, dtype, rngs):
        if layer_idx in moe_layers:
            return SparseMoEBlock(cfg, dtype=dtype, rngs=rngs, moe_backend=moe_backend, layout=layout)
        return DenseMLP(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, rngs=rngs, quant=linear_quant(cfg))

    return CausalLM(config, make_mlp, dtype=dtype, rngs=rngs, attention_backend=attention_backend,
                    moe_backend=moe_backend, layout=layout)


def moe_blocks(model: nnx.Module) -> list[SparseMoEBlock]:
    """The model's MoE blocks, in layer order; not those of DeepSeek's MTP layers (`mtp`), which the
    forward pass does not run."""
    return [m for path, m in nnx.iter_modules(model) if isinstance(m, SparseMoEBlock) and path[:1] != ("mtp",)]


# Mixtral's per-expert names -> ours.
_MIXTRAL_EXPERT_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def hf_param_path(name: str, config: ModelConfig | None = None) -> tuple[tuple, int | None]:
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
