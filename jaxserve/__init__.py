"""jaxserve: an LLM serving engine in JAX and Pallas.

    from jaxserve import LLM, SamplingParams
    llm = LLM(model="smollm2-135m-instruct")
    llm.generate(["The capital of France is"], SamplingParams(max_tokens=16, temperature=0))
"""

from __future__ import annotations

import functools
from typing import Any

from jaxserve.config import EngineConfig
from jaxserve.outputs import CompletionOutput, Logprob, RequestOutput
from jaxserve.sampling_params import SamplingParams, StructuredOutputsParams

__all__ = ["LLM", "AsyncLLM", "EngineConfig", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput", "Logprob",
           "generate"]


def __getattr__(name: str):
    # Heavy imports (jax, the model code) wait until the engine is actually used.
    if name == "LLM":
        from jaxserve.llm import LLM

        return LLM
    if name == "AsyncLLM":
        from jaxserve.async_llm import AsyncLLM

        return AsyncLLM
    raise AttributeError(name)


@functools.lru_cache(maxsize=2)
def _cached_llm(model: str, options: tuple) -> Any:
    from jaxserve.llm import LLM

    return LLM(model, compile_at_startup=False, **dict(options))


def generate(prompt: str, *, model: str = "smollm2-135m-instruct", engine_options: dict | None = None,
             **sampling: Any) -> str:
    """One-call helper for notebooks: greedy unless `temperature` is given; returns the text.
    The engine is kept (per model and options) so later calls start at once."""
    sampling.setdefault("temperature", 0.0)
    llm = _cached_llm(model, tuple(sorted((engine_options or {}).items())))
    return llm.generate([prompt], SamplingParams(**sampling), use_tqdm=False)[0].outputs[0].text
