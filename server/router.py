"""`jaxserve router`: the `jaxserve.v1.Generation` service in front of prefill and decode workers.

Per request: the least-loaded prefill worker (by `GetLoad`: running + waiting, then KV usage) runs
the prompt (max_tokens=1, its KV saved); the least-loaded decode worker is told where the KV is
(metadata `x-jaxserve-kv-source`) and its tokens are streamed back. A worker that is unreachable
or exceeds `worker_timeout_s` (per call, and between two chunks) is skipped: the request is tried
on the next worker of that kind. Once a decode stream has sent tokens a failure cannot be retried
without repeating them: the stream ends with UNAVAILABLE. No stream waits forever.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid

import grpc

from server import generation_pb2 as pb
from server import generation_pb2_grpc as pb_grpc
from server.app import run_until_signal
from server.disagg import KV_SOURCE_KEY
from server.ports import grpc_server
from server.servicer import generic_handler

logger = logging.getLogger("jaxserve.router")
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)


@dataclasses.dataclass
class RouterOptions:
    prefill: tuple[str, ...]  # host:port of each prefill worker
    decode: tuple[str, ...]
    host: str = "127.0.0.1"
    port: int = 50050
    worker_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not self.prefill:
            raise ValueError("prefill must name at least one prefill worker (host:port)")
        if not self.decode:
            raise ValueError("decode must name at least one decode worker (host:port)")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.worker_timeout_s <= 0:
            raise ValueError(f"worker_timeout_s must be > 0, got {self.worker_timeout_s}")


class _Worker:
    def __init__(self, target: str):
        self.target = target
        # Reconnect quickly to a worker that comes back (gRPC's default backoff grows to 120 s).
        self.channel = grpc.aio.insecure_channel(target, options=[
            ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 1000)])
        self.stub = pb_grpc.GenerationStub(self.channel)


class RouterServicer:
    """Generation's methods, forwarded to workers (see the module docstring)."""

    def __init__(self, options: RouterOptions):
        self.options = options
        self.prefill = [_Worker(t) for t in options.prefill]
        self.decode = [_Worker(t) for t in options.decode]
        self.live: dict[str, _Worker] = {}  # request id -> its decode worker

    async def _ranked(self, workers: list[_Worker]) -> list[_Worker]:
        """Workers by load, least first; unreachable ones last (they may be back)."""
        async def load(worker):
            try:
                reply = await worker.stub.GetLoad(pb.GetLoadRequest(), timeout=min(2.0, self.options.worker_timeout_s))
                return (0, reply.num_running + reply.num_waiting, reply.kv_cache_usage)
            except grpc.RpcError:
                return (1, 0, 0.0)
        loads = await asyncio.gather(*(load(w) for w in workers))
        return [w for _, w in sorted(zip(loads, workers), key=lambda pair: pair[0])]

    async def _prefill(self, request: pb.GenerateRequest, context) -> _Worker:
        prefill_request = pb.GenerateRequest()
        prefill_request.CopyFrom(request)
        prefill_request.request_id = "prefill-" + request.request_id
        prefill_request.sampling.max_tokens = 1
        errors = []
        for worker in await self._ranked(self.prefill):
            try:
                call = worker.stub.Generate(prefill_request, timeout=self.options.worker_timeout_s)
                async for _ in call:
                    pass
                return worker
            except grpc.RpcError as exc:
                if exc.code() not in _RETRYABLE:
                    await context.abort(exc.code(), f"prefill worker {worker.target}: {exc.details()}")
                errors.append(f"{worker.target}: {exc.code().name}")
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"no prefill worker answered ({'; '.join(errors)})")

    async def Generate(self, request: pb.GenerateRequest, context):
        if not request.request_id:
            request.request_id = uuid.uuid4().hex
        prefill = await self._prefill(request, context)
        errors = []
        for worker in await self._ranked(self.decode):
            sent = False
            call = worker.stub.Generate(request, metadata=((KV_SOURCE_KEY, prefill.target),))
            self.live[request.request_id] = worker
            try:
                while True:
                    try:
                        chunk = await asyncio.wait_for(call.read(), self.options.worker_timeout_s)
                    except asyncio.TimeoutError:
                        call.cancel()
                        raise _Timeout() from None
                    if chunk is grpc.aio.EOF:
                        return
                    sent = True
                    yield chunk
            except (grpc.RpcError, _Timeout) as exc:
                code = exc.code() if isinstance(exc, grpc.RpcError) else grpc.StatusCode.DEADLINE_EXCEEDED
                detail = exc.details() if isinstance(exc, grpc.RpcError) else "no chunk in time"
                if code not in _RETRYABLE:
                    await context.abort(code, f"decode worker {worker.target}: {detail}")
                if sent:
                    await context.abort(grpc.StatusCode.UNAVAILABLE,
                                        f"decode worker {worker.target} failed mid-stream: {code.name} {detail}")
                errors.append(f"{worker.target}: {code.name}")
            finally:
                call.cancel()
                self.live.pop(request.request_id, None)
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"no decode worker answered ({'; '.join(errors)})")

    async def _any(self, workers, method: str, request):
        errors = []
        for worker in await self._ranked(workers):
            try:
                return await getattr(worker.stub, method)(request, timeout=self.options.worker_timeout_s)
            except grpc.RpcError as exc:
                errors.append(f"{worker.target}: {exc.code().name}")
                if exc.code() not in _RETRYABLE:
                    raise
        raise _Unavailable("; ".join(errors))

    async def _forward(self, workers, method, request, context):
        try:
            return await self._any(workers, method, request)
        except grpc.RpcError as exc:
            await context.abort(exc.code(), exc.details())
        except _Unavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"no worker answered {method} ({exc})")

    async def Abort(self, request, context):
        worker = self.live.get(request.request_id)
        if worker is None:
            return pb.AbortResponse(found=False)
        return await worker.stub.Abort(request, timeout=self.options.worker_timeout_s)

    async def Tokenize(self, request, context):
        return await self._forward(self.decode, "Tokenize", request, context)

    async def Detokenize(self, request, context):
        return await self._forward(self.decode, "Detokenize", request, context)

    async def GetModelInfo(self, request, context):
        return await self._forward(self.decode, "GetModelInfo", request, context)

    async def GetLoad(self, request, context):
        """The decode workers' load, summed (usage averaged) over those that answer."""
        replies = []
        for worker in self.decode:
            try:
                replies.append(await worker.stub.GetLoad(request, timeout=2.0))
            except grpc.RpcError:
                pass
        if not replies:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no decode worker answered GetLoad")
        return pb.GetLoadResponse(num_running=sum(r.num_running for r in replies),
                                  num_waiting=sum(r.num_waiting for r in replies),
                                  kv_cache_usage=sum(r.kv_cache_usage for r in replies) / len(replies))


class _Timeout(Exception):
    pass


class _Unavailable(Exception):
    pass


class Router:
    """A started-on-`start()` router server; `port` is the bound port."""

    def __init__(self, options: RouterOptions):
        self.options = options
        self.server, self.port = grpc_server("router", options.host, options.port)  # `PortError` if taken
        self.servicer = RouterServicer(options)
        self.server.add_generic_rpc_handlers((generic_handler(self.servicer),))

    async def start(self) -> None:
        await self.server.start()

    async def stop(self, grace: float = 0.5) -> None:
        await self.server.stop(grace)
        for worker in self.servicer.prefill + self.servicer.decode:
            await worker.channel.close()


async def serve_router(options: RouterOptions) -> None:
    """Run until SIGTERM / SIGINT."""
    
    router = Router(options)
    await router.start()
    print(f"jaxserve: router on {options.host}:{router.port} (prefill {', '.join(options.prefill)}; "
          f"decode {', '.join(options.decode)})", flush=True)
    await run_until_signal(router)
