"""gpt-oss over the HTTP API: chats rendered in the Harmony format (jaxserve/harmony.py), replies
split by channel into reasoning_content, content and tool calls, streamed exactly as whole; the
constraints Harmony cannot take are refused naming the field. A tiny random gpt-oss with the o200k
vocabulary size serves the end-to-end checks; scripted Harmony replies (rendered by the package)
drive the chat stream pieces the server sends."""

from __future__ import annotations

import json

import numpy as np
import openai
import pytest

from jaxserve.harmony import Harmony
from jaxserve.sampling_params import SamplingParams
from server.openai.chat_output import OutputRules
from tests.engine_utils import tiny_engine, tiny_loaded_model
from tests.jaxserve.test_harmony import WEATHER, package_rendering, replies, tiny_gpt_oss
from tests.server.conftest import ServerThread
from tests.server.openai_utils import client

oh = pytest.importorskip("openai_harmony")


@pytest.fixture(scope="module")
def harmony(harmony_vocab):
    return Harmony()


@pytest.fixture(scope="module")
def gpt_oss_server(harmony):
    engine = tiny_engine(tiny_loaded_model(tiny_gpt_oss()), max_model_len=256, max_num_batched_tokens=128,
                         token_buckets=(128,))
    running = ServerThread(engine, http_port=0, metrics_port=0)
    yield running
    running.stop()


def test_chat_prompt_is_the_harmony_rendering_and_streams_as_whole(gpt_oss_server, harmony):
    """The prompt the engine receives is the package's rendering; with one seed, the streamed
    reply's reasoning and content add up to the whole reply's, which is the split of the tokens
    the engine samples for that prompt."""
    api = client(gpt_oss_server)
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    options = dict(model="tiny", messages=messages, max_tokens=10, temperature=1.0, seed=11, reasoning_effort="low")
    whole = api.chat.completions.create(**options)
    expected_prompt = package_rendering(harmony.encoding, effort="Low", instructions="Be brief.",
                                        turns=[oh.Message.from_role_and_content(oh.Role.USER, "What is 2+2?")])
    assert whole.usage.prompt_tokens == len(expected_prompt)
    reasoning, content = "", ""
    for chunk in api.chat.completions.create(**options, stream=True):
        for choice in chunk.choices:
            reasoning += getattr(choice.delta, "reasoning_content", None) or ""
            content += choice.delta.content or ""
    message = whole.choices[0].message
    assert (reasoning or None, content or None) == (getattr(message, "reasoning_content", None), message.content)

    async def engine_tokens():
        params = SamplingParams(max_tokens=10, temperature=1.0, seed=11).with_stop_token_ids(harmony.stop_token_ids)
        ids = []
        async for output in gpt_oss_server.llm.generate({"prompt_token_ids": expected_prompt}, params):
            ids += output.outputs[0].token_ids if output.outputs else []
        return ids

    split = harmony.parse(gpt_oss_server.call(engine_tokens()))
    assert (split.reasoning, split.content) == (getattr(message, "reasoning_content", None), message.content)


@pytest.mark.parametrize("extra, param", [
    (dict(tools=[WEATHER], tool_choice="required"), "tool_choice"),
    (dict(response_format={"type": "json_object"}), "response_format"),
    (dict(reasoning_effort="extreme"), "reasoning_effort"),
    (dict(extra_body={"chat_template_kwargs": {"enable_thinking": True}}), "chat_template_kwargs"),
])
def test_what_harmony_cannot_take_is_refused(gpt_oss_server, extra, param):
    with pytest.raises(openai.BadRequestError) as error:
        client(gpt_oss_server).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4, **extra)
    assert error.value.body["param"] == param


@pytest.mark.parametrize("name", ["answer", "call"])
def test_chat_stream_pieces_add_up_to_the_whole(harmony, name):
    """What the server sends for a scripted reply: deltas in any chunking of the tokens (as the
    engine's stream_interval cuts them) add up to the whole message, the call included."""
    tokens = replies(harmony.encoding)[name]
    rules = OutputRules(harmony=harmony)
    whole = rules.parse("", tokens)
    rng = np.random.default_rng(1)
    for _ in range(10):
        stream, reasoning, content, calls, start = rules.stream(), "", "", [], 0
        while start < len(tokens):
            size = int(rng.integers(1, 5))
            delta = stream.feed("", tokens[start: start + size])
            start += size
            reasoning, content, calls = reasoning + (delta.reasoning or ""), content + (delta.content or ""), calls + delta.calls
        last = stream.finish()
        reasoning, content, calls = reasoning + (last.reasoning or ""), content + (last.content or ""), calls + last.calls
        assert (reasoning or None, content or None) == (whole.reasoning, whole.content)
        assert [(c.index, c.name, c.arguments) for c in calls] == [(i, c.name, c.arguments)
                                                                   for i, c in enumerate(whole.calls)]
    if name == "call":
        assert [(c.name, json.loads(c.arguments)) for c in whole.calls] == [("get_weather", {"city": "Zürich"})]
