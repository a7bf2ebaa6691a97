"""Interpret mode for every Pallas kernel the dispatch picks, not just for direct calls.

The entry points take `interpret=True` themselves; code that reaches them through a model (the
engine check on a machine without a GPU) cannot pass it down, so it wraps the run in
`interpret_mode()` instead. The flag is read while tracing: it applies to functions traced inside
the block."""

from __future__ import annotations

import contextlib

_interpret = False


@contextlib.contextmanager
def interpret_mode():
    global _interpret
    previous, _interpret = _interpret, True
    try:
        yield
    finally:
        _interpret = previous


def interpreting() -> bool:
    return _interpret
