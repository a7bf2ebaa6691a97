"""The scheduler side of the KV connector, with a fake block source whose loads we complete by hand:
a request waits in WAITING_FOR_KV holding its blocks while others keep running, resumes with its
loaded tokens computed, is cancelled cleanly by an abort, and recomputes when a load fails."""

from concurrent.futures import Future

import numpy as np

from jaxserve.kv.connector import KVConnector, LoadingConnector
from models.kv_spec import KVSpec
from jaxserve.kv.transfer import KVLayout, KVPayload
from jaxserve.request import RequestStatus
from tests.jaxserve.test_scheduler import BLOCK, deliver, make_request, make_scheduler

LAYOUT = KVLayout.of("fake", BLOCK, "float32", KVSpec.standard(num_layers=1, num_kv_heads=1, head_dim=2))


class FakeSource:
    """Holds the given hashes; fetches resolve only when `complete()` is called."""

    def __init__(self, hashes=()):
        self.hashes = set(hashes)
        self.fetches: list[tuple[list[bytes], Future]] = []

    def lookup(self, block_hashes):
        count = 0
        while count < len(block_hashes) and block_hashes[count] in self.hashes:
            count += 1
        return count

    def fetch(self, block_hashes):
        future = Future()
        self.fetches.append((list(block_hashes), future))
        return future

    def complete(self, error=None):
        for hashes, future in self.fetches:
            if error is not None:
                future.set_exception(error)
            else:
                blocks = np.ones((len(hashes), *LAYOUT.block_shape), np.float32)
                future.set_result(KVPayload(LAYOUT, hashes, blocks))
        self.fetches.clear()


class RecordingBlockIO:
    layout = LAYOUT

    def __init__(self):
        self.scattered: list[list[int]] = []

    def scatter(self, block_ids, blocks):
        assert len(block_ids) == len(blocks)
        self.scattered.append(list(block_ids))


def connected_scheduler(prompt_hashes_of=None, **kwargs):
    source = FakeSource()
    connector = LoadingConnector(source, BLOCK)
    block_io = RecordingBlockIO()
    connector.bind(block_io)
    return make_scheduler(kv_connector=connector, **kwargs), connector, source, block_io


def test_request_waits_for_kv_while_others_run_then_resumes_with_loaded_tokens():
    scheduler, connector, source, block_io = connected_scheduler()
    other = make_request("other", 6, max_tokens=8)
    target = make_request("target", 22, max_tokens=2)
    # The source holds the target's first 4 blocks (16 tokens); 5 full blocks would be allowed.
    source.hashes = set(scheduler.kv_cache_manager.block_hashes(target)[:4])
    scheduler.add_request(other)
    scheduler.add_request(target)
    out = scheduler.schedule()
    assert [row.request_id for row in out.scheduled] == ["other"]
    assert target.status == RequestStatus.WAITING_FOR_KV and scheduler.num_waiting == 1
    table = scheduler.kv_cache_manager.block_table("target")
    assert len(table) == 4 and source.fetches[0][0] == scheduler.kv_cache_manager.block_hashes(target)[:4]
    for _ in range(3):  # the load is in flight: steps go on without the target
        connector.start_load_kv()
        deliver(scheduler, out)
        out = scheduler.schedule()
        assert [row.request_id for row in out.scheduled] == ["other"]
    source.complete()
    connector.start_load_kv()
    assert block_io.scattered == [table]
    deliver(scheduler, out)
    out = scheduler.schedule()
    row = next(row for row in out.scheduled if row.request_id == "target")
    assert (row.num_computed_tokens, row.num_new_tokens, row.is_new) == (16, 6, True)
    assert row.block_table[:4] == table
    assert target.num_cached_tokens == 16


def test_abort_while_loading_cancels_the_load_and_frees_the_blocks():
    scheduler, connector, source, block_io = connected_scheduler(num_blocks=16)
    target = make_request("target", 13)
    source.hashes = set(scheduler.kv_cache_manager.block_hashes(target))
    scheduler.add_request(target)
    scheduler.schedule()
    assert target.status == RequestStatus.WAITING_FOR_KV
    free_before = scheduler.kv_cache_manager.num_free_blocks
    scheduler.finish_requests("target", RequestStatus.FINISHED_ABORTED)
    assert scheduler.kv_cache_manager.num_free_blocks == free_before + 3
    assert source.fetches[0][1].cancelled()
    connector.start_load_kv()
    assert block_io.scattered == [] and not scheduler.waiting_for_kv
    assert scheduler.schedule().is_empty


def test_failed_load_recomputes_into_the_same_blocks():
    scheduler, connector, source, _ = connected_scheduler()
    target = make_request("target", 10)
    source.hashes = set(scheduler.kv_cache_manager.block_hashes(target))
    scheduler.add_request(target)
    scheduler.schedule()
    table = scheduler.kv_cache_manager.block_table("target")
    source.complete(error=ConnectionError("peer went away"))
    connector.start_load_kv()
    row = scheduler.schedule().scheduled[0]
    assert (row.num_computed_tokens, row.num_new_tokens) == (0, 10)
    assert row.block_table[:2] == table and connector.num_failed_loads == 1


def test_local_prefix_hit_comes_first_and_the_last_token_is_never_loaded():
    scheduler, connector, source, _ = connected_scheduler()
    first = make_request("first", 9, max_tokens=1)
    scheduler.add_request(first)
    deliver(scheduler, scheduler.schedule())  # caches its 2 full blocks locally
    scheduler.finish_requests("first", RequestStatus.FINISHED_STOPPED)
    second = make_request("second", 16, tokens=first.prompt_token_ids[:8] + list(range(100, 108)))
    source.hashes = set(scheduler.kv_cache_manager.block_hashes(second))  # holds all 4 blocks
    scheduler.add_request(second)
    scheduler.schedule()
    # Local hit: blocks 0-1; external: block 2 only (block 3 holds the last token, recomputed).
    assert [len(h) for h, _ in source.fetches] == [1]
    assert source.fetches[0][0] == scheduler.kv_cache_manager.block_hashes(second)[2:3]
    assert second.num_computed_tokens == 8


def test_the_default_connector_loads_nothing():
    scheduler = make_scheduler()
    assert isinstance(scheduler.kv_connector, KVConnector)
    request = make_request("a", 12)
    scheduler.add_request(request)
    row = scheduler.schedule().scheduled[0]
    assert (row.num_computed_tokens, row.num_new_tokens) == (0, 12) and not scheduler.waiting_for_kv


def test_block_pool_reports_evicted_cached_blocks_with_hashes_before_on_free():
    from jaxserve.kv.block_pool import BlockPool

    events = []
    pool = BlockPool(4, on_free=lambda ids: events.append(("free", ids)))
    pool.on_evict = lambda ids, hashes: events.append(("evict", ids, hashes))
    a, b, c = pool.get_new_blocks(3)
    pool.cache_block(a, b"ha")
    pool.cache_block(b, b"hb")
    pool.free_blocks([c, b, a])  # c has no hash: reported freed at once
    assert events == [("free", [3])]
    pool.get_new_blocks(2)  # the head of the free list: c (uncached), then b
    assert events[1:] == [("evict", [2], [b"hb"]), ("free", [2])]
    assert pool.get_cached_block(b"hb") is None and pool.get_cached_block(b"ha") is a
