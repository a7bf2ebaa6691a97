"""The parity fixtures (tests/fixtures/parity) served through `LLM.generate`: loading one with a
word-level tokenizer, a small chunked-prefill engine, and the checks every served family runs
against transformers' logits and greedy continuations."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxserve.llm import LLM
from jaxserve.sampling_params import SamplingParams
from models.config import ModelConfig
from models.loader import LoadedModel
from models.registry import kv_spec
from models.tokenizer import Tokenizer
from models.weights import iter_safetensors, load_state
from tests.engine_utils import tiny_engine_config

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "parity"


def fixture(name: str):
    """(LoadedModel, reference.npz) of a parity fixture."""
    folder = FIXTURES / name
    config = ModelConfig.from_folder(folder)
    model = load_state(config, iter_safetensors(folder))
    loaded = LoadedModel(model=model, config=config, tokenizer=Tokenizer.word_level(config.vocab_size, eos_id=2),
                         generation_config={}, source=f"fixture-{name}", name=name)
    return loaded, np.load(folder / "reference.npz")


def prompts_of(ref) -> list[list[int]]:
    return [ref[f"input_ids_{i}"].tolist() for i in range(int(ref["num_prompts"]))]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def engine(loaded, **options) -> LLM:
    """16-token steps (a 40-token prompt is prefilled in chunks), 4-token blocks."""
    defaults = dict(max_num_batched_tokens=16, token_buckets=(16,), request_buckets=(4, 8), max_num_seqs=8,
                    max_model_len=128)
    return LLM(config=tiny_engine_config(**{**defaults, **options}), loaded=loaded)


def check_generate_matches_transformers(name: str, loaded, ref) -> None:
    """Prompt logprobs within 1e-4 (absolute) and 16 greedy tokens equal to transformers', through
    chunked prefill; then the same prompts again (prefix-cache hits) and with n = 2."""
    llm = engine(loaded)
    prompts = prompts_of(ref)
    params = dict(max_tokens=16, temperature=0, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(**params, prompt_logprobs=3),
                           use_tqdm=False)
    worst = 0.0
    for i, (prompt, out) in enumerate(zip(prompts, outputs)):
        expected = log_softmax(ref[f"logits_{i}"])
        assert out.prompt_logprobs[0] is None
        for pos, entry in enumerate(out.prompt_logprobs[1:], start=1):
            assert prompt[pos] in entry
            for token, logprob in entry.items():
                worst = max(worst, abs(logprob.logprob - expected[pos - 1, token]))
        assert out.outputs[0].token_ids == ref[f"greedy_{i}"].tolist(), f"{name}: prompt {i}"
    assert worst < 1e-4, worst

    hits_before = llm.engine.kv_manager.prefix_cache_hits
    again = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(**params, n=2), use_tqdm=False)
    assert llm.engine.kv_manager.prefix_cache_hits - hits_before >= sum(len(p) // 4 * 4 - 4 for p in prompts)
    for i, out in enumerate(again):
        assert [c.token_ids for c in out.outputs] == [ref[f"greedy_{i}"].tolist()] * 2, f"{name}: prompt {i}"


def check_preemption_keeps_greedy_outputs(loaded, ref) -> None:
    """A cache of 24 four-token blocks for 6 sequences of up to 56 tokens: requests are preempted
    and recomputed, and every output still equals transformers'."""
    prompts = prompts_of(ref)
    per_block = kv_spec(loaded.config).bytes_per_token(jnp.float32) * 4
    llm = engine(loaded, kv_cache_memory_bytes=24 * per_block, enable_prefix_caching=False, max_model_len=64)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts * 2],
                           SamplingParams(max_tokens=16, temperature=0, ignore_eos=True), use_tqdm=False)
    assert llm.engine.metrics.num_preemptions > 0
    for i, out in enumerate(outputs):
        assert out.outputs[0].token_ids == ref[f"greedy_{i % 3}"].tolist(), i
