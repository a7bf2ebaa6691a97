"""Suite-wide settings: float32 on CPU, jax's persistent compilation cache, shared fixtures."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["JAXSERVE_CPU_DTYPE"] = "float32"  # dtype "auto" on CPU: parity is checked in float32

import jax  # noqa: E402

_CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jax_cache")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

import pytest  # noqa: E402


# The default model's engine options in tests: a small bucket set.
DEFAULT_LLM_OPTIONS = dict(max_model_len=1024, max_num_seqs=16, max_num_batched_tokens=256, compile_at_startup=False,
                           token_buckets=(32, 128), request_buckets=(4, 16))


# The files that take a minute or more, longest first, run before the rest: under xdist's
# `--dist loadfile` a long file that starts last keeps one worker busy while the other idles.
LONG_FILES_FIRST = (
    "tests/jaxserve/test_multihost.py",
    "tests/jaxserve/spec_decode/test_draft_heads.py",
    "tests/jaxserve/test_parallel.py",
    "tests/jaxserve/kv/test_fp8_kv_cache.py",
    "tests/models/test_deepseek.py",
    "tests/server/test_disagg.py",
    "tests/jaxserve/test_gpu_check.py",
    "tests/jaxserve/test_structured_output.py",
    "tests/jaxserve/spec_decode/test_spec_engine.py",
    "tests/jaxserve/spec_decode/test_spec_default_model.py",
    "tests/test_notebook.py",
    "tests/jaxserve/test_engine_check.py",
    "tests/server/test_default_model.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(LONG_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: files stay whole


@pytest.fixture(scope="session")
def default_llm():
    """One engine on the default model for the whole session."""
    from jaxserve.llm import LLM

    return LLM(**DEFAULT_LLM_OPTIONS)


@pytest.fixture(scope="session")
def harmony_vocab(tmp_path_factory):
    """openai-harmony's o200k_base vocabulary, offline (tools/o200k_vocab.py), for gpt-oss chats."""
    from tools.o200k_vocab import write_o200k_base

    folder = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
    if not folder:
        folder = str(tmp_path_factory.mktemp("o200k"))
        os.environ["TIKTOKEN_ENCODINGS_BASE"] = folder
    return write_o200k_base(folder)


# A worker past this resident size drops jax's in-memory caches after a file (see below).
CLEAR_CACHES_ABOVE_BYTES = 4 << 30


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux: always clear
        return CLEAR_CACHES_ABOVE_BYTES + 1


@pytest.fixture(scope="module", autouse=True)
def _release_memory_after_each_file():
    """A pytest worker runs hundreds of files: without this its memory grew to 12 GB (compiled
    executables of engines no test holds any more, and freed heap kept by malloc) and the kernel
    killed it. After each file: collect and give freed heap back to the system; once the worker
    holds more than CLEAR_CACHES_ABOVE_BYTES, also drop jax's in-memory caches (what is still used
    loads back from the persistent cache). Clearing after every file cost each later file its
    traces and executable loads again (a default-model step program: ~1.5 s to load)."""
    yield
    import ctypes
    import gc

    gc.collect()
    if _resident_bytes() > CLEAR_CACHES_ABOVE_BYTES:
        jax.clear_caches()
        gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
