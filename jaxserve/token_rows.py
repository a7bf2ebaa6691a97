"""Where each token of a step's flat, padded batch belongs: its row, its offset in the row,
whether it is real (the model runner's step and a draft head's catch-up pass read the same)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def shard_token_rows(cu, num_seqs, num_tokens: int):
    """Each of a shard's `num_tokens` tokens: its row, its offset within the row, whether it is real."""
    num_rows = cu.shape[0] - 1
    token = jnp.arange(num_tokens, dtype=jnp.int32)
    row = jnp.minimum(jnp.searchsorted(cu[1:], token, side="right"), num_rows - 1)
    return row, token - cu[row], token < cu[num_seqs]


def token_rows(cu, num_seqs, num_tokens: int):
    """`shard_token_rows` for each dp shard ([dp, R+1] offsets, `num_tokens` per shard),
    flattened shard-major; also each row's last token and query length."""
    dp, num_rows = cu.shape[0], cu.shape[1] - 1
    row, offset, valid = jax.vmap(lambda c, n: shard_token_rows(c, n, num_tokens))(cu, num_seqs)
    row = row + (jnp.arange(dp, dtype=jnp.int32) * num_rows)[:, None]
    last = jnp.maximum(cu[:, 1:] - 1, 0) + (jnp.arange(dp, dtype=jnp.int32) * num_tokens)[:, None]
    q_lens = cu[:, 1:] - cu[:, :-1]
    return row.reshape(-1), offset.reshape(-1), valid.reshape(-1), last.reshape(-1), q_lens.reshape(-1)
