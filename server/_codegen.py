"""Generate `server/<name>_pb2*.py` from each `.proto` (generation, kv_transfer) with grpcio-tools.

The generated modules are never committed: `make setup` runs `python -m server._codegen`, and
importing `server` runs it too when they are missing or older than the .proto (fresh clones,
editable installs)."""

from __future__ import annotations

import os
import sys
import tempfile

SERVER_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(SERVER_DIR)
PROTOS = [os.path.join(SERVER_DIR, name + ".proto") for name in ("generation", "kv_transfer")]
PROTO = PROTOS[0]
OUTPUTS = [os.path.join(SERVER_DIR, os.path.basename(proto)[:-6] + suffix)
           for proto in PROTOS for suffix in ("_pb2.py", "_pb2_grpc.py")]


def is_stale() -> bool:
    if not os.path.exists(PROTO):  # an installed wheel: generated at build time, no .proto shipped
        return False
    proto_time = max(os.path.getmtime(proto) for proto in PROTOS if os.path.exists(proto))
    return any(not os.path.exists(path) or os.path.getmtime(path) < proto_time for path in OUTPUTS)


def generate() -> None:
    """Run protoc (from grpcio-tools) so that the modules import as `server.generation_pb2`."""
    try:
        from grpc_tools import protoc
    except ImportError as exc:
        raise ImportError("server/generation_pb2.py is missing and grpcio-tools is not installed: "
                          "pip install grpcio-tools (or `make setup`)") from exc
    import importlib.resources

    include = str(importlib.resources.files("grpc_tools") / "_proto")
    # Written to a scratch folder and renamed into place, so concurrent imports (pytest-xdist
    # workers) never read a half-written module.
    with tempfile.TemporaryDirectory(dir=SERVER_DIR) as scratch:
        args = ["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={scratch}", f"--pyi_out={scratch}",
                f"--grpc_python_out={scratch}", *PROTOS]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTOS}")
        generated = os.path.join(scratch, "server")
        for name in os.listdir(generated):
            os.replace(os.path.join(generated, name), os.path.join(SERVER_DIR, name))


def ensure_generated() -> None:
    if is_stale():
        generate()


if __name__ == "__main__":
    generate()
    print("generated", *OUTPUTS, file=sys.stderr)
