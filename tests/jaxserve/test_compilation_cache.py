"""The engine's persistent compilation cache: a second start loads the step executables, a
damaged cache heals, and the cache keeps to its size cap."""

import argparse
import glob
import json
import logging
import os
import subprocess
import sys

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Runs in a fresh process: the suite's own cache directory (conftest) must not be in effect.
_SCRIPT = """
import json, jax
from jaxserve.compile_stats import backend_compile_count
hits = []
jax.monitoring.register_event_listener(lambda event, **kw: hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None)
from jaxserve.sampling_params import SamplingParams
from tests.engine_utils import tiny_engine, tiny_loaded_model
loaded = tiny_loaded_model()
before = backend_compile_count()
engine = tiny_engine(loaded, compile_at_startup=True, token_buckets=(16, 32), request_buckets=(4, 8))
warm = backend_compile_count() - before
warm_hits = len(hits)
engine.add_request("r", [5, 6, 7, 8, 9], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
tokens = []
while engine.has_unfinished_requests():
    for out in engine.step():
        tokens = out.outputs[0].token_ids
print(json.dumps({"dir": jax.config.jax_compilation_cache_dir, "warmup_compiles": warm, "warmup_hits": warm_hits, "tokens": tokens}))
"""


def _run(cache_root: str, script: str = _SCRIPT, *args: str, with_stderr: bool = False):
    env = dict(os.environ, JAXSERVE_CACHE_DIR=cache_root, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    done = subprocess.run([sys.executable, "-c", script, *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return (result, done.stderr) if with_stderr else result


@pytest.fixture(scope="module")
def first_start(tmp_path_factory):
    """(cache root, result) of a first start into an empty cache; tests copy the root."""
    root = tmp_path_factory.mktemp("first_start")
    return root, _run(str(root))


def _copy_of(first_start, tmp_path):
    import shutil

    root, result = first_start
    shutil.copytree(root, tmp_path, dirs_exist_ok=True)
    return result


def test_second_start_loads_compiled_steps(first_start, tmp_path):
    root, first = first_start
    assert first["dir"] == str(root / "xla")
    assert first["warmup_compiles"] > 0 and first["warmup_hits"] == 0
    _copy_of(first_start, tmp_path)
    assert os.listdir(tmp_path / "xla")
    second = _run(str(tmp_path))
    # jax reports a load from the cache as a compilation too; every one of them must be a hit.
    assert second["warmup_hits"] == second["warmup_compiles"] == first["warmup_compiles"]
    assert second["tokens"] == first["tokens"] and len(first["tokens"]) == 6


def test_parallel_precompile_leaves_nothing_for_the_warmup():
    """On a many-core host the warm-up first compiles every bucket on several threads
    (ModelRunner.precompile); the warm-up's own steps then find each executable compiled."""
    from jaxserve.compile_stats import backend_compile_count
    from tests.engine_utils import tiny_engine, tiny_loaded_model

    engine = tiny_engine(tiny_loaded_model(seed=3), token_buckets=(16, 32), request_buckets=(4, 8))
    runner = engine.runner
    buckets = runner.step_buckets()
    assert len(buckets) > 2 and runner.precompile(buckets, workers=2) == len(buckets)
    before = backend_compile_count()
    for bucket in buckets:
        runner._compile_one(*bucket)
    assert backend_compile_count() == before


def test_damaged_cache_heals_in_one_start(first_start, tmp_path):
    """jax writes an entry only where none exists: an entry that fails to load used to make
    every later start compile again. Now the start that meets it logs one line and writes the
    fresh compile back, and the start after that loads everything."""
    first = _copy_of(first_start, tmp_path)
    entries = glob.glob(str(tmp_path / "xla" / "*-cache"))
    assert entries
    for path in entries:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)

    healing, stderr = _run(str(tmp_path), with_stderr=True)
    assert healing["tokens"] == first["tokens"]
    lines = [line for line in stderr.splitlines() if "compilation cache" in line]
    assert len(lines) == 1 and "failed to load" in lines[0] and str(tmp_path / "xla") in lines[0], stderr
    assert "Traceback" not in stderr and "Error reading persistent compilation cache" not in stderr, stderr

    healed, stderr = _run(str(tmp_path), with_stderr=True)
    assert healed["warmup_hits"] == healed["warmup_compiles"] == first["warmup_compiles"]
    assert healed["tokens"] == first["tokens"] and "compilation cache" not in stderr


def test_unreadable_entries_are_found_by_a_scan(tmp_path, caplog):
    """The fallback where jax's reader cannot be wrapped: a start-up scan decompresses every
    entry and deletes the ones that fail."""
    from jax._src.compilation_cache import compress_executable

    from jaxserve.compilation_cache import remove_unreadable_entries

    whole = compress_executable(os.urandom(4096))
    (tmp_path / "jit_good-1-cache").write_bytes(whole)
    (tmp_path / "jit_good-1-atime").write_bytes(b"\0" * 8)
    (tmp_path / "jit_cut-2-cache").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "jit_cut-2-atime").write_bytes(b"\0" * 8)
    (tmp_path / "jit_empty-3-cache").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="jaxserve.engine"):
        assert remove_unreadable_entries(str(tmp_path)) == 2
    assert sorted(os.listdir(tmp_path)) == ["jit_good-1-atime", "jit_good-1-cache"]
    (line,) = [record.getMessage() for record in caplog.records]
    assert f"compilation cache {tmp_path}: deleted 2 unreadable entries" in line


