"""`jaxserve serve` flags: every `ServerOptions` field (the engine's come from `EngineConfig`)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import typing

from jaxserve.config import EngineConfig
from server.app import Listeners, ServerOptions
from server.ports import PortError

API_KEY_ENV = "JAXSERVE_API_KEY"  # the key, when neither --api-key nor --api-key-file is given

_HELP = {
    "host": "address to bind (loopback unless told otherwise)",
    "port": "gRPC port (0 picks a free one)",
    "http_port": "OpenAI-compatible HTTP API port, on --host (0 picks a free one; -1: no HTTP API)",
    "tool_call_parser": "how the HTTP API reads tool calls from completions (unset: the format the chat "
                        "template implies, if any)",
    "reasoning_parser": "split <think>...</think> from HTTP chat answers into reasoning_content (unset: no split)",
    "metrics_port": "serve Prometheus /metrics on this port",
    "metrics_host": "address for /metrics (loopback unless told otherwise)",
    "api_key": "require this key in metadata (HTTP: headers) 'authorization: Bearer KEY' or 'x-api-key' "
               f"(every RPC but health; HTTP: every path but /health); other users see it in `ps`: prefer "
               f"--api-key-file or ${API_KEY_ENV}",
    "api_key_file": f"read the API key from this file's one line (not with --api-key; with neither, "
                    f"${API_KEY_ENV} is read)",
    "tls_cert": "PEM certificate chain (with --tls-key)",
    "tls_key": "PEM private key (with --tls-cert)",
    "max_waiting_requests": "queued requests beyond this get RESOURCE_EXHAUSTED (HTTP: 429)",
    "max_message_bytes": "largest request or response message (HTTP: request body, beyond it 413)",
    "shutdown_grace_s": "seconds in-flight requests get to finish after SIGTERM",
    "stream_stall_timeout_s": "abort a stream whose client has read nothing for this long, freeing its KV "
                              "(it stops advancing once 64 chunks wait unread); 0: never",
}


# Where the command's default differs from ServerOptions' (whose None keeps library users and
# tests off a fixed port).
_COMMAND_DEFAULTS = {"http_port": 8000}
NO_HTTP = -1  # --http-port -1: no HTTP API


def _choices() -> dict[str, list[str]]:
    from server.openai.reasoning import REASONING_PARSERS
    from server.openai.tool_parsers import TOOL_PARSERS

    return {"tool_call_parser": sorted(TOOL_PARSERS), "reasoning_parser": sorted(REASONING_PARSERS)}


def add_server_flags(parser: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(ServerOptions)
    choices = _choices()
    for field in dataclasses.fields(ServerOptions):
        hint = str(hints[field.name])
        kind = int if "int" in hint else float if "float" in hint else str
        default = _COMMAND_DEFAULTS.get(field.name, field.default)
        parser.add_argument("--" + field.name.replace("_", "-"), type=kind, default=default,
                            choices=choices.get(field.name), help=f"{_HELP.get(field.name, '')} (default {default})")


def server_options_from_args(args: argparse.Namespace, environ=os.environ) -> ServerOptions:
    """The flags' options; the API key from $JAXSERVE_API_KEY when no flag gives one."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServerOptions)}
    if given["http_port"] == NO_HTTP:
        given["http_port"] = None
    if given["api_key"] is None and given["api_key_file"] is None and API_KEY_ENV in environ:
        if not environ[API_KEY_ENV]:
            raise ValueError(f"${API_KEY_ENV} is set but empty (unset it to serve without a key)")
        given["api_key"] = environ[API_KEY_ENV]
    return ServerOptions(**given)


def add_role_flags(parser: argparse.ArgumentParser) -> None:
    from jaxserve.kv.transfer import DEFAULT_STORE_BYTES
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
    """Serve until SIGTERM / SIGINT (then a graceful stop). Every port is bound before jax is
    imported and the model loads: a clash (or a bad key file) exits in seconds, with one line."""
    try:
        options = server_options_from_args(args)
    except ValueError as exc:
        raise SystemExit(f"jaxserve serve: {exc}") from None
    role = getattr(args, "role", "colocated")
    if role != "colocated":  # clients reach disaggregated workers through the router (gRPC)
        options = dataclasses.replace(options, http_port=None)
    with asyncio.Runner() as runner:
        listeners = runner.run(_bind(options))
        if role == "colocated":
            from jaxserve.async_llm import AsyncLLM
            from server.app import serve

            llm = AsyncLLM(config=config)  # outside the event loop: Ctrl-C stops a long load at once
            runner.run(serve(llm, options, config.model, listeners))
            return 0
        from jaxserve.engine import EngineCore
        from server.disagg import build_worker, serve_worker

        make_engine = lambda connector: EngineCore(config, kv_connector=connector)  # noqa: E731
        runner.run(serve_worker(lambda: build_worker(make_engine, role, options, config.model, config.block_size,
                                                     args.kv_timeout_s, args.kv_store_bytes, listeners)))
    return 0


async def _bind(options: ServerOptions) -> Listeners:
    """Inside the event loop, as grpc.aio needs one."""
    try:
        return Listeners.bind(options)
    except (PortError, ValueError) as exc:
        raise SystemExit(f"jaxserve serve: {exc}") from None


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
    try:
        asyncio.run(serve_router(options))
    except PortError as exc:
        raise SystemExit(f"jaxserve router: {exc}") from None
    return 0
