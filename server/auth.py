"""API-key check on call metadata: `authorization: Bearer KEY` or `x-api-key: KEY`. Without it
every method (reflection and unknown ones included) answers UNAUTHENTICATED, except the health
service's: load balancers probe without the key."""

from __future__ import annotations

import hmac

import grpc

HEALTH_PREFIX = "/grpc.health.v1.Health/"


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, api_key: str):
        if not api_key:
            raise ValueError("api_key must be a non-empty string")
        self.api_key = api_key.encode()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler_call_details.method.startswith(HEALTH_PREFIX):
            return handler
        if self._authorized(handler_call_details.invocation_metadata or ()):
            return handler
        return _refusing(handler)  # every other method, reflection and unknown ones included

    def _authorized(self, metadata) -> bool:
        for key, value in metadata:
            value = value.encode() if isinstance(value, str) else value
            if key == "authorization" and value.startswith(b"Bearer "):
                value = value[len(b"Bearer "):]
            elif key != "x-api-key":
                continue
            if hmac.compare_digest(value, self.api_key):
                return True
        return False


def _refusing(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s kind (streaming requests, streaming responses) that answers
    UNAUTHENTICATED whatever the request; for an unknown method (None), a stream-stream one
    over raw bytes, which answers a call of any kind."""
    message = "missing or wrong API key: send metadata 'authorization: Bearer <key>' or 'x-api-key: <key>'"

    async def unary_response(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def stream_response(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # makes this an async generator

    if handler is None:
        return grpc.stream_stream_rpc_method_handler(stream_response)
    kwargs = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    make = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    streaming = handler.response_streaming
    return make[handler.request_streaming, streaming](stream_response if streaming else unary_response, **kwargs)
