"""Per-dp-shard block pools behind one scheduler (jaxserve/kv/sharded_cache_manager.py): placement by
prefix hit then load, forks on the parent's shard, preemption within a shard, summed statistics.
The engine-level cases (tokens against one device, HLO) run in tests/jaxserve/test_parallel.py."""

import pytest

from jaxserve.kv.sharded_cache_manager import ShardedKVCacheManager
from jaxserve.request import RequestStatus
from jaxserve.scheduler import Scheduler
from tests.engine_utils import tiny_engine
from tests.jaxserve.test_scheduler import BLOCK, expected_output, make_request, rows_of, run


def make_sharded_scheduler(num_shards=2, blocks_per_shard=16, max_num_seqs=8, budget=64):
    manager = ShardedKVCacheManager(num_shards, blocks_per_shard, BLOCK, cache_seed="test")
    return Scheduler(manager, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=1024)


def test_requests_spread_to_the_least_loaded_shard():
    scheduler = make_sharded_scheduler(num_shards=3)
    manager = scheduler.kv_cache_manager
    for i, size in enumerate([20, 8, 12]):
        scheduler.add_request(make_request(f"r{i}", size))
    scheduler.schedule()
    assert [manager.shard_of(f"r{i}") for i in range(3)] == [0, 1, 2]
    scheduler.add_request(make_request("r3", 4))
    scheduler.schedule()
    assert manager.shard_of("r3") == 1  # fewest used blocks
    used = sum(len(m.block_table(rid)) for m in manager.shards for rid in list(m.req_to_blocks))
    assert manager.usage == pytest.approx(used / (3 * 15))


def test_a_prefix_hit_wins_over_a_lighter_shard_and_is_counted_once():
    scheduler = make_sharded_scheduler(blocks_per_shard=32)
    manager = scheduler.kv_cache_manager
    prompt = make_request("p", 17).prompt_token_ids
    first = make_request("first", 17, max_tokens=1, tokens=prompt)
    run(scheduler, {0: [first]})
    assert manager.prefix_cache_queries == 17 and manager.prefix_cache_hits == 0
    heavy = make_request("heavy", 40, max_tokens=50)
    light = make_request("light", 4, max_tokens=50)
    scheduler.add_request(heavy)
    scheduler.schedule()
    scheduler.add_request(light)
    scheduler.schedule()
    assert manager.shard_of("heavy") == 0 and manager.shard_of("light") == 1
    again = make_request("again", 21, max_tokens=1, tokens=prompt + [5, 6, 7, 8])
    scheduler.add_request(again)
    out = scheduler.schedule()
    assert manager.shard_of("again") == 0  # the shard holding the prompt, though the busier one
    row = next(r for r in out.scheduled if r.request_id == "again")
    assert (row.num_computed_tokens, row.num_new_tokens) == (16, 5)
    assert manager.prefix_cache_queries == 17 + 40 + 4 + 21 and manager.prefix_cache_hits == 16


def test_preemption_frees_blocks_on_the_starved_shard_only():
    """a and c (placed by its prefix hit) share shard 0 and outgrow it; b, admitted last on
    shard 1, is the tail of `running` but preempting it would not free a block of shard 0."""
    scheduler = make_sharded_scheduler(blocks_per_shard=9, budget=256)  # 8 usable blocks per shard
    manager = scheduler.kv_cache_manager
    a = make_request("a", 12, max_tokens=16)
    c = make_request("c", 16, max_tokens=16, tokens=a.prompt_token_ids + [1, 2, 3, 4])
    b = make_request("b", 4, max_tokens=16)
    placed = {}
    original = scheduler.schedule

    def schedule():
        out = original()
        placed.update(manager.req_to_shard)
        return out

    scheduler.schedule = schedule
    outputs = run(scheduler, {0: [a], 1: [c], 2: [b]})
    assert placed == {"a": 0, "c": 0, "b": 1}
    preempted = [rid for out in outputs for rid in out.preempted_ids]
    assert preempted and "b" not in preempted, preempted
    for request in (a, b, c):
        assert request.output_token_ids == expected_output(request)


