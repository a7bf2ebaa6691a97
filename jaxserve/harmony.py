"""OpenAI's Harmony chat format (gpt-oss), through the `openai-harmony` package.

gpt-oss chats are rendered by the package, not by a jinja template: a system message (model
identity, reasoning effort, the channels), a developer message (the conversation's system and
developer instructions, its function tools), then the turns, ending with `<|start|>assistant`.
The model answers in channels: `analysis` (its reasoning, our `reasoning_content`), `commentary`
(a function call when addressed `to=functions.NAME`, else a preamble, which is content) and
`final` (the answer, our `text`). `<|return|>` ends the turn with an answer and `<|call|>` with
a call: both are the request's stop tokens. `HarmonyStream` splits tokens as they arrive;
`Harmony.parse` splits a whole completion, and equals any streamed split of it.

Output that never opens a message (a model that does not speak Harmony) is kept whole as
content, once the completion ends. The package needs the o200k_base vocabulary: it downloads it
once, or reads it from `TIKTOKEN_ENCODINGS_BASE` (a folder with `o200k_base.tiktoken`) offline.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Iterable, Sequence
from typing import Any

HARMONY_ARCHITECTURES = ("GptOssForCausalLM",)
REASONING_EFFORTS = ("low", "medium", "high")


def uses_harmony(architecture: str) -> bool:
    return architecture in HARMONY_ARCHITECTURES


@functools.cache
def _encoding():
    import openai_harmony as oh

    try:
        return oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)
    except Exception as exc:  # noqa: BLE001 - the package's load error names no remedy
        raise RuntimeError(
            "openai-harmony could not load the o200k_base vocabulary it renders gpt-oss chats with "
            f"({exc}); without network, set TIKTOKEN_ENCODINGS_BASE to a folder holding "
            "o200k_base.tiktoken") from None


@dataclasses.dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str


@dataclasses.dataclass
class HarmonyText:
    """A completion split by channel (None where a part is empty)."""

    reasoning: str | None = None
    content: str | None = None
    calls: list[ToolCall] = dataclasses.field(default_factory=list)


class Harmony:
    """Renders chats and splits completions for one model (gpt-oss)."""

    @property
    def encoding(self):
        """The package's gpt-oss encoding, loaded on first use (RuntimeError naming the remedy offline)."""
        return _encoding()

    @property
    def stop_token_ids(self) -> list[int]:
        """`<|return|>` and `<|call|>`: the assistant's turn ends at either."""
        return list(self.encoding.stop_tokens_for_assistant_actions())

    def render(self, messages: Sequence[dict[str, Any]], *, reasoning_effort: str | None = None,
               tools: Sequence[dict[str, Any]] | None = None, model_identity: str | None = None,
               conversation_start_date: str | None = None, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation of OpenAI chat messages ({"role", "content"}, assistant
        "tool_calls" and "reasoning_content", tool "tool_call_id"), ready for the assistant's
        reply. ValueError names the message or field that cannot be rendered."""
        import openai_harmony as oh

        if reasoning_effort is not None and reasoning_effort not in REASONING_EFFORTS:
            raise ValueError(f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}, got {reasoning_effort!r}")
        system = oh.SystemContent.new().with_reasoning_effort(oh.ReasoningEffort(
            (reasoning_effort or "medium").capitalize()))
        if model_identity is not None:
            system = system.with_model_identity(model_identity)
        if conversation_start_date is not None:
            system = system.with_conversation_start_date(conversation_start_date)
        instructions, turns, call_names = [], [], {}
        for i, message in enumerate(messages):
            role, content = message.get("role"), _text(message.get("content"), f"messages[{i}].content")
            if role in ("system", "developer"):
                instructions.append(content)
            elif role == "user":
                turns.append(oh.Message.from_role_and_content(oh.Role.USER, content))
            elif role == "assistant":
                turns.extend(self._assistant(message, content, call_names, i))
            elif role == "tool":
                name = call_names.get(message.get("tool_call_id"), message.get("name"))
                if name is None:
                    raise ValueError(f"messages[{i}].tool_call_id names no earlier tool call")
                author = oh.Author.new(oh.Role.TOOL, f"functions.{name}")
                turns.append(oh.Message.from_author_and_content(author, content).with_channel("commentary")
                             .with_recipient("assistant"))
            else:
                raise ValueError(f"messages[{i}].role must be system, developer, user, assistant or tool, got {role!r}")
        head = [oh.Message.from_role_and_content(oh.Role.SYSTEM, system)]
        if instructions or tools:
            developer = oh.DeveloperContent.new()
            if instructions:
                developer = developer.with_instructions("\n\n".join(instructions))
            if tools:
                developer = developer.with_function_tools([_tool(t, j) for j, t in enumerate(tools)])
            head.append(oh.Message.from_role_and_content(oh.Role.DEVELOPER, developer))
        conversation = oh.Conversation.from_messages(head + turns)
        if add_generation_prompt:
            return list(self.encoding.render_conversation_for_completion(conversation, oh.Role.ASSISTANT))
        return list(self.encoding.render_conversation(conversation))

    def _assistant(self, message: dict[str, Any], content: str, call_names: dict, index: int) -> list:
        import openai_harmony as oh

        out = []
        reasoning = message.get("reasoning_content") or message.get("reasoning")
        if reasoning:
            out.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, reasoning).with_channel("analysis"))
        for call in message.get("tool_calls") or ():
            function = call.get("function") or {}
            name, arguments = function.get("name"), function.get("arguments", "{}")
            if not name:
                raise ValueError(f"messages[{index}].tool_calls: every call needs function.name")
            if not isinstance(arguments, str):
                arguments = json.dumps(arguments)
            call_names[call.get("id")] = name
            out.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, arguments).with_channel("commentary")
                       .with_recipient(f"functions.{name}").with_content_type("<|constrain|>json"))
        if content:
            out.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, content).with_channel("final"))
        return out

    def stream(self) -> HarmonyStream:
        return HarmonyStream(self.encoding)

    def parse(self, token_ids: Iterable[int]) -> HarmonyText:
        stream = self.stream()
        whole = stream.feed(token_ids)
        rest = stream.finish()
        return HarmonyText(_join(whole.reasoning, rest.reasoning), _join(whole.content, rest.content),
                           whole.calls + rest.calls)


class HarmonyStream:
    """One completion's tokens, piece by piece: `feed` each piece, then `finish`. Each returns
    what the new tokens settle: reasoning and content text, and calls whose message ended."""

    def __init__(self, encoding):
        import openai_harmony as oh

        self.encoding = encoding
        self._parser = oh.StreamableParser(encoding, oh.Role.ASSISTANT)
        self._token_ids: list[int] = []
        self._spoke = False  # some message was opened: the output is Harmony
        self._broken = False
        self._done_messages = 0

    def feed(self, token_ids: Iterable[int]) -> HarmonyText:
        out = HarmonyText()
        for token in token_ids:
            self._token_ids.append(token)
            if self._broken:
                continue
            try:
                self._parser.process(token)
            except Exception:  # noqa: BLE001 - HarmonyError: a token out of place; the rest is plain text
                self._broken = True
                continue
            self._settle(out)
        return out

    def finish(self) -> HarmonyText:
        out = HarmonyText()
        if not self._broken:
            try:
                self._parser.process_eos()
            except Exception:  # noqa: BLE001 - ended inside a header
                pass
            self._settle(out)
        if not self._spoke and self._token_ids:
            out.content = _join(out.content, self.encoding.decode(
                [t for t in self._token_ids if not self.encoding.is_special_token(t)]) or None)
        return out

    def _settle(self, out: HarmonyText) -> None:
        parser = self._parser
        delta = parser.last_content_delta
        if delta:
            self._spoke = True
            channel, recipient = parser.current_channel, parser.current_recipient
            if channel == "analysis":
                out.reasoning = _join(out.reasoning, delta)
            elif not (recipient or "").startswith("functions."):  # final, or a commentary preamble
                out.content = _join(out.content, delta)
        messages = parser.messages
        for message in messages[self._done_messages:]:
            self._spoke = True
            recipient = message.recipient or ""
            if recipient.startswith("functions."):
                text = "".join(getattr(part, "text", "") for part in message.content)
                out.calls.append(ToolCall(recipient.removeprefix("functions."), text))
        self._done_messages = len(messages)


def _tool(tool: dict[str, Any], index: int):
    import openai_harmony as oh

    function = tool.get("function", tool)
    if not function.get("name"):
        raise ValueError(f"tools[{index}].function.name is required")
    return oh.ToolDescription.new(function["name"], function.get("description") or "",
                                  parameters=function.get("parameters"))


def _text(content: Any, field: str) -> str:
    """A message's content: a string, or OpenAI's list of text parts (joined by newlines)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                raise ValueError(f"{field}: only text parts can be rendered for this model")
        return "\n".join(parts)
    raise ValueError(f"{field} must be a string or a list of text parts")


def _join(first: str | None, second: str | None) -> str | None:
    if first is None:
        return second
    return first if second is None else first + second
