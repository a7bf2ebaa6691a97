"""Disaggregated serving over gRPC: KV blocks cross `KVTransfer` between engines (loaded, not
recomputed; a layout mismatch is refused naming the field), and a router + prefill worker + decode
worker as three processes on 127.0.0.1 answer like one colocated server; a killed decode worker's
streams end UNAVAILABLE and the router serves again once it is back."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from jaxserve.kv.disagg_connector import DecodeConnector, PrefillConnector
from jaxserve.kv.transfer import InProcessTransport, KVHandshakeError
from server import generation_pb2 as pb
from server import generation_pb2_grpc as pb_grpc
from server.client import make_request
from server.kv_service import GrpcKVTransport, add_kv_transfer_service
from tests.engine_utils import random_prompts, tiny_engine
from tests.jaxserve.kv.kv_utils import generate
from tests.jaxserve.test_engine import assert_same_greedy

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class KVServerThread:
    """Only the KVTransfer service over `store`, on its own event loop thread."""

    def __init__(self, store):
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.server, port = asyncio.run_coroutine_threadsafe(self._start(store), self.loop).result(30)
        self.target = f"127.0.0.1:{port}"

    async def _start(self, store):
        server = grpc.aio.server()
        add_kv_transfer_service(server, store)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    def stop(self):
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


def test_blocks_cross_grpc_and_decode_matches_colocated(tiny_loaded):
    """Prefill engine -> KVTransfer (gRPC) -> decode engine: the decode engine loads every full
    prompt block (computes only the tail) and its greedy tokens equal a colocated engine's."""
    rng = np.random.default_rng(5)
    prompts = random_prompts(rng, 6, 3, 60, 96)
    store = InProcessTransport()
    prefill_connector = PrefillConnector(store)
    prefill = tiny_engine(tiny_loaded, kv_connector=prefill_connector)
    kv_server = KVServerThread(store)
    try:
        transport = GrpcKVTransport(kv_server.target, timeout_s=10)
        decode_connector = DecodeConnector(transport, 4)
        decode = tiny_engine(tiny_loaded, kv_connector=decode_connector)
        generate(prefill, prompts, max_tokens=1, tag="p")
        prefill_connector.wait_for_save()
        got, rows = generate(decode, prompts, max_tokens=8, tag="d")
        ref, _ = generate(tiny_engine(tiny_loaded), prompts, max_tokens=8, tag="c")
        full_blocks = [(len(p) - 1) // 4 for p in prompts]
        assert decode_connector.num_loaded_blocks == sum(full_blocks)
        for i, prompt in enumerate(prompts):
            assert rows[i][0].num_computed_tokens == 4 * full_blocks[i], f"prompt {i}: prefix loaded"
            assert_same_greedy(got[i].token_ids, ref[i].token_ids, ref[i].logprobs, f"prompt {i}")
        assert transport.bytes_received >= sum(full_blocks) * decode.kv_layout.block_bytes
        assert store.num_blocks == 0, "the prefill side dropped every block once the decode side fetched it"
        # Prometheus: the connector's loads are external prefix-cache hits (vLLM's names), apart
        # from the device prefix cache's.
        scraped = _scrape(decode)
        assert scraped["jaxserve:external_prefix_cache_queries_total"] == sum(len(p) for p in prompts)
        assert scraped["jaxserve:external_prefix_cache_hits_total"] == 4 * sum(full_blocks)
        assert scraped["jaxserve:prefix_cache_hits_total"] == 0

        with pytest.raises(KVHandshakeError, match=r"block_size \(local 8, remote 4\)"):
            tiny_engine(tiny_loaded, block_size=8, kv_connector=DecodeConnector(GrpcKVTransport(kv_server.target), 8))
    finally:
        kv_server.stop()


def _scrape(engine) -> dict[str, float]:
    """The engine's Prometheus metrics as the /metrics endpoint renders them (unlabelled names)."""
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry, generate_latest

    from server.metrics import EngineCollector

    registry = CollectorRegistry()
    llm = SimpleNamespace(engine=engine, num_running=0, num_waiting=0, kv_cache_usage=0.0)
    registry.register(EngineCollector(llm, "tiny"))
    values = {}
    for line in generate_latest(registry).decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name.split("{")[0]] = float(value)
    return values


