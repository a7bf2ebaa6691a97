"""jax's persistent compilation cache for the engine's step executables.

Compiling every bucket dominates start-up (about a minute for the default model on a 2-core CPU);
with the cache on disk a second start loads them instead, as vLLM reuses its compile cache.
"""

from __future__ import annotations

import contextlib
import logging
import os

import jax
from jax.experimental.compilation_cache import compilation_cache

from models.checkpoint import default_cache_dir

logger = logging.getLogger("jaxserve.engine")

def enable_compilation_cache(setting: str | None) -> str | None:
    """Points jax's persistent cache at `setting` ("auto": <jaxserve cache>/xla; None or "" turns
    it off). A directory the process already chose (a test suite, the user) is kept. Returns the
    directory in use, or None."""
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    if not setting:
        return None
    path = os.path.join(default_cache_dir(), "xla") if setting == "auto" else os.path.expanduser(setting)
    os.makedirs(path, exist_ok=True)
    # jax's default threshold (1 s of compiling) keeps the small helper jits out of it: they
    # compile faster than they would load.
    jax.config.update("jax_compilation_cache_dir", path)
    # jax decides once per process whether the cache is in use: ask it to look again.
    compilation_cache.reset_cache()
    logger.info("compilation cache: %s", path)
    return path


@contextlib.contextmanager
def bypassing_cache():
    """Compile inside the block without the persistent cache. Its key ignores debug info, so a
    cached executable can carry the scope names (op_name metadata) of an older build of the same
    program: code that reads compiled HLO's scopes compiles here."""
    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)
        compilation_cache.reset_cache()
