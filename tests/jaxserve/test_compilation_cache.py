"""The engine's persistent compilation cache: a second start loads the step executables."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Runs in a fresh process: the suite's own cache directory (conftest) must not be in effect.
_SCRIPT = """
import json, jax
from jaxserve.model_runner import backend_compile_count
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


def _run(cache_root: str) -> dict:
    env = dict(os.environ, JAXSERVE_CACHE_DIR=cache_root, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    done = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_second_start_loads_compiled_steps(tmp_path):
    first = _run(str(tmp_path))
    assert first["dir"] == str(tmp_path / "xla")
    assert first["warmup_compiles"] > 0 and first["warmup_hits"] == 0
    assert os.listdir(tmp_path / "xla")
    second = _run(str(tmp_path))
    # jax reports a load from the cache as a compilation too; every one of them must be a hit.
    assert second["warmup_hits"] == second["warmup_compiles"] == first["warmup_compiles"]
    assert second["tokens"] == first["tokens"] and len(first["tokens"]) == 6


def test_parallel_precompile_leaves_nothing_for_the_warmup():
    """On a many-core host the warm-up first compiles every bucket on several threads
    (ModelRunner.precompile); the warm-up's own steps then find each executable compiled."""
    from jaxserve.model_runner import backend_compile_count
    from tests.engine_utils import tiny_engine, tiny_loaded_model

    engine = tiny_engine(tiny_loaded_model(seed=3), token_buckets=(16, 32), request_buckets=(4, 8))
    runner = engine.runner
    buckets = runner.step_buckets()
    assert len(buckets) > 2 and runner.precompile(buckets, workers=2) == len(buckets)
    before = backend_compile_count()
    for bucket in buckets:
        runner._compile_one(*bucket)
    assert backend_compile_count() == before
