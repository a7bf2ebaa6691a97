"""The verifier (jaxserve/spec_decode/rejection_sampler.py): greedy acceptance, and the exactness
of rejection sampling by a chi-square test against the target's own distribution."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxserve.sampler import SamplingTensors, make_step_key
from jaxserve.sampling_params import SamplingParams
from jaxserve.spec_decode.rejection_sampler import rejection_sample

VOCAB = 5
ALPHA = 1e-3  # significance of the chi-square tests
verify = jax.jit(rejection_sample, static_argnames=("argmax_only",))


def tensors_for(params: SamplingParams, rows: int, vocab: int = VOCAB) -> SamplingTensors:
    one = SamplingTensors.from_params([params], vocab_size=vocab, num_logprobs=None)
    return jax.tree.map(lambda x: np.repeat(x, rows, axis=0), one)


def one_hot_logits(ids, vocab=VOCAB):
    """Logits whose argmax is `ids [R, k + 1]`."""
    return np.where(np.arange(vocab) == np.asarray(ids)[..., None], 5.0, 0.0).astype(np.float32)


@pytest.mark.parametrize("argmax_only", [True, False])
def test_greedy_accepts_while_draft_is_argmax(argmax_only):
    target = [[3, 1, 4, 2], [3, 1, 4, 2], [3, 1, 4, 2], [2, 0, 0, 0]]
    drafts = np.array([[3, 1, 4], [3, 2, 4], [0, 1, 4], [0, 0, 0]], np.int32)
    num_drafts = np.array([3, 3, 2, 0], np.int32)
    out = verify(jnp.asarray(one_hot_logits(target)), jnp.asarray(drafts), jnp.asarray(num_drafts),
                 tensors_for(SamplingParams(temperature=0.0), 4), make_step_key(0, 0), argmax_only=argmax_only)
    np.testing.assert_array_equal(out.num_tokens, [4, 2, 1, 1])
    np.testing.assert_array_equal(out.token_ids, [[3, 1, 4, 2], [3, 1, -1, -1], [3, -1, -1, -1], [2, -1, -1, -1]])


def test_greedy_bonus_after_fewer_drafts_than_k():
    # Row 0 has 2 of k = 3 drafts: both accepted, the bonus comes from entry 2 (left-aligned).
    target = [[3, 1, 4, 0]]
    out = verify(jnp.asarray(one_hot_logits(target)), jnp.asarray([[3, 1, 2]], jnp.int32), jnp.asarray([2]),
                 tensors_for(SamplingParams(temperature=0.0), 1), make_step_key(0, 0), argmax_only=True)
    np.testing.assert_array_equal(out.token_ids, [[3, 1, 4, -1]])


def test_logit_bias_applies_at_every_draft_position():
    # Greedy with a bias that makes token 2 the argmax everywhere: drafts of 2 are all accepted.
    params = SamplingParams(temperature=0.0, logit_bias={2: 10.0})
    out = verify(jnp.asarray(one_hot_logits([[3, 1, 4]])), jnp.asarray([[2, 2]], jnp.int32), jnp.asarray([2]),
                 tensors_for(params, 1), make_step_key(0, 0), argmax_only=False)
    np.testing.assert_array_equal(out.token_ids, [[2, 2, 2]])


# ---- exactness: the first three generated tokens of a Markov chain target ----

def markov(seed, vocab=VOCAB, concentration=1.0):
    return np.random.default_rng(seed).dirichlet([concentration] * vocab, size=vocab)


def generate_three(target, draft, k, num_rows, seed, claimed=None):
    """First three tokens after token 0 of `num_rows` independent rows, by speculation: each step
    a row drafts k tokens from the chain `draft` (None: the deterministic proposer d = prev + 1),
    the verifier sees the target chain's logits at each position and the draft's q (`claimed`, if
    given, is the q the verifier is told instead: a deliberately wrong verifier)."""
    rng = np.random.default_rng(seed)
    tensors = tensors_for(SamplingParams(temperature=1.0), num_rows)
    out = np.full((num_rows, 3), -1)
    length = np.zeros(num_rows, int)
    prev = np.zeros(num_rows, int)
    step = 0
    while (length < 3).any():
        drafts = np.zeros((num_rows, k), np.int32)
        probs = np.zeros((num_rows, k, VOCAB), np.float32)
        chain = prev.copy()
        logits = np.zeros((num_rows, k + 1, VOCAB), np.float32)
        for i in range(k):
            logits[:, i] = np.log(target[chain])
            if draft is None:
                drafts[:, i] = (chain + 1) % VOCAB
            else:
                probs[:, i] = draft[chain]
                cumulative = probs[:, i].cumsum(axis=1)
                drafts[:, i] = np.minimum((rng.random((num_rows, 1)) > cumulative).sum(axis=1), VOCAB - 1)
            chain = drafts[:, i]
        logits[:, k] = np.log(target[chain])
        q = None if draft is None else jnp.asarray(probs if claimed is None else claimed(probs))
        result = verify(jnp.asarray(logits), jnp.asarray(drafts), jnp.full(num_rows, k, jnp.int32), tensors,
                        make_step_key(seed, step), q, argmax_only=False)
        tokens, counts = np.asarray(result.token_ids), np.asarray(result.num_tokens)
        for j in range(k + 1):
            take = (j < counts) & (length < 3)
            out[take, length[take]] = tokens[take, j]
            length += take
        prev = tokens[np.arange(num_rows), counts - 1]
        step += 1
    return out


def chi_square_p(samples, target):
    """p-value of the joint counts of (t1, t2, t3) against the chain's exact probabilities (cells
    expecting fewer than 5 samples pooled)."""
    expected = np.einsum("a,ab,bc->abc", target[0], target, target).reshape(-1) * len(samples)
    observed = np.bincount(samples @ np.array([VOCAB * VOCAB, VOCAB, 1]), minlength=VOCAB ** 3)
    small = expected < 5
    expected = np.append(expected[~small], expected[small].sum())
    observed = np.append(observed[~small], observed[small].sum())
    return stats.chisquare(observed, expected).pvalue


NUM_SAMPLES = 40_000


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("proposer", ["sampled", "deterministic"])
def test_sampled_output_distribution_is_the_targets(proposer, k):
    """40,000 rows, 125 cells, alpha 1e-3: a shift of 5% of the mass to another distribution
    (total variation ~0.03 here) gives a noncentrality over 100, far past the critical value,
    as the negative control below shows for a wrong verifier."""
    target = markov(1)
    draft = markov(2) if proposer == "sampled" else None
    samples = generate_three(target, draft, k, NUM_SAMPLES, seed=k)
    assert chi_square_p(samples, target) > ALPHA


def test_wrong_verifier_fails_the_same_test():
    """Negative control: the verifier is told the drafts came from the uniform distribution
    when they came from another chain; its output is no longer the target's."""
    target = markov(1)
    samples = generate_three(target, markov(2), 3, NUM_SAMPLES, seed=3,
                             claimed=lambda probs: np.full_like(probs, 1.0 / VOCAB))
    assert chi_square_p(samples, target) < ALPHA


