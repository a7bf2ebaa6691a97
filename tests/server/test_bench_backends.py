"""`jaxserve bench serve`'s backends: the Python one over an in-process AsyncLLM end to end, the
OpenAI one's wire handling over httpx's mock transport (the body it sends, how it counts
messages and tokens, how it fails), and the SSE reader."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from jaxserve.async_llm import AsyncLLM
from server import bench
from server import bench_backends
from server.bench_backends import OpenAIBackend, PythonBackend, sse_data
from server.main import build_parser
from tests.engine_utils import tiny_engine, tiny_loaded_model, tiny_tokenizer


def _args(*flags: str):
    return build_parser("bench").parse_args(["bench", "serve", *flags])


def test_python_backend_runs_the_workload_and_reports_like_the_others(tmp_path, capsys):
    engine = tiny_engine(tiny_loaded_model(), stream_interval=2)
    out = tmp_path / "serve.json"
    args = _args("--backend", "python", "--num-prompts", "6", "--input-len", "5", "--output-len", "5",
                 "--max-concurrency", "4", "--request-rate", "100,inf", "--json", str(out))
    with AsyncLLM(engine=engine) as llm:
        assert bench.run(args, backend=PythonBackend(llm=llm)) == 0
        assert llm.is_running  # a caller's engine is left running
    sweep = json.loads(out.read_text())
    for r in sweep:
        assert (r["backend"], r["model"], r["device"]) == ("python", "tiny", "cpu: cpu")
        assert (r["completed"], r["failed"], r["output_tokens"]) == (6, 0, 30)  # EOS ignored
        assert (r["config"]["stream_interval"], r["config"]["max_num_seqs"]) == (2, 8)
        # Messages of 1, 2 and 2 tokens (the first token alone, then every stream_interval).
        assert r["messages_per_s"] * r["duration_s"] == pytest.approx(6 * 3)
        assert 0 < r["ttft_ms"]["p50"] <= r["e2el_ms"]["p50"]
    assert "backend / model / device" in capsys.readouterr().out


def _sse(*events) -> bytes:
    return "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events).encode()


def _choice(text, finish=None):
    return {"object": "text_completion", "choices": [{"index": 0, "text": text, "finish_reason": finish}],
            "usage": None}


class _FakeServer:
    """An httpx handler that answers like an OpenAI server, remembering the completion bodies."""

    def __init__(self, stream: bytes, status: int = 200):
        self.stream, self.status, self.bodies = stream, status, []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == "Bearer k"
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "served", "object": "model"}]})
        assert (request.method, request.url.path) == ("POST", "/v1/completions")
        self.bodies.append(json.loads(request.content))
        return httpx.Response(self.status, content=self.stream, headers={"content-type": "text/event-stream"})


def _run_openai(server: _FakeServer, tokenizer: str, prompts: list[list[int]]):
    async def go():
        backend = OpenAIBackend("http://test/", api_key="k", tokenizer=tokenizer, transport=httpx.MockTransport(server))
        async with backend:
            served = await backend.served_model()
            results, _ = await bench.run_load(backend, prompts, 4, float("inf"), None, 0)
        return served, results

    return asyncio.run(go())


@pytest.fixture
def tokenizer_folder(tmp_path):
    folder = tmp_path / "tok"
    tiny_tokenizer(96).save(folder)
    (folder / "config.json").write_text("{}")
    return str(folder)


def test_openai_backend_streams_completions_and_counts_tokens_from_usage(tokenizer_folder):
    stream = _sse(_choice(" a"), _choice(""), _choice(" b c", "length"),
                  {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}, "[DONE]")
    server = _FakeServer(stream)
    served, results = _run_openai(server, tokenizer_folder, [[5, 6, 7], [8]])
    assert (served.model, served.vocab_size, served.stream_interval) == ("served", 96, None)
    assert server.bodies[0] == {"model": "served", "prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0.0,
                                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    for r in results:
        # Every chunk with choices is a message (an empty text too); the usage chunk is not.
        assert (r.ok, r.output_tokens, len(r.chunk_times)) == (True, 4, 3)
        assert r.send <= r.chunk_times[0] <= r.chunk_times[-1]


@pytest.mark.parametrize("stream, status, error", [
    (b'{"error": {"message": "bad model"}}', 404, "HTTP 404: {\"error\""),
    (_sse(_choice(" a"), "[DONE]"), 200, "without a usage chunk"),
    (_sse({"error": {"message": "engine died"}}), 200, "error in the stream: {'message': 'engine died'}"),
])
def test_openai_backend_failures_are_failed_requests_with_the_reason(tokenizer_folder, stream, status, error):
    _, (result,) = _run_openai(_FakeServer(stream, status), tokenizer_folder, [[5]])
    assert not result.ok and error in result.error


def test_openai_backend_names_the_flag_when_no_tokenizer_is_found(tmp_path):
    with pytest.raises(SystemExit, match="--tokenizer MODEL"):
        _run_openai(_FakeServer(b""), str(tmp_path / "missing"), [[5]])


def test_sse_data_joins_data_lines_and_skips_other_fields():
    lines = [": keep-alive", "", "event: message", "id: 3", "data: {\"a\":", "data:1}", "", "", "data: [DONE]"]

    async def collect():
        async def source():
            for line in lines:
                yield line

        return [data async for data in sse_data(source())]

    assert asyncio.run(collect()) == ['{"a":\n1}', "[DONE]"]  # the last event needs no blank line after it


def test_make_backend_follows_the_flags():
    openai = bench.make_backend(_args("--backend", "openai", "--http-port", "8123", "--model", "m"))
    assert (openai.base_url, openai.model) == ("http://127.0.0.1:8123", "m")
    for url in ("http://h:9/", "http://h:9/v1", "http://h:9/v1/"):
        assert bench.make_backend(_args("--backend", "openai", "--base-url", url)).base_url == "http://h:9"
    assert bench.make_backend(_args("--target", "h:1")).target == "h:1"
    python = bench.make_backend(_args("--backend", "python", "--max-num-seqs", "4"))
    assert python.config.max_num_seqs == 4 and python.owned


def test_openai_and_grpc_backends_drive_a_live_server_alike(tmp_path):
    """The same workload through the live server's HTTP API and its gRPC service: every request
    completes with the tokens it asked for (EOS ignored), one message per streamed chunk."""
    from tests.server.conftest import http_server_thread

    loaded = tiny_loaded_model()
    folder = tmp_path / "tok"
    loaded.tokenizer.save(folder)
    (folder / "config.json").write_text("{}")
    running = http_server_thread(loaded)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]] * 2
    try:
        async def go(backend):
            async with backend:
                served = await backend.served_model()
                results, _ = await bench.run_load(backend, prompts, 6, float("inf"), None, 0)
            return served, results

        http_served, http_results = asyncio.run(go(OpenAIBackend(running.http_url, tokenizer=str(folder))))
        grpc_served, grpc_results = asyncio.run(go(bench_backends.GrpcBackend(running.target)))
    finally:
        running.stop()
    assert http_served.model == grpc_served.model == "tiny" and http_served.vocab_size == grpc_served.vocab_size
    for results in (http_results, grpc_results):
        assert [(r.ok, r.output_tokens) for r in results] == [(True, 6)] * len(prompts), results
        assert all(r.send <= r.chunk_times[0] for r in results)
