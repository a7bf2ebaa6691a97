"""Scheduler: token budget, chunked prefill, running before waiting, preemption, policies, async steps.

A fake model stands in for the device: the token sampled at sequence position p of a request is a
fixed function of (request id, p), so every schedule must produce the same outputs.
"""

import itertools
import random

import pytest

from jaxserve.config import cdiv
from jaxserve.kv.cache_manager import KVCacheManager
from jaxserve.request import Request, RequestStatus
from jaxserve.scheduler import Scheduler, SchedulerOutput

BLOCK = 4


def fake_token(request_id: str, position: int) -> int:
    return (sum(map(ord, request_id)) * 31 + position * 7) % 1000


def expected_output(request: Request) -> list[int]:
    return [fake_token(request.request_id, request.num_prompt_tokens + k) for k in range(request.max_tokens)]


def make_scheduler(num_blocks=256, max_num_seqs=8, budget=64, max_model_len=1024, **kwargs):
    manager = KVCacheManager(num_blocks, BLOCK, cache_seed="test")
    return Scheduler(manager, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                     max_model_len=max_model_len, **kwargs)


def make_request(request_id, num_prompt, max_tokens=4, arrival=0.0, priority=0, tokens=None):
    tokens = tokens if tokens is not None else [fake_token(request_id, -1 - i) for i in range(num_prompt)]
    return Request(request_id, tokens, max_tokens=max_tokens, arrival_time=arrival, priority=priority)


def check_output(scheduler: Scheduler, out: SchedulerOutput) -> None:
    assert out.num_scheduled_tokens == sum(row.num_new_tokens for row in out.scheduled)
    assert out.num_scheduled_tokens <= scheduler.max_num_batched_tokens
    assert len(out.scheduled) <= scheduler.max_num_seqs and scheduler.num_running <= scheduler.max_num_seqs
    is_prefill = [row.num_new_tokens > 1 for row in out.scheduled]
    assert is_prefill == sorted(is_prefill), "decode rows come first"
    for row in out.scheduled:
        assert row.num_new_tokens >= 1
        assert len(row.block_table) >= cdiv(row.num_computed_tokens + row.num_new_tokens, BLOCK)
        assert 0 not in row.block_table


def deliver(scheduler: Scheduler, out: SchedulerOutput, stop_tokens=()) -> None:
    """What the engine does with a step's results: update, then stop checks."""
    sampled = {row.request_id: [fake_token(row.request_id, row.num_computed_tokens + row.num_new_tokens)]
               for row in out.scheduled if row.samples}
    scheduler.update_from_output(out, sampled)
    for request_id in sampled:
        request = scheduler.requests.get(request_id)
        if request is None:
            continue
        if request.num_output_tokens >= request.max_tokens or request.num_tokens >= scheduler.max_model_len:
            scheduler.finish_requests(request_id, RequestStatus.FINISHED_LENGTH_CAPPED)
        elif request.output_token_ids[-1] in stop_tokens:
            scheduler.finish_requests(request_id, RequestStatus.FINISHED_STOPPED)


def run(scheduler: Scheduler, arrivals: dict[int, list[Request]], async_scheduling=False, max_steps=2000,
        stop_tokens=()) -> list[SchedulerOutput]:
    """Drive the scheduler to the end; `arrivals[step]` are added before that step."""
    outputs, in_flight = [], None
    for step in range(max_steps):
        for request in arrivals.get(step, []):
            scheduler.add_request(request)
        if not scheduler.has_unfinished_requests() and step > max(arrivals, default=0):
            break
        out = scheduler.schedule()
        check_output(scheduler, out)
        outputs.append(out)
        if async_scheduling:  # step N's results arrive after step N+1 was scheduled
            if in_flight is not None:
                deliver(scheduler, in_flight, stop_tokens)
            in_flight = out
        else:
            deliver(scheduler, out, stop_tokens)
    else:
        raise AssertionError("requests did not finish")
    assert scheduler.kv_cache_manager.usage == 0.0
    return outputs


def rows_of(outputs, request_id):
    return [(row.num_computed_tokens, row.num_new_tokens) for out in outputs for row in out.scheduled
            if row.request_id == request_id]


def test_chunked_prefill_of_a_long_prompt():
    scheduler = make_scheduler(budget=64)
    request = make_request("long", 300, max_tokens=3)
    outputs = run(scheduler, {0: [request]})
    assert rows_of(outputs, "long") == [(0, 64), (64, 64), (128, 64), (192, 64), (256, 44), (300, 1), (301, 1)]
    assert [row.samples for out in outputs for row in out.scheduled] == [False] * 4 + [True] * 3
    assert request.output_token_ids == expected_output(request)
    assert request.status == RequestStatus.FINISHED_LENGTH_CAPPED


