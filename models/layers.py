"""Building blocks shared by every model family: linear, norm, embedding, rotary, attention.

Module attribute names mirror Hugging Face's (`self_attn.q_proj`, `input_layernorm`, ...) so
that weight loading is a mechanical walk over the names (models/weights.py). Every parameter
carries `logical_axes` metadata; a rules table maps those to mesh axes when sharding.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import pallas_kernels
from models.config import ModelConfig
from models.dp_attention import attend_per_shard
from models.kv_spec import KVCache
from models.layout import ParallelLayout
from models.quantization import BlockFP8, block_fp8_matmul, dequantize, init_kernel, linear_quant


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    """The step's flat ragged batch, as device arrays (see DESIGN.md, "Model runner").

    slot_mapping [T]: cache slot each new token's K/V is written to (padding -> null block 0).
    query_start_loc [R+1]: row offsets of each sequence's new tokens in the flat batch.
    seq_lens [R]: KV length of each sequence including this step's tokens.
    block_tables [R, W]: blocks of each sequence, W the step's bucketed width.
    num_seqs []: how many of the R rows are real.
    token_mask [T] bool: which tokens are real (not bucket padding); MoE load counts use it.

    With data-parallel attention (models/dp_attention.py) the batch is shard-major over dp
    shards: `query_start_loc [dp, R+1]` and `num_seqs [dp]` per shard, block ids shard-local.

    KV groups (the engine's sliding-window KV manager): layers whose window is in
    `group_windows` keep their cache in pools of their own, with their own slots and tables
    (`group_slot_mapping [G, T]`, `group_block_tables [G, R, W]`); `for_window` gives a layer
    its group's view. `slot_mapping` and `block_tables` are the other layers'.
    """

    slot_mapping: jax.Array
    query_start_loc: jax.Array
    seq_lens: jax.Array
    block_tables: jax.Array
    num_seqs: jax.Array
    token_mask: jax.Array | None = None
    group_slot_mapping: jax.Array | None = None
    group_block_tables: jax.Array | None = None
    group_windows: tuple[int | None, ...] = dataclasses.field(default=(), metadata=dict(static=True))

    def for_window(self, window: int | None) -> AttentionMetadata:
        """The metadata a layer attending over `window` keys reads: its KV group's slots and tables."""
        if window not in self.group_windows:
            return self
        group = self.group_windows.index(window)
        return dataclasses.replace(self, slot_mapping=self.group_slot_mapping[group],
                                   block_tables=self.group_block_tables[group], group_slot_mapping=None,
                                   group_block_tables=None, group_windows=())


def init_param(rngs: nnx.Rngs | None, shape, axes, dtype, std: float = 0.02) -> nnx.Param:
    """A parameter drawn from N(0, std) (zeros when `rngs` is None, for shape-only builds)."""
    if rngs is None:
        value = jnp.zeros(shape, dtype)
    else:
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, logical_axes=tuple(axes))


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); `kernel` is [in, out], the transpose of HF's `weight`.

    With `quant` (a `models.quantization.BlockFP8`) the kernel is float8_e4m3fn and
    `kernel_scale` (a QuantScale) holds its float32 block scales [ceil(in/bi), ceil(out/bo)]; the
    product runs through `models.quantization.block_fp8_matmul`."""

    def __init__(self, in_features, out_features, axes, *, bias=False, dtype, rngs, quant: BlockFP8 | None = None):
        self.quant = quant
        self.dtype = jnp.dtype(dtype)
        if quant is None:
            self.kernel = init_param(rngs, (in_features, out_features), axes, dtype)
        else:
            self.kernel, self.kernel_scale = init_kernel(rngs, (in_features, out_features), axes, quant)
        self.bias = init_param(rngs, (out_features,), axes[1:], dtype) if bias else None

    def __call__(self, x):
        if self.quant is None:
            y = two_row_product(lambda x: x @ self.kernel[...], x)
        else:
            y = block_fp8_matmul(x, self.kernel[...], self.kernel_scale[...], self.quant)
        return y if self.bias is None else y + self.bias[...]

    def dense_kernel(self) -> jax.Array:
        """The [in, out] kernel in the compute dtype (dequantized when quantized): for layers that
        use the weight itself (MLA's absorbed kv_b_proj) rather than the product."""
        if self.quant is None:
            return self.kernel[...]
        return dequantize(self.kernel[...], self.kernel_scale[...], self.quant.kernel_block, self.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, size, eps, *, dtype, rngs):
        self.weight = nnx.Param(jnp.ones((size,), dtype), logical_axes=("norm",))
        if rngs is not None:  # random scales around 1 make tests sensitive to a missing norm
            self.weight[...] = (1 + 0.1 * jax.random.normal(rngs.params(), (size,))).astype(dtype)
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * self.weight[...].astype(jnp.float32)).astype(x.dtype)


