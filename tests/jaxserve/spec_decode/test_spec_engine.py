"""Speculative decoding in the engine (n-gram proposer) on tiny random models: greedy outputs are
token for token those without speculation, across chunked prefill, prefix-cache hits,
preemption, mixed batches, stops inside accepted runs and n > 1; the acceptance counts match
the outputs; no block leaks."""

import numpy as np
import pytest

from jaxserve.sampling_params import SamplingParams
from jaxserve.spec_decode.proposer import ngram_lookup
from tests.engine_utils import random_prompts, tiny_engine, tiny_loaded_model
from tests.jaxserve.test_engine import run

GREEDY = dict(temperature=0.0, ignore_eos=True)
LOOKUP = dict(prompt_lookup_min=1, prompt_lookup_max=3)


def ngram(k):
    return {"method": "ngram", "num_speculative_tokens": k, **LOOKUP}


@pytest.fixture(scope="module")
def loaded():
    return tiny_loaded_model()


def repetitive_prompts(seed, count=6, low=5, high=12):
    """Random spans repeated three times: the proposer finds matches, the model sometimes follows."""
    return [p * 3 for p in random_prompts(np.random.default_rng(seed), count, low, high, 96)]


def token_ids(outputs):
    return [[c.token_ids for c in o.outputs] for o in outputs]


def assert_same_as_plain(loaded, requests, k, **options):
    """Outputs (tokens, text, finish reasons) with speculation equal those without; -> the engine."""
    plain = run(tiny_engine(loaded, **options), requests)
    engine = tiny_engine(loaded, speculative_config=ngram(k), **options)
    spec = run(engine, requests)
    for i, (a, b) in enumerate(zip(spec, plain)):
        for x, y in zip(a.outputs, b.outputs):
            assert (x.token_ids, x.text, x.finish_reason, x.stop_reason) == (
                y.token_ids, y.text, y.finish_reason, y.stop_reason), f"request {i}"
    assert engine.kv_cache_usage() == 0.0
    return engine


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_matches_without_speculation(loaded, k):
    requests = [(p, SamplingParams(max_tokens=40, **GREEDY)) for p in repetitive_prompts(0)]
    engine = assert_same_as_plain(loaded, requests, k)
    assert engine.metrics.spec_decode_num_accepted_tokens > 0


def test_chunked_prefill_and_prefix_hits(loaded):
    prompts = repetitive_prompts(1, count=4, low=10, high=14)
    requests = [(p, SamplingParams(max_tokens=24, **GREEDY)) for p in prompts]
    options = dict(long_prefill_token_threshold=8)
    plain = tiny_engine(loaded, **options)
    spec = tiny_engine(loaded, speculative_config=ngram(3), **options)
    for _ in range(2):  # the second pass hits the prefix cache (blocks of prompts and outputs)
        assert token_ids(run(spec, requests)) == token_ids(run(plain, requests))
    assert spec.kv_manager.prefix_cache_hits > 0 and spec.metrics.spec_decode_num_accepted_tokens > 0
    assert spec.kv_cache_usage() == 0.0


def test_preemption(loaded):
    bytes_per_block = 2 * 2 * 2 * 16 * 4 * 4  # K+V, layers, kv heads, head_dim, block 4, f32
    requests = [(p, SamplingParams(max_tokens=24, **GREEDY)) for p in repetitive_prompts(2, count=8, low=10, high=13)]
    engine = assert_same_as_plain(loaded, requests, 3, kv_cache_memory_bytes=40 * bytes_per_block, max_model_len=64,
                                  poison_freed_blocks=True)
    assert engine.scheduler.num_preemptions > 0


