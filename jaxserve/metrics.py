"""Engine counters and per-request latencies that the server exports (vLLM's metric set)."""

from __future__ import annotations

import collections
import dataclasses
import time


@dataclasses.dataclass
class EngineMetrics:
    """Cumulative counters plus recent per-request latencies (seconds, monotonic clock).

    Gauges (running, waiting, KV usage) are read live from the engine; prefix-cache counters from
    the KV cache manager.
    """

    num_requests: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    num_preemptions: int = 0
    finished: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    ttft: list[float] = dataclasses.field(default_factory=list)
    itl: list[float] = dataclasses.field(default_factory=list)
    e2e: list[float] = dataclasses.field(default_factory=list)
    queue_time: list[float] = dataclasses.field(default_factory=list)
    # Speculative decoding (vLLM's names): rows that carried drafts, their drafts, the drafts the
    # verifier accepted, and accepted drafts by position in the row (index 0: the first draft).
    spec_decode_num_drafts: int = 0
    spec_decode_num_draft_tokens: int = 0
    spec_decode_num_accepted_tokens: int = 0
    spec_decode_num_accepted_tokens_per_pos: list[int] = dataclasses.field(default_factory=list)

    def on_arrival(self, num_prompt_tokens: int) -> None:
        self.num_requests += 1
        self.prompt_tokens += num_prompt_tokens

    def on_first_scheduled(self, state, request) -> None:
        if state.metrics.first_scheduled_time is None:
            state.metrics.first_scheduled_time = time.monotonic()
            state.metrics.num_cached_tokens = max(request.num_cached_tokens, 0)
            self.queue_time.append(state.metrics.first_scheduled_time - state.metrics.arrival_time)

    def on_verified(self, num_drafts: int, num_accepted: int) -> None:
        """A row verified `num_drafts` drafts and accepted the first `num_accepted`."""
        self.spec_decode_num_drafts += 1
        self.spec_decode_num_draft_tokens += num_drafts
        self.spec_decode_num_accepted_tokens += num_accepted
        per_pos = self.spec_decode_num_accepted_tokens_per_pos
        per_pos.extend([0] * (num_drafts - len(per_pos)))
        for i in range(num_accepted):
            per_pos[i] += 1

    @property
    def spec_decode_mean_accepted_length(self) -> float | None:
        """Tokens per verified row: 1 + accepted drafts on average (None before any)."""
        if not self.spec_decode_num_drafts:
            return None
        return 1 + self.spec_decode_num_accepted_tokens / self.spec_decode_num_drafts

    def on_finished(self, state, finish_reason: str) -> None:
        m = state.metrics
        self.finished[finish_reason] += 1
        self.generation_tokens += m.num_generation_tokens
        if m.ttft is not None:
            self.ttft.append(m.ttft)
            if m.num_generation_tokens > 1 and m.last_token_time is not None:
                self.itl.append((m.last_token_time - m.first_token_time) / (m.num_generation_tokens - 1))
        if m.e2e is not None:
            self.e2e.append(m.e2e)


@dataclasses.dataclass
class StepStats:
    """Wall time between consecutive step results, split by whether the step held prefill."""

    steps: int = 0
    prefill_steps: int = 0
    decode_steps: int = 0
    prefill_time: float = 0.0
    decode_time: float = 0.0

    def add(self, seconds: float, had_prefill: bool) -> None:
        self.steps += 1
        if had_prefill:
            self.prefill_steps += 1
            self.prefill_time += seconds
        else:
            self.decode_steps += 1
            self.decode_time += seconds

    def reset(self) -> None:
        self.__init__()
