"""n-gram and EAGLE-3 speculation on a tensor-parallel engine (2 fake CPU devices, in a
subprocess so the rest of the suite keeps one device): greedy tokens equal the single-device
engine's, and the head drafts the same tokens sharded as on one device."""

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

import pathlib, tempfile
from jaxserve.engine import EngineCore
from tests.engine_utils import tiny_config, tiny_engine_config
from tests.jaxserve.spec_decode.test_draft_heads import prompts_for, target_model, write_eagle3_head
llama = target_model(tiny_config(num_hidden_layers=4))
folder = pathlib.Path(tempfile.mkdtemp()) / "head"
write_eagle3_head(folder, llama.config, (92, 37))
requests = [(p, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)) for p in prompts_for(0)]
spec = {"method": "eagle3", "num_speculative_tokens": 3, "model": str(folder)}
single = EngineCore(tiny_engine_config(speculative_config=spec), loaded=llama)
sharded = EngineCore(tiny_engine_config(speculative_config=spec, tensor_parallel_size=2), loaded=llama)
assert token_ids(run(sharded, requests)) == token_ids(run(single, requests)) == token_ids(run(tiny_engine(llama), requests))
a, b = single.metrics, sharded.metrics
assert (a.spec_decode_num_draft_tokens, a.spec_decode_num_accepted_tokens) == (
    b.spec_decode_num_draft_tokens, b.spec_decode_num_accepted_tokens), (a, b)
print("tensor parallel ok")
"""


@pytest.mark.slow
def test_tensor_parallel_engine_speculates():
    """n-gram, then an EAGLE-3 head (its cache and weights split over tp like the target's)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": root}
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tensor parallel ok" in done.stdout
