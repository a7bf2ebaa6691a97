"""API key, TLS, health states, reflection and graceful shutdown, each on its own small server."""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from server import generation_pb2 as pb
from server.app import ServerOptions
from server.cli import server_options_from_args
from server.client import AsyncClient, Client
from server.main import build_parser
from tests.engine_utils import tiny_engine
from tests.server.conftest import ENGINE_OPTIONS, ServerThread
from tests.server.test_generate import GREEDY

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def secured(tiny_loaded):
    """A server requiring KEY; these tests never step its engine."""
    running = ServerThread(tiny_engine(tiny_loaded, **ENGINE_OPTIONS), api_key=KEY)
    yield running
    running.stop()


@pytest.mark.parametrize("api_key", [None, "wrong-key"])
def test_a_missing_or_wrong_api_key_is_unauthenticated(secured, api_key):
    with Client(secured.target, api_key=api_key) as client:
        for call in (client.load, lambda: client.tokenize("w5"), lambda: list(client.generate([5], max_tokens=1))):
            with pytest.raises(grpc.RpcError) as error:
                call()
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "API key" in error.value.details()


def test_without_the_key_every_rpc_but_health_is_unauthenticated_and_logs_nothing(secured, caplog):
    caplog.set_level(logging.DEBUG)
    service = pb.DESCRIPTOR.services_by_name["Generation"]
    with grpc.insecure_channel(secured.target) as channel:
        for method in service.methods:  # every kind the service has, each with a valid request
            request_class = getattr(pb, method.input_type.name)
            kind = channel.unary_stream if method.server_streaming else channel.unary_unary
            call = kind(f"/{service.full_name}/{method.name}", request_serializer=request_class.SerializeToString)
            with pytest.raises(grpc.RpcError) as error:
                reply = call(request_class(), timeout=10)
                list(reply) if method.server_streaming else None
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED, method.name
        # Reflection is stream-stream: `grpcurl list` without the key gets a clear answer.
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                           timeout=10))
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "API key" in error.value.details()
        # A method that does not exist does not say so to a caller without the key.
        unknown = channel.unary_unary("/jaxserve.v1.Generation/NoSuchMethod")
        with pytest.raises(grpc.RpcError) as error:
            unknown(b"", timeout=10)
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(channel)  # health stays open
        serving = health_pb2.HealthCheckResponse.SERVING
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == serving
    time.sleep(0.2)  # anything the server would log about those calls is logged by now
    assert "Traceback" not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_the_right_api_key_is_accepted_in_either_header(secured):
    with Client(secured.target, api_key=KEY) as client:
        assert client.tokenize("w5 w6", add_special_tokens=False) == [5, 6]
        info = client.model_info()
        assert (info.model, info.vocab_size, info.max_model_len) == ("tiny", 96, 96)
        load = client.load()
        assert (load.num_running, load.num_waiting, load.kv_cache_usage) == (0, 0, 0.0)
        _, call = client.stub.GetLoad.with_call(pb.GetLoadRequest(), metadata=(("x-api-key", KEY),))
        assert call.code() == grpc.StatusCode.OK


