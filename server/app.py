"""The server process: `jaxserve serve`. One `AsyncLLM`, the Generation service, health and
reflection, an optional API key and TLS, Prometheus metrics, and a graceful SIGTERM."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from jaxserve.async_llm import AsyncLLM
from server import generation_pb2 as pb
from server.auth import ApiKeyInterceptor
from server.servicer import GenerationServicer, generic_handler

logger = logging.getLogger("jaxserve.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name


@dataclasses.dataclass
class ServerOptions:
    """Front-end options (the engine's are `EngineConfig`)."""

    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port
    metrics_port: int | None = None  # None: no Prometheus endpoint
    api_key: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    max_waiting_requests: int = 4096
    max_message_bytes: int = 4 << 20
    shutdown_grace_s: float = 30.0

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ValueError(f"metrics_port must be in [0, 65535], got {self.metrics_port}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        if self.max_waiting_requests < 1:
            raise ValueError(f"max_waiting_requests must be >= 1, got {self.max_waiting_requests}")
        if self.max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be >= 1024, got {self.max_message_bytes}")
        if self.shutdown_grace_s < 0:
            raise ValueError(f"shutdown_grace_s must be >= 0, got {self.shutdown_grace_s}")


class GrpcServer:
    """A started server over `llm`; `port` is the bound port. Stop with `await stop()`."""

    def __init__(self, llm: AsyncLLM, options: ServerOptions, model_name: str,
                 servicer_class: type[GenerationServicer] = GenerationServicer):
        self.llm, self.options = llm, options
        self.servicer = servicer_class(llm, model_name=model_name,
                                       max_waiting_requests=options.max_waiting_requests)
        interceptors = [ApiKeyInterceptor(options.api_key)] if options.api_key else []
        self.server = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.max_receive_message_length", options.max_message_bytes),
            ("grpc.max_send_message_length", options.max_message_bytes),
        ])
        self.server.add_generic_rpc_handlers((generic_handler(self.servicer),))
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server)
        address = f"{options.host}:{options.port}"
        if options.tls_cert:
            with open(options.tls_cert, "rb") as cert, open(options.tls_key, "rb") as key:
                credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
            self.port = self.server.add_secure_port(address, credentials)
        else:
            self.port = self.server.add_insecure_port(address)
        self.metrics_http = None
        self._stopped = False
        if options.metrics_port is not None:
            from server.metrics import start_metrics_server

            self.metrics_http, _ = start_metrics_server(llm, model_name, options.metrics_port, options.host)

    @property
    def metrics_port(self) -> int | None:
        return None if self.metrics_http is None else self.metrics_http.server_port

    async def start(self) -> None:
        await self.server.start()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        logger.info("serving %s on %s:%d", SERVICE_NAME, self.options.host, self.port)

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new requests (UNAVAILABLE, health NOT_SERVING), let in-flight streams finish
        within `grace` seconds, then abort the rest (their streams end with finish_reason
        "abort"), stop the gRPC server and the engine. Idempotent."""
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
            for request_id in list(live):
                await self.llm.abort(request_id)
            await _wait_until(lambda: not live, 5.0)  # their last chunks go out
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


async def _wait_until(condition, timeout: float, poll: float = 0.02) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() >= deadline:
            return False
        await asyncio.sleep(poll)
    return True


async def serve(llm: AsyncLLM, options: ServerOptions, model_name: str) -> None:
    """Run until SIGTERM / SIGINT, then shut down gracefully."""
    server = GrpcServer(llm, options, model_name)
    await server.start()
    print(f"jaxserve: serving {model_name} on {options.host}:{server.port}"
          + (f", metrics on :{server.metrics_port}" if server.metrics_port else ""), flush=True)
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
    await server.stop()
