"""Tool-call parsing (hermes, llama3_json), whole and streamed; tool_choice schemas; a chat
template that renders tools. Streamed results must equal parsed ones under every chunking."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.tokenizer import Tokenizer
from server.openai.reasoning import ReasoningParser
from server.openai.tool_parsers import (TOOL_PARSERS, ConstrainedCallStream, Delta,
                                        HermesToolParser, Llama3JsonToolParser, ParsedToolCalls,
                                        ToolCall, calls_from_constrained, choose_tool_parser,
                                        constrained_tool_schema)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time now."}}
TOOLS = [WEATHER, TIME]

NESTED_ARGUMENTS = ('{"path": "a}b.txt", "text": "She said \\"hi}\\" — 日本語 🚀 \\\\", '
                    '"options": {"modes": [1, {"deep": "}]<tool_call>"}], "empty": {}}}')

# (parser, model output, content, [(name, arguments)])
CASES = {
    "hermes single (Qwen2.5)": (
        HermesToolParser,
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "San Francisco, CA", '
        '"unit": "celsius"}}\n</tool_call>',
        None, [("get_weather", '{"city": "San Francisco, CA", "unit": "celsius"}')]),
    "hermes parallel": (
        HermesToolParser,
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Tokyo"}}\n</tool_call>\n',
        None, [("get_weather", '{"city": "Paris"}'), ("get_weather", '{"city": "Tokyo"}')]),
    "hermes leading content": (
        HermesToolParser,
        "I'll look that up.\n\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n"
        "</tool_call>",
        "I'll look that up.", [("get_time", "{}")]),
    "hermes content after the call": (
        HermesToolParser,
        '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>\n\nDone.\n',
        "Done.\n", [("get_time", "{}")]),
    "hermes nested arguments": (
        HermesToolParser,
        f'<tool_call>\n{{"name": "write_file", "arguments": {NESTED_ARGUMENTS}}}\n</tool_call>',
        None, [("write_file", NESTED_ARGUMENTS)]),
    "hermes compact": (
        HermesToolParser, '<tool_call>{"name":"get_weather","arguments":{"city":"Oslo"}}</tool_call>',
        None, [("get_weather", '{"city":"Oslo"}')]),
    "hermes pretty-printed": (
        HermesToolParser,
        '<tool_call>\n  {\n    "name" : "get_weather" ,\n    "arguments" :\n {\n      "city": '
        '"Lima"\n    }\n  }\n</tool_call>',
        None, [("get_weather", '{\n      "city": "Lima"\n    }')]),
    "hermes type key, name, no arguments": (
        HermesToolParser, '<tool_call>\n{"type": "function", "name": "get_time"}\n</tool_call>',
        None, [("get_time", "{}")]),
    "hermes arguments encoded as a string": (
        HermesToolParser,
        '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}\n</tool_call>',
        None, [("get_weather", '{"city": "Rome"}')]),
    "hermes null arguments, extra keys": (
        HermesToolParser,
        '<tool_call>{"name": "get_time", "arguments": null, "id": "x}"}</tool_call>'
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Bern"}, "note": {"a": "}"}}'
        '</tool_call>',
        None, [("get_time", "{}"), ("get_weather", '{"city": "Bern"}')]),
    "hermes unknown function": (
        HermesToolParser, '<tool_call>\n{"name": "launch_rocket", "arguments": {"n": 3}}\n</tool_call>',
        None, [("launch_rocket", '{"n": 3}')]),
    "hermes missing closer and brace": (
        HermesToolParser,
        '<tool_call>\n{"name": "get_time", "arguments": {}\n</tool_call>'
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Kyiv"}}<tool_call>'
        '{"name": "get_time", "arguments": {}}',
        None, [("get_time", "{}"), ("get_weather", '{"city": "Kyiv"}'), ("get_time", "{}")]),
    "hermes malformed JSON is content": (
        HermesToolParser,
        'Sure.\n<tool_call>\n{"name": get_weather, "arguments": {}}\n</tool_call>',
        'Sure.\n<tool_call>\n{"name": get_weather, "arguments": {}}\n</tool_call>', []),
    "hermes not JSON is content": (
        HermesToolParser, "<tool_call>\nget_weather(city='Paris')\n</tool_call>  ",
        "<tool_call>\nget_weather(city='Paris')\n</tool_call>  ", []),
    "hermes arguments before name is content": (
        HermesToolParser, '<tool_call>{"arguments": {}, "name": "get_time"}</tool_call>',
        '<tool_call>{"arguments": {}, "name": "get_time"}</tool_call>', []),
    "hermes opening cut short is content": (
        HermesToolParser, 'Checking <tool_call>\n{"name": "get_wea',
        'Checking <tool_call>\n{"name": "get_wea', []),
    "hermes malformed then a call": (
        HermesToolParser,
        '<tool_call>{}</tool_call>\n<tool_call>{"name": "get_time", "arguments": {}}</tool_call>',
        '<tool_call>{}</tool_call>', [("get_time", "{}")]),
    "hermes arguments cut short stay a call": (
        HermesToolParser, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par',
        None, [("get_weather", '{"city": "Par')]),
    "hermes plain text is unchanged": (
        HermesToolParser, "  a < b, <tool <tool_cal </tool_call> x\n\n<tool_call",
        "  a < b, <tool <tool_cal </tool_call> x\n\n<tool_call", []),
    "llama3.1 python_tag": (
        Llama3JsonToolParser,
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
        None, [("get_weather", '{"city": "Paris", "unit": "celsius"}')]),
    "llama3.2 bare JSON with type": (
        Llama3JsonToolParser,
        '\n\n{"type": "function", "name": "get_weather", "parameters": {"city": "Oslo"}}',
        None, [("get_weather", '{"city": "Oslo"}')]),
    "llama parallel": (
        Llama3JsonToolParser,
        '{"name": "get_weather", "parameters": {"city": "Paris"}}; '
        '{"name": "get_time", "parameters": {}};{"name": "get_weather", "parameters": '
        f'{NESTED_ARGUMENTS}}}',
        None, [("get_weather", '{"city": "Paris"}'), ("get_time", "{}"),
               ("get_weather", NESTED_ARGUMENTS)]),
    "llama text after calls": (
        Llama3JsonToolParser, '{"name": "get_time", "parameters": {}}\nThat is all.',
        "That is all.", [("get_time", "{}")]),
    "llama content first": (
        Llama3JsonToolParser, 'Calling {"name": "get_time", "parameters": {}}',
        'Calling {"name": "get_time", "parameters": {}}', []),
    "llama JSON answer is content": (
        Llama3JsonToolParser, ' {"name": "Bob", "age": 42}', ' {"name": "Bob", "age": 42}', []),
    "llama built-in tool syntax is content": (
        Llama3JsonToolParser, '<|python_tag|>brave_search.call(query="weather")',
        '<|python_tag|>brave_search.call(query="weather")', []),
    "llama malformed after separator": (
        Llama3JsonToolParser, '{"name": "get_time", "parameters": {}}; oops',
        "; oops", [("get_time", "{}")]),
}


def _calls(parsed: ParsedToolCalls) -> list[tuple[str, str]]:
    return [(call.name, call.arguments) for call in parsed.calls]


def _streamed(stream, chunks: list[str]) -> ParsedToolCalls:
    deltas = [delta for chunk in chunks for delta in stream.feed(chunk)] + stream.finish()
    return ParsedToolCalls.from_deltas(deltas)


def chunkings(text: str, rng: random.Random, count: int):
    """Ways to cut `text` into pieces: one per character, every two-way split, then `count`
    random splits."""
    yield list(text)
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]
    for _ in range(count):
        cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(0, min(len(text), 12))))
        yield [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


@pytest.mark.parametrize("case", CASES)
def test_parse(case):
    parser, text, content, calls = CASES[case]
    parsed = parser(TOOLS).parse(text)
    assert (parsed.content, _calls(parsed)) == (content, calls)
    for call in parsed.calls:
        assert re.fullmatch(r"call_[A-Za-z0-9]{24}", call.id)
    assert len({call.id for call in parsed.calls}) == len(parsed.calls)


@pytest.mark.parametrize("case", CASES)
def test_streamed_equals_parsed_for_every_chunking(case):
    parser, text, content, calls = CASES[case]
    for chunks in chunkings(text, random.Random(case), count=40):
        streamed = _streamed(parser(TOOLS).stream(), chunks)
        assert (streamed.content, _calls(streamed)) == (content, calls), chunks


@settings(max_examples=150, deadline=None)
@given(case=st.sampled_from(sorted(CASES)), data=st.data())
def test_streamed_equals_parsed_hypothesis(case, data):
    parser, text, content, calls = CASES[case]
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=20).map(sorted))
    chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    streamed = _streamed(parser().stream(), chunks)
    assert (streamed.content, _calls(streamed)) == (content, calls)


@settings(max_examples=200, deadline=None)
@given(pieces=st.lists(st.sampled_from(["<tool_call>", "</tool_call>", "{", "}", '"', ":", ",",
                                        '"name"', '"arguments"', '"f"', "\\", " ", "\n", "x", "<",
                                        "[", "]", ";", "<|python_tag|>", "null", '"parameters"']),
                       max_size=30),
       data=st.data())
def test_any_text_streams_like_it_parses(pieces, data):
    """Garbage in: never raises, and any chunking gives the whole-text result."""
    text = "".join(pieces)
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=10).map(sorted))
    chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    for parser in TOOL_PARSERS.values():
        whole = parser().parse(text)
        streamed = _streamed(parser().stream(), chunks)
        assert (streamed.content, _calls(streamed)) == (whole.content, _calls(whole))


def test_stream_sends_content_early_and_arguments_as_they_arrive():
    stream = HermesToolParser(TOOLS).stream()
    assert stream.feed("The weather:") == [Delta(content="The weather:")]
    assert stream.feed(" <tool") == []  # maybe a call: held back
    assert stream.feed(" x") == [Delta(content=" <tool x")]
    assert stream.feed("\n<tool_call>\n{\"name\": \"get_weather\", ") == []
    header, fragment = stream.feed('"arguments": {"city": "Pa')
    assert (header.index, header.name, header.arguments, header.content) == (0, "get_weather", None, None)
    assert re.fullmatch(r"call_[A-Za-z0-9]{24}", header.id)
    assert fragment == Delta(index=0, arguments='{"city": "Pa')
    assert stream.feed('ris"}}\n</tool_call>') == [Delta(index=0, arguments='ris"}')]
    assert stream.finish() == []
    with pytest.raises(ValueError, match="finish"):
        stream.feed("more")


def test_reasoning_then_tool_calls_streamed_as_the_http_layer_does():
    text = ('<think>\nThe user wants Paris weather. I should call get_weather with "city": '
            '"Paris" {}.\n</think>\n\nLet me check.\n<tool_call>\n{"name": "get_weather", '
            '"arguments": {"city": "Paris"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", '
            '"arguments": {}}\n</tool_call>')
    reasoning, content = ReasoningParser().split(text)
    whole = HermesToolParser(TOOLS).parse(content)
    assert reasoning.startswith("The user wants") and reasoning.endswith("{}.")
    assert whole.content == "Let me check."
    assert _calls(whole) == [("get_weather", '{"city": "Paris"}'), ("get_time", "{}")]
    for chunks in chunkings(text, random.Random(0), count=100):
        reasoning_stream, tool_stream = ReasoningParser().stream(), HermesToolParser(TOOLS).stream()
        thoughts, deltas = [], []
        for chunk in [*chunks, None]:
            thought, visible = reasoning_stream.feed(chunk) if chunk is not None else reasoning_stream.finish()
            thoughts.append(thought or "")
            deltas += tool_stream.feed(visible or "")
        deltas += tool_stream.finish()
        streamed = ParsedToolCalls.from_deltas(deltas)
        assert "".join(thoughts) == reasoning
        assert (streamed.content, _calls(streamed)) == (whole.content, _calls(whole))


def test_choose_tool_parser():
    assert choose_tool_parser("hermes", None) is HermesToolParser
    assert choose_tool_parser("llama3_json", "<tool_call>") is Llama3JsonToolParser
    with pytest.raises(ValueError, match=r"tool_call_parser must be one of hermes, llama3_json, got 'x'"):
        choose_tool_parser("x", None)
    assert choose_tool_parser(None, HERMES_TEMPLATE) is HermesToolParser
    llama = ('<|start_header_id|>user<|end_header_id|>\n\nRespond in the format {"name": function '
             'name, "parameters": dictionary of argument name and its value}.<|eot_id|>')
    assert choose_tool_parser(None, llama) is Llama3JsonToolParser
    assert choose_tool_parser(None, "{{ '<|python_tag|>' + tool_call.name }}") is Llama3JsonToolParser
    assert choose_tool_parser(None, "{% for m in messages %}{{ m.content }}{% endfor %}") is None
    assert choose_tool_parser(None, None) is None


# --- tool_choice: constrained decoding -------------------------------------------------------


def test_required_schema_accepts_calls_and_rejects_others():
    schema = constrained_tool_schema(TOOLS, "required")
    jsonschema.Draft202012Validator.check_schema(schema)
    good = [[{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}],
            [{"name": "get_time", "parameters": {}}, {"name": "get_weather", "parameters": {"city": "Rome"}}]]
    bad = [[], {"name": "get_time", "parameters": {}}, [{"name": "get_time"}],
           [{"name": "launch", "parameters": {}}], [{"name": "get_weather", "parameters": {}}],
           [{"name": "get_weather", "parameters": {"city": "Rome", "unit": "kelvin"}}],
           [{"name": "get_time", "parameters": {}, "extra": 1}]]
    for instance in good:
        jsonschema.validate(instance, schema)
    for instance in bad:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(instance, schema)
    # Properties in order "name" then "parameters": the order constrained decoding writes them.
    assert [list(item["properties"]) for item in schema["items"]["anyOf"]] == [["name", "parameters"]] * 2


def test_named_schema_is_the_functions_parameters():
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert constrained_tool_schema(TOOLS, named) == WEATHER["function"]["parameters"]
    no_parameters = constrained_tool_schema(TOOLS, {"type": "function", "function": {"name": "get_time"}})
    jsonschema.validate({}, no_parameters)
    with pytest.raises(ValueError, match=r"tool_choice names function 'nope', which is not among tools"):
        constrained_tool_schema(TOOLS, {"type": "function", "function": {"name": "nope"}})
    for bad in ("auto", "none", {"type": "function"}):
        with pytest.raises(ValueError, match="tool_choice must be"):
            constrained_tool_schema(TOOLS, bad)
    with pytest.raises(ValueError, match="needs tools"):
        constrained_tool_schema([], "required")


CONSTRAINED = {
    "required": (
        "required",
        '[{"name": "get_weather", "parameters": {"city": "Paris \\"}]\\""}}, '
        '{"name": "get_time", "parameters": {}}]',
        [("get_weather", '{"city": "Paris \\"}]\\""}'), ("get_time", "{}")]),
    "required compact": (
        "required", '[{"name":"get_time","parameters":{}}]', [("get_time", "{}")]),
    "named": (
        {"type": "function", "function": {"name": "get_weather"}},
        ' \n{"city": "Oslo", "unit": "celsius"} \n\n', [("get_weather", '{"city": "Oslo", "unit": "celsius"}')]),
    "named empty": ({"type": "function", "function": {"name": "get_time"}}, "", [("get_time", "")]),
}


@pytest.mark.parametrize("case", CONSTRAINED)
def test_calls_from_constrained_output_whole_and_streamed(case):
    tool_choice, text, calls = CONSTRAINED[case]
    assert [(call.name, call.arguments) for call in calls_from_constrained(text, tool_choice)] == calls
    for chunks in chunkings(text, random.Random(case), count=40):
        streamed = _streamed(ConstrainedCallStream(tool_choice), chunks)
        assert (streamed.content, _calls(streamed)) == (None, calls), chunks


def test_required_output_parses_to_what_the_schema_allowed():
    tools = [WEATHER]
    instance = [{"name": "get_weather", "parameters": {"city": "Zürich \"}]", "unit": "celsius"}}]
    jsonschema.validate(instance, constrained_tool_schema(tools, "required"))
    calls = calls_from_constrained(json.dumps(instance, ensure_ascii=False), "required")
    assert [(call.name, json.loads(call.arguments)) for call in calls] == [
        ("get_weather", instance[0]["parameters"])]
    assert all(isinstance(call, ToolCall) for call in calls)


# --- chat templates render tools ----------------------------------------------------------

HERMES_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {{- messages[0]['content'] if messages[0]['role'] == 'system' else 'You are a helpful assistant.' }}
    {{- '\\n\\n# Tools\\n\\nYou may call one or more functions. Their signatures are within '
        '<tools></tools>:\\n<tools>' }}
    {%- for tool in tools %}
        {{- '\\n' + tool | tojson }}
    {%- endfor %}
    {{- '\\n</tools>\\n\\nFor each call, return a JSON object within <tool_call></tool_call> tags:'
        '\\n<tool_call>\\n{"name": <function-name>, "arguments": <args-json-object>}\\n'
        '</tool_call><|im_end|>\\n' }}
{%- endif %}
{%- for message in messages if message['role'] != 'system' %}
    {%- if message['role'] == 'tool' %}
        {{- '<|im_start|>user\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}
    {%- else %}
        {{- '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') }}
    {%- endif %}
    {%- for call in message.get('tool_calls') or [] %}
        {{- '\\n' if not loop.first or message['content'] else '' }}
        {{- '<tool_call>\\n{"name": "' + call['function']['name'] + '", "arguments": ' }}
        {{- call['function']['arguments'] + '}\\n</tool_call>' }}
    {%- endfor %}
    {{- '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}"""


