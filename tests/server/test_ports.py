"""A port already taken (by a first server or anything else) stops a second server within seconds,
with one line naming the port; no two servers share a port (gRPC's SO_REUSEPORT is off)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time

import grpc
import pytest

from server import ports
from server.app import GrpcServer, ServerOptions
from server.ports import PortError
from server.router import Router, RouterOptions

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@contextlib.contextmanager
def held_port(reuseport: bool = False):
    """A port held by a plain listening socket: a first server that is not ours."""
    with socket.socket() as holder:
        if reuseport:
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def serve_process(*flags: str) -> tuple[subprocess.CompletedProcess, float]:
    """`jaxserve serve` as a process; it must fail before loading a model, so none exists. No HTTP
    API unless the flags ask for one (its default port, 8000, may be anyone's on this machine)."""
    if "--http-port" not in flags:
        flags = (*flags, "--http-port", "-1")
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "server.main", "serve", "--model", "no-such-model", *flags],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    return result, time.monotonic() - started


def assert_refused(result: subprocess.CompletedProcess, elapsed: float, what: str, port: int) -> None:
    assert result.returncode != 0
    assert result.stderr.strip() == f"jaxserve serve: {what} port {port} on 127.0.0.1 is already in use", result.stderr
    assert elapsed < 5.0, f"took {elapsed:.1f} s"


@pytest.mark.parametrize("what", ["gRPC", "metrics", "HTTP"])
def test_a_second_server_on_a_used_port_exits_within_seconds_naming_it(what):
    with held_port() as port:
        flags = {"gRPC": ("--port", str(port)), "metrics": ("--port", "0", "--metrics-port", str(port)),
                 "HTTP": ("--port", "0", "--http-port", str(port))}[what]
        result, elapsed = serve_process(*flags)
    assert_refused(result, elapsed, what, port)


def test_a_second_server_on_a_running_servers_ports_exits_within_seconds(server):
    grpc_port, metrics_port = server.server.port, server.server.metrics_port
    assert_refused(*serve_process("--port", str(grpc_port)), "gRPC", grpc_port)
    assert_refused(*serve_process("--port", "0", "--metrics-port", str(metrics_port)), "metrics", metrics_port)


def test_a_second_grpc_server_in_process_raises_a_port_error_and_the_first_serves_on(server):
    async def second(**options):
        return GrpcServer(server.llm, ServerOptions(**options), model_name="tiny")

    with pytest.raises(PortError, match=f"^gRPC port {server.server.port} on 127.0.0.1 is already in use$"):
        server.call(second(port=server.server.port))
    with pytest.raises(PortError, match=f"^metrics port {server.server.metrics_port} on 127.0.0.1 is already in use$"):
        server.call(second(port=0, metrics_port=server.server.metrics_port))
    with grpc.insecure_channel(server.target) as channel:  # no half-built second server took calls
        grpc.channel_ready_future(channel).result(timeout=10)


def test_grpc_itself_refuses_a_port_shared_with_so_reuseport(monkeypatch):
    # The first server sets SO_REUSEPORT, as gRPC does by default: had ours set it too, both would
    # bind and the kernel would split connections between them. Past the probe, gRPC must refuse.
    monkeypatch.setattr(ports, "check_free", lambda *args: None)

    async def bind(port):
        return ports.grpc_server("gRPC", "127.0.0.1", port)

    with held_port(reuseport=True) as port:
        with pytest.raises(PortError, match=f"gRPC port {port} on 127.0.0.1"):
            asyncio.run(bind(port))


def test_the_router_refuses_a_used_port():
    async def router(port):
        return Router(RouterOptions(prefill=("127.0.0.1:1",), decode=("127.0.0.1:2",), port=port))

    with held_port() as port:
        with pytest.raises(PortError, match=f"^router port {port} on 127.0.0.1 is already in use$"):
            asyncio.run(router(port))


def test_metrics_listen_on_loopback_unless_asked(server):
    assert ServerOptions().metrics_host == "127.0.0.1"
    assert server.server.metrics_http.server_address[0] == "127.0.0.1"
