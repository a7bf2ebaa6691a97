"""Dual-batch overlap (DBO): the step's tokens run through the decoder layers as two microbatches,
so that on GPU/TPU XLA's asynchronous collectives can carry one microbatch's expert-parallel
dispatch and combine while the other computes its attention or its experts (vLLM's DBO, SGLang's
two-batch overlap).

The split: every dp shard's `T` tokens (the flat batch is shard-major, models/dp_attention.py)
run as two microbatches of `T / 2` tokens: microbatch 0 holds the shard's first `ceil(n / 2)`
real tokens (n of them this step), microbatch 1 the rest, each padded to `T / 2` (so a decode
step of 4 rows in a 16-token bucket runs 2 + 2, not 4 + 0). A row (sequence) whose new tokens
straddle the cut is in both: microbatch 0 sees its first tokens with a KV length shortened by the
tokens of microbatch 1, and microbatch 1 sees the rest with the full KV length
(`split_metadata`). Each microbatch's stages run under its own named scope (`microbatch0`,
`microbatch1`), which labels them in the compiled HLO and in profiles.

A model built with a layout that has `dbo_min_tokens` (models/layout.py) runs its layers here
(`run_layers`) when a step splits (`splits`). This module composes the layers' stages itself (the
attention before and after its output projection, `Attention.attend_heads`; a dense MLP before
and after its down projection, `DenseMLP.hidden`; a MoE block's routing, experts and shared
expert, with `ep_moe_ffn` for expert parallelism), so that the collective order below is known
here and in the expert-parallel dispatch only. Each layer traces, in the overlapped schedule's
compute order, attention of microbatch 0 and 1, then the feed-forward (MoE) block of 0 and 1.
Per layer l (A: attention, D/E/C: MoE dispatch / experts / combine):
      compute:      A0(l)  A1(l)  E0(l)  E1(l)  A0(l+1) ...
      collectives:         D0(l)  D1(l)  C0(l)  C1(l)
- microbatch 0 reads nothing of microbatch 1, ever;
- microbatch 1 reads microbatch 0 through the layer's KV cache: microbatch 0 writes its new K/V
  first, so a straddling row's second half attends to its first half (A1(l) after A0(l));
- `CollectiveOrder` chains the collectives of the two microbatches in the schedule's order
  (optimization barriers: dependences, no data moved, models/ordering.py). XLA's combiners
  merge independent collectives of one kind, and a collective merged from both microbatches
  makes each wait for the other; chained, none is independent. The chain's waits are on stages the schedule has
  finished anyway (e.g. C0(l) waits for A1(l), the o_proj reduction of A0(l+1) for C1(l)).
So each pair in a column (D0(l) | A1(l), D1(l) | E0(l), C0(l) | E1(l), C1(l) | A0(l+1)'s
attention core) is independent in both directions. tests/jaxserve/test_parallel.py checks the
compiled engine step under EP, EP x TP and DP x EP with both dispatch strategies
(tests/models/hlo_deps.py `dbo_overlap_report`): no collective merged from both microbatches, and no
data dependence across a pair. XLA:CPU expands the barriers before it schedules, so that check
sees data dependences only; XLA:GPU keeps them through its scheduler, and expands them after.

Below `dbo_min_tokens` tokens per dp shard (the step's bucket; vLLM splits decode batches from 32
tokens per DP rank), or with an odd bucket, the step is not split.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from models.expert_parallel import ep_moe_ffn
from models.layers import DenseMLP
from models.layout import ParallelLayout
from models.ordering import after


def splits(layout: ParallelLayout, num_tokens: int) -> bool:
    """Whether a step of `num_tokens` flat tokens ([dp * T], shard-major) runs as two microbatches."""
    if layout.dbo_min_tokens is None:
        return False
    per_shard = num_tokens // layout.dp_size
    return per_shard % 2 == 0 and per_shard >= max(2, layout.dbo_min_tokens)


def token_cuts(meta, dp_size: int) -> jax.Array:
    """Where each dp shard's tokens split: half of its real tokens (rounded up), int32 [dp]."""
    cu = meta.query_start_loc.reshape(dp_size, -1)
    real = jnp.take_along_axis(cu, meta.num_seqs.reshape(dp_size, 1), axis=1)[:, 0]
    return (real + 1) // 2


