"""The server process: `jaxserve serve`. One `AsyncLLM`, the Generation service, health and
reflection, an optional API key and TLS, Prometheus metrics, and a graceful SIGTERM."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import socket
import typing

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server import generation_pb2 as pb
from server.auth import ApiKeyInterceptor
from server.ports import grpc_server, listening_socket

if typing.TYPE_CHECKING:  # jax: imported only once the ports are bound (`Listeners`)
    from jaxserve.async_llm import AsyncLLM
    from server.metrics import MetricsServer
    from server.openai.app import HttpServer
    from server.servicer import GenerationServicer

logger = logging.getLogger("jaxserve.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name


@dataclasses.dataclass
class ServerOptions:
    """Front-end options (the engine's are `EngineConfig`)."""

    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port
    # The OpenAI-compatible HTTP API on `host` (0 picks a free port); None: no HTTP API. The
    # `jaxserve serve` command serves it on 8000 unless told `--http-port -1`.
    http_port: int | None = None
    tool_call_parser: str | None = None  # HTTP tool calls: a TOOL_PARSERS name; None: the chat template's
    reasoning_parser: str | None = None  # HTTP "think": `<think>...</think>` becomes reasoning_content
    metrics_port: int | None = None  # None: no Prometheus endpoint
    metrics_host: str = "127.0.0.1"  # metrics stay off public interfaces unless asked
    api_key: str | None = None  # on a command line, visible in `ps`: prefer api_key_file
    api_key_file: str | None = None  # the key on the file's one line
    tls_cert: str | None = None
    tls_key: str | None = None
    max_waiting_requests: int = 4096
    max_message_bytes: int = 4 << 20
    shutdown_grace_s: float = 30.0
    # A stream whose client reads nothing is paused once its buffer is full (AsyncLLM), and
    # aborted, its KV freed, after this many seconds; 0: never.
    stream_stall_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ValueError(f"metrics_port must be in [0, 65535], got {self.metrics_port}")
        if self.http_port is not None and not 0 <= self.http_port < 65536:
            raise ValueError(f"http_port must be in [0, 65535] (or None: no HTTP API), got {self.http_port}")
        from server.openai.reasoning import choose_reasoning_parser
        from server.openai.tool_parsers import TOOL_PARSERS

        choose_reasoning_parser(self.reasoning_parser)  # ValueError naming the choices
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_PARSERS:
            raise ValueError(f"tool_call_parser must be one of {', '.join(TOOL_PARSERS)} (or None: chosen from the "
                             f"chat template), got {self.tool_call_parser!r}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        if self.max_waiting_requests < 1:
            raise ValueError(f"max_waiting_requests must be >= 1, got {self.max_waiting_requests}")
        if self.max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be >= 1024, got {self.max_message_bytes}")
        if self.shutdown_grace_s < 0:
            raise ValueError(f"shutdown_grace_s must be >= 0, got {self.shutdown_grace_s}")
        if not self.stream_stall_timeout_s >= 0:
            raise ValueError(f"stream_stall_timeout_s must be >= 0 (0: never), got {self.stream_stall_timeout_s}")
        if self.api_key is not None and self.api_key_file is not None:
            raise ValueError("api_key and api_key_file are both given: give one")
        if self.api_key == "":
            raise ValueError("api_key must not be empty (leave it unset to serve without a key)")

    def resolved_api_key(self) -> str | None:
        """The key to require: `api_key`, else the line in `api_key_file`; None: no key."""
        if self.api_key_file is None:
            return self.api_key
        try:
            with open(self.api_key_file, encoding="utf-8") as file:
                key = file.read().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"api_key_file {self.api_key_file!r} cannot be read: "
                             f"{getattr(exc, 'strerror', None) or exc}") from None
        if not key or "\n" in key:
            raise ValueError(f"api_key_file {self.api_key_file!r} must hold the key on one line, "
                             f"got {'an empty file' if not key else 'several lines'}")
        return key


@dataclasses.dataclass
class Listeners:
    """A server's listening ports, bound before the model loads so that a clash costs seconds, not
    the minute of loading; the engine and servicer attach afterwards (`GrpcServer(listeners=)`).
    Python-socket listeners bind first (metrics, the HTTP API), gRPC's last."""

    server: grpc.aio.Server  # not started
    port: int
    metrics: MetricsServer | None = None
    http: socket.socket | None = None  # listening; uvicorn serves it once the engine is up

    @classmethod
    def bind(cls, options: ServerOptions) -> Listeners:
        """Bind every port `options` names, inside the running event loop (grpc.aio needs one).
        Raises `server.ports.PortError` naming a port that is taken, `ValueError` for a key,
        certificate or private key file that cannot be read."""
        api_key = options.resolved_api_key()
        credentials = None
        if options.tls_cert:
            try:
                with open(options.tls_cert, "rb") as cert, open(options.tls_key, "rb") as key:
                    credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
            except OSError as exc:
                raise ValueError(f"tls_cert / tls_key {exc.filename!r} cannot be read: {exc.strerror}") from None
        metrics = None
        if options.metrics_port is not None:
            from server.metrics import MetricsServer

            metrics = MetricsServer(options.metrics_port, options.metrics_host)
        http = None
        try:
            if options.http_port is not None:
                http = listening_socket("HTTP", options.host, options.http_port)
            server, port = grpc_server(
                "gRPC", options.host, options.port, credentials=credentials,
                interceptors=[ApiKeyInterceptor(api_key)] if api_key is not None else [],
                options=[("grpc.max_receive_message_length", options.max_message_bytes),
                         ("grpc.max_send_message_length", options.max_message_bytes)])
        except BaseException:
            if metrics is not None:
                metrics.server_close()
            if http is not None:
                http.close()
            raise
        return cls(server, port, metrics, http)


class GrpcServer:
    """A started server over `llm`; `port` is the bound port. Stop with `await stop()`."""

    def __init__(self, llm: AsyncLLM, options: ServerOptions, model_name: str,
                 servicer_class: type[GenerationServicer] | None = None, listeners: Listeners | None = None):
        from server.servicer import GenerationServicer, generic_handler

        listeners = listeners or Listeners.bind(options)  # the CLI binds them before building `llm`
        self.llm, self.options = llm, options
        llm.stream_stall_timeout_s = options.stream_stall_timeout_s or None  # a front-end option
        self.server, self.port = listeners.server, listeners.port
        self.servicer = (servicer_class or GenerationServicer)(llm, model_name=model_name,
                                                               max_waiting_requests=options.max_waiting_requests)
        self.server.add_generic_rpc_handlers((generic_handler(self.servicer),))
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server)
        self.metrics_http = listeners.metrics
        self._stopped = False
        registry = None
        if self.metrics_http is not None or listeners.http is not None:
            from server.metrics import engine_registry

            registry = engine_registry(llm, model_name)  # one for both exports
        if self.metrics_http is not None:
            self.metrics_http.serve(registry)
        self.http: HttpServer | None = None
        if listeners.http is not None:
            self.http = _http_server(llm, self.servicer, options, model_name, registry, listeners.http)

    @property
    def metrics_port(self) -> int | None:
        return None if self.metrics_http is None else self.metrics_http.server_port

    @property
    def http_port(self) -> int | None:
        return None if self.http is None else self.http.port

    async def start(self) -> None:
        await self.server.start()
        if self.http is not None:
            await self.http.start()
            logger.info("serving the OpenAI-compatible HTTP API on %s:%d", self.options.host, self.http.port)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        logger.info("serving %s on %s:%d", SERVICE_NAME, self.options.host, self.port)

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new requests (UNAVAILABLE, health NOT_SERVING; over HTTP 503), let in-flight
        streams of both front ends finish within `grace` seconds, then abort the rest (their
        streams end with finish_reason "abort"), stop the HTTP and gRPC servers and the engine.
        Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.options.shutdown_grace_s if grace is None else grace
        self.servicer.draining = True  # refuse first, then say so: nothing slips in between
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        live = self.servicer.live
        await _wait_until(lambda: not live, grace)
        if live:
            logger.info("grace period over: aborting %d requests", len(live))
            await self.llm.abort(list(live))  # one command: one abort per step took seconds
            # Their last chunks go out; a handler blocked on a client that does not read is
            # cancelled by the server's stop.
            await _wait_until(lambda: not live, 1.0)
        if self.http is not None:
            await self.http.stop()
        await self.server.stop(0.5)
        if self.metrics_http is not None:
            self.metrics_http.shutdown()
            self.metrics_http.server_close()
        await asyncio.get_running_loop().run_in_executor(None, self.llm.shutdown)

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()

    async def _set_health(self, status) -> None:
        for service in ("", SERVICE_NAME):
            result = self.health.set(service, status)
            if asyncio.iscoroutine(result):
                await result


