import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.sampler import (
    SamplingTensors,
    apply_penalties,
    apply_top_k_top_p,
    count_sampled_tokens,
    make_step_key,
    sample,
    token_counts,
)
from jaxserve.sampling_params import SamplingParams

VOCAB = 12
sample_jit = jax.jit(sample)


def random_logits(rows, seed=0, scale=2.0):
    return np.random.default_rng(seed).normal(size=(rows, VOCAB)).astype(np.float32) * scale


def run(params, logits, *, step=0, **kwargs):
    tensors = SamplingTensors.from_params(params, vocab_size=VOCAB, **kwargs)
    return sample_jit(jnp.asarray(logits), tensors, make_step_key(0, step))


def softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x[np.isfinite(x)].max())
    return e / e.sum()


def reference_probs(logits, temperature, top_k=0, top_p=1.0, min_p=0.0):
    """vLLM's filtered distribution in numpy (float64): temperature, min-p, top-k, top-p."""
    scaled = np.asarray(logits, np.float64) / temperature
    probs = softmax(scaled)
    scaled[probs < min_p * probs.max()] = -np.inf
    if top_k:
        scaled[scaled < np.sort(scaled)[::-1][top_k - 1]] = -np.inf
    order = np.argsort(scaled)  # ascending, as vLLM
    cumulative = np.cumsum(softmax(scaled[order]))
    drop = cumulative <= 1 - top_p
    drop[-1] = False
    scaled[order[drop]] = -np.inf
    return softmax(scaled)


def test_greedy_is_argmax():
    logits = random_logits(6, seed=1)
    out = run([SamplingParams(temperature=0)] * 6, logits)
    np.testing.assert_array_equal(out.token_ids, logits.argmax(-1))
    # Greedy rows stay greedy when batched with random rows (a different compiled variant).
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_k=3)] * 3
    out = run(params, logits)
    np.testing.assert_array_equal(out.token_ids[::2], logits[::2].argmax(-1))


def test_seeded_rows_ignore_batch_companions():
    rng = np.random.default_rng(2)
    logits = random_logits(1, seed=3, scale=0.5)[0]  # flat: many tokens are likely
    target = SamplingParams(temperature=1.0, seed=1234)

    def tokens_at(row, companions, variant):
        params = list(companions)
        params.insert(row, target)
        batch = random_logits(len(params), seed=variant)
        batch[row] = logits
        return [int(run(params, batch, step=variant,
                        output_token_ids=[[0] * position] * len(params)).token_ids[row])
                for position in range(12)]

    alone = tokens_at(0, [], 0)
    companions = [SamplingParams(temperature=0.7, top_k=4, seed=int(rng.integers(1 << 40))),
                  SamplingParams(temperature=0), SamplingParams(top_p=0.5),
                  SamplingParams(min_p=0.1, presence_penalty=1.0, logprobs=2)]
    assert tokens_at(3, companions, 7) == alone
    assert tokens_at(1, companions[:2], 9) == alone
    assert len(set(alone)) > 3, "a seeded row should still vary with the output position"
    other_seed = dataclasses.replace(target, seed=99)
    batch = np.tile(logits, (12, 1))
    other = run([other_seed] * 12, batch, output_token_ids=[[0] * p for p in range(12)])
    assert other.token_ids.tolist() != alone


def test_unseeded_rows_follow_the_step_key():
    logits = np.zeros((64, VOCAB), np.float32)
    params = [SamplingParams()] * 64
    first = run(params, logits, step=0).token_ids
    np.testing.assert_array_equal(first, run(params, logits, step=0).token_ids)
    assert (first != run(params, logits, step=1).token_ids).any()
    assert len(set(first.tolist())) > 4, "rows of one step must draw independent noise"


DISTRIBUTION_CASES = [
    dict(temperature=1.0),
    dict(temperature=0.5),
    dict(temperature=2.0),
    dict(temperature=1.0, top_k=3),
    dict(temperature=1.0, top_p=0.6),
    dict(temperature=1.0, min_p=0.2),
    dict(temperature=1.3, top_k=5, top_p=0.9, min_p=0.02),
]


