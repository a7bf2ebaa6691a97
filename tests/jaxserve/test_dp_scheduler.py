"""Per-dp-shard step budgets (jaxserve/scheduler.py over jaxserve/kv/sharded_cache_manager.py): under
data-parallel attention `max_num_batched_tokens` and `max_num_seqs` hold per shard, placement
skips shards with no tokens or seats left, and the shard-major batch still fits the runner's
buckets. The fake model of tests/jaxserve/test_scheduler.py stands in for the device; the
engine-level DP cases (tokens against one device) run in tests/jaxserve/test_parallel.py."""

from __future__ import annotations

import random
import types

import pytest

from jaxserve.config import EngineConfig
from jaxserve.kv.sharded_cache_manager import ShardedKVCacheManager
from jaxserve.kv.cache_manager import KVCacheManager
from jaxserve.input_batch import RowPlan, shard_major_index
from jaxserve.model_runner import ModelRunner
from jaxserve.request import RequestStatus
from jaxserve.scheduler import Scheduler, SchedulerOutput
from tests.jaxserve.test_scheduler import BLOCK, deliver, expected_output, make_request, run


def make_dp_scheduler(num_shards=2, blocks_per_shard=64, max_num_seqs=8, budget=16, **kwargs) -> Scheduler:
    manager = ShardedKVCacheManager(num_shards, blocks_per_shard, BLOCK, cache_seed="test")
    return Scheduler(manager, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=1024,
                     **kwargs)


def per_shard(scheduler: Scheduler, out: SchedulerOutput, placed: dict[str, int] | None = None
              ) -> tuple[list[int], list[int]]:
    """(tokens, rows) of `out` on each shard; `placed` (from `run_dp`) once requests are gone."""
    manager = scheduler.kv_cache_manager
    tokens, rows = [0] * manager.num_shards, [0] * manager.num_shards
    for row in out.scheduled:
        shard = manager.shard_of(row.request_id) if placed is None else placed[row.request_id]
        tokens[shard] += row.num_new_tokens
        rows[shard] += 1
    return tokens, rows


def check_dp_output(scheduler: Scheduler, out: SchedulerOutput) -> None:
    """Every shard within its own limits; the running set too."""
    manager = scheduler.kv_cache_manager
    tokens, rows = per_shard(scheduler, out)
    assert max(tokens) <= scheduler.max_num_batched_tokens, tokens
    assert max(rows) <= scheduler.max_num_seqs, rows
    running = [0] * manager.num_shards
    for request in scheduler.running:
        running[manager.shard_of(request.request_id)] += 1
    assert max(running, default=0) <= scheduler.max_num_seqs, running
    assert len({row.request_id for row in out.scheduled}) == len(out.scheduled)
    assert not set(out.preempted_ids) & {row.request_id for row in out.scheduled}
    is_prefill = [row.num_new_tokens > 1 for row in out.scheduled]
    assert is_prefill == sorted(is_prefill), "decode rows come first"


def run_dp(scheduler: Scheduler, arrivals: dict, *, async_scheduling=False, aborts=None, placed=None,
           runner=None, max_steps=3000) -> list[SchedulerOutput]:
    """tests/jaxserve/test_scheduler.py's `run` with per-shard checks; `aborts[step]` are
    request ids aborted before that step; `placed` (a dict) collects every request's shard;
    every step must fit `runner`'s buckets (`check_fits_the_runner`) if given."""
    outputs, in_flight, aborts = [], None, aborts or {}
    for step in range(max_steps):
        for request in arrivals.get(step, []):
            scheduler.add_request(request)
        scheduler.finish_requests(aborts.get(step, []), RequestStatus.FINISHED_ABORTED)
        if not scheduler.has_unfinished_requests() and step > max(arrivals, default=0):
            break
        out = scheduler.schedule()
        check_dp_output(scheduler, out)
        if runner is not None:
            check_fits_the_runner(scheduler, out, runner)
        if placed is not None:
            placed.update(scheduler.kv_cache_manager.req_to_shard)
        outputs.append(out)
        if async_scheduling:
            if in_flight is not None:
                deliver(scheduler, in_flight)
            in_flight = out
        else:
            deliver(scheduler, out)
    else:
        raise AssertionError("requests did not finish")
    assert scheduler.kv_cache_manager.usage == 0.0 and not scheduler.running and not scheduler.num_waiting
    return outputs


