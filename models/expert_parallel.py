"""Expert parallelism with `jax.shard_map`: experts split over the mesh's `ep` axis.

Experts live in a fixed number of *physical* slots, `num_physical = ep * slots_per_rank`, which
may exceed the model's logical expert count: padding when the count does not divide `ep` (60
experts over 8 ranks -> 64 slots, 4 never routed to) and redundant replicas for load balancing
(EPLB, jaxserve/eplb.py). The logical -> physical map is a device array (`ExpertMap`
variables), so a rebalance changes inputs, never the compiled step.

The expert group spans the data-parallel shards (vLLM's and SGLang's wide EP with DP
attention): experts split over the `dp` x `ep` devices ("expert ranks", `EXPERT_AXES`), so
`data_parallel_size=8` alone puts 1/8 of the experts on each of 8 devices, each attending to its
own requests. Tokens enter and leave the block in the residual stream's layout: split over
`dp`, the same on every `ep` (and `tp`) rank of a dp shard, as attention runs
(models/dp_attention.py). Two dispatch strategies (`ExpertParallel.strategy`):
- "allgather" (small EP): every rank gathers the tokens of all dp shards (they are already on
  every ep rank of a shard), runs its local experts on the assignments routed to them, and the
  partial outputs are summed over ep and reduce-scattered back to their dp shards.
- "all_to_all": each ep rank takes its 1/ep of its shard's tokens and sends every (token, k)
  assignment to the expert rank owning its physical expert in fixed-capacity buffers; the
  outputs come back the same way and are all-gathered over ep. Overflow is exact: the first
  round always runs, and when some rank needs more than `capacity` rows to one destination,
  further rounds run in a loop whose count is agreed across ranks (`pmax`); nothing is dropped
  unless `allow_drop`.

A MoE block built with a layout that has `expert_parallel` options (models/layout.py) holds its
experts in the physical slots (`ExpertParallel.for_layout`), its expert map at identity and its
expert loads as variables; a model loaded without a layout gets them from
`models.registry.with_layout`.

Under dual-batch overlap (models/dbo.py) each collective stage here runs after the arrays it is
given (`dispatch_after`, `combine_after`: the previous stages of the other microbatch), passed
into the `shard_map` and ordered there (models/ordering.py), and `ep_moe_ffn` returns its own
stages' outputs for the next call to wait on.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from models.layout import ParallelLayout, check_dispatch
from models.mesh import spec_for
from models.ordering import after
from pallas_kernels.moe import (SWIGLU, ExpertActivation, check_expert_biases, check_expert_scales,
                                 dequantize_expert_weight, expert_rows_ffn)

EXPERT_AXES = ("dp", "ep")  # the mesh axes experts split over (LOGICAL_RULES["expert"])


class ExpertMap(nnx.Variable):
    """Logical <-> physical expert placement (int32 device arrays; replicated)."""


class ExpertLoad(nnx.Variable):
    """Tokens routed to each logical expert in the last step (int32 [E]; written by the forward)."""


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
    """Static expert-parallel layout of a MoE block (hashable: part of the graph definition)."""

    mesh: Mesh
    num_physical: int
    strategy: str = "allgather"
    capacity_factor: float = 0.0  # all_to_all rows per destination / (assignments / ep); 0: worst case
    allow_drop: bool = False  # all_to_all: one round only, overflow dropped
    max_replicas: int = 1  # replicas an expert may have (1 + redundant experts): the replica table's width

    def __post_init__(self):
        check_dispatch(self.strategy, self.capacity_factor)
        if self.num_physical % self.ep_size:
            raise ValueError(f"num_physical ({self.num_physical}) must be a multiple of the expert ranks "
                             f"({self.ep_size} = dp x ep)")

    @classmethod
    def for_layout(cls, layout: ParallelLayout | None, num_experts: int) -> ExpertParallel | None:
        """The layout of a block of `num_experts` experts, or None when `layout` keeps experts whole."""
        if layout is None or layout.expert_parallel is None:
            return None
        options = layout.expert_parallel
        num_physical = num_physical_slots(num_experts, expert_ranks(layout.mesh), options.num_redundant_experts)
        return cls(layout.mesh, num_physical, options.strategy, options.capacity_factor, options.allow_drop,
                   max_replicas=1 + options.num_redundant_experts)

    @property
    def ep_size(self) -> int:
        """Expert ranks: the dp x ep devices of a tp group that the experts split over."""
        return expert_ranks(self.mesh)

    @property
    def token_shards(self) -> int:
        return self.mesh.shape["dp"] * self.mesh.shape["ep"]


def expert_ranks(mesh) -> int:
    """How many ranks the experts split over: dp x ep."""
    return math.prod(mesh.shape[axis] for axis in EXPERT_AXES)


def num_physical_slots(num_experts: int, ep_size: int, num_redundant: int = 0) -> int:
    """Physical expert slots: logical experts plus replicas, rounded up to a multiple of the
    expert ranks `ep_size`."""
    if num_redundant < 0:
        raise ValueError(f"num_redundant_experts must be >= 0, got {num_redundant}")
    return math.ceil((num_experts + num_redundant) / ep_size) * ep_size


def identity_map(num_experts: int, num_physical: int, max_replicas: int) -> dict[str, np.ndarray]:
    """Expert e in slot e, slots past E empty (-1), one replica each."""
    phys_to_logical = np.full(num_physical, -1, np.int32)
    phys_to_logical[:num_experts] = np.arange(num_experts)
    table = np.zeros((num_experts, max_replicas), np.int32)
    table[:, :] = np.arange(num_experts)[:, None]
    return {"phys_to_logical": phys_to_logical, "replica_table": table,
            "replica_count": np.ones(num_experts, np.int32)}


def to_physical(ids: jax.Array, replica_table: jax.Array, replica_count: jax.Array) -> jax.Array:
    """Logical top-k ids [T, K] -> physical slots: assignment (t, k) takes replica (t*K + k) mod
    n_e of its expert, spreading a hot expert's tokens evenly over its replicas."""
    num_tokens, top_k = ids.shape
    order = jnp.arange(num_tokens, dtype=jnp.int32)[:, None] * top_k + jnp.arange(top_k, dtype=jnp.int32)[None, :]
    choice = order % replica_count[ids]
    return replica_table[ids, choice]