def test_running_requests_come_before_waiting_ones():
    scheduler = make_scheduler(budget=64)
    first = make_request("first", 300, max_tokens=2)
    second = make_request("second", 40, max_tokens=2)
    outputs = run(scheduler, {0: [first], 1: [second]})
    # "second" gets only what "first" leaves: nothing until its last 44-token chunk.
    assert rows_of(outputs, "second")[0] == (0, 20)
    assert outputs[4].scheduled[-1].request_id == "second" and outputs[4].scheduled[-1].is_new
    assert second.output_token_ids == expected_output(second)


def test_budget_and_max_num_seqs_over_random_traffic():
    rng = random.Random(0)
    scheduler = make_scheduler(num_blocks=128, max_num_seqs=4, budget=32)
    arrivals = {}
    for i in range(24):
        arrivals.setdefault(rng.randrange(30), []).append(
            make_request(f"r{i}", rng.randint(1, 80), max_tokens=rng.randint(1, 12), arrival=float(i)))
    requests = [r for batch in arrivals.values() for r in batch]
    outputs = run(scheduler, arrivals)
    assert max(len(out.scheduled) for out in outputs) == 4
    assert max(out.num_scheduled_tokens for out in outputs) == 32
    for request in requests:
        assert request.output_token_ids == expected_output(request), request.request_id


def test_long_prefill_token_threshold_caps_one_request():
    scheduler = make_scheduler(budget=64, long_prefill_token_threshold=16)
    outputs = run(scheduler, {0: [make_request("a", 40, max_tokens=1), make_request("b", 40, max_tokens=1)]})
    assert [out.num_scheduled_tokens for out in outputs[:3]] == [32, 32, 16]


def test_preemption_picks_the_latest_arrival_and_its_recompute_hits_the_cache():
    # 9 usable blocks of 4 tokens; each request needs 5 blocks by its end.
    scheduler = make_scheduler(num_blocks=10, budget=64)
    early = make_request("early", 8, max_tokens=12, arrival=0.0)
    late = make_request("late", 8, max_tokens=12, arrival=1.0)
    outputs = run(scheduler, {0: [early, late]})
    preempted = [out.preempted_ids for out in outputs if out.preempted_ids]
    assert preempted == [["late"]]
    assert scheduler.num_preemptions == 1 and late.num_preemptions == 1 and early.num_preemptions == 0
    resumed = next(row for out in outputs for row in out.scheduled if row.is_resumed)
    assert resumed.request_id == "late"
    assert resumed.num_computed_tokens > 8
    assert resumed.new_block_ids == resumed.block_table
    assert early.output_token_ids == expected_output(early)
    assert late.output_token_ids == expected_output(late)
    assert scheduler.stats().num_preemptions == 1 and scheduler.stats().prefix_cache_hits >= 8


def test_priority_preemption_picks_the_lowest_priority_even_if_not_last():
    scheduler = make_scheduler(num_blocks=14, budget=64, policy="priority")
    important = make_request("important", 8, max_tokens=12, arrival=0.0, priority=0)
    background = make_request("background", 8, max_tokens=12, arrival=1.0, priority=5)
    normal = make_request("normal", 8, max_tokens=12, arrival=2.0, priority=1)
    outputs = run(scheduler, {0: [important, background, normal]})
    first_preempted = next(out.preempted_ids for out in outputs if out.preempted_ids)
    assert first_preempted == ["background"]
    assert important.num_preemptions == 0
    for request in (important, background, normal):
        assert request.output_token_ids == expected_output(request)


def test_preempting_an_already_scheduled_row_returns_its_budget():
    # Under the priority policy the victim may sit before the row that needs blocks: "low" decodes
    # (1 token), then "high"'s chunk needs a block, so "low" is preempted and its token goes back
    # to the budget, which lets "third" take 2 tokens instead of 1.
    scheduler = make_scheduler(num_blocks=5, budget=4, policy="priority", long_prefill_token_threshold=2)
    low = make_request("low", 2, max_tokens=20, arrival=0.0, priority=9)
    high = make_request("high", 8, max_tokens=20, arrival=1.0, priority=0)
    third = make_request("third", 8, max_tokens=20, arrival=2.0, priority=1)
    scheduler.add_request(low)
    deliver(scheduler, scheduler.schedule())
    scheduler.add_request(high)
    scheduler.add_request(third)
    out = step_until_preemption(scheduler)
    assert out.preempted_ids == ["low"]
    assert [(row.request_id, row.num_new_tokens) for row in out.scheduled] == [("high", 2), ("third", 2)]
    assert low.status == RequestStatus.PREEMPTED and low.num_computed_tokens == 0
    assert scheduler.kv_cache_manager.block_table("low") == []