def test_health_is_open_and_reports_serving(secured):
    with grpc.insecure_channel(secured.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        serving = health_pb2.HealthCheckResponse.SERVING
        assert stub.Check(health_pb2.HealthCheckRequest(service="")).status == serving
        assert stub.Check(health_pb2.HealthCheckRequest(service="jaxserve.v1.Generation")).status == serving
        with pytest.raises(grpc.RpcError) as error:
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
        assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_and_describes_the_service(secured):
    with grpc.insecure_channel(secured.target) as channel:
        channel = grpc.intercept_channel(channel, _Metadata((("x-api-key", KEY),)))
        database = ProtoReflectionDescriptorDatabase(channel)
        services = database.get_services()
        assert "jaxserve.v1.Generation" in services and "grpc.health.v1.Health" in services
        descriptor = database.FindFileContainingSymbol("jaxserve.v1.Generation")
        methods = {m.name for m in descriptor.service[0].method}
        assert methods == {"Generate", "Abort", "Tokenize", "Detokenize", "GetModelInfo", "GetLoad"}


def test_the_key_can_come_from_a_file(tiny_loaded, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    running = ServerThread(tiny_engine(tiny_loaded, **ENGINE_OPTIONS), api_key_file=str(key_file))
    try:
        with Client(running.target, api_key=KEY) as client:
            assert client.tokenize("w5", add_special_tokens=False) == [5]
        with Client(running.target) as client, pytest.raises(grpc.RpcError) as error:
            client.tokenize("w5")
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        running.stop()


def serve_options(*flags: str, environ=None) -> ServerOptions:
    return server_options_from_args(build_parser("serve").parse_args(["serve", *flags]), environ=environ or {})


def test_the_key_comes_from_a_flag_a_file_or_the_environment(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("from-file\r\n")
    environ = {"JAXSERVE_API_KEY": "from-env"}
    assert serve_options("--api-key", "from-flag", environ=environ).resolved_api_key() == "from-flag"
    assert serve_options("--api-key-file", str(key_file), environ=environ).resolved_api_key() == "from-file"
    assert serve_options(environ=environ).resolved_api_key() == "from-env"
    assert serve_options().resolved_api_key() is None


@pytest.mark.parametrize("content, problem", [(None, "cannot be read"), ("", "an empty file"), ("\n", "an empty file"),
                                              ("a\nb\n", "several lines")])
def test_an_unusable_key_file_is_an_error_naming_it(tmp_path, content, problem):
    key_file = tmp_path / "key"
    if content is not None:
        key_file.write_text(content)
    with pytest.raises(ValueError, match=f"api_key_file '{key_file}'.*{problem}"):
        ServerOptions(api_key_file=str(key_file)).resolved_api_key()


def test_conflicting_or_empty_keys_are_errors(tmp_path):
    with pytest.raises(ValueError, match="api_key and api_key_file"):
        serve_options("--api-key", "k", "--api-key-file", str(tmp_path / "key"))
    with pytest.raises(ValueError, match="api_key must not be empty"):
        serve_options("--api-key", "")
    with pytest.raises(ValueError, match="JAXSERVE_API_KEY is set but empty"):
        serve_options(environ={"JAXSERVE_API_KEY": ""})


class _Metadata(grpc.StreamStreamClientInterceptor):
    """Adds metadata to stream-stream calls (reflection is one)."""

    def __init__(self, metadata):
        self.metadata = metadata

    def intercept_stream_stream(self, continuation, details, requests):
        details = details._replace(metadata=tuple(details.metadata or ()) + self.metadata)
        return continuation(details, requests)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls_serves_a_client_that_trusts_the_certificate(tiny_loaded, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True)
    running = ServerThread(tiny_engine(tiny_loaded, **ENGINE_OPTIONS), tls_cert=str(cert), tls_key=str(key))
    try:
        with Client(running.target, tls_root_cert=cert.read_bytes()) as client:
            assert client.tokenize("w7", add_special_tokens=False) == [7]
        with Client(running.target) as plaintext:  # a plaintext client cannot talk to it
            with pytest.raises(grpc.RpcError) as error:
                plaintext.stub.GetLoad(pb.GetLoadRequest(), timeout=5)
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        running.stop()


def test_graceful_stop_lets_short_requests_finish_then_aborts_the_rest(tiny_loaded):
    # Buckets compiled before the clock starts: a first-step compile on a loaded CI machine once
    # ate the whole grace period.
    engine = tiny_engine(tiny_loaded, **{**ENGINE_OPTIONS, "compile_at_startup": True})
    step = engine.step
    grace = 1.5

    def slow_step():  # 40 ms a step: the long request (90 steps) cannot finish within the grace period
        time.sleep(0.04)
        return step()

    engine.step = slow_step
    running = ServerThread(engine)

    async def main():
        async with AsyncClient(running.target) as client:
            short = asyncio.create_task(client.complete([5, 6], max_tokens=5, **GREEDY))
            long = asyncio.create_task(client.complete([7, 8], max_tokens=90, **GREEDY))
            # Wait on states, not sleeps: a loaded CI machine stretches any fixed delay.
            async def both_admitted():
                return short.done() or await asyncio.to_thread(running.engine_call, engine.num_running) == 2

            assert await until(both_admitted)
            stopping = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(running.server.stop(grace), running.loop))
            health = health_pb2_grpc.HealthStub(client.channel)
            request = health_pb2.HealthCheckRequest(service="jaxserve.v1.Generation")

            async def not_serving():
                return (await health.Check(request)).status == health_pb2.HealthCheckResponse.NOT_SERVING

            assert await until(not_serving)
            with pytest.raises(grpc.RpcError) as refused:
                await client.complete([9], max_tokens=2)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            results = await asyncio.gather(short, long)
            await stopping
            return results

    started = time.monotonic()
    (_, short_ids, short_last), (_, long_ids, long_last) = asyncio.run(main())
    assert len(short_ids) == 5 and short_last.finish_reason == "length"
    assert long_last.finish_reason == "abort" and 0 < len(long_ids) < 90
    assert time.monotonic() - started < grace + 5
    assert not running.llm.is_running and not engine.states and engine.kv_cache_usage() == 0.0
    running.loop.call_soon_threadsafe(running.loop.stop)
    running.thread.join(10)


async def until(condition, timeout: float = 30.0) -> bool:
    """Awaits `condition()` every 10 ms until it holds (True) or `timeout` passes (False)."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True
