"""`AsyncLLM`: the asyncio front end (the gRPC server's). One background thread owns the
`EngineCore`, which is not thread-safe: callers talk to it only through a command queue
(add, abort), and it hands each request's outputs to that request's `asyncio.Queue` through
`loop.call_soon_threadsafe`. The thread sleeps on a condition when there is nothing to do.

A step that raises fails the streams of every request it held (their blocks are freed) and the
loop goes on serving new requests; if the loop itself dies, every stream gets the error.

Backpressure: a stream holds at most `stream_buffer` outputs its consumer has not taken. When it
is full the engine pauses the request (it keeps its KV blocks but is not scheduled) until the
consumer has taken half of them; a request paused for `stream_stall_timeout_s` is aborted, which
frees its blocks. A gRPC client that stops reading stops its handler (HTTP/2 flow control), and
so its request: nobody's answer is generated into an unbounded queue.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import functools
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Self

from jaxserve.config import EngineConfig
from jaxserve.distributed import build_engine
from jaxserve.engine import EngineCore
from jaxserve.input_processor import ProcessedPrompt
from jaxserve.outputs import RequestOutput
from jaxserve.sampling_params import SamplingParams

logger = logging.getLogger("jaxserve.async_llm")

Prompt = str | list[int] | dict


@dataclasses.dataclass(eq=False)
class _Stream:
    """Where one request's outputs go: a queue read by a coroutine on `loop`.

    `delivered` is counted by the engine thread, `consumed` by the reader; `lock` makes the pause
    decision (engine thread) and the resume decision (reader) see both counts at once, so that a
    reader that empties the queue while the engine pauses always sends the resume."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    request_id: str = ""
    delivered: int = 0
    consumed: int = 0
    paused_since: float | None = None  # monotonic time the engine paused the request
    resume_sent: bool = False
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


@dataclasses.dataclass
class _Command:
    run: Callable[[], None]
    future: concurrent.futures.Future | None = None  # failed if the command never runs


@dataclasses.dataclass(frozen=True)
class PreparedRequest:
    """A request checked and tokenized (`AsyncLLM.prepare`), ready to `generate`."""

    prompt: ProcessedPrompt
    params: SamplingParams
    priority: int


@dataclasses.dataclass(frozen=True)
class _Load:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0