def test_each_shard_takes_the_whole_token_budget():
    """4 prompts of 12 tokens, 16 tokens per shard: the first step fills both shards (two whole
    prompts and two 4-token chunks); one budget for all would stop at 16."""
    scheduler = make_dp_scheduler(budget=16)
    for i in range(4):
        scheduler.add_request(make_request(f"r{i}", 12))
    out = scheduler.schedule()
    check_dp_output(scheduler, out)
    assert per_shard(scheduler, out) == ([16, 16], [2, 2])
    assert out.num_scheduled_tokens == 32 > scheduler.max_num_batched_tokens
    assert sorted((row.request_id, row.num_new_tokens) for row in out.scheduled) == [
        ("r0", 12), ("r1", 12), ("r2", 4), ("r3", 4)]

    one_pool = Scheduler(KVCacheManager(128, BLOCK, cache_seed="test"), max_num_seqs=8, max_num_batched_tokens=16,
                         max_model_len=1024)
    for i in range(4):
        one_pool.add_request(make_request(f"r{i}", 12))
    assert one_pool.schedule().num_scheduled_tokens == 16  # dp == 1: one budget, as before


def test_max_num_seqs_is_per_shard():
    scheduler = make_dp_scheduler(max_num_seqs=1, budget=64)
    requests = [make_request(f"r{i}", 6, max_tokens=3) for i in range(3)]
    for request in requests:
        scheduler.add_request(request)
    out = scheduler.schedule()
    assert sorted(row.request_id for row in out.scheduled) == ["r0", "r1"]  # one per shard
    assert per_shard(scheduler, out)[1] == [1, 1] and scheduler.num_waiting == 1
    outputs = [out]
    deliver(scheduler, out)
    outputs += run_dp(scheduler, {})
    assert max(len(o.scheduled) for o in outputs) == 2
    for request in requests:
        assert request.output_token_ids == expected_output(request)


def test_a_prefix_hit_on_a_shard_out_of_tokens_does_not_hold_up_the_queue():
    """`again` shares 16 prompt tokens with `first`, cached on shard 0; `long` (a chunked
    prefill) spends shard 0's 16 tokens every step. `again` is placed on shard 1 at once and
    computes its whole prompt there rather than waiting for shard 0's budget."""
    scheduler = make_dp_scheduler(budget=16)
    manager = scheduler.kv_cache_manager
    first = make_request("first", 17, max_tokens=1)
    long = make_request("long", 200, max_tokens=1)
    again = make_request("again", 20, max_tokens=2, tokens=first.prompt_token_ids[:16] + [5, 6, 7, 8])
    scheduler.add_request(first)
    for _ in range(2):
        deliver(scheduler, scheduler.schedule())
    assert first.status == RequestStatus.FINISHED_LENGTH_CAPPED  # its 4 full blocks stay cached on shard 0
    scheduler.add_request(long)
    out = scheduler.schedule()
    assert manager.shard_of("long") == 0 and out.num_scheduled_tokens == 16
    deliver(scheduler, out)
    scheduler.add_request(again)
    out = scheduler.schedule()
    check_dp_output(scheduler, out)
    assert manager.shard_of("again") == 1
    assert [(r.request_id, r.num_computed_tokens, r.num_new_tokens) for r in out.scheduled] == [
        ("long", 16, 16), ("again", 0, 16)]
    deliver(scheduler, out)
    run_dp(scheduler, {})
    assert again.output_token_ids == expected_output(again) and long.output_token_ids == expected_output(long)


def cached_prompt_then_occupant(scheduler, occupant: str, occupant_len: int):
    """A 17-token prompt runs to completion (16 tokens cached on shard 0), then `occupant`
    starts (on shard 0: empty pools tie) and one step runs; then a request sharing the cached 16
    tokens arrives. Returns the schedule of the step after its arrival."""
    first = make_request("first", 17, max_tokens=1)
    run_dp(scheduler, {0: [first]})
    scheduler.add_request(make_request(occupant, occupant_len, max_tokens=30))
    deliver(scheduler, scheduler.schedule())
    assert scheduler.kv_cache_manager.shard_of(occupant) == 0
    scheduler.add_request(make_request("again", 20, max_tokens=1, tokens=first.prompt_token_ids[:16] + [5, 6, 7, 8]))
    return scheduler.schedule()