def test_router_options_and_roles_reject_bad_values_naming_the_field():
    from server.app import ServerOptions
    from server.disagg import build_worker
    from server.router import RouterOptions

    with pytest.raises(ValueError, match="prefill must name"):
        RouterOptions(prefill=(), decode=("127.0.0.1:1",))
    with pytest.raises(ValueError, match="decode must name"):
        RouterOptions(prefill=("127.0.0.1:1",), decode=())
    with pytest.raises(ValueError, match="worker_timeout_s must be > 0"):
        RouterOptions(prefill=("a:1",), decode=("b:1",), worker_timeout_s=0)
    with pytest.raises(ValueError, match="role must be one of"):
        build_worker(lambda connector: None, "both", ServerOptions(port=0), "tiny", 4)
    with pytest.raises(ValueError, match="kv_store_bytes must be an integer >= 1"):
        build_worker(lambda connector: None, "prefill", ServerOptions(port=0), "tiny", 4, kv_store_bytes=0)


# ---- three processes ----

class ProcessOutput:
    """The stdout lines of a process, read on a thread as they come; `wait_for(text)` returns the
    first line holding `text` once it is printed."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self.closed = False
        self.changed = threading.Condition()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream):
        for line in stream:
            with self.changed:
                self.lines.append(line)
                self.changed.notify_all()
        with self.changed:
            self.closed = True
            self.changed.notify_all()

    def wait_for(self, text: str, timeout: float) -> str | None:
        """The first line holding `text`; None if the process ends or `timeout` seconds pass first."""
        def found():
            return next((line for line in self.lines if text in line), None)

        with self.changed:
            self.changed.wait_for(lambda: found() is not None or self.closed, timeout)
            return found()


def _start(args: list[str], marker: str, timeout: float = 180.0, env: dict | None = None
           ) -> tuple[subprocess.Popen, int]:
    """Start a process that prints `marker ... HOST:PORT` once it serves; returns it and the port.
    Its stdout lines are `proc.output` (a `ProcessOutput`)."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    proc.output = ProcessOutput(proc.stdout)
    line = proc.output.wait_for(marker, timeout)
    if line is None:
        proc.kill()
        proc.wait(10)
        raise RuntimeError(f"{args} did not start:\n{''.join(proc.output.lines)}")
    return proc, int(line.split(marker)[1].split()[0].rsplit(":", 1)[1])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


DECODE_STEP_DELAY_S = "0.05"


@pytest.fixture(scope="module")
def cluster():
    """prefill worker, decode worker (each step slowed by 50 ms) and router, as three processes."""
    decode_port = _free_port()
    procs = {}
    try:
        procs["prefill"], prefill_port = _start(["-m", "tests.server.disagg_worker", "prefill", "0"], "serving on")
        procs["decode"], _ = _start(["-m", "tests.server.disagg_worker", "decode", str(decode_port),
                                     DECODE_STEP_DELAY_S], "serving on")
        procs["router"], router_port = _start(
            ["-m", "server.main", "router", "--prefill", f"127.0.0.1:{prefill_port}",
             "--decode", f"127.0.0.1:{decode_port}", "--port", "0", "--worker-timeout-s", "20"], "router on")
        procs["decode_port"] = decode_port
        procs["prefill_port"] = prefill_port
        procs["router_target"] = f"127.0.0.1:{router_port}"
        yield procs
    finally:
        for name in ("router", "decode", "prefill"):
            if name in procs:
                _stop(procs[name])


def _complete(target: str, prompt: list[int], max_tokens: int, with_cached: bool = False):
    """Greedy token ids (and, `with_cached`, the usage's cached_tokens) of one streamed request."""
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        tokens, cached = [], None
        for chunk in stub.Generate(make_request(prompt, max_tokens=max_tokens, temperature=0.0), timeout=120):
            tokens += chunk.token_ids
            if chunk.finish_reason:
                cached = chunk.usage.cached_tokens
        return (tokens, cached) if with_cached else tokens


