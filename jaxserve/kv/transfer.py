"""KV blocks between engines: the layout handshake, a serializable payload, a transport.

A block leaves an engine as rows of a `KVPayload`: one array `[num_blocks, block elements]` (each
block's layers and cached arrays in the order of the model's KV spec, flattened) plus the chain hash of each block (`kv_cache_manager`), which
names its tokens and everything before them, so the receiver can place it in its own prefix chain.

Before any block moves, both sides compare their `KVLayout` (`check_handshake`): a receiver that
disagrees on model, block size, KV dtype, scales or layout would read garbage, so any difference is
an error naming the field, never a silent recompute or wrong KV.

`KVTransport` is what a connector sees of the other side: `handshake`, `put` (the producer, after a
prefill), `lookup` (how many leading blocks the other side holds) and `fetch` (a future, so the
receiver keeps stepping while bytes travel). `InProcessTransport` is the in-process wire used by
tests and the single-process disaggregation; a gRPC transport implements the same four calls with
`KVPayload.to_bytes` as the message body (a device-to-device transport skips the bytes).
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import json
import struct
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from models.kv_spec import KVSpec

LAYOUT_NAME = "flat[layer][array][block_size][token_shape]"
_MAGIC = b"JSKV1\0"
DEFAULT_STORE_BYTES = 2 << 30  # a prefill worker's block store: 2 GiB of host RAM


class KVHandshakeError(ValueError):
    """The two sides of a KV transfer disagree on something that shapes the bytes."""


@dataclasses.dataclass(frozen=True)
class KVLayout:
    """Everything both sides must agree on before a KV block may cross."""

    model: str  # the weights' identity (LoadedModel.source)
    block_size: int
    kv_dtype: str  # numpy dtype name of the cache ("float32", "bfloat16", "float8_e4m3fn")
    kv_spec: str  # the model family's KV spec (models/kv_spec.py `KVSpec.signature`)
    token_elements: int  # cache elements of one token over all layers and arrays
    kv_scales: tuple[float, ...] = ()  # scales of a quantized cache ([layers, arrays] flattened); () when unscaled
    layout: str = LAYOUT_NAME

    @classmethod
    def of(cls, model: str, block_size: int, kv_dtype: str, spec: KVSpec, kv_scales=()) -> KVLayout:
        return cls(model, block_size, kv_dtype, spec.signature(), spec.token_elements,
                   tuple(float(x) for x in np.ravel(kv_scales)))

    @property
    def block_shape(self) -> tuple[int, ...]:
        """One block's array shape: every layer's arrays in spec order, each
        `[block_size, *token_shape]`, flattened."""
        return (self.block_size * self.token_elements,)

    @property
    def block_bytes(self) -> int:
        return int(np.prod(self.block_shape)) * np.dtype(self.kv_dtype).itemsize

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "kv_scales": list(self.kv_scales)}

    @classmethod
    def from_dict(cls, data: dict) -> KVLayout:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise KVHandshakeError(f"KV layout has unknown fields {unknown}; this side knows {sorted(names)}")
        return cls(**{**data, "kv_scales": tuple(data.get("kv_scales", ()))})


def check_handshake(local: KVLayout, remote: KVLayout) -> None:
    """Raise `KVHandshakeError` naming every field on which the two layouts differ."""
    diffs = [f"{f.name} (local {getattr(local, f.name)!r}, remote {getattr(remote, f.name)!r})"
             for f in dataclasses.fields(KVLayout) if getattr(local, f.name) != getattr(remote, f.name)]
    if diffs:
        raise KVHandshakeError("KV handshake failed, the engines disagree on " + "; ".join(diffs))


@dataclasses.dataclass
class KVPayload:
    """Some full KV blocks, their chain hashes and the layout they were written in."""

    layout: KVLayout
    block_hashes: list[bytes]
    blocks: np.ndarray  # [num_blocks, *layout.block_shape], layout.kv_dtype

    def __post_init__(self) -> None:
        expected = (len(self.block_hashes), *self.layout.block_shape)
        if tuple(self.blocks.shape) != expected:
            raise ValueError(f"blocks must have shape {expected} (one row per block hash), got {self.blocks.shape}")
        if self.blocks.dtype != np.dtype(self.layout.kv_dtype):
            raise ValueError(f"blocks dtype must be the layout's kv_dtype {self.layout.kv_dtype}, "
                             f"got {self.blocks.dtype}")

    def to_bytes(self) -> bytes:
        """MAGIC, u32 header length, JSON header (layout, hashes), then the raw block bytes (C order)."""
        header = json.dumps({"layout": self.layout.to_dict(),
                             "block_hashes": [h.hex() for h in self.block_hashes]}).encode()
        return b"".join((_MAGIC, struct.pack("<I", len(header)), header,
                         np.ascontiguousarray(self.blocks).tobytes()))

    @classmethod
    def from_bytes(cls, data: bytes, expected_layout: KVLayout | None = None) -> KVPayload:
        """Parse `to_bytes`; with `expected_layout`, the payload's layout must match it."""
        if data[: len(_MAGIC)] != _MAGIC:
            raise ValueError("KV payload must start with the JSKV1 magic; got other bytes")
        (header_len,) = struct.unpack_from("<I", data, len(_MAGIC))
        start = len(_MAGIC) + 4
        header = json.loads(data[start: start + header_len])
        layout = KVLayout.from_dict(header["layout"])
        if expected_layout is not None:
            check_handshake(expected_layout, layout)
        hashes = [bytes.fromhex(h) for h in header["block_hashes"]]
        body = memoryview(data)[start + header_len:]
        expected = len(hashes) * layout.block_bytes
        if len(body) != expected:
            raise ValueError(f"KV payload body must be {expected} bytes for {len(hashes)} blocks, got {len(body)}")
        blocks = np.frombuffer(body, np.dtype(layout.kv_dtype)).reshape(len(hashes), *layout.block_shape)
        return cls(layout, hashes, blocks)

    def split(self) -> list[KVPayload]:
        """One payload per block (a transport may store, send or drop blocks one by one)."""
        return [KVPayload(self.layout, [h], self.blocks[i: i + 1]) for i, h in enumerate(self.block_hashes)]


