"""MoE grouped matmul over MXFP4 experts (W4A16) as a Pallas kernel with the Triton lowering.

The weights stay as kept on device (pallas_kernels/mxfp4.py): packed uint8 [G, K/2, N], byte [k, j]
holding rows 2k (low nibble) and 2k + 1 (high) of column j, and e8m0 scales uint8 [G, K/32, N].
Rows are tiled by group as in pallas_kernels/triton_grouped_matmul.py (same schedule, same
contract as `jax.lax.ragged_dot` on the dequantized weights). Each K step covers one scale block,
32 rows: the program loads a packed [16, block_n] tile (half a byte per weight from memory) and the
block's [block_n] scales, decodes the low and the high nibbles to float32 in registers (bit
arithmetic, no table), scales them, rounds to the activations' dtype and multiplies: the even
rows' values with the even columns of the activations, the odd rows' with the odd ones. The
activations are permuted once in XLA (in each 32 columns, the 16 even ones, then the 16 odd ones),
so both halves load as contiguous tiles and no interleave happens in the kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.mxfp4 import MXFP4_BLOCK
from pallas_kernels.triton_grouped_matmul import _pick_block, _schedule, _steps

HALF = MXFP4_BLOCK // 2  # packed rows per scale block


def unsupported_reason(*, hidden_size: int, intermediate_size: int) -> str | None:
    """None when the MXFP4 grouped matmul takes experts of these sizes (both the K of one matmul
    and the N of another), else why not."""
    for name, size in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size)):
        if size % MXFP4_BLOCK:
            return f"{name} ({size}) must be a multiple of {MXFP4_BLOCK} for the MXFP4 grouped matmul"
    return None


def e2m1_to_float(codes: jax.Array) -> jax.Array:
    """int32 e2m1 codes (0..15) -> float32, by building the float's bits: exponent e = bits 2-1
    (bias 1; 0 is subnormal: 0 or 0.5), mantissa bit 0, sign bit 3."""
    exponent, mantissa = (codes >> 1) & 3, codes & 1
    normal = ((exponent + 126) << 23) | (mantissa << 22)
    bits = jnp.where(exponent == 0, mantissa * (126 << 23), normal) | ((codes >> 3) << 31)
    return lax.bitcast_convert_type(bits, jnp.float32)


def e8m0_to_scale(codes: jax.Array) -> jax.Array:
    """int32 e8m0 codes -> float32 2^(e - 127) (0 is the subnormal 2^-127; the loader refuses 255)."""
    return lax.bitcast_convert_type(jnp.where(codes == 0, 1 << 22, codes << 23), jnp.float32)


def _kernel(start_ref, end_ref, group_ref, lhs_ref, rhs_ref, scale_ref, out_ref, *, block_m, out_dtype):
    tile, n_block = pl.program_id(0), pl.program_id(1)
    start, end, group = start_ref[tile], end_ref[tile], group_ref[tile]
    block_n = out_ref.shape[-1]
    cols = pl.ds(n_block * block_n, block_n)
    rows_ok = (start + lax.broadcasted_iota(jnp.int32, (block_m, HALF), 0)) < end
    steps = _steps(start, end, lhs_ref.shape[1] // MXFP4_BLOCK)

    def half_tile(i, offset):
        a = lhs_ref[pl.ds(start, block_m), pl.ds(i * MXFP4_BLOCK + offset, HALF)]
        return jnp.where(rows_ok, a, jnp.zeros_like(a))

    def step(i, acc):
        packed = rhs_ref[group, pl.ds(i * HALF, HALF), cols].astype(jnp.int32)
        scale = e8m0_to_scale(scale_ref[group, i, cols].astype(jnp.int32))[None, :]
        low = (e2m1_to_float(packed & 15) * scale).astype(lhs_ref.dtype)
        high = (e2m1_to_float(packed >> 4) * scale).astype(lhs_ref.dtype)
        acc = acc + plgpu.dot(half_tile(i, 0), low).astype(jnp.float32)
        return acc + plgpu.dot(half_tile(i, HALF), high).astype(jnp.float32)

    acc = lax.fori_loop(0, steps, step, jnp.zeros((block_m, block_n), jnp.float32))
    out_ref[...] = acc.astype(out_dtype)


def even_odd_columns(lhs: jax.Array) -> jax.Array:
    """lhs [M, K] with each 32 columns reordered: the 16 even ones, then the 16 odd ones."""
    rows, k_dim = lhs.shape
    blocks = lhs.reshape(rows, k_dim // MXFP4_BLOCK, HALF, 2)
    return jnp.swapaxes(blocks, 2, 3).reshape(rows, k_dim)


def grouped_matmul_mxfp4(lhs, packed, scales, group_sizes, *, block_m=64, block_n=None, num_warps=4, num_stages=3,
                         interpret=False):
    """`jax.lax.ragged_dot(lhs, W, group_sizes)` with W [G, K, N] the MXFP4 experts `packed` uint8
    [G, K/2, N] with `scales` uint8 [G, K/32, N] (module doc): [M, K] -> [M, N] in lhs's dtype."""
    num_rows, k_dim = lhs.shape
    num_groups, half_k, n_dim = packed.shape
    if jnp.dtype(packed.dtype) != jnp.uint8 or jnp.dtype(scales.dtype) != jnp.uint8:
        raise ValueError(f"MXFP4 weights and scales are uint8, got {packed.dtype} and {scales.dtype}")
    if k_dim != 2 * half_k or k_dim % MXFP4_BLOCK:
        raise ValueError(f"lhs [M, K] = {tuple(lhs.shape)} needs packed weights [G, K/2, N] with K a multiple of "
                         f"{MXFP4_BLOCK}, got {tuple(packed.shape)}")
    if tuple(scales.shape) != (num_groups, k_dim // MXFP4_BLOCK, n_dim):
        raise ValueError(f"scales of packed weights {tuple(packed.shape)} must have shape "
                         f"{(num_groups, k_dim // MXFP4_BLOCK, n_dim)}, got {tuple(scales.shape)}")
    if tuple(group_sizes.shape) != (num_groups,):
        raise ValueError(f"group_sizes must have shape ({num_groups},), got {tuple(group_sizes.shape)}")
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two >= 16, got {block_m}")
    block_n = block_n or _pick_block(n_dim, "N (rhs columns)", 128)
    tile_start, tile_end, tile_group, row_tile, row_off, row_valid, num_tiles = _schedule(
        group_sizes, num_rows, block_m)
    padded = jnp.pad(even_odd_columns(lhs), ((0, block_m), (0, 0)))  # a tile may start near the last row
    kernel = functools.partial(_kernel, block_m=block_m, out_dtype=lhs.dtype)
    whole = lambda shape: pl.BlockSpec(shape, lambda t, n: (0,) * len(shape))  # noqa: E731
    tiles = pl.pallas_call(
        kernel,
        grid=(num_tiles, n_dim // block_n),
        in_specs=[whole((num_tiles,))] * 3 + [whole(a.shape) for a in (padded, packed, scales)],
        out_specs=pl.BlockSpec((None, block_m, block_n), lambda t, n: (t, 0, n)),
        out_shape=jax.ShapeDtypeStruct((num_tiles, block_m, n_dim), lhs.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"grouped_matmul_mxfp4_bm{block_m}",
    )(tile_start, tile_end, tile_group, padded, packed, scales)
    out = tiles[row_tile, row_off]
    return jnp.where(row_valid[:, None], out, jnp.zeros_like(out))