def test_a_prefix_hit_on_a_shard_without_seats_goes_to_a_free_shard():
    scheduler = make_dp_scheduler(max_num_seqs=1, budget=64)
    manager = scheduler.kv_cache_manager
    out = cached_prompt_then_occupant(scheduler, "busy", 4)
    assert manager.shard_of("again") == 1 and ("again", 0) in [(r.request_id, r.num_computed_tokens)
                                                              for r in out.scheduled]


def test_the_hit_is_still_preferred_among_shards_with_room():
    scheduler = make_dp_scheduler(budget=64)
    manager = scheduler.kv_cache_manager
    out = cached_prompt_then_occupant(scheduler, "heavy", 40)  # decodes 1 token a step: shard 0 keeps room
    assert manager.shard_of("again") == 0
    assert [(r.num_computed_tokens, r.num_new_tokens) for r in out.scheduled if r.request_id == "again"] == [(16, 4)]


def test_admission_stops_when_no_shard_can_take_the_head():
    """FCFS as with one budget: with both seats taken, neither the head nor anyone behind it runs."""
    scheduler = make_dp_scheduler(max_num_seqs=1, budget=64)
    requests = [make_request(f"r{i}", 4 + i, max_tokens=5) for i in range(4)]
    outputs = run_dp(scheduler, {0: requests})
    first_rows = [next(i for i, o in enumerate(outputs) if any(r.request_id == q.request_id for r in o.scheduled))
                  for q in requests]
    assert first_rows == sorted(first_rows) and first_rows[:2] == [0, 0] and first_rows[2] > 0


def test_a_fork_waits_for_its_parents_shard():
    """A child holds the parent's prompt blocks, so it can only join the parent's shard: while
    that shard has no seat it waits, even with a free seat on the other shard."""
    scheduler = make_dp_scheduler(max_num_seqs=1, budget=64)
    manager = scheduler.kv_cache_manager
    parent = make_request("parent", 9, max_tokens=4)
    scheduler.add_request(parent)
    out = scheduler.schedule()
    deliver(scheduler, out)
    child = make_request("child", 9, max_tokens=4, tokens=parent.prompt_token_ids)
    scheduler.fork_request("parent", child)
    assert manager.shard_of("child") == manager.shard_of("parent") == 0
    out = scheduler.schedule()
    assert [r.request_id for r in out.scheduled] == ["parent"]  # shard 1 is free, but not the child's
    deliver(scheduler, out)
    outputs = run_dp(scheduler, {})
    assert any(r.request_id == "child" for o in outputs for r in o.scheduled)
    assert manager.req_to_shard == {}


def test_long_prefill_threshold_and_chunks_hold_per_shard():
    """Threshold 8, 16 tokens per shard: each shard chunks two long prompts 8 + 8 per step."""
    scheduler = make_dp_scheduler(budget=16, long_prefill_token_threshold=8)
    requests = [make_request(f"r{i}", 24, max_tokens=1) for i in range(4)]
    placed = {}
    outputs = run_dp(scheduler, {0: requests}, placed=placed)
    assert [per_shard(scheduler, o, placed) for o in outputs[:3]] == [([16, 16], [2, 2])] * 3
    for request in requests:
        chunks = [(r.num_computed_tokens, r.num_new_tokens) for o in outputs for r in o.scheduled
                  if r.request_id == request.request_id]
        assert chunks == [(0, 8), (8, 8), (16, 8)], chunks
        assert request.output_token_ids == expected_output(request)


def test_placement_room_is_validated():
    manager = ShardedKVCacheManager(2, 8, BLOCK)
    request = make_request("x", 4)
    with pytest.raises(ValueError, match="room"):
        manager.get_computed_blocks(request, [0, 0])
    with pytest.raises(ValueError, match="room"):
        manager.get_computed_blocks(request, [4])
    manager.get_computed_blocks(request, [0, 4])
    assert manager.placement("x") == 1


