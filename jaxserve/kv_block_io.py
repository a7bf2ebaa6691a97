"""Whole KV blocks in and out of the runner's per-layer caches, in dispatch order.

`gather` and `scatter` are jitted and dispatched like a step: the device runs them in program
order with the steps, so a gather dispatched before the step that reuses its blocks reads the old
contents, and a scatter dispatched before the step that reads its blocks is seen by it. Neither
waits for the device. Block counts are padded to powers of two (padding reads block 0, the null
block, and scatters out of range, dropped), so only a few shapes ever compile.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.kv_transfer import KVLayout


class KVBlockIO:
    """Reads and writes whole blocks of `runner.kv_caches` (a list of per-layer (K, V) arrays)."""

    def __init__(self, runner, layout: KVLayout):
        self.runner = runner
        self.layout = layout
        self.num_blocks = runner.num_blocks
        self._gather = jax.jit(_gather)
        self._scatter = jax.jit(_scatter, donate_argnums=(0,))

    def gather(self, block_ids: Sequence[int]) -> jax.Array:
        """Device array [pow2 >= len(block_ids), *layout.block_shape]; rows past the ids are padding."""
        ids = np.zeros(_pow2(len(block_ids)), np.int32)
        ids[: len(block_ids)] = block_ids
        return self._gather(self.runner.kv_caches, jnp.asarray(ids))

    def scatter(self, block_ids: Sequence[int], blocks: np.ndarray) -> None:
        """Write `blocks` [len(block_ids), *layout.block_shape] into those blocks of the cache."""
        assert len(block_ids) == len(blocks), (len(block_ids), blocks.shape)
        size = _pow2(len(block_ids))
        ids = np.full(size, self.num_blocks, np.int32)  # out of range: dropped
        ids[: len(block_ids)] = block_ids
        padded = np.zeros((size, *self.layout.block_shape), blocks.dtype)
        padded[: len(blocks)] = blocks
        self.runner.kv_caches = self._scatter(self.runner.kv_caches, jnp.asarray(ids), jnp.asarray(padded))


def _gather(kv_caches, block_ids):
    # [layers, 2, n, B, H, D] -> [n, layers, 2, B, H, D]
    stacked = jnp.stack([jnp.stack([k[block_ids], v[block_ids]]) for k, v in kv_caches])
    return jnp.moveaxis(stacked, 2, 0)


def _scatter(kv_caches, block_ids, blocks):
    return [(k.at[block_ids].set(blocks[:, layer, 0].astype(k.dtype), mode="drop"),
             v.at[block_ids].set(blocks[:, layer, 1].astype(v.dtype), mode="drop"))
            for layer, (k, v) in enumerate(kv_caches)]


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()
