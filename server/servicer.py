"""`jaxserve.v1.Generation` on grpc.aio over one `AsyncLLM`: every in-flight stream joins the same
continuous batch. A client cancel, an expired deadline or a lost connection cancels the handler,
which aborts the request (its KV blocks are free before the next step)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from collections.abc import AsyncIterator

import grpc

from jaxserve.async_llm import AsyncLLM, PreparedRequest
from server import convert
from server import generation_pb2 as pb

logger = logging.getLogger("jaxserve.server")


class GenerationServicer:
    """The service's methods. `max_waiting_requests` bounds the requests admitted but not yet
    streaming their first token; beyond it `Generate` answers RESOURCE_EXHAUSTED."""

    def __init__(self, llm: AsyncLLM, *, model_name: str, max_waiting_requests: int):
        if max_waiting_requests < 1:
            raise ValueError(f"max_waiting_requests must be >= 1, got {max_waiting_requests}")
        self.llm = llm
        self.model_name = model_name
        self.max_waiting_requests = max_waiting_requests
        self.num_queued = 0  # admitted, no first chunk yet (event-loop thread only)
        self.live: set[str] = set()  # request ids of the streams in flight
        self.draining = False  # shutting down: new requests are refused

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[pb.GenerateResponse]:
        prepared, request_id = await self._admit(request, context)
        # Admitted: nothing between here and the try may fail, and the finally undoes both.
        self.num_queued += 1
        self.live.add(request_id)
        queued = True
        try:
            completion_tokens = [0] * prepared.params.n  # n <= the engine's max_n
            stream = self.llm.generate(prepared, request_id=request_id)
            async with contextlib.aclosing(stream):
                async for output in stream:
                    if queued:
                        queued = False
                        self.num_queued -= 1
                    for chunk in convert.responses_from_output(output):
                        completion_tokens[chunk.index] += len(chunk.token_ids)
                        if chunk.finish_reason:
                            chunk.usage.CopyFrom(pb.Usage(
                                prompt_tokens=len(output.prompt_token_ids),
                                completion_tokens=completion_tokens[chunk.index],
                                cached_tokens=output.num_cached_tokens))
                        yield chunk
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status; a failed step fails only its requests
            if queued and isinstance(exc, ValueError):  # rejected by the engine's own checks
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            if _engine_gone(self.llm, exc):
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            logger.warning("request %s failed: %r", request_id, exc)
            await context.abort(grpc.StatusCode.INTERNAL, f"request {request_id}: the engine failed it: {exc!r}")
        finally:
            if queued:
                self.num_queued -= 1
            self.live.discard(request_id)

    async def _admit(self, request: pb.GenerateRequest, context) -> tuple[PreparedRequest, str]:
        """Check the whole request before anything changes, or end the call with the status that
        says why not: the fields (the prompt tokenized on a worker thread), then shutdown, the
        waiting room and the request id, with no await between those checks and the admission."""
        try:
            prompt = convert.prompt_from_proto(request)
            params = convert.sampling_params_from_proto(request.sampling)
            prepared = await self.llm.prepare(prompt, params, priority=request.priority)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        if self.num_queued >= self.max_waiting_requests:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{self.num_queued} requests are waiting (max_waiting_requests is "
                                f"{self.max_waiting_requests}); retry later")
        request_id = request.request_id or uuid.uuid4().hex
        if request_id in self.live:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request_id {request_id!r} is already in flight")
        return prepared, request_id

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        found = request.request_id in self.live
        if found:
            await self.llm.abort(request.request_id)
        return pb.AbortResponse(found=found)

    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        # On a worker thread: a 4 MB text would hold the event loop, and every stream, for seconds.
        ids = await asyncio.get_running_loop().run_in_executor(
            None, functools.partial(self.llm.tokenizer.encode, request.text,
                                    add_special_tokens=request.add_special_tokens))
        return pb.TokenizeResponse(token_ids=ids)

    async def Detokenize(self, request: pb.DetokenizeRequest, context) -> pb.DetokenizeResponse:
        vocab_size = self.llm.engine.model_config.vocab_size
        for i, token in enumerate(request.token_ids):
            if token >= vocab_size:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"token_ids[{i}] = {token} is not a token id in [0, {vocab_size})")
        text = await asyncio.get_running_loop().run_in_executor(
            None, functools.partial(self.llm.tokenizer.decode, list(request.token_ids),
                                    skip_special_tokens=request.skip_special_tokens))
        return pb.DetokenizeResponse(text=text)

    async def GetModelInfo(self, request, context) -> pb.GetModelInfoResponse:
        engine = self.llm.engine
        return pb.GetModelInfoResponse(
            model=self.model_name, architecture=engine.model_config.architecture,
            vocab_size=engine.model_config.vocab_size, max_model_len=engine.max_model_len,
            max_num_seqs=engine.config.max_num_seqs, stream_interval=engine.config.stream_interval,
            dtype=engine.config.dtype, block_size=engine.config.block_size,
            num_kv_blocks=engine.kv_plan.num_blocks, eos_token_ids=sorted(engine.eos_token_ids),
            device=device_kind())

    async def GetLoad(self, request, context) -> pb.GetLoadResponse:
        return pb.GetLoadResponse(num_running=self.llm.num_running, num_waiting=self.llm.num_waiting,
                                  kv_cache_usage=self.llm.kv_cache_usage)


def _engine_gone(llm: AsyncLLM, exc: Exception) -> bool:
    """Shut down or dead (AsyncLLM's own errors), as opposed to one failed step."""
    return not llm.is_running or (isinstance(exc, RuntimeError) and str(exc).startswith("AsyncLLM"))


def device_kind() -> str:
    import jax

    device = jax.devices()[0]
    return f"{device.platform}: {device.device_kind}"


def _parse_or_none(message_type):
    """A deserializer that turns malformed bytes into None (answered INVALID_ARGUMENT) instead of
    grpc's generic INTERNAL error."""

    def parse(data: bytes):
        try:
            return message_type.FromString(data)
        except Exception:  # noqa: BLE001 - protobuf raises DecodeError and others
            return None

    return parse


def _checked(method, message_type):
    """The handler with malformed request bytes answered INVALID_ARGUMENT, and an unexpected
    exception answered INTERNAL (logged once, with the method) instead of grpc's UNKNOWN."""
    name = message_type.DESCRIPTOR.name

    async def internal(context, exc):
        logger.exception("%s failed", method.__name__)
        await context.abort(grpc.StatusCode.INTERNAL, f"{method.__name__} failed: {type(exc).__name__}: {exc}")

    if method.__name__ == "Generate":
        async def streaming(request, context):
            if request is None:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: malformed {name} bytes")
            try:
                async for chunk in method(request, context):
                    yield chunk
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as exc:  # noqa: BLE001
                await internal(context, exc)
        return streaming

    async def unary(request, context):
        if request is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: malformed {name} bytes")
        try:
            return await method(request, context)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as exc:  # noqa: BLE001
            await internal(context, exc)
    return unary


def generic_handler(servicer: GenerationServicer) -> grpc.GenericRpcHandler:
    """The service's handlers, with malformed request bytes answered INVALID_ARGUMENT."""
    service = pb.DESCRIPTOR.services_by_name["Generation"]
    handlers = {}
    for method in service.methods:
        request_type = getattr(pb, method.input_type.name)
        response_type = getattr(pb, method.output_type.name)
        behaviour = _checked(getattr(servicer, method.name), request_type)
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(behaviour, request_deserializer=_parse_or_none(request_type),
                                     response_serializer=response_type.SerializeToString)
    return grpc.method_handlers_generic_handler(service.full_name, handlers)
