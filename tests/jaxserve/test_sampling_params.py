import math

import pytest

from jaxserve.sampling_params import SamplingParams


def test_defaults_follow_vllm():
    params = SamplingParams()
    assert (params.n, params.temperature, params.top_p, params.top_k, params.min_p) == (
        1, 1.0, 1.0, 0, 0.0)
    assert params.max_tokens == 16 and params.min_tokens == 0
    assert params.stop == [] and params.stop_token_ids == []
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (
        0.0, 0.0, 1.0)
    assert params.seed is None and params.logprobs is None and params.logit_bias is None
    assert not params.ignore_eos and not params.include_stop_str_in_output
    assert params.skip_special_tokens
    assert params.explicit_fields == frozenset()


def test_normalization():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(logit_bias={"7": 2.5}).logit_bias == {7: 2.5}
    assert SamplingParams(temperature=0).greedy and SamplingParams(temperature=1e-6).greedy
    assert not SamplingParams(temperature=0.1).greedy


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_tokens=0), "max_tokens must be >= 1, got 0"),
        (dict(max_tokens=-3), "max_tokens must be >= 1, got -3"),
        (dict(max_tokens=2.5), "max_tokens must be an integer"),
        (dict(n=0), "n must be >= 1"),
        (dict(temperature=-0.5), "temperature must be >= 0.0"),
        (dict(temperature=math.nan), "temperature must be >= 0.0, got nan"),
        (dict(temperature=math.inf), "temperature must be >= 0.0"),
        (dict(top_p=0.0), "top_p must be in (0.0, 1.0]"),
        (dict(top_p=1.5), "top_p must be in (0.0, 1.0]"),
        (dict(top_p=math.nan), "top_p must be in (0.0, 1.0]"),
        (dict(top_k=-2), "top_k must be >= 0"),
        (dict(min_p=1.5), "min_p must be in [0.0, 1.0]"),
        (dict(presence_penalty=3.0), "presence_penalty must be in [-2.0, 2.0]"),
        (dict(frequency_penalty=-2.5), "frequency_penalty must be in [-2.0, 2.0]"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be > 0.0"),
        (dict(min_tokens=-1), "min_tokens must be >= 0"),
        (dict(min_tokens=20, max_tokens=10), "min_tokens must be <= max_tokens (10), got 20"),
        (dict(logprobs=-1), "logprobs must be >= 0"),
        (dict(prompt_logprobs=-1), "prompt_logprobs must be >= 0"),
        (dict(seed=1.5), "seed must be an integer"),
        (dict(stop=[""]), "stop must be a non-empty string"),
        (dict(stop_token_ids=[-1]), "stop_token_ids must be >= 0"),
        (dict(logit_bias={1: math.nan}), "logit_bias values must be a finite number"),
        (dict(logit_bias={"x": 1.0}), "logit_bias keys (token ids) must be an integer"),
        (dict(ignore_eos="yes"), "ignore_eos must be a bool"),
    ],
)
def test_validation_names_field_and_range(kwargs, message):
    with pytest.raises(ValueError) as error:
        SamplingParams(**kwargs)
    assert message in str(error.value)


def test_validation_against_vocab():
    SamplingParams(stop_token_ids=[9], logit_bias={9: 1.0}, logprobs=5).validate(vocab_size=10)
    with pytest.raises(ValueError, match=r"stop_token_ids must be in \[0, 9\], got 10"):
        SamplingParams(stop_token_ids=[10]).validate(vocab_size=10)
    with pytest.raises(ValueError, match=r"logit_bias keys \(token ids\) must be in \[0, 9\]"):
        SamplingParams(logit_bias={10: 1.0}).validate(vocab_size=10)
    with pytest.raises(ValueError, match=r"logprobs must be in \[0, 4\], got 5"):
        SamplingParams(logprobs=5).validate(vocab_size=10, max_logprobs=4)


def test_validation_against_table_widths():
    """The sampler's bias table is as wide as the engine allows: more entries are refused."""
    SamplingParams(stop_token_ids=[1, 2], logit_bias={1: 1.0, 2: 1.0}).validate(max_logit_bias=2, max_stop_token_ids=2)
    with pytest.raises(ValueError, match=r"logit_bias must have at most 2 entries \(the engine's max_logit_bias\), got 3"):
        SamplingParams(logit_bias={1: 1.0, 2: 1.0, 3: 1.0}).validate(max_logit_bias=2)
    with pytest.raises(ValueError, match=r"stop_token_ids must have at most 1 entries .*, got 2"):
        SamplingParams(stop_token_ids=[1, 2]).validate(max_stop_token_ids=1)


def test_explicit_fields_and_generation_config():
    generation_config = {"temperature": 0.6, "top_p": 0.9, "top_k": 50, "max_new_tokens": 64,
                         "repetition_penalty": 1.1, "do_sample": True}
    params = SamplingParams(temperature=1.0, max_tokens=16, stop="x")
    assert params.explicit_fields == {"temperature", "max_tokens", "stop"}
    resolved = params.apply_generation_config(generation_config)
    # Explicit values win even when equal to the default; unset fields take the model's.
    assert resolved.temperature == 1.0 and resolved.max_tokens == 16 and resolved.stop == ["x"]
    assert resolved.top_p == 0.9 and resolved.top_k == 50 and resolved.repetition_penalty == 1.1
    assert SamplingParams().apply_generation_config({}).temperature == 1.0
    assert SamplingParams().apply_generation_config(generation_config).max_tokens == 64


@pytest.mark.parametrize("kwargs, message", [
    (dict(stop=5), "stop must be a string or a list of strings, got 5"),
    (dict(stop_token_ids=5), "stop_token_ids must be a list of token ids, got 5"),
    (dict(logit_bias=[1]), "logit_bias must be a dict from token id to bias"),
    (dict(temperature="0.5"), "temperature must be a number >= 0.0, got '0.5' (str)"),
    (dict(top_p=[1]), "top_p must be a number"),
])
def test_a_value_of_the_wrong_kind_names_its_field(kwargs, message):
    with pytest.raises(ValueError) as error:
        SamplingParams(**kwargs)
    assert message in str(error.value)


def test_n_is_bounded_by_the_engines_max_n():
    from jaxserve.config import EngineConfig

    assert EngineConfig(max_num_seqs=16).max_n == 16
    SamplingParams(n=16).validate(max_n=16)
    with pytest.raises(ValueError, match=r"n must be in \[1, 16\] \(the engine's max_n\), got 4294967295"):
        SamplingParams(n=2**32 - 1).validate(max_n=16)
    with pytest.raises(ValueError, match="max_n must be an integer >= 1"):
        EngineConfig(max_n=0)
