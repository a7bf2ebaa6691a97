"""`jaxserve serve` on the default model, as a real process: a greedy stream gives the tokens of
`LLM.generate`, and SIGTERM shuts it down cleanly."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest

from jaxserve.sampling_params import SamplingParams
from server.client import Client

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def start_serve(*flags: str) -> subprocess.Popen:
    """`jaxserve serve` on the default model as a process, with the session's default_llm engine
    options (its compiled buckets are reused); stdout is read for the line that says where."""
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
           "JAX_COMPILATION_CACHE_DIR": os.path.join(ROOT, ".jax_cache")}
    return subprocess.Popen(
        [sys.executable, "-m", "server.main", "serve", "--port", "0", "--max-model-len", "1024",
         "--max-num-seqs", "16", "--max-num-batched-tokens", "256", "--no-compile-at-startup",
         "--token-buckets", "32,128", "--request-buckets", "4,16", *flags],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


@pytest.mark.slow
@pytest.mark.default_model
def test_jaxserve_serve_streams_the_tokens_of_llm_generate(default_llm):
    prompt = "The capital of France is"
    expected = default_llm.generate(prompt, SamplingParams(max_tokens=12, temperature=0.0), use_tqdm=False)[0]
    process = start_serve("--http-port", "-1", "--shutdown-grace-s", "5")
    try:
        line = process.stdout.readline()
        match = re.search(r"serving smollm2-135m-instruct on 127\.0\.0\.1:(\d+)", line)
        assert match, line
        with Client(f"127.0.0.1:{match.group(1)}") as client:
            text, ids, last = client.complete(prompt, max_tokens=12, temperature=0.0)
            info = client.model_info()
        assert ids == expected.outputs[0].token_ids
        assert text == expected.outputs[0].text
        assert last.usage.prompt_tokens == len(expected.prompt_token_ids)
        assert (info.model, info.vocab_size, info.max_model_len) == ("smollm2-135m-instruct", 49152, 1024)
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    finally:
        process.kill()


@pytest.mark.slow
@pytest.mark.default_model
def test_sigterm_with_busy_streams_exits_within_the_grace_period_plus_5_s(default_llm):
    """SIGTERM with 16 streams and a 30 s grace exited after 47 s. Now: 12 reading and 4
    never-reading streams, each far from done when the grace period (3 s) ends; the process
    exits with 0 within grace + 5 s of the signal, and every reading stream ends (aborted)."""
    import threading
    import time

    import grpc

    from server import generation_pb2 as pb

    grace = 3.0
    process = start_serve("--http-port", "-1", "--shutdown-grace-s", str(grace))
    ends, started = [], threading.Barrier(13)
    try:
        line = process.stdout.readline()
        match = re.search(r"on 127\.0\.0\.1:(\d+)", line)
        assert match, line
        target = f"127.0.0.1:{match.group(1)}"
        request = pb.GenerateRequest(text="Count to a thousand:", sampling=pb.SamplingParams(
            max_tokens=900, temperature=0.0, ignore_eos=True))
        with Client(target) as idle_client:
            unread = [idle_client.stub.Generate(request, timeout=120) for _ in range(4)]  # never read

            def read():
                with Client(target) as client:
                    chunks = client.stub.Generate(request, timeout=120)
                    next(chunks)
                    started.wait(60)
                    last = None
                    try:
                        for last in chunks:
                            pass
                        ends.append(last.finish_reason if last is not None else "none")
                    except grpc.RpcError as error:
                        ends.append(error.code().name)

            readers = [threading.Thread(target=read, daemon=True) for _ in range(12)]
            for reader in readers:
                reader.start()
            started.wait(120)
            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)
            code = process.wait(60)
            elapsed = time.monotonic() - signalled
            for reader in readers:
                reader.join(10)
            del unread
        assert code == 0 and elapsed <= grace + 5, (code, elapsed)
        assert len(ends) == 12 and set(ends) <= {"abort", "UNAVAILABLE", "CANCELLED"}, ends
    finally:
        process.kill()
