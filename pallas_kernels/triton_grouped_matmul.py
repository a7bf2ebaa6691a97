"""MoE grouped matmul as a Pallas kernel with the Triton lowering (GPU; interpret mode on CPU).

`lhs` [M, K] holds rows sorted by group (expert); group g owns `group_sizes[g]` consecutive rows
and multiplies them by `rhs[g]` [K, N]. Same contract as `jax.lax.ragged_dot`.

The wrapper cuts every group into *row tiles* of `block_m` rows that never cross a group
boundary (at most M // block_m + G tiles), so each program multiplies one tile by one expert's
weights: grid (tile, N block), with the K loop inside the program. The tiles' outputs
[tiles, block_m, N] are gathered back to rows in JAX. `grouped_matmul_swiglu` fuses the gate and
up projections with SiLU-and-multiply: the [M, 2I] intermediate never reaches memory.

Block-FP8 weights (weight-only fp8, W8A16): `rhs` float8_e4m3fn with float32 block scales
[G, ceil(K/bk), ceil(N/bn)] (`scale_block` = (bk, bn)). Tiles are chosen inside one scale block
(block_k divides bk, block_n divides bn), so each program loads its fp8 tile (1 byte per weight
from memory), dequantizes it in registers with the tile's one scale (float32 multiply, then the
activations' dtype) and multiplies as in the plain case: the activations stay bf16.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.kernel_common import check_grouped_shapes

FP8 = jnp.dtype(jnp.float8_e4m3fn)


def _pick_block(dim: int, name: str, largest: int) -> int:
    block = largest
    while block >= 16:
        if dim % block == 0:
            return block
        block //= 2
    raise ValueError(f"{name} ({dim}) must be a multiple of 16 for the Triton grouped matmul")


def unsupported_reason(*, hidden_size: int, intermediate_size: int, dtype=jnp.bfloat16, weight_dtype=None,
                       scale_block: tuple[int, int] | None = None) -> str | None:
    """None when the Triton grouped matmuls take an MoE block of these sizes, else why not.
    fp8 weights (`weight_dtype`) need block scales in blocks (`scale_block`) of multiples of 16."""
    for name, size in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size)):
        if size % 16:
            return f"{name} ({size}) must be a multiple of 16 for the Triton grouped matmul"
    if weight_dtype is not None and jnp.dtype(weight_dtype) == FP8:
        if scale_block is None:
            return "float8_e4m3fn weights need their block scales"
        if any(size % 16 for size in scale_block):
            return (f"fp8 weight blocks {tuple(scale_block)} must be multiples of 16 for the Triton grouped matmul "
                    "(a tile lies inside one block)")
    return None


def _schedule(group_sizes, num_rows: int, block_m: int):
    """Per-tile (start row, end row of its group, group id) and per-row (tile, offset)."""
    num_groups = group_sizes.shape[0]
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes, dtype=jnp.int32)
    starts = ends - sizes
    per_group = (sizes + block_m - 1) // block_m
    cu_tiles = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(per_group, dtype=jnp.int32)])
    num_tiles = num_rows // block_m + min(num_groups, num_rows)
    tile = jnp.arange(num_tiles, dtype=jnp.int32)
    tile_group = jnp.minimum(jnp.searchsorted(cu_tiles[1:], tile, side="right"), num_groups - 1)
    tile_start = starts[tile_group] + (tile - cu_tiles[tile_group]) * block_m
    live = tile < cu_tiles[-1]
    tile_end = jnp.where(live, ends[tile_group], tile_start)  # dead tiles own no rows
    row = jnp.arange(num_rows, dtype=jnp.int32)
    row_group = jnp.minimum(jnp.searchsorted(ends, row, side="right"), num_groups - 1)
    row_tile = jnp.clip(cu_tiles[row_group] + (row - starts[row_group]) // block_m, 0, num_tiles - 1)
    row_valid = row < ends[-1]
    return (tile_start.astype(jnp.int32), tile_end.astype(jnp.int32), tile_group.astype(jnp.int32),
            row_tile, row - tile_start[row_tile], row_valid, num_tiles)


def _steps(start, end, steps: int):
    """The K loop's trip count: `steps`, or 0 for a tile with no rows. An int32 predicate times the
    bound: `jnp.where(end > start, steps, 0)` on a Python int lowers to a select typed like its i1
    predicate, the loop bound becomes a boolean, and no GPU compiles the module."""
    return (end > start).astype(jnp.int32) * steps


def _kernel(start_ref, end_ref, group_ref, lhs_ref, *refs, block_m, block_k, num_rhs, fuse_swiglu,
            out_dtype, scale_block):
    rhs_refs, out_ref = refs[:num_rhs], refs[-1]
    scale_refs = refs[num_rhs:2 * num_rhs] if scale_block else (None,) * num_rhs
    tile, n_block = pl.program_id(0), pl.program_id(1)
    start, end, group = start_ref[tile], end_ref[tile], group_ref[tile]
    block_n = out_ref.shape[-1]
    k_dim = lhs_ref.shape[1]
    rows_ok = (start + lax.broadcasted_iota(jnp.int32, (block_m, block_k), 0)) < end
    steps = _steps(start, end, k_dim // block_k)

    def weight_tile(rhs_ref, scale_ref, i):
        w = rhs_ref[group, pl.ds(i * block_k, block_k), pl.ds(n_block * block_n, block_n)]
        if scale_ref is None:
            return w
        # The tile lies in one scale block (block sizes divide the scale block's).
        scale = scale_ref[group, (i * block_k) // scale_block[0], (n_block * block_n) // scale_block[1]]
        return (w.astype(jnp.float32) * scale).astype(lhs_ref.dtype)

    def step(i, accs):
        a = lhs_ref[pl.ds(start, block_m), pl.ds(i * block_k, block_k)]
        a = jnp.where(rows_ok, a, jnp.zeros_like(a))
        return tuple(acc + plgpu.dot(a, weight_tile(r, s, i)).astype(jnp.float32)
                     for acc, r, s in zip(accs, rhs_refs, scale_refs))

    accs = lax.fori_loop(0, steps, step, tuple(jnp.zeros((block_m, block_n), jnp.float32) for _ in rhs_refs))
    out = jax.nn.sigmoid(accs[0]) * accs[0] * accs[1] if fuse_swiglu else accs[0]
    out_ref[...] = out.astype(out_dtype)


# Shared memory per block on Hopper (H100/H200): 227 KB.
SHARED_MEMORY_BYTES = 227 * 1024


def shared_memory_bytes(block_m: int, block_n: int, block_k: int, num_rhs: int, itemsize: int,
                        num_stages: int) -> int:
    """What the pipelined K loop keeps in shared memory: `num_stages` copies of one lhs tile and
    `num_rhs` rhs tiles."""
    return num_stages * (block_m * block_k + num_rhs * block_k * block_n) * itemsize


def _fitting_stages(block_m, block_n, block_k, num_rhs, itemsize, most: int) -> int:
    """The most pipeline stages (at most `most`, at least 1) whose tiles fit in shared memory."""
    for stages in range(most, 0, -1):
        if shared_memory_bytes(block_m, block_n, block_k, num_rhs, itemsize, stages) <= SHARED_MEMORY_BYTES:
            return stages
    raise ValueError(f"tiles {block_m}x{block_k} + {num_rhs}x{block_k}x{block_n} of {itemsize}-byte elements "
                     f"exceed {SHARED_MEMORY_BYTES} bytes of shared memory even in one stage")


def _tile_sizes(k_dim, n_dim, block_k, block_n, scale_block):
    """(block_k, block_n): given, or the largest powers of two (<= 64, <= 128) dividing K and N
    and, for fp8 weights, the scale block's sizes (a tile then lies inside one scale block)."""
    if scale_block is None:
        block_k = block_k or _pick_block(k_dim, "K (lhs columns)", 64)
        block_n = block_n or _pick_block(n_dim, "N (rhs columns)", 128)
    else:
        common_k, common_n = math.gcd(k_dim, scale_block[0]), math.gcd(n_dim, scale_block[1])
        if common_k % 16 or common_n % 16:
            raise ValueError(f"K ({k_dim}) and N ({n_dim}) with the scale block {tuple(scale_block)} leave tiles of "
                             f"{common_k} x {common_n}: both must be multiples of 16 for the Triton grouped matmul")
        block_k = block_k or _pick_block(common_k, "K", 64)
        block_n = block_n or _pick_block(common_n, "N", 128)
        if scale_block[0] % block_k or scale_block[1] % block_n:
            raise ValueError(f"block_k ({block_k}) / block_n ({block_n}) must divide the scale block "
                             f"{tuple(scale_block)}")
    if k_dim % block_k or n_dim % block_n:
        raise ValueError(f"block_k ({block_k}) / block_n ({block_n}) must divide K ({k_dim}) / N ({n_dim})")
    return block_k, block_n