@pytest.mark.parametrize("room_on_shard_1,placed", [(8, 1), (4, None)])
def test_the_fallback_goes_only_to_shards_with_room_for_the_chunk(room_on_shard_1, placed):
    """`late` is placed on shard 0, which fills up before its allocation: it falls back to
    shard 1 only if shard 1 can take its 8 tokens this step."""
    manager = ShardedKVCacheManager(2, 5, BLOCK)  # 4 usable blocks each
    late = make_request("late", 8)
    manager.get_computed_blocks(late, [16, room_on_shard_1])
    assert manager.placement("late") == 0
    big = make_request("big", 16)
    manager.allocate_slots(big, 16, manager.get_computed_blocks(big)[0])
    assert manager.shard_of("big") == 0 and manager.shards[0].num_free_blocks == 0
    ids = manager.allocate_slots(late, 8)
    assert (ids is not None) == (placed is not None) and manager.req_to_shard.get("late") == placed


def random_workload(rng: random.Random, num_requests: int, num_steps: int):
    arrivals, aborts = {}, {}
    for i in range(num_requests):
        step = rng.randrange(num_steps)
        arrivals.setdefault(step, []).append(
            make_request(f"r{i}", rng.randint(1, 60), max_tokens=rng.randint(1, 12), arrival=float(i)))
        if rng.random() < 0.1:
            aborts.setdefault(step + rng.randint(0, 8), []).append(f"r{i}")
    return arrivals, aborts


def runner_buckets(config: EngineConfig) -> types.SimpleNamespace:
    """What `ModelRunner.buckets_for` / `step_buckets` read of a runner."""
    return types.SimpleNamespace(dp=config.data_parallel_size, token_buckets=config.token_bucket_sizes(),
                                 request_buckets=config.request_bucket_sizes())


def check_fits_the_runner(scheduler: Scheduler, out: SchedulerOutput, runner) -> None:
    """The step's shard-major layout (model_runner.py) holds every shard's rows and tokens."""
    manager = scheduler.kv_cache_manager
    rows = [RowPlan(i, r.num_computed_tokens, r.num_new_tokens, r.samples, manager.shard_of(r.request_id))
            for i, r in enumerate(out.scheduled)]
    num_tokens, num_rows = ModelRunner.buckets_for(runner, rows)
    assert (num_tokens, num_rows) in ModelRunner.step_buckets(runner)
    row_index, token_index = shard_major_index(rows, num_tokens, num_rows)  # asserts per-shard fit
    assert len(set(row_index.tolist())) == len(rows) and len(set(token_index.tolist())) == out.num_scheduled_tokens


@pytest.mark.parametrize("seed", range(8))
def test_random_traffic_keeps_per_shard_limits_and_finishes_everything(seed):
    """Arrivals, aborts, preemptions (pools of 19 or 23 usable blocks for requests of up to 18),
    sync and async steps, 2..4 shards, both policies: every step keeps each shard within its
    limits and fits the runner's buckets, every request ends (its tokens those of the fake model,
    or aborted), and a second run makes the same schedule (multi-host runs it on every process)."""
    rng = random.Random(seed)
    num_shards, max_num_seqs, budget = rng.choice([2, 3, 4]), rng.choice([1, 2, 4]), rng.choice([8, 16, 32])
    options = dict(num_shards=num_shards, blocks_per_shard=rng.choice([20, 24, 64]), max_num_seqs=max_num_seqs,
                   budget=budget, long_prefill_token_threshold=rng.choice([0, 0, 6]),
                   policy=rng.choice(["fcfs", "priority"]))
    async_scheduling = seed % 2 == 1
    config = EngineConfig(model="x", data_parallel_size=num_shards, max_num_seqs=max_num_seqs,
                          max_num_batched_tokens=budget)
    schedules = []
    for _ in range(2):
        arrivals, aborts = random_workload(random.Random(seed + 100), 30, 40)
        scheduler = make_dp_scheduler(**options)
        outputs = run_dp(scheduler, arrivals, async_scheduling=async_scheduling, aborts=aborts,
                         runner=runner_buckets(config))
        aborted = {rid for ids in aborts.values() for rid in ids}
        for request in (r for batch in arrivals.values() for r in batch):
            if request.status == RequestStatus.FINISHED_ABORTED:
                assert request.request_id in aborted
                assert request.output_token_ids == expected_output(request)[:request.num_output_tokens]
            else:
                assert request.status == RequestStatus.FINISHED_LENGTH_CAPPED, request
                assert request.output_token_ids == expected_output(request), request.request_id
        schedules.append([[(r.request_id, r.num_computed_tokens, r.num_new_tokens) for r in out.scheduled]
                          for out in outputs])
    assert schedules[0] == schedules[1]
    # Several shards ran at once at some step, beyond what one shared budget allows.
    assert max(out.num_scheduled_tokens for out in outputs) > budget or max(
        len(out.scheduled) for out in outputs) > max_num_seqs


