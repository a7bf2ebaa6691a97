"""`jaxserve serve` flags: every `ServerOptions` field (the engine's come from `EngineConfig`)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import typing

from jaxserve.config import EngineConfig
from server.app import ServerOptions

_HELP = {
    "host": "address to bind (loopback unless told otherwise)",
    "port": "gRPC port (0 picks a free one)",
    "metrics_port": "serve Prometheus /metrics on this port",
    "api_key": "require this key in metadata 'authorization: Bearer KEY' or 'x-api-key'",
    "tls_cert": "PEM certificate chain (with --tls-key)",
    "tls_key": "PEM private key (with --tls-cert)",
    "max_waiting_requests": "queued requests beyond this get RESOURCE_EXHAUSTED",
    "max_message_bytes": "largest request or response message",
    "shutdown_grace_s": "seconds in-flight requests get to finish after SIGTERM",
}


def add_server_flags(parser: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(ServerOptions)
    for field in dataclasses.fields(ServerOptions):
        hint = str(hints[field.name])
        kind = int if "int" in hint else float if "float" in hint else str
        parser.add_argument("--" + field.name.replace("_", "-"), type=kind, default=field.default,
                            help=f"{_HELP.get(field.name, '')} (default {field.default})")


def server_options_from_args(args: argparse.Namespace) -> ServerOptions:
    return ServerOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServerOptions)})


def add_role_flags(parser: argparse.ArgumentParser) -> None:
    from jaxserve.kv_transfer import DEFAULT_STORE_BYTES
    from server.disagg import ROLES

    parser.add_argument("--role", choices=ROLES, default="colocated",
                        help="prefill: run prompts and serve their KV (KVTransfer); decode: load KV from "
                             "the prefill worker a router names, then generate (default colocated)")
    parser.add_argument("--kv-timeout-s", type=float, default=30.0,
                        help="KV transfer call timeout (decode role); KV save timeout (prefill role)")
    parser.add_argument("--kv-store-bytes", type=int, default=DEFAULT_STORE_BYTES,
                        help="prefill role: host bytes of saved prompt blocks kept for decode workers "
                             "(LRU; a request's blocks are dropped once fetched; default 2 GiB)")


def run_server(args: argparse.Namespace, config: EngineConfig) -> int:
    """Serve until SIGTERM / SIGINT (then a graceful stop); the engine starts first."""
    from jaxserve.async_llm import AsyncLLM
    from server.app import serve

    options = server_options_from_args(args)
    role = getattr(args, "role", "colocated")
    if role == "colocated":
        llm = AsyncLLM(config=config)
        asyncio.run(serve(llm, options, model_name=config.model))
        return 0
    from jaxserve.engine import EngineCore
    from server.disagg import build_worker, serve_worker

    server_factory = lambda: build_worker(lambda connector: EngineCore(config, kv_connector=connector), role,  # noqa: E731
                                          options, config.model, config.block_size, args.kv_timeout_s,
                                          args.kv_store_bytes)
    asyncio.run(serve_worker(server_factory))
    return 0


def add_router_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prefill", required=True, help="comma-separated host:port of the prefill workers")
    parser.add_argument("--decode", required=True, help="comma-separated host:port of the decode workers")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50050)
    parser.add_argument("--worker-timeout-s", type=float, default=30.0,
                        help="a worker call (and the gap between two streamed chunks) may take this long")


def run_router(args: argparse.Namespace) -> int:
    from server.router import RouterOptions, serve_router

    split = lambda text: tuple(t for t in text.split(",") if t)  # noqa: E731
    options = RouterOptions(prefill=split(args.prefill), decode=split(args.decode), host=args.host,
                            port=args.port, worker_timeout_s=args.worker_timeout_s)
    asyncio.run(serve_router(options))
    return 0
