"""The scheduler: vLLM V1's rule over one token budget per step.

There are no prefill or decode phases. Every request has `num_computed_tokens` and wants to reach
`num_tokens + num_output_placeholders`; a step hands out `max_num_batched_tokens` tokens:

1. RUNNING requests first, in order: each gets min(what it wants, the budget left,
   `long_prefill_token_threshold` if set) tokens, so a long prompt is chunked over several steps.
   When blocks run out, the lowest-priority running request (the tail of `running` under FCFS, the
   largest (priority, arrival_time) under the priority policy) is preempted by recompute: its
   blocks are freed (their hashes stay in the prefix cache), its `num_computed_tokens` is reset to
   0 and it goes back to the front of the waiting queue. Then the allocation is retried.
2. WAITING requests next, but only if nothing was preempted in this step, while fewer than
   `max_num_seqs` run: a prefix-cache hit counts as computed, the rest is scheduled (chunked if
   need be); a request whose blocks do not fit waits for a later step.

Rows of the `SchedulerOutput` are ordered decode-first (rows computing one token before prefill
chunks), which the ragged attention kernels want.

Async scheduling (vLLM #23569). `schedule()` advances `num_computed_tokens` at once, before the
step runs, so the next `schedule()` may be called before this step's tokens reach the host:

- A row whose tokens reach the request's last token samples one token (`ScheduledRequest.samples`);
  its id is not known yet, so the request's `num_output_placeholders` grows by 1. The model runner
  keeps sampled ids on device in the request's token history.
- The next `schedule()` sees `num_computed_tokens == num_tokens + num_output_placeholders - 1`, so
  it schedules exactly one more token for that request: the placeholder, whose id the runner reads
  from its device history. Its own sampled token becomes a second placeholder.
- `update_from_output(output, sampled_token_ids)` later appends the real ids to
  `output_token_ids` and lowers `num_output_placeholders` by as many, which leaves
  `num_tokens + num_output_placeholders` unchanged; blocks whose tokens are now all known enter
  the prefix cache. Tokens for a request finished in the meantime are dropped; tokens for a request
  preempted in the meantime are kept (they were computed before its blocks were reused, since
  steps run in order), and its recompute covers them through the device history.
- Stop checks run on the host after `update_from_output`, so they lag one step: a request that
  stopped may have one more token computed, which is dropped. The scheduler itself never schedules
  past `max_tokens` or `max_model_len` counting placeholders, so no row samples a token beyond
  those limits; finishing a request is `finish_requests`, called by the stop checker's owner.

Speculative decoding (jaxserve/spec_decode/). A running request whose row reaches its last known
token, with nothing in flight (no placeholder), carries the drafts in `Request.spec_token_ids`
(handed out once the step's work is scheduled, in schedule order, as many as fit the budget,
`draft_token_room`, `max_tokens` and `max_model_len`): its row computes the last known
token and the k drafts, its blocks are allocated for all of them, and `num_computed_tokens`
advances by 1 + k while `num_output_placeholders` grows by 1, so the request is not scheduled
again until the row's result comes back. `update_from_output` then takes 1 to k + 1 tokens for
the row (the accepted drafts and one more) and rolls `num_computed_tokens` back over the rejected
drafts; their KV slots are rewritten by later steps (blocks cached only hold known tokens).

With synchronous use (`update_from_output` before each `schedule()`) placeholders are back to 0 at
every `schedule()` and the same code is plain vLLM V1 scheduling.

Data-parallel attention (a `ShardedKVCacheManager`, jaxserve/kv/sharded_cache_manager.py, dp > 1): each
dp shard computes its own slice of the batch, as each DP rank of vLLM schedules its own engine
core and each rank of SGLang's DP attention its own batch, so `max_num_batched_tokens` and
`max_num_seqs` hold per shard. A running request is charged to its shard (`shard_of`); one whose
shard has spent its tokens is skipped and the others go on. A waiting request is placed by
`get_computed_blocks` among the shards that still have both tokens and a free seat (`room`),
keeping the prefix-hit preference among those; a request that already holds blocks (a fork) goes
only to its own shard. When the head of the queue cannot be placed, admission stops (FCFS order
as with one budget). Preemption stays within a shard. With one pool there is one budget and the
rule is the one above. Everything is ordered by lists, never by set or dict order or time, so
every process of a multi-host engine (jaxserve/multihost.py) makes the same schedule.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import itertools
from collections.abc import Callable, Iterable, Iterator

from jaxserve.config import SCHEDULING_POLICIES as POLICIES
from jaxserve.kv.cache_manager import KVCacheManager
from jaxserve.kv.connector import KVConnector
from jaxserve.request import Request, RequestStatus
from jaxserve.sampling_params import SamplingParams


@dataclasses.dataclass(frozen=True)
class NewRequestData:
    """What the runner needs to create a request's device state, the first time it is scheduled."""

    token_ids: list[int]  # every token the request has (its prompt; a fork's, the same)
    prompt_len: int
    sampling_params: SamplingParams | None


