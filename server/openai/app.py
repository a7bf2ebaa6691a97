"""The FastAPI app (`build_app`) and its uvicorn server (`HttpServer`), run on a socket bound before
the model loads (`server.app.Listeners`) in the event loop that runs grpc.aio.

Routes: GET /v1/models, POST /v1/completions, /v1/chat/completions, /v1/responses, /tokenize,
/detokenize, GET /health (503 while draining), GET /metrics (the server's Prometheus registry).
Before any route, `RequestGuard` checks the API key (every path but /health) and the body size."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import socket

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from server.openai import chat_prompt
from server.openai.chat import create_chat_completion
from server.openai.completions import create_completion
from server.openai.errors import APIError, error_body, install_error_handlers
from server.openai.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, ResponsesRequest,
                                    TokenizeRequest)
from server.openai.responses import create_response
from server.openai.serving import Serving

logger = logging.getLogger("jaxserve.http")
OPEN_PATHS = ("/health",)  # answered without the API key: load balancers probe without it
_DRAIN_LIMIT = 64 << 20  # bytes of an oversized body read (and dropped) so the client sees the 413


def build_app(serving: Serving, *, registry: CollectorRegistry | None = None, api_key: str | None = None,
              max_body_bytes: int = 4 << 20) -> ASGIApp:
    """The HTTP API over `serving`, behind the key and body-size checks."""
    app = FastAPI(title="jaxserve", docs_url=None, redoc_url=None)
    install_error_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        if serving.gate.draining:
            return JSONResponse(error_body(503, "the server is shutting down", code="shutting_down"), status_code=503)
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        if registry is None:
            raise APIError(404, "this server exports no metrics")
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [_model_card(serving)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict:
        serving.check_model(name)
        return _model_card(serving)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await create_completion(serving, body, request.receive)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(serving, body, request.receive)

    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest, request: Request) -> Response:
        return await create_response(serving, body, request.receive)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        serving.check_model(body.model)
        tokenizer = serving.tokenizer
        if body.prompt is not None:
            ids = await serving.in_worker(tokenizer.encode, body.prompt, add_special_tokens=body.add_special_tokens)
        else:
            text = await serving.in_worker(chat_prompt.render, tokenizer, body.messages, body.tools,
                                           add_generation_prompt=body.add_generation_prompt,
                                           template_kwargs=body.chat_template_kwargs)
            ids = await serving.in_worker(tokenizer.encode, text, add_special_tokens=False)
        out = {"count": len(ids), "max_model_len": serving.max_model_len, "tokens": ids}
        if body.return_token_strs:
            out["token_strs"] = tokenizer.convert_ids_to_tokens(ids)
        return out

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        serving.check_model(body.model)
        vocab_size = serving.llm.engine.model_config.vocab_size
        for i, token in enumerate(body.tokens):
            if not 0 <= token < vocab_size:
                raise APIError(400, f"tokens[{i}] = {token} is not a token id in [0, {vocab_size})",
                               param=f"tokens[{i}]")
        return {"prompt": await serving.in_worker(serving.tokenizer.decode, body.tokens)}

    return RequestGuard(app, api_key=api_key, max_body_bytes=max_body_bytes)


def _model_card(serving: Serving) -> dict:
    return {"id": serving.model_name, "object": "model", "created": serving.created, "owned_by": "jaxserve",
            "root": serving.model_name, "max_model_len": serving.max_model_len}


class RequestGuard:
    """ASGI middleware: 401 without the API key (`Authorization: Bearer KEY` or `x-api-key: KEY`,
    as the gRPC server takes it) on every path but /health; 413 for a body over
    `max_body_bytes`, by its Content-Length or as it arrives. An oversized body is read to its
    end (up to 64 MiB) before the answer, so that the client, still sending, gets it."""

    def __init__(self, app: ASGIApp, *, api_key: str | None, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes
        self.api_key = None if api_key is None else api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or ())
        if self.api_key is not None and scope["path"] not in OPEN_PATHS and not self._authorized(headers):
            return await _send_error(send, 401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                     code="invalid_api_key", headers=[(b"www-authenticate", b"Bearer")])
        declared = headers.get(b"content-length", b"").decode("latin-1")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await _drain(receive, 0)
            return await _send_error(send, 413, self._too_large(int(declared)), code="request_too_large")
        received = 0

        async def limited() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    if message.get("more_body"):
                        await _drain(receive, received)
                    raise HTTPException(413, self._too_large(received))
            return message

        await self.app(scope, limited, send)

    def _too_large(self, size: int) -> str:
        return f"the request body is {size} bytes, over the limit of {self.max_body_bytes} (max_message_bytes)"

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        given = headers.get(b"authorization", b"")
        given = given[len(b"Bearer "):] if given.startswith(b"Bearer ") else headers.get(b"x-api-key", b"")
        return hmac.compare_digest(given, self.api_key)


async def _drain(receive: Receive, received: int) -> None:
    while received <= _DRAIN_LIMIT:
        message = await receive()
        if message["type"] != "http.request":
            return
        received += len(message.get("body", b""))
        if not message.get("more_body"):
            return


async def _send_error(send: Send, status: int, message: str, *, code: str | None = None,
                      headers: list[tuple[bytes, bytes]] = ()) -> None:
    response = JSONResponse(error_body(status, message, code=code), status_code=status)
    response.raw_headers.extend(headers)
    await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> dict:
    return {"type": "http.disconnect"}


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: SIGTERM belongs to the process (`run_until_signal`),
    which drains both front ends before stopping this one."""

    def capture_signals(self):
        return contextlib.nullcontext()


class HttpServer:
    """uvicorn serving `app` on an already-bound, listening socket, in the running event loop."""

    def __init__(self, app: ASGIApp, sock: socket.socket, *, ssl_certfile: str | None = None,
                 ssl_keyfile: str | None = None, shutdown_timeout_s: float = 2.0):
        self.sock = sock
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False, ws="none",
                                ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile,
                                timeout_graceful_shutdown=shutdown_timeout_s)
        self.server = _Server(config)
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.ensure_future(self.server.serve(sockets=[self.sock]))
        while not self.server.started:
            if self._task.done():
                self._task.result()  # its startup failed: raise why
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Close the socket and connections; requests still running get the shutdown timeout."""
        if self._task is None:
            self.sock.close()
            return
        self.server.should_exit = True
        await self._task
