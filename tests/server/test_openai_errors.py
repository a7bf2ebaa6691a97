"""Bad input over HTTP: a 4xx in OpenAI's error shape whose `param` names the field, and the
server keeps serving. Also the API key (401), the waiting-room limit (429), a taken port, and a
graceful stop (503 for new requests while in-flight streams finish).

Unknown fields are a 400 naming them (OpenAI's own API rejects them too; vLLM ignores them by
default): a misspelt `max_token` would otherwise be a silently ignored limit."""

from __future__ import annotations

import asyncio
import threading

import httpx
import openai
import pytest

from server.app import GrpcServer, ServerOptions
from server.ports import PortError
from tests.server.conftest import http_server_thread
from tests.server.openai_utils import GREEDY, client, error_of
from tests.server.test_generate import EngineGate, wait_until

CHAT = {"messages": [{"role": "user", "content": "w5"}], "max_tokens": 2}


def post(server, path: str, **kwargs) -> httpx.Response:
    return httpx.post(server.http_url + path, timeout=60, **kwargs)


def still_serving(server) -> None:
    got = post(server, "/v1/completions", json={"prompt": [5, 6], "max_tokens": 2, "ignore_eos": True})
    assert got.status_code == 200 and got.json()["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("path, body, param, words", [
    ("/v1/completions", b'{"prompt": "w5", ', None, "not valid JSON"),
    ("/v1/completions", b'[1, 2]', None, "JSON object"),
    ("/v1/completions", b'{"max_tokens": 3}', "prompt", "required"),
    ("/v1/completions", b'{"prompt": "w5", "max_token": 3}', "max_token", "unknown field"),
    ("/v1/completions", b'{"prompt": "w5", "max_tokens": "3"}', "max_tokens", "valid integer"),
    ("/v1/completions", b'{"prompt": "w5", "n": true}', "n", "valid integer"),
    ("/v1/completions", b'{"prompt": [], "max_tokens": 3}', "prompt", "empty list"),
    ("/v1/completions", b'{"prompt": [5, "w6"]}', "prompt", "token ids"),
    ("/v1/completions", b'{"prompt": [5, 960]}', "prompt", "not a token id"),
    ("/v1/completions", b'{"prompt": "w5", "max_tokens": 0}', "max_tokens", ">= 1"),
    ("/v1/completions", b'{"prompt": "w5", "max_tokens": 200}', "max_tokens", "max_model_len"),
    ("/v1/completions", b'{"prompt": "w5", "temperature": -0.5}', "temperature", ">= 0.0"),
    ("/v1/completions", b'{"prompt": "w5", "top_p": 1.5}', "top_p", "(0.0, 1.0]"),
    ("/v1/completions", b'{"prompt": "w5", "logprobs": 500}', "logprobs", "logprobs"),
    ("/v1/completions", b'{"prompt": "w5", "logit_bias": {"abc": 1}}', "logit_bias", "token id"),
    ("/v1/completions", b'{"prompt": "w5", "stop": 5}', "stop", "valid string"),
    ("/v1/completions", b'{"prompt": "w5", "suffix": "x"}', "suffix", "not supported"),
    ("/v1/completions", b'{"prompt": [5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, '
     b'5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, '
     b'5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5]}', "prompt",
     "max_model_len"),
    ("/v1/chat/completions", b'{"messages": []}', "messages", "must not be empty"),
    ("/v1/chat/completions", b'{"messages": [{"role": "robot", "content": "w5"}]}', "messages[0].role", "robot"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user"}]}', "messages[0]", "content is required"),
    ("/v1/chat/completions", b'{"messages": [{"role": "tool", "content": "x"}]}', "messages[0]", "tool_call_id"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}',
     "messages[0].content[0].type", "image_url"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "w5"}], "max_completion_tokens": 500}',
     "max_completion_tokens", "max_model_len"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "w5"}], "top_logprobs": 2}', "top_logprobs",
     "logprobs: true"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "w5"}], "logprobs": true, "top_logprobs": 99}',
     "top_logprobs", "logprobs"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "w5"}], "tool_choice": "required"}',
     "tool_choice", "needs tools"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "w5"}], "tools": [{"type": "function", '
     b'"function": {"name": "f"}}], "tool_choice": {"type": "function", "function": {"name": "g"}}}', "tool_choice",
     "'g'"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "w5"}], "response_format": '
     b'{"type": "json_schema"}}', "response_format", "json_schema.schema"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "w5"}], "response_format": '
     b'{"type": "json_object"}, "structured_outputs": {"regex": "a+"}}', "structured_outputs", "give one"),
    ("/v1/responses", b'{"input": []}', "input", "must not be empty"),
    ("/v1/responses", b'{"input": "w5", "previous_response_id": "resp_1"}', "previous_response_id", "stores no"),
    ("/v1/responses", b'{"input": "w5", "max_output_tokens": 500}', "max_output_tokens", "max_model_len"),
    ("/v1/responses", b'{"input": [{"type": "function_call_output", "output": "x"}]}', "input[0]", "call_id"),
    ("/tokenize", b'{"prompt": "w5", "messages": []}', "prompt", "exactly one"),
    ("/detokenize", b'{"tokens": [5, 100000]}', "tokens[1]", "not a token id"),
])
def test_bad_input_is_a_400_naming_the_field_and_the_server_serves_on(http_server, path, body, param, words):
    response = post(http_server, path, content=body, headers={"content-type": "application/json"})
    error = error_of(response)
    assert response.status_code == 400, error
    assert (error["param"], error["type"]) == (param, "invalid_request_error"), error
    assert words in error["message"], error
    still_serving(http_server)


