"""The pieces of OpenAI's response objects that several endpoints build: usage and logprobs.

Logprobs arrive from the engine in vLLM's shape, one dict per position from token id to
`Logprob(logprob, rank, decoded_token)` holding the top-k and the sampled token; OpenAI's shapes
list the sampled token and the k best, in rank order."""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxserve.outputs import Logprob, PositionLogprobs


@dataclasses.dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def chat(self) -> dict[str, Any]:
        """Completions and chat completions: prompt, completion and total tokens."""
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}

    def responses(self) -> dict[str, Any]:
        """The Responses API's names."""
        return {"input_tokens": self.prompt_tokens, "input_tokens_details": {"cached_tokens": self.cached_tokens},
                "output_tokens": self.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.prompt_tokens + self.completion_tokens}


def _top(position: PositionLogprobs, k: int) -> list[tuple[int, Logprob]]:
    ranked = sorted(position.items(), key=lambda item: item[1].rank if item[1].rank is not None else 1 << 30)
    return [(token_id, logprob) for token_id, logprob in ranked if logprob.rank is not None and logprob.rank <= k][:k]


def _text(logprob: Logprob | None, token_id: int, tokenizer) -> str:
    if logprob is not None and logprob.decoded_token is not None:
        return logprob.decoded_token
    return tokenizer.decode([token_id], skip_special_tokens=False)


class CompletionLogprobs:
    """OpenAI's completions logprobs (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`)
    built up position by position; `text_offset` counts characters from the choice's start."""

    def __init__(self, k: int, tokenizer):
        self.k, self.tokenizer, self.offset = k, tokenizer, 0

    def add(self, token_ids: list[int], positions: list[PositionLogprobs | None]) -> dict[str, list]:
        """The logprobs object of these positions (a position None: the prompt's first token)."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token_id, position in zip(token_ids, positions):
            chosen = position.get(token_id) if position is not None else None
            text = _text(chosen, token_id, self.tokenizer)
            out["tokens"].append(text)
            out["token_logprobs"].append(None if chosen is None else chosen.logprob)
            out["top_logprobs"].append(None if position is None else {
                _text(lp, tid, self.tokenizer): lp.logprob for tid, lp in _top(position, self.k)})
            out["text_offset"].append(self.offset)
            self.offset += len(text)
        return out


def merge_completion_logprobs(parts: list[dict[str, list]]) -> dict[str, list] | None:
    if not parts:
        return None
    return {key: [value for part in parts for value in part[key]] for key in parts[0]}


def chat_logprobs(token_ids: list[int], positions: list[PositionLogprobs], k: int, tokenizer) -> list[dict]:
    """Chat's `logprobs.content` entries: token, logprob, bytes and the k best."""
    entries = []
    for token_id, position in zip(token_ids, positions):
        chosen = position[token_id]
        text = _text(chosen, token_id, tokenizer)
        entries.append({"token": text, "logprob": chosen.logprob, "bytes": list(text.encode()),
                        "top_logprobs": [{"token": (t := _text(lp, tid, tokenizer)), "logprob": lp.logprob,
                                          "bytes": list(t.encode())} for tid, lp in _top(position, k)]})
    return entries
