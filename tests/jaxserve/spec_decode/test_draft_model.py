"""The "draft_model" proposer on tiny random models: greedy outputs equal those without
speculation whatever the draft; a draft equal to the target has every draft accepted."""

import pytest

from jaxserve.engine import EngineCore
from jaxserve.sampling_params import SamplingParams
from tests.engine_utils import tiny_config, tiny_engine, tiny_engine_config, tiny_loaded_model
from tests.jaxserve.spec_decode.test_spec_engine import repetitive_prompts, token_ids
from tests.jaxserve.test_engine import run

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def loaded():
    return tiny_loaded_model()


@pytest.fixture(scope="module")
def small_draft():
    """A smaller model (one layer, hidden 32) with the target's vocabulary."""
    return tiny_loaded_model(tiny_config(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                                         num_attention_heads=2, num_key_value_heads=1), seed=3)


def draft_engine(loaded, draft, k, **options):
    spec = {"method": "draft_model", "num_speculative_tokens": k, "model": "tiny-draft"}
    return EngineCore(tiny_engine_config(speculative_config=spec, **options), loaded=loaded, draft_loaded=draft)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_matches_without_speculation(loaded, small_draft, k):
    requests = [(p, SamplingParams(max_tokens=24, **GREEDY)) for p in repetitive_prompts(0)]
    plain = run(tiny_engine(loaded), requests)
    engine = draft_engine(loaded, small_draft, k)
    assert token_ids(run(engine, requests)) == token_ids(plain)
    assert engine.metrics.spec_decode_num_draft_tokens > 0 and engine.kv_cache_usage() == 0.0


def test_the_target_as_its_own_draft_has_every_draft_accepted(loaded):
    requests = [(p, SamplingParams(max_tokens=20, **GREEDY)) for p in repetitive_prompts(1, count=3)]
    plain = run(tiny_engine(loaded), requests)
    engine = draft_engine(loaded, loaded, 3)
    assert token_ids(run(engine, requests)) == token_ids(plain)
    m = engine.metrics
    assert m.spec_decode_num_accepted_tokens == m.spec_decode_num_draft_tokens > 0
    assert m.spec_decode_mean_accepted_length > 3.0


def test_mixed_batch_under_preemption(loaded, small_draft):
    bytes_per_block = 2 * 2 * 2 * 16 * 4 * 4
    requests = [(p, SamplingParams(max_tokens=20, presence_penalty=0.3 * (i % 2), **GREEDY))
                for i, p in enumerate(repetitive_prompts(2, count=8, low=10, high=13))]
    options = dict(kv_cache_memory_bytes=40 * bytes_per_block, max_model_len=64)
    plain = run(tiny_engine(loaded, **options), requests)
    engine = draft_engine(loaded, small_draft, 3, **options)
    assert token_ids(run(engine, requests)) == token_ids(plain)
    assert engine.scheduler.num_preemptions > 0 and engine.kv_cache_usage() == 0.0


def test_chunked_prefill_prefix_hits_and_n(loaded, small_draft):
    prompts = repetitive_prompts(3, count=4, low=10, high=14)
    requests = [(p, SamplingParams(max_tokens=16, n=1 + i % 2, **GREEDY)) for i, p in enumerate(prompts)]
    options = dict(long_prefill_token_threshold=8)
    plain = tiny_engine(loaded, **options)
    engine = draft_engine(loaded, small_draft, 3, **options)
    for _ in range(2):  # the second pass hits the prefix cache
        assert token_ids(run(engine, requests)) == token_ids(run(plain, requests))
    assert engine.kv_manager.prefix_cache_hits > 0 and engine.metrics.spec_decode_num_draft_tokens > 0
    draft = engine.speculator.proposer.engine
    assert engine.kv_cache_usage() == 0.0 and draft.kv_cache_usage() == 0.0  # no blocks held, here or there
    assert draft.kv_manager.prefix_cache_hits > 0  # each proposal reuses the previous one's blocks


def test_draft_with_another_vocabulary_is_refused(loaded):
    other = tiny_loaded_model(tiny_config(vocab_size=64), seed=1)
    with pytest.raises(ValueError, match="speculative_config.model must share the target's tokenizer"):
        draft_engine(loaded, other, 2)
