"""Mixture-of-experts FFN over routed tokens: sort by expert, grouped matmuls, unsort.

The entry point takes already-routed tokens (top-k ids and weights), so routing policy stays in
the model and expert placement (EPLB, expert parallelism) can remap ids before the call.

Expert weights come in the activations' dtype, or block-FP8 (DeepSeek-V3's format, kept as the
checkpoint stores it): float8_e4m3fn [E, in, out] with float32 block scales
[E, ceil(in/bi), ceil(out/bo)] (`scales`, one per projection, `scale_block` = (bi, bo)), the
weight being `w * scale` over each block (the last blocks may be short). The reference
dequantizes the experts inside the step (`dequantize_experts`), then runs its bf16 path; the
Triton kernel reads the fp8 tiles and dequantizes each in the kernel (1 byte per weight read).
MXFP4 experts (gpt-oss) come packed: uint8 [E, in/2, out] with uint8 e8m0 scales [E, in/32, out]
(pallas_kernels/mxfp4.py; `scale_block` (32, 1)), dequantized in the step by the reference, read
packed by the Triton MXFP4 grouped matmul (W4A16, pallas_kernels/triton_mxfp4_grouped_matmul.py).

Experts may carry biases (gpt-oss: gate, up [E, I] and down [E, H], `biases`) and another gated
activation than SwiGLU (`ExpertActivation`: gpt-oss's clamped SwiGLU). The Pallas path then runs
gate and up as two plain grouped matmuls (the fused SwiGLU kernels take neither), adds the biases
and applies the activation in XLA between them and the down matmul.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.dispatch import choose_moe_kernel
from pallas_kernels.interpret import interpreting
from pallas_kernels.mxfp4 import MXFP4_SCALE_BLOCK, dequantize_packed_experts

FP8 = jnp.dtype(jnp.float8_e4m3fn)
MXFP4 = jnp.dtype(jnp.uint8)  # MXFP4 experts: packed e2m1 codes (pallas_kernels/mxfp4.py)
ACTIVATIONS = ("swiglu", "gpt_oss_clamped")


@dataclasses.dataclass(frozen=True)
class ExpertActivation:
    """The experts' gated activation of (gate, up), elementwise in their dtype:
    - "swiglu": silu(gate) * up (Mixtral, Qwen, DeepSeek);
    - "gpt_oss_clamped": gpt-oss's clamped SwiGLU (transformers' GptOssExperts._apply_gate): gate
      clamped above at `limit`, up to [-limit, limit], then (up + 1) * gate * sigmoid(alpha * gate).
    `alpha` and `limit` are read by "gpt_oss_clamped" only."""

    name: str = "swiglu"
    alpha: float = 1.702
    limit: float = 7.0

    def __post_init__(self):
        if self.name not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.name!r}")

    def __call__(self, gate: jax.Array, up: jax.Array) -> jax.Array:
        if self.name == "swiglu":
            return jax.nn.silu(gate) * up
        gate = jnp.minimum(gate, self.limit)
        up = jnp.clip(up, -self.limit, self.limit)
        return (up + 1) * (gate * jax.nn.sigmoid(gate * self.alpha))


SWIGLU = ExpertActivation()


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
    biases: tuple[jax.Array, jax.Array, jax.Array] | None = None,
    activation: ExpertActivation = SWIGLU,
    backend: str = "auto",
    interpret: bool = False,
) -> jax.Array:
    """Gated experts: sum_k w_k * down_e(act(gate_e(x), up_e(x))) with e = topk_ids[:, k], act
    SwiGLU unless `activation` says otherwise.

    x [T, H]; topk_ids int32 [T, K]; topk_weights [T, K]; w_gate, w_up [E, H, I];
    w_down [E, I, H]. Block-FP8 weights (module doc) come with `scales` (gate, up, down) and
    `scale_block`; biased experts with `biases` (gate, up [E, I]; down [E, H], added before the
    routing weight). Returns [T, H] in x.dtype.
    """
    check_expert_scales((w_gate, w_up, w_down), scales, scale_block)
    check_expert_biases((w_gate, w_up, w_down), biases)
    choice = choose_moe_kernel(backend, hidden_size=x.shape[-1], intermediate_size=w_gate.shape[-1],
                               num_experts=w_gate.shape[0], dtype=x.dtype, weight_dtype=w_gate.dtype,
                               scale_block=scale_block)
    extras = dict(scales=scales, scale_block=scale_block, biases=biases, activation=activation)
    if choice.backend == "reference":
        return moe_ffn_reference(x, topk_ids, topk_weights, w_gate, w_up, w_down, **extras)
    return moe_ffn_pallas(x, topk_ids, topk_weights, w_gate, w_up, w_down, **extras, kernel=choice.backend,
                          interpret=interpret or interpreting())


def check_expert_scales(weights, scales, scale_block) -> None:
    """fp8 expert weights need their block scales, each [E, ceil(in/bi), ceil(out/bo)]; MXFP4 ones
    (uint8 [E, in/2, out]) their e8m0 scales [E, in/32, out], scale_block (32, 1)."""
    if scales is None:
        if any(jnp.dtype(w.dtype) in (FP8, MXFP4) for w in weights):
            raise ValueError(f"{jnp.dtype(weights[0].dtype)} expert weights need their block scales "
                             "(scales=, scale_block=)")
        return
    if jnp.dtype(weights[0].dtype) == MXFP4 and tuple(scale_block or ()) != MXFP4_SCALE_BLOCK:
        raise ValueError(f"MXFP4 expert weights take scale_block {MXFP4_SCALE_BLOCK}, got {scale_block}")
    if scale_block is None or len(scale_block) != 2 or min(scale_block) < 1:
        raise ValueError(f"scale_block must be two positive sizes (in, out) with scales, got {scale_block}")
    if len(scales) != len(weights):
        raise ValueError(f"scales must hold one array per weight ({len(weights)}), got {len(scales)}")
    for w, s in zip(weights, scales):
        num, rows, cols = w.shape
        rows = 2 * rows if jnp.dtype(w.dtype) == MXFP4 else rows  # two rows a byte
        want = (num, -(-rows // scale_block[0]), -(-cols // scale_block[1]))
        if tuple(s.shape) != want:
            raise ValueError(f"block scales of weights {tuple(w.shape)} in blocks of {tuple(scale_block)} must have "
                             f"shape {want}, got {tuple(s.shape)}")


def check_expert_biases(weights, biases) -> None:
    """Expert biases, when given: gate and up [E, I], down [E, H] for weights gate, up [E, H, I]
    and down [E, I, H]."""
    if biases is None:
        return
    if len(biases) != len(weights):
        raise ValueError(f"biases must hold one array per weight ({len(weights)}), got {len(biases)}")
    for name, w, b in zip(("gate", "up", "down"), weights, biases):
        want = (w.shape[0], w.shape[-1])
        if tuple(b.shape) != want:
            raise ValueError(f"the {name} bias of expert weights {tuple(w.shape)} must have shape {want}, "
                             f"got {tuple(b.shape)}")


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


def dequantize_expert_weight(w: jax.Array, scale: jax.Array, block: tuple[int, int], dtype, *, row_offset=0,
                             col_offset=0) -> jax.Array:
    """Quantized expert weights in `dtype`, whatever their format: block-FP8 (`dequantize_experts`)
    or MXFP4 (uint8, `dequantize_packed_experts`); the offsets as theirs."""
    if jnp.dtype(w.dtype) == MXFP4:
        return dequantize_packed_experts(w, scale, dtype, row_offset=row_offset, col_offset=col_offset)
    return dequantize_experts(w, scale, block, dtype, row_offset=row_offset, col_offset=col_offset)


def dense_experts(weights, scales, scale_block, dtype) -> tuple[jax.Array, ...]:
    """The expert weights in `dtype`: dequantized when they come with block scales, else as given."""
    if scales is None:
        return tuple(weights)
    return tuple(dequantize_expert_weight(w, s, scale_block, dtype) for w, s in zip(weights, scales))


def grouped_matmul_reference(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Rows of `lhs` [M, K] sorted by group times per-group `rhs` [G, K, N] -> [M, N]."""
    return jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32))