def test_five_percent_shift_is_detected():
    """The test's power: samples from a 95/5 mixture of the target with another chain fail it."""
    target, other = markov(1), markov(5)
    rng = np.random.default_rng(0)
    mixed = 0.95 * np.einsum("a,ab,bc->abc", target[0], target, target) + 0.05 * np.einsum(
        "a,ab,bc->abc", other[0], other, other)
    cells = rng.choice(VOCAB ** 3, size=NUM_SAMPLES, p=mixed.reshape(-1) / mixed.sum())
    samples = np.stack([cells // (VOCAB * VOCAB), cells // VOCAB % VOCAB, cells % VOCAB], axis=1)
    assert chi_square_p(samples, target) < ALPHA


def test_seeded_rows_repeat():
    params = SamplingParams(temperature=1.0, seed=7)
    logits = jnp.asarray(np.repeat(np.random.default_rng(0).normal(size=(1, 4, VOCAB)), 2, axis=0).astype(np.float32))
    drafts, num = jnp.asarray([[1, 2, 3], [1, 2, 3]], jnp.int32), jnp.asarray([3, 3])
    a = verify(logits, drafts, num, tensors_for(params, 2), make_step_key(0, 0), argmax_only=False)
    b = verify(logits, drafts, num, tensors_for(params, 2), make_step_key(0, 9), argmax_only=False)
    np.testing.assert_array_equal(a.token_ids, b.token_ids)  # the step key does not matter
    np.testing.assert_array_equal(a.token_ids[0], a.token_ids[1])  # nor the row
