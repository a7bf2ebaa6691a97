"""Server-sent events, and responses that notice a client going away at once.

Starlette's `StreamingResponse` under an ASGI 2.4 server learns of a disconnect only when its next
`send` fails, which is after the engine has run another step for a request nobody reads. Here the
body and a disconnect listener race: a client that leaves cancels the body's iterator at once,
which aborts its requests (their KV blocks are free before the next step)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

DONE = b"data: [DONE]\n\n"
T = TypeVar("T")


def data(payload: Any) -> bytes:
    """One `data:` event (chat and completion chunks)."""
    return b"data: " + _dumps(payload) + b"\n\n"


def event(kind: str, payload: Any) -> bytes:
    """One named event (the Responses API's: `event: response.output_text.delta`)."""
    return f"event: {kind}\n".encode() + data(payload)


def _dumps(payload: Any) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


class EventStreamResponse(StreamingResponse):
    """`text/event-stream` over an async iterator of encoded events; the iterator is cancelled as
    soon as the client disconnects."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes]):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await until_disconnected(receive, self.stream_response(send))
        except OSError:
            pass  # the connection broke while sending: the iterator has been closed
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                await close()


async def until_disconnected(receive: Receive, work: Awaitable[T]) -> T | None:
    """Run `work` until it ends or the client disconnects; then it is cancelled (its cleanup, the
    aborts, runs before this returns) and the result is None. Call once the request body has
    been read: `receive` then yields only the disconnect."""
    task = asyncio.ensure_future(work)
    listener = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({task, listener}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        listener.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return None if task.cancelled() else task.result()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
