"""The structured-output token mask in the sampler: applied before greedy argmax and sampling,
compared with a pure-JAX reference; unconstrained rows bit-identical; one program either way."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.sampler import (SamplingTensors, allow_all_bitmask, apply_token_bitmask, make_step_key,
                              needs_only_argmax, sample)
from jaxserve.sampling_params import SamplingParams

VOCAB = 77  # not a multiple of 32: the last word's tail bits must be ignored
sample_jit = jax.jit(sample)


def reference_bitmask(logits: jax.Array, bitmask: jax.Array) -> jax.Array:
    """The same operation by a gather: token t is allowed when bit t % 32 of word t // 32 is set."""
    ids = jnp.arange(logits.shape[1])
    words = bitmask[:, ids // 32]
    allowed = jnp.bitwise_and(jnp.right_shift(words, ids % 32), 1) == 1
    return jnp.where(allowed, logits, -jnp.inf)


def pack(allowed: np.ndarray) -> np.ndarray:
    """Bool `[R, V]` -> llguidance's `[R, ceil(V/32)] i32` layout (tail bits set, as -1 would be)."""
    rows, vocab = allowed.shape
    padded = np.ones((rows, 32 * -(-vocab // 32)), bool)
    padded[:, :vocab] = allowed
    return np.packbits(padded, axis=1, bitorder="little").view(np.int32)


def random_case(rows: int, seed: int, constrained_rows):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(rows, VOCAB)) * 3).astype(np.float32)
    allowed = np.ones((rows, VOCAB), bool)
    for row in constrained_rows:
        allowed[row] = rng.random(VOCAB) < 0.2
        allowed[row, rng.integers(VOCAB)] = True  # at least one token
    return logits, allowed


def tensors_for(params, allowed, **kwargs):
    tensors = SamplingTensors.from_params(params, vocab_size=VOCAB, num_logprobs=4, **kwargs)
    return dataclasses.replace(tensors, token_bitmask=pack(allowed))


def test_apply_token_bitmask_matches_reference():
    logits, allowed = random_case(6, seed=0, constrained_rows=[0, 2, 3, 5])
    bitmask = pack(allowed)
    assert bitmask.shape == (6, 3)
    out = np.asarray(jax.jit(apply_token_bitmask)(jnp.asarray(logits), jnp.asarray(bitmask)))
    np.testing.assert_array_equal(out, np.asarray(reference_bitmask(jnp.asarray(logits), jnp.asarray(bitmask))))
    np.testing.assert_array_equal(out, np.where(allowed, logits, -np.inf))
    np.testing.assert_array_equal(out[[1, 4]], logits[[1, 4]])  # allow-all rows untouched, bit for bit


def test_greedy_and_sampled_rows_stay_inside_the_mask():
    constrained = [0, 1, 4, 5]
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_k=5),
              SamplingParams(temperature=0), SamplingParams(temperature=0.8),
              SamplingParams(temperature=1.0, seed=7, logit_bias={3: 40.0}), SamplingParams(min_p=0.05)]
    for step in range(40):
        logits, allowed = random_case(len(params), seed=step, constrained_rows=constrained)
        out = sample_jit(jnp.asarray(logits), tensors_for(params, allowed), make_step_key(1, step))
        tokens = np.asarray(out.token_ids)
        assert all(allowed[row, tokens[row]] for row in constrained), (step, tokens)
        masked = np.where(allowed, logits, -np.inf)
        assert tokens[0] == masked[0].argmax() and tokens[2] == logits[2].argmax()


def test_unconstrained_rows_are_bit_identical_and_logprobs_raw():
    """Constraining some rows changes nothing in the others (tokens and logprobs), and every
    row's reported logprobs are those of the raw logits."""
    params = [SamplingParams(temperature=1.0, logprobs=3), SamplingParams(temperature=0.7, top_p=0.9, logprobs=2),
              SamplingParams(temperature=0, logprobs=1), SamplingParams(temperature=1.0, seed=11, logprobs=0)]
    for step in range(10):
        logits, allowed = random_case(4, seed=100 + step, constrained_rows=[0, 2])
        key = make_step_key(3, step)
        free = sample_jit(jnp.asarray(logits), tensors_for(params, np.ones_like(allowed)), key)
        held = sample_jit(jnp.asarray(logits), tensors_for(params, allowed), key)
        for field in ("token_ids", "sampled_logprob", "sampled_rank", "top_ids", "top_logprobs"):
            np.testing.assert_array_equal(np.asarray(getattr(held, field))[[1, 3]],
                                          np.asarray(getattr(free, field))[[1, 3]], err_msg=field)
        np.testing.assert_array_equal(held.top_logprobs, free.top_logprobs)  # raw, constrained rows too
        raw = np.asarray(jax.nn.log_softmax(jnp.asarray(logits)))
        tokens = np.asarray(held.token_ids)
        np.testing.assert_allclose(held.sampled_logprob, raw[np.arange(4), tokens], atol=1e-6)


def test_sampled_distribution_is_the_renormalized_masked_softmax():
    """4096 unseeded rows of the same logits and mask: the token frequencies follow the softmax
    over the allowed tokens (3 standard deviations of a binomial, per token)."""
    rows = 4096
    logits, allowed = random_case(1, seed=5, constrained_rows=[0])
    logits, allowed = np.repeat(logits, rows, 0) / 3, np.repeat(allowed, rows, 0)
    out = sample_jit(jnp.asarray(logits), tensors_for([SamplingParams(temperature=1.0)] * rows, allowed),
                     make_step_key(0, 9))
    counts = np.bincount(np.asarray(out.token_ids), minlength=VOCAB)
    masked = np.where(allowed[0], logits[0].astype(np.float64), -np.inf)
    probs = np.exp(masked - masked.max())
    probs /= probs.sum()
    assert counts[~allowed[0]].sum() == 0
    tolerance = 3 * np.sqrt(rows * probs * (1 - probs)) + 1
    assert np.all(np.abs(counts - rows * probs) <= tolerance), (counts, rows * probs)


def test_needs_only_argmax_and_one_program():
    params = [SamplingParams(temperature=0)] * 4
    plain = SamplingTensors.from_params(params, vocab_size=VOCAB, num_logprobs=4)
    assert np.all(plain.token_bitmask == -1) and plain.token_bitmask.shape == (4, 3)
    assert needs_only_argmax(plain)
    logits, allowed = random_case(4, seed=6, constrained_rows=[1])
    constrained = tensors_for(params, allowed)
    assert not needs_only_argmax(constrained)
    jitted = jax.jit(lambda *args: sample(*args))
    for tensors in (plain, constrained, plain):
        out = jitted(jnp.asarray(logits), tensors, make_step_key(0, 0))
        masked = np.where(np.asarray(tensors.token_bitmask == -1).all(1)[:, None], logits,
                          np.where(allowed, logits, -np.inf))
        np.testing.assert_array_equal(out.token_ids, masked.argmax(-1))
    assert jitted._cache_size() == 1


@pytest.mark.parametrize("vocab", [1, 31, 32, 33, 64])
def test_allow_all_width(vocab):
    assert allow_all_bitmask(2, vocab).shape == (2, -(-vocab // 32))
