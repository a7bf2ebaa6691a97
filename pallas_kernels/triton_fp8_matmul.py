"""Block-scaled FP8 matmul (W8A8, DeepGEMM's recipe) as a Pallas kernel with the Triton lowering
(GPU, sm_89 and newer; interpret mode on CPU).

    out [M, N] = sum over K blocks kb of (x_fp8[:, kb] @ w_fp8[kb, :]) * x_scale[:, kb] * w_scale[kb, nb]

x_fp8 [M, K] float8_e4m3fn activations with float32 scales [M, ceil(K/128)] (one per token and
128-input group: `models.quantization.quantize_activations`); w_fp8 [K, N] float8_e4m3fn weights
with float32 scales [ceil(K/128), ceil(N/128)] (one per 128 x 128 block: DeepSeek-V3's format).

Grid: (M block, N block, K split). A program owns a [block_m, block_n] output tile and walks its
share of K in steps of 128 (the scale group): each step is one fp8 x fp8 dot accumulated in
float32 (`preferred_element_type`; Triton emits fp8 MMA: wgmma on Hopper), scaled by the tokens'
group scales times the weight block's scale (a scalar when block_n divides 128) and added to a
float32 accumulator kept in registers: the per-block products never reach memory, which is what
the XLA "scaled" method cannot avoid. With `k_splits > 1` (small M: too few tiles to fill the
GPU) the programs of one tile split K and write float32 partials [k_splits, M, N] that are summed
in JAX.

Ragged edges: M and N edges are whole-array BlockSpecs that do not divide, which the Triton
lowering masks (the garbage rows and columns of an edge tile are never stored). A K that is not a
multiple of 128 is zero-padded here, activations and weights (the weight pad copies it every call;
DeepSeek-V3's and Qwen3's linears have no such K), so every K step is whole and unmasked.

The activation scales are read transposed ([K/128, M]: one contiguous row of block_m scales per
step, instead of block_m scattered words).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

FP8 = jnp.float8_e4m3fn
# The K step and the scale group, over K and N: DeepSeek-V3's 128 x 128 weight blocks.
GROUP = 128
OUT_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
# Pallas-Triton offsets are 32-bit signed for arrays under 2^32 bytes (triton_paged_attention.py).
_I32_OFFSETS = 2**31
# Programs that keep an H100/H200 (132 SMs) busy: fewer tiles than this split K (k_splits).
_TARGET_PROGRAMS = 128
# The fewest K steps a split keeps, so that its pipeline still fills.
_MIN_STEPS_PER_SPLIT = 4


def unsupported_reason(*, k_dim: int, n_dim: int, weight_block=(GROUP, GROUP), dtype=jnp.bfloat16,
                       capability: tuple[int, int] | None = None) -> str | None:
    """None when the kernel takes an fp8 weight [k_dim, n_dim] in blocks `weight_block` (rows, columns
    of the [K, N] weight) with activations and output of `dtype`, on a GPU of `capability` (None:
    not known, e.g. interpret mode), else why not (the dispatch logs it)."""
    if tuple(weight_block) != (GROUP, GROUP):
        return f"weight blocks must be {GROUP} x {GROUP} (the kernel's K step and scale group), got {tuple(weight_block)}"
    if jnp.dtype(dtype) not in map(jnp.dtype, OUT_DTYPES):
        return f"activations must be bfloat16, float16 or float32, got {jnp.dtype(dtype).name}"
    if k_dim < 1 or n_dim < 1:
        return f"K ({k_dim}) and N ({n_dim}) must be >= 1"
    if -(-k_dim // GROUP) * GROUP * n_dim >= _I32_OFFSETS:
        return f"the weight's {k_dim} x {n_dim} elements overflow the kernel's 32-bit offsets"
    if capability is not None and tuple(capability) < (8, 9):
        return f"fp8 dots need sm_89 or newer (Ada, Hopper, Blackwell), this is sm_{capability[0]}{capability[1]}"
    return None


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def default_blocks(m: int, n: int, k: int, *, interpret: bool = False) -> dict:
    """block_m, block_n, num_warps, num_stages and k_splits for an [M, K] x [K, N] product: 128 x 128
    tiles from 128 tokens on (8 warps), block_m = M's power of two (16 to 64) below; K split so that
    about `_TARGET_PROGRAMS` programs run (1 in interpret mode, where each program costs ~0.25 ms).
    A first guess, to be tuned on a GPU (`make gpu-check`, part fp8_matmul)."""
    block_m = 128 if m > 64 else max(16, _next_pow2(m))
    block_n = 128
    tiles = -(-m // block_m) * -(-n // block_n)
    steps = -(-k // GROUP)
    k_splits = 1 if interpret else max(1, min(-(-_TARGET_PROGRAMS // tiles), steps // _MIN_STEPS_PER_SPLIT))
    return dict(block_m=block_m, block_n=block_n, num_warps=8 if block_m == 128 else 4, num_stages=4,
                k_splits=k_splits)


def _scale_columns(n_block, block_n: int, num_scale_cols: int):
    """Where the tile's weight scales sit in a row of w_scale: one column when block_n divides 128
    (the scale is a scalar per K step), else one per output column (a gather of block_n values)."""
    if GROUP % block_n == 0:
        return lax.div(n_block * block_n, GROUP)
    cols = n_block * block_n + lax.broadcasted_iota(jnp.int32, (block_n,), 0)
    return jnp.minimum(lax.div(cols, GROUP), num_scale_cols - 1)


def _kernel(x_ref, xs_ref, w_ref, ws_ref, o_ref, *, steps_per_split: int, num_steps: int, w_transposed: bool):
    """x_ref [block_m, Kp] fp8; xs_ref [Kp/128, block_m] f32 (transposed); w_ref [Kp, block_n] fp8
    ([block_n, Kp] when w_transposed); ws_ref [Kp/128, ceil(N/128)] f32 whole; o_ref [block_m,
    block_n], this split's."""
    n_block, split = pl.program_id(1), pl.program_id(2)
    block_m, block_n = o_ref.shape
    scale_cols = _scale_columns(n_block, block_n, ws_ref.shape[1])
    first = split * steps_per_split
    # A static trip count where the splits share K evenly (always with one split).
    count = steps_per_split if num_steps % steps_per_split == 0 else jnp.minimum(steps_per_split, num_steps - first)
    w_contract = 1 if w_transposed else 0

    def step(i, acc):
        kb = first + i
        start = pl.multiple_of(kb * GROUP, GROUP)
        a = x_ref[:, pl.ds(start, GROUP)]
        b = w_ref[:, pl.ds(start, GROUP)] if w_transposed else w_ref[pl.ds(start, GROUP), :]
        partial = lax.dot_general(a, b, (((1,), (w_contract,)), ((), ())), preferred_element_type=jnp.float32)
        w_scales = ws_ref[kb, scale_cols]
        w_scales = w_scales if GROUP % block_n == 0 else w_scales[None, :]
        return acc + partial * (xs_ref[kb, :][:, None] * w_scales)

    acc = lax.fori_loop(0, count, step, jnp.zeros((block_m, block_n), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _check(x_fp8, x_scale, w_fp8, w_scale, out_dtype, w_transposed: bool) -> tuple[int, int, int]:
    """(M, K, N), or a ValueError naming the argument whose shape or dtype disagrees."""
    (m, k), (wk, n) = x_fp8.shape, w_fp8.shape[::-1] if w_transposed else w_fp8.shape
    if x_fp8.dtype != FP8 or w_fp8.dtype != FP8:
        raise ValueError(f"x_fp8 and w_fp8 must be float8_e4m3fn, got {x_fp8.dtype} and {w_fp8.dtype}")
    if wk != k:
        raise ValueError(f"w_fp8's K ({wk}, {'columns' if w_transposed else 'rows'}) must equal x_fp8's "
                         f"columns ({k})")
    groups = -(-k // GROUP)
    if x_scale.shape != (m, groups):
        raise ValueError(f"x_scale must have shape ({m}, {groups}) = (M, ceil(K/{GROUP})), got {x_scale.shape}")
    if w_scale.shape != (groups, -(-n // GROUP)):
        raise ValueError(f"w_scale must have shape ({groups}, {-(-n // GROUP)}) = (ceil(K/{GROUP}), "
                         f"ceil(N/{GROUP})), got {w_scale.shape}")
    reason = unsupported_reason(k_dim=k, n_dim=n, dtype=out_dtype)
    if reason:
        raise ValueError(reason)
    if m * -(-k // GROUP) * GROUP >= _I32_OFFSETS or m * n >= _I32_OFFSETS:
        raise ValueError(f"M ({m}) is too large for the kernel's 32-bit offsets at K {k}, N {n}")
    return m, k, n


def block_fp8_matmul_triton(x_fp8, x_scale, w_fp8, w_scale, *, out_dtype=jnp.bfloat16, block_m: int | None = None,
                            block_n: int | None = None, block_k: int = GROUP, num_warps: int | None = None,
                            num_stages: int | None = None, k_splits: int | None = None, w_transposed: bool = False,
                            interpret: bool = False):
    """The block-scaled fp8 product (module doc): x_fp8 [M, K], x_scale [M, ceil(K/128)] f32,
    w_fp8 [K, N], w_scale [ceil(K/128), ceil(N/128)] f32 -> [M, N] `out_dtype`.

    block_m, block_n: the output tile (powers of two >= 16); block_k must be 128, the scale group;
    k_splits: programs sharing one tile's K (float32 partials summed in JAX). Defaults:
    `default_blocks`. w_transposed: w_fp8 is [N, K] (K contiguous: the checkpoint's own layout,
    which Hopper's fp8 wgmma wants for its B operand; [K, N] may make Triton transpose each tile
    on chip). The scales are [K/128, N/128] either way."""
    m, k, n = _check(x_fp8, x_scale, w_fp8, w_scale, out_dtype, w_transposed)
    if block_k != GROUP:
        raise ValueError(f"block_k must be {GROUP} (the scale group), got {block_k}")
    defaults = default_blocks(m, n, k, interpret=interpret)
    block_m, block_n = block_m or defaults["block_m"], block_n or defaults["block_n"]
    for name, block in (("block_m", block_m), ("block_n", block_n)):
        if block < 16 or block & (block - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {block}")
    if m == 0:
        return jnp.zeros((0, n), out_dtype)
    num_steps = -(-k // GROUP)
    k_splits = min(max(1, k_splits or defaults["k_splits"]), num_steps, (_I32_OFFSETS - 1) // (m * n))
    steps_per_split = -(-num_steps // k_splits)
    k_splits = -(-num_steps // steps_per_split)  # no split left without a step
    padded_k = num_steps * GROUP
    if padded_k != k:
        x_fp8 = jnp.pad(x_fp8, ((0, 0), (0, padded_k - k)))
        w_fp8 = jnp.pad(w_fp8, ((0, 0), (0, padded_k - k)) if w_transposed else ((0, padded_k - k), (0, 0)))
    partial_dtype = out_dtype if k_splits == 1 else jnp.float32
    kernel = functools.partial(_kernel, steps_per_split=steps_per_split, num_steps=num_steps, w_transposed=w_transposed)
    w_spec = (pl.BlockSpec((block_n, padded_k), lambda i, j, s: (j, 0)) if w_transposed
              else pl.BlockSpec((padded_k, block_n), lambda i, j, s: (0, j)))
    out = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(m, block_m), pl.cdiv(n, block_n), k_splits),
        in_specs=[pl.BlockSpec((block_m, padded_k), lambda i, j, s: (i, 0)),
                  pl.BlockSpec((num_steps, block_m), lambda i, j, s: (0, i)),
                  w_spec,
                  pl.BlockSpec(w_scale.shape, lambda i, j, s: (0, 0))],
        out_specs=pl.BlockSpec((None, block_m, block_n), lambda i, j, s: (s, i, j)),
        out_shape=jax.ShapeDtypeStruct((k_splits, m, n), partial_dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps or defaults["num_warps"],
                                             num_stages=num_stages or defaults["num_stages"]),
        interpret=interpret,
        name=f"block_fp8_matmul{'_nk' if w_transposed else ''}_bm{block_m}_bn{block_n}_s{k_splits}",
    )(x_fp8, x_scale.astype(jnp.float32).T, w_fp8, w_scale.astype(jnp.float32))
    return out[0] if k_splits == 1 else out.sum(axis=0).astype(out_dtype)


def block_fp8_matmul_reference(x_fp8, x_scale, w_fp8, w_scale, *, out_dtype=jnp.bfloat16):
    """The same math in plain JAX (float32): both operands dequantized by their scales, one dot."""
    (m, k), n = x_fp8.shape, w_fp8.shape[1]
    x = x_fp8.astype(jnp.float32) * jnp.repeat(x_scale.astype(jnp.float32), GROUP, axis=1)[:, :k]
    w_scale_full = jnp.repeat(jnp.repeat(w_scale.astype(jnp.float32), GROUP, axis=0), GROUP, axis=1)
    w = w_fp8.astype(jnp.float32) * w_scale_full[:k, :n]
    return jnp.dot(x, w, precision=lax.Precision.HIGHEST).astype(out_dtype)
