"""Disaggregated serving: `jaxserve serve --role prefill|decode` workers.

A prefill worker runs each request's prompt with max_tokens=1 through a `PrefillConnector` that
saves its full prompt blocks into a local store, served to decode workers by `KVTransfer` on the
same port; its stream ends only once the blocks are in the store. A decode worker's engine has a
`DecodeConnector` over a `PeerTransport`: the router names, in the `x-jaxserve-kv-source`
metadata of each Generate call, the prefill worker holding the KV; the decode worker connects to
it (layout handshake once per peer), loads the blocks and streams the tokens.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc

from jaxserve.async_llm import AsyncLLM
from jaxserve.disagg_connector import DecodeConnector, PrefillConnector
from jaxserve.kv_transfer import InProcessTransport, KVHandshakeError
from server.app import GrpcServer, ServerOptions, run_until_signal
from server.kv_service import PeerTransport, add_kv_transfer_service
from server.servicer import GenerationServicer

ROLES = ("colocated", "prefill", "decode")
KV_SOURCE_KEY = "x-jaxserve-kv-source"


def prefill_servicer_class(connector: PrefillConnector) -> type[GenerationServicer]:
    class PrefillServicer(GenerationServicer):
        """Generate with max_tokens=1; the last chunk waits until the prompt's blocks are saved."""

        async def Generate(self, request, context):
            request.sampling.max_tokens = 1
            request.sampling.ClearField("min_tokens")
            async for chunk in super().Generate(request, context):
                if chunk.finish_reason:
                    await asyncio.get_running_loop().run_in_executor(None, connector.wait_for_save)
                yield chunk

    return PrefillServicer


def decode_servicer_class(transport: PeerTransport) -> type[GenerationServicer]:
    class DecodeServicer(GenerationServicer):
        """Generate after connecting to the prefill worker named in the call's metadata."""

        async def Generate(self, request, context):
            source = dict(context.invocation_metadata() or ()).get(KV_SOURCE_KEY)
            if source:
                try:
                    await asyncio.get_running_loop().run_in_executor(None, transport.add_peer, source)
                except KVHandshakeError as exc:
                    await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
                except grpc.RpcError as exc:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, f"KV source {source}: {exc.details()}")
            async for chunk in super().Generate(request, context):
                yield chunk

    return DecodeServicer


def build_worker(make_engine: Callable, role: str, options: ServerOptions, model_name: str, block_size: int,
                 kv_timeout_s: float = 30.0) -> GrpcServer:
    """A (not yet started) server for `role`; `make_engine(kv_connector)` builds its EngineCore."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if role == "colocated":
        return GrpcServer(AsyncLLM(engine=make_engine(None)), options, model_name)
    if role == "prefill":
        store = InProcessTransport()
        connector = PrefillConnector(store)
        engine = make_engine(connector)
        server = GrpcServer(AsyncLLM(engine=engine), options, model_name, prefill_servicer_class(connector))
        add_kv_transfer_service(server.server, store)
        return server
    transport = PeerTransport(timeout_s=kv_timeout_s)
    engine = make_engine(DecodeConnector(transport, block_size))
    return GrpcServer(AsyncLLM(engine=engine), options, model_name, decode_servicer_class(transport))


async def serve_worker(server_factory: Callable[[], GrpcServer]) -> None:
    """Build (inside the running loop, as grpc.aio needs), start, and serve until SIGTERM / SIGINT."""
    
    server = server_factory()
    await server.start()
    print(f"jaxserve: serving on {server.options.host}:{server.port}", flush=True)
    await run_until_signal(server)
