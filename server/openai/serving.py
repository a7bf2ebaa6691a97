"""What the endpoints share: the engine, one waiting room and one drain with the gRPC service,
request checks that name the field, and engine streams that abort when their reader leaves.

Admission is the gRPC servicer's (`server/servicer.py`): its `num_queued` counts requests admitted
and not yet streaming, its `live` holds the ids in flight, and its `draining` refuses new ones. So
`max_waiting_requests` bounds both front ends together, and a graceful stop waits for (then
aborts) HTTP requests as it does for gRPC ones."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, TypeVar

from jaxserve.async_llm import AsyncLLM, PreparedRequest
from jaxserve.harmony import Harmony
from jaxserve.outputs import RequestOutput
from jaxserve.sampling_params import SamplingParams
from server.openai.errors import APIError, from_value_error
from server.openai.reasoning import ReasoningParser
from server.openai.tool_parsers import ToolParser

logger = logging.getLogger("jaxserve.http")
T = TypeVar("T")


class Gate:
    """The admission state the gRPC servicer keeps (`GenerationServicer` has these attributes)."""

    draining: bool
    num_queued: int
    max_waiting_requests: int
    live: set[str]


@dataclasses.dataclass
class _Ticket:
    request_id: str
    prepared: PreparedRequest
    queued: bool = True  # admitted, no output yet


@dataclasses.dataclass
class Serving:
    """The engine as the endpoints see it."""

    llm: AsyncLLM
    gate: Gate
    model_name: str
    tool_parser: type[ToolParser] | None = None  # tool_choice "auto" reads calls with it; None: content only
    reasoning_parser: type[ReasoningParser] | None = None  # splits `<think>...</think>` into reasoning_content
    harmony: Harmony | None = None  # gpt-oss: chats in the Harmony format (jaxserve/harmony.py)
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))  # the model card's

    @property
    def max_model_len(self) -> int:
        return self.llm.engine.max_model_len

    @property
    def tokenizer(self):
        return self.llm.tokenizer

    def check_model(self, name: str | None) -> None:
        if name not in (None, "", self.model_name):
            raise APIError(404, f"model {name!r} does not exist: this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    async def in_worker(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `function` on a worker thread: a long template or text must not hold the event loop."""
        return await asyncio.get_running_loop().run_in_executor(None, functools.partial(function, *args, **kwargs))

    async def prepare(self, prompt: Any, params: SamplingParams, *, priority: int = 0,
                      renames: Mapping[str, str] | None = None) -> PreparedRequest:
        """Check and tokenize one request; a ValueError becomes a 400 naming the request's field."""
        try:
            return await self.llm.prepare(prompt, params, priority=priority)
        except ValueError as exc:
            raise from_value_error(exc, renames) from None

    def check_length(self, prepared: PreparedRequest, max_tokens: int | None, param: str) -> None:
        """vLLM's rule: a prompt plus its `max_tokens` must fit the context."""
        prompt_len = len(prepared.prompt.token_ids)
        if max_tokens is not None and prompt_len + max_tokens > self.max_model_len:
            raise APIError(400, f"{param} is {max_tokens}, but the prompt is {prompt_len} tokens and the context "
                                f"(max_model_len) {self.max_model_len}: at most {self.max_model_len - prompt_len}",
                           param=param)

    async def outputs(self, requests: list[tuple[str, PreparedRequest]]
                      ) -> AsyncIterator[tuple[int, RequestOutput] | None]:
        """Admit `requests` (request id, prepared request) and stream their delta outputs as
        (position in `requests`, output). The first item is None, once admitted; before it comes
        APIError 503 (shutting down), 429 (the waiting room is full) or 409 (an id in flight).
        Closing the iterator aborts every unfinished request; a failure ends it with APIError."""
        tickets = self._admit(requests)
        try:
            yield None
            if len(tickets) == 1:
                async for output in self._engine_stream(tickets[0]):
                    yield 0, output
            else:
                async for item in self._merged(tickets):
                    yield item
        finally:
            for ticket in tickets:
                if ticket.queued:
                    ticket.queued = False
                    self.gate.num_queued -= 1
                self.gate.live.discard(ticket.request_id)

    def _admit(self, requests: list[tuple[str, PreparedRequest]]) -> list[_Ticket]:
        gate = self.gate
        if gate.draining:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        if gate.num_queued >= gate.max_waiting_requests:
            raise APIError(429, f"{gate.num_queued} requests are waiting (max_waiting_requests is "
                                f"{gate.max_waiting_requests}); retry later", code="too_many_waiting_requests")
        for request_id, _ in requests:
            if request_id in gate.live:
                raise APIError(409, f"request id {request_id!r} is already in flight")
        tickets = [_Ticket(request_id, prepared) for request_id, prepared in requests]
        gate.num_queued += len(tickets)
        gate.live.update(ticket.request_id for ticket in tickets)
        return tickets

    async def _engine_stream(self, ticket: _Ticket) -> AsyncIterator[RequestOutput]:
        try:
            stream = self.llm.generate(ticket.prepared, request_id=ticket.request_id)
            async with contextlib.aclosing(stream):
                async for output in stream:
                    if ticket.queued:
                        ticket.queued = False
                        self.gate.num_queued -= 1
                    yield output
        except (APIError, asyncio.CancelledError, GeneratorExit):
            raise
        except ValueError as exc:  # the engine's own checks, at admission
            raise from_value_error(exc) from None
        except Exception as exc:  # noqa: BLE001 - a failed step fails only its requests
            if not self.llm.is_running or (isinstance(exc, RuntimeError) and str(exc).startswith("AsyncLLM")):
                raise APIError(503, f"the engine is not running: {exc}", code="engine_unavailable") from None
            logger.warning("request %s failed: %r", ticket.request_id, exc)
            raise APIError(500, f"request {ticket.request_id}: the engine failed it: {exc!r}") from None

    async def _merged(self, tickets: list[_Ticket]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Several engine streams as one, in arrival order. The queue is bounded: a reader that
        stops reading stops the pumps, and AsyncLLM pauses their requests."""
        queue: asyncio.Queue = asyncio.Queue(maxsize=16)
        done = object()

        async def pump(index: int, ticket: _Ticket) -> None:
            try:
                async for output in self._engine_stream(ticket):
                    await queue.put((index, output))
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # noqa: BLE001 - handed to the reader
                await queue.put((index, exc))
            else:
                await queue.put((index, done))

        pumps = [asyncio.ensure_future(pump(i, ticket)) for i, ticket in enumerate(tickets)]
        try:
            remaining = len(pumps)
            while remaining:
                index, item = await queue.get()
                if item is done:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield index, item
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)


async def admitted(outputs: AsyncIterator[T | None]) -> AsyncIterator[T]:
    """`Serving.outputs` once its admission passed (raising its APIError here, before any
    response starts)."""
    first = await anext(outputs)
    assert first is None
    return outputs


def request_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


def engine_ids(base: str, count: int) -> list[str]:
    """One engine request id per prompt of a request."""
    return [base] if count == 1 else [f"{base}-{i}" for i in range(count)]