def step_until_preemption(scheduler: Scheduler, max_steps=30, before_step=None) -> SchedulerOutput:
    for step in range(max_steps):
        if before_step:
            before_step(step)
        out = scheduler.schedule()
        check_output(scheduler, out)
        if out.preempted_ids:
            return out
        deliver(scheduler, out)
    raise AssertionError("no preemption")


def test_priority_policy_serves_lowest_value_first():
    scheduler = make_scheduler(max_num_seqs=1, policy="priority")
    requests = [make_request(name, 4, max_tokens=1, arrival=float(i), priority=p)
                for i, (name, p) in enumerate([("c", 3), ("a", 1), ("b", 2), ("a2", 1)])]
    outputs = run(scheduler, {0: requests})
    order = [out.scheduled[0].request_id for out in outputs if out.scheduled]
    assert order == ["a", "a2", "b", "c"]


def test_fcfs_serves_arrival_order():
    scheduler = make_scheduler(max_num_seqs=1)
    requests = [make_request(name, 4, max_tokens=1, priority=p) for name, p in [("x", 3), ("y", 1), ("z", 2)]]
    outputs = run(scheduler, {0: requests})
    assert [out.scheduled[0].request_id for out in outputs if out.scheduled] == ["x", "y", "z"]


def test_no_waiting_request_is_admitted_in_a_step_that_preempted():
    def scheduler_and_steps():
        scheduler = make_scheduler(num_blocks=6, budget=64, policy="priority")
        scheduler.add_request(make_request("a", 8, max_tokens=20, arrival=0.0))
        scheduler.add_request(make_request("b", 8, max_tokens=20, arrival=1.0))
        steps = []
        return scheduler, steps, lambda step: steps.append(step)

    scheduler, steps, count = scheduler_and_steps()
    step_until_preemption(scheduler, before_step=count)
    preempting_step = steps[-1]
    # Same run again, with a small urgent request arriving just before the preempting step: it
    # would fit in the blocks "b" freed, and heads the waiting queue, but must wait a step.
    scheduler, _, _ = scheduler_and_steps()
    urgent = make_request("c", 1, max_tokens=1, priority=-1)
    arrive = lambda step: step == preempting_step and scheduler.add_request(urgent)
    out = step_until_preemption(scheduler, before_step=arrive)
    assert out.preempted_ids == ["b"] and [row.request_id for row in out.scheduled] == ["a"]
    assert [r.request_id for r in scheduler.waiting] == ["c", "b"]
    deliver(scheduler, out)
    assert "c" in [row.request_id for row in scheduler.schedule().scheduled]


def test_prefix_cache_hit_is_scheduled_only_for_the_rest():
    scheduler = make_scheduler(budget=256)
    shared = [fake_token("shared", -i) for i in range(5 * BLOCK)]
    first = make_request("first", 0, max_tokens=2, tokens=shared + [1, 2])
    second = make_request("second", 0, max_tokens=2, tokens=shared + [3])
    outputs = run(scheduler, {0: [first], 3: [second]})
    assert rows_of(outputs, "second")[0] == (5 * BLOCK, 1)
    assert second.num_cached_tokens == 5 * BLOCK


def test_fork_children_share_the_prompt_blocks():
    scheduler = make_scheduler(budget=64)
    parent = make_request("p", 2 * BLOCK + 2, max_tokens=3)
    scheduler.add_request(parent)
    deliver(scheduler, scheduler.schedule())
    children = [Request(f"p#{i}", parent.prompt_token_ids, max_tokens=3) for i in (1, 2)]
    for child in children:
        scheduler.fork_request("p", child)
        assert scheduler.kv_cache_manager.block_table(child.request_id) == \
            scheduler.kv_cache_manager.block_table("p")[:2]
    out = scheduler.schedule()
    rows = {row.request_id: row for row in out.scheduled}
    assert (rows["p#1"].num_computed_tokens, rows["p#1"].num_new_tokens) == (2 * BLOCK, 2)
    assert rows["p#1"].is_new and rows["p#1"].new_block_ids == rows["p#1"].block_table
    assert rows["p#1"].block_table[:2] == rows["p"].block_table[:2]
    scheduler.finish_requests(["p", "p#1", "p#2"], RequestStatus.FINISHED_ABORTED)
    assert scheduler.kv_cache_manager.usage == 0.0


