"""When a completion ends, and which of its text may be streamed (vLLM's stop rules).

Checked after each output token, in vLLM's order:
1. length: `max_tokens` output tokens, or prompt + output reaching `max_model_len` ("length",
   even when that last token is EOS, as in vLLM);
2. otherwise, once the output holds more than `min_tokens` tokens (the sampler bans stop ids
   before that): EOS unless `ignore_eos` ("stop", stop_reason None), then a `stop_token_ids` hit
   ("stop", stop_reason = the id); the stopping token stays in the output;
3. unless a stop token already ended it, and again only past `min_tokens`: a stop string in the
   detokenized text, searched where it could overlap the new token's text, so a string split
   across tokens is found. The text is cut before the string (after it with
   `include_stop_str_in_output`) and stop_reason is the string. A stop string overrides a length
   finish on the same token, as in vLLM; when several match, the earliest in the text wins.

`OutputTracker` puts detokenizer and checker together for one completion and holds back, while
streaming, the end of the text that could still grow into a stop string.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable, Sequence

from tokenizers import Tokenizer

from jaxserve.detokenizer import IncrementalDetokenizer
from jaxserve.sampling_params import SamplingParams

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_ABORT = "abort"


@dataclasses.dataclass(frozen=True)
class StopResult:
    """Why a completion finished, and its final text (cut at a stop string if one matched)."""

    finish_reason: str
    stop_reason: int | str | None
    text: str


class StopChecker:
    """vLLM's stop rules for one completion (see the module docstring)."""

    def __init__(
        self,
        params: SamplingParams,
        *,
        prompt_len: int,
        eos_token_ids: Collection[int] = (),
        max_model_len: int | None = None,
    ) -> None:
        self.params = params
        self.prompt_len = prompt_len
        self.eos_token_ids = frozenset(() if params.ignore_eos else eos_token_ids)
        self.stop_token_ids = frozenset(params.stop_token_ids)
        self.max_model_len = max_model_len

    def check(
        self, token_id: int, num_output_tokens: int, text: str, num_new_chars: int
    ) -> StopResult | None:
        """Whether the output ends with `token_id`, its `num_output_tokens`-th token.

        `text` is the whole output text so far, whose last `num_new_chars` came with this token.
        """
        length_capped = self._length_capped(num_output_tokens)
        past_min_tokens = num_output_tokens > self.params.min_tokens
        if past_min_tokens and not length_capped:
            if token_id in self.eos_token_ids:
                return StopResult(FINISH_STOP, None, text)
            if token_id in self.stop_token_ids:
                return StopResult(FINISH_STOP, token_id, text)
        if past_min_tokens and (match := self._find_stop_string(text, num_new_chars)):
            return match
        if length_capped:
            return StopResult(FINISH_LENGTH, None, text)
        return None

    def _length_capped(self, num_output_tokens: int) -> bool:
        max_tokens = self.params.max_tokens
        if max_tokens is not None and num_output_tokens >= max_tokens:
            return True
        return (self.max_model_len is not None
                and self.prompt_len + num_output_tokens >= self.max_model_len)

    def _find_stop_string(self, text: str, num_new_chars: int) -> StopResult | None:
        best = None
        for stop in self.params.stop:
            start = max(0, len(text) - num_new_chars - len(stop) + 1)
            index = text.find(stop, start)
            if index >= 0 and (best is None or index < best[0]):
                best = (index, stop)
        if best is None:
            return None
        index, stop = best
        end = index + len(stop) if self.params.include_stop_str_in_output else index
        return StopResult(FINISH_STOP, stop, text[:end])

    def held_back_chars(self, text: str) -> int:
        """Length of the longest end of `text` that begins some stop string (not yet streamable).

        Zero with `include_stop_str_in_output`: the stop string is output anyway.
        """
        if self.params.include_stop_str_in_output:
            return 0
        held = 0
        for stop in self.params.stop:
            for length in range(min(len(stop) - 1, len(text)), held, -1):
                if text.endswith(stop[:length]):
                    held = length
                    break
        return held


@dataclasses.dataclass(frozen=True)
class OutputDelta:
    """What one `OutputTracker` call adds: accepted token ids, streamable text, and the finish."""

    token_ids: list[int]
    text: str
    finish: StopResult | None


class OutputTracker:
    """One completion's tokens, text and finish; yields the text that is safe to stream.

    Tokens that arrive after the finish (async scheduling samples one step ahead) are dropped.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        eos_token_ids: Collection[int] = (),
        max_model_len: int | None = None,
    ) -> None:
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, params.skip_special_tokens)
        self.stop_checker = StopChecker(
            params, prompt_len=len(prompt_ids), eos_token_ids=eos_token_ids,
            max_model_len=max_model_len)
        self.token_ids: list[int] = []
        self.finish: StopResult | None = None
        self._num_streamed_chars = 0

    @property
    def finished(self) -> bool:
        return self.finish is not None

    @property
    def text(self) -> str:
        return self.finish.text if self.finish else self.detokenizer.text

    def add_tokens(self, token_ids: Iterable[int]) -> OutputDelta:
        """Append sampled tokens until one finishes the completion; return the delta."""
        accepted = []
        for token_id in token_ids:
            if self.finish:
                break
            token_id = int(token_id)
            accepted.append(token_id)
            self.token_ids.append(token_id)
            new_text = self.detokenizer.add_tokens([token_id])
            self.finish = self.stop_checker.check(
                token_id, len(self.token_ids), self.detokenizer.text, len(new_text))
        return OutputDelta(accepted, self._take_streamable_text(), self.finish)

    def abort(self) -> OutputDelta:
        """Finish with reason "abort" (unless already finished), flushing held-back text."""
        return self.finish_now(FINISH_ABORT)

    def finish_now(self, finish_reason: str) -> OutputDelta:
        """Finish with `finish_reason` and the text so far (unless already finished), flushing
        held-back text: an abort, or a structured output whose grammar is complete ("stop")."""
        if not self.finish:
            self.finish = StopResult(finish_reason, None, self.detokenizer.text)
        return OutputDelta([], self._take_streamable_text(), self.finish)

    def _take_streamable_text(self) -> str:
        text = self.text
        end = len(text) if self.finish else len(text) - self.stop_checker.held_back_chars(text)
        delta = text[self._num_streamed_chars : end]
        self._num_streamed_chars = max(self._num_streamed_chars, end)
        return delta
