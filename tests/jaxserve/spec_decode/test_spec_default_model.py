"""n-gram speculation on the default model (SmolLM2-135M): greedy tokens equal those without it."""

import pytest

from jaxserve.benchmarks.throughput import copy_prompts
from jaxserve.llm import LLM
from jaxserve.sampling_params import SamplingParams
from tests.conftest import DEFAULT_LLM_OPTIONS
from tests.jaxserve.test_engine import assert_same_greedy

pytestmark = pytest.mark.default_model


def test_greedy_ngram_matches_plain_decoding(default_llm):
    # One k on the real model (each k compiles a verifier); the tiny-model tests sweep k = 1, 3, 5.
    k = 3
    prompts = copy_prompts(default_llm.tokenizer, 2, seed=0) + [default_llm.tokenizer.encode("Once upon a time")]
    reference = default_llm.generate([{"prompt_token_ids": p} for p in prompts],
                                     SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, logprobs=2),
                                     use_tqdm=False)
    # One bucket (64 tokens x 4 rows) holds every step of these 3 requests: one verifier to compile.
    one_bucket = dict(max_num_seqs=4, max_num_batched_tokens=64, token_buckets=(64,), request_buckets=(4,))
    spec = LLM(**{**DEFAULT_LLM_OPTIONS, **one_bucket}, loaded=default_llm.engine.loaded,
               speculative_config={"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": 2,
                                   "prompt_lookup_max": 4})
    outputs = spec.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(max_tokens=40, temperature=0, ignore_eos=True), use_tqdm=False)
    for i, (out, ref) in enumerate(zip(outputs, reference)):
        assert_same_greedy(out.outputs[0].token_ids, ref.outputs[0].token_ids, ref.outputs[0].logprobs, f"prompt {i}")
    metrics = spec.engine.metrics
    assert metrics.spec_decode_num_accepted_tokens > 0.5 * metrics.spec_decode_num_draft_tokens  # copying pays
