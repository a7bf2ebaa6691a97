"""Generate requests drawn by hypothesis over every field, extreme integers and odd strings included,
against a real server on a tiny engine: each call ends OK or with a status that says why (a bad
field named), never UNKNOWN, and afterwards nothing is left behind (waiting count, in-flight set,
running requests, KV usage)."""

from __future__ import annotations

import math

import grpc
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from server import generation_pb2 as pb
from server.client import Client
from tests.server.conftest import ENGINE_OPTIONS, ServerThread
from tests.engine_utils import tiny_engine
from tests.server.test_generate import wait_until

I64 = (-(2**63), -1, 0, 1, 3, 2**63 - 1)
I32 = (-(2**31), -1, 0, 1, 5, 2**31 - 1)
U32 = (0, 1, 2, 3, 33, 2**32 - 1)
FLOATS = (-math.inf, -3.0, -0.0, 0.0, 0.5, 1.0, 2.5, 1e30, math.inf, math.nan)
TEXTS = ("", "w5 w6", "\x00", "\ud7ff" * 3, "w7 " * 40, "é漢字🙂")
# Every field's extremes, and (for half the requests, so that many are served) values in range.
FIELDS = {
    "n": (U32, (1, 2, 4)), "temperature": (FLOATS, (0.0, 0.7, 1.0)), "top_p": (FLOATS, (0.5, 1.0)),
    "top_k": (I32, (-1, 0, 5)), "min_p": (FLOATS, (0.0, 0.1)), "seed": (I64, I64),
    "ignore_eos": ((True, False), (True, False)), "max_tokens": (I64, (1, 3, 2**63 - 1)),
    "min_tokens": (I64, (0, 2)), "logprobs": (I32, (0, 1, 20)), "presence_penalty": (FLOATS, (-1.0, 0.0, 1.5)),
    "frequency_penalty": (FLOATS, (0.0, 0.5)), "repetition_penalty": (FLOATS, (1.0, 1.3)),
    "include_stop_str_in_output": ((True, False),) * 2, "skip_special_tokens": ((True, False),) * 2,
}
NAMES = set(FIELDS) | {"prompt", "stop", "stop_token_ids", "logit_bias", "priority", "request_id", "cache_salt",
                       "token_ids", "text"}


@st.composite
def requests(draw):
    valid = draw(st.booleans())
    pick = lambda pools: draw(st.sampled_from(pools[1] if valid else pools[0]))  # noqa: E731
    sampling = pb.SamplingParams(**{name: pick(pools) for name, pools in FIELDS.items() if draw(st.booleans())})
    sampling.stop.extend(draw(st.lists(st.sampled_from(TEXTS[1:] if valid else TEXTS), max_size=2)))
    sampling.stop_token_ids.extend(draw(st.lists(st.sampled_from((1, 7, 95) if valid else U32), max_size=2)))
    biases = st.dictionaries(st.sampled_from((5, 9) if valid else U32), st.sampled_from((-1.0, 2.0) if valid else FLOATS),
                             max_size=2)
    for token, bias in draw(biases).items():
        sampling.logit_bias[token] = bias
    request = pb.GenerateRequest(sampling=sampling, request_id=draw(st.sampled_from(("", "r1", "x" * 300))),
                                 priority=pick((I32, (-1, 0, 3))), cache_salt=draw(st.sampled_from(("", "s"))))
    kind = draw(st.sampled_from(("text", "ids") if valid else ("text", "ids", "none")))
    if kind == "text":
        request.text = draw(st.sampled_from(TEXTS[1:] if valid else TEXTS))
    elif kind == "ids":
        ids = (5, 7, 95) if valid else (0, 5, 95, 96, 2**32 - 1)
        request.token_ids.ids.extend(draw(st.lists(st.sampled_from(ids), min_size=int(valid), max_size=60 if valid else 120)))
    return request


@pytest.fixture(scope="module")
def fuzz_server(tiny_loaded):
    running = ServerThread(tiny_engine(tiny_loaded, **{**ENGINE_OPTIONS, "max_n": 4}), max_waiting_requests=4)
    yield running
    running.stop()


def _clean(server) -> bool:
    servicer = server.server.servicer
    return server.idle_state() == (0.0, 0, 0, 0) and servicer.num_queued == 0 and not servicer.live


@pytest.mark.slow
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=requests())
def test_any_request_is_answered_and_leaves_nothing_behind(fuzz_server, request):
    with Client(fuzz_server.target) as client:
        try:
            chunks = list(client.stub.Generate(request, timeout=60))
            assert chunks and all(c.request_id for c in chunks)
            event("OK")
        except grpc.RpcError as error:
            code, details = error.code(), error.details() or ""
            event(code.name)
            assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), (code, details)
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                assert any(name in details for name in NAMES), details
    assert wait_until(lambda: _clean(fuzz_server), 30), "a request left state behind"


def test_n_is_bounded_before_anything_is_admitted(fuzz_server):
    """`n = 4294967295` answered MemoryError after the waiting slot was taken: 4,100 such requests
    locked every client out. Now it is INVALID_ARGUMENT naming n, and nothing is held."""
    servicer = fuzz_server.server.servicer
    with Client(fuzz_server.target) as client:
        for _ in range(6):  # more than max_waiting_requests
            with pytest.raises(grpc.RpcError) as error:
                list(client.stub.Generate(pb.GenerateRequest(text="w5", sampling=pb.SamplingParams(n=2**32 - 1)),
                                          timeout=30))
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "n must be in [1, 4] (the engine's max_n)" in error.value.details()
        assert servicer.num_queued == 0 and not servicer.live
        ok = list(client.stub.Generate(pb.GenerateRequest(text="w5", sampling=pb.SamplingParams(
            n=4, max_tokens=2, temperature=0.0)), timeout=30))
        assert {c.index for c in ok} == {0, 1, 2, 3}


def test_an_unexpected_error_is_internal_with_the_request_id_and_undone(fuzz_server, monkeypatch):
    """A handler that fails after admission answers INTERNAL naming the request, not UNKNOWN,
    and gives back its waiting slot and its in-flight id."""
    from server import convert

    def broken(output):
        raise KeyError("boom")

    monkeypatch.setattr(convert, "responses_from_output", broken)
    with Client(fuzz_server.target) as client:
        with pytest.raises(grpc.RpcError) as error:
            list(client.stub.Generate(pb.GenerateRequest(request_id="r-broken", text="w5",
                                                         sampling=pb.SamplingParams(max_tokens=2)), timeout=30))
    assert error.value.code() == grpc.StatusCode.INTERNAL and "r-broken" in error.value.details()
    assert wait_until(lambda: _clean(fuzz_server), 30)