def _complete_once_available(target, prompt, max_tokens, timeout_s=120):
    """`_complete`, retried while the router answers UNAVAILABLE (its channel to a restarted
    worker reconnects within its 1 s backoff), for at most `timeout_s`: a bound only a router
    that never serves again reaches."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return _complete(target, prompt, max_tokens)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _code(outcome):
    """The status code of a call that failed (an `RpcError`); any other outcome as it is."""
    return outcome.code() if isinstance(outcome, grpc.RpcError) else outcome


@pytest.mark.slow
def test_router_prefill_decode_processes_match_a_colocated_server(cluster, server):
    rng = np.random.default_rng(11)
    prompts = random_prompts(rng, 8, 3, 60, 96)
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda p: _complete(cluster["router_target"], p, 10, with_cached=True), prompts))
        ref = list(pool.map(lambda p: _complete(server.target, p, 10), prompts))
    for i, prompt in enumerate(prompts):
        tokens, cached = got[i]
        assert tokens == ref[i], f"prompt {i} (len {len(prompt)})"
        # the decode worker loaded every full prompt block from the prefill worker (computed the tail)
        assert cached == 4 * ((len(prompt) - 1) // 4), f"prompt {i}: {cached} tokens loaded"


@pytest.mark.slow
def test_killed_decode_worker_fails_streams_unavailable_then_router_recovers(cluster, server):
    """SIGKILL the decode worker while 4 streams run: each ends UNAVAILABLE (none hangs); a
    restarted worker on the same port serves the router's next request."""
    rng = np.random.default_rng(12)
    prompts = random_prompts(rng, 4, 8, 16, 96)
    started = threading.Barrier(len(prompts) + 1, timeout=120)
    outcomes = [None] * len(prompts)

    def stream(i):
        with grpc.insecure_channel(cluster["router_target"]) as channel:
            call = pb_grpc.GenerationStub(channel).Generate(
                make_request(prompts[i], max_tokens=70, temperature=0.0, ignore_eos=True), timeout=120)
            try:
                first = True
                for chunk in call:
                    if first:
                        first = False
                        started.wait()
                    if chunk.finish_reason:
                        outcomes[i] = "finished"
            except grpc.RpcError as exc:
                outcomes[i] = exc

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    started.wait()  # every stream has its first chunk; ~70 slowed steps remain
    cluster["decode"].kill()
    cluster["decode"].wait(10)
    for t in threads:
        t.join(120)  # the router's worker timeout is 20 s: a stream that hangs longer hangs forever
    assert not any(t.is_alive() for t in threads), "a stream hangs after its decode worker died"
    assert [_code(o) for o in outcomes] == [grpc.StatusCode.UNAVAILABLE] * len(prompts), outcomes
    # The router saw the connection die; it did not wait out its worker timeout (DEADLINE_EXCEEDED).
    for outcome in outcomes:
        assert "failed mid-stream: UNAVAILABLE" in outcome.details(), outcome.details()

    with pytest.raises(grpc.RpcError) as info:
        _complete(cluster["router_target"], prompts[0], 4)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE

    cluster["decode"], _ = _start(["-m", "tests.server.disagg_worker", "decode", str(cluster["decode_port"])],
                                  "serving on")
    got = _complete_once_available(cluster["router_target"], prompts[0], 10)
    assert got == _complete(server.target, prompts[0], 10)


class HangingWorker(pb_grpc.GenerationServicer):
    """Reports no load (so the router tries it first) and never sends a chunk. Counts its Generate
    calls; `given_up` is set once its caller cancels one."""

    def __init__(self):
        self.calls = 0
        self.given_up = threading.Event()

    async def GetLoad(self, request, context):
        return pb.GetLoadResponse()

    async def Generate(self, request, context):
        self.calls += 1
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.given_up.set()
            raise
        yield pb.GenerateResponse()


