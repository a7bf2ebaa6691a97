"""`speculative_config` parsing and the n-gram proposer."""

import numpy as np
import pytest

from jaxserve.config import EngineConfig
from jaxserve.spec_decode.config import SpeculativeConfig
from jaxserve.spec_decode.proposer import NgramProposer, ngram_lookup


def ngram(k=3, low=1, high=3):
    return NgramProposer(SpeculativeConfig("ngram", k, low, high))


def test_ngram_follows_the_longest_most_recent_match():
    #        0  1  2  3  4  5  6  7  8  9
    tokens = [5, 6, 7, 8, 9, 1, 6, 7, 2, 6, 7]
    # suffix [6, 7] occurs at 1 and 6; the most recent (6) is followed by 2, 6, 7.
    assert ngram(k=3, low=1, high=2).propose(tokens, 3).token_ids == [2, 6, 7]
    # with max 3: [2, 6, 7] never occurred before, so 2-grams decide.
    assert ngram(k=2, low=2, high=3).propose(tokens, 5).token_ids == [2, 6]


def test_ngram_respects_max_drafts_and_min_length():
    tokens = [1, 2, 3, 4, 1, 2]
    assert ngram(k=3).propose(tokens, 1).token_ids == [3]
    assert ngram(k=3, low=3, high=3).propose(tokens, 3).token_ids == []  # [4, 1, 2] never occurred
    assert ngram(k=3).propose(tokens, 0).token_ids == []
    assert ngram(k=3).propose([7], 3).token_ids == []


def test_ngram_on_a_run_of_one_token():
    assert ngram_lookup(np.array([4, 4, 4, 4]), 1, 3, 5) == [4]


def test_speculative_config_from_engine_options():
    config = EngineConfig(speculative_config='{"method": "ngram", "num_speculative_tokens": 3}')
    assert config.speculative_config == SpeculativeConfig("ngram", 3, 5, 5)
    assert EngineConfig(speculative_config={}).speculative_config is None
    assert EngineConfig(speculative_config={"method": "ngram", "num_speculative_tokens": 2,
                                            "prompt_lookup_max": 4}).speculative_config.prompt_lookup_min == 4


@pytest.mark.parametrize("value, message", [
    ({"method": "eagle3", "num_speculative_tokens": 3}, "model is required for method 'eagle3'"),
    ({"method": "draft_model", "num_speculative_tokens": 3}, "model is required for method 'draft_model'"),
    ({"method": "medusa", "num_speculative_tokens": 3}, "speculative_config.method must be one of"),
    ({"num_speculative_tokens": 3}, "speculative_config.method is required"),
    ({"method": "ngram"}, "num_speculative_tokens is required"),
    ({"method": "ngram", "num_speculative_tokens": 0}, r"num_speculative_tokens must be an integer in \[1, 16\]"),
    ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 1}, "unknown field"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 0}, "prompt_lookup_min must be"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2}, "<="),
    ("{not json", "must be a JSON object"),
    ([1], "must be a dict"),
])
def test_bad_speculative_config_names_the_field(value, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(speculative_config=value)


def test_speculation_needs_one_dp_shard_and_room_for_the_drafts():
    spec = {"method": "ngram", "num_speculative_tokens": 4}
    with pytest.raises(ValueError, match="data_parallel_size == 1"):
        EngineConfig(speculative_config=spec, data_parallel_size=2)
    with pytest.raises(ValueError, match="max_num_batched_tokens must be >= 1 \\+"):
        EngineConfig(speculative_config=spec, max_num_batched_tokens=4, token_buckets=(4,))
