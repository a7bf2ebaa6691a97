"""The gRPC front end (`jaxserve.v1.Generation`): proto, servicer, server, client; the `jaxserve`
command (server/main.py)."""

from server._codegen import ensure_generated

try:
    ensure_generated()
except ImportError as missing:  # no grpcio-tools (a bare GPU image): `jaxserve generate` still runs
    _codegen_error = missing

    def __getattr__(name: str):
        if name.endswith(("_pb2", "_pb2_grpc")):  # `from server import generation_pb2`: say why it is absent
            raise ImportError(str(_codegen_error)) from _codegen_error
        raise AttributeError(f"module 'server' has no attribute {name!r}")
