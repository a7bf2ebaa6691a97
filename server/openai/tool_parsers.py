"""OpenAI tool calls pulled out of a model's text, whole (`ToolParser.parse`) or streamed
(`ToolParser.stream`), and the JSON schema that forces calls under `tool_choice`.

Formats (`TOOL_PARSERS`):
- "hermes" (Hermes, Qwen2.5, Qwen3): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`
  anywhere in the text; several blocks in a row are parallel calls.
- "llama3_json" (Llama 3.1 / 3.2): only when the text starts (after whitespace) with an optional
  `<|python_tag|>` and then `{"name": ..., "parameters": {...}}`; further calls follow after `;`.

Rules, the same whole and streamed (`parse` is `stream` fed the whole text, so they cannot differ):
- A call opens with a JSON object whose keys, before the arguments key ("arguments" or
  "parameters"), have string values and include "name" (`{"type": "function", "name": ...}` is
  fine); `{"name": "f"}` alone is a call with arguments "{}". Text that does not open a call that
  way stays content, verbatim (malformed calls never raise).
- `arguments` is the model's own text of the arguments value (for `{"a": 1}` exactly `{"a": 1}`,
  spacing kept), streamed as it arrives, so the streamed fragments always add up to it. Once a
  call has opened it is not taken back: as in OpenAI's API ("the model does not always generate
  valid JSON"), arguments cut short or garbled by the model reach the client as written, to
  validate. A JSON string value is decoded (some models encode their arguments as a string);
  `null` or a missing value becomes "{}".
- Content is the text outside calls, unchanged except that whitespace next to a call is dropped;
  None when empty. Text without a call comes back exactly.
- Calls to functions not in `tools` are returned too: the client decides, as with OpenAI.
- Call ids are `call_` + 24 random letters and digits (`new_call_id`), fresh on every parse.

Streaming: content is held back only while it could still be the start of a call (a partial
`<tool_call>`, the opening of a llama3_json text, or trailing whitespace that a following call
would drop); a call's first `Delta` carries index, id and name (arguments None), later ones
argument fragments.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass
from typing import Any, ClassVar

_CALL_ID_ALPHABET = string.ascii_letters + string.digits
_WHITESPACE = re.compile(r"\s*")
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_STRING_BODY = re.compile(r'[^"\\]*')
_OUTSIDE_STRING = re.compile(r'[^"{}\[\]<]*')
_LITERAL = re.compile(r"[^\s,}\]<]*")
_NEED, _BAD = object(), object()  # outcomes of reading a call's opening: wait for more, no call


@dataclass(frozen=True)
class ToolCall:
    """One function call: `arguments` is a JSON text (as OpenAI's `function.arguments`)."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Delta:
    """One streamed piece: content text, or a call's piece (`index`, with `id` and `name` on its
    first delta, `arguments` fragments after)."""

    content: str | None = None
    index: int | None = None
    id: str | None = None
    name: str | None = None
    arguments: str | None = None


@dataclass(frozen=True)
class ParsedToolCalls:
    """A completion's content (None when empty) and its tool calls, in order."""

    content: str | None
    calls: list[ToolCall]

    @classmethod
    def from_deltas(cls, deltas: list[Delta]) -> "ParsedToolCalls":
        """Fold streamed deltas back into the whole result."""
        content: list[str] = []
        calls: dict[int, list[str]] = {}  # index -> [id, name, arguments]
        for delta in deltas:
            if delta.content is not None:
                content.append(delta.content)
            if delta.index is None:
                continue
            call = calls.setdefault(delta.index, ["", "", ""])
            call[0] += delta.id or ""
            call[1] += delta.name or ""
            call[2] += delta.arguments or ""
        return cls("".join(content) or None, [ToolCall(*calls[i]) for i in sorted(calls)])


def new_call_id() -> str:
    """`call_` and 24 random letters and digits."""
    return "call_" + "".join(secrets.choice(_CALL_ID_ALPHABET) for _ in range(24))


@dataclass(frozen=True)
class CallFormat:
    """How a model family writes tool calls around its JSON call objects.

    `openers`: text that opens a block of calls ("" means the block may start at the `{`);
    `anywhere`: openers count anywhere in the text, else only at its start, after whitespace;
    `separator` may sit between two calls of a block; `closer` ends a block."""

    openers: tuple[str, ...]
    anywhere: bool
    separator: str | None
    closer: str | None
    argument_keys: tuple[str, ...] = ("arguments", "parameters")


HERMES = CallFormat(openers=("<tool_call>",), anywhere=True, separator=None, closer="</tool_call>")
LLAMA3_JSON = CallFormat(openers=("<|python_tag|>", ""), anywhere=False, separator=";", closer=None)
# The output of constrained_tool_schema(tools, "required"): [{"name": ..., "parameters": ...}, ...]
_REQUIRED_ARRAY = CallFormat(openers=("[",), anywhere=False, separator=",", closer="]")


class _JsonScanner:
    """Finds where a JSON value ends in text that arrives in pieces, minding strings and nesting.

    With `depth=1` it finds the end of an object whose remaining members follow. A `<` outside
    strings (never valid JSON there) also ends the value: the model went on to a closing tag."""

    def __init__(self, depth: int = 0):
        self.depth, self.in_string, self.escaped = depth, False, False

    def advance(self, text: str) -> int | None:
        """Index just past the value's end in `text` (before a `<`), or None: not ended yet."""
        i = 0
        while i < len(text):
            if self.in_string:
                if self.escaped:
                    self.escaped, i = False, i + 1
                    continue
                i = _STRING_BODY.match(text, i).end()
                if i == len(text):
                    return None
                self.escaped = text[i] == "\\"
                self.in_string = text[i] != '"'
                i += 1
                if not self.in_string and self.depth == 0:
                    return i
                continue
            i = _OUTSIDE_STRING.match(text, i).end()
            if i == len(text):
                return None
            char = text[i]
            if char == "<":
                return i
            i += 1
            if char == '"':
                self.in_string = True
            elif char in "{[":
                self.depth += 1
            else:
                self.depth -= 1
                if self.depth <= 0:
                    return i
        return None


def _read_string(text: str, pos: int) -> tuple[Any, int]:
    """A JSON string at `pos`: (its value, the index after it), or (_NEED or _BAD, pos)."""
    if pos == len(text):
        return _NEED, pos
    if text[pos] != '"':
        return _BAD, pos
    match = _JSON_STRING.match(text, pos)
    if match is None:
        return _NEED, pos
    try:
        return json.loads(match.group()), match.end()
    except ValueError:
        return _BAD, pos


def _read_opening(text: str, argument_keys: tuple[str, ...]) -> Any:
    """Read a call object's opening: whitespace, `{`, string-valued members including "name",
    then an arguments key and its colon (or the closing `}`). Returns (name, index after the
    opening, whether an arguments value follows), or _NEED (could still open a call) or _BAD."""
    pos = _WHITESPACE.match(text).end()
    if pos == len(text):
        return _NEED
    if text[pos] != "{":
        return _BAD
    name, pos = None, pos + 1
    while True:
        key, pos = _read_string(text, _WHITESPACE.match(text, pos).end())
        if key is _NEED or key is _BAD:
            return key
        pos = _WHITESPACE.match(text, pos).end()
        if pos == len(text):
            return _NEED
        if text[pos] != ":":
            return _BAD
        if key in argument_keys:
            return (name, pos + 1, True) if name else _BAD
        value, pos = _read_string(text, _WHITESPACE.match(text, pos + 1).end())
        if value is _NEED or value is _BAD:
            return value
        if key == "name":
            name = value
        pos = _WHITESPACE.match(text, pos).end()
        if pos == len(text):
            return _NEED
        if text[pos] == "}":
            return (name, pos + 1, False) if name else _BAD
        if text[pos] != ",":
            return _BAD
        pos += 1


def marker_prefix_length(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is a proper, non-empty start of a marker: the
    text a stream holds back in case the marker is arriving."""
    longest = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), longest, -1):
            if marker.startswith(text[-size:]):
                longest = size
                break
    return longest


class SpaceTrimmer:
    """Text streamed with its leading whitespace dropped (while `leading`) and its trailing
    whitespace held back (`held`) until more text follows, so that the caller may drop it."""

    def __init__(self, leading: bool = True):
        self.leading, self.held = leading, ""

    def __call__(self, text: str) -> str:
        """What of `text` can go out now."""
        if self.leading:
            text = text.lstrip()
            self.leading = not text
        text = self.held + text
        body = text.rstrip()
        self.held = text[len(body):]
        return body


class ToolCallStream:
    """Tool calls parsed from text that arrives in pieces: `feed` each piece, then `finish`.

    A state machine over `_buffer` (text not yet consumed); `_state` names the method that
    handles the buffer next, returning True when it made progress."""

    def __init__(self, call_format: CallFormat):
        self._format = call_format
        self._buffer = ""
        self._state = self._text if call_format.anywhere else self._start
        self._marker = ""  # consumed opener: content again if no call follows it
        # Content: whitespace right after a call is dropped, and so is whitespace before one.
        self._space = SpaceTrimmer(leading=False)
        self._index = -1
        self._scanner = _JsonScanner()
        self._value = ""  # a string or literal arguments value, read whole
        self._out: list[Delta] = []
        self._finished = False

    def feed(self, delta_text: str) -> list[Delta]:
        """The deltas that `delta_text` (the next piece of the text) settles."""
        if self._finished:
            raise ValueError("feed after finish: this stream has ended")
        self._buffer += delta_text
        while self._state(False):
            pass
        return self._take()

    def finish(self) -> list[Delta]:
        """The deltas still held back, at the end of the text."""
        if not self._finished:
            self._finished = True
            while self._state(True):
                pass
            self._emit_content(self._space.held)
            self._space.held = ""
        return self._take()

    def _take(self) -> list[Delta]:
        out, self._out = self._out, []
        return out

    # --- output ----------------------------------------------------------------------------

    def _emit(self, delta: Delta) -> None:
        last = self._out[-1] if self._out else None
        if last is not None and delta.content is not None and last.content is not None:
            self._out[-1] = Delta(content=last.content + delta.content)
        elif (last is not None and delta.id is None and delta.arguments is not None
              and last.id is None and last.index == delta.index and last.arguments is not None):
            self._out[-1] = Delta(index=delta.index, arguments=last.arguments + delta.arguments)
        else:
            self._out.append(delta)

    def _emit_content(self, text: str) -> None:
        if text:
            self._emit(Delta(content=text))

    def _content(self, text: str) -> None:
        self._emit_content(self._space(text))

    def _arguments(self, text: str) -> None:
        if text:
            self._emit(Delta(index=self._index, arguments=text))

    # --- states ----------------------------------------------------------------------------

    def _start(self, final: bool) -> bool:
        """The text's start (formats whose calls come first): an opener, or content."""
        rest = self._buffer.lstrip()
        space = self._buffer[:len(self._buffer) - len(rest)]
        if not rest and not final:
            return False
        for opener in self._format.openers:
            if rest.startswith(opener or "{"):
                self._marker, self._buffer = space + opener, rest[len(opener):]
                self._state = self._open
                return True
        if not final and any(opener.startswith(rest) for opener in self._format.openers if opener):
            return False
        self._state = self._text
        return True

    def _text(self, final: bool) -> bool:
        """Content; with `anywhere`, watch for an opener."""
        if not self._buffer:
            return False
        openers = self._format.openers if self._format.anywhere else ()
        found = [(i, opener) for opener in openers if (i := self._buffer.find(opener)) >= 0]
        if found:
            i, opener = min(found)
            self._content(self._buffer[:i])
            self._marker, self._buffer = opener, self._buffer[i + len(opener):]
            self._state = self._open
            return True
        keep = 0 if final else marker_prefix_length(self._buffer, openers)
        self._content(self._buffer[:len(self._buffer) - keep])
        self._buffer = self._buffer[len(self._buffer) - keep:]
        return False

    def _open(self, final: bool) -> bool:
        """After an opener: a call's opening, or else the opener was content."""
        opening = _read_opening(self._buffer, self._format.argument_keys)
        if opening is _NEED and not final:
            return False
        if opening is _NEED or opening is _BAD:
            self._content(self._marker)
            self._marker, self._state = "", self._text
            return True
        name, end, has_arguments = opening
        self._marker, self._space.held, self._space.leading = "", "", False
        self._index += 1
        self._emit(Delta(index=self._index, id=new_call_id(), name=name))
        self._buffer = self._buffer[end:]
        if has_arguments:
            self._state = self._arguments_value
        else:
            self._arguments("{}")
            self._state, self._space.leading = self._between, True
        return True

    def _arguments_value(self, final: bool) -> bool:
        """The start of the arguments value picks how it is read."""
        self._buffer = self._buffer.lstrip()
        if not self._buffer:
            return False
        first = self._buffer[0]
        self._scanner, self._value = _JsonScanner(), ""
        self._state = (self._arguments_streamed if first in "{[" else
                       self._arguments_string if first == '"' else self._arguments_literal)
        return True

    def _arguments_streamed(self, final: bool) -> bool:
        """An object or array: its text goes out as it arrives."""
        if not self._buffer:
            return False
        end = self._scanner.advance(self._buffer)
        if end is None:
            self._arguments(self._buffer)
            self._buffer = ""
            return False
        self._arguments(self._buffer[:end])
        self._buffer = self._buffer[end:]
        self._end_arguments()
        return True

    def _arguments_string(self, final: bool) -> bool:
        """A JSON string (arguments the model encoded as a string): decoded once whole."""
        if not self._read_value(self._scanner.advance(self._buffer), final):
            return False
        try:
            decoded = json.loads(self._value)
        except ValueError:
            decoded = self._value
        self._arguments(decoded if isinstance(decoded, str) else self._value)
        self._end_arguments()
        return True

    def _arguments_literal(self, final: bool) -> bool:
        """A number, true/false or null (null, like nothing at all, means "{}")."""
        end = _LITERAL.match(self._buffer).end()
        if not self._read_value(end if end < len(self._buffer) else None, final):
            return False
        self._arguments(self._value if self._value not in ("", "null") else "{}")
        self._end_arguments()
        return True

    def _read_value(self, end: int | None, final: bool) -> bool:
        """Move the buffer up to `end` (None: not in sight) into `_value`; whether it is whole."""
        whole = end is not None or final
        end = len(self._buffer) if end is None else end
        self._value, self._buffer = self._value + self._buffer[:end], self._buffer[end:]
        return whole

    def _end_arguments(self) -> None:
        self._scanner, self._state = _JsonScanner(depth=1), self._rest_of_object

    def _rest_of_object(self, final: bool) -> bool:
        """Whatever follows the arguments up to the call object's `}` is skipped."""
        if not self._buffer:
            return False
        end = self._scanner.advance(self._buffer)
        self._buffer = "" if end is None else self._buffer[end:]
        if end is None:
            return False
        self._state, self._space.leading = self._between, True
        return True

    def _between(self, final: bool) -> bool:
        """After a call: a separator and the next call, another call, the closer, or content."""
        self._buffer = self._buffer.lstrip()
        if not self._buffer:
            return False
        separator, closer = self._format.separator, self._format.closer
        if separator and self._buffer.startswith(separator):
            self._marker, self._buffer = separator, self._buffer[len(separator):]
            self._state = self._open
            return True
        if closer and self._buffer.startswith(closer):
            self._buffer, self._state = self._buffer[len(closer):], self._text
            return True
        if closer and closer.startswith(self._buffer):  # a closer cut short is dropped at the end
            if final:
                self._buffer = ""
            return False
        self._marker = ""
        self._state = self._open if self._buffer.startswith("{") else self._text
        return True


class ToolParser:
    """A model family's tool-call format. `tools` are the request's OpenAI tools, kept for
    reference: calls to other names are returned all the same."""

    format: ClassVar[CallFormat]

    def __init__(self, tools: list[dict[str, Any]] | None = None):
        self.tools = list(tools or [])

    def parse(self, text: str) -> ParsedToolCalls:
        """Content and calls of a whole completion."""
        stream = self.stream()
        return ParsedToolCalls.from_deltas(stream.feed(text) + stream.finish())

    def stream(self) -> ToolCallStream:
        """A stream for one completion's text, piece by piece."""
        return ToolCallStream(self.format)


class HermesToolParser(ToolParser):
    """`<tool_call>{"name": ..., "arguments": ...}</tool_call>` blocks (Hermes, Qwen2.5, Qwen3)."""

    format = HERMES


class Llama3JsonToolParser(ToolParser):
    """A leading `<|python_tag|>`? then `{"name": ..., "parameters": ...}` calls joined by `;`."""

    format = LLAMA3_JSON


TOOL_PARSERS: dict[str, type[ToolParser]] = {"hermes": HermesToolParser,
                                             "llama3_json": Llama3JsonToolParser}


def choose_tool_parser(name: str | None, chat_template: str | None) -> type[ToolParser] | None:
    """The parser named `name` (`--tool-call-parser`), else the one the chat template's tool
    format implies, else None."""
    if name is not None:
        if name not in TOOL_PARSERS:
            raise ValueError(f"tool_call_parser must be one of {', '.join(TOOL_PARSERS)}, "
                             f"got {name!r}")
        return TOOL_PARSERS[name]
    template = chat_template or ""
    if "<tool_call>" in template:
        return HermesToolParser
    if "<|python_tag|>" in template or ('"parameters"' in template
                                        and "<|start_header_id|>" in template):
        return Llama3JsonToolParser
    return None


# --- tool_choice "required" or a named function: decoding constrained by a JSON schema ---------


def _chosen_function(tool_choice: str | dict[str, Any]) -> str | None:
    """None for "required", else the named function's name."""
    if tool_choice == "required":
        return None
    function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if (not isinstance(function, dict) or tool_choice.get("type", "function") != "function"
            or not isinstance(function.get("name"), str)):
        raise ValueError('tool_choice must be "required" or {"type": "function", "function": '
                         f'{{"name": ...}}}} for constrained decoding, got {tool_choice!r}')
    return function["name"]


def _parameters(tool: dict[str, Any]) -> dict[str, Any]:
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


def constrained_tool_schema(tools: list[dict[str, Any]] | None,
                            tool_choice: str | dict[str, Any]) -> dict[str, Any]:
    """The JSON schema that forces a call: for "required" a non-empty array of
    `{"name": <a tool>, "parameters": <its arguments>}`; for a named function its parameters
    schema (the output is the arguments object)."""
    name = _chosen_function(tool_choice)
    tools = list(tools or [])
    if not tools:
        raise ValueError(f"tool_choice {tool_choice!r} needs tools, got none")
    if name is None:
        items = [{"type": "object",
                  "properties": {"name": {"type": "string", "enum": [tool["function"]["name"]]},
                                 "parameters": _parameters(tool)},
                  "required": ["name", "parameters"], "additionalProperties": False}
                 for tool in tools]
        return {"type": "array", "minItems": 1, "items": {"anyOf": items}}
    for tool in tools:
        if tool["function"]["name"] == name:
            return _parameters(tool)
    names = ", ".join(tool["function"]["name"] for tool in tools)
    raise ValueError(f"tool_choice names function {name!r}, which is not among tools ({names})")


class ConstrainedCallStream:
    """Calls streamed from output constrained by `constrained_tool_schema(tools, tool_choice)`.

    Named function: one call (its first delta comes with the first piece) whose arguments are
    the text, stripped. "required": one call per array item, its arguments the raw text of the
    item's "parameters" value; a malformed or cut-short array follows `ToolCallStream`'s rules."""

    def __init__(self, tool_choice: str | dict[str, Any]):
        self._name = _chosen_function(tool_choice)
        self._calls = ToolCallStream(_REQUIRED_ARRAY) if self._name is None else None
        self._started, self._space = False, SpaceTrimmer()

    def feed(self, delta_text: str) -> list[Delta]:
        """The deltas that `delta_text` settles."""
        if self._calls is not None:
            return self._calls.feed(delta_text)
        out, body = self._header(), self._space(delta_text)
        return out + ([Delta(index=0, arguments=body)] if body else [])

    def finish(self) -> list[Delta]:
        """The deltas still held back (trailing whitespace is dropped)."""
        return self._calls.finish() if self._calls is not None else self._header()

    def _header(self) -> list[Delta]:
        if self._started:
            return []
        self._started = True
        return [Delta(index=0, id=new_call_id(), name=self._name)]


def calls_from_constrained(text: str, tool_choice: str | dict[str, Any]) -> list[ToolCall]:
    """The calls in a whole output constrained by `constrained_tool_schema` (what
    `ConstrainedCallStream` streams)."""
    stream = ConstrainedCallStream(tool_choice)
    return ParsedToolCalls.from_deltas(stream.feed(text) + stream.finish()).calls