class Embedding(nnx.Module):
    def __init__(self, vocab_size, hidden_size, *, dtype, rngs):
        self.weight = init_param(rngs, (vocab_size, hidden_size), ("vocab", "embed"), dtype)

    def __call__(self, ids):
        return self.weight[...][ids]

    def attend(self, x):
        """Tied output projection: float32 logits = x @ weight.T, accumulated in float32. Written
        as one dot_general: XLA:CPU turned a bf16 `x @ weight.T` into a float32 copy of the whole
        weight and an f32 dot, 8.7x slower (35.6 against 4.1 ms for SmolLM2's 49152 x 576 head at
        8 rows, tools/matvec_bench.py's machine)."""
        return two_row_product(lambda x: jax.lax.dot_general(
            x, self.weight[...], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32), x)


def two_row_product(product, x):
    """`product(x)` for x [..., in], with a single 16-bit row padded to two on CPU.

    XLA:CPU rewrites a product of one row into a matrix-vector product that it runs in float32,
    converting the whole bf16 weight on every call; two rows take its bf16 matrix kernel. On the
    2-core EPYC (tools/matvec_bench.py, 30 layers of 576 x 1536): 0.9 GB/s of weights read at one
    row, 10-15 GB/s padded to two; SmolLM2's tied head 56 ms against 3.1 ms. Float32 keeps its
    matrix-vector path, already its fastest (19-30 GB/s)."""
    rows = math.prod(x.shape[:-1])
    if rows != 1 or x.dtype == jnp.float32 or jax.default_backend() != "cpu":
        return product(x)
    padded = jnp.pad(x.reshape(1, x.shape[-1]), ((0, 1), (0, 0)))
    y = product(padded)[:1]
    return y.reshape(x.shape[:-1] + y.shape[-1:])


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Rotary inverse frequencies, with HF's "linear" and "llama3" scaling."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq.astype(np.float32)
    rope_type = scaling["rope_type"]
    if rope_type == "linear":
        return (inv_freq / scaling["factor"]).astype(np.float32)
    if rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise ValueError(f"unsupported rope_scaling type {rope_type!r}; supported: linear, llama3")


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """HF rotate-half RoPE. x [T, H, D], positions [T]."""
    angles = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]
    cos = jnp.cos(angles)[:, None, :]
    sin = jnp.sin(angles)[:, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


class Attention(nnx.Module):
    """Self-attention over the paged KV cache. With a layout that has `dp_attention`, the cache
    write and the paged attention run per dp shard (models/dp_attention.py). Its projections
    keep block-FP8 weights when `config` says so (a model built with fp8 kept,
    `models.quantization.linear_quant`).

    A family changes what differs by subclassing `rotate` (the rotary embedding) and
    `attention_sinks` (per-head sink logits, None here), and through `sliding_window` (this
    layer's window; the config's by default) and `o_proj_bias`."""

    def __init__(self, config: ModelConfig, *, dtype, rngs, attention_backend="auto",
                 layout: ParallelLayout | None = None, sliding_window: int | None | str = "config",
                 o_proj_bias: bool = False):
        self.config = config
        self.attention_backend = attention_backend
        self.sliding_window = config.sliding_window if sliding_window == "config" else sliding_window
        hidden, d = config.hidden_size, config.head_dim
        q_size, kv_size = config.num_heads * d, config.num_kv_heads * d
        linear = dict(dtype=dtype, rngs=rngs, quant=linear_quant(config, layout=layout))
        bias = config.attention_bias
        self.q_proj = Linear(hidden, q_size, ("embed", "q_heads"), bias=bias, **linear)
        self.k_proj = Linear(hidden, kv_size, ("embed", "kv_heads"), bias=bias, **linear)
        self.v_proj = Linear(hidden, kv_size, ("embed", "kv_heads"), bias=bias, **linear)
        self.o_proj = Linear(q_size, hidden, ("q_heads", "embed"), bias=o_proj_bias, **linear)
        if config.qk_norm:
            self.q_norm = RMSNorm(d, config.rms_norm_eps, dtype=dtype, rngs=rngs)
            self.k_norm = RMSNorm(d, config.rms_norm_eps, dtype=dtype, rngs=rngs)
        else:
            self.q_norm = self.k_norm = None
        # DP attention: the mesh whose dp shards each attend against their own slice of the cache.
        self.dp_mesh = layout.mesh if layout is not None and layout.dp_attention else None

    def __call__(self, x, positions, kv_cache, meta: AttentionMetadata):
        heads, kv_cache = self.attend_heads(x, positions, kv_cache, meta)
        return self.o_proj(heads), kv_cache

    def attend_heads(self, x, positions, kv_cache, meta: AttentionMetadata):
        """Everything before the output projection (the tensor-parallel reduction, which dual-batch
        overlap orders apart, models/dbo.py): -> (attention output [T, heads * head_dim], cache)."""
        cfg = self.config
        num_tokens = x.shape[0]
        q = self.q_proj(x).reshape(num_tokens, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x).reshape(num_tokens, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(num_tokens, cfg.num_kv_heads, cfg.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotate(q, k, positions)
        meta = meta.for_window(self.sliding_window)
        if self.dp_mesh is None:
            out, kv_cache = self._attend(q, k, v, kv_cache, meta)
        else:
            out, kv_cache = attend_per_shard(self._attend, q, k, v, kv_cache, meta, self.dp_mesh)
        return out.reshape(num_tokens, -1), kv_cache

    def rotate(self, q, k, positions):
        """RoPE on q [T, Hq, D] and k [T, Hkv, D] (HF's rotate-half, llama3 / linear scaling)."""
        inv_freq = rope_inv_freq(self.config)
        return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)

    def attention_sinks(self, num_heads: int) -> jax.Array | None:
        """Per-head sink logits [num_heads] float32 of the heads this call sees, or None."""
        del num_heads
        return None

    def _attend(self, q, k, v, kv_cache: KVCache, meta: AttentionMetadata):
        """Write the new K/V into the paged cache, then ragged paged attention over it."""
        cfg = self.config
        k_cache, v_cache = kv_cache.arrays  # models/kv_spec.py: K and V per token
        k_scale, v_scale = kv_cache.scales or (None, None)  # an FP8 cache's per-layer scales
        k_cache, v_cache = pallas_kernels.write_kv_cache(
            k_cache, v_cache, k, v, meta.slot_mapping, k_scale, v_scale)
        out = pallas_kernels.ragged_paged_attention(
            q, k_cache, v_cache, meta.seq_lens, meta.block_tables, meta.query_start_loc,
            meta.num_seqs, sm_scale=cfg.head_dim**-0.5, sliding_window=self.sliding_window,
            k_scale=k_scale, v_scale=v_scale, sinks=self.attention_sinks(q.shape[1]), backend=self.attention_backend,
        )
        return out, kv_cache.replace(k_cache, v_cache)


class DenseMLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)); `quant` (block-FP8 weights, Linear) for
    all three projections."""

    def __init__(self, hidden_size, intermediate_size, *, dtype, rngs, quant: BlockFP8 | None = None):
        linear = dict(dtype=dtype, rngs=rngs, quant=quant)
        self.gate_proj = Linear(hidden_size, intermediate_size, ("embed", "mlp"), **linear)
        self.up_proj = Linear(hidden_size, intermediate_size, ("embed", "mlp"), **linear)
        self.down_proj = Linear(intermediate_size, hidden_size, ("mlp", "embed"), **linear)

    def __call__(self, x, token_mask=None):
        """`token_mask` is unused: a dense MLP keeps no per-token statistics."""
        del token_mask
        return self.down_proj(self.hidden(x))

    def hidden(self, x):
        """silu(gate(x)) * up(x): everything before the down projection (the tensor-parallel
        reduction, which dual-batch overlap orders apart, models/dbo.py)."""
        return jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
