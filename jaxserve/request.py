"""One request as the scheduler and the KV cache manager see it: token ids and progress counters.

`num_tokens` counts the token ids the host knows (prompt, then output). Under async scheduling
the device may have sampled more: `num_output_placeholders` counts tokens scheduled to be sampled
whose ids have not reached the host yet (vLLM #23569). The scheduler aims every request at
`num_tokens + num_output_placeholders` computed tokens; see `jaxserve/scheduler.py`.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from typing import Any


class RequestStatus(enum.IntEnum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    WAITING_FOR_KV = enum.auto()  # holds blocks a KV connector is loading; see jaxserve/kv/connector.py
    # Everything after this point is a finished state.
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH_CAPPED = enum.auto()
    FINISHED_ABORTED = enum.auto()

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        """vLLM's finish reason string ("stop", "length", "abort"), None while unfinished."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH_CAPPED: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


@dataclasses.dataclass(eq=False)
class Request:
    """A request's host-side state.

    `sampling_params` is carried for the engine and never read here: the scheduler needs only
    `max_tokens`, and the KV cache manager only `cache_salt` and `skip_prefix_cache` (set it for
    requests asking for prompt logprobs, whose positions must all be computed).
    """

    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    sampling_params: Any = None
    arrival_time: float = dataclasses.field(default_factory=time.monotonic)
    priority: int = 0  # lower is served first, as in vLLM
    cache_salt: str | None = None
    skip_prefix_cache: bool = False

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is written (or will be by the steps in flight)
    num_output_placeholders: int = 0  # tokens sampled on device, ids not yet on the host
    num_cached_tokens: int = -1  # prefix-cache hit at the first schedule; -1 until then
    num_preemptions: int = 0
    paused: bool = False  # not scheduled while set (its consumer stopped reading; EngineCore.pause_request)
    # Draft tokens to verify after the last known token (speculative decoding), set by the engine's
    # proposer and consumed by the next schedule (jaxserve/scheduler.py, "Speculative decoding").
    spec_token_ids: list[int] = dataclasses.field(default_factory=list)
    # Hash of each full block of known tokens, filled lazily by the KV cache manager.
    block_hashes: list[bytes] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError(f"prompt_token_ids must not be empty (request {self.request_id!r})")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        self.prompt_token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Known token ids: prompt plus output (placeholders excluded)."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids(self, start: int, stop: int) -> list[int]:
        """Known token ids in positions [start, stop), without building the whole list."""
        num_prompt = len(self.prompt_token_ids)
        if stop <= num_prompt:
            return self.prompt_token_ids[start:stop]
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt: stop - num_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[: stop - num_prompt]

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished
