"""API-key check on call metadata: `authorization: Bearer KEY` or `x-api-key: KEY`. The health
service stays open so that load balancers can probe without the key."""

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
        if handler is None or handler_call_details.method.startswith(HEALTH_PREFIX):
            return handler
        if self._authorized(handler_call_details.invocation_metadata or ()):
            return handler
        return _refusing(handler)

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


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind that answers UNAUTHENTICATED."""
    message = "missing or wrong API key: send metadata 'authorization: Bearer <key>' or 'x-api-key: <key>'"

    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def streaming(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # makes this an async generator

    kwargs = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.request_streaming:
        raise NotImplementedError("no client-streaming methods are served")
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming, **kwargs)
    return grpc.unary_unary_rpc_method_handler(unary, **kwargs)
