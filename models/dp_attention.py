"""Data-parallel attention (vLLM / SGLang "DP attention"): each dp shard attends only to its own
requests, against its own slice of the KV cache.

A model built with a layout that has `dp_attention` (models/layout.py) runs every attention
layer this way. Layout with `dp` shards (jaxserve/model_runner.py builds the batch and the cache,
jaxserve/kv/sharded_cache_manager.py hands out the blocks):
- the KV cache is `[dp * B, block_size, kv_heads, head_dim]`, its block axis split over `dp`
  (`LOGICAL_RULES["cache_blocks"]`): shard s holds B blocks, addressed by local ids 0..B-1
  (local block 0 is that shard's null block);
- the step's flat batch is shard-major: tokens `[dp * T]` and rows `[dp * R]` (shard s owns
  tokens [s*T, (s+1)*T) and rows [s*R, (s+1)*R), every shard padded to the same bucket), with
  `query_start_loc [dp, R+1]` and `num_seqs [dp]` local to each shard; slot mappings and block
  tables hold local block ids.

`attend_per_shard` runs the cache write and the paged attention under `jax.shard_map` over the
mesh, so shard s's queries meet only shard s's cache slice and the cache never crosses devices.
Everything else in the layer (projections, norms, MLP, MoE over dp x ep) stays under the
compiler's sharding propagation, with weights replicated over dp.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
from jax.sharding import Mesh, PartitionSpec as P

from models.kv_spec import KVCache
from models.mesh import spec_for


def attend_per_shard(attend: Callable, q, k, v, kv_cache: KVCache, meta, mesh: Mesh):
    """`attend(q, k, v, kv_cache, meta) -> (out [T, H, D], kv_cache)` on every dp shard of `mesh`
    with its local tokens, rows and cache slice. q [dp*T, H, D], k/v [dp*T, KV, D]; `meta` is the
    shard-major AttentionMetadata of the module docstring."""
    return run_per_shard(lambda q, k, v, cache, meta: attend(q, k, v, cache, meta), (q, k, v), kv_cache, meta, mesh)


def run_per_shard(attend: Callable, tokens: tuple, kv_cache: KVCache, meta, mesh: Mesh):
    """`attend(*tokens, kv_cache, meta) -> (out, kv_cache)` per dp shard: each of `tokens` is
    [dp*T, ...] split over dp on its first axis (a head axis, the second of a 3-d array, split
    over tp when the cache's heads are); `out` is laid out like `tokens[0]`. A cache array is
    [blocks, block_size, heads, dim] (K/V) or [blocks, block_size, dim] (MLA's latent rows)."""
    cache = kv_cache.arrays[0]
    axes = ("cache_blocks", None, "cache_heads", None) if cache.ndim == 4 else ("cache_blocks",) + (None,) * (cache.ndim - 1)
    cache_spec = spec_for(axes, cache.shape, mesh)
    assert cache_spec[0] == "dp", f"the KV cache's block axis must be split over dp, got {cache_spec}"
    heads = cache_spec[2] if cache.ndim == 4 else None  # "tp" when the KV heads split over tp
    token_specs = tuple(P("dp", heads, None) if t.ndim == 3 else P("dp", *(None,) * (t.ndim - 1)) for t in tokens)
    # FP8 caches carry per-layer scalar scales, replicated.
    cache_specs = KVCache((cache_spec,) * len(kv_cache.arrays), (P(),) * len(kv_cache.scales))
    # Other KV groups' slots and tables (models/layers.py `for_window`): not this layer's.
    meta = dataclasses.replace(meta, group_slot_mapping=None, group_block_tables=None, group_windows=())
    meta_specs = dataclasses.replace(
        meta, slot_mapping=P("dp"), query_start_loc=P("dp", None), seq_lens=P("dp"),
        block_tables=P("dp", None), num_seqs=P("dp"),
        token_mask=None if meta.token_mask is None else P("dp"))

    def body(*args):
        *tokens, kv_cache, meta = args
        local = dataclasses.replace(meta, query_start_loc=meta.query_start_loc[0], num_seqs=meta.num_seqs[0])
        return attend(*tokens, kv_cache, local)

    with jax.named_scope("dp_attention"):
        return jax.shard_map(
            body, mesh=mesh, in_specs=(*token_specs, cache_specs, meta_specs),
            out_specs=(token_specs[0], cache_specs), check_vma=False,
        )(*tokens, kv_cache, meta)