def test_forks_stay_on_the_parents_shard():
    manager = ShardedKVCacheManager(2, 16, BLOCK)
    other = make_request("other", 8)
    assert manager.allocate_slots(other, 8, *manager.get_computed_blocks(other)[:1]) is not None
    parent = make_request("parent", 10)
    blocks, _ = manager.get_computed_blocks(parent)
    manager.allocate_slots(parent, 10, blocks)
    parent.num_computed_tokens = 10
    child = make_request("child", 10, tokens=parent.prompt_token_ids)
    assert manager.fork(parent, child) == 8
    assert manager.shard_of("child") == manager.shard_of("parent") == 1
    assert manager.block_table("child") == manager.block_table("parent")[:2]
    manager.free(parent)
    manager.free(child)
    manager.free(other)
    assert manager.usage == 0.0 and manager.req_to_shard == {}


def test_a_full_shard_falls_back_to_one_with_room():
    manager = ShardedKVCacheManager(2, 5, BLOCK)  # 4 usable blocks each
    big = make_request("big", 16)
    manager.allocate_slots(big, 16, manager.get_computed_blocks(big)[0])
    small = make_request("small", 4)
    manager.allocate_slots(small, 4, manager.get_computed_blocks(small)[0])
    assert manager.shard_of("big") == 0 and manager.shard_of("small") == 1
    late = make_request("late", 8)
    manager.get_computed_blocks(late)  # picks shard 1 (lighter); it fits there
    assert manager.allocate_slots(late, 8) is not None and manager.shard_of("late") == 1
    none_fit = make_request("none", 12)
    manager.get_computed_blocks(none_fit)
    assert manager.allocate_slots(none_fit, 12) is None and "none" not in manager.req_to_shard


def test_a_prefix_hit_on_a_full_shard_does_not_hold_up_the_queue():
    """`again` shares 16 prompt tokens with `first`, which by then fills its shard (8 usable
    blocks): `again` goes to the empty shard at once and computes its whole prompt there, instead
    of waiting at the head of the queue for the hit's shard to drain."""
    scheduler = make_sharded_scheduler(blocks_per_shard=9, budget=256)
    manager = scheduler.kv_cache_manager
    first = make_request("first", 17, max_tokens=15)  # grows to 31 tokens: 8 blocks from step 12
    again = make_request("again", 21, max_tokens=1, tokens=first.prompt_token_ids[:16] + [5, 6, 7, 8, 9])
    placed = {}
    allocate = manager.allocate_slots

    def spy(request, *args, **kwargs):
        ids = allocate(request, *args, **kwargs)
        placed.setdefault(request.request_id, manager.req_to_shard.get(request.request_id))
        return ids

    manager.allocate_slots = spy
    outputs = run(scheduler, {0: [first], 13: [again]})
    assert placed == {"first": 0, "again": 1}
    first_step = next(i for i, out in enumerate(outputs) if any(r.request_id == "again" for r in out.scheduled))
    assert first_step == 13 and rows_of(outputs, "again")[0] == (0, 21)  # no wait; no hit on shard 1
    assert again.output_token_ids == expected_output(again) and first.output_token_ids == expected_output(first)


def test_data_parallel_engine_refuses_kv_connectors():
    with pytest.raises(ValueError, match="data_parallel_size"):
        tiny_engine(data_parallel_size=2, cpu_kv_cache_bytes=1 << 20)


def test_finishing_frees_the_requests_shard():
    scheduler = make_sharded_scheduler()
    scheduler.add_request(make_request("x", 4))
    scheduler.schedule()
    scheduler.finish_requests("x", RequestStatus.FINISHED_ABORTED)
    assert scheduler.kv_cache_manager.usage == 0.0
