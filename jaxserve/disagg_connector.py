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

from concurrent.futures import Future, ThreadPoolExecutor

from jaxserve.kv_block_io import KVBlockIO
from jaxserve.kv_connector import KVConnector, LoadingConnector
from jaxserve.kv_transfer import KVPayload, KVTransport


class PrefillConnector(KVConnector):
    """Offers every finished request's computed full prompt blocks to the other side."""

    def __init__(self, transport: KVTransport):
        self.transport = transport
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-save")
        self._saves: list[Future] = []
        self.num_saved_blocks = 0

    def bind(self, block_io: KVBlockIO) -> None:
        self.transport.handshake(block_io.layout)
        super().bind(block_io)

    def request_finished(self, request, block_ids, block_hashes):
        num_prompt = min(request.num_computed_tokens, request.num_prompt_tokens)
        num_blocks = min(num_prompt // self.block_io.layout.block_size, len(block_ids), len(block_hashes))
        if num_blocks == 0:
            return
        chunks = self.block_io.gather(block_ids[:num_blocks])
        hashes = list(block_hashes[:num_blocks])
        self._saves.append(self._executor.submit(self._send, hashes, chunks))
        self.num_saved_blocks += num_blocks

    def warmup(self) -> None:
        self.block_io.warmup()

    def _send(self, hashes, chunks) -> None:
        blocks = KVBlockIO.to_host(chunks, len(hashes))
        self.transport.put(KVPayload(self.block_io.layout, hashes, blocks))

    def wait_for_save(self) -> None:
        """Block until every save so far has reached the transport (re-raises a failed one)."""
        saves, self._saves = self._saves, []
        for save in saves:
            save.result()


class DecodeConnector(LoadingConnector):
    """Loads prompt blocks the other side holds, through the transport, while steps go on."""

    def __init__(self, transport: KVTransport, block_size: int):
        super().__init__(transport, block_size)
        self.transport = transport

    def bind(self, block_io: KVBlockIO) -> None:
        self.transport.handshake(block_io.layout)
        super().bind(block_io)
