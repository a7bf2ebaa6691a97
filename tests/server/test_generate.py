"""Generate over a real server on 127.0.0.1: many concurrent streams share one continuous batch
and get the greedy tokens of an offline run; cancels, deadlines and client deaths free blocks."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest

from jaxserve.sampling_params import SamplingParams
from server.client import AsyncClient, Client
from tests.engine_utils import random_prompts, tiny_engine
from tests.jaxserve.test_engine import assert_same_greedy, run
from tests.server.conftest import ENGINE_OPTIONS

GREEDY = dict(temperature=0.0, ignore_eos=True)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def scrape(server) -> dict[str, float]:
    """The Prometheus text as {name{labels}: value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=10).read()
    samples = {}
    for line in text.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[re.sub(r',?model_name="tiny"', "", name).replace("{}", "")] = float(value)
    return samples


class EngineGate:
    """Holds the engine thread between steps (a command that waits), so tests can act while no
    step runs."""

    def __init__(self, server):
        self.server, self.release = server, threading.Event()
        self.entered = threading.Event()

    def __enter__(self):
        def hold():
            self.entered.set()
            self.release.wait(30)

        self.future = asyncio.run_coroutine_threadsafe(self.server.llm._call(hold), self.server.loop)
        assert self.entered.wait(10)
        return self

    def __exit__(self, *exc_info):
        self.release.set()
        self.future.result(10)


def test_256_concurrent_streams_match_offline_greedy_and_share_the_batch(server, tiny_loaded):
    rng = np.random.default_rng(0)
    prompts = random_prompts(rng, 256, 1, 40, 96)
    max_tokens = [int(n) for n in rng.integers(1, 25, 256)]
    offline = run(tiny_engine(tiny_loaded, **ENGINE_OPTIONS),
                  [(p, SamplingParams(max_tokens=m, logprobs=2, **GREEDY)) for p, m in zip(prompts, max_tokens)])
    before = scrape(server)
    peak_running = []

    async def main():
        async with AsyncClient(server.target) as client:
            async def watch_load():
                while True:
                    peak_running.append((await client.load()).num_running)
                    await asyncio.sleep(0.02)

            watcher = asyncio.create_task(watch_load())
            results = await asyncio.gather(*(client.complete(p, max_tokens=m, **GREEDY)
                                             for p, m in zip(prompts, max_tokens)))
            watcher.cancel()
            return results

    started = time.perf_counter()
    results = asyncio.run(main())
    elapsed = time.perf_counter() - started
    for i, ((text, ids, last), ref) in enumerate(zip(results, offline)):
        completion = ref.outputs[0]
        assert_same_greedy(ids, completion.token_ids, completion.logprobs, f"stream {i}")
        assert last.finish_reason == "length" and last.usage.completion_tokens == len(ids) == max_tokens[i]
        assert last.usage.prompt_tokens == len(prompts[i])
        if ids == completion.token_ids:
            assert text == completion.text
    after = scrape(server)
    steps = after["jaxserve:engine_steps_total"] - before["jaxserve:engine_steps_total"]
    generated = after["jaxserve:generation_tokens_total"] - before["jaxserve:generation_tokens_total"]
    finished = (after['jaxserve:request_success_total{finished_reason="length"}']
                - before['jaxserve:request_success_total{finished_reason="length"}'])
    print(f"256 streams: {generated:.0f} tokens in {steps:.0f} steps ({generated / steps:.1f} tokens/step), "
          f"peak running {max(peak_running)}, {elapsed:.1f} s")
    assert finished == 256 and generated == sum(max_tokens)
    # One stream at a time would need one step per token; the batch holds up to 32 requests.
    assert generated / steps > 8
    assert max(peak_running) > 8
    assert after["jaxserve:time_to_first_token_seconds_count"] - before["jaxserve:time_to_first_token_seconds_count"] == 256
    assert server.idle_state() == (0.0, 0, 0, 0)