def row_biases(biases, row_experts: jax.Array) -> tuple[jax.Array, ...] | None:
    """Each row's biases (gate, up, down) from its expert id; ids past the experts (rows routed
    elsewhere, discarded by the caller) take the last expert's."""
    if biases is None:
        return None
    return tuple(jnp.take(b, row_experts, axis=0, mode="clip") for b in biases)


def gated_rows(gate, up, biases, activation: ExpertActivation):
    """activation(gate + gate bias, up + up bias) of rows [M, I]; `biases` from `row_biases`."""
    if biases is not None:
        gate, up = gate + biases[0].astype(gate.dtype), up + biases[1].astype(up.dtype)
    return activation(gate, up)


def expert_rows_ffn(rows, row_experts, group_sizes, w_gate, w_up, w_down, *, biases=None, activation=SWIGLU):
    """The experts' FFN over rows [M, H] sorted by expert (`row_experts` [M], `group_sizes` [E];
    rows past the groups come back as garbage the caller discards) -> [M, H], before the routing
    weights: down(activation(gate + b, up + b)) + b, with XLA's ragged dot."""
    biases = row_biases(biases, row_experts)
    gate = grouped_matmul_reference(rows, w_gate, group_sizes)
    up = grouped_matmul_reference(rows, w_up, group_sizes)
    hidden = gated_rows(gate, up, biases, activation)
    out = grouped_matmul_reference(hidden.astype(w_down.dtype), w_down, group_sizes)
    return out if biases is None else out + biases[2].astype(out.dtype)