@dataclasses.dataclass(frozen=True)
class LocalExperts:
    """One rank's experts inside the `shard_map`: its weights (its tp shard of them), their
    biases (gate, up, down, or None; the down bias zero on all but one tp rank, since the outputs
    are summed over tp) and the activation."""

    w_gate: jax.Array
    w_up: jax.Array
    w_down: jax.Array
    biases: tuple | None = None
    activation: ExpertActivation = SWIGLU

    @property
    def num_local(self) -> int:
        return self.w_gate.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.w_down.shape[-1]


def local_experts(rows, expert, weight, experts: LocalExperts):
    """Rows [M, H] with local expert ids [M] (== num_local: not here) and weights [M] -> the
    weighted output of each row [M, H] (zero for rows not routed here)."""
    num_local = experts.num_local
    order = jnp.argsort(expert, stable=True)
    sizes = jnp.bincount(expert, length=num_local + 1)[:num_local].astype(jnp.int32)
    with jax.named_scope("experts"):
        out = expert_rows_ffn(rows[order], expert[order], sizes, experts.w_gate, experts.w_up, experts.w_down,
                              biases=experts.biases, activation=experts.activation)
    out = jnp.zeros_like(out).at[order].set(out)
    here = expert < num_local
    return jnp.where(here[:, None], out * weight[:, None].astype(out.dtype), 0)