def test_distributions_match_reference():
    """20k draws per case (distinct seeds) against the exact filtered softmax.

    A frequency's standard deviation is at most sqrt(0.25 / 20000) = 0.0035; the tolerance 0.016
    is 4.5 of them, so a correct sampler fails with probability ~1e-4 over all cases; a filtered
    token must never be drawn.
    """
    draws = 20_000
    logits = random_logits(1, seed=4, scale=1.5)[0]
    params = [SamplingParams(seed=seed, **case)
              for case in DISTRIBUTION_CASES for seed in range(draws)]
    out = run(params, np.tile(logits, (len(params), 1)))
    tokens = np.asarray(out.token_ids).reshape(len(DISTRIBUTION_CASES), draws)
    for case, case_tokens in zip(DISTRIBUTION_CASES, tokens):
        expected = reference_probs(logits, **case)
        observed = np.bincount(case_tokens, minlength=VOCAB) / draws
        assert np.abs(observed - expected).max() < 0.016, case
        assert (observed[expected == 0] == 0).all(), case


def test_top_k_top_p_off_is_identity():
    logits = jnp.asarray(random_logits(4, seed=5))
    off = apply_top_k_top_p(logits, jnp.array([0, VOCAB, 0, 0]), jnp.ones(4, jnp.float32))
    np.testing.assert_array_equal(off, logits)


def reference_penalties(logits, prompt, output, presence, frequency, repetition):
    """vLLM's apply_penalties for one row, in numpy."""
    logits = np.asarray(logits, np.float64).copy()
    counts = np.bincount(output, minlength=len(logits))
    seen = (np.bincount(prompt, minlength=len(logits)) > 0) | (counts > 0)
    penalty = np.where(seen, repetition, 1.0)
    logits = np.where(logits > 0, logits / penalty, logits * penalty)
    return logits - frequency * counts - presence * (counts > 0)


def test_penalties_match_vllm_formula():
    rng = np.random.default_rng(6)
    logits = random_logits(3, seed=6)
    prompts = [rng.integers(0, VOCAB, 5).tolist() for _ in range(3)]
    outputs = [rng.integers(0, VOCAB, 7).tolist() for _ in range(3)]
    settings = [(0.5, 0.3, 1.3), (-0.4, 0.0, 0.8), (0.0, 1.1, 1.0)]
    params = [SamplingParams(temperature=0, presence_penalty=p, frequency_penalty=f,
                             repetition_penalty=r) for p, f, r in settings]
    tensors = SamplingTensors.from_params(params, vocab_size=VOCAB, prompt_token_ids=prompts,
                                          output_token_ids=outputs)
    penalized = apply_penalties(jnp.asarray(logits), tensors.prompt_mask, tensors.output_counts,
                                tensors.presence_penalty, tensors.frequency_penalty,
                                tensors.repetition_penalty)
    for row, (p, f, r) in enumerate(settings):
        expected = reference_penalties(logits[row], prompts[row], outputs[row], p, f, r)
        np.testing.assert_allclose(penalized[row], expected, rtol=1e-6, atol=1e-6)
    out = sample_jit(jnp.asarray(logits), tensors, make_step_key(0, 0))
    np.testing.assert_array_equal(out.token_ids, np.asarray(penalized).argmax(-1))


def test_token_counts_on_device():
    ids = jnp.array([[1, 1, 3, 0], [2, 5, 5, 5]])
    counts = token_counts(ids, jnp.array([3, 4]), VOCAB)
    expected = np.zeros((2, VOCAB), np.int32)
    expected[0, [1, 3]] = [2, 1]
    expected[1, [2, 5]] = [1, 3]
    np.testing.assert_array_equal(counts, expected)
    counts = count_sampled_tokens(counts, jnp.array([1, -1]), jnp.array([2, 7]))
    expected[1, 2] += 1
    np.testing.assert_array_equal(counts, expected)


def test_logit_bias_and_min_tokens_ban():
    logits = random_logits(3, seed=7)
    favourite, last = int(logits[0].argmin()), VOCAB - 1
    params = [SamplingParams(temperature=0, logit_bias={favourite: 100.0}),
              SamplingParams(temperature=0, logit_bias={1: 0.5, 2: 0.5, 3: 0.5}),
              SamplingParams(temperature=0)]
    out = run(params, logits)
    assert out.token_ids[0] == favourite
    bias = np.zeros(VOCAB, np.float32)
    bias[[1, 2, 3]] = 0.5
    assert out.token_ids[1] == (logits[1] + bias).argmax(), "-1 padding must not bias the last id"
    assert logits[2].argmax() != last or out.token_ids[2] == last

    stop_logits = np.zeros((2, VOCAB), np.float32)
    stop_logits[:, [4, 9]] = [10.0, 5.0]
    params = [SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[4])] * 2
    out = run(params, stop_logits, output_token_ids=[[1], [1, 2]], eos_token_ids=[9])
    assert out.token_ids.tolist() == [0, 4], "stop and EOS ids are banned before min_tokens"
    params = [SamplingParams(temperature=0, min_tokens=2, ignore_eos=True, stop_token_ids=[4])]
    assert run(params, stop_logits[:1], output_token_ids=[[1]], eos_token_ids=[9]).token_ids[0] == 9


