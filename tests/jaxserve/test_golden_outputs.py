"""Golden greedy outputs: the token ids fixed layouts produced when they were recorded
(tests/fixtures/golden_outputs.json), compared token for token.

A tiny random-weight MoE model (tests/jaxserve/parallel_worker.py `GOLDEN_CASES`: one device,
EP=8 with both dispatch strategies, DP=2, DP x EP with dual-batch overlap, EPLB) on 8 fake CPU
devices in a subprocess, and the default model (SmolLM2) on one device. Regenerate only on
purpose, when outputs are meant to change:
    PYTHONPATH=. python -m tests.jaxserve.test_golden_outputs
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jaxserve.sampling_params import SamplingParams
from tests.helpers import run_parallel_worker

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "golden_outputs.json"
DEFAULT_MODEL_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
DEFAULT_MODEL_TOKENS = 32


def parallel_golden() -> dict:
    return run_parallel_worker("golden")["golden"]


def default_model_golden(llm) -> list[list[int]]:
    params = SamplingParams(max_tokens=DEFAULT_MODEL_TOKENS, temperature=0, ignore_eos=True)
    return [out.outputs[0].token_ids for out in llm.generate(DEFAULT_MODEL_PROMPTS, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def golden():
    with open(FIXTURE) as f:
        return json.load(f)


@pytest.mark.slow
def test_parallel_layouts_keep_their_golden_tokens(golden):
    got = parallel_golden()
    assert got.keys() == golden["parallel"].keys()
    for model, cases in golden["parallel"].items():
        assert got[model].keys() == cases.keys(), model
        for case, tokens in cases.items():
            assert got[model][case] == tokens, f"{model}/{case}"


@pytest.mark.default_model
def test_default_model_keeps_its_golden_tokens(golden, default_llm):
    assert default_model_golden(default_llm) == golden["default_model"]


if __name__ == "__main__":
    from jaxserve.llm import LLM
    from tests.conftest import DEFAULT_LLM_OPTIONS

    llm = LLM(**DEFAULT_LLM_OPTIONS)
    record = {"parallel": parallel_golden(), "default_model": default_model_golden(llm)}
    FIXTURE.write_text(json.dumps(record) + "\n")
    print(f"wrote {FIXTURE}")