class LoopThread:
    def __init__(self):
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def call(self, coro, timeout=30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


@pytest.mark.slow
def test_router_retries_a_request_whose_decode_worker_times_out(cluster, server):
    """decode workers [hanging, real]: the hanging one gets the request first, sends nothing within
    worker_timeout_s, and the router retries on the real one; the output is the colocated one."""
    from server.router import Router, RouterOptions

    thread = LoopThread()
    hanging_worker = HangingWorker()

    async def start():
        hanging = grpc.aio.server()
        pb_grpc.add_GenerationServicer_to_server(hanging_worker, hanging)
        port = hanging.add_insecure_port("127.0.0.1:0")
        await hanging.start()
        router = Router(RouterOptions(prefill=(f"127.0.0.1:{cluster['prefill_port']}",),
                                      decode=(f"127.0.0.1:{port}", f"127.0.0.1:{cluster['decode_port']}"),
                                      port=0, worker_timeout_s=5.0))
        await router.start()
        return hanging, router

    hanging, router = thread.call(start())
    try:
        prompt = list(range(5, 30))
        got = _complete(f"127.0.0.1:{router.port}", prompt, 6)
        # The router stops at the first decode worker that answers: the hanging one was called
        # (once), so it came first, and the router gave up on its call before trying the next.
        assert hanging_worker.calls == 1, "the hanging worker was tried first, and only once"
        assert hanging_worker.given_up.wait(60), "the router never cancelled its call to the hanging worker"
        assert got == _complete(server.target, prompt, 6)
    finally:
        thread.call(router.stop())
        thread.call(hanging.stop(0))
        thread.loop.call_soon_threadsafe(thread.loop.stop)


@pytest.mark.slow
def test_decode_worker_recomputes_when_its_kv_source_is_gone(cluster, server):
    """A prefill worker that died after its prefill: the decode worker cannot reach the named KV
    source, computes the prompt itself (nothing loaded) and answers like the colocated server."""
    from server.disagg import KV_SOURCE_KEY

    prompt = list(range(7, 47))
    with grpc.insecure_channel(f"127.0.0.1:{cluster['decode_port']}") as channel:
        chunks = list(pb_grpc.GenerationStub(channel).Generate(
            make_request(prompt, max_tokens=6, temperature=0.0), timeout=60,
            metadata=((KV_SOURCE_KEY, f"127.0.0.1:{_free_port()}"),)))
    assert [t for c in chunks for t in c.token_ids] == _complete(server.target, prompt, 6)
    assert chunks[-1].usage.cached_tokens == 0, "nothing was loaded: the prompt was computed here"


# 32 prompts of 4..30 words: 8 subjects in 4 framings.
DEFAULT_MODEL_PROMPTS = [
    framing.format(subject) for subject in (
        "the sea", "a small village in the mountains", "prime numbers", "the history of Paris",
        "how bread is baked", "a robot that learns to paint", "the planets of the solar system", "winter")
    for framing in (
        "Write a short poem about {}:",
        "Explain {} to a child in three sentences, using simple words and one example that everyone knows.",
        "Once upon a time, {}",
        "List three facts about {} and say which one surprises most people, and why it does:")
]


@pytest.mark.slow
def test_killed_prefill_worker_requests_retry_elsewhere_or_fail_unavailable_then_router_recovers(cluster, server):
    """A prefill worker P that never finishes a step holds 6 prompts when it is SIGKILLed: the 3
    sent through a router over [P, the cluster's prefill worker] (P tried first) are retried on the
    other one and match the colocated server; the 3 sent through a router over P alone end
    UNAVAILABLE because P is gone (not after the router's worker timeout), as does the next
    request; once P is back on its port the router serves again."""
    from server.router import Router, RouterOptions

    port = _free_port()
    slow, _ = _start(["-m", "tests.server.disagg_worker", "prefill", str(port), "3600"], "serving on")
    thread = LoopThread()
    decode = (f"127.0.0.1:{cluster['decode_port']}",)

    async def start():
        routers = []
        for prefill in ((f"127.0.0.1:{port}", f"127.0.0.1:{cluster['prefill_port']}"), (f"127.0.0.1:{port}",)):
            router = Router(RouterOptions(prefill=prefill, decode=decode, port=0, worker_timeout_s=20))
            await router.start()
            routers.append(router)

        async def listed_order(workers):  # P first, whatever the loads say
            return list(workers)
        routers[0].servicer._ranked = listed_order
        return routers

    both, alone = thread.call(start())
    try:
        rng = np.random.default_rng(13)
        prompts = random_prompts(rng, 6, 16, 40, 96)
        targets = [f"127.0.0.1:{both.port}"] * 3 + [f"127.0.0.1:{alone.port}"] * 3
        outcomes = [None] * 6

        def run(i):
            try:
                outcomes[i] = _complete(targets[i], prompts[i], 6)
            except grpc.RpcError as exc:
                outcomes[i] = exc

        threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        assert slow.output.wait_for("holds 6 requests", 120), "the six requests never all reached P"
        assert outcomes == [None] * 6, "nothing finished before the kill"
        slow.kill()
        slow.wait(10)
        for t in threads:
            t.join(120)  # past the routers' 20 s worker timeout: a stream still going hangs
        assert not any(t.is_alive() for t in threads), "a stream hangs after its prefill worker died"
        expected = [_complete(server.target, p, 6) for p in prompts[:3]]
        assert outcomes[:3] == expected, "retried on the other prefill worker, same tokens"
        assert [_code(o) for o in outcomes[3:]] == [grpc.StatusCode.UNAVAILABLE] * 3, outcomes[3:]
        # P's death itself, not the worker timeout (that would read DEADLINE_EXCEEDED).
        gone = f"no prefill worker answered (127.0.0.1:{port}: UNAVAILABLE)"
        assert all(o.details() == gone for o in outcomes[3:]), [o.details() for o in outcomes[3:]]

        with pytest.raises(grpc.RpcError) as info:
            _complete(targets[3], prompts[3], 4)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and info.value.details() == gone, info.value

        slow, _ = _start(["-m", "tests.server.disagg_worker", "prefill", str(port)], "serving on")
        got = _complete_once_available(targets[3], prompts[3], 6)
        assert got == _complete(server.target, prompts[3], 6)
    finally:
        thread.call(both.stop())
        thread.call(alone.stop())
        thread.loop.call_soon_threadsafe(thread.loop.stop)
        _stop(slow)


@pytest.mark.slow
@pytest.mark.default_model
def test_default_model_router_prefill_decode_processes_match_llm_generate(default_llm):
    """`jaxserve serve --role prefill`, `--role decode` and `jaxserve router` on the default model,
    three processes: the greedy outputs of 32 concurrent requests equal `LLM.generate`'s."""
    from jaxserve.sampling_params import SamplingParams
    from server.client import Client

    prompts = DEFAULT_MODEL_PROMPTS
    expected = default_llm.generate(prompts, SamplingParams(max_tokens=10, temperature=0.0), use_tqdm=False)
    # The same options as the session's default_llm, so its compiled buckets are reused.
    engine = ["--max-model-len", "1024", "--max-num-seqs", "16", "--max-num-batched-tokens", "256",
              "--no-compile-at-startup", "--token-buckets", "32,128", "--request-buckets", "4,16"]
    env = {"JAX_PLATFORMS": "cpu", "JAXSERVE_CPU_DTYPE": "float32",
           "JAX_COMPILATION_CACHE_DIR": os.path.join(ROOT, ".jax_cache")}
    procs = []
    try:
        for role in ("prefill", "decode"):
            proc, port = _start(["-m", "server.main", "serve", "--role", role, "--port", "0",
                                 "--shutdown-grace-s", "1", *engine], "serving on", timeout=300, env=env)
            procs.append((proc, port))
        # The workers compile lazily: a first step that compiles can outlast the router's 30 s default
        # on a loaded 2-core machine (it did, on both this code and the commit before it). This test
        # is about the tokens, so the router waits as long as a compile may take.
        router, router_port = _start(["-m", "server.main", "router", "--prefill", f"127.0.0.1:{procs[0][1]}",
                                      "--decode", f"127.0.0.1:{procs[1][1]}", "--port", "0",
                                      "--worker-timeout-s", "300"], "router on")
        procs.append((router, router_port))
        with Client(f"127.0.0.1:{router_port}") as client, ThreadPoolExecutor(32) as pool:
            got = list(pool.map(lambda p: client.complete(p, max_tokens=10, temperature=0.0), prompts))
        assert len(got) == 32
        for i, (text, ids, _) in enumerate(got):
            assert ids == expected[i].outputs[0].token_ids, f"prompt {i}"
            assert text == expected[i].outputs[0].text, f"prompt {i}"
    finally:
        for proc, _ in reversed(procs):
            _stop(proc)
