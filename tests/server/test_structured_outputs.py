"""Structured outputs over gRPC: the `StructuredOutputs` message maps field for field onto
`StructuredOutputsParams`, constrained streams follow their constraint, and a constraint that cannot
compile is INVALID_ARGUMENT naming the field while the server keeps serving."""

from __future__ import annotations

import json
import re

import grpc
import pytest

from jaxserve.sampling_params import SamplingParams, StructuredOutputsParams
from server import generation_pb2 as pb
from server.client import Client, make_request
from server.convert import sampling_params_from_proto
from tests.engine_utils import tiny_engine
from tests.jaxserve.test_engine import run
from tests.server.conftest import ENGINE_OPTIONS

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


@pytest.mark.parametrize("given, expected", [
    ({"json": SCHEMA}, StructuredOutputsParams(json=json.dumps(SCHEMA))),
    ({"json": '{"type": "array"}'}, StructuredOutputsParams(json='{"type": "array"}')),
    ({"regex": "[a-z]+"}, StructuredOutputsParams(regex="[a-z]+")),
    ({"choice": ["yes", "no"]}, StructuredOutputsParams(choice=["yes", "no"])),
    ({"grammar": 'start: "a"+'}, StructuredOutputsParams(grammar='start: "a"+')),
    ({"json_object": True}, StructuredOutputsParams(json_object=True)),
    (StructuredOutputsParams(choice=["x"]), StructuredOutputsParams(choice=["x"])),
])
def test_each_field_maps_onto_structured_outputs_params(given, expected):
    message = make_request("w5", structured_outputs=given).sampling
    params = sampling_params_from_proto(pb.SamplingParams.FromString(message.SerializeToString()))
    assert params.structured_outputs == expected
    assert sampling_params_from_proto(pb.SamplingParams()).structured_outputs is None


@pytest.mark.parametrize("message, field", [
    (pb.StructuredOutputs(), "exactly one"),
    (pb.StructuredOutputs(regex="a", choice=["b"]), "exactly one"),
    (pb.StructuredOutputs(regex=""), "structured_outputs.regex"),
    (pb.StructuredOutputs(json_object=False), "exactly one"),
])
def test_malformed_messages_are_value_errors_naming_the_field(message, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        sampling_params_from_proto(pb.SamplingParams(structured_outputs=message))


def test_constrained_streams_follow_their_regex_and_match_the_engine(server, tiny_loaded):
    """On the word-level test vocabulary ("w2", "w3", ...; text joined by spaces, EOS kept as
    "<eos>") the regex allows one word, then EOS."""
    regex = "[a-z][0-9]+"
    options = dict(n=3, seed=7, temperature=1.0, max_tokens=6)
    (ref,) = run(tiny_engine(tiny_loaded, **ENGINE_OPTIONS), [
        ([5, 6, 7], SamplingParams(**options, structured_outputs=StructuredOutputsParams(regex=regex)))])
    with Client(server.target) as client:
        chunks = list(client.generate([5, 6, 7], structured_outputs={"regex": regex}, **options))
    for completion in ref.outputs:
        mine = [c for c in chunks if c.index == completion.index]
        assert [t for c in mine for t in c.token_ids] == completion.token_ids
        words = "".join(c.text for c in mine).split()
        assert re.fullmatch(regex, words[0]) and words[1:] == ["<eos>"], words
        assert mine[-1].finish_reason == "stop"


@pytest.mark.parametrize("constraint, field", [
    ({"regex": "([a-z]"}, "structured_outputs.regex"),
    ({"json": '{"type": "nosuchtype"}'}, "structured_outputs.json"),
    ({"json": "{not json"}, "structured_outputs.json"),
    ({"grammar": "start: missing"}, "structured_outputs.grammar"),
    ({}, "structured_outputs"),
])
def test_constraints_that_cannot_compile_are_invalid_argument(server, constraint, field):
    with Client(server.target) as client:
        request = make_request([5, 6], max_tokens=3)
        request.sampling.structured_outputs.SetInParent()  # present, even when empty
        request.sampling.structured_outputs.MergeFrom(make_request([5], structured_outputs=constraint)
                                                      .sampling.structured_outputs)
        with pytest.raises(grpc.RpcError) as error:
            list(client.stub.Generate(request, timeout=30))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in error.value.details()
        text, ids, last = client.complete([5, 6], max_tokens=3, temperature=0, ignore_eos=True)
        assert len(ids) == 3 and last.finish_reason == "length"
