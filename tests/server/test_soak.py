"""Soak: 1,000 concurrent streams from five client processes on a tiny model, 10% cancelled
after their first chunk and one whole client process killed with SIGKILL mid-way. Every other
stream completes with all its tokens; afterwards KV usage, running and waiting requests, the
servicer's waiting count and in-flight set are back to zero, and the server's resident memory
is within 10% of what it was before."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys

import pytest

from tests.engine_utils import tiny_engine
from tests.server.conftest import ServerThread
from tests.server.soak_client import MAX_TOKENS
from tests.server.test_generate import wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OPTIONS = dict(max_num_seqs=64, max_num_batched_tokens=256, max_model_len=64, block_size=4,
               kv_cache_memory_bytes=8 << 20, token_buckets=(64, 256), request_buckets=(16, 64),
               compile_at_startup=True)


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def _clients(target: str, counts: list[int], cancel_fraction: float) -> list[subprocess.Popen]:
    env = {**os.environ, "PYTHONPATH": ROOT}
    return [subprocess.Popen([sys.executable, "-m", "tests.server.soak_client", target, str(count), str(seed),
                              str(cancel_fraction)], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
            for seed, count in enumerate(counts)]


def _results(processes: list[subprocess.Popen]) -> list[dict]:
    results = []
    for process in processes:
        out, _ = process.communicate(timeout=600)
        assert process.returncode == 0, out
        results.append(json.loads(out.splitlines()[-1]))
    return results


def _idle(server) -> bool:
    servicer = server.server.servicer
    return server.idle_state() == (0.0, 0, 0, 0) and servicer.num_queued == 0 and not servicer.live


@pytest.mark.slow
def test_a_thousand_streams_with_cancels_and_killed_clients_leave_nothing_behind(tiny_loaded):
    server = ServerThread(tiny_engine(tiny_loaded, **OPTIONS), max_waiting_requests=2000)
    try:
        _results(_clients(server.target, [200], 0.1))  # warm: grpc, the allocator, the buckets
        assert wait_until(lambda: _idle(server), 60)
        gc.collect()
        rss_before = _rss_bytes()

        survivors = _clients(server.target, [200, 200, 200, 200], 0.1)
        (victim,) = _clients(server.target, [200], 0.0)
        assert victim.stdout.readline().strip() == "started"  # all its 200 streams are running
        victim.send_signal(signal.SIGKILL)
        victim.wait(30)
        results = _results(survivors)

        assert wait_until(lambda: _idle(server), 60), server.idle_state()
        gc.collect()
        rss_after = _rss_bytes()
    finally:
        server.stop()
    cancelled = sum(r["cancelled"] for r in results)
    completed = [n for r in results for n in r["completed"]]
    assert [e for r in results for e in r["errors"]] == []
    assert 40 <= cancelled <= 140 and len(completed) + cancelled == 800
    assert completed == [MAX_TOKENS] * len(completed)
    assert rss_after <= 1.1 * rss_before, (rss_before, rss_after)