def test_logprobs_are_raw_log_softmax():
    logits = random_logits(5, seed=8)
    params = [SamplingParams(temperature=0.8, seed=1, logprobs=3, presence_penalty=1.5,
                             logit_bias={0: 3.0}),
              SamplingParams(temperature=0, logprobs=1), SamplingParams(top_k=2, seed=2),
              SamplingParams(temperature=0)]
    out = run(params, logits, num_rows=5, output_token_ids=[[0, 1, 1]] * 4)
    assert out.top_ids.shape == (5, 3)
    for row in range(4):
        reference = np.log(softmax(logits[row]))
        order = np.argsort(-reference)
        np.testing.assert_array_equal(out.top_ids[row], order[:3])
        np.testing.assert_allclose(out.top_logprobs[row], reference[order[:3]], atol=1e-5)
        token = int(out.token_ids[row])
        np.testing.assert_allclose(out.sampled_logprob[row], reference[token], atol=1e-5)
        assert out.sampled_rank[row] == 1 + (reference > reference[token]).sum()


@pytest.mark.parametrize("num_logprobs", [None, 0])
def test_logprobs_optional(num_logprobs):
    out = run([SamplingParams(temperature=0, logprobs=num_logprobs)], random_logits(1))
    assert (out.sampled_logprob is None) == (num_logprobs is None)
    if num_logprobs == 0:
        assert out.top_ids.shape == (1, 0) and out.sampled_rank[0] == 1


def test_one_program_serves_every_mix_of_options():
    """At fixed widths the sampler compiles once, whatever the rows ask; a stage no row uses is
    skipped at run time and changes nothing: greedy rows keep the argmax of the biased logits."""
    jitted = jax.jit(lambda *args: sample(*args))  # its own cache, unlike another jax.jit(sample)
    logits = random_logits(4, seed=9)
    mixes = [[SamplingParams(temperature=0)] * 4,
             [SamplingParams(temperature=0.7, top_k=3, logprobs=2), SamplingParams(temperature=0)] * 2,
             [SamplingParams(top_p=0.5, seed=3, presence_penalty=1.0), SamplingParams(min_p=0.1, logprobs=0),
              SamplingParams(temperature=0, logit_bias={2: 50.0}),
              SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[5, 6])]]
    for params in mixes:
        tensors = SamplingTensors.from_params(params, vocab_size=VOCAB, num_logprobs=5, bias_width=4,
                                              prompt_token_ids=[[1, 2]] * 4, output_token_ids=[[3]] * 4)
        out = jitted(jnp.asarray(logits), tensors, make_step_key(0, 0))
        biased = logits.copy()
        for row, p in enumerate(params):
            for token_id, bias in (p.logit_bias or {}).items():
                biased[row, token_id] += bias
            biased[row, p.stop_token_ids] = -np.inf
        greedy = [row for row, p in enumerate(params) if p.greedy]
        np.testing.assert_array_equal(np.asarray(out.token_ids)[greedy], biased[greedy].argmax(-1))
        assert out.top_ids.shape == (4, 5)
    assert jitted._cache_size() == 1


def test_seed_keeps_all_64_bits():
    params = [SamplingParams(seed=5), SamplingParams(seed=5 + 2**32), SamplingParams(seed=-1)]
    tensors = SamplingTensors.from_params(params, vocab_size=VOCAB, num_rows=4)
    assert tensors.seed.tolist() == [[0, 5], [1, 5], [2**32 - 1, 2**32 - 1], [0, 0]]
    assert tensors.has_seed.tolist() == [True, True, True, False]


def test_argmax_matches_jnp_argmax_on_ties_infinities_and_nan():
    from jaxserve.sampler import argmax

    rng = np.random.default_rng(7)
    logits = rng.standard_normal((6, 300)).astype(np.float32)
    logits[1, [5, 17, 250]] = 9.0  # ties: the first wins
    logits[2] = -np.inf  # everything banned
    logits[3, 40] = np.inf
    logits[4, [3, 90]] = np.nan  # NaN counts as the maximum, the first one wins
    logits[5, -1] = 50.0
    np.testing.assert_array_equal(np.asarray(argmax(jnp.asarray(logits))), np.argmax(logits, axis=-1))
