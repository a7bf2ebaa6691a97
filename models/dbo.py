"""Dual-batch overlap (DBO): a rank's tokens split into two microbatches whose expert-parallel
chains (dispatch collectives, expert matmuls, combine collectives) share no data, so XLA's
asynchronous collectives on GPU/TPU can run one microbatch's all-gather / all_to_all /
reduce-scatter while the other computes. Each chain runs under its own named scope
(`microbatch0`, `microbatch1`), which also labels it in the compiled HLO and in profiles.

Scope: the split is inside the expert-parallel MoE block (where the collectives are);
attention runs on the whole batch. Below `dbo_min_tokens` tokens per rank the batch is not split.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def dbo_applies(num_tokens: int, token_shards: int, min_tokens: int) -> bool:
    """Split when DBO is on and each rank holds at least `min_tokens` (>= 2) tokens."""
    return min_tokens > 0 and num_tokens // token_shards >= max(2, min_tokens)


def two_microbatches(chain: Callable, token_args: tuple, shared_args: tuple) -> jax.Array:
    """chain(*token_args, *shared_args) on the first and second halves of the token arrays
    (leading dim), as two independent chains; the outputs concatenate in order."""
    half = token_args[0].shape[0] // 2
    outs = []
    for index, part in enumerate((slice(0, half), slice(half, None))):
        with jax.named_scope(f"microbatch{index}"):
            outs.append(chain(*(a[part] for a in token_args), *shared_args))
    return jnp.concatenate(outs, axis=0)