def ep_moe_ffn(x, phys_ids, weights, w_gate, w_up, w_down, ep: ExpertParallel, *, scales=None, scale_block=None,
               biases=None, activation: ExpertActivation = SWIGLU, dispatch_after: tuple = (),
               combine_after: tuple = ()) -> tuple[jax.Array, tuple, jax.Array]:
    """Expert-parallel gated experts (SwiGLU unless `activation` says otherwise). x [T, H];
    phys_ids int32 [T, K] physical slots; weights float32 [T, K]; w_* physical [num_physical, ...]
    sharded over ep. Block-FP8 experts come with their `scales` (gate, up, down: [num_physical,
    ceil(in/bi), ceil(out/bo)], split over the expert slots only) and `scale_block` (bi, bo), MXFP4
    experts (packed uint8) with their e8m0 scales and (32, 1) (pallas_kernels/mxfp4.py): each
    rank dequantizes its local experts (its tensor-parallel shard of them) inside the step, then
    runs the plain path. Biased experts (gpt-oss) come with `biases` (gate, up [num_physical, I],
    split like the weights; down [num_physical, H], added once over tp).

    Returns (out [T, H], dispatched, combined): the dispatch collectives' outputs (per device) and
    the combine's whole output. Dual-batch overlap orders calls by them: the dispatch stage runs
    after the arrays of `dispatch_after` (a previous call's `dispatched`), the combine stage after
    those of `combine_after` (arrays split over dp like `x`; None entries are skipped)."""
    check_expert_scales((w_gate, w_up, w_down), scales, scale_block)
    check_expert_biases((w_gate, w_up, w_down), biases)
    mesh = ep.mesh
    num_tokens = x.shape[0]
    shards = ep.token_shards
    padded = math.ceil(num_tokens / shards) * shards
    if padded != num_tokens:
        pad = padded - num_tokens
        x = jnp.pad(x, ((0, pad), (0, 0)))
        phys_ids = jnp.pad(phys_ids, ((0, pad), (0, 0)))
        weights = jnp.pad(weights, ((0, pad), (0, 0)))
    up_spec = spec_for(("expert", "embed", "mlp"), w_gate.shape, mesh)
    down_spec = spec_for(("expert", "mlp", "embed"), w_down.shape, mesh)
    tp_split = up_spec[2] is not None
    token_spec = P("dp", None)
    # Dependences must be whole collective outputs: XLA may rewrite a slice of an all-reduce
    # into an all-reduce of a slice, and a slice-sized token would then depend on nothing.
    dispatch_after = tuple(dispatch_after)
    combine_after = tuple(a for a in combine_after if a is not None)
    body = _allgather_body if ep.strategy == "allgather" else _all_to_all_body
    per_device = lambda a: P() if a.ndim == 0 else P(("dp", "ep", "tp"), *([None] * (a.ndim - 1)))  # noqa: E731

    def run(x, ids, w, wg, wu, wd, local_scales, local_biases, dispatch_after, combine_after):
        if local_scales is not None:
            with jax.named_scope("dequantize_experts"):
                wg, wu, wd = _dequantized(wg, wu, wd, local_scales, scale_block, x.dtype, tp_split)
        if local_biases is not None and tp_split:  # the tp ranks' outputs are summed: one adds the down bias
            b_gate, b_up, b_down = local_biases
            local_biases = (b_gate, b_up, jnp.where(jax.lax.axis_index("tp") == 0, b_down, 0))
        experts = LocalExperts(wg, wu, wd, local_biases, activation)
        out, dispatched, combine = body(x, ids, w, experts, ep, dispatch_after)
        with jax.named_scope("combine"):
            out = combine(after(out, *combine_after))
            if tp_split:
                out = jax.lax.psum(out, "tp")
        return out, dispatched

    dispatch_specs = jax.tree.map(per_device, dispatch_after)
    # Scales split like their weights over the expert slots, whole over tp (tiny: one per block).
    scale_specs = None if scales is None else (P(up_spec[0], None, None),) * 2 + (P(down_spec[0], None, None),)
    scales = None if scales is None else tuple(scales)
    # Biases split like their weights: gate's and up's over the slots and tp, down's over the slots.
    bias_specs = None if biases is None else (P(up_spec[0], up_spec[2]),) * 2 + (P(down_spec[0], None),)
    biases = None if biases is None else tuple(biases)
    out, dispatched = jax.shard_map(
        run, mesh=mesh,
        in_specs=(token_spec, token_spec, token_spec, up_spec, up_spec, down_spec, scale_specs, bias_specs,
                  dispatch_specs, (token_spec,) * len(combine_after)),
        out_specs=(token_spec, _dispatch_out_specs(ep, dispatch_specs)), check_vma=False,
    )(x, phys_ids, weights.astype(jnp.float32), w_gate, w_up, w_down, scales, biases, dispatch_after, combine_after)
    return out[:num_tokens].astype(x.dtype), dispatched, out