@dataclasses.dataclass
class ScheduledRequest:
    """One row of a step: `num_new_tokens` tokens from position `num_computed_tokens`."""

    request_id: str
    num_new_tokens: int
    num_computed_tokens: int  # before this step; prefix-cache hits included
    new_block_ids: list[int]  # appended to the table this step; the whole table if new or resumed
    block_table: list[int]  # the table after this step's allocation
    is_new: bool = False  # first time scheduled: the runner creates its state (`new_request`)
    is_resumed: bool = False  # back from preemption: the runner rewrites its block table
    samples: bool = False  # the row reaches the request's last token: the step samples one
    shard: int = 0  # the dp shard holding its blocks (block ids are local to it)
    new_request: NewRequestData | None = None  # when is_new
    # Every KV group's table after this step (jaxserve/kv/cache_manager.py): group 0's is
    # `block_table`; a sliding group's has the null block 0 where its window gave a block back.
    block_tables: tuple[list[int], ...] = ()
    spec_token_ids: list[int] = dataclasses.field(default_factory=list)  # drafts: the row's last tokens


@dataclasses.dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]  # decode rows (one new token) first, then prefill chunks
    num_scheduled_tokens: int
    preempted_ids: list[str]  # preempted in this step
    finished_ids: list[str]  # finished since the previous step: the runner frees their state

    @property
    def num_decode_rows(self) -> int:
        return sum(1 for row in self.scheduled if row.num_new_tokens == 1)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclasses.dataclass(frozen=True)
class SchedulerStats:
    """The counts the metrics exporter reads."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    prefix_cache_queries: int  # tokens
    prefix_cache_hits: int  # tokens
    num_preemptions: int


class FcfsQueue:
    """Waiting requests in arrival order; preempted ones go back to the front."""

    def __init__(self) -> None:
        self._queue: collections.deque[Request] = collections.deque()

    def add(self, request: Request) -> None:
        self._queue.append(request)

    def prepend(self, request: Request) -> None:
        self._queue.appendleft(request)

    def peek(self) -> Request:
        return self._queue[0]

    def pop(self) -> Request:
        return self._queue.popleft()

    def remove(self, request: Request) -> None:
        self._queue.remove(request)

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._queue)


class PriorityQueue:
    """Waiting requests by (priority, arrival_time): a preempted request takes its place by key."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, float, int, Request]] = []
        self._counter = itertools.count()  # ties keep insertion order; Requests never compare

    def add(self, request: Request) -> None:
        heapq.heappush(self._heap, (request.priority, request.arrival_time, next(self._counter), request))

    prepend = add

    def peek(self) -> Request:
        return self._heap[0][-1]

    def pop(self) -> Request:
        return heapq.heappop(self._heap)[-1]

    def remove(self, request: Request) -> None:
        self._heap = [entry for entry in self._heap if entry[-1] is not request]
        heapq.heapify(self._heap)

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self) -> Iterator[Request]:
        return (entry[-1] for entry in sorted(self._heap))


