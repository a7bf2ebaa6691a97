"""Listening ports that fail loudly. gRPC sets `SO_REUSEPORT` by default, so a second server on a
used port binds without complaint and the kernel splits new connections between the two; every
gRPC server here turns it off, and a port that cannot be bound is a `PortError` naming it."""

from __future__ import annotations

import errno
import socket

import grpc


class PortError(RuntimeError):
    """A listening port could not be bound; the message names the port and the host."""


def grpc_server(what: str, host: str, port: int, *, interceptors=(), options=(),
                credentials: grpc.ServerCredentials | None = None) -> tuple[grpc.aio.Server, int]:
    """A `grpc.aio` server (not started) listening on host:port, and its port (port 0 picks one).
    Call inside the running event loop; `what` names the port in errors ("gRPC")."""
    check_free(what, host, port)  # gRPC's own failure also logs a C-core line: ask first
    server = grpc.aio.server(interceptors=interceptors, options=[("grpc.so_reuseport", 0), *options])
    address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    try:
        bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:  # recent grpcio raises; older releases returned 0
        bound = 0
    if not bound:
        raise PortError(f"cannot bind {what} port {port} on {host} (in use, or {host} is not an address "
                        "of this machine)")
    return server, bound


def check_free(what: str, host: str, port: int) -> None:
    """Raise `PortError` if host:port is taken (or not ours to take), or if no address of `host`
    is this machine's."""
    try:
        addresses = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise PortError(f"cannot bind {what} port {port} on {host}: {exc.strerror}") from None
    errors = []
    for family, kind, proto, _, address in addresses:
        try:
            probe = socket.socket(family, kind, proto)
        except OSError as exc:  # e.g. no IPv6 here: the server binds what it can
            errors.append(exc)
            continue
        with probe:
            # As the server's own socket: a closed server's TIME_WAIT connections do not count.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                    raise bind_error(what, host, port, exc) from None
                errors.append(exc)
    if errors and len(errors) == len(addresses):
        raise bind_error(what, host, port, errors[0])


def bind_error(what: str, host: str, port: int, exc: OSError) -> PortError:
    """The `PortError` for an `OSError` from binding host:port."""
    if exc.errno == errno.EADDRINUSE:
        return PortError(f"{what} port {port} on {host} is already in use")
    return PortError(f"cannot bind {what} port {port} on {host}: {exc.strerror or exc}")


def listening_socket(what: str, host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A TCP socket bound to host:port (port 0 picks one) and listening, without `SO_REUSEPORT`,
    for a server started later on it (uvicorn). Raises `PortError` naming the port."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise PortError(f"cannot bind {what} port {port} on {host}: {exc.strerror}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT connections do not count
        sock.bind(address)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise bind_error(what, host, port, exc) from None
    sock.setblocking(False)
    return sock
