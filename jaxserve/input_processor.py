"""Prompts in every accepted form, checked before they reach the engine.

A prompt is a string, a list of token ids, or vLLM's dict form `{"prompt": ...}` /
`{"prompt_token_ids": [...]}` with an optional `"cache_salt"`. Every problem is a `ValueError`
naming the field, raised before the request enters the engine, so other requests carry on.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from jaxserve.sampling_params import SamplingParams

_PROMPT_KEYS = {"prompt", "prompt_token_ids", "cache_salt", "multi_modal_data"}


@dataclasses.dataclass
class ProcessedPrompt:
    text: str | None
    token_ids: list[int]
    cache_salt: str | None = None


def process_prompt(prompt: Any, tokenizer, *, vocab_size: int, max_model_len: int) -> ProcessedPrompt:
    """The prompt checked and tokenized; one already processed (by `EngineCore.check_inputs`, off
    the engine thread) passes as it is."""
    if isinstance(prompt, ProcessedPrompt):
        return prompt
    cache_salt = None
    if isinstance(prompt, dict):
        unknown = set(prompt) - _PROMPT_KEYS
        if unknown:
            raise ValueError(f"prompt has unknown keys {sorted(unknown)}; allowed: prompt, prompt_token_ids, cache_salt")
        cache_salt = prompt.get("cache_salt")
        if cache_salt is not None and not isinstance(cache_salt, str):
            raise ValueError(f"cache_salt must be a string, got {type(cache_salt).__name__}")
        if "prompt_token_ids" in prompt:
            prompt = list(prompt["prompt_token_ids"])
        elif "prompt" in prompt:
            prompt = prompt["prompt"]
        else:
            raise ValueError("prompt dict needs 'prompt' or 'prompt_token_ids'")
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("prompt must not be empty")
        text, ids = prompt, tokenizer.encode(prompt)
    elif isinstance(prompt, (list, tuple)):
        text, ids = None, list(prompt)
        for i, token in enumerate(ids):
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
                raise ValueError(
                    f"prompt_token_ids[{i}] = {token!r} is not a token id in [0, {vocab_size})")
    else:
        raise ValueError(f"prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")
    if not ids:
        raise ValueError("prompt must not be empty (prompt_token_ids has no tokens)")
    if len(ids) >= max_model_len:
        raise ValueError(
            f"prompt is {len(ids)} tokens long; with max_model_len {max_model_len} it must be at most "
            f"{max_model_len - 1} so that one token can be generated")
    return ProcessedPrompt(text, ids, cache_salt)


def check_sampling_params(params: Any, *, vocab_size: int, max_logprobs: int, max_n: int | None = None,
                          max_logit_bias: int | None = None, max_stop_token_ids: int | None = None
                          ) -> SamplingParams:
    if not isinstance(params, SamplingParams):
        raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
    params.validate(vocab_size=vocab_size, max_logprobs=max_logprobs, max_n=max_n, max_logit_bias=max_logit_bias,
                    max_stop_token_ids=max_stop_token_ids)
    return params


def check_priority(priority: Any) -> int:
    if isinstance(priority, bool) or not isinstance(priority, int):
        if not (isinstance(priority, float) and math.isfinite(priority) and priority == int(priority)):
            raise ValueError(f"priority must be an integer, got {priority!r}")
    return int(priority)
