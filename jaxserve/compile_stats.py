"""How many XLA executables this process compiled (or loaded from jax's persistent cache), and
how long that took: what warm-up logs, and what tests check stays constant while serving.

jax reports every backend compile to its process-wide monitoring listeners, so the count is
process-wide too: one `CompileCounter`, registered with jax the first time anyone asks (not at
import), shared by every engine of the process.
"""

from __future__ import annotations

import functools
import threading

import jax

# jax emits it (same name since 0.4) for every executable it compiles or loads from its cache.
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
    def __init__(self):
        self._lock = threading.Lock()
        self.count = 0
        self.seconds = 0.0

    def on_event(self, event: str, duration: float, **kwargs) -> None:
        if event == _COMPILE_EVENT:
            with self._lock:
                self.count += 1
                self.seconds += duration


@functools.cache
def compile_counter() -> CompileCounter:
    """The process's counter, registered with jax on the first call."""
    counter = CompileCounter()
    jax.monitoring.register_event_duration_secs_listener(counter.on_event)
    return counter


def backend_compile_count() -> int:
    """How many XLA backend compilations this process has run since the counter started (all
    jits, all engines); an engine starts it before its warm-up."""
    return compile_counter().count


def backend_compile_seconds() -> float:
    """Seconds those compilations took, in total."""
    return compile_counter().seconds