def test_jax_reader_is_wrapped():
    """The wrap checks jax's private reader before touching it; this jax has the shape it expects."""
    from jax._src import compilation_cache as jax_cache

    from jaxserve.compilation_cache import heal_compilation_cache

    heal_compilation_cache(jax.config.jax_compilation_cache_dir)
    assert getattr(jax_cache.get_executable_and_time, "heals_jaxserve_cache", False)


# Each argument names a function to compile (or load); prints the cache's entries and sizes.
_LRU_SCRIPT = """
import json, os, sys
import jax, numpy as np
from jaxserve.compilation_cache import enable_compilation_cache
path = enable_compilation_cache(sys.argv[1], max_bytes=int(sys.argv[2]))
assert jax.config.jax_compilation_cache_max_size == int(sys.argv[2])
def small_a(x): return x * 2.0 + 1.0
def small_b(x): return x * 3.0 + 1.0
def small_c(x): return x * 5.0 + 1.0
def large(x):  # 64 distinct reductions: a long executable (a large constant is an argument in newer jax)
    return jax.numpy.stack([jax.numpy.sum(jax.numpy.sin(x[i::64] * (i + 1.5))) for i in range(64)])
for name in sys.argv[3:]:  # numpy in and out: no other jit runs
    np.asarray(jax.jit(globals()[name])(np.ones(100_000, np.float32)))
entries = {n.split("-")[0].removeprefix("jit_"): os.path.getsize(os.path.join(path, n))
           for n in os.listdir(path) if n.endswith("-cache")}
print(json.dumps(entries))
"""


def test_size_cap_evicts_least_recently_used_entries(tmp_path):
    cache = str(tmp_path / "xla")
    sizes = _run(str(tmp_path), _LRU_SCRIPT, cache, str(2**30), "small_a", "small_b", "large")
    assert set(sizes) == {"small_a", "small_b", "large"} and sizes["large"] > 10 * sizes["small_b"]
    # Room for about half an entry more: writing small_c must evict one small entry. small_a was
    # written first but is read again here, so the least recently used is small_b.
    cap = sum(sizes.values()) + sizes["small_b"] // 2
    after = _run(str(tmp_path), _LRU_SCRIPT, cache, str(cap), "small_a", "small_c")
    assert set(after) == {"small_a", "large", "small_c"} and sum(after.values()) <= cap


def test_size_cap_option():
    from jaxserve.engine_flags import add_engine_flags, engine_config_from_args
    from jaxserve.config import EngineConfig

    parser = argparse.ArgumentParser()
    add_engine_flags(parser)
    config = engine_config_from_args(parser.parse_args(["--compilation-cache-max-bytes", "1000"]))
    assert config.compilation_cache_max_bytes == 1000
    assert EngineConfig().compilation_cache_max_bytes == 2 * 2**30
    with pytest.raises(ValueError, match="compilation_cache_max_bytes must be an integer >= 0"):
        EngineConfig(compilation_cache_max_bytes=-1)
