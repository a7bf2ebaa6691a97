"""With temperature 1 on a tiny model, the first three generated tokens are distributed the same
with speculation as without it (two-sample chi-square over the joint (t1, t2, t3), alpha 1e-3,
fixed seeds); a deliberately wrong verifier fails the same test.

The drafts come from the "draft_model" proposer with the target itself as the draft (its greedy
tokens): about one draft in five is accepted, so both the acceptance and the residual draw
decide many tokens. `top_k=4` keeps the support at 4^3 cells, each expected dozens of times, and
checks that the verifier applies top-k at every draft position."""

import dataclasses

import numpy as np
import pytest
from scipy import stats

from jaxserve.engine import EngineCore
from jaxserve.sampling_params import SamplingParams
from jaxserve.spec_decode import rejection_sampler
from models.loader import random_model
from tests.engine_utils import tiny_config, tiny_engine_config
from tests.jaxserve.test_engine import run

ALPHA = 1e-3
NUM_SAMPLES = 2400
PROMPT = [5, 17, 33, 8, 61, 22, 40, 41]
OPTIONS = dict(max_num_seqs=32, request_buckets=(32,), token_buckets=(64, 256), max_num_batched_tokens=256,
               kv_cache_memory_bytes=16 << 20)
SPEC = {"method": "draft_model", "num_speculative_tokens": 2, "model": "the-target"}


@pytest.fixture(scope="module")
def loaded():
    # Weights at 16x the N(0, 0.02) default: peaked enough that the greedy draft is often sampled.
    return dataclasses.replace(random_model(tiny_config(), seed=0, weight_scale=16.0), name="tiny",
                               source="tiny-sampling")


def first_three(loaded, **options):
    engine = EngineCore(tiny_engine_config(**OPTIONS, **options), loaded=loaded, draft_loaded=loaded)
    requests = [(PROMPT, SamplingParams(max_tokens=4, temperature=1.0, top_k=4, seed=i, ignore_eos=True))
                for i in range(NUM_SAMPLES)]
    outputs = run(engine, requests)
    return np.array([o.outputs[0].token_ids[:3] for o in outputs]), engine.metrics


def homogeneity_p(a, b, vocab):
    """Two-sample chi-square over the joint cells (t1, t2, t3) (cells seen fewer than 10 times
    in both samples together pooled)."""
    index = lambda s: (s[:, 0] * vocab + s[:, 1]) * vocab + s[:, 2]  # noqa: E731
    counts = np.stack([np.bincount(index(s), minlength=vocab ** 3) for s in (a, b)])
    total = counts.sum(axis=0)
    small = total < 10
    table = np.concatenate([counts[:, ~small & (total > 0)], counts[:, small].sum(axis=1, keepdims=True)], axis=1)
    return stats.chi2_contingency(table[:, table.sum(axis=0) > 0]).pvalue


def test_first_three_tokens_distribution_with_and_without_speculation(loaded, monkeypatch):
    vocab = loaded.config.vocab_size
    plain, _ = first_three(loaded)
    spec, metrics = first_three(loaded, speculative_config=SPEC)
    assert metrics.spec_decode_num_drafts > NUM_SAMPLES  # every request verified drafts
    accepted = metrics.spec_decode_num_accepted_tokens / metrics.spec_decode_num_draft_tokens
    assert 0.1 < accepted < 0.9, accepted  # both branches (accept, residual) decide many tokens
    assert homogeneity_p(plain, spec, vocab) > ALPHA

    # Negative control: the verifier is told the one-hot drafts came from the uniform
    # distribution, so it accepts them far too often.
    real = rejection_sampler.rejection_sample

    def biased(logits, draft_ids, num_drafts, tensors, step_key, draft_probs=None, *, argmax_only=False):
        uniform = np.full(draft_ids.shape + (logits.shape[-1],), 1.0 / logits.shape[-1], np.float32)
        return real(logits, draft_ids, num_drafts, tensors, step_key, uniform, argmax_only=argmax_only)

    monkeypatch.setattr(rejection_sampler, "rejection_sample", biased)
    wrong, _ = first_three(loaded, speculative_config=SPEC)
    assert homogeneity_p(plain, wrong, vocab) < ALPHA
