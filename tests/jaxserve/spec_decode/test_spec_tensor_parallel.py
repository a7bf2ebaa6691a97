"""n-gram speculation on a tensor-parallel engine (2 fake CPU devices, in a subprocess so the
rest of the suite keeps one device): greedy tokens equal the single-device engine's."""

import os
import subprocess
import sys

import pytest

SCRIPT = """
from jaxserve.sampling_params import SamplingParams
from tests.engine_utils import tiny_engine, tiny_loaded_model
from tests.jaxserve.test_engine import run
from tests.jaxserve.spec_decode.test_spec_engine import repetitive_prompts, token_ids

loaded = tiny_loaded_model()
requests = [(p, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=1,
                               presence_penalty=0.2 * (i % 2))) for i, p in enumerate(repetitive_prompts(0))]
plain = run(tiny_engine(loaded), requests)
engine = tiny_engine(loaded, tensor_parallel_size=2, speculative_config={
    "method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3})
spec = run(engine, requests)
assert token_ids(spec) == token_ids(plain)
assert engine.metrics.spec_decode_num_accepted_tokens > 0
print("tensor parallel ok")
"""


@pytest.mark.slow
def test_tensor_parallel_engine_speculates():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": root}
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tensor parallel ok" in done.stdout