class AsyncLLM:
    """An engine served from a background thread to asyncio callers.

    `AsyncLLM(model="smollm2-135m-instruct", max_model_len=2048, ...)` takes every
    `EngineConfig` option as a keyword, or a ready `config=`, or an existing `engine=`.
    `stream_buffer` and `stream_stall_timeout_s` (None: never) bound what a consumer that does
    not read costs (see the module docstring)."""

    def __init__(self, model: str | None = None, *, config: EngineConfig | None = None,
                 engine: EngineCore | None = None, stream_buffer: int = 64,
                 stream_stall_timeout_s: float | None = 60.0, **options: Any):
        if isinstance(stream_buffer, bool) or not isinstance(stream_buffer, int) or stream_buffer < 2:
            raise ValueError(f"stream_buffer must be an integer >= 2, got {stream_buffer!r}")
        if stream_stall_timeout_s is not None and not stream_stall_timeout_s > 0:
            raise ValueError(f"stream_stall_timeout_s must be > 0 or None, got {stream_stall_timeout_s!r}")
        if engine is not None:
            if model is not None or config is not None or options:
                raise ValueError("pass either engine= or model/config/options, not both")
        else:
            if config is None:
                config = EngineConfig(**({"model": model} if model else {}), **options)
            elif model is not None or options:
                raise ValueError("pass either config= or model/options, not both")
            engine = build_engine(config)  # a LeaderEngine on process 0 of several
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.stream_buffer = stream_buffer
        self.stream_stall_timeout_s = stream_stall_timeout_s
        self._wakeup = threading.Condition()
        self._commands: collections.deque[_Command] = collections.deque()  # guarded by _wakeup
        self._stopping = False  # guarded by _wakeup
        self._dead: BaseException | None = None  # guarded by _wakeup
        self._streams: dict[str, _Stream] = {}  # engine thread only
        self._load = _Load()  # replaced whole by the engine thread, read by anyone
        self._thread = threading.Thread(target=self._run, name="jaxserve-engine", daemon=True)
        self._thread.start()

    # ---- public API ----

    async def prepare(self, prompt: Prompt, sampling_params: SamplingParams | None = None, *,
                      priority: int = 0) -> PreparedRequest:
        """Check a request and tokenize its prompt on a worker thread: a 4 MB prompt stalls
        neither the event loop nor the engine thread. ValueError naming the field."""
        loop = asyncio.get_running_loop()
        processed, params, priority = await loop.run_in_executor(
            None, self.engine.check_inputs, prompt, sampling_params, priority)
        return PreparedRequest(processed, params, priority)

    async def generate(self, prompt: Prompt | PreparedRequest, sampling_params: SamplingParams | None = None,
                       request_id: str | None = None, *, priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Yield delta `RequestOutput`s (new token ids and text per completion, every
        `stream_interval` tokens after the first; the last has `finished=True`).

        Bad input raises `ValueError` naming the field before anything is yielded. If the
        consumer stops early (break, `aclose()`, cancellation) the request is aborted and its KV
        blocks are freed before the next step. After a plain `break` that happens when the
        generator is finalized; wrap it in `contextlib.aclosing` to make it immediate. A
        `PreparedRequest` (from `prepare`) carries its own parameters and priority."""
        if not isinstance(prompt, PreparedRequest):
            prompt = await self.prepare(prompt, sampling_params, priority=priority)
        prompt, sampling_params, priority = prompt.prompt, prompt.params, prompt.priority
        request_id = uuid.uuid4().hex if request_id is None else request_id
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), request_id)
        added: concurrent.futures.Future = concurrent.futures.Future()
        add = functools.partial(self._add, request_id, prompt, sampling_params, priority, stream, added)
        self._submit(_Command(add, added))
        finished = False
        try:
            await asyncio.wrap_future(added)
            while not finished:
                item = await stream.queue.get()
                self._took(stream)
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self._submit_quietly(_Command(functools.partial(self._drop, request_id, stream)))

    async def abort(self, request_ids: str | list[str]) -> None:
        """Abort requests (unknown or finished ids are ignored). Each stream ends with a last
        output whose finish_reason is "abort"; their blocks are free when this returns."""
        await self._call(lambda: self.engine.abort_request(request_ids))

    def shutdown(self) -> None:
        """Abort every request (streams end with finish_reason "abort") and stop the engine
        thread. Idempotent; later `generate` calls raise RuntimeError."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info) -> None:
        # Joining takes up to one step: keep the event loop free meanwhile.
        await asyncio.get_running_loop().run_in_executor(None, self.shutdown)

    @property
    def num_running(self) -> int:
        return self._load.num_running

    @property
    def num_waiting(self) -> int:
        return self._load.num_waiting

    @property
    def kv_cache_usage(self) -> float:
        return self._load.kv_cache_usage

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive()

    # ---- caller side ----

    def _submit(self, command: _Command) -> None:
        with self._wakeup:
            if self._dead is not None:
                raise RuntimeError("AsyncLLM engine loop died") from self._dead
            if self._stopping:
                raise RuntimeError("AsyncLLM is shut down")
            self._commands.append(command)
            self._wakeup.notify()

    def _submit_quietly(self, command: _Command) -> None:
        try:
            self._submit(command)
        except RuntimeError:
            pass  # the loop is gone, and its requests with it

    def _took(self, stream: _Stream) -> None:
        """The reader took one item; once it has taken half the buffer of a paused request,
        resume it (one command per pause)."""
        with stream.lock:
            stream.consumed += 1
            resume = (stream.paused_since is not None and not stream.resume_sent
                      and stream.delivered - stream.consumed <= self.stream_buffer // 2)
            if resume:
                stream.resume_sent = True
        if resume:
            self._submit_quietly(_Command(functools.partial(self._resume, stream)))

    async def _call(self, function: Callable[[], Any]) -> Any:
        """Run `function` on the engine thread, between steps, and return its result."""
        future: concurrent.futures.Future = concurrent.futures.Future()

        def run():
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(function())
                except Exception as exc:  # noqa: BLE001 - raised in the caller
                    future.set_exception(exc)

        self._submit(_Command(run, future))
        return await asyncio.wrap_future(future)

    # ---- engine thread ----

    def _run(self) -> None:
        try:
            while (commands := self._next_commands()) is not None:
                for command in commands:
                    self._guarded(command.run)
                expired = self._abort_stalled()
                if commands or expired or self._has_work():
                    self._guarded(self._step)  # also flushes the final outputs of aborts
                self._snapshot()
            self._close()
        except BaseException as exc:  # every stream must hear of it
            logger.exception("AsyncLLM engine loop died")
            self._die(exc)

    def _has_work(self) -> bool:
        return self.engine.has_unfinished_requests() and not self.engine.is_paused()

    def _next_commands(self) -> list[_Command] | None:
        """The queued commands (maybe none, when the engine has work or a paused request's stall
        timeout is due); None when stopping."""
        with self._wakeup:
            while not (self._commands or self._stopping or self._has_work()):
                deadline = self._next_stall_deadline()
                if deadline is not None and deadline <= time.monotonic():
                    break
                self._wakeup.wait(None if deadline is None else deadline - time.monotonic())
            if self._stopping:
                return None
            commands = list(self._commands)
            self._commands.clear()
            return commands

    def _add(self, request_id: str, prompt: Prompt, params: SamplingParams | None, priority: int,
             stream: _Stream, added: concurrent.futures.Future) -> None:
        if not added.set_running_or_notify_cancel():
            return  # the caller went away before the request was added
        try:
            self.engine.add_request(request_id, prompt, params, priority=priority, stream=True)
        except Exception as exc:  # noqa: BLE001 - raised in the caller
            added.set_exception(exc)
            return
        self._streams[request_id] = stream
        added.set_result(None)

    def _drop(self, request_id: str, stream: _Stream) -> None:
        """The consumer of `stream` is gone: abort its request (not a later one reusing the id)."""
        if self._streams.get(request_id) is stream:
            del self._streams[request_id]
            self.engine.abort_request(request_id)

    def _step(self) -> None:
        deliveries = []
        for output in self.engine.step():
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue  # its consumer left; this is the final "abort" output
            if output.finished:
                del self._streams[output.request_id]
            deliveries.append((stream, output))
        # The load snapshot first: a reader that got a request's last output never sees it running.
        self._snapshot()
        self._deliver(deliveries)
        self._pause_full(stream for stream, output in deliveries if not output.finished)

    def _pause_full(self, streams) -> None:
        """Pause the requests whose readers hold `stream_buffer` untaken outputs."""
        for stream in streams:
            with stream.lock:
                full = stream.paused_since is None and stream.delivered - stream.consumed >= self.stream_buffer
                if full:
                    stream.paused_since = time.monotonic()
            if full:
                self.engine.pause_request(stream.request_id)

    def _resume(self, stream: _Stream) -> None:
        if self._streams.get(stream.request_id) is not stream:
            return  # finished or dropped meanwhile
        with stream.lock:
            stream.paused_since, stream.resume_sent = None, False
        self.engine.pause_request(stream.request_id, False)

    def _next_stall_deadline(self) -> float | None:
        if self.stream_stall_timeout_s is None:
            return None
        paused = [s.paused_since for s in self._streams.values() if s.paused_since is not None]
        return min(paused) + self.stream_stall_timeout_s if paused else None

    def _abort_stalled(self) -> bool:
        """Abort the requests paused longer than the stall timeout (their blocks are freed; the
        final "abort" output waits in the stream for a reader that may never come)."""
        deadline = self._next_stall_deadline()
        if deadline is None or deadline > time.monotonic():
            return False
        limit = time.monotonic() - self.stream_stall_timeout_s
        stalled = [rid for rid, s in self._streams.items() if s.paused_since is not None and s.paused_since <= limit]
        for request_id in stalled:
            logger.warning("request %s: its reader took nothing for %.0f s; aborted, its KV freed",
                           request_id, self.stream_stall_timeout_s)
        self.engine.abort_request(stalled)
        return bool(stalled)

    def _guarded(self, function: Callable[[], None]) -> None:
        """Run `function`; if it raises, fail and abort every live request, then carry on.
        If that cleanup raises too, the loop dies."""
        try:
            function()
        except Exception as exc:
            logger.exception("engine failed; failing %d requests", len(self._streams))
            self._fail_all(exc)
            self.engine.abort_request(list(self.engine.states))

    def _fail_all(self, exc: BaseException) -> None:
        streams, self._streams = self._streams, {}
        self._deliver([(stream, exc) for stream in streams.values()])

    def _deliver(self, deliveries: list[tuple[_Stream, RequestOutput | BaseException]]) -> None:
        """Hand items to their queues: one callback per event loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = collections.defaultdict(list)
        for stream, item in deliveries:
            by_loop[stream.loop].append((stream.queue, item))
        for stream, _ in deliveries:
            with stream.lock:
                stream.delivered += 1
        closed = set()
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # the loop is closed: nobody will read these streams
                closed.add(loop)
        if closed:
            dropped = [rid for rid, stream in self._streams.items() if stream.loop in closed]
            for request_id in dropped:
                del self._streams[request_id]
            self.engine.abort_request(dropped)

    def _close(self) -> None:
        """Shutdown: refuse queued commands, abort everything, deliver the final outputs."""
        with self._wakeup:
            commands = list(self._commands)
            self._commands.clear()
        _fail_commands(commands, RuntimeError("AsyncLLM is shut down"))
        self._guarded(lambda: self.engine.abort_request(list(self.engine.states)))
        self._guarded(self._step)
        self._fail_all(RuntimeError("AsyncLLM is shut down"))
        self._snapshot()

    def _snapshot(self) -> None:
        self._load = _Load(self.engine.num_running(), self.engine.num_waiting(), self.engine.kv_cache_usage())

    def _die(self, exc: BaseException) -> None:
        with self._wakeup:
            self._dead = exc
            commands = list(self._commands)
            self._commands.clear()
        error = RuntimeError("AsyncLLM engine loop died")
        error.__cause__ = exc
        _fail_commands(commands, error)
        try:
            self._fail_all(exc)
            self.engine.abort_request(list(self.engine.states))
        except Exception:  # best effort: the engine is already broken
            logger.exception("could not abort requests after the loop died")


def _put_all(batch: list[tuple[asyncio.Queue, Any]]) -> None:
    for queue, item in batch:
        queue.put_nowait(item)


def _fail_commands(commands: list[_Command], error: BaseException) -> None:
    for command in commands:
        if command.future is not None and command.future.set_running_or_notify_cancel():
            command.future.set_exception(error)