def test_mixed_batch_stops_and_n(loaded):
    """Rows with penalties, logprobs, min_tokens (no drafts while it bans stop ids) and a budget
    too small for every draft, beside plain greedy ones; stop ids, stop strings and max_tokens landing inside accepted runs; n = 2."""
    prompts = repetitive_prompts(3, count=8)
    plain = run(tiny_engine(loaded), [(p, SamplingParams(max_tokens=30, **GREEDY)) for p in prompts])
    outs = [o.outputs[0].token_ids for o in plain]
    params = [
        SamplingParams(max_tokens=30, presence_penalty=0.5, **GREEDY),
        SamplingParams(max_tokens=30, logprobs=2, **GREEDY),
        SamplingParams(max_tokens=30, min_tokens=12, temperature=0.0, stop_token_ids=[outs[2][5]]),
        SamplingParams(max_tokens=30, stop_token_ids=[outs[3][9]], **GREEDY),
        SamplingParams(max_tokens=30, stop=[f"w{outs[4][7]} w{outs[4][8]}"], **GREEDY),
        SamplingParams(max_tokens=13, **GREEDY),
        SamplingParams(max_tokens=20, n=2, **GREEDY),
        SamplingParams(max_tokens=30, repetition_penalty=1.3, **GREEDY),
    ]
    assert_same_as_plain(loaded, list(zip(prompts, params)), 5, max_num_batched_tokens=32, token_buckets=(32,))


def test_penalties_count_the_drafts_before_each_position(loaded):
    """Rows with penalties speculate: a draft's position counts the drafts before it as output."""
    penalties = [dict(frequency_penalty=0.4), dict(presence_penalty=0.5), dict(repetition_penalty=1.3),
                 dict(frequency_penalty=0.2, repetition_penalty=1.1, logit_bias={5: 2.0})]
    requests = [(p, SamplingParams(max_tokens=30, **penalties[i % 4], **GREEDY))
                for i, p in enumerate(repetitive_prompts(9, count=8))]
    engine = assert_same_as_plain(loaded, requests, 3)
    assert engine.metrics.spec_decode_num_accepted_tokens > 0


def test_logprobs_of_accepted_tokens(loaded):
    """Rows asking for logprobs speculate; each accepted token's logprobs are those plain decoding
    reports (tolerance 1e-4: a draft's position is computed in a multi-token row)."""
    requests = [(p, SamplingParams(max_tokens=30, logprobs=3, **GREEDY)) for p in repetitive_prompts(8)]
    plain = run(tiny_engine(loaded), requests)
    engine = tiny_engine(loaded, speculative_config=ngram(3))
    spec = run(engine, requests)
    assert engine.metrics.spec_decode_num_accepted_tokens > 0
    for a, b in zip(spec, plain):
        x, y = a.outputs[0], b.outputs[0]
        assert x.token_ids == y.token_ids and len(x.logprobs) == len(y.logprobs) == len(x.token_ids)
        for token, got, want in zip(x.token_ids, x.logprobs, y.logprobs):
            assert got.keys() == want.keys() and token in got
            for t in got:
                assert abs(got[t].logprob - want[t].logprob) < 1e-4 and got[t].rank == want[t].rank


def test_seeded_sampling_is_reproducible_and_ignores_companions(loaded):
    prompt = repetitive_prompts(4, count=1)[0]
    params = SamplingParams(max_tokens=24, temperature=1.0, seed=11, ignore_eos=True)
    alone = run(tiny_engine(loaded, speculative_config=ngram(3)), [(prompt, params)])
    others = [(p, SamplingParams(max_tokens=24, temperature=1.0, ignore_eos=True)) for p in repetitive_prompts(5)]
    batched = run(tiny_engine(loaded, speculative_config=ngram(3)), others[:3] + [(prompt, params)] + others[3:])
    assert alone[0].outputs[0].token_ids == batched[3].outputs[0].token_ids


def recomputed_acceptance(prompt, output, k, max_tokens):
    """(rows verified, drafts, accepted) that greedy n-gram speculation must have had to produce
    `output`: at each step the proposer's drafts from the tokens so far, accepted while they
    agree with the output."""
    rows = drafts = accepted = 0
    pos = 1  # the first token comes from the prompt's step, which carries no drafts
    while pos < len(output):
        guess = ngram_lookup(np.asarray(prompt + output[:pos]), LOOKUP["prompt_lookup_min"],
                             LOOKUP["prompt_lookup_max"], min(k, max_tokens - pos - 1))
        agree = 0
        while agree < len(guess) and pos + agree < len(output) and guess[agree] == output[pos + agree]:
            agree += 1
        rows, drafts, accepted = rows + bool(guess), drafts + len(guess), accepted + agree
        pos += agree + 1
    return rows, drafts, accepted


