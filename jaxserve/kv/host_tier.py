"""The host-memory KV tier (`cpu_kv_cache_bytes`): evicted prefix blocks live on in host RAM.

When to copy. A cached block leaves the device prefix cache only when the free list hands it out
again (`BlockPool.get_new_blocks`), inside `schedule()`, before the step that overwrites it is
dispatched. `HostTierConnector.blocks_evicted` then dispatches one batched gather of all the
blocks evicted at that moment (`KVBlockIO.gather`, one jitted call per 32 blocks) and starts its
device->host copy (`copy_to_host_async`); steps run in dispatch order, so the gather reads the old contents
and the host never waits. The next `start_load_kv` (one step later, the copy long done) turns the
copies into host arrays and frees the device buffer. So copies happen only on eviction of a
*cached* block, once per block, and loads only on a hit. The alternative, saving every cached
block when its ref count drops to zero, copies blocks that are never evicted (most of them, on a
pool that is not full); we rejected it for that.

The tier is an LRU map from chain hash to one block (`KVLayout.block_shape`: every layer's arrays, flattened),
bounded by `capacity_bytes`. A hit is loaded through `LoadingConnector` (one batched scatter).
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from concurrent.futures import Future

import numpy as np

from jaxserve.kv.block_io import KVBlockIO
from jaxserve.kv.connector import LoadingConnector
from jaxserve.kv.transfer import KVLayout, KVPayload


class HostKVTier:
    """LRU map chain hash -> host block, at most `capacity_bytes` of blocks."""

    def __init__(self, capacity_bytes: int, layout: KVLayout):
        if capacity_bytes < layout.block_bytes:
            raise ValueError(f"cpu_kv_cache_bytes must hold at least one block ({layout.block_bytes} bytes), "
                             f"got {capacity_bytes}")
        self.layout = layout
        self.capacity_blocks = capacity_bytes // layout.block_bytes
        self._blocks: collections.OrderedDict[bytes, np.ndarray] = collections.OrderedDict()
        self._pending: list[tuple[list[bytes], list]] = []  # (hashes, device chunks being copied)
        self.num_saved_blocks = 0
        self.num_dropped_blocks = 0

    def __len__(self) -> int:
        return len(self._blocks) + sum(len(h) for h, _ in self._pending)

    def put_device(self, block_hashes: Sequence[bytes], chunks: list) -> None:
        """Take blocks whose device->host copy is under way (`KVBlockIO.gather` chunks)."""
        self._pending.append((list(block_hashes), chunks))

    def materialize(self) -> None:
        """Move finished copies into the LRU map (waits only for a copy still in flight)."""
        pending, self._pending = self._pending, []
        for hashes, chunks in pending:
            host = KVBlockIO.to_host(chunks, len(hashes))
            for i, block_hash in enumerate(hashes):
                self.put(block_hash, host[i].copy())

    def put(self, block_hash: bytes, block: np.ndarray) -> None:
        self._blocks[block_hash] = block
        self._blocks.move_to_end(block_hash)
        self.num_saved_blocks += 1
        while len(self._blocks) > self.capacity_blocks:
            self._blocks.popitem(last=False)
            self.num_dropped_blocks += 1

    def lookup(self, block_hashes: Sequence[bytes]) -> int:
        if self._pending:
            self.materialize()
        count = 0
        while count < len(block_hashes) and block_hashes[count] in self._blocks:
            count += 1
        return count

    def fetch(self, block_hashes: Sequence[bytes]) -> Future[KVPayload]:
        """The blocks, already here: a resolved future. Fetching marks them most recently used."""
        for block_hash in block_hashes:
            self._blocks.move_to_end(block_hash)
        future: Future[KVPayload] = Future()
        future.set_result(KVPayload(self.layout, list(block_hashes),
                                    np.stack([self._blocks[h] for h in block_hashes])))
        return future


class HostTierConnector(LoadingConnector):
    """Saves cached blocks as they are evicted from the device; loads prefix hits from the tier."""

    def __init__(self, tier: HostKVTier):
        super().__init__(tier, tier.layout.block_size)
        self.tier = tier

    def blocks_evicted(self, block_ids, block_hashes):
        self.tier.put_device(block_hashes, self.block_io.gather(block_ids))

    def start_load_kv(self) -> None:
        self.tier.materialize()
        super().start_load_kv()
