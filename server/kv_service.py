"""`jaxserve.v1.KVTransfer` over gRPC: a prefill worker serves its saved blocks, a decode worker
fetches them through `GrpcKVTransport`, a `KVTransport` like `InProcessTransport` (so a
device-to-device transport can replace it behind the same four calls).

Every block crosses as one `KVPayload.to_bytes` message (streamed, so no message holds more than
one block); the receiver parses each against its own layout, so damaged or foreign bytes are an
error, never wrong KV. `PeerTransport` is a decode worker's view of several prefill workers: the
router names the one holding a request's KV (`add_peer`) and lookups ask the known peers.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import grpc
import numpy as np

from jaxserve.kv.transfer import InProcessTransport, KVHandshakeError, KVLayout, KVPayload, KVTransport, check_handshake
from server import kv_transfer_pb2 as kv_pb
from server import kv_transfer_pb2_grpc as kv_grpc

_MAX_MESSAGE = 256 << 20  # one block of a large model is a few MiB; leave room


class KVTransferServicer(kv_grpc.KVTransferServicer):
    """Serves the blocks held in `store` (the prefill worker's `PrefillConnector` puts into it)."""

    def __init__(self, store: InProcessTransport):
        self.store = store

    async def Handshake(self, request, context):
        try:
            remote = KVLayout.from_dict(json.loads(request.layout_json))
            if self.store.layout is None:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "this worker's engine has no KV layout yet")
            check_handshake(remote, self.store.layout)  # "local" in the message is the caller's side
        except (KVHandshakeError, ValueError, TypeError) as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return kv_pb.HandshakeResponse(layout_json=json.dumps(self.store.layout.to_dict()))

    async def Put(self, request_iterator, context):
        count = 0
        async for block in request_iterator:
            try:
                payload = KVPayload.from_bytes(block.payload, self.store.layout)
                self.store.put(payload)
            except (KVHandshakeError, ValueError) as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"payload: {exc}")
            count += len(payload.block_hashes)
        return kv_pb.PutResponse(num_blocks=count)

    async def Lookup(self, request, context):
        return kv_pb.LookupResponse(num_blocks=self.store.lookup(list(request.block_hashes)))

    async def Fetch(self, request, context):
        hashes = list(request.block_hashes)
        messages = self.store.read(hashes)
        missing = [h.hex()[:8] for h, m in zip(hashes, messages) if m is None]
        if missing:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"block_hashes {missing} are not held here")
        for message in messages:
            yield kv_pb.KVBlock(payload=message)
        self.store.release(hashes)  # all sent: the store may drop them (kept if a stream broke)


def add_kv_transfer_service(server: grpc.aio.Server, store: InProcessTransport) -> KVTransferServicer:
    servicer = KVTransferServicer(store)
    kv_grpc.add_KVTransferServicer_to_server(servicer, server)
    return servicer


