"""Mixture-of-experts family: Mixtral (top-2 softmax), Qwen3-MoE (top-k, `norm_topk_prob`),
Qwen2-MoE (shared expert behind a sigmoid gate). DeepSeek's router and ungated shared experts
build on SparseMoEBlock (models/deepseek.py).

Routing is computed here in float32; the expert computation goes through the single entry point
`pallas_kernels.moe_ffn`, or with a layout that has `expert_parallel` options (models/layout.py)
through `models.expert_parallel.ep_moe_ffn` over physical expert slots. Block-FP8 checkpoints
kept as fp8 (models/quantization.py) keep their experts fp8 too, 1 byte per weight, and MXFP4
checkpoints kept keep them packed, 4.25 bits per weight: both entry points take the experts'
scales, and their biases and activation where a family has them (gpt-oss, models/gpt_oss.py):
`Experts.ffn_options()`.
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
from models.quantization import (E8M0_ONE, FP8, MXFP4, BlockFP8, QuantScale, expert_quant, linear_quant, quantize,
                                 scale_shape)
from models.llama import _strip_model_prefix, kv_spec  # noqa: F401 - the same cache as Llama
from models.transformer import CausalLM
from pallas_kernels.moe import SWIGLU, ExpertActivation


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
    slot count: the experts, then (expert parallelism) zero-filled slots up to the physical count.

    With `quant` (block-FP8 kept, models/quantization.py) each weight is float8_e4m3fn and
    `<name>_scale` (a QuantScale) holds its float32 block scales [S, ceil(in/bi), ceil(out/bo)]
    (padding slots: unit scales). The scales are not split over tensor parallelism (a shard of
    the weight need not start on a block), only over the expert slots, like the weights.

    With `quant` MXFP4 (gpt-oss's checkpoints kept) each weight is packed uint8 [S, in/2, out] and
    `<name>_scale` its uint8 e8m0 scales [S, in/32, out] (pallas_kernels/mxfp4.py; padding slots:
    zero codes, unit scales); random builds draw uniform codes at scale 2^-7 (std about 0.023).

    With `bias` (gpt-oss) each projection has a bias `<name>_bias`: [S, I] for gate and up, [S,
    hidden] for down (plain dtype, also when the weights are fp8; padding slots zero).
    `activation` is the gated activation the experts apply (SwiGLU by default)."""

    NAMES = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, num_experts, hidden_size, intermediate_size, *, dtype, rngs, num_slots=None,
                 quant: BlockFP8 | MXFP4 | None = None, bias: bool = False, activation: ExpertActivation = SWIGLU):
        self.quant = quant
        self.activation = activation
        slots = num_slots or num_experts
        shapes = {"gate_proj": ((hidden_size, intermediate_size), ("expert", "embed", "mlp")),
                  "up_proj": ((hidden_size, intermediate_size), ("expert", "embed", "mlp")),
                  "down_proj": ((intermediate_size, hidden_size), ("expert", "mlp", "embed"))}
        for name, (shape, axes) in shapes.items():
            if isinstance(quant, MXFP4):
                weight, scale = _mxfp4_experts(rngs, (num_experts, *shape))
                setattr(self, name, _padded(nnx.Param(weight, logical_axes=axes), slots, 0))
                setattr(self, name + "_scale", _padded(QuantScale(scale, logical_axes=("expert", None, None)), slots,
                                                       E8M0_ONE))
                continue
            param = init_param(rngs, (num_experts, *shape), axes, dtype if quant is None else jnp.float32)
            if quant is None:
                setattr(self, name, _padded(param, slots, 0))
                continue
            if rngs is None:
                weight = jnp.zeros(param.shape, FP8)
                scale = jnp.ones(scale_shape(param.shape, quant.kernel_block), jnp.float32)
            else:
                weight, scale = quantize(param[...], quant.kernel_block)
            setattr(self, name, _padded(nnx.Param(weight, logical_axes=axes), slots, 0))
            setattr(self, name + "_scale", _padded(QuantScale(scale, logical_axes=("expert", None, None)), slots, 1))
        self.has_bias = bias
        for name, (shape, axes) in shapes.items() if bias else ():
            bias_param = init_param(rngs, (num_experts, shape[1]), (axes[0], axes[2]), dtype)
            setattr(self, name + "_bias", _padded(bias_param, slots, 0))

    def weights(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        return self.gate_proj[...], self.up_proj[...], self.down_proj[...]

    def scales(self) -> tuple[jax.Array, jax.Array, jax.Array] | None:
        """The block scales of gate_proj, up_proj, down_proj (fp8 kept), else None."""
        if self.quant is None:
            return None
        return self.gate_proj_scale[...], self.up_proj_scale[...], self.down_proj_scale[...]

    def biases(self) -> tuple[jax.Array, jax.Array, jax.Array] | None:
        """The biases of gate_proj, up_proj, down_proj (gpt-oss), else None."""
        if not self.has_bias:
            return None
        return self.gate_proj_bias[...], self.up_proj_bias[...], self.down_proj_bias[...]

    @property
    def scale_block(self) -> tuple[int, int] | None:
        """(rows, columns) of one block of an [in, out] expert weight, or None (plain weights)."""
        return None if self.quant is None else self.quant.kernel_block

    def ffn_options(self) -> dict:
        """What `pallas_kernels.moe_ffn` and `ep_moe_ffn` take besides the weights: block scales,
        biases, activation."""
        return dict(scales=self.scales(), scale_block=self.scale_block, biases=self.biases(),
                    activation=self.activation)

    def slot_params(self) -> list[nnx.Param]:
        """Every parameter stacked over the expert slots (weights, their scales when fp8, their
        biases): what moves with an expert (EPLB, jaxserve/eplb.py)."""
        names = self.NAMES if self.quant is None else self.NAMES + tuple(n + "_scale" for n in self.NAMES)
        names += tuple(n + "_bias" for n in self.NAMES) if self.has_bias else ()
        return [getattr(self, name) for name in names]


def _mxfp4_experts(rngs: nnx.Rngs | None, shape: tuple[int, int, int]) -> tuple[jax.Array, jax.Array]:
    """(packed uint8 [E, in/2, out], e8m0 scales [E, in/32, out]) of MXFP4 experts of `shape`
    [E, in, out]: uniform random codes at scale 2^-7, or zeros with unit scales (`rngs` None)."""
    num, rows, cols = shape
    packed_shape, scale_shape_ = (num, rows // 2, cols), (num, -(-rows // 32), cols)
    if rngs is None:
        return jnp.zeros(packed_shape, jnp.uint8), jnp.full(scale_shape_, E8M0_ONE, jnp.uint8)
    packed = jax.random.randint(rngs.params(), packed_shape, 0, 256, jnp.int32).astype(jnp.uint8)
    return packed, jnp.full(scale_shape_, E8M0_ONE - 7, jnp.uint8)


def _padded(param: nnx.Param, slots: int, fill) -> nnx.Param:
    """`param` [E, ...] with slots E..slots-1 appended, filled with `fill`."""
    value = param[...]
    if value.shape[0] == slots:
        return param
    padding = ((0, slots - value.shape[0]),) + ((0, 0),) * (value.ndim - 1)
    return param.replace(jnp.pad(value, padding, constant_values=fill))


class SparseMoEBlock(nnx.Module):
    """Routed experts, plus a gated shared expert where the config has one. With expert
    parallelism (`ep`, from the layout) the experts sit in physical slots split over the dp x ep
    devices; the logical -> physical map (ExpertMap variables, identity when built) and the
    step's per-expert loads (an ExpertLoad variable) are device arrays, so EPLB
    (jaxserve/eplb.py) rebalances by changing inputs, never the compiled step."""

    def __init__(self, config: ModelConfig, *, dtype, rngs, moe_backend="auto", layout: ParallelLayout | None = None,
                 expert_bias: bool = False, activation: ExpertActivation = SWIGLU):
        """`expert_bias` and `activation`: the experts' (Experts; gpt-oss has both)."""
        self.config = config
        self.moe_backend = moe_backend
        hidden = config.hidden_size
        # The router is small and every rank routes its tokens: replicated, not split over ep.
        self.gate = Linear(hidden, config.num_experts, ("embed", None), dtype=dtype, rngs=rngs)
        self.ep = ExpertParallel.for_layout(layout, config.num_experts)
        num_slots = None if self.ep is None else self.ep.num_physical
        self.experts = Experts(config.num_experts, hidden, config.moe_intermediate_size, dtype=dtype, rngs=rngs,
                               num_slots=num_slots, quant=expert_quant(config), bias=expert_bias,
                               activation=activation)
        shared = config.shared_expert_intermediate_size
        shared_quant = linear_quant(config, layout=layout)
        self.shared_expert = DenseMLP(hidden, shared, dtype=dtype, rngs=rngs, quant=shared_quant) if shared else None
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
            out, _, _ = ep_moe_ffn(x, *self.assign(x, token_mask), *self.experts.weights(), self.ep,
                                   **self.experts.ffn_options())
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
        return pallas_kernels.moe_ffn(x, ids, weights, *self.experts.weights(), **self.experts.ffn_options(),
                                      backend=self.moe_backend)

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
        return DenseMLP(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, rngs=rngs,
                        quant=linear_quant(cfg, layout=layout))

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
