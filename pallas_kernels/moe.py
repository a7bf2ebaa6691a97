"""Mixture-of-experts FFN over routed tokens: sort by expert, grouped matmuls, unsort.

The entry point takes already-routed tokens (top-k ids and weights), so routing policy stays in
the model and expert placement (EPLB, expert parallelism) can remap ids before the call.

Expert weights come in the activations' dtype, or block-FP8 (DeepSeek-V3's format, kept as the
checkpoint stores it): float8_e4m3fn [E, in, out] with float32 block scales
[E, ceil(in/bi), ceil(out/bo)] (`scales`, one per projection, `scale_block` = (bi, bo)), the
weight being `w * scale` over each block (the last blocks may be short). The reference
dequantizes the experts inside the step (`dequantize_experts`), then runs its bf16 path; the
Triton kernel reads the fp8 tiles and dequantizes each in the kernel (1 byte per weight read).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.dispatch import choose_moe_kernel
from pallas_kernels.interpret import interpreting

FP8 = jnp.dtype(jnp.float8_e4m3fn)


def moe_ffn(
    x: jax.Array,
    topk_ids: jax.Array,
    topk_weights: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    *,
    scales: tuple[jax.Array, jax.Array, jax.Array] | None = None,
    scale_block: tuple[int, int] | None = None,
    backend: str = "auto",
    interpret: bool = False,
) -> jax.Array:
    """SwiGLU experts: sum_k w_k * down_e(silu(gate_e(x)) * up_e(x)) with e = topk_ids[:, k].

    x [T, H]; topk_ids int32 [T, K]; topk_weights [T, K]; w_gate, w_up [E, H, I];
    w_down [E, I, H]. Block-FP8 weights (module doc) come with `scales` (gate, up, down) and
    `scale_block`. Returns [T, H] in x.dtype.
    """
    check_expert_scales((w_gate, w_up, w_down), scales, scale_block)
    choice = choose_moe_kernel(backend, hidden_size=x.shape[-1], intermediate_size=w_gate.shape[-1],
                               num_experts=w_gate.shape[0], dtype=x.dtype, weight_dtype=w_gate.dtype,
                               scale_block=scale_block)
    if choice.backend == "reference":
        return moe_ffn_reference(x, topk_ids, topk_weights, w_gate, w_up, w_down, scales=scales,
                                 scale_block=scale_block)
    return moe_ffn_pallas(x, topk_ids, topk_weights, w_gate, w_up, w_down, scales=scales, scale_block=scale_block,
                          kernel=choice.backend, interpret=interpret or interpreting())


def check_expert_scales(weights, scales, scale_block) -> None:
    """fp8 expert weights need their block scales, each [E, ceil(in/bi), ceil(out/bo)]."""
    if scales is None:
        if any(jnp.dtype(w.dtype) == FP8 for w in weights):
            raise ValueError("float8_e4m3fn expert weights need their block scales (scales=, scale_block=)")
        return
    if scale_block is None or len(scale_block) != 2 or min(scale_block) < 1:
        raise ValueError(f"scale_block must be two positive sizes (in, out) with scales, got {scale_block}")
    if len(scales) != len(weights):
        raise ValueError(f"scales must hold one array per weight ({len(weights)}), got {len(scales)}")
    for w, s in zip(weights, scales):
        num, rows, cols = w.shape
        want = (num, -(-rows // scale_block[0]), -(-cols // scale_block[1]))
        if tuple(s.shape) != want:
            raise ValueError(f"block scales of weights {tuple(w.shape)} in blocks of {tuple(scale_block)} must have "
                             f"shape {want}, got {tuple(s.shape)}")


def dequantize_experts(w: jax.Array, scale: jax.Array, block: tuple[int, int], dtype, *, row_offset=0,
                       col_offset=0) -> jax.Array:
    """Block-FP8 expert weights w [E, R, C] -> `dtype`: w * scale over each (rows, cols) `block`,
    multiplied in float32 (as the checkpoint defines it; exact in float32).

    `w` may be one tensor-parallel shard of a larger weight: its rows start at `row_offset` and
    its columns at `col_offset` of the weight that `scale` [E, nr, nc] covers (offsets are the
    shard index times the shard's size, traced values allowed)."""
    num, rows, cols = w.shape
    block_rows, block_cols = block
    if rows % block_rows == 0 and cols % block_cols == 0:  # whole blocks (offsets too): a broadcast XLA fuses
        scale = jax.lax.dynamic_slice(scale, (0, row_offset // block_rows, col_offset // block_cols),
                                      (num, rows // block_rows, cols // block_cols))
        blocks = w.astype(jnp.float32).reshape(num, rows // block_rows, block_rows, cols // block_cols, block_cols)
        return (blocks * scale[:, :, None, :, None]).reshape(w.shape).astype(dtype)
    row_block = (row_offset + jnp.arange(rows)) // block_rows
    col_block = (col_offset + jnp.arange(cols)) // block_cols
    full = scale[:, row_block][:, :, col_block]  # each element's block scale (ragged blocks, shard offsets)
    return (w.astype(jnp.float32) * full).astype(dtype)


def dense_experts(weights, scales, scale_block, dtype) -> tuple[jax.Array, ...]:
    """The expert weights in `dtype`: dequantized when they come with block scales, else as given."""
    if scales is None:
        return tuple(weights)
    return tuple(dequantize_experts(w, s, scale_block, dtype) for w, s in zip(weights, scales))


def grouped_matmul_reference(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Rows of `lhs` [M, K] sorted by group times per-group `rhs` [G, K, N] -> [M, N]."""
    return jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32))


def moe_ffn_reference(x, topk_ids, topk_weights, w_gate, w_up, w_down, *, scales=None, scale_block=None):
    check_expert_scales((w_gate, w_up, w_down), scales, scale_block)
    num_tokens, top_k = topk_ids.shape
    num_experts = w_gate.shape[0]
    flat_ids = topk_ids.reshape(-1)
    order = jnp.argsort(flat_ids, stable=True)
    rows = x[order // top_k]  # each (token, k) assignment, grouped by expert
    group_sizes = jnp.bincount(flat_ids, length=num_experts)
    with jax.named_scope("experts"):
        w_gate, w_up, w_down = dense_experts((w_gate, w_up, w_down), scales, scale_block, x.dtype)
        gate = grouped_matmul_reference(rows, w_gate, group_sizes)
        up = grouped_matmul_reference(rows, w_up, group_sizes)
        hidden = jax.nn.silu(gate) * up
        out = grouped_matmul_reference(hidden.astype(w_down.dtype), w_down, group_sizes)
    with jax.named_scope("combine"):
        unsorted = jnp.zeros_like(out).at[order].set(out)
        weighted = unsorted.reshape(num_tokens, top_k, -1) * topk_weights[..., None].astype(out.dtype)
        return weighted.sum(axis=1).astype(x.dtype)


def moe_ffn_pallas(x, topk_ids, topk_weights, w_gate, w_up, w_down, *, scales=None, scale_block=None,
                   kernel="triton", interpret=False):
    """moe_ffn with Pallas grouped matmuls (`kernel`: "triton" or "mosaic"): gate/up fused with
    SiLU-and-multiply, then down. Block-FP8 weights: Triton only."""
    check_expert_scales((w_gate, w_up, w_down), scales, scale_block)
    if kernel == "mosaic":
        if scales is not None:
            raise ValueError("the Mosaic GPU grouped matmul takes no fp8 weights: use kernel='triton'")
        from pallas_kernels.mosaic_grouped_matmul import (
            grouped_matmul_mosaic as grouped_matmul,
            grouped_matmul_swiglu_mosaic as grouped_matmul_swiglu,
        )
    else:
        from pallas_kernels.triton_grouped_matmul import grouped_matmul, grouped_matmul_swiglu

    num_tokens, top_k = topk_ids.shape
    num_experts = w_gate.shape[0]
    flat_ids = topk_ids.reshape(-1)
    order = jnp.argsort(flat_ids, stable=True)
    rows = x[order // top_k]
    group_sizes = jnp.bincount(flat_ids, length=num_experts)
    gate_up, down = {}, {}
    if scales is not None:
        gate_up = dict(scales=scales[:2], scale_block=scale_block)
        down = dict(rhs_scale=scales[2], scale_block=scale_block)
    hidden = grouped_matmul_swiglu(rows, w_gate, w_up, group_sizes, interpret=interpret, **gate_up)
    hidden = hidden.astype(x.dtype if scales is not None else w_down.dtype)
    out = grouped_matmul(hidden, w_down, group_sizes, interpret=interpret, **down)
    unsorted = jnp.zeros_like(out).at[order].set(out)
    weighted = unsorted.reshape(num_tokens, top_k, -1) * topk_weights[..., None].astype(out.dtype)
    return weighted.sum(axis=1).astype(x.dtype)
