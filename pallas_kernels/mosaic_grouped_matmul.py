"""MoE grouped matmul as a Pallas Mosaic GPU kernel (Hopper, sm_90; interpret mode on CPU).

Same contract as `jax.lax.ragged_dot` and as `triton_grouped_matmul`: `lhs` [M, K] holds rows
sorted by group (expert), group g owns `group_sizes[g]` consecutive rows and multiplies them by
`rhs[g]` [K, N]; rows past sum(group_sizes) come back zero.

Work items. The wrapper cuts every group into *row tiles*: windows of `block_m` rows starting at
the group's first row rounded down to a multiple of 8 (TMA loads into tiled shared memory need
that alignment), then every `block_m` rows, each cut to the rows of its own group (a 64-row group
is one tile, whatever its offset). The rows past sum(group_sizes) get tiles too, whose result is
zero. A small int32 table [4, max_tiles] lists per tile: first row, number of rows (0: no tile),
the first row of its TMA window (moved back where needed so the window stays inside lhs, which
is padded to a multiple of 8 rows and at least `block_m`: a copy only when M is not one already),
and its group (num_groups for a padding tile). Group sizes are runtime values; the table and its
static bound max_tiles (see `max_tiles`) are all the kernel needs.

Grid. One CTA (one warpgroup) per SM, persistent: `plgpu.nd_loop` deals the work items
(row tile, N tile), N tile minor so the SMs working at once share lhs rows and one expert's
weights in L2, round-robin to the SMs. Each item runs a TMA + wgmma pipeline over K
(`emit_pipeline`, `stages` buffers of one [block_m, block_k] lhs tile and one [block_k, block_n]
tile per rhs; wgmma M tile 64 or 128), with an f32 accumulator per rhs in registers.

Epilogue. The accumulator (silu(gate) * up for the fused SwiGLU, so the [M, 2I] intermediate
never reaches memory) is cast and staged in shared memory, then written straight to its output
rows by TMA stores of 2^i rows for each bit i of the tile's row count: no row outside the tile's
own group is ever written, and no [tiles, block_m, N] buffer is gathered back.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.kernel_common import check_grouped_shapes

# Shared memory per block on Hopper (H100/H200): 227 KB.
SHARED_MEMORY_BYTES = 227 * 1024
# Kept free under that limit for the pipeline's barriers and allocation alignment.
SHARED_MEMORY_RESERVE = 8 * 1024
# SMs of an H100 SXM / H200 when the device cannot be asked (lowering without a GPU).
DEFAULT_NUM_SMS = 132
SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
BLOCK_K = 64  # 128 bytes of bf16: one 128-byte swizzle row, the widest wgmma operand layout.


@dataclasses.dataclass(frozen=True)
class Tiling:
    block_m: int
    block_n: int
    block_k: int
    stages: int
    num_sms: int


def shared_memory_bytes(block_m: int, block_n: int, block_k: int, num_rhs: int, itemsize: int,
                        stages: int) -> int:
    """Shared memory of one CTA: `stages` buffers of one lhs tile and `num_rhs` rhs tiles for the
    K pipeline, plus the [block_m, block_n] output staging tile of the epilogue."""
    return (stages * (block_m * block_k + num_rhs * block_k * block_n) + block_m * block_n) * itemsize


def mosaic_unsupported_reason(*, num_rows: int, k_dim: int, n_dim: int, num_groups: int, dtype) -> str | None:
    """None when the Mosaic GPU grouped matmuls take these shapes, else a one-line reason.

    num_rows: M (tokens * top_k); k_dim: K (hidden size for gate/up, intermediate for down);
    n_dim: N (the other one). The MoE dispatch asks with (hidden, intermediate); both matmuls
    must fit, so K and N are checked alike.
    """
    dtype = jnp.dtype(dtype)
    if dtype not in SUPPORTED_DTYPES:
        return f"dtype {dtype} is not supported by the Mosaic GPU grouped matmul (bfloat16, float16)"
    for name, size in (("K", k_dim), ("N", n_dim)):
        if size % 64:
            return f"{name} ({size}) must be a multiple of 64 for the Mosaic GPU grouped matmul"
    if num_rows < 1:
        return f"num_rows must be >= 1, got {num_rows}"
    if num_groups < 1:
        return f"num_groups must be >= 1, got {num_groups}"
    return None


def _num_sms() -> int:
    mesh = jax.sharding.get_abstract_mesh()
    device = getattr(mesh, "abstract_device", None)
    if device is not None and getattr(device, "num_cores", None):
        return device.num_cores
    if jax.default_backend() == "gpu":
        return getattr(jax.devices()[0], "core_count", None) or DEFAULT_NUM_SMS
    return DEFAULT_NUM_SMS


def pick_tiling(num_rows: int, k_dim: int, n_dim: int, num_groups: int, num_rhs: int, itemsize: int, *,
                block_m: int | None = None, block_n: int | None = None, stages: int | None = None,
                num_sms: int | None = None) -> Tiling:
    """Tile sizes for these shapes (any left None is chosen here).

    block_m: 128 once the mean group holds more than 32 rows: one tile then covers a typical
    group, so each expert's weights stream from HBM once per N block (Qwen3-30B-A3B at 1024
    tokens: 64 rows per expert; this shape is bound by HBM, not by the tensor cores), and
    wgmma runs at M=128; smaller mean groups (decode) use 64 rows and waste fewer MMA rows.
    block_n: 128 (the fused SwiGLU keeps two f32 accumulators in 128 registers per thread),
    or 64 when 128 would leave SMs without a work item (decode: a few experts, each one row
    tile). stages: the most (<= 5) whose buffers fit in shared memory with a reserve.
    """
    num_sms = num_sms or _num_sms()
    if block_m is None:
        block_m = 128 if num_rows > 32 * num_groups else 64
    if block_m not in (64, 128):
        raise ValueError(f"block_m must be 64 or 128 (wgmma M tiles), got {block_m}")
    if block_n is None:
        busy_tiles = min(num_groups, num_rows)  # row tiles there are at least when rows spread out
        block_n = 128 if n_dim % 128 == 0 and busy_tiles * (n_dim // 128) >= num_sms else 64
    if block_n % 64 or n_dim % block_n or block_n > 256:
        raise ValueError(f"block_n must be a multiple of 64 up to 256 dividing N ({n_dim}), got {block_n}")
    block_k = BLOCK_K
    if k_dim % block_k:
        raise ValueError(f"K ({k_dim}) must be a multiple of {block_k} for the Mosaic GPU grouped matmul")
    budget = SHARED_MEMORY_BYTES - SHARED_MEMORY_RESERVE
    if stages is None:
        stages = next((s for s in (5, 4, 3, 2) if shared_memory_bytes(
            block_m, block_n, block_k, num_rhs, itemsize, s) <= budget), 2)
    if stages < 2:
        raise ValueError(f"stages must be >= 2 (one tile in use, one in flight), got {stages}")
    needed = shared_memory_bytes(block_m, block_n, block_k, num_rhs, itemsize, stages)
    if needed > budget:
        raise ValueError(f"tiles {block_m}x{block_k} + {num_rhs}x{block_k}x{block_n} in {stages} stages need "
                         f"{needed} bytes of shared memory, over the {budget} available")
    return Tiling(block_m, block_n, block_k, stages, num_sms)


# TMA loads into tiled shared memory need their first row to be a multiple of the 8-row tile.
ROW_ALIGN = 8


def max_tiles(num_rows: int, num_groups: int, block_m: int) -> int:
    """Bound on row tiles. Each of the n <= min(G, M) + 1 non-empty groups (the padding rows are
    one more) starts its tiles up to 7 rows early, at a multiple of 8, so
    sum_g cdiv(size_g + 7, bm) <= cdiv(M + 7n, bm) + n."""
    n = min(num_groups, num_rows) + 1
    return pl.cdiv(num_rows + (ROW_ALIGN - 1) * n, block_m) + n


def tile_table(group_sizes: jax.Array, num_rows: int, block_m: int) -> jax.Array:
    """int32 [4, max_tiles]: per row tile its first row, row count (0: unused entry), the first
    row of its block_m-row TMA window (a multiple of 8, at most num_rows - block_m: the caller
    pads lhs to a multiple of 8 rows and at least block_m), and its group (num_groups for the
    padding rows past sum(group_sizes), whose result is zero).

    A group's tiles are windows at align8(group start) + t * block_m, cut to the group's rows.
    Group ends are clipped to M, so sizes summing past M cannot send a store out of bounds."""
    num_groups = group_sizes.shape[0]
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.minimum(jnp.cumsum(sizes), num_rows)
    ends = jnp.concatenate([ends, jnp.full((1,), num_rows, jnp.int32)])  # the padding "group"
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    bases = starts // ROW_ALIGN * ROW_ALIGN
    per_group = jnp.where(ends > starts, (ends - bases + block_m - 1) // block_m, 0)
    cu_tiles = jnp.cumsum(per_group)
    tile = jnp.arange(max_tiles(num_rows, num_groups, block_m), dtype=jnp.int32)
    group = jnp.minimum(jnp.searchsorted(cu_tiles, tile, side="right", method="compare_all"),
                        num_groups).astype(jnp.int32)
    window = bases[group] + (tile - (cu_tiles[group] - per_group[group])) * block_m
    first = jnp.maximum(starts[group], window)
    count = jnp.minimum(ends[group], window + block_m) - first
    count = jnp.where(tile < cu_tiles[-1], jnp.clip(count, 0, block_m), 0)
    padded_rows = max(_round_up(num_rows, ROW_ALIGN), block_m)
    window = jnp.clip(window, 0, padded_rows - block_m)
    return jnp.stack([first, count, window, group]).astype(jnp.int32)


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _matmul_tile(lhs_gmem, rhs_gmems, window, group, n_block, tiling: Tiling, fuse_swiglu: bool):
    """f32 [block_m, block_n] of rows window..window+block_m times rhs[group][:, N block]
    (silu(gate) * up when fused)."""
    block_m, block_n, block_k = tiling.block_m, tiling.block_n, tiling.block_k
    k_steps = lhs_gmem.shape[1] // block_k
    num_rhs = len(rhs_gmems)
    # With a step to spare, the tiles of step s stay unreleased until step s + 1, so that the
    # wgmma of step s may still run while step s + 1 issues its own (wgmma_wait below).
    delay = 1 if k_steps > 1 else 0

    def step(_, lhs_smem, *rhs_smems, accs):
        for acc, rhs_smem in zip(accs, rhs_smems):
            plgpu.wgmma(acc, lhs_smem, rhs_smem)
        # One wgmma group per rhs in flight: step s - 1's are done before its buffers refill.
        plgpu.wgmma_wait(num_rhs * delay)

    def acc_scope(*accs):
        plgpu.emit_pipeline(
            functools.partial(step, accs=accs),
            grid=(k_steps,),
            in_specs=[plgpu.BlockSpec((block_m, block_k), lambda k: (0, k), delay_release=delay)]
            + [plgpu.BlockSpec((block_k, block_n), lambda k: (k, n_block), delay_release=delay)] * num_rhs,
            max_concurrent_steps=tiling.stages,
        )(lhs_gmem.at[pl.ds(window, block_m)], *(r.at[group] for r in rhs_gmems))
        return tuple(acc[...] for acc in accs)

    accs = pl.run_scoped(acc_scope, *(plgpu.ACC((block_m, block_n), jnp.float32) for _ in rhs_gmems))
    if fuse_swiglu:
        gate, up = accs
        return gate * jax.nn.sigmoid(gate) * up
    return accs[0]


def _store_rows(out_smem, out_gmem, smem_row, first, count, n_block, block_n: int):
    """TMA-stores rows smem_row..smem_row+count of `out_smem` to output rows first..first+count,
    N block `n_block`: one store of 2^i rows per set bit i of `count` (TMA boxes are static)."""
    largest = 1
    while largest * 2 <= min(out_smem.shape[0], out_gmem.shape[0]):
        largest *= 2
    done = jnp.int32(0)
    rows = largest
    while rows >= 1:
        @pl.when((count & rows) != 0)
        def _(rows=rows, done=done):
            plgpu.copy_smem_to_gmem(
                out_smem.at[pl.ds(smem_row + done, rows)],
                out_gmem.at[pl.ds(first + done, rows), pl.ds(n_block * block_n, block_n)])

        done = done + (count & rows)
        rows //= 2


def _kernel(table_gmem, lhs_gmem, *refs, tiling: Tiling, num_groups: int, fuse_swiglu: bool):
    rhs_gmems, out_gmem = refs[:-1], refs[-1]
    n_blocks = out_gmem.shape[1] // tiling.block_n
    num_tiles = table_gmem.shape[1]

    def scoped(out_smem):
        @plgpu.nd_loop((num_tiles, n_blocks), collective_axes="sm")
        def work_item(info):
            tile, n_block = info.index
            first, count = table_gmem[0, tile], table_gmem[1, tile]
            window, group = pl.multiple_of(table_gmem[2, tile], ROW_ALIGN), table_gmem[3, tile]

            @pl.when(count > 0)
            def _():
                # Before out_smem is overwritten, the previous item's stores must have read it;
                # waiting only then lets them run under this item's K loop.
                @pl.when(group < num_groups)
                def _():
                    out = _matmul_tile(lhs_gmem, rhs_gmems, window, group, n_block, tiling, fuse_swiglu)
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    out_smem[...] = out.astype(out_smem.dtype)

                @pl.when(group >= num_groups)  # padding rows past sum(group_sizes)
                def _():
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    out_smem[...] = jnp.zeros(out_smem.shape, out_smem.dtype)

                plgpu.commit_smem()
                _store_rows(out_smem, out_gmem, first - window, first, count, n_block, tiling.block_n)

        plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(scoped, plgpu.SMEM((tiling.block_m, tiling.block_n), out_gmem.dtype))


def _interpret_params(interpret):
    if interpret is True:
        return plgpu.InterpretGPUParams()
    return interpret or None


def _grouped(lhs, rhs_list, group_sizes, *, fuse_swiglu: bool, interpret, block_m, block_n, stages, num_sms):
    num_rows, k_dim, n_dim, num_groups = check_grouped_shapes(lhs, rhs_list, group_sizes)
    if any(r.dtype != lhs.dtype for r in rhs_list):
        raise ValueError(f"lhs ({lhs.dtype}) and rhs ({rhs_list[0].dtype}) must have the same dtype")
    reason = mosaic_unsupported_reason(num_rows=num_rows, k_dim=k_dim, n_dim=n_dim, num_groups=num_groups,
                                       dtype=lhs.dtype)
    if reason:
        raise ValueError(reason)
    if interpret and num_sms is None:
        num_sms = 3  # a few simulated SMs, each with several work items: the persistent loop is exercised
    tiling = pick_tiling(num_rows, k_dim, n_dim, num_groups, len(rhs_list), lhs.dtype.itemsize,
                         block_m=block_m, block_n=block_n, stages=stages, num_sms=num_sms)
    table = tile_table(group_sizes, num_rows, tiling.block_m)
    padded_rows = max(_round_up(num_rows, ROW_ALIGN), tiling.block_m)
    if padded_rows != num_rows:  # every 8-aligned TMA window of block_m rows fits inside lhs
        lhs = jnp.pad(lhs, ((0, padded_rows - num_rows), (0, 0)))
    kernel = plgpu.kernel(
        functools.partial(_kernel, tiling=tiling, num_groups=num_groups, fuse_swiglu=fuse_swiglu),
        out_type=jax.ShapeDtypeStruct((num_rows, n_dim), lhs.dtype),
        grid=(tiling.num_sms,),
        grid_names=("sm",),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=_interpret_params(interpret),
    )
    return kernel(table, lhs, *rhs_list)


def grouped_matmul_mosaic(lhs, rhs, group_sizes, *, interpret=False, block_m=None, block_n=None, stages=None,
                          num_sms=None):
    """`jax.lax.ragged_dot(lhs, rhs, group_sizes)` as a Mosaic GPU kernel: [M, K] x [G, K, N] -> [M, N].

    interpret: False, True or a `plgpu.InterpretGPUParams`. Tuning (None: chosen by
    `pick_tiling`): block_m (64 or 128), block_n, stages, num_sms (persistent CTAs)."""
    return _grouped(lhs, [rhs], group_sizes, fuse_swiglu=False, interpret=interpret, block_m=block_m,
                    block_n=block_n, stages=stages, num_sms=num_sms)


def grouped_matmul_swiglu_mosaic(lhs, w_gate, w_up, group_sizes, *, interpret=False, block_m=None, block_n=None,
                                 stages=None, num_sms=None):
    """silu(lhs @ w_gate[g]) * (lhs @ w_up[g]) per group, fused: [M, K] x 2 x [G, K, I] -> [M, I]."""
    if w_gate.shape != w_up.shape:
        raise ValueError(f"w_gate {w_gate.shape} and w_up {w_up.shape} must have the same shape")
    return _grouped(lhs, [w_gate, w_up], group_sizes, fuse_swiglu=True, interpret=interpret, block_m=block_m,
                    block_n=block_n, stages=stages, num_sms=num_sms)