def test_chat_template_renders_tools_and_round_trips_a_call():
    tokenizer = Tokenizer(Tokenizer.word_level(8).hf, chat_template=HERMES_TEMPLATE)
    assert choose_tool_parser(None, tokenizer.chat_template) is HermesToolParser
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    prompt = tokenizer.apply_chat_template(messages, tools=TOOLS)
    for tool in TOOLS:
        assert json.dumps(tool, ensure_ascii=False) in prompt
    assert "<tool_call>" in prompt and prompt.endswith("<|im_start|>assistant\n")
    assert "<tools>" not in tokenizer.apply_chat_template(messages)
    # The model's answer, parsed, goes back into the history and renders as the model wrote it.
    output = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    calls = HermesToolParser(TOOLS).parse(output).calls
    history = [*messages, {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function",
         "function": {"name": call.name, "arguments": call.arguments}} for call in calls]},
        {"role": "tool", "tool_call_id": calls[0].id, "content": '{"temperature": 21}'}]
    rendered = tokenizer.apply_chat_template(history, tools=TOOLS)
    assert f"<|im_start|>assistant\n{output}<|im_end|>" in rendered
    assert "<tool_response>\n{\"temperature\": 21}\n</tool_response>" in rendered


def test_importing_the_parsers_does_not_import_jax():
    code = ("import sys, server.openai.tool_parsers, server.openai.reasoning; "
            "assert not any(m == 'jax' or m.startswith('jax.') for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)
