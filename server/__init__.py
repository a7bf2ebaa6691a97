"""The gRPC front end (`jaxserve.v1.Generation`): proto, servicer, server, client."""

from server._codegen import ensure_generated

ensure_generated()
