"""Disaggregated serving: `jaxserve serve --role prefill|decode` workers.

A prefill worker runs each request's prompt with max_tokens=1 through a `PrefillConnector` that
saves its full prompt blocks into a local store, served to decode workers by `KVTransfer` on the
same port; its stream ends only once the blocks are in the store. A decode worker's engine has a
`DecodeConnector` over a `PeerTransport`: the router names, in the `x-jaxserve-kv-source`
metadata of each Generate call, the prefill worker holding the KV; the decode worker connects to
it (layout handshake once per peer), loads the blocks and streams the tokens; when that worker is
gone, the decode worker computes the prompt itself. The prefill worker's store holds at most
`kv_store_bytes` (LRU) and drops a request's blocks once a decode worker has fetched them.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import typing
import uuid
from collections.abc import Callable

import grpc

from jaxserve.kv.transfer import DEFAULT_STORE_BYTES, InProcessTransport, KVHandshakeError
from server.app import GrpcServer, Listeners, ServerOptions, run_until_signal
from server.kv_service import PeerTransport, add_kv_transfer_service

# The engine side (jax) is imported where a worker is built: `jaxserve serve --role` reads ROLES
# and binds its ports before that.
if typing.TYPE_CHECKING:
    from jaxserve.kv.disagg_connector import PrefillConnector
    from server.servicer import GenerationServicer

logger = logging.getLogger("jaxserve.disagg")
ROLES = ("colocated", "prefill", "decode")
KV_SOURCE_KEY = "x-jaxserve-kv-source"


def prefill_servicer_class(connector: PrefillConnector, save_timeout_s: float = 30.0) -> type[GenerationServicer]:
    from server.servicer import GenerationServicer

    class PrefillServicer(GenerationServicer):
        """Generate with max_tokens=1; the last chunk waits until the prompt's blocks are saved."""

        async def Generate(self, request, context):
            request.sampling.max_tokens = 1
            request.sampling.n = 1  # the prompt's KV is the same for every completion
            request.sampling.ClearField("min_tokens")
            if not request.request_id:
                request.request_id = "prefill-" + uuid.uuid4().hex
            async for chunk in super().Generate(request, context):
                if chunk.finish_reason:
                    wait = functools.partial(connector.wait_for_save, request.request_id, save_timeout_s)
                    try:
                        await asyncio.get_running_loop().run_in_executor(None, wait)
                    except Exception as exc:  # noqa: BLE001 - a failed save: the decode side cannot load
                        await context.abort(grpc.StatusCode.UNAVAILABLE, f"saving the prompt's KV failed: {exc!r}")
                yield chunk

    return PrefillServicer


def decode_servicer_class(transport: PeerTransport) -> type[GenerationServicer]:
    from server.servicer import GenerationServicer

    class DecodeServicer(GenerationServicer):
        """Generate after connecting to the prefill worker named in the call's metadata."""

        async def Generate(self, request, context):
            source = dict(context.invocation_metadata() or ()).get(KV_SOURCE_KEY)
            if source:
                try:
                    await asyncio.get_running_loop().run_in_executor(None, transport.add_peer, source)
                except KVHandshakeError as exc:
                    await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
                except grpc.RpcError as exc:  # the prefill worker went away: compute the prompt here
                    logger.warning("KV source %s unreachable (%s): recomputing the prompt", source, exc.code())
            async for chunk in super().Generate(request, context):
                yield chunk

    return DecodeServicer


def build_worker(make_engine: Callable, role: str, options: ServerOptions, model_name: str, block_size: int,
                 kv_timeout_s: float = 30.0, kv_store_bytes: int = DEFAULT_STORE_BYTES,
                 listeners: Listeners | None = None) -> GrpcServer:
    """A (not yet started) server for `role`; `make_engine(kv_connector)` builds its EngineCore.
    A prefill worker keeps at most `kv_store_bytes` of saved blocks for decode workers to fetch.
    `listeners`: its ports, bound before the engine is built (else bound after)."""
    from jaxserve.async_llm import AsyncLLM
    from jaxserve.kv.disagg_connector import DecodeConnector, PrefillConnector

    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if not isinstance(kv_store_bytes, int) or kv_store_bytes < 1:
        raise ValueError(f"kv_store_bytes must be an integer >= 1, got {kv_store_bytes!r}")
    if role == "colocated":
        return GrpcServer(AsyncLLM(engine=make_engine(None)), options, model_name, listeners=listeners)
    if role == "prefill":
        store = InProcessTransport(kv_store_bytes)
        connector = PrefillConnector(store)
        engine = make_engine(connector)
        server = GrpcServer(AsyncLLM(engine=engine), options, model_name,
                            prefill_servicer_class(connector, kv_timeout_s), listeners)
        add_kv_transfer_service(server.server, store)
        return server
    transport = PeerTransport(timeout_s=kv_timeout_s)
    engine = make_engine(DecodeConnector(transport, block_size))
    return GrpcServer(AsyncLLM(engine=engine), options, model_name, decode_servicer_class(transport), listeners)


async def serve_worker(server_factory: Callable[[], GrpcServer]) -> None:
    """Build (inside the running loop, as grpc.aio needs), start, and serve until SIGTERM / SIGINT."""
    
    server = server_factory()
    await server.start()
    print(f"jaxserve: serving on {server.options.host}:{server.port}", flush=True)
    await run_until_signal(server)
