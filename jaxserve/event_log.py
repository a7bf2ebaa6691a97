"""The multi-host event log: what enters the engine (arrivals, aborts), in one order for every
process, kept in jax's distributed key-value store.

The leader (process 0) appends events as keys `{prefix}/{i}`, i = 0, 1, 2, ..., each written once;
followers read them in the same order. An event carries `step`: the engine applies it before
scheduling the step with that index (steps counted as dispatched by the model runner). Arrivals
and aborts are stamped `leader's step + LOOKAHEAD_STEPS`; a `sync` event, written only while the
engine is idle, says "apply everything before me now" (see jaxserve/multihost.py for why a
follower never waits on a key while it has work).

Values are pickled `Event`s: the store is the cluster's own coordination service, the same one
jax's runtime trusts; nothing outside the processes of one engine writes there.
"""

from __future__ import annotations

import dataclasses
import pickle
from typing import Any, Protocol

# An arrival logged before step N is applied before step N + LOOKAHEAD_STEPS. Two, because a
# follower scheduling step N has read the results of step N - 2 (one step stays in flight), and
# those results came through collectives the leader joined after writing the event.
LOOKAHEAD_STEPS = 2

ADD, ABORT, PAUSE, SYNC, SHUTDOWN = "add", "abort", "pause", "sync", "shutdown"


@dataclasses.dataclass(frozen=True)
class Event:
    """`kind` is ADD (data: request_id, prompt, params, priority, arrival_time, stream), ABORT
    (data: request_ids), PAUSE (data: request_id, paused), SYNC or SHUTDOWN (no data)."""

    kind: str
    step: int
    data: dict[str, Any] = dataclasses.field(default_factory=dict)


class KeyValueStore(Protocol):
    """The three calls of jax's `DistributedRuntimeClient` the log uses (bytes values)."""

    def key_value_set_bytes(self, key: str, value: bytes) -> None: ...

    def key_value_try_get_bytes(self, key: str) -> bytes: ...

    def blocking_key_value_get_bytes(self, key: str, timeout_in_ms: int) -> bytes: ...


class EventLog:
    """One process's cursor over the log: the leader appends, a follower reads."""

    def __init__(self, store: KeyValueStore, prefix: str):
        self.store = store
        self.prefix = prefix
        self.next_index = 0  # the next key to write (leader) or read (follower)
        self.num_polls = 0  # non-blocking reads (follower, only while it has work)
        self.num_empty_polls = 0  # of those, found nothing (one per step with work at most)
        self.num_waits = 0  # blocking reads (follower, only while idle)

    def _key(self) -> str:
        return f"{self.prefix}/{self.next_index}"

    def append(self, event: Event) -> None:
        self.store.key_value_set_bytes(self._key(), pickle.dumps(event))
        self.next_index += 1

    def poll(self) -> Event | None:
        """The next event if it is already in the store, else None (does not wait)."""
        self.num_polls += 1
        value = try_get(self.store, self._key())
        if value is None:
            self.num_empty_polls += 1
            return None
        self.next_index += 1
        return pickle.loads(value)

    def wait(self, timeout_s: float) -> Event:
        """The next event, waiting up to `timeout_s` for the leader to write it (raises on timeout)."""
        self.num_waits += 1
        value = self.store.blocking_key_value_get_bytes(self._key(), int(timeout_s * 1000))
        self.next_index += 1
        return pickle.loads(value)


def try_get(store: KeyValueStore, key: str) -> bytes | None:
    """The key's value, or None when it is not written (does not wait)."""
    try:
        return store.key_value_try_get_bytes(key)
    except Exception as error:  # jax raises its runtime error with a NOT_FOUND status
        if "NOT_FOUND" in str(error):
            return None
        raise


def claim_engine_number(store: KeyValueStore, process_id: int) -> int:
    """The number of the engine this process is building: how many it built before, counted by
    the keys it wrote under `jaxserve/process{process_id}/` (only this process writes there).
    Every process builds its engines in the same order, so the n-th engine of each process reads
    and writes the same log, `jaxserve/engine{n}/events`; the count lives with the logs, in the
    cluster's store, not in a module global."""
    number = 0
    while try_get(store, f"jaxserve/process{process_id}/engine{number}") is not None:
        number += 1
    store.key_value_set_bytes(f"jaxserve/process{process_id}/engine{number}", b"")
    return number


class InMemoryStore:
    """A dict with the store's calls: one process's log (tests, and the single-process driver of
    the same protocol). `blocking_key_value_get_bytes` cannot wait for another thread's write."""

    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}

    def key_value_set_bytes(self, key: str, value: bytes) -> None:
        if key in self.values:
            raise ValueError(f"key {key!r} is already set")
        self.values[key] = value

    def key_value_try_get_bytes(self, key: str) -> bytes:
        if key not in self.values:
            raise KeyError(f"NOT_FOUND: {key}")
        return self.values[key]

    def blocking_key_value_get_bytes(self, key: str, timeout_in_ms: int) -> bytes:
        if key not in self.values:
            raise LookupError(f"{key} is not written, and an in-memory store cannot wait for it")
        return self.values[key]
