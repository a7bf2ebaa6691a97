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


def run_server(args: argparse.Namespace, config: EngineConfig) -> int:
    """Serve until SIGTERM / SIGINT (then a graceful stop); the engine starts first."""
    from jaxserve.async_llm import AsyncLLM
    from server.app import serve

    options = server_options_from_args(args)
    llm = AsyncLLM(config=config)
    asyncio.run(serve(llm, options, model_name=config.model))
    return 0
