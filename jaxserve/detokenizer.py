"""Incremental detokenization: the text each new token adds, never half a character.

vLLM's offset method, which works with any `tokenizers.Tokenizer` version and decoder: decode a
short window of tokens twice, once ending before the new token (`prefix_offset:read_offset`) and
once including it (`prefix_offset:`); the new text is the difference. Decoding a window rather
than single tokens keeps what decoders do at word starts (SentencePiece's leading space, for
instance) the same in both decodes. While the window ends inside a multi-byte UTF-8 character the
decoder yields U+FFFD at the end, and nothing is emitted until a later token completes it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer

# Prompt tokens kept as left context for the first output token (vLLM uses 5 as well).
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """The output text of one completion, grown a token at a time.

    `add_tokens(ids)` returns the text those tokens complete; `text` is everything so far and
    `token_ids` the output ids (the prompt is context only, never part of `text`).
    """

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = True
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = list(prompt_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._ids = context
        self._num_context = len(context)
        self._prefix_offset = 0
        self._read_offset = len(context)
        self.text = ""

    @property
    def token_ids(self) -> list[int]:
        return self._ids[self._num_context :]

    def add_tokens(self, token_ids: Iterable[int]) -> str:
        """Append `token_ids`; return the text they add (possibly empty)."""
        delta = "".join(self._add_token(token_id) for token_id in token_ids)
        self.text += delta
        return delta

    def _add_token(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :]

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=self.skip_special_tokens)
