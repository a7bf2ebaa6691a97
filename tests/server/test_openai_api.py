"""The OpenAI-compatible HTTP API with the official `openai` client (sync and async) over a live
server on a tiny random-weight model: the answers are the engine's own (greedy), whole or
streamed, with OpenAI's shapes for choices, logprobs, usage and the Responses API's events."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import httpx
import openai
import pytest

from server.client import Client
from tests.server.openai_utils import (GREEDY, async_client, chat_prompt_ids, client, engine_complete, sse_chunks,
                                       sse_lines)

LONG = dict(extra_body={"ignore_eos": True})  # vLLM's sampling fields go through extra_body
MESSAGES = [{"role": "system", "content": "w3 w4"}, {"role": "user", "content": [{"type": "text", "text": "w5 w6"}]}]


@pytest.fixture(scope="module")
def api(http_server) -> openai.OpenAI:
    return client(http_server)


def test_models_lists_the_served_model(api):
    assert [model.id for model in api.models.list()] == ["tiny"]
    assert api.models.retrieve("tiny").owned_by == "jaxserve"
    with pytest.raises(openai.NotFoundError, match="gpt-4"):
        api.models.retrieve("gpt-4")


def test_completion_is_the_engines_greedy_answer_and_counts_its_tokens(http_server, api):
    prompt = [5, 6, 7, 8]
    text, ids, finish = engine_complete(http_server, prompt, max_tokens=7, ignore_eos=True, **GREEDY)
    got = api.completions.create(model="tiny", prompt=prompt, max_tokens=7, **LONG, **GREEDY)
    assert got.object == "text_completion" and got.id.startswith("cmpl-") and got.model == "tiny"
    (choice,) = got.choices
    assert (choice.text, choice.finish_reason, choice.index) == (text, finish, 0) == (text, "length", 0)
    assert (got.usage.prompt_tokens, got.usage.completion_tokens, got.usage.total_tokens) == (4, 7, 11)
    by_text = api.completions.create(model="tiny", prompt="w5 w6 w7 w8", max_tokens=7, **LONG, **GREEDY)
    assert by_text.choices[0].text == text


def test_several_prompts_times_n_choices_are_numbered_prompt_major(api):
    got = api.completions.create(model="tiny", prompt=[[5, 6], [7, 8, 9]], n=2, max_tokens=3, **LONG,
                                 temperature=1.0, seed=1)
    assert [c.index for c in got.choices] == [0, 1, 2, 3]
    assert got.usage.prompt_tokens == 5 and got.usage.completion_tokens == 12
    texts = api.completions.create(model="tiny", prompt=["w5 w6", "w7"], max_tokens=2, **LONG, **GREEDY)
    alone = [api.completions.create(model="tiny", prompt=p, max_tokens=2, **LONG, **GREEDY).choices[0].text
             for p in ("w5 w6", "w7")]
    assert [c.text for c in texts.choices] == alone


def test_streamed_completion_equals_the_whole_one_and_ends_with_done(http_server, api):
    body = dict(model="tiny", prompt=[9, 10, 11], max_tokens=9, **GREEDY)
    whole = api.completions.create(**body, **LONG)
    chunks = sse_chunks(http_server, "/v1/completions", {**body, "ignore_eos": True, "stream": True,
                                                          "stream_options": {"include_usage": True}})
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == whole.choices[0].text
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 9
    streamed = "".join(chunk.choices[0].text for chunk in api.completions.create(**body, **LONG, stream=True))
    assert streamed == whole.choices[0].text


def test_a_stop_string_ends_the_text_before_it(api):
    body = dict(model="tiny", prompt=[5, 6, 7], max_tokens=8, **LONG, **GREEDY)
    words = api.completions.create(**body).choices[0].text.split()
    stop = words[3]
    got = api.completions.create(**body, stop=[stop, "never-generated"]).choices[0]
    assert got.finish_reason == "stop" and got.text.split() == words[:words.index(stop)]
    assert got.model_extra["stop_reason"] == stop


def test_completion_logprobs_list_the_chosen_token_and_the_k_best(api):
    got = api.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=5, logprobs=3, **LONG, **GREEDY)
    logprobs = got.choices[0].logprobs
    assert "".join(" " + token for token in logprobs.tokens) == got.choices[0].text
    assert len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 5
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert len(top) == 3 and top[token] == pytest.approx(logprob) and logprob == max(top.values())
    lengths = [len(token) for token in logprobs.tokens]
    assert logprobs.text_offset == [sum(lengths[:i]) for i in range(5)]


def test_echo_puts_the_prompt_before_the_completion(api):
    got = api.completions.create(model="tiny", prompt="w5 w6", max_tokens=3, echo=True, logprobs=1,
                                 **LONG, **GREEDY)
    plain = api.completions.create(model="tiny", prompt="w5 w6", max_tokens=3, **LONG, **GREEDY)
    assert got.choices[0].text == "w5 w6" + plain.choices[0].text
    assert got.choices[0].logprobs.tokens[:2] == ["w5", "w6"] and got.choices[0].logprobs.token_logprobs[0] is None


def test_seed_logit_bias_and_min_tokens_reach_the_sampler(api):
    body = dict(model="tiny", prompt=[5, 6], max_tokens=6, temperature=1.0)
    first, second = (api.completions.create(**body, seed=7).choices[0].text for _ in range(2))
    assert first == second
    biased = api.completions.create(**body, logit_bias={"17": 100.0})
    assert biased.choices[0].text.split() == ["w17"] * 6
    lengthy = api.completions.create(**body, extra_body={"min_tokens": 6, "top_k": 5, "repetition_penalty": 1.1})
    assert lengthy.usage.completion_tokens == 6


def test_chat_is_the_engines_greedy_answer_to_the_templated_prompt(http_server, api):
    ids = chat_prompt_ids(http_server, MESSAGES)
    text, _, finish = engine_complete(http_server, ids, max_tokens=6, ignore_eos=True, **GREEDY)
    got = api.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, extra_body={"ignore_eos": True},
                                      **GREEDY)
    assert got.object == "chat.completion" and got.id.startswith("chatcmpl-")
    (choice,) = got.choices
    assert (choice.message.role, choice.message.content, choice.finish_reason) == ("assistant", text, finish)
    assert choice.message.tool_calls is None and "reasoning_content" not in (choice.message.model_extra or {})
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(ids), 6)
    limited = api.chat.completions.create(model="tiny", messages=MESSAGES, max_completion_tokens=2,
                                          extra_body={"ignore_eos": True}, **GREEDY)
    assert limited.usage.completion_tokens == 2 and limited.choices[0].finish_reason == "length"


def test_streamed_chat_with_n_2_adds_up_to_each_choice(http_server, api):
    body = dict(model="tiny", messages=MESSAGES, max_tokens=5, n=2, temperature=1.0, seed=4, ignore_eos=True)
    chunks = sse_chunks(http_server, "/v1/chat/completions", {**body, "stream": True,
                                                               "stream_options": {"include_usage": True}})
    texts, roles, finishes = ["", ""], [[], []], [None, None]
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        texts[choice["index"]] += choice["delta"].get("content") or ""
        roles[choice["index"]].append(choice["delta"].get("role"))
        finishes[choice["index"]] = choice["finish_reason"] or finishes[choice["index"]]
    assert [r[0] for r in roles] == ["assistant", "assistant"] and all(set(r[1:]) == {None} for r in roles)
    assert finishes == ["length", "length"] and chunks[-1]["usage"]["completion_tokens"] == 10
    whole = api.chat.completions.create(**{k: v for k, v in body.items() if k != "ignore_eos"},
                                        extra_body={"ignore_eos": True})
    assert [c.message.content for c in whole.choices] == texts  # the same seed: the same samples


def test_chat_logprobs_give_top_logprobs_per_token(api):
    got = api.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, logprobs=True, top_logprobs=2,
                                      extra_body={"ignore_eos": True}, **GREEDY)
    content = got.choices[0].logprobs.content
    assert "".join(" " + entry.token for entry in content) == got.choices[0].message.content
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].token == entry.token
        assert entry.bytes == list(entry.token.encode())


def test_async_client_streams_chat_and_completions_concurrently(http_server):
    async def main():
        async with async_client(http_server) as api:
            async def chat():
                stream = await api.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, stream=True,
                                                           extra_body={"ignore_eos": True}, **GREEDY)
                return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

            async def complete():
                got = await api.completions.create(model="tiny", prompt=[5, 6], max_tokens=4, **LONG, **GREEDY)
                return got.choices[0].text

            return await asyncio.gather(chat(), complete(), chat())

    first, completion, second = asyncio.run(main())
    assert first == second and len(first.split()) == 4 and len(completion.split()) == 4


def test_responses_answer_whole_and_as_events(http_server, api):
    body = dict(model="tiny", input="w5 w6", instructions="w3", max_output_tokens=5, **GREEDY)
    whole = api.responses.create(**body)
    assert whole.object == "response" and whole.status == "incomplete"
    assert whole.incomplete_details.reason == "max_output_tokens"
    assert whole.usage.output_tokens == 5 and whole.output[0].type == "message"
    ids = chat_prompt_ids(http_server, [{"role": "system", "content": "w3"}, {"role": "user", "content": "w5 w6"}])
    assert whole.usage.input_tokens == len(ids)
    assert whole.output_text == engine_complete(http_server, ids, max_tokens=5, **GREEDY)[0]
    events = list(api.responses.create(**body, stream=True))
    kinds = [event.type for event in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == whole.output_text
    assert events[-1].response.output_text == whole.output_text
    with httpx.stream("POST", http_server.http_url + "/v1/responses",
                      json={**body, "stream": True}, timeout=60) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[0] == "event: response.created" and "[DONE]" not in lines[-1]


def test_responses_take_a_conversation_of_items(api):
    got = api.responses.create(model="tiny", max_output_tokens=3, **GREEDY, input=[
        {"role": "user", "content": "w5"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "w6"}]},
        {"role": "user", "content": [{"type": "input_text", "text": "w7"}]}])
    assert got.usage.output_tokens == 3


def test_tokenize_and_detokenize_round_trip(http_server):
    tokens = httpx.post(http_server.http_url + "/tokenize", json={"prompt": "w5 w6 w7"}).json()
    assert tokens["tokens"] == [5, 6, 7] and tokens["count"] == 3 and tokens["max_model_len"] == 96
    strs = httpx.post(http_server.http_url + "/tokenize", json={"prompt": "w5", "return_token_strs": True}).json()
    assert strs["token_strs"] == ["w5"]
    text = httpx.post(http_server.http_url + "/detokenize", json={"tokens": [5, 6, 7]}).json()
    assert text == {"prompt": "w5 w6 w7"}


def test_health_and_metrics(http_server):
    assert httpx.get(http_server.http_url + "/health").status_code == 200
    metrics = httpx.get(http_server.http_url + "/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    assert 'jaxserve:num_requests_running{model_name="tiny"}' in metrics.text
    scraped = urllib.request.urlopen(f"http://127.0.0.1:{http_server.server.metrics_port}/metrics").read().decode()
    assert "jaxserve:engine_steps_total" in metrics.text and "jaxserve:engine_steps_total" in scraped


def test_grpc_and_http_share_one_engine(http_server, api):
    with Client(http_server.target) as grpc_client:
        _, grpc_ids, _ = grpc_client.complete([5, 6, 7, 8], max_tokens=5, ignore_eos=True, **GREEDY)
        text = api.completions.create(model="tiny", prompt=[5, 6, 7, 8], max_tokens=5, **LONG,
                                      **GREEDY).choices[0].text
    assert text.split() == [f"w{i}" for i in grpc_ids]


def test_stream_lines_are_json_chunks_of_one_id(http_server):
    lines = sse_lines(http_server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 3, "stream": True})
    chunks = [json.loads(line) for line in lines[:-1]]
    assert len({chunk["id"] for chunk in chunks}) == 1 and {c["object"] for c in chunks} == {"chat.completion.chunk"}
