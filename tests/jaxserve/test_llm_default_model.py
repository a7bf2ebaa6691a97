"""The public API on the default model (SmolLM2-135M-Instruct)."""

import os
import subprocess
import sys

import pytest

from jaxserve.sampling_params import SamplingParams

pytestmark = pytest.mark.default_model
GREEDY = SamplingParams(max_tokens=8, temperature=0)


def test_generate_knows_the_capital_of_france(default_llm):
    (out,) = default_llm.generate(["The capital of France is"], GREEDY, use_tqdm=False)
    assert "Paris" in out.outputs[0].text
    assert out.prompt_token_ids == default_llm.tokenizer.encode("The capital of France is")
    assert out.finished and out.outputs[0].finish_reason in ("stop", "length")


def test_chat_answers_and_stops_at_end_of_turn(default_llm):
    (out,) = default_llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                              SamplingParams(max_tokens=32, temperature=0), use_tqdm=False)
    completion = out.outputs[0]
    assert "Paris" in completion.text
    assert completion.finish_reason == "stop"  # <|im_end|> is the model's EOS
    assert "<|im_end|>" not in completion.text  # special tokens skipped


def test_stream_matches_generate(default_llm):
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    deltas = list(default_llm.stream("Once upon a time", params))
    (final,) = default_llm.generate(["Once upon a time"], params, use_tqdm=False)
    assert "".join(d.text for d in deltas) == final.outputs[0].text
    assert sum((d.token_ids for d in deltas), []) == final.outputs[0].token_ids


def test_batch_with_one_bad_prompt_raises_and_engine_recovers(default_llm):
    with pytest.raises(ValueError, match="prompt 1: prompt must not be empty"):
        default_llm.generate(["Hello", "", "World"], GREEDY, use_tqdm=False)
    assert not default_llm.engine.has_unfinished_requests()
    assert default_llm.engine.kv_cache_usage() == 0.0
    (out,) = default_llm.generate(["The capital of France is"], GREEDY, use_tqdm=False)
    assert "Paris" in out.outputs[0].text


@pytest.mark.slow
def test_cli_generate_prints_paris():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-m", "server.main", "--log-level", "WARNING", "generate", "The capital of France is",
         "--max-tokens", "8"], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("The capital of France is") and "Paris" in result.stdout


@pytest.mark.slow
def test_notebook_helper():
    import jaxserve

    text = jaxserve.generate("The capital of France is", max_tokens=8,
                             engine_options={"max_model_len": 512, "token_buckets": (32,), "request_buckets": (4,)})
    assert "Paris" in text
