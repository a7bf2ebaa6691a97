"""Bad input over the wire: the right status code, a message naming the field, and the server
keeps serving. Also the waiting-request limit (RESOURCE_EXHAUSTED)."""

from __future__ import annotations

import math

import grpc
import pytest

from server import generation_pb2 as pb
from server.client import Client, make_request
from tests.engine_utils import failing_steps
from tests.server.test_generate import GREEDY, EngineGate, wait_idle, wait_until

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def client(server):
    with Client(server.target) as client:
        yield client


def status_of(client, request: pb.GenerateRequest):
    with pytest.raises(grpc.RpcError) as error:
        list(client.stub.Generate(request, timeout=30))
    return error.value.code(), error.value.details()


@pytest.mark.parametrize("request_kwargs, code, field", [
    (dict(prompt=""), INVALID, "prompt"),
    (dict(prompt=[]), INVALID, "prompt"),
    (dict(prompt="w5", max_tokens=-3), INVALID, "max_tokens"),
    (dict(prompt="w5", temperature=math.nan), INVALID, "temperature"),
    (dict(prompt="w5", top_p=1.5), INVALID, "top_p"),
    (dict(prompt=[5] * 96), INVALID, "max_model_len"),
    (dict(prompt=[5, 96, 7]), INVALID, "prompt_token_ids[1]"),
    (dict(prompt=[5], stop_token_ids=[500]), INVALID, "stop_token_ids"),
    (dict(prompt=[5], logprobs=10_000), INVALID, "logprobs"),
    (dict(prompt="w5 " * ((10 << 20) // 3)), grpc.StatusCode.RESOURCE_EXHAUSTED, ""),  # a 10 MB prompt
])
def test_bad_generate_inputs_get_the_right_status_and_the_server_keeps_serving(client, request_kwargs, code, field):
    prompt = request_kwargs.pop("prompt")
    request = make_request(prompt, **request_kwargs)
    if prompt == "":
        request.text = ""  # the oneof set to an empty string
    got_code, details = status_of(client, request)
    assert got_code == code, details
    assert field in details
    text, ids, last = client.complete([5, 6], max_tokens=3, **GREEDY)
    assert len(ids) == 3 and last.finish_reason == "length"


def test_no_prompt_and_malformed_bytes_are_invalid_argument(server, client):
    code, details = status_of(client, pb.GenerateRequest())
    assert code == INVALID and "prompt" in details
    with grpc.insecure_channel(server.target) as channel:
        raw = channel.unary_stream("/jaxserve.v1.Generation/Generate", request_serializer=None,
                                   response_deserializer=None)
        for garbage in (b"\x0a\xff\xff", b"\x12\x02\xff\xfe", b"\xff" * 16):  # truncated, bad UTF-8, junk
            with pytest.raises(grpc.RpcError) as error:
                list(raw(garbage, timeout=10))
            assert error.value.code() == INVALID and "malformed GenerateRequest" in error.value.details()
        unary = channel.unary_unary("/jaxserve.v1.Generation/Tokenize", request_serializer=None,
                                    response_deserializer=None)
        with pytest.raises(grpc.RpcError) as error:
            unary(b"\x0a\xff\xff", timeout=10)
        assert error.value.code() == INVALID
    assert client.tokenize("w5 w6", add_special_tokens=False) == [5, 6]


def test_detokenize_rejects_ids_outside_the_vocabulary(client):
    with pytest.raises(grpc.RpcError) as error:
        client.detokenize([5, 96])
    assert error.value.code() == INVALID and "token_ids[1]" in error.value.details()
    assert client.detokenize([5, 6]) == "w5 w6"


def test_a_request_id_in_flight_is_not_reused(server, client):
    with EngineGate(server):
        stream = client.stub.Generate(make_request([5, 6], request_id="twice", max_tokens=4, **GREEDY))
        assert wait_until(lambda: "twice" in server.server.servicer.live)
        with pytest.raises(grpc.RpcError) as error:
            list(client.stub.Generate(make_request([5], request_id="twice"), timeout=10))
        assert error.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert sum(len(c.token_ids) for c in stream) == 4


def test_waiting_requests_beyond_the_limit_are_resource_exhausted(server, client):
    servicer = server.server.servicer
    limit, servicer.max_waiting_requests = servicer.max_waiting_requests, 2
    try:
        with EngineGate(server):  # nothing gets a first token, so admitted requests stay queued
            admitted = [client.stub.Generate(make_request([5, i], max_tokens=2, **GREEDY)) for i in (6, 7)]
            assert wait_until(lambda: servicer.num_queued == 2)
            with pytest.raises(grpc.RpcError) as error:
                list(client.stub.Generate(make_request([5, 8], max_tokens=2), timeout=10))
            assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_waiting_requests" in error.value.details()
        assert [sum(len(c.token_ids) for c in call) for call in admitted] == [2, 2]
    finally:
        servicer.max_waiting_requests = limit
    assert servicer.num_queued == 0
    assert wait_idle(server)


def test_a_failing_step_is_internal_for_its_requests_only(server, client):
    with failing_steps(server.llm.engine.runner) as failures:
        stream = client.generate([5, 6, 7], max_tokens=60, **GREEDY)
        next(stream)
        failures.append(True)
        with pytest.raises(grpc.RpcError) as error:
            list(stream)
        assert error.value.code() == grpc.StatusCode.INTERNAL and "device lost" in error.value.details()
    _, ids, last = client.complete([5, 6], max_tokens=3, **GREEDY)
    assert len(ids) == 3 and last.finish_reason == "length"
    assert wait_idle(server)