@dataclasses.dataclass
class _StepBudget:
    """What each shard (one, without data parallelism) can still take in the step being built."""

    tokens: list[int]  # tokens left per shard
    seats: list[int]  # running requests that may still join, per shard

    @classmethod
    def start(cls, num_shards: int, max_num_batched_tokens: int, max_num_seqs: int,
              running_shards: Iterable[int]) -> _StepBudget:
        seats = [max_num_seqs] * num_shards
        for shard in running_shards:
            seats[shard] -= 1
        return cls([max_num_batched_tokens] * num_shards, seats)

    def has_tokens(self) -> bool:
        return any(t > 0 for t in self.tokens)

    def is_open(self, shard: int) -> bool:
        """Whether `shard` can admit a waiting request: tokens and a seat left."""
        return self.tokens[shard] > 0 and self.seats[shard] > 0

    def any_open(self) -> bool:
        return any(self.is_open(s) for s in range(len(self.tokens)))

    def room(self) -> list[int]:
        """Tokens each shard can give a newly admitted request (0 without a seat)."""
        return [t if self.is_open(s) else 0 for s, t in enumerate(self.tokens)]


@dataclasses.dataclass
class _Pending:
    """A row while the step is still being built (a later preemption may cancel it)."""

    request: Request
    num_new_tokens: int
    new_block_ids: list[int]
    is_new: bool = False
    is_resumed: bool = False
    spec_token_ids: list[int] = dataclasses.field(default_factory=list)