@pytest.mark.parametrize("k", [1, 3, 5])
def test_metrics_match_acceptance_recomputed_from_outputs(loaded, k):
    prompts = repetitive_prompts(6)
    engine = tiny_engine(loaded, speculative_config=ngram(k), token_buckets=(64,))  # room for every draft
    outputs = run(engine, [(p, SamplingParams(max_tokens=32, **GREEDY)) for p in prompts])
    totals = np.sum([recomputed_acceptance(p, o.outputs[0].token_ids, k, 32) for p, o in zip(prompts, outputs)],
                    axis=0)
    m = engine.metrics
    assert (m.spec_decode_num_drafts, m.spec_decode_num_draft_tokens, m.spec_decode_num_accepted_tokens) == tuple(totals)
    assert sum(m.spec_decode_num_accepted_tokens_per_pos) == m.spec_decode_num_accepted_tokens
    assert m.spec_decode_num_accepted_tokens > 0


def run_random_requests(engine, rng, new_request, count=1000):
    """Add `count` requests (`new_request(rng) -> (prompt, params)`) a few at a time while the
    engine runs, aborting one now and then; asserts every request finished and no block is held."""
    total = engine.kv_manager.num_free_blocks
    next_id, finished = 0, 0
    live: set[str] = set()
    while next_id < count or engine.has_unfinished_requests():
        for _ in range(rng.integers(0, 4)):
            if next_id >= count:
                break
            engine.add_request(str(next_id), *new_request(rng))
            live.add(str(next_id))
            next_id += 1
        if live and rng.random() < 0.05:
            engine.abort_request(sorted(live)[int(rng.integers(0, len(live)))])
        for out in engine.step():
            if out.finished:
                live.discard(out.request_id)
                finished += 1
    assert finished == count
    assert engine.kv_cache_usage() == 0.0 and engine.kv_manager.num_free_blocks == total


def test_no_block_leaks_after_1000_random_requests(loaded):
    """A seeded random run: greedy and sampled, stops, n, aborts, arrivals while others run,
    under a KV budget small enough to preempt."""
    bytes_per_block = 2 * 2 * 2 * 16 * 4 * 4
    engine = tiny_engine(loaded, speculative_config=ngram(4), kv_cache_memory_bytes=64 * bytes_per_block,
                         max_model_len=64)

    def new_request(rng):
        prompt = rng.integers(2, 12, int(rng.integers(2, 20))).tolist()  # small vocabulary: matches
        return prompt, SamplingParams(
            max_tokens=int(rng.integers(1, 16)), temperature=float(rng.choice([0.0, 1.0])),
            n=int(rng.choice([1, 1, 1, 2])), stop_token_ids=[int(rng.integers(2, 96))],
            ignore_eos=bool(rng.integers(0, 2)))

    run_random_requests(engine, np.random.default_rng(7), new_request)
    assert engine.scheduler.num_preemptions > 0 and engine.metrics.spec_decode_num_accepted_tokens > 0


def test_one_stream_speculates_with_derived_buckets(loaded):
    """Derived buckets start at 1 token; one stream's drafts take the next bucket up instead of
    finding no padding there (and never speculating)."""
    engine = assert_same_as_plain(loaded, [(repetitive_prompts(10, count=1)[0], SamplingParams(max_tokens=24, **GREEDY))],
                                  3, token_buckets=(), request_buckets=())
    assert engine.config.token_bucket_sizes()[0] == 1
    assert engine.metrics.spec_decode_num_draft_tokens > 0 and engine.metrics.spec_decode_num_accepted_tokens > 0
