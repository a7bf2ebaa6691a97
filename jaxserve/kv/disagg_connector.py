"""Disaggregated prefill/decode at the engine level: connectors over a `KVTransport`.

A prefill engine runs a request's prompt (`max_tokens=1`) with a `PrefillConnector`: when the
request finishes, its full prompt blocks are gathered on device (dispatched before the blocks can
be reused) and offered to the other side by a worker thread (`transport.put`). A decode engine
with a `DecodeConnector` then sees the same prompt's block hashes on the other side and loads them
instead of computing them (`LoadingConnector`); it recomputes only the tail (< one block + the
last token), whose logits give its first token, exactly like a prefix-cache hit.

Both connectors run the layout handshake in `bind`, before any block moves.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from jaxserve.kv.block_io import KVBlockIO
from jaxserve.kv.connector import KVConnector, LoadingConnector
from jaxserve.kv.transfer import KVPayload, KVTransport


class PrefillConnector(KVConnector):
    """Offers every finished request's computed full prompt blocks to the other side.

    Each finished request gets one save (a future, resolved at once when it has no full block),
    recorded under a lock before `request_finished` returns, so `wait_for_save(request_id)` from
    any thread waits for exactly that request's blocks to reach the transport: one caller can no
    longer take (and wait for) another's saves and let it return early.
    """

    def __init__(self, transport: KVTransport, max_unclaimed_saves: int = 1024):
        if max_unclaimed_saves < 1:
            raise ValueError(f"max_unclaimed_saves must be >= 1, got {max_unclaimed_saves}")
        self.transport = transport
        self.max_unclaimed_saves = max_unclaimed_saves
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-save")
        self._saves: dict[str, Future] = {}  # request id -> its save, until someone waits for it
        self._changed = threading.Condition()
        self.num_saved_blocks = 0

    def bind(self, block_io: KVBlockIO) -> None:
        self.transport.handshake(block_io.layout)
        super().bind(block_io)

    def request_finished(self, request, block_ids, block_hashes):
        # Only blocks a decode side can load: never the one holding the last prompt token (its
        # logits are computed there), so every saved block is fetched and then dropped.
        size = self.block_io.layout.block_size
        num_prompt = min(request.num_computed_tokens, request.num_prompt_tokens)
        num_blocks = min(num_prompt // size, (request.num_prompt_tokens - 1) // size, len(block_ids),
                         len(block_hashes))
        if num_blocks == 0:
            save: Future = Future()
            save.set_result(None)
        else:
            chunks = self.block_io.gather(block_ids[:num_blocks])
            save = self._executor.submit(self._send, list(block_hashes[:num_blocks]), chunks)
            self.num_saved_blocks += num_blocks
        with self._changed:
            self._saves[request.request_id] = save
            self._drop_unclaimed()
            self._changed.notify_all()

    def _drop_unclaimed(self) -> None:
        """Forget the oldest finished saves nobody waited for (aborted streams), beyond the cap."""
        excess = len(self._saves) - self.max_unclaimed_saves
        for request_id in [r for r, f in self._saves.items() if f.done()][:max(excess, 0)]:
            del self._saves[request_id]

    def warmup(self) -> None:
        self.block_io.warmup()

    def _send(self, hashes, chunks) -> None:
        blocks = KVBlockIO.to_host(chunks, len(hashes))
        self.transport.put(KVPayload(self.block_io.layout, hashes, blocks))

    def wait_for_save(self, request_id: str | None = None, timeout_s: float | None = None) -> None:
        """Block until a request's save (or, with no id, every save recorded so far) has reached
        the transport; re-raises a failed save. A request that has not finished yet is waited for
        too; `TimeoutError` after `timeout_s` (None: no limit)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._changed:
            if request_id is None:
                saves = list(self._saves.values())
                self._saves.clear()
            else:
                while request_id not in self._saves:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise TimeoutError(f"request {request_id!r} did not finish within {timeout_s} s")
                    self._changed.wait(left)
                saves = [self._saves.pop(request_id)]
        for save in saves:
            save.result(None if deadline is None else max(deadline - time.monotonic(), 0.0))


class DecodeConnector(LoadingConnector):
    """Loads prompt blocks the other side holds, through the transport, while steps go on."""

    def __init__(self, transport: KVTransport, block_size: int):
        super().__init__(transport, block_size)
        self.transport = transport

    def bind(self, block_io: KVBlockIO) -> None:
        self.transport.handshake(block_io.layout)
        super().bind(block_io)