class Scheduler:
    """Continuous batching over one `KVCacheManager` (see the module docstring for the rule).

    Over a `ShardedKVCacheManager` (data-parallel attention), `max_num_seqs` and
    `max_num_batched_tokens` are per dp shard.

    `Request.max_tokens` must be resolved by the caller (vLLM's `max_tokens=None` means up to
    `max_model_len`); `policy` is "fcfs" or "priority" (lower `Request.priority` first).

    `draft_token_room(n)`: with speculative decoding, the draft tokens a step that schedules n
    tokens may add (the engine keeps drafts within the padding of the step's token bucket).

    `kv_connector` (jaxserve/kv/connector.py) may supply a waiting request's next blocks from
    outside (host tier, another engine): the request then holds its blocks in `waiting_for_kv`,
    using no budget, until the connector reports them loaded, and rejoins the front of the queue.
    """

    def __init__(self, kv_cache_manager: KVCacheManager, *, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, policy: str = "fcfs", long_prefill_token_threshold: int = 0,
                 kv_connector: KVConnector | None = None, draft_token_room: Callable[[int], int] | None = None):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        for name, value in (("max_num_seqs", max_num_seqs), ("max_num_batched_tokens", max_num_batched_tokens),
                            ("max_model_len", max_model_len)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if long_prefill_token_threshold < 0:
            raise ValueError(f"long_prefill_token_threshold must be >= 0, got {long_prefill_token_threshold}")
        self.kv_cache_manager = kv_cache_manager
        self.num_shards = kv_cache_manager.num_shards  # one budget each
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.policy = policy
        self.long_prefill_token_threshold = long_prefill_token_threshold
        self.requests: dict[str, Request] = {}  # every unfinished request
        self.waiting = PriorityQueue() if policy == "priority" else FcfsQueue()
        self.running: list[Request] = []
        self.kv_connector = kv_connector or KVConnector()
        kv_cache_manager.block_pool.on_evict = self.kv_connector.blocks_evicted
        # Loading from the connector: request id -> (request, status to return to).
        self.waiting_for_kv: dict[str, tuple[Request, RequestStatus]] = {}
        self.num_preemptions = 0
        self._finished_ids: list[str] = []
        # Speculative decoding: how many draft tokens a step of n scheduled tokens may add (None:
        # the token budget's rest).
        self.draft_token_room = draft_token_room

    # ---- requests in and out ----

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in the scheduler")
        if request.num_tokens >= self.max_model_len:
            raise ValueError(f"prompt length must be < max_model_len ({self.max_model_len}), "
                             f"got {request.num_tokens}")
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.waiting.add(request)

    def fork_request(self, parent_id: str, child: Request) -> None:
        """Add `child` (same prompt) sharing the parent's computed full prompt blocks (`n > 1`)."""
        parent = self.requests[parent_id]
        self.add_request(child)
        self.kv_cache_manager.fork(parent, child)

    def finish_requests(self, request_ids: str | Iterable[str], status: RequestStatus) -> None:
        """Finish (stop, length cap, abort) requests and free their blocks; unknown ids are ignored."""
        assert status.is_finished, f"{status!r} is not a finished status"
        for request_id in [request_ids] if isinstance(request_ids, str) else request_ids:
            request = self.requests.pop(request_id, None)
            if request is None:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            elif request.status == RequestStatus.WAITING_FOR_KV:
                del self.waiting_for_kv[request_id]
            else:
                self.waiting.remove(request)
            request.status = status
            self.kv_connector.request_finished(request, self.kv_cache_manager.block_table(request_id),
                                               self.kv_cache_manager.block_hashes(request))
            self.kv_cache_manager.free(request)
            self._finished_ids.append(request_id)

    # ---- one step ----

    def schedule(self) -> SchedulerOutput:
        self._collect_loaded_kv()
        budget = _StepBudget.start(self.num_shards, self.max_num_batched_tokens, self.max_num_seqs,
                                   [self._shard(r) for r in self.running])
        pending: dict[str, _Pending] = {}
        preempted: list[Request] = []

        i = 0
        while i < len(self.running) and budget.has_tokens():
            request = self.running[i]
            shard = self._shard(request)
            num_new = self._num_new_tokens(request, request.num_computed_tokens, budget.tokens[shard])
            if num_new == 0:  # done for now, or its shard's tokens are spent
                i += 1
                continue
            while (new_block_ids := self.kv_cache_manager.allocate_slots(request, num_new)) is None:
                victim = self._pick_victim(request)
                victim_shard = self._shard(victim)  # `shard`: only its own shard's blocks help
                if self.running.index(victim) < i:
                    i -= 1
                cancelled = pending.pop(victim.request_id, None)
                if cancelled is not None:
                    budget.tokens[victim_shard] += cancelled.num_new_tokens
                self._preempt(victim)
                budget.seats[victim_shard] += 1
                preempted.append(victim)
                if victim is request:
                    break
            if new_block_ids is None:
                continue  # it preempted itself; `running[i]` is now the next request
            pending[request.request_id] = _Pending(request, num_new, new_block_ids)
            budget.tokens[shard] -= num_new
            i += 1

        if not preempted:
            self._schedule_waiting(budget, pending)
        self._add_drafts(pending, budget)
        return self._finish_schedule(pending, preempted)

    def _shard(self, request: Request) -> int:
        """The dp shard holding a request's blocks (0 with one pool)."""
        return self.kv_cache_manager.shard_of(request.request_id)

    def _lookup(self, request: Request, budget: _StepBudget) -> tuple[list, int, int]:
        """(cached blocks, cached tokens, shard) for a request holding no blocks: with dp shards,
        placed among those that can still take work this step."""
        blocks, num_computed = self.kv_cache_manager.get_computed_blocks(request, budget.room())
        return blocks, num_computed, self.kv_cache_manager.placement(request.request_id)

    def _schedule_waiting(self, budget: _StepBudget, pending: dict[str, _Pending]) -> None:
        skipped = []
        while self.waiting and budget.any_open():
            request = self.waiting.peek()
            if request.paused:
                skipped.append(self.waiting.pop())
                continue
            # A request holding blocks (a fork, or back from a KV load) has its prefix, and its shard.
            computed_blocks, num_computed, num_external = [], request.num_computed_tokens, 0
            if self.kv_cache_manager.block_table(request.request_id):
                shard = self._shard(request)
                if not budget.is_open(shard):
                    break
            else:
                computed_blocks, num_computed, shard = self._lookup(request, budget)
                num_external = self.kv_connector.get_num_new_matched_tokens(
                    request, self.kv_cache_manager.block_hashes(request), num_computed)
            num_new = self._num_new_tokens(request, num_computed, budget.tokens[shard])
            if num_new == 0:
                skipped.append(self.waiting.pop())  # length-capped, waiting to be finished
                continue
            if num_external:
                if not self._start_loading_kv(request, computed_blocks, num_computed, num_external):
                    break
                continue
            if self.kv_cache_manager.allocate_slots(request, num_new, computed_blocks) is None:
                break
            shard = self._shard(request)  # a request with nothing cached may fall back to another shard
            self.waiting.pop()
            is_resumed = request.status == RequestStatus.PREEMPTED
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_computed
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_computed
            self.running.append(request)
            table = self.kv_cache_manager.block_table(request.request_id)
            pending[request.request_id] = _Pending(request, num_new, table, not is_resumed, is_resumed)
            budget.tokens[shard] -= num_new
            budget.seats[shard] -= 1
        for request in reversed(skipped):
            self.waiting.prepend(request)

    def _start_loading_kv(self, request: Request, computed_blocks, num_computed: int, num_external: int) -> bool:
        """Allocate blocks for `num_external` tokens the connector loads; False if too few are free."""
        if self.kv_cache_manager.allocate_slots(request, num_external, computed_blocks) is None:
            return False
        self.waiting.pop()
        size = self.kv_cache_manager.block_size
        first, last = num_computed // size, (num_computed + num_external) // size
        self.kv_connector.update_state_after_alloc(
            request, self.kv_cache_manager.block_table(request.request_id)[first:last],
            self.kv_cache_manager.block_hashes(request)[first:last])
        self.waiting_for_kv[request.request_id] = (request, request.status)
        request.status = RequestStatus.WAITING_FOR_KV
        request.num_computed_tokens = num_computed
        return True

    def _collect_loaded_kv(self) -> None:
        """Requests whose loads are done rejoin the front of the queue, their loaded tokens computed."""
        for request_id, num_loaded in reversed(self.kv_connector.get_finished_loading().items()):
            entry = self.waiting_for_kv.pop(request_id, None)
            if entry is None:
                continue  # finished while loading
            request, request.status = entry
            request.num_computed_tokens += num_loaded
            self.waiting.prepend(request)

    def _finish_schedule(self, pending: dict[str, _Pending], preempted: list[Request]) -> SchedulerOutput:
        """Advance the scheduled requests, as if the step had run, and build the output."""
        rows = []
        for p in pending.values():
            request = p.request
            num_computed = request.num_computed_tokens
            request.num_computed_tokens += p.num_new_tokens
            samples = (request.num_computed_tokens - len(p.spec_token_ids)
                       == request.num_tokens + request.num_output_placeholders)
            request.spec_token_ids = []  # consumed (or stale): the proposer gives the next ones
            if samples:
                request.num_output_placeholders += 1
            self.kv_cache_manager.cache_blocks(request, request.num_computed_tokens)
            new_request = None
            if p.is_new:
                new_request = NewRequestData(list(request.all_token_ids), request.num_prompt_tokens,
                                             request.sampling_params)
            rows.append(ScheduledRequest(
                request.request_id, p.num_new_tokens, num_computed, p.new_block_ids,
                self.kv_cache_manager.block_table(request.request_id), p.is_new, p.is_resumed, samples,
                self._shard(request), new_request,
                block_tables=self.kv_cache_manager.block_tables(request.request_id), spec_token_ids=p.spec_token_ids,
            ))
        rows.sort(key=lambda row: row.num_new_tokens > 1)  # stable: decode rows first
        finished, self._finished_ids = self._finished_ids, []
        return SchedulerOutput(rows, sum(row.num_new_tokens for row in rows),
                               [r.request_id for r in preempted], finished)

    def _num_new_tokens(self, request: Request, num_computed: int, budget: int) -> int:
        """Tokens to compute for `request` this step; 0 once no further token may be sampled,
        and while it is paused."""
        if request.paused:
            return 0
        num_target = request.num_tokens + request.num_output_placeholders
        if request.num_output_tokens + request.num_output_placeholders >= request.max_tokens:
            return 0
        if num_target >= self.max_model_len:
            return 0
        num_new = min(num_target - num_computed, budget)
        if self.long_prefill_token_threshold:
            num_new = min(num_new, self.long_prefill_token_threshold)
        return max(num_new, 0)

    def _add_drafts(self, pending: dict[str, _Pending], budget: _StepBudget) -> None:
        """Once the step's work is scheduled, rows reaching their request's last known token take
        its drafts, in schedule order, within the tokens left (and `draft_token_room`)."""
        if not any(p.request.spec_token_ids for p in pending.values()):
            return
        room = budget.tokens[0]  # speculation runs with one dp shard
        if self.draft_token_room is not None:
            room = min(room, self.draft_token_room(sum(p.num_new_tokens for p in pending.values())))
        for p in pending.values():
            drafts = self._fit_drafts(p.request, p.num_new_tokens, room)
            if not drafts:
                continue
            blocks = self.kv_cache_manager.allocate_slots(p.request, p.num_new_tokens + len(drafts))
            if blocks is None:  # drafts never preempt: without free blocks, the row goes without
                continue
            p.new_block_ids = p.new_block_ids + blocks
            p.num_new_tokens += len(drafts)
            p.spec_token_ids = drafts
            room -= len(drafts)
            budget.tokens[0] -= len(drafts)

    def _fit_drafts(self, request: Request, num_new: int, room: int) -> list[int]:
        """The request's drafts that this step may verify after its `num_new` tokens: only for a
        row reaching its last known token with nothing in flight, at most `room`, and never
        sampling past `max_tokens` or `max_model_len`."""
        drafts = request.spec_token_ids
        if (not drafts or request.num_output_placeholders
                or request.num_computed_tokens + num_new != request.num_tokens):
            return []
        room = min(room, request.max_tokens - request.num_output_tokens - 1,
                   self.max_model_len - 1 - request.num_tokens)
        return drafts[: max(room, 0)]

    def _pick_victim(self, request: Request) -> Request:
        """The lowest-priority running request whose blocks would make room for `request` (with
        per-shard pools, jaxserve/kv/sharded_cache_manager.py, only those on its shard)."""
        candidates = [r for r in self.running if self.kv_cache_manager.same_pool(r, request)]
        if self.policy == "priority":
            return max(candidates, key=lambda r: (r.priority, r.arrival_time))
        return candidates[-1]

    def _preempt(self, request: Request) -> None:
        """Preempt by recompute: free the blocks, restart from 0 (cached prefixes will hit)."""
        self.running.remove(request)
        self.kv_cache_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.prepend(request)

    # ---- results ----

    def update_from_output(self, output: SchedulerOutput, sampled_token_ids: dict[str, list[int]]) -> None:
        """Replace the placeholders of `output`'s sampling rows with the real token ids (a row
        with k drafts: 1 to k + 1 of them, its rejected drafts rolled back)."""
        for row in output.scheduled:
            request = self.requests.get(row.request_id)
            if request is None:
                continue  # finished after this step was scheduled: its token is dropped
            new_token_ids = sampled_token_ids.get(row.request_id, [])
            num_drafts = len(row.spec_token_ids)
            assert (len(new_token_ids) == int(row.samples) if not num_drafts
                    else 1 <= len(new_token_ids) <= 1 + num_drafts), (
                f"request {row.request_id!r}: expected {int(row.samples)} sampled tokens "
                f"(+ up to {num_drafts} drafts), got {len(new_token_ids)}")
            request.output_token_ids.extend(new_token_ids)
            request.num_output_placeholders -= int(bool(new_token_ids))
            if num_drafts and request.status == RequestStatus.RUNNING:
                request.num_computed_tokens -= 1 + num_drafts - len(new_token_ids)
            if new_token_ids and request.status == RequestStatus.RUNNING:
                self.kv_cache_manager.cache_blocks(request, request.num_computed_tokens)

    # ---- counts ----

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self.waiting_for_kv)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def has_finished_requests(self) -> bool:
        """Requests finished since the last `schedule()`, which its output will name."""
        return bool(self._finished_ids)

    def stats(self) -> SchedulerStats:
        kv = self.kv_cache_manager
        return SchedulerStats(self.num_running, self.num_waiting, kv.usage, kv.prefix_cache_queries,
                              kv.prefix_cache_hits, self.num_preemptions)
