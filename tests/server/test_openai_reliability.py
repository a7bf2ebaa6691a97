"""The HTTP API under load and under clients that leave: 64 concurrent streams all finish with the
engine's greedy answers, and a client that disconnects (mid-stream, or while waiting for a whole
answer) aborts its requests, whose KV blocks are free within a step of the server noticing."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest

from tests.server.openai_utils import GREEDY, async_client, engine_complete
from tests.server.test_generate import EngineGate, scrape, wait_idle, wait_until

LONG = {"ignore_eos": True}


def test_64_concurrent_streams_all_finish_with_the_greedy_answers(http_server):
    prompts = [[5 + i, 6 + i, 7] for i in range(8)]
    expected = [engine_complete(http_server, p, max_tokens=12, ignore_eos=True, **GREEDY)[0] for p in prompts]
    before = scrape(http_server)

    async def main():
        async with async_client(http_server) as api:
            async def completion(prompt):
                stream = await api.completions.create(model="tiny", prompt=prompt, max_tokens=12, stream=True,
                                                      extra_body=LONG, **GREEDY)
                return "".join([chunk.choices[0].text async for chunk in stream])

            async def chat(prompt):  # the template wraps it: compare with itself, not the raw prompt
                stream = await api.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": " ".join(f"w{t}" for t in prompt)}],
                    max_tokens=12, stream=True, extra_body=LONG, **GREEDY)
                return "".join([chunk.choices[0].delta.content or "" async for chunk in stream])

            return await asyncio.gather(*(completion(prompts[i % 8]) for i in range(48)),
                                        *(chat(prompts[i % 8]) for i in range(16)))

    results = asyncio.run(main())
    assert results[:48] == [expected[i % 8] for i in range(48)]
    assert all(results[48 + i] == results[48 + i % 8] and len(results[48 + i].split()) == 12 for i in range(16))
    after = scrape(http_server)
    assert after["jaxserve:generation_tokens_total"] - before["jaxserve:generation_tokens_total"] == 64 * 12
    servicer = http_server.server.servicer
    assert wait_idle(http_server) and servicer.num_queued == 0 and not servicer.live


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 80}),
    ("/v1/completions", {"prompt": [[5, 6], [7, 8], [9]], "max_tokens": 80}),  # three engine requests, one stream
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "w5 w6"}], "max_tokens": 80}),
    ("/v1/responses", {"input": "w5 w6", "max_output_tokens": 80}),
])
def test_a_client_leaving_mid_stream_aborts_its_requests_within_a_step(http_server, path, body):
    servicer, engine = http_server.server.servicer, http_server.llm.engine
    aborted = scrape(http_server)['jaxserve:request_success_total{finished_reason="abort"}']
    count = len(body["prompt"]) if isinstance(body.get("prompt", [0])[0], list) else 1
    with httpx.stream("POST", http_server.http_url + path, timeout=60,
                      json={**body, "stream": True, **GREEDY, **({} if "input" in body else LONG)}) as response:
        lines = response.iter_lines()
        first_token = ('data: {"id":"cmpl', 'data: {"id":"chatcmpl', "event: response.output_text")
        while not next(lines).startswith(first_token):
            pass
        with EngineGate(http_server):  # no step runs until the server has seen the client go
            assert engine.kv_cache_usage() > 0 and len(servicer.live) == count
            response.close()
            assert wait_until(lambda: not servicer.live), "the server never saw the client leave"
            steps = engine.stats.steps
    assert wait_idle(http_server)
    # The aborts were queued before the gate opened: at most the step already due, then the one
    # that hands out the "abort" outputs. A missed disconnect would have run ~75 more.
    assert engine.stats.steps - steps <= 2
    after = scrape(http_server)['jaxserve:request_success_total{finished_reason="abort"}']
    assert after - aborted == count


def test_a_client_leaving_before_a_whole_answer_aborts_it(http_server):
    servicer = http_server.server.servicer
    failures = []

    def impatient():
        try:
            httpx.post(http_server.http_url + "/v1/chat/completions", timeout=1.0, json={
                "messages": [{"role": "user", "content": "w5"}], "max_tokens": 80, **LONG, **GREEDY})
        except httpx.TimeoutException as exc:
            failures.append(exc)

    with EngineGate(http_server):  # holds the answer back until the client has given up
        caller = threading.Thread(target=impatient)
        caller.start()
        assert wait_until(lambda: servicer.live)
        caller.join(30)
        assert failures, "the request was answered within the client's timeout"
        assert wait_until(lambda: not servicer.live), "the server never saw the client leave"
    assert wait_idle(http_server) and servicer.num_queued == 0
