"""Scheduler with speculative decoding: rows carry drafts, blocks cover them, rejected drafts roll
back, drafts respect the budget, `draft_token_room`, `max_tokens` and free blocks, and a
request with a verification in flight is not scheduled again."""

from jaxserve.request import RequestStatus
from tests.jaxserve.test_scheduler import BLOCK, make_request, make_scheduler


def running(scheduler, *requests):
    """Add `requests` and run their prompt step; each one's first token, 7, delivered."""
    for request in requests:
        scheduler.add_request(request)
    out = scheduler.schedule()
    scheduler.update_from_output(out, {row.request_id: [7] for row in out.scheduled if row.samples})
    return requests[0] if len(requests) == 1 else requests


def test_drafts_ride_in_the_row_and_rejected_ones_roll_back():
    scheduler = make_scheduler()
    request = running(scheduler, make_request("a", 6, max_tokens=20))
    assert request.num_computed_tokens == 6 and request.num_tokens == 7
    request.spec_token_ids = [11, 12, 13]
    out = scheduler.schedule()
    (row,) = out.scheduled
    assert (row.num_new_tokens, row.spec_token_ids, row.samples) == (4, [11, 12, 13], True)
    assert len(row.block_table) * BLOCK >= 7 + 3  # the drafts' slots are allocated
    assert request.spec_token_ids == []  # consumed
    assert scheduler.schedule().is_empty  # nothing more until the verification comes back
    scheduler.update_from_output(out, {"a": [11, 12, 99]})  # two drafts accepted, the third replaced
    assert request.output_token_ids == [7, 11, 12, 99]
    assert request.num_computed_tokens == request.num_tokens - 1 == 9
    assert request.num_output_placeholders == 0
    (row,) = scheduler.schedule().scheduled
    assert (row.num_computed_tokens, row.num_new_tokens) == (9, 1)


def test_drafts_fit_the_room_the_budget_and_max_tokens():
    scheduler = make_scheduler(budget=8, draft_token_room=lambda n: 16 - n)
    a, b = running(scheduler, make_request("a", 2, max_tokens=3), make_request("b", 2, max_tokens=20))
    a.spec_token_ids, b.spec_token_ids = [1, 2, 3, 4], [5, 6, 7, 8, 9, 10, 11]
    rows = {row.request_id: row for row in scheduler.schedule().scheduled}
    assert rows["a"].spec_token_ids == [1]  # max_tokens 3: one token out, at most two more sampled
    assert rows["b"].spec_token_ids == [5, 6, 7, 8, 9]  # the budget: 8 - 2 rows - 1 draft of a

    scheduler = make_scheduler(budget=64, draft_token_room=lambda n: 3)
    c = running(scheduler, make_request("c", 4, max_tokens=20))
    c.spec_token_ids = [1, 2, 3, 4, 5]
    assert scheduler.schedule().scheduled[0].spec_token_ids == [1, 2, 3]


def test_drafts_never_preempt():
    scheduler = make_scheduler(num_blocks=3)  # two usable blocks (block 0 is the null block)
    request = running(scheduler, make_request("a", 6, max_tokens=20))
    request.spec_token_ids = [1, 2, 3, 4]  # 7 + 4 tokens would need a third block
    (row,) = scheduler.schedule().scheduled
    assert (row.num_new_tokens, row.spec_token_ids) == (1, [])
    assert scheduler.num_preemptions == 0 and request.status == RequestStatus.RUNNING