def _dequantized(wg, wu, wd, scales, scale_block, dtype, tp_split: bool):
    """This rank's quantized (block-FP8 or MXFP4) experts in `dtype`: its tp shard of the
    intermediate axis (columns of gate and up, rows of down) starts at the tp index times the
    shard's size."""
    offset = jax.lax.axis_index("tp") * wg.shape[-1] if tp_split else 0
    gate_scale, up_scale, down_scale = scales
    return (dequantize_expert_weight(wg, gate_scale, scale_block, dtype, col_offset=offset),
            dequantize_expert_weight(wu, up_scale, scale_block, dtype, col_offset=offset),
            dequantize_expert_weight(wd, down_scale, scale_block, dtype, row_offset=offset))


def _dispatch_out_specs(ep: ExpertParallel, dispatch_after_specs):
    """Specs of a body's dispatch outputs, one per dispatch collective: all_to_all returns what
    each device received (rows [ranks, cap, H], their expert ids [ranks, cap]) and the agreed
    round count (a scalar, the same everywhere); allgather the tokens, ids and weights it
    gathered over dp (nothing with one dp shard: it passes its input on)."""
    device = ("dp", "ep", "tp")
    if ep.strategy == "allgather":
        if ep.mesh.shape["dp"] == 1:
            return dispatch_after_specs
        return (P(device, None), P(device, None), P(device, None))  # the gathered tokens, ids, weights
    return (P(device, None, None), P(device, None), P())


def _allgather_body(x, ids, w, experts: LocalExperts, ep, dispatch_after):
    """Every rank holds its dp shard's tokens and gathers the other shards': local experts on
    the assignments routed here. -> (partial output, dispatch outputs, combine: sum over ep and
    back to each dp shard)."""
    gather_dp = ep.mesh.shape["dp"] > 1
    dispatched = dispatch_after  # nothing dispatched with one dp shard: the order passes on
    if gather_dp:
        with jax.named_scope("dispatch"):
            x, ids, w = after((x, ids, w), *dispatch_after)
            x, ids, w = (jax.lax.all_gather(a, "dp", axis=0, tiled=True) for a in (x, ids, w))
            dispatched = (x, ids, w)
    num_local = experts.num_local
    top_k = ids.shape[1]
    local = ids - jax.lax.axis_index(EXPERT_AXES) * num_local
    here = (local >= 0) & (local < num_local)
    local = jnp.where(here, local, num_local).reshape(-1)
    rows = jnp.repeat(x, top_k, axis=0)
    out = local_experts(rows, local, w.reshape(-1), experts)
    out = out.reshape(x.shape[0], top_k, -1).sum(axis=1)

    def combine(out):
        out = jax.lax.psum(out, "ep")
        return jax.lax.psum_scatter(out, "dp", scatter_dimension=0, tiled=True) if gather_dp else out

    return out, dispatched, combine


def _capacity(num_assign: int, ep: ExpertParallel) -> int:
    """Rows per destination rank and round (worst case when capacity_factor is 0)."""
    if ep.capacity_factor == 0:
        return num_assign
    return max(1, min(num_assign, math.ceil(num_assign / ep.ep_size * ep.capacity_factor)))


