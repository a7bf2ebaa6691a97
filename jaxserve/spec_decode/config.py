"""`speculative_config`: vLLM's dict (or its JSON text, from `--speculative-config`), validated.

    LLM(..., speculative_config={"method": "ngram", "num_speculative_tokens": 3,
                                 "prompt_lookup_min": 2, "prompt_lookup_max": 4})

Methods (vLLM's names): "ngram" (prompt lookup over the request's own tokens, on the host),
"draft_model" (`"model": path`, a smaller model with the same tokenizer), "eagle3" (`"model"`:
an EAGLE-3 head's folder, models/eagle3.py) and "mtp" (the target's own DeepSeek MTP layer).
Imports no jax.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxserve.json_object import json_object

METHODS = ("ngram", "draft_model", "eagle3", "mtp")
BUILT_METHODS = METHODS
# vLLM's defaults when neither bound is given; one bound given sets the other to it.
DEFAULT_PROMPT_LOOKUP = 5
MAX_SPECULATIVE_TOKENS = 16  # a row scores 1 + k positions: the step's shapes grow with k


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    """A validated `speculative_config`."""

    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int | None = None  # ngram: shortest suffix matched
    prompt_lookup_max: int | None = None  # ngram: longest suffix matched
    model: str | None = None  # draft_model / eagle3: the draft checkpoint (eagle3: the head's folder)

    @classmethod
    def parse(cls, value: Any) -> SpeculativeConfig | None:
        """From a dict, its JSON text, or a `SpeculativeConfig`; None and {} mean off. Raises
        ValueError naming the field."""
        if value is None or isinstance(value, cls):
            return value
        value = json_object(value, "speculative_config")
        if not value:
            return None
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - fields)
        if unknown:
            raise ValueError(f"speculative_config has unknown field(s) {', '.join(map(repr, unknown))}; "
                             f"allowed: {', '.join(sorted(fields))}")
        if "method" not in value:
            raise ValueError(f"speculative_config.method is required: one of {', '.join(map(repr, METHODS))}")
        if "num_speculative_tokens" not in value:
            raise ValueError("speculative_config.num_speculative_tokens is required (an integer >= 1)")
        return cls(**value)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative_config.method must be one of {', '.join(map(repr, METHODS))}, "
                             f"got {self.method!r}")
        if self.method not in BUILT_METHODS:
            raise ValueError(f"speculative_config.method {self.method!r} is not implemented in this build "
                             f"(implemented: {', '.join(map(repr, BUILT_METHODS))})")
        k = self.num_speculative_tokens
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"speculative_config.num_speculative_tokens must be an integer in "
                             f"[1, {MAX_SPECULATIVE_TOKENS}], got {k!r}")
        if self.method == "ngram":
            self._check_lookup()
        elif self.model is None and self.method in ("draft_model", "eagle3"):
            raise ValueError(f"speculative_config.model is required for method {self.method!r}")

    def _check_lookup(self) -> None:
        low, high = self.prompt_lookup_min, self.prompt_lookup_max
        if low is None and high is None:
            low = high = DEFAULT_PROMPT_LOOKUP
        low, high = (high if low is None else low), (low if high is None else high)
        for name, value in (("prompt_lookup_min", low), ("prompt_lookup_max", high)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"speculative_config.{name} must be an integer >= 1, got {value!r}")
        if low > high:
            raise ValueError(f"speculative_config.prompt_lookup_min ({low}) must be <= prompt_lookup_max ({high})")
        object.__setattr__(self, "prompt_lookup_min", low)
        object.__setattr__(self, "prompt_lookup_max", high)

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
