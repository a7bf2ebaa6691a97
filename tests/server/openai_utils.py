"""Helpers for the HTTP API tests: clients for a running server, the engine's own answer to compare
with, and server-sent events read off the wire."""

from __future__ import annotations

import importlib.util
import json

import httpx
import openai
import pytest

from jaxserve.sampling_params import SamplingParams

GREEDY = dict(temperature=0.0)

# Constrained decoding (tool_choice required / named, response_format, structured_outputs) runs in
# the engine once jaxserve/structured_output.py is there; until then such requests run unconstrained.
needs_structured_outputs = pytest.mark.skipif(
    importlib.util.find_spec("jaxserve.structured_output") is None,
    reason="the engine does not enforce structured outputs yet (jaxserve/structured_output.py)")


def client(server, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.http_url + "/v1", api_key=kwargs.pop("api_key", "unused"),
                         max_retries=0, timeout=120, **kwargs)


def async_client(server, **kwargs) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.http_url + "/v1", api_key=kwargs.pop("api_key", "unused"),
                              max_retries=0, timeout=120, **kwargs)


def engine_complete(server, prompt, **params) -> tuple[str, list[int], str]:
    """(text, token ids, finish reason) of one completion straight from the server's AsyncLLM."""

    async def run():
        text, ids, finish = "", [], None
        async for output in server.llm.generate(prompt, SamplingParams(**params)):
            completion = output.outputs[0] if output.outputs else None
            if completion is not None:
                text, ids = text + completion.text, ids + completion.token_ids
                finish = completion.finish_reason or finish
        return text, ids, finish

    return server.call(run())


def chat_prompt_ids(server, messages, **fields) -> list[int]:
    response = httpx.post(server.http_url + "/tokenize", json={"messages": messages, **fields}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["tokens"]


def sse_lines(server, path: str, body: dict, **kwargs) -> list[str]:
    """The `data:` payloads of a streamed answer, as sent ("[DONE]" included)."""
    with httpx.stream("POST", server.http_url + path, json=body, timeout=120, **kwargs) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


def sse_chunks(server, path: str, body: dict) -> list[dict]:
    """The JSON chunks of a streamed answer, after checking it ends with `data: [DONE]`."""
    lines = sse_lines(server, path, body)
    assert lines[-1] == "[DONE]" and "[DONE]" not in lines[:-1]
    return [json.loads(line) for line in lines[:-1]]


def error_of(response: httpx.Response) -> dict:
    """The `error` object of an error answer, after checking OpenAI's shape."""
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]