def test_cancelling_50_streams_frees_their_blocks_and_spares_the_others(server, tiny_loaded):
    rng = np.random.default_rng(1)
    prompts = random_prompts(rng, 70, 8, 24, 96)
    survivors = prompts[50:]
    offline = run(tiny_engine(tiny_loaded, **ENGINE_OPTIONS),
                  [(p, SamplingParams(max_tokens=20, logprobs=2, **GREEDY)) for p in survivors])
    baseline = server.idle_state()
    before = scrape(server)

    async def cancelled_part_way(client, prompt):
        """Leaves after 3 chunks of 70 tokens: the client cancels the call."""
        chunks = 0
        async for _ in client.generate(prompt, max_tokens=70, **GREEDY):
            chunks += 1
            if chunks == 3:
                return chunks
        return chunks

    async def main():
        async with AsyncClient(server.target) as client:
            doomed = [cancelled_part_way(client, p) for p in prompts[:50]]
            others = [client.complete(p, max_tokens=20, **GREEDY) for p in survivors]
            results = await asyncio.gather(*doomed, *others)
            assert results[:50] == [3] * 50
            return results[50:]

    results = asyncio.run(main())
    for i, ((_, ids, last), ref) in enumerate(zip(results, offline)):
        assert_same_greedy(ids, ref.outputs[0].token_ids, ref.outputs[0].logprobs, f"survivor {i}")
        assert last.finish_reason == "length"
    assert wait_until(lambda: server.idle_state() == baseline)
    aborted = scrape(server)['jaxserve:request_success_total{finished_reason="abort"}']
    assert aborted - before['jaxserve:request_success_total{finished_reason="abort"}'] == 50


def test_explicit_abort_and_an_expired_deadline_end_the_request(server):
    with Client(server.target) as client:
        stream = client.generate([5, 6, 7], request_id="to-abort", max_tokens=90, **GREEDY)
        first = next(stream)
        assert first.request_id == "to-abort"
        assert client.abort("to-abort") is True
        rest = list(stream)
        assert rest[-1].finish_reason == "abort"
        assert len(first.token_ids) + sum(len(c.token_ids) for c in rest) < 90
        assert client.abort("to-abort") is False  # finished ids are unknown

        stream = client.generate([8, 9], max_tokens=80, timeout=2.0, **GREEDY)
        next(stream)
        with EngineGate(server):  # no step runs until the deadline has ended the call on both sides
            with pytest.raises(grpc.RpcError) as error:
                list(stream)
            assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert wait_until(lambda: not server.server.servicer.live), "the server never saw the deadline"
    assert wait_idle(server)


def wait_idle(server, timeout=60) -> bool:
    return wait_until(lambda: server.idle_state() == (0.0, 0, 0, 0), timeout)


CLIENT_SCRIPT = """
import sys
from server.client import Client
with Client(sys.argv[1]) as client:
    for chunk in client.generate([5, 6, 7, 8], max_tokens=90, temperature=0.0, ignore_eos=True):
        print("chunk", flush=True)
"""


def test_a_client_killed_mid_stream_frees_its_blocks(server):
    servicer = server.server.servicer
    aborted_before = scrape(server)['jaxserve:request_success_total{finished_reason="abort"}']
    process = subprocess.Popen([sys.executable, "-c", CLIENT_SCRIPT, server.target], cwd=ROOT,
                               stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": ROOT})
    try:
        assert process.stdout.readline().strip() == b"chunk"
        with EngineGate(server):  # the stream cannot finish while the client dies
            assert server.llm.engine.kv_cache_usage() > 0
            process.kill()
            process.wait()
            assert wait_until(lambda: not servicer.live)  # the server saw the connection drop
    finally:
        process.kill()
    assert wait_idle(server)
    aborted = scrape(server)['jaxserve:request_success_total{finished_reason="abort"}']
    assert aborted == aborted_before + 1


def wait_until(condition, timeout=60) -> bool:
    """Poll `condition()` until it is true; False after `timeout` seconds, a bound only a test
    that fails anyway reaches."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_logprobs_and_n_completions_over_the_wire(server, tiny_loaded):
    prompt = [5, 6, 7, 8]
    (ref,) = run(tiny_engine(tiny_loaded, **ENGINE_OPTIONS), [(prompt, SamplingParams(max_tokens=6, logprobs=2, **GREEDY))])
    with Client(server.target) as client:
        chunks = list(client.generate(prompt, max_tokens=6, logprobs=2, **GREEDY))
        positions = [p for c in chunks for p in c.logprobs]
        assert [p.token_id for p in positions] == ref.outputs[0].token_ids
        for got, want in zip(positions, ref.outputs[0].logprobs):
            assert got.logprob == pytest.approx(want[got.token_id].logprob, abs=1e-4) and got.rank == 1
            assert {t.token_id: t.logprob for t in got.top} == pytest.approx(
                {tid: lp.logprob for tid, lp in want.items()}, abs=1e-4)
            assert all(t.decoded_token == f"w{t.token_id}" for t in got.top)

        chunks = list(client.generate(prompt, n=2, max_tokens=5, temperature=1.0, seed=3, ignore_eos=True))
        for index in (0, 1):
            mine = [c for c in chunks if c.index == index]
            assert [bool(c.finish_reason) for c in mine] == [False] * (len(mine) - 1) + [True]
            assert mine[-1].usage.completion_tokens == sum(len(c.token_ids) for c in mine) == 5
            assert mine[-1].usage.prompt_tokens == 4