def split_tokens(a: jax.Array, dp_size: int, cuts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[dp * T, ...] shard-major -> two [dp * T/2, ...] arrays: shard s's tokens from 0 and from
    cuts[s] (T/2 of each; microbatch 0's tokens past the cut belong to microbatch 1)."""
    shards = a.reshape(dp_size, -1, *a.shape[1:])
    half = shards.shape[1] // 2
    second = jax.vmap(lambda s, c: jax.lax.dynamic_slice_in_dim(s, c, half))(shards, cuts)
    return shards[:, :half].reshape(-1, *a.shape[1:]), second.reshape(-1, *a.shape[1:])


def merge_tokens(a0: jax.Array, a1: jax.Array, dp_size: int, cuts: jax.Array) -> jax.Array:
    """Inverse of `split_tokens`: token t of shard s from microbatch 0 below cuts[s], else 1."""
    first = a0.reshape(dp_size, -1, *a0.shape[1:])
    second = a1.reshape(dp_size, -1, *a1.shape[1:])
    half = first.shape[1]
    token = jnp.arange(2 * half, dtype=jnp.int32)[None, :]
    cut = cuts[:, None]
    lower = jnp.take_along_axis(first, _expand(jnp.minimum(token, half - 1), first), axis=1)
    upper = jnp.take_along_axis(second, _expand(jnp.clip(token - cut, 0, half - 1), second), axis=1)
    merged = jnp.where(_expand(token < cut, first), lower, upper)
    return merged.reshape(-1, *a0.shape[1:])


def _expand(index: jax.Array, like: jax.Array) -> jax.Array:
    """[dp, n] -> [dp, n, 1, ...] broadcastable against `like`'s trailing dims."""
    index = jnp.broadcast_to(index, (like.shape[0], index.shape[1]))
    return index.reshape(index.shape + (1,) * (like.ndim - 2))


def split_metadata(meta, dp_size: int, cuts: jax.Array):
    """The AttentionMetadata (models/layers.py) of each microbatch. Both keep every row, the
    block tables and `num_seqs`; a row's new tokens outside a microbatch make it a zero-query row
    there (its cumulative offsets repeat). `query_start_loc` is [R+1], or [dp, R+1] per shard.
    Microbatch 0's tokens past the cut (microbatch 1's) write no K/V and count as padding."""
    cu = meta.query_start_loc.reshape(dp_size, -1)
    cut = cuts[:, None]
    # Each row's tokens in microbatch 1.
    in_second = (jnp.maximum(cu[:, 1:], cut) - jnp.maximum(cu[:, :-1], cut)).reshape(-1)
    shape = meta.query_start_loc.shape
    slots0, slots1 = split_tokens(meta.slot_mapping, dp_size, cuts)
    half = slots0.shape[0] // dp_size
    mine = (jnp.arange(half, dtype=jnp.int32)[None, :] < cut).reshape(-1)
    mask0, mask1 = (mine, None) if meta.token_mask is None else split_tokens(meta.token_mask, dp_size, cuts)
    groups0 = groups1 = meta.group_slot_mapping  # KV groups' slots (models/layers.py), split alike
    if groups0 is not None:
        halves = [split_tokens(slots, dp_size, cuts) for slots in groups0]
        groups0 = jnp.stack([jnp.where(mine, h[0], 0) for h in halves])
        groups1 = jnp.stack([h[1] for h in halves])
    first = dataclasses.replace(
        meta, slot_mapping=jnp.where(mine, slots0, 0), query_start_loc=jnp.minimum(cu, cut).reshape(shape),
        seq_lens=meta.seq_lens - in_second, token_mask=mask0 & mine, group_slot_mapping=groups0)
    second = dataclasses.replace(
        meta, slot_mapping=slots1, query_start_loc=(jnp.maximum(cu, cut) - cut).reshape(shape), token_mask=mask1,
        group_slot_mapping=groups1)
    return first, second


@dataclasses.dataclass(frozen=True)
class CollectiveOrder:
    """What the forward traced last of each stage kind: the next stage of a kind is ordered
    after it (`after`, an `optimization_barrier`: a dependence, no data moved). Each stage below
    takes the order and returns it with its own outputs in place.

    The chains follow the overlapped schedule (module docstring), so they cost no overlap, and
    they leave no two collectives of the two microbatches independent of each other: XLA's
    combiners merge independent collectives of one kind, and one merged from both microbatches
    makes each wait for the other. Kinds:
    - attention: the last attention stage's output;
    - dispatch: the last expert-parallel dispatch's outputs (models/expert_parallel.py);
    - combine: the last expert-parallel combine's output;
    - feed_forward: the last dense (or local MoE, or shared expert) feed-forward output.
    An attention's output projection (its tensor-parallel reduction) waits on the last
    attention, combine and feed-forward; a dispatch on the last dispatch; a combine on the last
    combine and attention; a dense down projection on the last attention and feed-forward.
    Every such wait is on a stage the schedule has finished by then, so none delays the overlap,
    and dependences are whole collective outputs (XLA may rewrite a slice of an all-reduce into
    an all-reduce of a slice, which would then depend on nothing)."""

    attention: jax.Array | None = None
    feed_forward: jax.Array | None = None
    dispatch: tuple = ()
    combine: jax.Array | None = None


def run_layers(layers, x, positions, kv_caches: list, meta, dp_size: int):
    """The decoder layers over two microbatches (module docstring); -> (x, new caches). Each
    layer traces attention 0, attention 1, feed-forward 0, feed-forward 1, the overlapped
    schedule's compute order, and `CollectiveOrder` chains their collectives in that order."""
    cuts = token_cuts(meta, dp_size)
    xs = list(split_tokens(x, dp_size, cuts))
    pos = split_tokens(positions, dp_size, cuts)
    metas = split_metadata(meta, dp_size, cuts)
    order = CollectiveOrder()
    new_caches = []
    for index, (layer, kv_cache) in enumerate(zip(layers, kv_caches)):
        with jax.named_scope(f"layer{index}"):
            for half in (0, 1):
                with jax.named_scope(f"microbatch{half}"):
                    xs[half], kv_cache, order = _attention(layer, xs[half], pos[half], kv_cache, metas[half], order)
            for half in (0, 1):
                with jax.named_scope(f"microbatch{half}"):
                    xs[half], order = _feed_forward(layer, xs[half], metas[half].token_mask, order)
        new_caches.append(kv_cache)
    return merge_tokens(xs[0], xs[1], dp_size, cuts), new_caches


def _attention(layer, x, positions, kv_cache, meta, order: CollectiveOrder):
    """x + attention(norm(x)) (a models.transformer.DecoderLayer's first half); the output
    projection runs after the last attention, combine and feed-forward."""
    attn = layer.self_attn
    with jax.named_scope("attention"):
        heads, kv_cache = attn.attend_heads(layer.input_layernorm(x), positions, kv_cache, meta)
        x = x + attn.o_proj(after(heads, order.attention, order.combine, order.feed_forward))
    return x, kv_cache, dataclasses.replace(order, attention=x)


def _feed_forward(layer, x, token_mask, order: CollectiveOrder):
    """x + mlp(norm(x)) (the layer's second half), the mlp dense or MoE (models/moe.py)."""
    h = layer.post_attention_layernorm(x)
    if isinstance(layer.mlp, DenseMLP):
        out, order = _dense(layer.mlp, h, order)
    else:
        out, order = _moe(layer.mlp, h, token_mask, order)
    return x + out, order


def _dense(mlp: DenseMLP, x, order: CollectiveOrder):
    """The down projection runs after the last attention and feed-forward."""
    out = mlp.down_proj(after(mlp.hidden(x), order.attention, order.feed_forward))
    return out, dataclasses.replace(order, feed_forward=out)


def _moe(block, x, token_mask, order: CollectiveOrder):
    """A models.moe.SparseMoEBlock: expert parallelism orders its dispatch and combine (in
    `ep_moe_ffn`); local experts wait, as a dense block's reduction does, on the last attention
    and feed-forward; a shared expert is a dense block."""
    if block.ep is None:
        x = after(x, order.attention, order.feed_forward)
        out = block.local_ffn(x)
        order = dataclasses.replace(order, feed_forward=out)
    else:
        out, dispatched, combined = ep_moe_ffn(
            x, *block.assign(x, token_mask), *block.experts.weights(), block.ep, **block.experts.ffn_options(),
            dispatch_after=order.dispatch, combine_after=(order.combine, order.attention))
        order = dataclasses.replace(order, dispatch=dispatched, combine=combined)
    if block.shared_expert is not None:
        shared, order = _dense(block.shared_expert, x, order)
        out = out + block.shared_gate(x) * shared
    return out, order
