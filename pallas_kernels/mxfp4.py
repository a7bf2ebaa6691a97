"""MXFP4 (OCP microscaling FP4, gpt-oss's MoE experts): the format, and the layout experts are kept
in on device.

32 consecutive values along a weight's input axis share one e8m0 scale. A checkpoint stores
`X_blocks` uint8 [..., out, in/32, 16] (two e2m1 codes a byte, the value of the even index in the
low nibble) and `X_scales` uint8 [..., out, in/32] (the scale 2^(e - 127)).

Kept on device (models.moe.Experts), an expert weight is our [in, out] orientation with the input
axis packed: `packed` uint8 [E, in/2, out], byte [k, j] holding rows 2k (low nibble) and 2k + 1
(high) of column j, so a tile of columns is contiguous in every packed row; its scales uint8
[E, in/32, out], one per 32 rows of a column (the block (32, 1) of the [in, out] weight,
`MXFP4_SCALE_BLOCK`). `to_kernel_layout` turns the file's pair into these (a reshape and a
transpose: no value changes), `dequantize_packed_experts` is their dequantization on device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# e2m1 code -> value: bit 3 the sign, bits 2-1 the exponent (bias 1), bit 0 the mantissa.
FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                       -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)
MXFP4_BLOCK = 32  # values per e8m0 scale
MXFP4_BITS = 4 + 8 / MXFP4_BLOCK  # bits per weight as stored: 4.25
E8M0_NAN = 255  # the one e8m0 code that is not a power of two


def unpack_fp4(blocks):
    """uint8 [..., B] -> float32 [..., 2B], the e2m1 values: each byte's low nibble, then its high."""
    xp = np if isinstance(blocks, np.ndarray) else jnp
    table = xp.asarray(FP4_VALUES)
    pairs = xp.stack([table[blocks & 0x0F], table[blocks >> 4]], axis=-1)
    return pairs.reshape(*blocks.shape[:-1], 2 * blocks.shape[-1])


def e8m0_to_float(scales):
    """uint8 e8m0 exponents -> float32 2^(e - 127), exact (0 is the subnormal 2^-127); 255 is NaN."""
    xp = np if isinstance(scales, np.ndarray) else jnp
    e = scales.astype(xp.uint32)
    bits = xp.where(e == 0, xp.uint32(0x00400000), e << 23)
    bits = xp.where(e == E8M0_NAN, xp.uint32(0x7FC00000), bits)
    return bits.view(np.float32) if xp is np else jax.lax.bitcast_convert_type(bits, jnp.float32)


def mxfp4_dequantize(blocks, scales, dtype=np.float32):
    """MXFP4 `blocks` uint8 [..., G, 16] and `scales` uint8 [..., G] -> [..., G * 32] as `dtype`: each
    value times its block's scale, exact in float32 (then rounded to `dtype`; past float32's range,
    inf). numpy arrays are dequantized on the host a leading slice at a time (one expert of a
    stacked tensor); jax arrays on device in one expression, which XLA fuses into its consumer.

    The layout is the file's, [..., out, in]: transformers' `convert_moe_packed_tensors` returns
    the same values with the last two axes swapped, gpt-oss's [E, in, out] parameters."""
    if tuple(blocks.shape[:-1]) != tuple(scales.shape) or blocks.shape[-1] != MXFP4_BLOCK // 2:
        raise ValueError(f"MXFP4 blocks [..., G, {MXFP4_BLOCK // 2}] need scales [..., G]; got blocks "
                         f"{tuple(blocks.shape)} and scales {tuple(scales.shape)}")
    shape = (*scales.shape[:-1], scales.shape[-1] * MXFP4_BLOCK)
    if isinstance(blocks, np.ndarray) and blocks.ndim > 3:
        out = np.empty(shape, dtype)
        for index in np.ndindex(*blocks.shape[:-3]):
            out[index] = mxfp4_dequantize(blocks[index], scales[index], dtype)
        return out
    xp = np if isinstance(blocks, np.ndarray) else jnp
    # The scale 2^-127 (code 0) as 2^-126 / 2: platforms that treat subnormal inputs as zero (XLA
    # on CPU) still scale by it; only results below float32's normal range flush there.
    halved = xp.where(scales == 0, xp.float32(0.5), xp.float32(1.0))[..., None]
    scale = e8m0_to_float(xp.maximum(scales, 1))[..., None]
    with np.errstate(over="ignore"):  # e >= 254: float32's range ends at 2^128
        values = unpack_fp4(blocks) * scale * halved
    return values.reshape(shape).astype(dtype)


MXFP4_SCALE_BLOCK = (MXFP4_BLOCK, 1)  # (rows, columns) one e8m0 scale covers in the [in, out] layout
E8M0_ONE = 127  # the e8m0 code of 1.0: the scale of padding slots


def to_kernel_layout(blocks: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The file's MXFP4 pair, blocks uint8 [E, out, G, 16] and scales [E, out, G] (G = in/32), as
    kept on device (module doc): (packed [E, in/2, out], scales [E, G, out]); the same bytes."""
    num, out, groups, width = blocks.shape
    return (np.ascontiguousarray(np.swapaxes(blocks.reshape(num, out, groups * width), 1, 2)),
            np.ascontiguousarray(np.swapaxes(scales, 1, 2)))


def dequantize_packed_experts(packed: jax.Array, scales: jax.Array, dtype, *, row_offset=0,
                              col_offset=0) -> jax.Array:
    """Kept MXFP4 experts, packed uint8 [E, R/2, C] with e8m0 scales [E, nr, nc] (module doc) ->
    [E, R, C] in `dtype`, each value times its scale in float32, exactly as `mxfp4_dequantize`
    (the same values as the loader's dequantization).

    `packed` may be one tensor-parallel shard of a larger weight: its (unpacked) rows start at
    `row_offset` and its columns at `col_offset` of the weight `scales` covers (traced values
    allowed; `row_offset` even)."""
    num, half_rows, cols = packed.shape
    rows = 2 * half_rows
    table = jnp.asarray(FP4_VALUES)
    values = jnp.stack([table[packed & 0x0F], table[packed >> 4]], axis=2).reshape(num, rows, cols)
    scales = jax.lax.dynamic_slice_in_dim(scales, col_offset, cols, axis=2)
    if isinstance(row_offset, int) and row_offset == 0 and rows == scales.shape[1] * MXFP4_BLOCK:
        scales = jnp.repeat(scales, MXFP4_BLOCK, axis=1)
    else:
        scales = scales[:, (row_offset + jnp.arange(rows)) // MXFP4_BLOCK]
    # As mxfp4_dequantize: the scale 2^-127 (code 0) as 2^-126 / 2, for platforms that flush subnormals.
    halved = jnp.where(scales == 0, jnp.float32(0.5), jnp.float32(1.0))
    return (values * e8m0_to_float(jnp.maximum(scales, 1)) * halved).astype(dtype)
