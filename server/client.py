"""Clients for `jaxserve.v1.Generation`: `Client` (blocking) and `AsyncClient` (asyncio).

    with Client("127.0.0.1:50051") as client:
        for chunk in client.generate("The capital of France is", max_tokens=16, temperature=0):
            print(chunk.text, end="", flush=True)

Sampling options are `SamplingParams` keywords; `prompt` is a string or a list of token ids;
`structured_outputs` is a `StructuredOutputsParams` or a dict of its fields, e.g.
`structured_outputs={"json": {"type": "object"}}`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Sequence

import grpc

from server import generation_pb2 as pb
from server import generation_pb2_grpc as pb_grpc

_REPEATED = ("stop", "stop_token_ids")
_CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object")


def make_request(prompt: str | Sequence[int], *, request_id: str = "", priority: int = 0,
                 cache_salt: str = "", **sampling) -> pb.GenerateRequest:
    """A `GenerateRequest`; `sampling` holds `SamplingParams` fields (unset ones keep defaults)."""
    request = pb.GenerateRequest(request_id=request_id, priority=priority, cache_salt=cache_salt)
    if isinstance(prompt, str):
        request.text = prompt
    else:
        request.token_ids.ids.extend(prompt)
    for name, value in sampling.items():
        if value is None:
            continue
        if name in _REPEATED:
            getattr(request.sampling, name).extend([value] if isinstance(value, str) else value)
        elif name == "logit_bias":
            request.sampling.logit_bias.update({int(k): v for k, v in value.items()})
        elif name == "structured_outputs":
            request.sampling.structured_outputs.CopyFrom(structured_outputs_message(value))
        else:
            setattr(request.sampling, name, value)
    return request


def structured_outputs_message(value) -> pb.StructuredOutputs:
    """A `StructuredOutputsParams` (or a dict of its fields) as its message; a `json` schema given
    as a dict travels as JSON text."""
    fields = value if isinstance(value, dict) else {name: getattr(value, name) for name in _CONSTRAINTS}
    message = pb.StructuredOutputs()
    for name, field in fields.items():
        if field is None:
            continue
        if name == "choice":
            message.choice.extend(field)
        else:
            setattr(message, name, field if name != "json" or isinstance(field, str) else json.dumps(field))
    return message


class _Completion:
    """Index 0's chunks joined."""

    def __init__(self):
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.last: pb.GenerateResponse | None = None

    def add(self, chunk: pb.GenerateResponse) -> None:
        if chunk.index == 0:
            self.text.append(chunk.text)
            self.token_ids.extend(chunk.token_ids)
            self.last = chunk

    def result(self) -> tuple[str, list[int], pb.GenerateResponse | None]:
        return "".join(self.text), self.token_ids, self.last


def _metadata(api_key: str | None):
    return (("authorization", f"Bearer {api_key}"),) if api_key else None


def _credentials(root_certificates: bytes | None):
    return grpc.ssl_channel_credentials(root_certificates=root_certificates)


class Client:
    """A blocking client. `tls_root_cert` (PEM bytes) switches to a TLS channel."""

    def __init__(self, target: str = "127.0.0.1:50051", *, api_key: str | None = None,
                 tls_root_cert: bytes | None = None, options: Sequence[tuple] = ()):
        self.channel = (grpc.secure_channel(target, _credentials(tls_root_cert), options=options)
                        if tls_root_cert else grpc.insecure_channel(target, options=options))
        self.stub = pb_grpc.GenerationStub(self.channel)
        self.metadata = _metadata(api_key)

    def generate(self, prompt: str | Sequence[int], *, timeout: float | None = None, **kwargs
                 ) -> Iterator[pb.GenerateResponse]:
        """Stream `GenerateResponse` chunks; breaking out of the loop cancels the request."""
        call = self.stub.Generate(make_request(prompt, **kwargs), timeout=timeout, metadata=self.metadata)
        try:
            yield from call
        finally:
            call.cancel()

    def complete(self, prompt: str | Sequence[int], **kwargs) -> tuple[str, list[int], pb.GenerateResponse]:
        """The whole completion of index 0: (text, token ids, last chunk)."""
        completion = _Completion()
        for chunk in self.generate(prompt, **kwargs):
            completion.add(chunk)
        return completion.result()

    def abort(self, request_id: str) -> bool:
        return self.stub.Abort(pb.AbortRequest(request_id=request_id), metadata=self.metadata).found

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        request = pb.TokenizeRequest(text=text, add_special_tokens=add_special_tokens)
        return list(self.stub.Tokenize(request, metadata=self.metadata).token_ids)

    def detokenize(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        request = pb.DetokenizeRequest(token_ids=token_ids, skip_special_tokens=skip_special_tokens)
        return self.stub.Detokenize(request, metadata=self.metadata).text

    def model_info(self) -> pb.GetModelInfoResponse:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=self.metadata)

    def load(self) -> pb.GetLoadResponse:
        return self.stub.GetLoad(pb.GetLoadRequest(), metadata=self.metadata)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class AsyncClient:
    """The asyncio client (create it inside the running loop)."""

    def __init__(self, target: str = "127.0.0.1:50051", *, api_key: str | None = None,
                 tls_root_cert: bytes | None = None, options: Sequence[tuple] = ()):
        self.channel = (grpc.aio.secure_channel(target, _credentials(tls_root_cert), options=options)
                        if tls_root_cert else grpc.aio.insecure_channel(target, options=options))
        self.stub = pb_grpc.GenerationStub(self.channel)
        self.metadata = _metadata(api_key)

    async def generate(self, prompt: str | Sequence[int], *, timeout: float | None = None, **kwargs
                       ) -> AsyncIterator[pb.GenerateResponse]:
        """Stream chunks; leaving the loop early (or cancelling the task) cancels the request."""
        call = self.stub.Generate(make_request(prompt, **kwargs), timeout=timeout, metadata=self.metadata)
        try:
            async for chunk in call:
                yield chunk
        finally:
            call.cancel()

    async def complete(self, prompt: str | Sequence[int], **kwargs) -> tuple[str, list[int], pb.GenerateResponse]:
        """The whole completion of index 0: (text, token ids, last chunk)."""
        completion = _Completion()
        async for chunk in self.generate(prompt, **kwargs):
            completion.add(chunk)
        return completion.result()

    async def abort(self, request_id: str) -> bool:
        return (await self.stub.Abort(pb.AbortRequest(request_id=request_id), metadata=self.metadata)).found

    async def load(self) -> pb.GetLoadResponse:
        return await self.stub.GetLoad(pb.GetLoadRequest(), metadata=self.metadata)

    async def model_info(self) -> pb.GetModelInfoResponse:
        return await self.stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=self.metadata)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()
