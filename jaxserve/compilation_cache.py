"""jax's persistent compilation cache for the engine's step executables.

Compiling every bucket dominates start-up (about a minute for the default model on a 2-core CPU);
with the cache on disk a second start loads them instead, as vLLM reuses its compile cache.

Two things jax leaves undone are done here:
- Healing. jax writes an entry only when its file is absent, so an entry that fails to load (a
  truncated file) made it warn, compile again and keep the bad file: every later start was slow.
  `heal_compilation_cache` deletes such an entry at the failed read, so that the fresh compile is
  written back and the next start loads it; one line is logged per cache folder.
- A size cap: jax's own LRU eviction (`jax_compilation_cache_max_size`). jax stamps each entry's
  last read or write in a `<key>-atime` file beside it; writing an entry that would take the
  folder past the cap first deletes the least recently used entries.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os

import jax
from jax.experimental.compilation_cache import compilation_cache

from models.checkpoint import default_cache_dir, error_summary

logger = logging.getLogger("jaxserve.engine")

# jax's file layout (jax/_src/lru_cache.py): an entry is `<key>-cache`, its last use `<key>-atime`.
_ENTRY_SUFFIX = "-cache"
_ATIME_SUFFIX = "-atime"


def enable_compilation_cache(setting: str | None, max_bytes: int | None = None) -> str | None:
    """Points jax's persistent cache at `setting` ("auto": <jaxserve cache>/xla; None or "" turns
    it off), capped at `max_bytes` (None or 0: no cap). A directory the process already chose (a
    test suite, the user) is kept, with its own cap. Returns the directory in use, or None."""
    path = jax.config.jax_compilation_cache_dir
    if not path:
        if not setting:
            return None
        path = os.path.join(default_cache_dir(), "xla") if setting == "auto" else os.path.expanduser(setting)
        os.makedirs(path, exist_ok=True)
        # jax's default threshold (1 s of compiling) keeps the small helper jits out of it: they
        # compile faster than they would load.
        jax.config.update("jax_compilation_cache_dir", path)
        if max_bytes:
            jax.config.update("jax_compilation_cache_max_size", max_bytes)
        # jax decides once per process whether the cache is in use (and how large it may grow):
        # ask it to look again.
        compilation_cache.reset_cache()
        logger.info("compilation cache: %s (%s)", path,
                    f"at most {max_bytes / 2**30:.2f} GiB, least recently used entries deleted first"
                    if max_bytes else "no size cap")
    heal_compilation_cache(path)
    return path


def heal_compilation_cache(path: str) -> None:
    """Make entries of the cache at `path` that fail to load get deleted, so they are compiled
    and written again. jax offers no hook for this: its private reader is wrapped where it has
    the expected shape; elsewhere every entry is checked now (decompressed), and the ones that
    fail are deleted."""
    if not _wrap_jax_reader():
        remove_unreadable_entries(path)


def remove_unreadable_entries(path: str) -> int:
    """Delete the entries of the cache folder `path` that do not decompress (a truncated or
    damaged file); returns how many. Reads the whole cache: the fallback where jax's reader
    cannot be wrapped."""
    try:
        from jax._src.compilation_cache import decompress_executable
    except ImportError:
        return 0
    bad = []
    for name in sorted(os.listdir(path)):
        if not name.endswith(_ENTRY_SUFFIX):
            continue
        try:
            with open(os.path.join(path, name), "rb") as f:
                data = f.read()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        try:
            decompress_executable(data)
        except Exception:
            bad.append(name.removesuffix(_ENTRY_SUFFIX))
    for key in bad:
        _delete_entry(path, key)
    if bad:
        logger.warning("compilation cache %s: deleted %d unreadable entries (%s%s); they are compiled and "
                       "written again", path, len(bad), bad[0], ", ..." if len(bad) > 1 else "")
    return len(bad)


def _wrap_jax_reader() -> bool:
    """Wrap `jax._src.compilation_cache.get_executable_and_time(cache_key, ...)`, which jax's
    compiler calls through the module (and whose errors it turns into a warning and a compile),
    so that an entry that fails to load is deleted and read as a miss. Private API: checked
    first, False where this jax differs."""
    try:
        from jax._src import compilation_cache as jax_cache
        from jax._src import compiler

        read = jax_cache.get_executable_and_time
        first_parameter = next(iter(inspect.signature(read).parameters), None)
        called_through_module = "get_executable_and_time" in compiler._cache_read.__code__.co_names
    except (ImportError, AttributeError, TypeError, ValueError):
        return False
    if getattr(read, "heals_jaxserve_cache", False):
        return True
    if first_parameter != "cache_key" or not called_through_module:
        return False

    reported: set[str] = set()  # cache folders whose unreadable entries were logged at WARNING

    @functools.wraps(read)
    def read_or_delete(cache_key, *args, **kwargs):
        try:
            return read(cache_key, *args, **kwargs)
        except OSError:  # reading it failed (its lock timed out, a permission): the entry may be fine
            raise
        except Exception as error:  # it was read but does not decompress or deserialize
            if jax.config.jax_raise_persistent_cache_errors:
                raise
            _forget_unreadable(cache_key, error, reported)
            return None, None

    read_or_delete.heals_jaxserve_cache = True
    jax_cache.get_executable_and_time = read_or_delete
    return True


def _forget_unreadable(key: str, error: Exception, reported: set[str]) -> None:
    """Delete the entry; the first of each folder (`reported` holds those logged) is a WARNING."""
    path = jax.config.jax_compilation_cache_dir
    if not path:
        return
    _delete_entry(path, key)
    level = logging.DEBUG if path in reported else logging.WARNING
    reported.add(path)
    logger.log(level, "compilation cache %s: entry %s failed to load (%s); deleted it so that it is compiled "
               "and written again (other unreadable entries likewise, logged at DEBUG)", path, key,
               error_summary(error))


def _delete_entry(path: str, key: str) -> None:
    with contextlib.suppress(OSError):  # a lock held too long, a read-only folder: a later start retries
        with _cache_lock(path):
            for suffix in (_ENTRY_SUFFIX, _ATIME_SUFFIX):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(path, key + suffix))


def _cache_lock(path: str):
    """The lock jax's LRU cache holds while it reads, writes and evicts (when capped): an
    eviction pass that listed an entry must not find it gone."""
    if jax.config.jax_compilation_cache_max_size == -1:
        return contextlib.nullcontext()
    try:
        import filelock
    except ImportError:
        return contextlib.nullcontext()
    return filelock.FileLock(os.path.join(path, ".lockfile"), timeout=10)


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
