"""Parity with Hugging Face transformers: logits of tiny random models of every supported
architecture, and the default model's top-20 logprobs and greedy continuations.

Fixtures come from tools/make_parity_fixtures.py (transformers, float32, eager attention).
"""

import json
import os

import numpy as np
import pytest

from models.config import ModelConfig
from models.weights import iter_safetensors, load_state
from tests.helpers import relative_error, sequence_logits

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "parity")
ARCHITECTURES = ["llama", "llama3", "smollm2", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe", "qwen2_moe",
                 "mixtral_sharded_legacy", "deepseek_v3", "deepseek_v2_lite", "deepseek_v2", "gpt_oss", "gpt_oss_gqa4"]


def load_fixture_model(name):
    folder = os.path.join(FIXTURES, name)
    config = ModelConfig.from_folder(folder)
    return load_state(config, iter_safetensors(folder)), np.load(os.path.join(folder, "reference.npz"))


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_logits_match_transformers(name):
    model, ref = load_fixture_model(name)
    errors = []
    for i in range(int(ref["num_prompts"])):
        ids = ref[f"input_ids_{i}"].tolist()
        # Fed in chunks of 7 through the paged cache: prefill chunks and cached context both count.
        logits = sequence_logits(model, ids, block_size=4, chunk=7)
        errors.append(relative_error(logits, ref[f"logits_{i}"]))
    print(f"{name}: relative logit error {max(errors):.2e}")
    # float32 against float32 with different op orders: ~1e-6 is typical, 1e-4 is the bar.
    assert max(errors) < 1e-4, errors


def test_fixture_layouts_cover_fused_and_per_expert():
    """Between them the two Mixtral fixtures must hold both expert layouts (and one is sharded)."""
    names = set()
    for fixture in ("mixtral", "mixtral_sharded_legacy"):
        names |= {name for name, _, _ in iter_safetensors(os.path.join(FIXTURES, fixture))}
    assert any(".experts.0." in n for n in names), "per-expert layout missing"
    assert any(n.endswith("experts.gate_up_proj") for n in names), "fused layout missing"
    assert os.path.exists(os.path.join(FIXTURES, "mixtral_sharded_legacy", "model.safetensors.index.json"))


@pytest.fixture(scope="module")
def default_model():  # weights and tokenizer only, no engine
    from models.loader import load_model

    return load_model()


@pytest.mark.default_model
def test_default_model_top20_logprobs(default_llm):
    """Top-20 logprobs at every prompt position (through `prompt_logprobs`) and after the last
    one (through `logprobs` of the first sampled token), against transformers."""
    from jaxserve.sampling_params import SamplingParams

    ref = np.load(os.path.join(FIXTURES, "smollm2_135m", "reference.npz"))
    prompts = [{"prompt_token_ids": ref[f"input_ids_{i}"].tolist()} for i in range(4)]
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=20, logprobs=20, ignore_eos=True)
    outputs = default_llm.generate(prompts, params, use_tqdm=False)
    worst = 0.0
    for i, output in enumerate(outputs):
        positions = output.prompt_logprobs[1:] + [output.outputs[0].logprobs[0]]
        assert output.prompt_logprobs[0] is None and len(positions) == len(prompts[i]["prompt_token_ids"])
        for pos, entry in enumerate(positions):
            ours_top = sorted((e.logprob for e in entry.values()), reverse=True)[:20]
            for token_id, logprob in zip(ref[f"top20_ids_{i}"][pos], ref[f"top20_logprobs_{i}"][pos]):
                if int(token_id) in entry:
                    worst = max(worst, abs(entry[int(token_id)].logprob - float(logprob)))
                else:  # a tie at the 20th place may be ordered differently
                    assert float(logprob) <= ours_top[-1] + 1e-3, (i, pos, int(token_id))
    print(f"default model: max top-20 logprob difference {worst:.2e}")
    assert worst < 1e-3


@pytest.mark.default_model
def test_default_model_greedy_continuations(default_llm):
    """32 greedy tokens per prompt through the engine (all four batched), identical to
    transformers except at a near-tie (top-2 margin below 1e-4 in the reference), after which
    the sequences may legitimately part."""
    from jaxserve.sampling_params import SamplingParams

    ref = np.load(os.path.join(FIXTURES, "smollm2_135m", "reference.npz"))
    prompts = [{"prompt_token_ids": ref[f"input_ids_{i}"].tolist()} for i in range(4)]
    outputs = default_llm.generate(prompts, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True),
                                   use_tqdm=False)
    for i, output in enumerate(outputs):
        expected, margins = ref[f"greedy_{i}"].tolist(), ref[f"greedy_margin_{i}"]
        got = output.outputs[0].token_ids
        assert len(got) == 32
        for step, (a, b) in enumerate(zip(got, expected)):
            if a != b:
                assert margins[step] < 1e-4, f"prompt {i} diverges at step {step} (margin {margins[step]:.2e})"
                print(f"prompt {i}: near-tie divergence at step {step}")
                break


@pytest.mark.default_model
def test_default_model_tokenizer_matches_fixture(default_model):
    with open(os.path.join(FIXTURES, "smollm2_135m", "prompts.json")) as f:
        prompts = json.load(f)["prompts"]
    ref = np.load(os.path.join(FIXTURES, "smollm2_135m", "reference.npz"))
    for i, prompt in enumerate(prompts):
        ids = default_model.tokenizer.encode(prompt["text"], add_special_tokens=prompt["add_special_tokens"])
        assert ids == ref[f"input_ids_{i}"].tolist()