def test_unknown_model_endpoint_and_method(http_server):
    response = post(http_server, "/v1/chat/completions", json={"model": "gpt-4", **CHAT})
    assert response.status_code == 404
    assert error_of(response) == {"message": "model 'gpt-4' does not exist: this server serves 'tiny'",
                                  "type": "invalid_request_error", "param": "model", "code": "model_not_found"}
    response = post(http_server, "/v1/embeddings", json={"input": "w5"})
    assert response.status_code == 404 and "/v1/embeddings" in error_of(response)["message"]
    response = httpx.get(http_server.http_url + "/v1/completions")
    assert response.status_code == 405 and error_of(response)["message"]


def test_a_10_mb_body_is_a_413_and_the_server_serves_on(http_server):
    prompt = "w5 " * ((10 << 20) // 3)
    response = post(http_server, "/v1/completions", json={"prompt": prompt, "max_tokens": 1})
    assert response.status_code == 413 and error_of(response)["code"] == "request_too_large"
    assert "max_message_bytes" in error_of(response)["message"]

    def chunked():  # no Content-Length: counted as it arrives
        for _ in range(10):
            yield b" " * (1 << 20)

    response = post(http_server, "/v1/completions", content=chunked(), headers={"content-type": "application/json"})
    assert response.status_code == 413
    still_serving(http_server)


def test_openai_client_errors_carry_the_param(http_server):
    api = client(http_server)
    with pytest.raises(openai.BadRequestError) as error:
        api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "w5"}], max_tokens=-1)
    assert error.value.param == "max_tokens" and error.value.status_code == 400
    with pytest.raises(openai.BadRequestError) as error:
        api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "w5"}],
                                    extra_body={"no_such_field": 1})
    assert error.value.param == "no_such_field"


def test_a_full_waiting_room_is_a_429(http_server):
    servicer = http_server.server.servicer
    limit, servicer.max_waiting_requests = servicer.max_waiting_requests, 2
    try:
        with EngineGate(http_server):  # nothing gets a first token: both stay waiting
            holders = [threading.Thread(target=post, args=(http_server, "/v1/completions"),
                                        kwargs=dict(json={"prompt": [5], "max_tokens": 2})) for _ in range(2)]
            for holder in holders:
                holder.start()
            assert wait_until(lambda: servicer.num_queued == 2)
            response = post(http_server, "/v1/chat/completions", json=CHAT)
            assert response.status_code == 429 and error_of(response)["type"] == "rate_limit_error"
            assert "max_waiting_requests is 2" in error_of(response)["message"]
        for holder in holders:
            holder.join(60)
    finally:
        servicer.max_waiting_requests = limit
    assert servicer.num_queued == 0
    still_serving(http_server)


def test_the_api_key_guards_every_path_but_health(tiny_loaded):
    server = http_server_thread(tiny_loaded, api_key="sesame")
    try:
        response = post(server, "/v1/completions", json={"prompt": [5], "max_tokens": 1})
        assert response.status_code == 401 and error_of(response)["type"] == "authentication_error"
        assert httpx.get(server.http_url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(server.http_url + "/metrics").status_code == 401
        assert httpx.get(server.http_url + "/health").status_code == 200
        assert httpx.get(server.http_url + "/v1/models", headers={"x-api-key": "sesame"}).status_code == 200
        with pytest.raises(openai.AuthenticationError):
            client(server, api_key="wrong").models.list()
        got = client(server, api_key="sesame").completions.create(model="tiny", prompt=[5], max_tokens=2, **GREEDY)
        assert got.usage.completion_tokens >= 1
    finally:
        server.stop()


def test_a_taken_http_port_is_a_port_error_naming_it(http_server):
    async def second():
        return GrpcServer(http_server.llm, ServerOptions(port=0, http_port=http_server.server.http_port),
                          model_name="tiny")

    with pytest.raises(PortError, match=f"^HTTP port {http_server.server.http_port} on 127.0.0.1 is already in use$"):
        http_server.call(second())
    still_serving(http_server)


def test_a_graceful_stop_refuses_new_requests_and_lets_streams_finish(tiny_loaded):
    server = http_server_thread(tiny_loaded, shutdown_grace_s=60.0)
    ended = []

    def stream():
        with httpx.stream("POST", server.http_url + "/v1/completions", timeout=60, json={
                "prompt": [5, 6], "max_tokens": 60, "ignore_eos": True, "stream": True, **GREEDY}) as response:
            lines = [line for line in response.iter_lines() if line.startswith("data: ")]
        ended.append(lines)

    reader = threading.Thread(target=stream)
    try:
        with EngineGate(server):
            reader.start()
            assert wait_until(lambda: server.server.servicer.live)
            stopping = asyncio.run_coroutine_threadsafe(server.server.stop(), server.loop)
            assert wait_until(lambda: server.server.servicer.draining)
            refused = post(server, "/v1/chat/completions", json=CHAT)
            assert refused.status_code == 503 and error_of(refused)["code"] == "shutting_down"
            assert httpx.get(server.http_url + "/health").status_code == 503
        stopping.result(60)
        reader.join(60)
        (lines,) = ended
        assert lines[-1] == "data: [DONE]" and '"finish_reason":"length"' in lines[-2]
        with pytest.raises(httpx.TransportError):
            httpx.get(server.http_url + "/health", timeout=5)
    finally:
        server.loop.call_soon_threadsafe(server.loop.stop)
        server.thread.join(10)
