"""A real gRPC server on 127.0.0.1 over a tiny random-weight engine, run on its own event loop in
a background thread; tests talk to it with real clients. `http_server` serves the OpenAI-compatible
HTTP API too, over a tiny model given a short chat template."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import pytest

from jaxserve.async_llm import AsyncLLM
from models.tokenizer import Tokenizer
from server.app import GrpcServer, ServerOptions
from tests.engine_utils import tiny_engine, tiny_loaded_model

# Engine options shared by the server and the offline reference (same buckets, same batching).
ENGINE_OPTIONS = dict(max_num_seqs=32, max_num_batched_tokens=128, max_model_len=96, block_size=4,
                      kv_cache_memory_bytes=4 << 20, token_buckets=(32, 128), request_buckets=(8, 32))


class ServerThread:
    """A `GrpcServer` on its own event loop thread. `call(coro)` runs a coroutine there."""

    def __init__(self, engine, model_name: str = "tiny", **options):
        self.llm, self.model_name = AsyncLLM(engine=engine), model_name
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="grpc-server-loop", daemon=True)
        self.thread.start()
        self.server = self.call(self._start(ServerOptions(port=0, **options)))
        self.target = f"127.0.0.1:{self.server.port}"

    async def _start(self, options):
        server = GrpcServer(self.llm, options, model_name=self.model_name)
        await server.start()
        return server

    @property
    def http_url(self) -> str:
        """The HTTP API's root (`/v1` is below it)."""
        return f"http://127.0.0.1:{self.server.http_port}"

    def call(self, coro, timeout=60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def engine_call(self, function):
        """Run `function` on the engine thread between steps."""
        return self.call(self.llm._call(function))

    def idle_state(self):
        engine = self.llm.engine
        return self.engine_call(lambda: (engine.kv_cache_usage(), engine.num_running(), engine.num_waiting(),
                                         len(engine.states)))

    def stop(self, grace=0.0):
        self.call(self.server.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="session")
def tiny_loaded():
    return tiny_loaded_model()


# ChatML in few tokens (the tiny tokenizer makes a token of every word and run of punctuation); it
# lists tool names and writes `<tool_call>`, so the hermes tool parser is the one chosen for it.
TINY_CHAT_TEMPLATE = (
    "{% if tools %}<tools>{% for tool in tools %} {{ tool.function.name }}{% endfor %} </tools> {% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }} {{ m.content }}"
    "{% for call in m.tool_calls or [] %} <tool_call> {{ call.function.name }} </tool_call>{% endfor %}"
    "<|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")


def tiny_chat_model(loaded):
    """`loaded` with a tokenizer that has TINY_CHAT_TEMPLATE (the shared one is left as it is)."""
    tokenizer = Tokenizer(loaded.tokenizer.hf, eos_token="<eos>", chat_template=TINY_CHAT_TEMPLATE)
    return dataclasses.replace(loaded, tokenizer=tokenizer)


def http_server_thread(tiny_loaded, **options) -> ServerThread:
    """A server with the HTTP API on a free port (and the gRPC one, metrics, `<think>` parsing)."""
    options = dict(http_port=0, metrics_port=0, reasoning_parser="think", **options)
    return ServerThread(tiny_engine(tiny_chat_model(tiny_loaded), **ENGINE_OPTIONS), **options)


@pytest.fixture(scope="module")
def http_server(tiny_loaded):
    """One server with the HTTP API for a test module."""
    running = http_server_thread(tiny_loaded)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def server(tiny_loaded):
    """One server for a test module, with Prometheus metrics on a free port."""
    running = ServerThread(tiny_engine(tiny_loaded, **ENGINE_OPTIONS), metrics_port=0)
    yield running
    running.stop()