class GrpcKVTransport(KVTransport):
    """The client side of one peer's `KVTransfer` service. `timeout_s` bounds every call."""

    def __init__(self, target: str, timeout_s: float = 30.0):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.target, self.timeout_s = target, timeout_s
        self.channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", _MAX_MESSAGE),
                                                              ("grpc.max_send_message_length", _MAX_MESSAGE)])
        self.stub = kv_grpc.KVTransferStub(self.channel)
        self.layout: KVLayout | None = None
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kv-grpc")
        self.bytes_received = 0

    def handshake(self, layout: KVLayout) -> KVLayout:
        try:
            reply = self.stub.Handshake(kv_pb.HandshakeRequest(layout_json=json.dumps(layout.to_dict())),
                                        timeout=self.timeout_s)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                raise KVHandshakeError(f"{self.target}: {exc.details()}") from None
            raise
        remote = KVLayout.from_dict(json.loads(reply.layout_json))
        check_handshake(layout, remote)
        self.layout = layout
        return remote

    def put(self, payload: KVPayload) -> None:
        self._check()
        check_handshake(self.layout, payload.layout)
        messages = (kv_pb.KVBlock(payload=p.to_bytes()) for p in payload.split())
        self.stub.Put(messages, timeout=self.timeout_s)

    def lookup(self, block_hashes: Sequence[bytes]) -> int:
        self._check()
        # Called from the engine's scheduler: a silent peer must not hold the step for long.
        return self.stub.Lookup(kv_pb.LookupRequest(block_hashes=list(block_hashes)),
                                timeout=min(self.timeout_s, 2.0)).num_blocks

    def fetch(self, block_hashes: Sequence[bytes]) -> Future[KVPayload]:
        self._check()
        return self._executor.submit(self._receive, list(block_hashes))

    def _receive(self, block_hashes: list[bytes]) -> KVPayload:
        parts = []
        for block in self.stub.Fetch(kv_pb.LookupRequest(block_hashes=block_hashes), timeout=self.timeout_s):
            parts.append(KVPayload.from_bytes(block.payload, self.layout))
            self.bytes_received += len(block.payload)
        got = [h for p in parts for h in p.block_hashes]
        if got != block_hashes:
            raise ValueError(f"{self.target} sent {len(got)} blocks other than the {len(block_hashes)} asked")
        return KVPayload(self.layout, got, np.concatenate([p.blocks for p in parts]))

    def _check(self) -> None:
        if self.layout is None:
            raise KVHandshakeError("no handshake yet: call handshake(layout) before moving blocks")

    def close(self) -> None:
        self.channel.close()


class PeerTransport(KVTransport):
    """A decode worker's view of any number of prefill workers (`add_peer`, by address).

    `lookup` asks the peers (newest first) and remembers the one with the longest run, `fetch`
    reads from it. A peer that fails a lookup counts as holding nothing (the request recomputes).
    """

    def __init__(self, timeout_s: float = 30.0):
        self.timeout_s = timeout_s
        self.layout: KVLayout | None = None
        self.peers: dict[str, GrpcKVTransport] = {}
        self._owner: dict[bytes, GrpcKVTransport] = {}  # first hash of a looked-up run -> peer
        self._lock = threading.Lock()

    def handshake(self, layout: KVLayout) -> KVLayout:
        self.layout = layout
        return layout

    def add_peer(self, target: str) -> GrpcKVTransport:
        """Connect to `target` once (handshake included; raises `KVHandshakeError` on a mismatch)."""
        with self._lock:
            peer = self.peers.get(target)
        if peer is not None:
            return peer
        if self.layout is None:
            raise KVHandshakeError("no handshake yet: bind the engine before adding peers")
        peer = GrpcKVTransport(target, self.timeout_s)
        peer.handshake(self.layout)
        with self._lock:
            self.peers[target] = peer
        return peer

    def put(self, payload: KVPayload) -> None:
        raise NotImplementedError("a decode worker's PeerTransport only receives blocks")

    def lookup(self, block_hashes: Sequence[bytes]) -> int:
        if not block_hashes:
            return 0
        best, owner = 0, None
        with self._lock:
            peers = list(self.peers.values())[::-1]
        for peer in peers:
            try:
                count = peer.lookup(block_hashes)
            except grpc.RpcError:
                continue
            if count > best:
                best, owner = count, peer
            if best == len(block_hashes):
                break
        if owner is not None:
            self._owner[block_hashes[0]] = owner
        return best

    def fetch(self, block_hashes: Sequence[bytes]) -> Future[KVPayload]:
        peer = self._owner.pop(block_hashes[0], None)
        if peer is None and self.lookup(block_hashes) == len(block_hashes):
            peer = self._owner.pop(block_hashes[0], None)
        if peer is None:
            failed: Future = Future()
            failed.set_exception(KeyError(f"blocks {block_hashes[0].hex()[:8]}... were not looked up on any peer"))
            return failed
        return peer.fetch(block_hashes)