class KVTransport(abc.ABC):
    """One side's view of the other side of a KV transfer (see the module docstring)."""

    @abc.abstractmethod
    def handshake(self, layout: KVLayout) -> KVLayout:
        """Exchange layouts; returns the other side's, raises `KVHandshakeError` on any difference."""

    @abc.abstractmethod
    def put(self, payload: KVPayload) -> None:
        """Offer blocks to the other side (a prefill worker's computed prompt)."""

    @abc.abstractmethod
    def lookup(self, block_hashes: Sequence[bytes]) -> int:
        """How many of `block_hashes`, from the first, the other side can send."""

    @abc.abstractmethod
    def fetch(self, block_hashes: Sequence[bytes]) -> Future[KVPayload]:
        """Start receiving these blocks; the future resolves to their payload."""


class InProcessTransport(KVTransport):
    """Both ends in one process: blocks cross as `to_bytes` messages on a worker thread.

    The first `handshake` registers the serving side's layout; every later one is checked against
    it. This is also a prefill worker's block store: it holds at most `capacity_bytes` of block
    messages, least recently used dropped first (a `lookup` or `put` makes a block recent). Each
    `put` of a block counts one pending reader; each `fetch` (or `release` after a streamed read)
    settles one, and a block whose readers are all settled is dropped at once: a finished prompt
    stays only until the decode side has pulled it, unless another request still waits for it.
    """

    def __init__(self, capacity_bytes: int = DEFAULT_STORE_BYTES):
        if not isinstance(capacity_bytes, int) or capacity_bytes < 1:
            raise ValueError(f"capacity_bytes must be an integer >= 1, got {capacity_bytes!r}")
        self.capacity_bytes = capacity_bytes
        self.layout: KVLayout | None = None
        self._blocks: collections.OrderedDict[bytes, bytes] = collections.OrderedDict()  # LRU first
        self._pending: dict[bytes, int] = {}  # hash -> puts not yet fetched
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-transport")
        self.bytes_sent = 0
        self.bytes_held = 0
        self.num_dropped_blocks = 0  # dropped by the byte budget before being fetched

    def handshake(self, layout: KVLayout) -> KVLayout:
        with self._lock:
            if self.layout is None:
                self.layout = layout
        check_handshake(layout, self.layout)
        return self.layout

    def put(self, payload: KVPayload) -> None:
        self._check_layout(payload.layout)
        messages = [(p.block_hashes[0], p.to_bytes()) for p in payload.split()]
        if messages and len(messages[0][1]) > self.capacity_bytes:
            raise ValueError(f"capacity_bytes ({self.capacity_bytes}) must hold at least one block "
                             f"({len(messages[0][1])} bytes)")
        with self._lock:
            for block_hash, message in messages:
                old = self._blocks.pop(block_hash, None)
                self.bytes_held += len(message) - (len(old) if old is not None else 0)
                self._blocks[block_hash] = message
                self._pending[block_hash] = self._pending.get(block_hash, 0) + 1
            while self.bytes_held > self.capacity_bytes:
                block_hash, message = self._blocks.popitem(last=False)
                self._pending.pop(block_hash, None)
                self.bytes_held -= len(message)
                self.num_dropped_blocks += 1

    def read(self, block_hashes: Sequence[bytes]) -> list[bytes | None]:
        """The stored messages of these blocks (None where one is not held); settles nothing."""
        with self._lock:
            return [self._blocks.get(h) for h in block_hashes]

    def release(self, block_hashes: Sequence[bytes]) -> None:
        """One reader of each block got it: drop the blocks no other pending request waits for."""
        with self._lock:
            for block_hash in block_hashes:
                left = self._pending.get(block_hash, 0) - 1
                if left > 0:
                    self._pending[block_hash] = left
                    continue
                self._pending.pop(block_hash, None)
                message = self._blocks.pop(block_hash, None)
                if message is not None:
                    self.bytes_held -= len(message)

    @property
    def num_blocks(self) -> int:
        """Blocks held now."""
        return len(self._blocks)

    def lookup(self, block_hashes: Sequence[bytes]) -> int:
        with self._lock:
            count = 0
            while count < len(block_hashes) and block_hashes[count] in self._blocks:
                self._blocks.move_to_end(block_hashes[count])  # about to be fetched: keep it
                count += 1
            return count

    def fetch(self, block_hashes: Sequence[bytes]) -> Future[KVPayload]:
        with self._lock:
            missing = [h.hex()[:8] for h in block_hashes if h not in self._blocks]
            if missing:
                raise KeyError(f"blocks {missing} are not on the other side (lookup them first)")
            messages = [self._blocks[h] for h in block_hashes]
        self.release(block_hashes)
        return self._executor.submit(self._receive, messages)

    def _receive(self, messages: list[bytes]) -> KVPayload:
        parts = [KVPayload.from_bytes(m, self.layout) for m in messages]
        self.bytes_sent += sum(len(m) for m in messages)
        return KVPayload(self.layout, [h for p in parts for h in p.block_hashes],
                         np.concatenate([p.blocks for p in parts]))

    def _check_layout(self, layout: KVLayout) -> None:
        if self.layout is None:
            raise KVHandshakeError("no handshake yet: call handshake(layout) before moving blocks")
        check_handshake(layout, self.layout)