def _check_scales(rhs_list, scale_list, scale_block):
    """fp8 rhs need float32 block scales [G, ceil(K/bk), ceil(N/bn)], and nothing else takes scales."""
    fp8 = [jnp.dtype(r.dtype) == FP8 for r in rhs_list]
    if scale_list is None:
        if any(fp8):
            raise ValueError("float8_e4m3fn weights need their block scales (scale_block and scales)")
        return
    if not all(fp8) or scale_block is None or len(scale_list) != len(rhs_list):
        raise ValueError(f"block scales go with float8_e4m3fn weights, one per weight, and a scale_block; got "
                         f"{[str(r.dtype) for r in rhs_list]} weights, {len(scale_list)} scales, block {scale_block}")
    for r, s in zip(rhs_list, scale_list):
        want = (r.shape[0], -(-r.shape[1] // scale_block[0]), -(-r.shape[2] // scale_block[1]))
        if tuple(s.shape) != want:
            raise ValueError(f"block scales of weights {tuple(r.shape)} in blocks of {tuple(scale_block)} must have "
                             f"shape {want}, got {tuple(s.shape)}")


def _grouped(lhs, rhs_list, group_sizes, *, fuse_swiglu, block_m, block_n, block_k, num_warps,
             num_stages, interpret, scale_list=None, scale_block=None):
    num_rows, k_dim, n_dim, num_groups = check_grouped_shapes(lhs, rhs_list, group_sizes)
    _check_scales(rhs_list, scale_list, scale_block)
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two >= 16, got {block_m}")
    block_k, block_n = _tile_sizes(k_dim, n_dim, block_k, block_n, scale_block)
    # float32 fused SwiGLU at 3 stages would ask for 240 KB: fewer stages rather than a failed compile.
    num_stages = _fitting_stages(block_m, block_n, block_k, len(rhs_list), max(lhs.dtype.itemsize, rhs_list[0].dtype.itemsize), num_stages)
    tile_start, tile_end, tile_group, row_tile, row_off, row_valid, num_tiles = _schedule(
        group_sizes, num_rows, block_m)
    padded = jnp.pad(lhs, ((0, block_m), (0, 0)))  # a tile may start near the last row
    out_dtype = lhs.dtype
    scales = [s.astype(jnp.float32) for s in scale_list or ()]
    kernel = functools.partial(_kernel, block_m=block_m, block_k=block_k, num_rhs=len(rhs_list),
                               fuse_swiglu=fuse_swiglu, out_dtype=out_dtype,
                               scale_block=tuple(scale_block) if scales else None)
    whole = lambda shape: pl.BlockSpec(shape, lambda t, n: (0,) * len(shape))  # noqa: E731
    tiles = pl.pallas_call(
        kernel,
        grid=(num_tiles, n_dim // block_n),
        in_specs=[whole((num_tiles,))] * 3 + [whole(padded.shape)] + [whole(a.shape) for a in (*rhs_list, *scales)],
        out_specs=pl.BlockSpec((None, block_m, block_n), lambda t, n: (t, 0, n)),
        out_shape=jax.ShapeDtypeStruct((num_tiles, block_m, n_dim), out_dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"grouped_matmul{'_swiglu' if fuse_swiglu else ''}{'_fp8' if scales else ''}_bm{block_m}",
    )(tile_start, tile_end, tile_group, padded, *rhs_list, *scales)
    out = tiles[row_tile, row_off]
    return jnp.where(row_valid[:, None], out, jnp.zeros_like(out))


def grouped_matmul(lhs, rhs, group_sizes, *, rhs_scale=None, scale_block=None, block_m=64, block_n=None,
                   block_k=None, num_warps=4, num_stages=3, interpret=False):
    """`jax.lax.ragged_dot(lhs, rhs, group_sizes)` as a Pallas kernel: [M, K] x [G, K, N] -> [M, N].
    Block-FP8 `rhs` comes with `rhs_scale` [G, ceil(K/bk), ceil(N/bn)] and `scale_block` (bk, bn)."""
    return _grouped(lhs, [rhs], group_sizes, fuse_swiglu=False, block_m=block_m, block_n=block_n,
                    block_k=block_k, num_warps=num_warps, num_stages=num_stages, interpret=interpret,
                    scale_list=None if rhs_scale is None else [rhs_scale], scale_block=scale_block)


def grouped_matmul_swiglu(lhs, w_gate, w_up, group_sizes, *, scales=None, scale_block=None, block_m=64,
                          block_n=None, block_k=None, num_warps=4, num_stages=3, interpret=False):
    """silu(lhs @ w_gate[g]) * (lhs @ w_up[g]) per group, fused: [M, K] x 2 x [G, K, I] -> [M, I].
    Block-FP8 weights come with `scales` (gate's, up's) and `scale_block`."""
    if w_gate.shape != w_up.shape:
        raise ValueError(f"w_gate {w_gate.shape} and w_up {w_up.shape} must have the same shape")
    return _grouped(lhs, [w_gate, w_up], group_sizes, fuse_swiglu=True, block_m=block_m,
                    block_n=block_n, block_k=block_k, num_warps=num_warps, num_stages=num_stages,
                    interpret=interpret, scale_list=None if scales is None else list(scales), scale_block=scale_block)
