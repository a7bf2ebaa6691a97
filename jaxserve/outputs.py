"""What `generate` returns, in vLLM's shapes."""

from __future__ import annotations

import dataclasses

from jaxserve import output_display


@dataclasses.dataclass
class Logprob:
    """One candidate token at one position: its logprob, its rank (1 = most likely) and text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One entry per position: token id -> Logprob (the top-k plus the actual token).
PositionLogprobs = dict[int, Logprob]


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length" or "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: list[PositionLogprobs] | None = None
    # The model's reasoning, apart from `text` (vLLM's name): gpt-oss's analysis channel through
    # `LLM.chat` (jaxserve/harmony.py); None for other models and plain prompts.
    reasoning_content: str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None

    def __repr__(self) -> str:  # long token lists and texts elided
        return output_display.completion_repr(self)

    def _repr_html_(self) -> str:  # Jupyter's rich display
        return output_display.completion_html(self)


@dataclasses.dataclass
class RequestMetrics:
    """Monotonic-clock timestamps (seconds) of one request's life."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_generation_tokens: int = 0

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0

    def __repr__(self) -> str:  # long token lists and texts elided; metrics as TTFT and e2e
        return output_display.request_repr(self)

    def _repr_html_(self) -> str:  # Jupyter's rich display: prompt, completions, timing
        return output_display.request_html(self)
