"""Tool calls and `<think>` reasoning over HTTP, against a model whose output the test writes.

A random-weight model cannot be made to write a tool call, so `ScriptedLLM` stands in for
`AsyncLLM`: every request is answered with the same pieces of text (one token each), split where
a tokenizer might split them. The HTTP API, the tool parser and the reasoning parser are the real
ones. What these tests hold: streamed deltas add up to the whole answer (reasoning, content, each
call's name and arguments), with and without thinking first; tool_choice required / named and
response_format reach the engine as structured-output constraints; conversations with tool calls
and results render through templates that know tools and templates that do not."""

from __future__ import annotations

import asyncio
import json
import threading
import types

import pytest

from jaxserve.async_llm import PreparedRequest
from jaxserve.input_processor import ProcessedPrompt
from jaxserve.outputs import CompletionOutput, RequestOutput
from models.tokenizer import Tokenizer
from server.openai import chat_prompt
from server.openai.app import HttpServer, build_app
from server.openai.protocol import ChatMessage, ChatTool
from server.openai.reasoning import ReasoningParser
from server.openai.serving import Serving
from server.openai.tool_parsers import HermesToolParser, constrained_tool_schema
from server.ports import listening_socket
from tests.server.conftest import TINY_CHAT_TEMPLATE
from tests.server.openai_utils import client

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
USER = [{"role": "user", "content": "w5 w6"}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
SECOND_CALL = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'


def pieces(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


class ScriptedLLM:
    """What the HTTP API uses of `AsyncLLM`, answering each request with `script` (each piece one
    token) in each of its `n` completions; `params` holds the last request's SamplingParams."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.script, self.params = tokenizer, ["w5"], None
        self.engine = types.SimpleNamespace(max_model_len=4096,
                                            model_config=types.SimpleNamespace(vocab_size=tokenizer.vocab_size))
        self.is_running = True

    async def prepare(self, prompt, params, priority: int = 0) -> PreparedRequest:
        self.params = params
        ids = prompt.get("prompt_token_ids") or self.tokenizer.encode(prompt["prompt"])
        return PreparedRequest(ProcessedPrompt(None, list(ids)), params, priority)

    async def generate(self, prepared: PreparedRequest, request_id: str):
        script = list(self.script)
        for i, piece in enumerate(script):
            last = i == len(script) - 1
            await asyncio.sleep(0)
            yield RequestOutput(request_id, None, prepared.prompt.token_ids, finished=last, outputs=[
                CompletionOutput(j, piece, [2], "stop" if last else None) for j in range(prepared.params.n)])


class ScriptedServer:
    """The HTTP API over a `ScriptedLLM`, served by uvicorn on its own event-loop thread."""

    def __init__(self):
        self.llm = ScriptedLLM(Tokenizer(Tokenizer.word_level(96).hf, eos_token="<eos>",
                                         chat_template=TINY_CHAT_TEMPLATE))
        gate = types.SimpleNamespace(draining=False, num_queued=0, max_waiting_requests=64, live=set())
        serving = Serving(self.llm, gate, "scripted", tool_parser=HermesToolParser, reasoning_parser=ReasoningParser)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.http = HttpServer(build_app(serving), listening_socket("HTTP", "127.0.0.1", 0))
        asyncio.run_coroutine_threadsafe(self.http.start(), self.loop).result(30)
        self.http_url = f"http://127.0.0.1:{self.http.port}"

    def stop(self):
        asyncio.run_coroutine_threadsafe(self.http.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def scripted():
    server = ScriptedServer()
    yield server
    server.stop()


def whole_and_streamed(scripted, script: list[str], **request):
    """The non-streamed message and choice, and the same rebuilt from the streamed deltas."""
    scripted.llm.script = script
    api = client(scripted)
    body = dict(model="scripted", messages=USER, **request)
    whole = api.chat.completions.create(**body).choices[0]
    reasoning, content, calls, finish = "", "", {}, None
    for chunk in api.chat.completions.create(**body, stream=True):
        for choice in chunk.choices:
            delta = choice.delta
            reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
            content += delta.content or ""
            for call in delta.tool_calls or ():
                entry = calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
                entry["id"] += call.id or ""
                entry["name"] += call.function.name or ""
                entry["arguments"] += call.function.arguments or ""
            finish = choice.finish_reason or finish
    streamed = (reasoning or None, content or None, [calls[i] for i in sorted(calls)], finish)
    return whole, streamed


def summary(choice):
    message = choice.message
    calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
             for c in message.tool_calls or ()]
    return (message.model_extra or {}).get("reasoning_content"), message.content, calls, choice.finish_reason


@pytest.mark.parametrize("text, size, reasoning, content, names", [
    ("<think>Paris weather, then the time.</think>\n" + CALL + "\n" + SECOND_CALL, 7, "Paris weather, then the time.",
     None, ["get_weather", "get_time"]),
    ("<think>w7</think>Let me look." + CALL, 1, "w7", "Let me look.", ["get_weather"]),
    (CALL, 5, None, None, ["get_weather"]),
    ("Sure, here you are: " + CALL + " Done.", 3, None, "Sure, here you are:Done.", ["get_weather"]),
    ("<think>no tools needed</think> It is sunny.", 4, "no tools needed", "It is sunny.", []),
    ("It is <b>sunny</b> <tool_", 2, None, "It is <b>sunny</b> <tool_", []),
])
def test_streamed_tool_calls_and_reasoning_add_up_to_the_whole_answer(scripted, text, size, reasoning, content, names):
    whole, streamed = whole_and_streamed(scripted, pieces(text, size), tools=[WEATHER, TIME])
    got = summary(whole)
    assert (got[0], got[1]) == (reasoning, content) == streamed[:2]
    assert [c["name"] for c in got[2]] == names == [c["name"] for c in streamed[2]]
    assert [c["arguments"] for c in got[2]] == [c["arguments"] for c in streamed[2]]
    assert all(c["id"].startswith("call_") for c in got[2] + streamed[2])
    if names:
        assert json.loads(got[2][0]["arguments"]) == {"city": "Paris"}
    assert got[3] == streamed[3] == ("tool_calls" if names else "stop")


def test_parallel_tool_calls_false_keeps_the_first_call(scripted):
    whole, streamed = whole_and_streamed(scripted, pieces(CALL + SECOND_CALL, 6), tools=[WEATHER, TIME],
                                         parallel_tool_calls=False)
    assert [c["name"] for c in summary(whole)[2]] == ["get_weather"] == [c["name"] for c in streamed[2]]


def test_tool_choice_none_leaves_the_text_as_content(scripted):
    whole, streamed = whole_and_streamed(scripted, pieces(CALL, 4), tools=[WEATHER], tool_choice="none")
    assert summary(whole)[1] == CALL == streamed[1] and not streamed[2]
    assert scripted.llm.params.structured_outputs is None


@pytest.mark.parametrize("tool_choice, text, names", [
    ({"type": "function", "function": {"name": "get_weather"}}, ' {"city": "Paris"} ', ["get_weather"]),
    ("required", '[{"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": "get_time", "parameters": {}}]',
     ["get_weather", "get_time"]),
])
def test_required_and_named_tool_choice_constrain_the_output_to_calls(scripted, tool_choice, text, names):
    whole, streamed = whole_and_streamed(scripted, pieces(text, 5), tools=[WEATHER, TIME], tool_choice=tool_choice)
    assert scripted.llm.params.structured_outputs.json == constrained_tool_schema([WEATHER, TIME], tool_choice)
    got = summary(whole)
    assert [c["name"] for c in got[2]] == names == [c["name"] for c in streamed[2]]
    assert [c["arguments"] for c in got[2]] == [c["arguments"] for c in streamed[2]]
    assert json.loads(got[2][0]["arguments"]) == {"city": "Paris"} and got[1] is None


@pytest.mark.parametrize("response_format, field, value", [
    ({"type": "json_object"}, "json_object", True),
    ({"type": "json_schema", "json_schema": {"name": "city", "schema": WEATHER["function"]["parameters"]}}, "json",
     WEATHER["function"]["parameters"]),
])
def test_response_format_becomes_a_structured_output_constraint(scripted, response_format, field, value):
    scripted.llm.script = ['{"city": ', '"Paris"}']
    got = client(scripted).chat.completions.create(model="scripted", messages=USER, response_format=response_format)
    assert getattr(scripted.llm.params.structured_outputs, field) == value
    assert json.loads(got.choices[0].message.content) == {"city": "Paris"}


def test_structured_outputs_extension_reaches_the_engine(scripted):
    scripted.llm.script = ["yes"]
    client(scripted).completions.create(model="scripted", prompt="w5", extra_body={"structured_outputs": {
        "choice": ["yes", "no"]}})
    assert scripted.llm.params.structured_outputs.choice == ["yes", "no"]


def test_a_tool_round_trip_conversation_renders_and_answers(scripted):
    scripted.llm.script = ["It is 18 degrees."]
    got = client(scripted).chat.completions.create(model="scripted", tools=[WEATHER], messages=[
        *USER, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees"}])
    assert got.choices[0].message.content == "It is 18 degrees." and got.choices[0].finish_reason == "stop"


def test_responses_stream_function_calls_and_reasoning_as_items(scripted):
    scripted.llm.script = pieces("<think>w7</think>" + CALL + SECOND_CALL, 6)
    api = client(scripted)
    tools = [{"type": "function", "name": t["function"]["name"], "parameters": t["function"]["parameters"]}
             for t in (WEATHER, TIME)]
    whole = api.responses.create(model="scripted", input="w5", tools=tools)
    assert [item.type for item in whole.output] == ["reasoning", "function_call", "function_call"]
    assert whole.output[0].content[0].text == "w7"
    calls = [(item.name, item.arguments) for item in whole.output[1:]]
    assert calls == [("get_weather", '{"city": "Paris"}'), ("get_time", "{}")]
    events = list(api.responses.create(model="scripted", input="w5", tools=tools, stream=True))
    arguments: dict[int, str] = {}
    for event in events:
        if event.type == "response.function_call_arguments.delta":
            arguments[event.output_index] = arguments.get(event.output_index, "") + event.delta
    assert [arguments.get(1, ""), arguments.get(2, "")] == ['{"city": "Paris"}', "{}"]
    added = [e.item for e in events if e.type == "response.output_item.added"]
    assert [(item.type, getattr(item, "name", None)) for item in added] == [
        ("reasoning", None), ("function_call", "get_weather"), ("function_call", "get_time")]
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == "w7"
    final = events[-1].response
    assert events[-1].type == "response.completed"
    assert [(item.name, item.arguments) for item in final.output[1:]] == calls

    scripted.llm.script = ["The answer."]
    answer = api.responses.create(model="scripted", tools=tools, input=[
        {"role": "user", "content": "w5"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "18 degrees"}])
    assert answer.output_text == "The answer."


SMOLLM_LIKE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
               "'<|im_end|>' + '\n'}}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TOOLS_AWARE = ("{{ tools | tojson }}|{% for m in messages %}{{ m.role }}:{{ m.content }}"
               "{% for c in m.tool_calls or [] %}[{{ c.function.name }} {{ c.function.arguments | tojson }}]"
               "{% endfor %}"
               "|{% endfor %}")


def _render(template: str) -> str:
    tokenizer = Tokenizer(Tokenizer.word_level(8).hf, eos_token="<eos>", chat_template=template)
    messages = [ChatMessage(**m) for m in [
        {"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "18 degrees"}]]
    return chat_prompt.render(tokenizer, messages, [ChatTool(**WEATHER)])


def test_a_template_without_tools_gets_them_in_the_system_message_and_calls_in_hermes_form():
    text = _render(SMOLLM_LIKE)
    assert text.startswith("<|im_start|>system\nBe brief.\n\nYou can call these functions")
    assert '"name": "get_weather"' in text.split("</tools>")[0]
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' \
           in text
    assert "<|im_start|>user\n<tool_response>\n18 degrees\n</tool_response><|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_a_template_with_tools_gets_them_and_the_arguments_as_an_object():
    tools, rest = _render(TOOLS_AWARE).split("|", 1)
    assert json.loads(tools)[0]["function"]["name"] == "get_weather"
    assert rest == 'system:Be brief.|user:Weather?|assistant:[get_weather {"city": "Paris"}]|tool:18 degrees|'
