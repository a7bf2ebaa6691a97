"""One engine over processes: every process runs the same `EngineCore` on the same inputs.

The scheduler is deterministic given the order in which requests and aborts enter it and the
step at which each does (FCFS needs no clock; the priority policy's `arrival_time` travels in
the event; sampled tokens are replicated, so stop checks agree). So the leader (process 0, which
owns the front end) never broadcasts a step: it appends each arrival and abort to the event log
(jaxserve/event_log.py), stamped to take effect `LOOKAHEAD_STEPS` steps later, and every process
applies it before that step.

Why a follower never waits on the log while it has work: an event applied before step N was
written before the leader dispatched step N - 2; a follower scheduling step N has read step
N - 2's results (the engine keeps one step in flight), which went through collectives the
leader's devices joined, so the event is already in the store and a non-blocking read finds it.
When both sides have nothing to run, the leader writes a `sync` event when the next request
comes, and both apply everything logged so far at once; an idle follower waits for that key,
which is waiting for an arrival, not for a step.

Only the leader returns outputs; followers compute the same ones and hand them to `on_output`
(dropped by default).
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from typing import Any, Sequence

from jaxserve.engine import EngineCore
from jaxserve.event_log import ABORT, ADD, LOOKAHEAD_STEPS, PAUSE, SHUTDOWN, SYNC, Event, EventLog
from jaxserve.outputs import RequestOutput
from jaxserve.sampling_params import SamplingParams

logger = logging.getLogger("jaxserve.multihost")


class _Replica:
    """What leader and follower share: applying events and stepping the core."""

    def __init__(self, core: EngineCore, log: EventLog):
        self.core = core
        self.log = log
        self._stalled = False  # the last step neither dispatched nor processed anything

    @property
    def step_index(self) -> int:
        return self.core.runner.num_dispatched_steps

    def _idle(self) -> bool:
        """Nothing to run until a new event: both sides reach this in the same state."""
        return not self.core.in_flight and (self._stalled or not self.core.has_unfinished_requests())

    def _apply(self, event: Event, prompt: Any = None) -> None:
        data = event.data
        if event.kind == ADD:
            try:
                self.core.add_request(
                    data["request_id"], data["prompt"] if prompt is None else prompt, data["params"],
                    priority=data["priority"], stream=data["stream"], arrival_time=data["arrival_time"])
            except ValueError:  # checked when logged; would fail the same way on every process
                logger.exception("logged request %r rejected", data["request_id"])
        elif event.kind == ABORT:
            self.core.abort_request(data["request_ids"])
        elif event.kind == PAUSE:
            self.core.pause_request(data["request_id"], data["paused"])
        else:
            raise AssertionError(f"{event.kind} event applied as a request event")

    def _step(self) -> list[RequestOutput]:
        before, had_in_flight = self.step_index, bool(self.core.in_flight)
        outputs = self.core.step()
        # A step that only started a KV load (host tier) is not stalled: the next one takes the
        # loaded request back. Host-tier loads are resolved when they start, so every process
        # sees them done at the same step.
        self._stalled = self.step_index == before and not had_in_flight and not self.core.scheduler.waiting_for_kv
        return outputs


class LeaderEngine(_Replica):
    """The engine on process 0: `EngineCore`'s interface (LLM and AsyncLLM use it unchanged);
    requests and aborts go through the log. Other attributes are the core's."""

    def __init__(self, core: EngineCore, log: EventLog):
        super().__init__(core, log)
        # Logged but not applied yet, in log order, each with the caller's own prompt (its text).
        self._pending: collections.deque[tuple[Event, Any]] = collections.deque()
        self._shut_down = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.core, name)

    def add_request(self, request_id: str, prompt: Any, params: SamplingParams | None = None, *,
                    priority: int = 0, stream: bool = False, arrival_time: float | None = None) -> None:
        """Validate (ValueError naming the field, nothing logged) and log the arrival."""
        if self._shut_down:
            raise RuntimeError("the multi-host engine is shut down")
        processed, params, priority = self.core.check_request(request_id, prompt, params, priority,
                                                             ids_in_use=self._pending_ids())
        data = dict(request_id=request_id, priority=priority, stream=stream, params=params,
                    prompt={"prompt_token_ids": processed.token_ids, "cache_salt": processed.cache_salt},
                    arrival_time=arrival_time or time.monotonic())
        self._log(Event(ADD, self.step_index + LOOKAHEAD_STEPS, data), prompt)

    def abort_request(self, request_ids: str | Sequence[str]) -> None:
        """Log an abort of the unfinished ones (others are ignored, as `EngineCore` does)."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        pending = self._pending_ids()
        known = [i for i in ids if i in self.core.states or i in pending]
        if known:
            self._log(Event(ABORT, self.step_index + LOOKAHEAD_STEPS, {"request_ids": known}), None)

    def pause_request(self, request_id: str, paused: bool = True) -> None:
        """Log a pause (or resume): the schedule must change at the same step everywhere."""
        if request_id in self.core.states or request_id in self._pending_ids():
            self._log(Event(PAUSE, self.step_index + LOOKAHEAD_STEPS,
                            {"request_id": request_id, "paused": paused}), None)

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests() or bool(self._pending)

    def is_paused(self) -> bool:
        return self.core.is_paused() and not self._pending

    def step(self) -> list[RequestOutput]:
        """Apply the events due, then one engine step (as `EngineCore.step`)."""
        if self._idle():
            if not self._pending:
                return []
            self.log.append(Event(SYNC, self.step_index))
            while self._pending:
                self._apply(*self._pending.popleft())
        else:
            while self._pending and self._pending[0][0].step <= self.step_index:
                self._apply(*self._pending.popleft())
        return self._step()

    def shutdown(self) -> None:
        """Abort what is left, run until idle, and tell the followers to stop. Idempotent."""
        if self._shut_down:
            return
        self.abort_request(list(self.core.states) + self._pending_ids())
        while self.has_unfinished_requests():
            self.step()
        self.log.append(Event(SHUTDOWN, self.step_index))
        self._shut_down = True

    def _log(self, event: Event, prompt: Any) -> None:
        self.log.append(event)
        self._pending.append((event, prompt))

    def _pending_ids(self) -> list[str]:
        return [e.data["request_id"] for e, _ in self._pending if e.kind == ADD]


class FollowerEngine(_Replica):
    """The engine on every other process: replays the log until the leader shuts down."""

    def __init__(self, core: EngineCore, log: EventLog, on_output: Callable[[RequestOutput], None] | None = None,
                 wait_timeout_s: float = 60.0):
        super().__init__(core, log)
        self.on_output = on_output
        self.wait_timeout_s = wait_timeout_s
        self._buffer: collections.deque[Event] = collections.deque()  # read, not applied yet

    def run(self) -> None:
        """Follow until the leader's shutdown event."""
        while self.follow_step():
            pass

    def follow_step(self) -> bool:
        """One iteration of the leader's loop; False once the leader has shut down."""
        if self._idle():
            event = self._next_waiting()
            while event.kind not in (SYNC, SHUTDOWN):
                self._apply(event)
                event = self._next_waiting()
            if event.kind == SHUTDOWN:
                return False
        else:
            while (event := self._next_due()) is not None:
                self._apply(event)
        for output in self._step():
            if self.on_output is not None:
                self.on_output(output)
        return True

    def _next_due(self) -> Event | None:
        """The next event if it takes effect by this step (it is in the store by now, see the
        module docstring), else None; never waits."""
        if not self._buffer:
            event = self.log.poll()
            if event is None:
                return None
            self._buffer.append(event)
        head = self._buffer[0]
        if head.step > self.step_index or head.kind in (SYNC, SHUTDOWN):
            return None  # a sync or shutdown was written while the leader was idle: so will we be
        return self._buffer.popleft()

    def _next_waiting(self) -> Event:
        """The next event, waiting for the leader as long as it takes (idle: no step is held)."""
        if self._buffer:
            return self._buffer.popleft()
        while True:
            try:
                return self.log.wait(self.wait_timeout_s)
            except Exception as error:  # jax raises its runtime error with a DEADLINE_EXCEEDED status
                if "DEADLINE_EXCEEDED" not in str(error):
                    raise