def test_one_shard_schedules_as_one_pool():
    """A `ShardedKVCacheManager` of one shard is scheduled exactly as a plain `KVCacheManager`
    (with preemptions: 23 usable blocks)."""
    schedules = []
    for manager in (KVCacheManager(24, BLOCK, cache_seed="test"), ShardedKVCacheManager(1, 24, BLOCK, "test")):
        scheduler = Scheduler(manager, max_num_seqs=3, max_num_batched_tokens=16, max_model_len=1024)
        arrivals, _ = random_workload(random.Random(7), 20, 20)
        outputs = run(scheduler, arrivals)
        schedules.append([([(r.request_id, r.num_computed_tokens, r.num_new_tokens) for r in out.scheduled],
                           out.preempted_ids) for out in outputs])
    assert schedules[0] == schedules[1] and any(preempted for _, preempted in schedules[0])


def test_request_slots_cover_every_shard():
    """Up to dp x max_num_seqs requests run at once, each holding a device slot."""
    assert EngineConfig(model="x", data_parallel_size=2, max_num_seqs=8).max_num_reqs == 64
    assert EngineConfig(model="x", max_num_seqs=8).max_num_reqs == 32
    with pytest.raises(ValueError, match=r"max_num_reqs must be >= max_num_seqs x data_parallel_size \(16\)"):
        EngineConfig(model="x", data_parallel_size=2, max_num_seqs=8, max_num_reqs=12)


def test_the_one_row_bucket_pairs_only_with_the_two_smallest_token_buckets():
    """Derived buckets start at 1 token and 1 row (one stream's decode step, and that step with
    drafts); a one-row prefill chunk lands with 8 rows rather than compiling a program per token
    bucket. Every plan still lands in a compiled bucket."""
    runner = runner_buckets(EngineConfig(model="x", max_num_seqs=16, max_num_batched_tokens=256))
    assert runner.token_buckets == (1, 16, 32, 64, 128, 256) and runner.request_buckets == (1, 8, 16)
    pairs = ModelRunner.step_buckets(runner)
    assert [p for p in pairs if p[1] == 1] == [(1, 1), (16, 1)]
    landed = {}
    for tokens_per_row in ([1], [5], [40], [256], [1, 1], [3, 90], [1] * 9, [16] * 16):
        rows = [RowPlan(i, 0, n, 1, 0) for i, n in enumerate(tokens_per_row)]
        landed[tuple(tokens_per_row)] = ModelRunner.buckets_for(runner, rows)
        assert landed[tuple(tokens_per_row)] in pairs
    assert landed[(1,)] == (1, 1) and landed[(5,)] == (16, 1) and landed[(40,)] == (64, 8)
    assert landed[(256,)] == (256, 8) and landed[(3, 90)] == (128, 8) and landed[(1,) * 9] == (16, 16)
    # Buckets given without a 1-row bucket pair as before.
    explicit = runner_buckets(EngineConfig(model="x", max_num_seqs=8, max_num_batched_tokens=32, token_buckets=(16, 32),
                                          request_buckets=(4,)))
    assert ModelRunner.step_buckets(explicit) == [(16, 4), (16, 8), (32, 4), (32, 8)]