def moe_ffn_reference(x, topk_ids, topk_weights, w_gate, w_up, w_down, *, scales=None, scale_block=None,
                      biases=None, activation: ExpertActivation = SWIGLU):
    check_expert_scales((w_gate, w_up, w_down), scales, scale_block)
    check_expert_biases((w_gate, w_up, w_down), biases)
    num_tokens, top_k = topk_ids.shape
    num_experts = w_gate.shape[0]
    flat_ids = topk_ids.reshape(-1)
    order = jnp.argsort(flat_ids, stable=True)
    rows = x[order // top_k]  # each (token, k) assignment, grouped by expert
    group_sizes = jnp.bincount(flat_ids, length=num_experts)
    with jax.named_scope("experts"):
        w_gate, w_up, w_down = dense_experts((w_gate, w_up, w_down), scales, scale_block, x.dtype)
        out = expert_rows_ffn(rows, flat_ids[order], group_sizes, w_gate, w_up, w_down, biases=biases,
                              activation=activation)
    with jax.named_scope("combine"):
        unsorted = jnp.zeros_like(out).at[order].set(out)
        weighted = unsorted.reshape(num_tokens, top_k, -1) * topk_weights[..., None].astype(out.dtype)
        return weighted.sum(axis=1).astype(x.dtype)


def moe_ffn_pallas(x, topk_ids, topk_weights, w_gate, w_up, w_down, *, scales=None, scale_block=None,
                   biases=None, activation: ExpertActivation = SWIGLU, kernel="triton", interpret=False):
    """moe_ffn with Pallas grouped matmuls (`kernel`: "triton" or "mosaic"): gate/up fused with
    SiLU-and-multiply, then down; with expert biases or another activation, gate and up as two
    plain grouped matmuls, the biases and the activation in XLA (module doc). Block-FP8 weights:
    Triton only."""
    check_expert_scales((w_gate, w_up, w_down), scales, scale_block)
    check_expert_biases((w_gate, w_up, w_down), biases)
    if jnp.dtype(w_gate.dtype) == MXFP4:
        if kernel != "triton":
            raise ValueError("the Mosaic GPU grouped matmul takes no MXFP4 weights: use kernel='triton'")
        return _moe_ffn_mxfp4(x, topk_ids, topk_weights, (w_gate, w_up, w_down), scales, biases, activation,
                              interpret)
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
    per_weight = [{}] * 3 if scales is None else [dict(rhs_scale=s, scale_block=scale_block) for s in scales]
    if biases is None and activation.name == "swiglu":
        gate_up = {} if scales is None else dict(scales=scales[:2], scale_block=scale_block)
        hidden = grouped_matmul_swiglu(rows, w_gate, w_up, group_sizes, interpret=interpret, **gate_up)
        row_bias = None
    else:
        row_bias = row_biases(biases, flat_ids[order])
        gate = grouped_matmul(rows, w_gate, group_sizes, interpret=interpret, **per_weight[0])
        up = grouped_matmul(rows, w_up, group_sizes, interpret=interpret, **per_weight[1])
        hidden = gated_rows(gate, up, row_bias, activation)
    hidden = hidden.astype(x.dtype if scales is not None else w_down.dtype)
    out = grouped_matmul(hidden, w_down, group_sizes, interpret=interpret, **per_weight[2])
    if row_bias is not None:
        out = out + row_bias[2].astype(out.dtype)
    unsorted = jnp.zeros_like(out).at[order].set(out)
    weighted = unsorted.reshape(num_tokens, top_k, -1) * topk_weights[..., None].astype(out.dtype)
    return weighted.sum(axis=1).astype(x.dtype)


def _moe_ffn_mxfp4(x, topk_ids, topk_weights, weights, scales, biases, activation: ExpertActivation, interpret):
    """moe_ffn_pallas over MXFP4 experts: gate, up and down through the Triton MXFP4 grouped matmul
    (W4A16: each packed tile unpacked and scaled in registers), biases and activation in XLA."""
    from pallas_kernels.triton_mxfp4_grouped_matmul import grouped_matmul_mxfp4

    num_tokens, top_k = topk_ids.shape
    flat_ids = topk_ids.reshape(-1)
    order = jnp.argsort(flat_ids, stable=True)
    rows = x[order // top_k]
    group_sizes = jnp.bincount(flat_ids, length=weights[0].shape[0])
    matmul = lambda lhs, i: grouped_matmul_mxfp4(lhs, weights[i], scales[i], group_sizes,  # noqa: E731
                                                 interpret=interpret)
    row_bias = row_biases(biases, flat_ids[order])
    hidden = gated_rows(matmul(rows, 0), matmul(rows, 1), row_bias, activation).astype(x.dtype)
    out = matmul(hidden, 2)
    if row_bias is not None:
        out = out + row_bias[2].astype(out.dtype)
    unsorted = jnp.zeros_like(out).at[order].set(out)
    weighted = unsorted.reshape(num_tokens, top_k, -1) * topk_weights[..., None].astype(out.dtype)
    return weighted.sum(axis=1).astype(x.dtype)
