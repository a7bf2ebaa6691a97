"""Whole KV blocks in and out of the runner's per-layer caches, in dispatch order.

`gather` and `scatter` are jitted and dispatched like a step: the device runs them in program
order with the steps, so a gather dispatched before the step that reuses its blocks reads the old
contents, and a scatter dispatched before the step that reads its blocks is seen by it. Neither
waits for the device. Blocks move in chunks of at most `MAX_CHUNK_BLOCKS`, each padded to a power
of two (padding reads block 0, the null block, and scatters out of range, dropped), so
`warmup()` compiles every shape there is and a first eviction or hit never compiles.

Over a mesh, chunks are replicated on every device (the gather all-gathers the heads a tp split
spread), so each process reads whole blocks from its own devices: multi-host processes each keep
the same host copy, and a scatter's input is the same on every process.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.kv.transfer import KVLayout
from models.mesh import host_value

MAX_CHUNK_BLOCKS = 32


class KVBlockIO:
    """Reads and writes whole blocks of `runner.kv_caches` (one `KVCache` per layer,
    models/kv_spec.py): a block is every layer's arrays at that block, flattened in spec order;
    blocks move as stored (an FP8 cache's scales stay)."""

    def __init__(self, runner, layout: KVLayout):
        self.runner = runner
        self.layout = layout
        self.num_blocks = runner.num_blocks
        # Chunks and scatter inputs live replicated where the step's replicated inputs do.
        self._placement = runner.device if runner.mesh is not None else None
        self._gather = jax.jit(_gather, out_shardings=self._placement)
        self._scatter = jax.jit(_scatter, donate_argnums=(0,))

    def gather(self, block_ids: Sequence[int]) -> list[jax.Array]:
        """Device chunks [pow2, *layout.block_shape] holding the blocks in order (then padding rows);
        start their host copies, and read them with `to_host`."""
        chunks = []
        for start in range(0, len(block_ids), MAX_CHUNK_BLOCKS):
            part = block_ids[start: start + MAX_CHUNK_BLOCKS]
            ids = np.zeros(_pow2(len(part)), np.int32)
            ids[: len(part)] = part
            chunk = self._gather(self.runner.kv_caches, self._put(ids))
            chunk.copy_to_host_async()
            chunks.append(chunk)
        return chunks

    @staticmethod
    def to_host(chunks: Sequence[jax.Array], num_blocks: int) -> np.ndarray:
        """The first `num_blocks` rows of gathered chunks as one host array (waits for the copies)."""
        return np.concatenate([host_value(chunk) for chunk in chunks])[:num_blocks]

    def scatter(self, block_ids: Sequence[int], blocks: np.ndarray) -> None:
        """Write `blocks` [len(block_ids), *layout.block_shape] into those blocks of the cache."""
        assert len(block_ids) == len(blocks), (len(block_ids), blocks.shape)
        for start in range(0, len(block_ids), MAX_CHUNK_BLOCKS):
            part = block_ids[start: start + MAX_CHUNK_BLOCKS]
            size = _pow2(len(part))
            ids = np.full(size, self.num_blocks, np.int32)  # out of range: dropped
            ids[: len(part)] = part
            padded = np.zeros((size, *self.layout.block_shape), blocks.dtype)
            padded[: len(part)] = blocks[start: start + len(part)]
            self.runner.kv_caches = self._scatter(self.runner.kv_caches, self._put(ids), self._put(padded))

    def _put(self, host: np.ndarray) -> jax.Array:
        """On the device, or replicated over the mesh (every process passes the same value)."""
        return jnp.asarray(host) if self._placement is None else jax.device_put(host, self._placement)

    def warmup(self) -> None:
        """Compile the gather and the scatter for every chunk size (scatters hit no block)."""
        size = 1
        while size <= MAX_CHUNK_BLOCKS:
            self._gather(self.runner.kv_caches, self._put(np.zeros(size, np.int32)))
            blocks = np.zeros((size, *self.layout.block_shape), self.runner.kv_caches[0].dtype)
            ids = np.full(size, self.num_blocks, np.int32)
            self.runner.kv_caches = self._scatter(self.runner.kv_caches, self._put(ids), self._put(blocks))
            size *= 2
        jax.block_until_ready(self.runner.kv_caches)


def _gather(kv_caches, block_ids):
    """-> [n, block elements]: for each block, every layer's arrays at it, flattened."""
    n = block_ids.shape[0]
    return jnp.concatenate([a[block_ids].reshape(n, -1) for cache in kv_caches for a in cache.arrays], axis=1)


def _scatter(kv_caches, block_ids, blocks):
    """Inverse of `_gather`: `blocks` [n, block elements] written into those blocks."""
    out, at = [], 0
    for cache in kv_caches:
        arrays = []
        for a in cache.arrays:
            size = a[0].size
            part = blocks[:, at: at + size].reshape(-1, *a.shape[1:]).astype(a.dtype)
            arrays.append(a.at[block_ids].set(part, mode="drop"))
            at += size
        out.append(cache.replace(*arrays))
    return out


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()