def test_max_model_len_stops_scheduling_and_rejects_long_prompts():
    scheduler = make_scheduler(max_model_len=12)
    with pytest.raises(ValueError, match="max_model_len"):
        scheduler.add_request(make_request("too-long", 12))
    request = make_request("a", 8, max_tokens=100)
    run(scheduler, {0: [request]})
    assert request.num_tokens == 12 and request.num_output_tokens == 4


def test_finish_requests_frees_blocks_and_reports_ids():
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", 10, max_tokens=5))
    scheduler.add_request(make_request("b", 10, max_tokens=5))
    deliver(scheduler, scheduler.schedule())
    scheduler.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    scheduler.finish_requests("unknown", RequestStatus.FINISHED_ABORTED)
    assert scheduler.kv_cache_manager.block_table("a") == []
    out = scheduler.schedule()
    assert out.finished_ids == ["a"] and [row.request_id for row in out.scheduled] == ["b"]
    assert scheduler.schedule().finished_ids == []
    stats = scheduler.stats()
    assert (stats.num_running, stats.num_waiting) == (1, 0) and 0 < stats.kv_cache_usage < 1


def test_async_placeholders_schedule_ahead_of_the_tokens():
    scheduler = make_scheduler()
    request = make_request("a", 6, max_tokens=4)
    scheduler.add_request(request)
    step0 = scheduler.schedule()  # prefill: samples token 6
    assert step0.scheduled[0].samples and request.num_output_placeholders == 1
    step1 = scheduler.schedule()  # before step0's token: computes position 6 (a placeholder)
    assert [(r.num_computed_tokens, r.num_new_tokens) for r in step1.scheduled] == [(6, 1)]
    assert request.num_output_placeholders == 2 and request.num_tokens == 6
    deliver(scheduler, step0)
    assert request.output_token_ids == expected_output(request)[:1] and request.num_output_placeholders == 1
    step2 = scheduler.schedule()
    assert [(r.num_computed_tokens, r.num_new_tokens) for r in step2.scheduled] == [(7, 1)]
    deliver(scheduler, step1)
    step3 = scheduler.schedule()  # samples the 4th and last token
    deliver(scheduler, step2)
    assert scheduler.schedule().scheduled == []  # max_tokens counts placeholders: nothing more
    deliver(scheduler, step3)
    assert request.output_token_ids == expected_output(request)
    assert request.status == RequestStatus.FINISHED_LENGTH_CAPPED


@pytest.mark.parametrize("num_blocks", [256, 12])
def test_async_and_sync_scheduling_give_the_same_tokens(num_blocks):
    def workload():
        rng = random.Random(1)
        arrivals = {}
        for i in range(12):
            arrivals.setdefault(rng.randrange(10), []).append(
                make_request(f"r{i}", rng.randint(1, 30), max_tokens=rng.randint(1, 10), arrival=float(i)))
        return arrivals

    results = []
    for async_scheduling in (False, True):
        arrivals = workload()
        scheduler = make_scheduler(num_blocks=num_blocks, max_num_seqs=4, budget=16)
        run(scheduler, arrivals, async_scheduling=async_scheduling)
        assert (scheduler.num_preemptions > 0) == (num_blocks == 12)
        results.append({r.request_id: r.output_token_ids for r in itertools.chain(*arrivals.values())})
        for request in itertools.chain(*arrivals.values()):
            assert request.output_token_ids == expected_output(request)
    assert results[0] == results[1]


def test_async_stop_one_step_behind_drops_the_extra_token():
    scheduler = make_scheduler()
    request = make_request("a", 5, max_tokens=10)
    stop = expected_output(request)[2]
    run(scheduler, {0: [request]}, async_scheduling=True, stop_tokens={stop})
    assert request.output_token_ids == expected_output(request)[:3]
    assert request.status == RequestStatus.FINISHED_STOPPED


def test_a_request_preempting_itself_lets_the_rest_run():
    scheduler = make_scheduler(num_blocks=5, budget=64, policy="priority")
    low = make_request("low", 4, max_tokens=20, arrival=0.0, priority=9)
    high = make_request("high", 4, max_tokens=20, arrival=1.0, priority=0)
    scheduler.add_request(low)
    deliver(scheduler, scheduler.schedule())
    scheduler.add_request(high)
    out = step_until_preemption(scheduler)
    assert out.preempted_ids == ["low"] and [row.request_id for row in out.scheduled] == ["high"]
