"""Where `jaxserve bench serve` sends its requests (`--backend`): the gRPC server, the
OpenAI-compatible HTTP API (streamed `/v1/completions`), or an `AsyncLLM` in this process.

A backend is an async context manager with two methods: `served_model()` (what the report names,
and the vocabulary the random prompts are drawn from) and `request(prompt, output_len, on_chunk)`,
which runs one greedy request of `output_len` tokens (EOS ignored), calls `on_chunk()` as each
streamed message of output arrives and returns the number of output tokens. bench.py holds the
clock, so every backend is timed the same way."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
from collections.abc import AsyncIterator, Callable

OnChunk = Callable[[], None]


@dataclasses.dataclass(frozen=True)
class ServedModel:
    model: str
    device: str
    vocab_size: int
    stream_interval: int | None = None  # None: the protocol does not say
    max_num_seqs: int | None = None


class GrpcBackend:
    """A running `jaxserve serve`, through the gRPC `Generate` stream."""

    def __init__(self, target: str, *, api_key: str | None = None):
        self.target, self.api_key = target, api_key

    async def __aenter__(self) -> GrpcBackend:
        from server.client import AsyncClient

        self.client = await AsyncClient(self.target, api_key=self.api_key).__aenter__()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.client.__aexit__(*exc_info)

    async def served_model(self) -> ServedModel:
        info = await self.client.model_info()
        return ServedModel(info.model, info.device or "unknown", info.vocab_size, info.stream_interval,
                           info.max_num_seqs)

    async def request(self, prompt: list[int], output_len: int, on_chunk: OnChunk) -> int:
        tokens = 0
        async for chunk in self.client.generate(prompt, max_tokens=output_len, temperature=0.0, ignore_eos=True):
            on_chunk()
            tokens += len(chunk.token_ids)
        return tokens


class OpenAIBackend:
    """An OpenAI-compatible server: `POST /v1/completions` with `stream: true`, read as
    server-sent events. Every chunk with `choices` is a message of output; the token count comes
    from the usage chunk (`stream_options.include_usage`), since text chunks carry no ids.

    The prompts are token ids, as in the other backends. The API does not say the vocabulary
    size: it is the tokenizer's of `tokenizer` (a jaxserve model name or path; default the served
    model). `ignore_eos` is vLLM's extension to the request. `base_url` may end in /v1 or not;
    `transport` is httpx's (tests)."""

    def __init__(self, base_url: str, *, api_key: str | None = None, model: str | None = None,
                 tokenizer: str | None = None, transport=None):
        base_url = base_url.rstrip("/")
        # OpenAI clients take the URL with its /v1; paths here carry it.
        self.base_url = base_url.removesuffix("/v1")
        self.api_key, self.model, self.tokenizer = api_key, model, tokenizer
        self.transport = transport

    async def __aenter__(self) -> OpenAIBackend:
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        # No pool limit (it would queue requests inside the client, inflating TTFT) and no read
        # timeout (a long stream under load is not an error), as the gRPC client has none.
        self.client = httpx.AsyncClient(
            base_url=self.base_url, headers=headers, transport=self.transport,
            timeout=httpx.Timeout(30.0, read=None),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.client.aclose()

    async def served_model(self) -> ServedModel:
        if self.model is None:
            response = await self.client.get("/v1/models")
            response.raise_for_status()
            served = [entry["id"] for entry in response.json()["data"]]
            if not served:
                raise RuntimeError(f"{self.base_url}/v1/models lists no model")
            self.model = served[0]
        return ServedModel(self.model, "unknown", _vocab_size(self.tokenizer or self.model))

    async def request(self, prompt: list[int], output_len: int, on_chunk: OnChunk) -> int:
        if self.model is None:
            raise RuntimeError("call served_model() first: it finds the model to name in requests")
        body = {"model": self.model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        tokens = None
        async with self.client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                detail = (await response.aread()).decode(errors="replace")[:300]
                raise RuntimeError(f"HTTP {response.status_code}: {detail}")
            async for data in sse_data(response.aiter_lines()):
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    raise RuntimeError(f"error in the stream: {chunk['error']}")
                if chunk.get("choices"):
                    on_chunk()
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        if tokens is None:
            raise RuntimeError("the stream ended without a usage chunk (stream_options.include_usage)")
        return tokens


async def sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The data of each server-sent event: its `data:` lines joined by newlines, up to the blank
    line that ends the event; comments (`:`) and other fields (`event:`, `id:`) are skipped."""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
            data = []
        elif line.startswith("data:"):
            value = line[len("data:"):]
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)


def _vocab_size(model: str) -> int:
    from models.loader import load_tokenizer, resolve_model_path

    try:
        return load_tokenizer(resolve_model_path(model)).vocab_size
    except (OSError, ValueError) as exc:
        raise SystemExit(f"--backend openai: no tokenizer for {model!r} to draw the random prompts from "
                         f"({exc}); name one with --tokenizer MODEL") from exc


class PythonBackend:
    """An `AsyncLLM` in this process: the engine with no network between. Built from `config`
    (and shut down on exit), or an `llm` the caller owns (a notebook's), left running."""

    def __init__(self, config=None, *, llm=None):
        if (config is None) == (llm is None):
            raise ValueError("pass either config= or llm=")
        self.config, self.llm, self.owned = config, llm, llm is None

    async def __aenter__(self) -> PythonBackend:
        if self.owned:
            from jaxserve.async_llm import AsyncLLM

            # Loading and compiling take a while: keep the event loop free meanwhile.
            loop = asyncio.get_running_loop()
            self.llm = await loop.run_in_executor(None, functools.partial(AsyncLLM, config=self.config))
        return self

    async def __aexit__(self, *exc_info) -> None:
        if self.owned:
            await self.llm.__aexit__(*exc_info)

    async def served_model(self) -> ServedModel:
        from server.servicer import device_kind

        engine = self.llm.engine
        return ServedModel(engine.config.model, device_kind(), engine.model_config.vocab_size,
                           engine.config.stream_interval, engine.config.max_num_seqs)

    async def request(self, prompt: list[int], output_len: int, on_chunk: OnChunk) -> int:
        from jaxserve.sampling_params import SamplingParams

        params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
        tokens = 0
        async for output in self.llm.generate({"prompt_token_ids": prompt}, params):
            on_chunk()
            tokens += len(output.outputs[0].token_ids)
        return tokens
