"""Sampling parameters of one request, with vLLM's field names, defaults and checks.

Every field the user leaves out keeps a sentinel until `__post_init__` resolves it to its default,
so the object knows which fields were set explicitly (`explicit_fields`). That lets
`apply_generation_config` fill only the unset fields from a model's `generation_config.json`,
as vLLM does. Note that `dataclasses.replace` passes every field again, so its result counts all
fields as explicit.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from typing import Any

# Temperatures below this are greedy (vLLM's _SAMPLING_EPS).
GREEDY_TEMPERATURE_EPS = 1e-5


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


_UNSET: Any = _Unset()

_DEFAULTS: dict[str, Any] = dict(
    n=1,
    temperature=1.0,
    top_p=1.0,
    top_k=0,
    min_p=0.0,
    seed=None,
    stop=None,
    stop_token_ids=None,
    ignore_eos=False,
    max_tokens=16,
    min_tokens=0,
    logprobs=None,
    prompt_logprobs=None,
    presence_penalty=0.0,
    frequency_penalty=0.0,
    repetition_penalty=1.0,
    logit_bias=None,
    include_stop_str_in_output=False,
    skip_special_tokens=True,
    structured_outputs=None,
)

# generation_config.json key -> SamplingParams field (the keys vLLM reads).
_GENERATION_CONFIG_FIELDS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


@dataclasses.dataclass(frozen=True)
class StructuredOutputsParams:
    """A constraint the completion follows (vLLM's names); give exactly one of:

    - `json`: a JSON schema (a dict, or its JSON text) the completion validates against;
    - `regex`: a regular expression the whole completion matches;
    - `choice`: a list of strings, the completion is one of them;
    - `grammar`: a grammar in Lark syntax (llguidance's dialect; `%json {...}` embeds a schema),
      or in GBNF (llama.cpp's), which llguidance converts;
    - `json_object=True`: any JSON object.

    The engine compiles it (jaxserve/structured_output.py) when the request is admitted: a
    constraint that cannot compile is a ValueError naming the field, before anything runs."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self) -> None:
        given = [name for name in _CONSTRAINTS if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"structured_outputs must set exactly one of {', '.join(_CONSTRAINTS)}, "
                             f"got {', '.join(given) or 'none'}")
        if self.json is not None and not isinstance(self.json, (str, dict)):
            raise ValueError(f"structured_outputs.json must be a JSON schema (dict or str), got {type(self.json).__name__}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string, got {value!r}")
        if self.choice is not None:
            if not isinstance(self.choice, (list, tuple)) or not self.choice or not all(
                    isinstance(c, str) and c for c in self.choice):
                raise ValueError(f"structured_outputs.choice must be a non-empty list of non-empty strings, "
                                 f"got {self.choice!r}")
            object.__setattr__(self, "choice", list(self.choice))
        if self.json_object is not None and not isinstance(self.json_object, bool):
            raise ValueError(f"structured_outputs.json_object must be a bool, got {self.json_object!r}")

    @property
    def kind(self) -> str:
        """The constraint given: "json", "regex", "choice", "grammar" or "json_object"."""
        return next(name for name in _CONSTRAINTS if getattr(self, name) not in (None, False))


_CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object")


@dataclasses.dataclass
class SamplingParams:
    """How to sample one request's completion (vLLM's `SamplingParams`).

    `stop` becomes a list of strings, `stop_token_ids` a list of ints, `logit_bias` a dict from int
    token id to float, and `top_k=-1` becomes 0 (both mean "off"). `max_tokens=None` means "until
    the model's context is full". Construction runs `validate()`; the engine calls
    `validate(vocab_size=...)` again to check token ids against the vocabulary.
    """

    n: int = _UNSET
    temperature: float = _UNSET
    top_p: float = _UNSET
    top_k: int = _UNSET
    min_p: float = _UNSET
    seed: int | None = _UNSET
    stop: str | list[str] | None = _UNSET
    stop_token_ids: list[int] | None = _UNSET
    ignore_eos: bool = _UNSET
    max_tokens: int | None = _UNSET
    min_tokens: int = _UNSET
    logprobs: int | None = _UNSET
    prompt_logprobs: int | None = _UNSET
    presence_penalty: float = _UNSET
    frequency_penalty: float = _UNSET
    repetition_penalty: float = _UNSET
    logit_bias: dict[int, float] | None = _UNSET
    include_stop_str_in_output: bool = _UNSET
    skip_special_tokens: bool = _UNSET
    structured_outputs: StructuredOutputsParams | None = _UNSET
    explicit_fields: frozenset[str] = dataclasses.field(
        init=False, repr=False, compare=False, default=frozenset()
    )

    def __post_init__(self) -> None:
        explicit = set()
        for name, default in _DEFAULTS.items():
            if getattr(self, name) is _UNSET:
                setattr(self, name, default)
            else:
                explicit.add(name)
        self.explicit_fields = frozenset(explicit)
        self._normalize()
        self.validate()

    def _normalize(self) -> None:
        """Containers to their canonical form; a value of the wrong kind is a ValueError naming
        its field (not a TypeError from deep inside)."""
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        elif isinstance(self.stop, (list, tuple)):
            self.stop = list(self.stop)
        else:
            raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}")
        if self.stop_token_ids is not None and not isinstance(self.stop_token_ids, (list, tuple)):
            raise ValueError(f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}")
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        if isinstance(self.structured_outputs, Mapping):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        elif self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ValueError("structured_outputs must be a StructuredOutputsParams (or a dict of its fields), "
                             f"got {self.structured_outputs!r}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ValueError(f"logit_bias must be a dict from token id to bias, got {self.logit_bias!r}")
            self.logit_bias = {_token_id_key(k): v for k, v in self.logit_bias.items()}

    @property
    def greedy(self) -> bool:
        """True when this request samples the argmax (temperature below 1e-5, like vLLM)."""
        return self.temperature < GREEDY_TEMPERATURE_EPS

    @property
    def uses_penalties(self) -> bool:
        """True when a presence, frequency or repetition penalty changes the logits."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    def validate(self, vocab_size: int | None = None, max_logprobs: int | None = None,
                 max_n: int | None = None, max_logit_bias: int | None = None,
                 max_stop_token_ids: int | None = None) -> None:
        """Raise `ValueError` naming the first bad field and its allowed range.

        With `vocab_size`, token ids (`stop_token_ids`, `logit_bias` keys) must lie in
        [0, vocab_size); `logprobs` / `prompt_logprobs` must not exceed `max_logprobs` (the
        engine's cap, like vLLM's `max_logprobs`) nor `vocab_size`. With `max_n`, `n` must not
        exceed it (the engine's `max_n`); with `max_logit_bias` / `max_stop_token_ids`, neither may
        the number of `logit_bias` entries and `stop_token_ids` (the width of the engine's
        on-device bias table).
        """
        _check_int("n", self.n, low=1, high=max_n, hint=" (the engine's max_n)" if max_n else "")
        _check_float("temperature", self.temperature, low=0.0)
        _check_float("top_p", self.top_p, low=0.0, low_open=True, high=1.0)
        _check_int("top_k", self.top_k, low=0, hint=" (0 or -1 disables top-k)")
        _check_float("min_p", self.min_p, low=0.0, high=1.0)
        _check_float("presence_penalty", self.presence_penalty, low=-2.0, high=2.0)
        _check_float("frequency_penalty", self.frequency_penalty, low=-2.0, high=2.0)
        _check_float("repetition_penalty", self.repetition_penalty, low=0.0, low_open=True)
        if self.seed is not None:
            _check_int("seed", self.seed, low=-(2**63), high=2**64 - 1)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, low=1)
        _check_int("min_tokens", self.min_tokens, low=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}"
            )
        caps = [cap for cap in (vocab_size, max_logprobs) if cap is not None]
        max_logprobs = min(caps) if caps else None
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), low=0, high=max_logprobs)
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        for stop in self.stop:
            if not isinstance(stop, str) or not stop:
                raise ValueError(f"stop must be a non-empty string or a list of them, got {stop!r}")
        for name, cap in (("logit_bias", max_logit_bias), ("stop_token_ids", max_stop_token_ids)):
            count = len(getattr(self, name) or ())
            if cap is not None and count > cap:
                raise ValueError(f"{name} must have at most {cap} entries (the engine's max_{name}), got {count}")
        high = None if vocab_size is None else vocab_size - 1
        for token_id in self.stop_token_ids:
            _check_int("stop_token_ids", token_id, low=0, high=high)
        for token_id, bias in (self.logit_bias or {}).items():
            _check_int("logit_bias", token_id, low=0, high=high, what="keys (token ids)")
            _check_float("logit_bias", bias, what="values")

    def with_stop_token_ids(self, token_ids) -> SamplingParams:
        """A copy that also stops at `token_ids` (a chat format's end-of-turn tokens); the other
        fields keep whether they were set."""
        kwargs = {name: getattr(self, name) for name in self.explicit_fields}
        kwargs["stop_token_ids"] = list(self.stop_token_ids) + [t for t in token_ids if t not in self.stop_token_ids]
        return SamplingParams(**kwargs)

    def apply_generation_config(self, generation_config: Mapping[str, Any]) -> SamplingParams:
        """A copy where fields the user left unset take the model's `generation_config.json` values.

        Reads the keys vLLM reads: temperature, top_p, top_k, min_p, repetition_penalty and
        max_new_tokens (as max_tokens). Explicitly set fields are kept, even when equal to the
        default. The result counts the filled fields as explicit.
        """
        kwargs = {name: getattr(self, name) for name in self.explicit_fields}
        for key, name in _GENERATION_CONFIG_FIELDS.items():
            if name not in self.explicit_fields and generation_config.get(key) is not None:
                kwargs[name] = generation_config[key]
        return SamplingParams(**kwargs)


def _token_id_key(key: Any) -> Any:
    """JSON object keys arrive as strings; accept "123" as token id 123."""
    if isinstance(key, str) and key.strip().lstrip("-").isdigit():
        return int(key)
    return key


def _range_text(low, high, low_open: bool) -> str:
    if high is None:
        return f"{'>' if low_open else '>='} {low}"
    if low is None:
        return f"<= {high}"
    return f"in {'(' if low_open else '['}{low}, {high}]"


def _check_int(name: str, value, *, low=None, high=None, hint: str = "", what: str = "") -> None:
    label = f"{name} {what}".strip()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        allowed = _range_text(low, high, False)
        raise ValueError(f"{label} must be an integer {allowed}, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{label} must be {_range_text(low, high, False)}{hint}, got {value}")


def _check_float(
    name: str, value, *, low=None, high=None, low_open: bool = False, what: str = ""
) -> None:
    label = f"{name} {what}".strip()
    bounded = low is not None or high is not None
    allowed = _range_text(low, high, low_open) if bounded else "a finite number"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{label} must be a number{' ' + allowed if bounded else ''}, got {value!r} "
                         f"({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{label} must be {allowed}, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    if too_low or (high is not None and value > high):
        raise ValueError(f"{label} must be {allowed}, got {value}")
