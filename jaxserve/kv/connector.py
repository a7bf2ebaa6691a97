"""The KV connector: how KV computed elsewhere enters the engine, and how ours leaves it.

One object with two sides (vLLM V1's `KVConnectorBase_V1`, in one process):

Scheduler side, called by the `Scheduler`:
- `get_num_new_matched_tokens(request, block_hashes, num_computed_tokens)`: how many tokens past the
  local prefix-cache hit can be loaded from outside (whole blocks; never the last token, whose
  logits must be computed).
- `update_state_after_alloc(request, block_ids, block_hashes)`: blocks were allocated for them;
  start loading. The request waits in `WAITING_FOR_KV`, holding its blocks, using no budget.
- `get_finished_loading()`: requests whose loads are now ordered before any later step, with the
  tokens actually loaded (0 when a load failed: the request recomputes into the same blocks).
- `request_finished(request, block_ids, block_hashes)`: before its blocks are freed (a producer
  saves them; a load still in flight is cancelled).
- `blocks_evicted(block_ids, block_hashes)`: cached blocks about to be reused (a host tier saves them).

Worker side, called by the engine after scheduling and before dispatching the step:
- `bind(block_io)`: the runner's caches, and the handshake when there is another side.
- `warmup()`: compile what it will dispatch (engines with `compile_at_startup`).
- `start_load_kv()`: write the blocks whose bytes have arrived (dispatched, not waited for), so a
  load overlaps the steps that run while its bytes travel.

`KVConnector` itself does nothing, so the scheduler calls it unconditionally. `LoadingConnector`
holds the load path shared by the host tier and the decode side of disaggregation: any source with
`lookup(hashes) -> int` and `fetch(hashes) -> Future[KVPayload]`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Protocol

from jaxserve.kv.block_io import KVBlockIO
from jaxserve.kv.transfer import KVPayload
from jaxserve.request import Request

logger = logging.getLogger("jaxserve.kv.connector")


class KVConnector:
    """The no-op connector (see the module docstring for each call)."""

    block_io: KVBlockIO | None = None
    # vLLM's external (connector) prefix-cache counters, in tokens: a request's tokens when first
    # asked of the connector, and the tokens actually loaded from it (kept apart from the device
    # prefix cache's own queries and hits).
    external_prefix_cache_queries: int = 0
    external_prefix_cache_hits: int = 0

    def bind(self, block_io: KVBlockIO) -> None:
        self.block_io = block_io

    def warmup(self) -> None:
        pass

    # ---- scheduler side ----

    def get_num_new_matched_tokens(self, request: Request, block_hashes: Sequence[bytes],
                                   num_computed_tokens: int) -> int:
        return 0

    def update_state_after_alloc(self, request: Request, block_ids: Sequence[int],
                                 block_hashes: Sequence[bytes]) -> None:
        raise AssertionError("update_state_after_alloc without a matched token")

    def get_finished_loading(self) -> dict[str, int]:
        return {}

    def request_finished(self, request: Request, block_ids: Sequence[int], block_hashes: Sequence[bytes]) -> None:
        pass

    def blocks_evicted(self, block_ids: Sequence[int], block_hashes: Sequence[bytes]) -> None:
        pass

    # ---- worker side ----

    def start_load_kv(self) -> None:
        pass


class BlockSource(Protocol):
    """Somewhere full blocks can be loaded from, by chain hash."""

    def lookup(self, block_hashes: Sequence[bytes]) -> int: ...

    def fetch(self, block_hashes: Sequence[bytes]) -> Future[KVPayload]: ...


@dataclasses.dataclass
class _Load:
    block_ids: list[int]
    future: Future


class LoadingConnector(KVConnector):
    """Loads the longest run of a request's next full blocks that `source` holds."""

    def __init__(self, source: BlockSource, block_size: int):
        self.source = source
        self.block_size = block_size
        self._loads: dict[str, _Load] = {}
        self._finished: dict[str, int] = {}
        self.num_loaded_blocks = 0
        self.num_failed_loads = 0
        self.external_prefix_cache_queries = 0
        self.external_prefix_cache_hits = 0
        self._queried: set[str] = set()  # requests counted in external_prefix_cache_queries

    def warmup(self) -> None:
        self.block_io.warmup()

    def get_num_new_matched_tokens(self, request, block_hashes, num_computed_tokens):
        if request.skip_prefix_cache:
            return 0
        if request.request_id not in self._queried:  # a request may wait several steps: count it once
            self._queried.add(request.request_id)
            self.external_prefix_cache_queries += request.num_tokens
        first = num_computed_tokens // self.block_size
        last = (request.num_tokens - 1) // self.block_size  # the last token is always computed
        if first >= last:
            return 0
        return self.source.lookup(block_hashes[first:last]) * self.block_size

    def update_state_after_alloc(self, request, block_ids, block_hashes):
        assert len(block_ids) == len(block_hashes) > 0, (len(block_ids), len(block_hashes))
        self._loads[request.request_id] = _Load(list(block_ids), self.source.fetch(block_hashes))

    def get_finished_loading(self) -> dict[str, int]:
        finished, self._finished = self._finished, {}
        return finished

    def request_finished(self, request, block_ids, block_hashes):
        self._queried.discard(request.request_id)
        load = self._loads.pop(request.request_id, None)
        if load is not None:
            load.future.cancel()

    def start_load_kv(self) -> None:
        for request_id, load in list(self._loads.items()):
            if not load.future.done():
                continue
            del self._loads[request_id]
            try:
                payload = load.future.result()
            except Exception as error:  # the other side went away: recompute instead
                logger.warning("KV load for %r failed, recomputing: %s", request_id, error)
                self.num_failed_loads += 1
                self._finished[request_id] = 0
                continue
            self.block_io.scatter(load.block_ids, payload.blocks)
            self.num_loaded_blocks += len(load.block_ids)
            self.external_prefix_cache_hits += len(load.block_ids) * self.block_size
            self._finished[request_id] = len(load.block_ids) * self.block_size

    @property
    def num_loading(self) -> int:
        return len(self._loads)
