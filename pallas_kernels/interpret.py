"""Interpret mode for every Pallas kernel the dispatch picks, not just for direct calls.

The entry points take `interpret=True` themselves; code that reaches them through a model (the
engine check on a machine without a GPU) cannot pass it down, so it wraps the run in
`interpret_mode()` instead. The flag is read while tracing: it applies to functions traced inside
the block.

It is a context variable, not a module global: it holds in the thread (or asyncio task) that
entered the block and in contexts copied from it, and nowhere else, so a test or check that
interprets never changes what another thread traces. Code that traces on worker threads inside
the block runs them in a copy of the context (`contextvars.copy_context().run`)."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

_INTERPRET = contextvars.ContextVar("pallas_kernels_interpret", default=False)


@contextlib.contextmanager
def interpret_mode() -> Iterator[None]:
    token = _INTERPRET.set(True)
    try:
        yield
    finally:
        _INTERPRET.reset(token)


def interpreting() -> bool:
    return _INTERPRET.get()
