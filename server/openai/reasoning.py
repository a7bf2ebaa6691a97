"""Reasoning text (`<think>...</think>`, as Qwen3, QwQ and DeepSeek-R1 write it) split from a
completion's content, whole (`ReasoningParser.split`) or streamed (`ReasoningParser.stream`).

Rule, for a completion `text` (`opened` says whether the prompt already opened the reasoning,
as templates that end the generation prompt with `<think>` do; `opened_by(prompt)` tells):
- `text` starts (after whitespace) with `<think>`: reasoning runs to `</think>`, or to the end
  of the text if the model stopped thinking early (truncated thinking).
- else, if `opened` is True, or `opened` is None (unknown) and `</think>` occurs: reasoning is
  the text up to `</think>` (all of it when there is none).
- else there is no reasoning: the text is all content, unchanged.
Reasoning is stripped of surrounding whitespace (None when empty); content, after `</think>`,
loses its leading whitespace.

Streaming follows the same rule exactly. With `opened=None`, text that does not start with
`<think>` is held back until `</think>` or the end decides which side it is on: pass `opened`
(from `opened_by(prompt)`) to stream it at once.
"""

from __future__ import annotations

from server.openai.tool_parsers import SpaceTrimmer, marker_prefix_length


class ReasoningStream:
    """Reasoning and content from text that arrives in pieces: `feed` each piece, then `finish`.
    Each returns (reasoning delta, content delta), None where there is nothing new."""

    def __init__(self, start: str, end: str, opened: bool | None):
        self.start, self.end, self.opened = start, end, opened
        self._buffer = ""
        self._state = "start"  # start -> reasoning | undecided | content
        self._searched = 0  # undecided: `end` does not start before this index of the buffer
        self._reasoning = SpaceTrimmer()  # reasoning is stripped
        self._content_leading = True  # content after `end` loses its leading whitespace
        self._finished = False

    def feed(self, delta_text: str) -> tuple[str | None, str | None]:
        """The (reasoning, content) text that `delta_text` settles."""
        if self._finished:
            raise ValueError("feed after finish: this stream has ended")
        self._buffer += delta_text
        return self._advance(final=False)

    def finish(self) -> tuple[str | None, str | None]:
        """The (reasoning, content) text still held back, at the end of the text."""
        if self._finished:
            return None, None
        self._finished = True
        return self._advance(final=True)

    def _advance(self, final: bool) -> tuple[str | None, str | None]:
        reasoning = content = ""
        if self._state == "start":
            self._decide_start(final)
        if self._state == "undecided":
            found = self._buffer.find(self.end, self._searched)
            if found >= 0:
                self._state = "reasoning"
            elif final:
                self._state, self._content_leading = "content", False
            else:
                self._searched = max(0, len(self._buffer) - len(self.end) + 1)
        if self._state == "reasoning":
            found = self._buffer.find(self.end)
            if found < 0:
                keep = 0 if final else marker_prefix_length(self._buffer, (self.end,))
                reasoning = self._reasoning(self._buffer[:len(self._buffer) - keep])
                self._buffer = self._buffer[len(self._buffer) - keep:]
            else:
                reasoning = self._reasoning(self._buffer[:found])
                self._buffer, self._reasoning.held = self._buffer[found + len(self.end):], ""
                self._state = "content"
        if self._state == "content":
            if self._content_leading:
                self._buffer = self._buffer.lstrip()
                self._content_leading = not self._buffer
            content, self._buffer = self._buffer, ""
        return reasoning or None, content or None

    def _decide_start(self, final: bool) -> None:
        rest = self._buffer.lstrip()
        if rest.startswith(self.start):
            self._buffer, self._state = rest[len(self.start):], "reasoning"
        elif not final and (not rest or self.start.startswith(rest)):
            return
        elif self.opened is True:
            self._state = "reasoning"
        elif self.opened is None and not final:
            self._state = "undecided"
        elif self.opened is None and self.end in self._buffer:
            self._state = "reasoning"
        else:
            self._state, self._content_leading = "content", False


class ReasoningParser:
    """Splits `<think>` reasoning (tags configurable) from content; see the module rule."""

    def __init__(self, start: str = "<think>", end: str = "</think>"):
        if not start or not end:
            raise ValueError(f"reasoning tags must be non-empty, got start={start!r} end={end!r}")
        self.start, self.end = start, end

    def opened_by(self, prompt: str) -> bool:
        """Whether `prompt` (the rendered generation prompt) leaves the reasoning open."""
        return prompt.rstrip().endswith(self.start)

    def split(self, text: str, *, opened: bool | None = None) -> tuple[str | None, str]:
        """(reasoning or None, content) of a whole completion."""
        rest = text.lstrip()
        if rest.startswith(self.start):
            inside = rest[len(self.start):]
        elif opened is True or (opened is None and self.end in text):
            inside = text
        else:
            return None, text
        reasoning, _, content = inside.partition(self.end)
        return reasoning.strip() or None, content.lstrip()

    def stream(self, *, opened: bool | None = None) -> ReasoningStream:
        """A stream for one completion's text, piece by piece."""
        return ReasoningStream(self.start, self.end, opened)


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    "think": ReasoningParser, "qwen3": ReasoningParser, "deepseek_r1": ReasoningParser}


def choose_reasoning_parser(name: str | None) -> type[ReasoningParser] | None:
    """The parser named `name` (`--reasoning-parser`; vLLM's "qwen3" and "deepseek_r1" name the
    same `<think>` rule), or None for no reasoning parsing."""
    if name is None:
        return None
    if name not in REASONING_PARSERS:
        raise ValueError(f"reasoning_parser must be one of {', '.join(REASONING_PARSERS)}, "
                         f"got {name!r}")
    return REASONING_PARSERS[name]