def _http_server(llm: AsyncLLM, servicer: GenerationServicer, options: ServerOptions, model_name: str, registry,
                 sock: socket.socket) -> HttpServer:
    """The OpenAI-compatible HTTP API on `sock`, sharing the gRPC servicer's waiting room and drain."""
    from jaxserve.harmony import Harmony, uses_harmony
    from server.openai.app import HttpServer, build_app
    from server.openai.reasoning import choose_reasoning_parser
    from server.openai.serving import Serving
    from server.openai.tool_parsers import choose_tool_parser

    harmony = Harmony() if uses_harmony(llm.engine.model_config.architecture) else None
    serving = Serving(llm, servicer, model_name,
                      tool_parser=choose_tool_parser(options.tool_call_parser, llm.tokenizer.chat_template),
                      reasoning_parser=choose_reasoning_parser(options.reasoning_parser), harmony=harmony)
    app = build_app(serving, registry=registry, api_key=options.resolved_api_key(),
                    max_body_bytes=options.max_message_bytes)
    return HttpServer(app, sock, ssl_certfile=options.tls_cert, ssl_keyfile=options.tls_key)


async def _wait_until(condition, timeout: float, poll: float = 0.02) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() >= deadline:
            return False
        await asyncio.sleep(poll)
    return True


async def serve(llm: AsyncLLM, options: ServerOptions, model_name: str, listeners: Listeners | None = None) -> None:
    """Run until SIGTERM / SIGINT, then shut down gracefully."""
    server = GrpcServer(llm, options, model_name, listeners=listeners)
    await server.start()
    print(f"jaxserve: serving {model_name} on {options.host}:{server.port}"
          + (f", OpenAI-compatible HTTP API on {options.host}:{server.http_port}" if server.http else "")
          + (f", metrics on {options.metrics_host}:{server.metrics_port}" if server.metrics_http else ""),
          flush=True)
    logger.info("on SIGTERM: %.0f s grace for in-flight requests, then abort", options.shutdown_grace_s)
    await run_until_signal(server)


async def run_until_signal(server) -> None:
    """Serve until SIGTERM or SIGINT, then stop `server` (anything with async start/stop)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logger.info("shutting down")
    started = loop.time()
    await server.stop()
    logger.info("stopped in %.1f s", loop.time() - started)
