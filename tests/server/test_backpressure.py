"""A client that opens a stream and stops reading: once gRPC's flow-control window and the
stream's buffer are full its request stops advancing, and after the stall timeout it is
aborted and its KV blocks freed, while other clients are served."""

from __future__ import annotations

import pytest

from server.app import ServerOptions
from server import generation_pb2 as pb
from server.client import Client
from tests.engine_utils import tiny_engine
from tests.server.conftest import ServerThread
from tests.server.test_generate import wait_until

# A 64 KiB window (no BDP probing to grow it): with 20 logprobs a chunk is a few hundred bytes,
# so a few hundred unread chunks fill it.
SMALL_WINDOW = [("grpc.http2.bdp_probe", 0)]


def test_a_never_reading_client_is_aborted_after_the_stall_timeout_and_its_kv_freed(tiny_loaded):
    server = ServerThread(tiny_engine(tiny_loaded, max_model_len=512, kv_cache_memory_bytes=8 << 20),
                          stream_stall_timeout_s=1.0)
    engine = server.llm.engine
    try:
        with Client(server.target, options=SMALL_WINDOW) as idle, Client(server.target) as busy:
            request = pb.GenerateRequest(request_id="stalled", token_ids=pb.TokenIds(ids=[5, 6, 7]),
                                         sampling=pb.SamplingParams(max_tokens=500, temperature=0.0,
                                                                    ignore_eos=True, logprobs=20))
            stalled = idle.stub.Generate(request, timeout=120)
            next(stalled)  # started; never read again
            assert wait_until(lambda: "stalled" in engine.states, 10)
            # Another client is served meanwhile.
            _, ids, last = busy.complete([9, 10], max_tokens=50, temperature=0.0, ignore_eos=True)
            assert len(ids) == 50 and last.finish_reason == "length"
            child = server.engine_call(lambda: engine.children["stalled"])
            assert wait_until(lambda: child.request.paused or child.request.status.is_finished, 30)
            generated = len(child.request.output_token_ids)
            assert child.request.paused and generated < 400, generated
            assert wait_until(lambda: server.engine_call(lambda: "stalled" not in engine.states), 60)
            assert child.request.status.name == "FINISHED_ABORTED" and len(child.request.output_token_ids) < 400
            assert server.idle_state() == (0.0, 0, 0, 0)
            stalled.cancel()
        assert wait_until(lambda: not server.server.servicer.live, 10)
    finally:
        server.stop()


def test_stream_stall_timeout_is_a_checked_option():
    with pytest.raises(ValueError, match="stream_stall_timeout_s must be >= 0"):
        ServerOptions(stream_stall_timeout_s=-1)