def _agreed_rounds(ids, num_local: int, capacity: int, ep: ExpertParallel):
    """Dispatch rounds every rank runs: the most rows any rank sends to one destination, over
    the capacity, maximised across ranks (so all ranks run the same collectives). None (one
    round, nothing to agree) when overflow is dropped or the capacity is the worst case."""
    if ep.allow_drop or capacity == ids.size:
        return None
    counts = jnp.sum(jax.nn.one_hot(ids.reshape(-1) // num_local, ep.ep_size, dtype=jnp.int32), axis=0)
    return jax.lax.pmax((jnp.max(counts) + capacity - 1) // capacity, ("dp", "ep"))


def _all_to_all_body(x, ids, w, experts: LocalExperts, ep, dispatch_after):
    """This ep rank's 1/ep of its shard's tokens go to their experts' ranks and back.
    -> (this rank's outputs, dispatch outputs, combine: all-gather over ep)."""
    num_local = experts.num_local
    ep_size = ep.ep_size  # destinations: every expert rank
    num_tokens = x.shape[0] // ep.mesh.shape["ep"]
    start = jax.lax.axis_index("ep") * num_tokens
    x, ids, w = (jax.lax.dynamic_slice_in_dim(a, start, num_tokens) for a in (x, ids, w))
    top_k = ids.shape[1]
    num_assign = num_tokens * top_k
    capacity = _capacity(num_assign, ep)
    with jax.named_scope("dispatch"):
        x, ids = after((x, ids), *dispatch_after)
        rounds = _agreed_rounds(ids, num_local, capacity, ep)
    flat = ids.reshape(-1)
    dest = flat // num_local
    onehot = jax.nn.one_hot(dest, ep_size, dtype=jnp.int32)
    pos = (jnp.cumsum(onehot, axis=0) - onehot)[jnp.arange(num_assign), dest]  # rank within destination
    src_rows = jnp.repeat(x, top_k, axis=0)
    local_id = flat - dest * num_local
    weight = w.reshape(-1)

    def one_round(r, acc):
        in_round = (pos // capacity) == r
        slot = pos % capacity
        row_dest = jnp.where(in_round, dest, ep_size)  # out of range: dropped by the scatter
        with jax.named_scope("dispatch"):
            send = jnp.zeros((ep_size, capacity, x.shape[1]), x.dtype).at[row_dest, slot].set(src_rows, mode="drop")
            send_ids = jnp.full((ep_size, capacity), num_local, jnp.int32).at[row_dest, slot].set(local_id, mode="drop")
            recv = jax.lax.all_to_all(send, EXPERT_AXES, 0, 0)
            recv_ids = jax.lax.all_to_all(send_ids, EXPERT_AXES, 0, 0)
        y = local_experts(recv.reshape(-1, x.shape[1]), recv_ids.reshape(-1),
                          jnp.ones(recv_ids.size, jnp.float32), experts)
        with jax.named_scope("combine"):
            back = jax.lax.all_to_all(y.reshape(ep_size, capacity, -1), EXPERT_AXES, 0, 0)
            got = back[jnp.minimum(row_dest, ep_size - 1), slot]
            got = jnp.where(in_round[:, None], got * weight[:, None].astype(got.dtype), 0)
        return acc + got.reshape(num_tokens, top_k, -1).sum(axis=1), (recv, recv_ids)

    # The first round always runs outside any loop, so its collectives can overlap the other
    # microbatch's compute; rounds past the first (overflow) loop.
    acc, received = one_round(0, jnp.zeros((num_tokens, experts.hidden_size), jnp.float32))
    dispatched = (*received, jnp.int32(1) if rounds is None else rounds)
    if rounds is not None:
        acc = jax.lax.fori_loop(1, rounds, lambda r, a: one_round(r, a)[0], acc)
    gather = lambda out: jax.lax.all_gather(out, "ep", axis=0, tiled=True)  # noqa: E731
    return acc.astype(x.dtype), dispatched, gather
