"""Dual-batch overlap's split (models/dbo.py): token and metadata halves against the unsplit
batch, and a model forward run as two microbatches against the same forward run whole."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.dbo import merge_tokens, split_metadata, split_tokens, splits, token_cuts
from models.layers import AttentionMetadata
from models.kv_spec import KVCache
from models.layout import ParallelLayout
from models.mesh import make_mesh
from models.registry import with_layout
from tests.engine_utils import tiny_config, tiny_loaded_model

BLOCK_SIZE = 4


def ragged_meta(prior: list[list[int]], q_lens: list[list[int]], num_tokens: int, num_rows: int):
    """Shard-major metadata for dp = len(prior) shards: per shard, rows with `prior` cached
    tokens and `q_lens` new ones, padded to `num_tokens` tokens and `num_rows` rows; every row
    owns its own blocks. -> (AttentionMetadata, positions [dp * T])."""
    dp = len(prior)
    width = 4
    cu = np.zeros((dp, num_rows + 1), np.int32)
    seq_lens = np.zeros(dp * num_rows, np.int32)
    tables = np.zeros((dp * num_rows, width), np.int32)
    slots = np.zeros(dp * num_tokens, np.int32)
    positions = np.zeros(dp * num_tokens, np.int32)
    mask = np.zeros(dp * num_tokens, bool)
    for s in range(dp):
        cu[s, 1:len(q_lens[s]) + 1] = np.cumsum(q_lens[s])
        cu[s, len(q_lens[s]) + 1:] = cu[s, len(q_lens[s])]
        for r, (p, q) in enumerate(zip(prior[s], q_lens[s])):
            row = s * num_rows + r
            seq_lens[row] = p + q
            tables[row] = 1 + width * row + np.arange(width)
            for j in range(q):
                token = s * num_tokens + cu[s, r] + j
                pos = p + j
                positions[token] = pos
                slots[token] = tables[row, pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
                mask[token] = True
    meta = AttentionMetadata(
        slot_mapping=jnp.asarray(slots), query_start_loc=jnp.asarray(cu if dp > 1 else cu[0]),
        seq_lens=jnp.asarray(seq_lens), block_tables=jnp.asarray(tables),
        num_seqs=jnp.asarray([len(q) for q in q_lens] if dp > 1 else len(q_lens[0]), jnp.int32),
        token_mask=jnp.asarray(mask))
    return meta, jnp.asarray(positions)


CASES = [
    # one shard: a prefill chunk straddles the cut, decodes on both sides, padding rows
    ([[6, 3, 0, 9]], [[5, 1, 7, 1]], 16, 6),
    # two shards with different real counts (one with a single decode), an odd count
    ([[2, 0], [5]], [[3, 8], [1]], 16, 3),
    # four decode rows in a 16-token bucket: 2 + 2, not 4 + 0
    ([[4, 7, 1, 3]], [[1, 1, 1, 1]], 16, 4),
]


@pytest.mark.parametrize("prior,q_lens,num_tokens,num_rows", CASES)
def test_split_covers_every_token_once_and_keeps_rows_whole(prior, q_lens, num_tokens, num_rows):
    dp = len(prior)
    meta, _ = ragged_meta(prior, q_lens, num_tokens, num_rows)
    cuts = token_cuts(meta, dp)
    real = np.array([sum(q) for q in q_lens])
    np.testing.assert_array_equal(np.asarray(cuts), (real + 1) // 2)
    first, second = split_metadata(meta, dp, cuts)
    # Token counts: ceil(n/2) and floor(n/2) real tokens per shard.
    for half, expected in ((first, (real + 1) // 2), (second, real // 2)):
        mask = np.asarray(half.token_mask).reshape(dp, -1)
        np.testing.assert_array_equal(mask.sum(axis=1), expected)
    # Per row: the two query lengths add up, and microbatch 0's KV length excludes the tokens
    # that microbatch 1 computes.
    cu = np.asarray(meta.query_start_loc).reshape(dp, -1)
    cu0 = np.asarray(first.query_start_loc).reshape(dp, -1)
    cu1 = np.asarray(second.query_start_loc).reshape(dp, -1)
    q = np.diff(cu, axis=1).reshape(-1)
    q0, q1 = np.diff(cu0, axis=1).reshape(-1), np.diff(cu1, axis=1).reshape(-1)
    np.testing.assert_array_equal(q0 + q1, q)
    live = np.concatenate([np.arange(num_rows) < len(qs) for qs in q_lens])
    np.testing.assert_array_equal((np.asarray(meta.seq_lens) - np.asarray(first.seq_lens))[live], q1[live])
    np.testing.assert_array_equal(first.seq_lens[live] >= q0[live], True)
    # Tokens: microbatch k's query rows hold exactly the row's tokens in order, and slots of
    # microbatch 0's borrowed tail are the null block.
    ids = jnp.arange(dp * num_tokens)
    t0, t1 = (np.asarray(a).reshape(dp, -1) for a in split_tokens(ids, dp, cuts))
    flat = np.asarray(ids).reshape(dp, -1)
    for s in range(dp):
        for r in range(len(q_lens[s])):
            row_tokens = flat[s, cu[s, r]:cu[s, r + 1]].tolist()
            got = t0[s, cu0[s, r]:cu0[s, r + 1]].tolist() + t1[s, cu1[s, r]:cu1[s, r + 1]].tolist()
            assert got == row_tokens, (s, r)
    slots0 = np.asarray(first.slot_mapping).reshape(dp, -1)
    mask0 = np.asarray(first.token_mask).reshape(dp, -1)
    assert (slots0[~mask0] == 0).all()
    # Merging restores every real token's value.
    values = jnp.asarray(np.random.default_rng(0).normal(size=(dp * num_tokens, 3)), jnp.float32)
    merged = merge_tokens(*split_tokens(values, dp, cuts), dp, cuts)
    mask = np.asarray(meta.token_mask)
    np.testing.assert_array_equal(np.asarray(merged)[mask], np.asarray(values)[mask])


@pytest.mark.parametrize("architecture,overrides", [
    ("LlamaForCausalLM", {}),
    ("MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32)),
    # shared expert, and a dense layer (layer 0) beside a MoE layer
    ("Qwen2MoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                 shared_expert_intermediate_size=48, mlp_only_layers=[0])),
])
def test_two_microbatch_forward_matches_whole_batch(architecture, overrides):
    """Straddling prefill rows, decodes, zero-query rows and padding: hidden states of every real
    token and the written KV cache equal the unsplit forward's (float32; sums in a different
    order, so 1e-5)."""
    loaded = tiny_loaded_model(tiny_config(architecture, **overrides))
    model, cfg = loaded.model, loaded.config
    prior, q_lens, num_tokens, num_rows = CASES[0]
    meta, positions = ragged_meta(prior, q_lens, num_tokens, num_rows)
    rng = np.random.default_rng(1)
    ids = jnp.asarray(rng.integers(2, cfg.vocab_size, num_tokens), jnp.int32)
    shape = (32, BLOCK_SIZE, cfg.num_kv_heads, cfg.head_dim)
    caches = [KVCache(tuple(jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(2)))
              for _ in range(cfg.num_layers)]

    forward = jax.jit(lambda m, *a: m(*a))
    want, want_caches = forward(model, ids, positions, caches, meta)
    # One device: the layout's mesh only sets the split (one dp shard); MoE experts stay local.
    layout = ParallelLayout(make_mesh(), dbo_min_tokens=2)
    assert splits(layout, num_tokens)
    got, got_caches = forward(with_layout(model, layout), ids, positions, caches, meta)
    mask = np.asarray(meta.token_mask)
    np.testing.assert_allclose(np.asarray(got)[mask], np.asarray(want)[mask], rtol=1e-5, atol=1e-5)
    for got_layer, want_layer in zip(got_caches, want_caches):
        for g, w in zip(got_layer.arrays, want_layer.arrays):
            np.testing.assert_allclose(np.asarray(g)[1:], np.asarray(w)[1:], rtol=1e-5, atol=1e-5)

