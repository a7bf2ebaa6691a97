"""How one chat completion's text becomes reasoning, content and tool calls, whole or streamed.

Reasoning comes first (`<think>...</think>`, with `--reasoning-parser`); tool calls are read from
the content that follows. Which calls:
- tool_choice "auto" (or unset, with tools): the tool parser's format (`--tool-call-parser`, or
  the one the chat template implies); without a parser the text stays content;
- "required" or a named function: the text was generated under `constrained_tool_schema`, so
  it *is* the calls (no reasoning is read: the constraint leaves no room for it);
- "none", or no tools: content only.
`parallel_tool_calls: false` keeps the first call. Streamed deltas add up to the whole parse.

gpt-oss (`harmony`, jaxserve/harmony.py) is split by its tokens, not its text: the analysis
channel is the reasoning, the final channel and commentary preambles the content, messages to
`functions.NAME` the calls (each whole, when its message ends)."""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxserve.harmony import Harmony
from server.openai.reasoning import ReasoningParser, ReasoningStream
from server.openai.tool_parsers import (ConstrainedCallStream, Delta, ToolCall, ToolCallStream, ToolParser,
                                        calls_from_constrained, new_call_id)


@dataclasses.dataclass(frozen=True)
class ChoiceText:
    """A whole completion, split."""

    reasoning: str | None
    content: str | None
    calls: list[ToolCall]


@dataclasses.dataclass
class ChoiceDelta:
    """What one piece of streamed text settles."""

    reasoning: str | None = None
    content: str | None = None
    calls: list[Delta] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.calls)


@dataclasses.dataclass(frozen=True)
class OutputRules:
    """The split a request asks for (one per request; `stream()` once per choice)."""

    reasoning: ReasoningParser | None = None
    opened: bool | None = None  # the prompt left a `<think>` open (ReasoningParser.opened_by)
    tool_parser: ToolParser | None = None  # tool_choice auto, with a parser
    tool_choice: str | dict[str, Any] | None = None  # "required" / named: constrained calls
    parallel_tool_calls: bool = True
    harmony: Harmony | None = None  # gpt-oss: split by channel

    def parse(self, text: str, token_ids: list[int] = ()) -> ChoiceText:
        if self.harmony is not None:
            split = self.harmony.parse(token_ids)
            return ChoiceText(split.reasoning, split.content,
                              self._kept([ToolCall(new_call_id(), c.name, c.arguments) for c in split.calls]))
        if self.tool_choice is not None:
            return ChoiceText(None, None, self._kept(calls_from_constrained(text, self.tool_choice)))
        reasoning, content = (None, text) if self.reasoning is None else self.reasoning.split(text, opened=self.opened)
        if self.tool_parser is None:
            return ChoiceText(reasoning, content or None, [])
        parsed = self.tool_parser.parse(content)
        return ChoiceText(reasoning, parsed.content, self._kept(parsed.calls))

    def stream(self) -> ChoiceStream:
        return ChoiceStream(self)

    def _kept(self, calls: list[ToolCall]) -> list[ToolCall]:
        return calls if self.parallel_tool_calls else calls[:1]


class ChoiceStream:
    """One choice's text, piece by piece: `feed` each piece, then `finish`."""

    def __init__(self, rules: OutputRules):
        self.rules = rules
        self.harmony = rules.harmony.stream() if rules.harmony is not None else None
        self._calls = 0
        self.constrained = ConstrainedCallStream(rules.tool_choice) if rules.tool_choice is not None else None
        self.reasoning: ReasoningStream | None = None
        if self.constrained is None and rules.reasoning is not None:
            self.reasoning = rules.reasoning.stream(opened=rules.opened)
        self.calls: ToolCallStream | None = None
        if self.constrained is None and rules.tool_parser is not None:
            self.calls = rules.tool_parser.stream()

    def feed(self, text: str, token_ids: list[int] = ()) -> ChoiceDelta:
        if self.harmony is not None:
            return self._harmony_delta(self.harmony.feed(token_ids))
        return self._step(text, final=False)

    def finish(self) -> ChoiceDelta:
        if self.harmony is not None:
            return self._harmony_delta(self.harmony.finish())
        return self._step("", final=True)

    def _harmony_delta(self, split) -> ChoiceDelta:
        calls = []
        for call in split.calls:
            calls.append(Delta(index=self._calls, id=new_call_id(), name=call.name, arguments=call.arguments))
            self._calls += 1
        return ChoiceDelta(split.reasoning, split.content, self._kept(calls))

    def _step(self, text: str, final: bool) -> ChoiceDelta:
        if self.constrained is not None:
            deltas = self.constrained.finish() if final else self.constrained.feed(text)
            return ChoiceDelta(calls=self._kept(deltas))
        reasoning, content = None, text
        if self.reasoning is not None:
            reasoning, content = self.reasoning.finish() if final else self.reasoning.feed(text)
        if self.calls is None:
            return ChoiceDelta(reasoning, content or None)
        deltas = self.calls.feed(content) if content else []
        if final:
            deltas += self.calls.finish()
        return ChoiceDelta(reasoning, "".join(d.content for d in deltas if d.content is not None) or None,
                           self._kept([d for d in deltas if d.index is not None]))

    def _kept(self, deltas: list[Delta]) -> list[Delta]:
        return deltas if self.rules.parallel_tool_calls else [d for d in deltas if d.index == 0]
