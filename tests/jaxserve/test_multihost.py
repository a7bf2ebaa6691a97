"""Multi-host: one engine over a mesh spanning processes, against one process.

The slow test runs two processes x 4 fake CPU devices (jax.distributed on 127.0.0.1, gloo
collectives) and, beside them, one process of 8 devices with the plain engine
(tests/jaxserve/multihost_worker.py): staggered arrivals, one abort, an idle gap. The in-process
tests check the event protocol itself (a follower replaying a leader's log on one device), the
AsyncLLM front end over a leader, and option validation.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxserve.async_llm import AsyncLLM
from jaxserve.config import EngineConfig
from jaxserve.distributed import build_engine, resolve_spec
from jaxserve.event_log import LOOKAHEAD_STEPS, SHUTDOWN, SYNC, EventLog, InMemoryStore, claim_engine_number
from jaxserve.multihost import FollowerEngine, LeaderEngine
from jaxserve.sampling_params import SamplingParams
from tests.engine_utils import tiny_engine, tiny_loaded_model
from tests.jaxserve.multihost_worker import CASES, LATE, PROMPTS, drive

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def runs():
    """{"reference", "leader", "follower"} -> {case -> result}; the three processes run at once
    and are killed if any fails or the time runs out."""
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.pop("XLA_FLAGS", None)
    port, cases = _free_port(), ",".join(CASES)
    argv = {"reference": ["1", "0", "0"], "leader": ["2", "0", str(port)], "follower": ["2", "1", str(port)]}
    procs = {name: subprocess.Popen([sys.executable, "-m", "tests.jaxserve.multihost_worker", *args, cases],
                                    cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, args in argv.items()}
    results, errors = {}, []
    deadline = time.monotonic() + TIMEOUT_S  # for all three together
    try:
        for name, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            if proc.returncode != 0:
                errors.append(f"{name} exited {proc.returncode}:\n{stderr[-3000:]}")
                continue
            line = next(l for l in stdout.splitlines() if l.startswith("RESULT "))
            results[name] = json.loads(line[len("RESULT "):])
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert not errors, "\n".join(errors)
    return results


def _compare(got: dict, ref: dict, label: str, near_tie=1e-4, logprob_tolerance=1e-5) -> None:
    """DESIGN.md's greedy rule per request; same finish reasons; shared candidates' logprobs close."""
    assert sorted(got) == sorted(ref), label
    for request_id, want in ref.items():
        have = got[request_id]
        assert have["finish"] == want["finish"], (label, request_id)
        for step, (a, b) in enumerate(zip(have["tokens"], want["tokens"])):
            if a != b:
                top2 = sorted(want["logprobs"][step].values(), reverse=True)[:2]
                assert top2[0] - top2[1] < near_tie, f"{label}: request {request_id} diverges at step {step}"
                break
            for token, lp in have["logprobs"][step].items():
                if token in want["logprobs"][step]:
                    assert abs(lp - want["logprobs"][step][token]) < logprob_tolerance, (label, request_id, step)
        else:
            assert len(have["tokens"]) == len(want["tokens"]), (label, request_id)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_match_one_process(runs, case):
    got, ref = runs["leader"][case]["outputs"], runs["reference"][case]["outputs"]
    assert ref["3"]["finish"] == "abort" and 0 < len(ref["3"]["tokens"]) < 40  # aborted mid-run
    assert all(len(ref[i]["tokens"]) == 10 for i in ("0", "1", "2", "4", LATE))
    _compare(got, ref, case)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_follower_computes_the_leaders_outputs_without_waiting_while_busy(runs, case):
    leader, follower = runs["leader"][case], runs["follower"][case]
    assert follower["outputs"] == leader["outputs"]  # replicated results: the very same values
    assert follower["steps"] == leader["steps"]
    # Blocking reads happen only while idle (the start, the gap, the shutdown, and any arrival the
    # leader logs while both sides are idle: how many depends on timing under load), never one per
    # step. Busy steps poll without waiting: each finds nothing at most once (further polls in a
    # step are the ones that found an event, one per event read).
    assert follower["steps"] > 20 and 3 <= follower["waits"] < follower["steps"] // 2, follower
    assert follower["empty_polls"] <= follower["steps"], follower


@pytest.mark.slow
def test_the_host_tier_saves_and_loads_the_same_blocks_on_every_process(runs):
    """Evictions, saves and loads follow the deterministic schedule: every process and the
    one-process reference count the same, and LATE loads back the aborted request's blocks."""
    stats = [{k: runs[name]["ep8_host_tier"][k] for k in ("tier_saved", "tier_loaded", "prefix_hits")}
             for name in ("reference", "leader", "follower")]
    assert stats[0] == stats[1] == stats[2], stats
    assert stats[0]["tier_saved"] > 0 and stats[0]["tier_loaded"] == len(PROMPTS[3]) // 4, stats


@pytest.mark.slow
def test_processes_agree_on_the_smallest_kv_budget(runs):
    """Each process measures its own free device memory; all must plan the same KV cache."""
    assert runs["leader"]["smallest_budget"] == runs["follower"]["smallest_budget"] == 1000
    assert runs["reference"]["smallest_budget"] == 1000  # one process: its own value


TINY_ENGINE = dict(max_model_len=128, kv_cache_memory_bytes=4_000_000, max_num_seqs=4, max_num_batched_tokens=32)


def _tiny_mixtral_dir(tmp_path: Path) -> Path:
    """The Mixtral parity fixture as an HF folder with a tokenizer: what the CLI loads."""
    import shutil

    from tests.engine_utils import tiny_tokenizer

    model = tmp_path / "tiny-mixtral"
    shutil.copytree(ROOT / "tests/fixtures/parity/mixtral", model, ignore=shutil.ignore_patterns("reference.npz"))
    tiny_tokenizer(160).hf.save(str(model / "tokenizer.json"))
    return model


def _two_process_cli(tmp_path: Path, command: list[str], log_level: str = "WARNING") -> list[subprocess.Popen]:
    """`jaxserve <command>` as processes 0 and 1 of two, 4 fake devices each, EP=4 x TP=2."""
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               XLA_FLAGS="--xla_force_host_platform_device_count=4", JAXSERVE_CACHE_DIR=str(tmp_path / "cache"),
               JAXSERVE_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAXSERVE_NUM_PROCESSES="2")
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY_ENGINE.items()]
    return [subprocess.Popen(
        [sys.executable, "-m", "server.main", "--log-level", log_level, *command,
         "--expert-parallel-size", "4", "--tensor-parallel-size", "2", *flags],
        cwd=ROOT, env=dict(env, JAXSERVE_PROCESS_ID=str(pid)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for pid in (0, 1)]


def _one_device_greedy(model: Path, prompts: list[str], max_tokens: int) -> list:
    from jaxserve.llm import LLM

    llm = LLM(model=str(model), use_weight_cache=False, compile_at_startup=False, **TINY_ENGINE)
    return [out.outputs[0] for out in llm.generate(
        prompts, SamplingParams(max_tokens=max_tokens, temperature=0), use_tqdm=False)]


def _finish(procs: list[subprocess.Popen], deadline: float) -> list[tuple[str, str]]:
    """Each process's (stdout, stderr) once it exits; all killed if the deadline passes."""
    try:
        return [proc.communicate(timeout=max(1.0, deadline - time.monotonic())) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


@pytest.mark.slow
@pytest.mark.parametrize("source", ["hf folder", "orbax checkpoint", "weight cache"])
def test_cli_generate_on_two_processes_matches_one_device(tmp_path, source):
    """`jaxserve generate` with the multi-host flags: process 1 follows and exits by itself,
    process 0 prints what one device generates (the fixture's greedy top-2 margins are >= 6e-4,
    far above float reordering). Every process loads the weights itself: from the HF folder
    (converted, and not cached: orbax saves in lockstep as global arrays), from a checkpoint
    folder, or from the weight cache a single-process run wrote (each restores its own copy)."""
    from models.loader import convert, load_model

    hf, prompt = _tiny_mixtral_dir(tmp_path), "w5 w6 w7 w8 w9"
    model = hf
    if source == "orbax checkpoint":
        model = Path(convert(str(hf), str(tmp_path / "checkpoint")))
    elif source == "weight cache":
        load_model(str(hf), cache_dir=str(tmp_path / "cache"))  # one process: converts and caches
    procs = _two_process_cli(tmp_path, ["generate", prompt, "--model", str(model), "--max-tokens", "12"],
                             log_level="INFO")
    try:
        want = _one_device_greedy(hf, [prompt], 12)[0].text
    finally:
        (out0, err0), (out1, err1) = _finish(procs, time.monotonic() + TIMEOUT_S)
    assert procs[0].returncode == 0, err0[-3000:]
    assert procs[1].returncode == 0, err1[-3000:]
    assert len(want.split()) == 12 and want in out0
    assert want not in out1  # followers compute the same tokens but print nothing
    how = {"hf folder": "(multi-host: not cached", "orbax checkpoint": "(restored checkpoint)",
           "weight cache": "(restored cached checkpoint"}[source]
    assert how in err0 and how in err1, (err0[-2000:], err1[-2000:])
    if source == "hf folder":
        assert not (tmp_path / "cache" / "checkpoints").exists()


@pytest.mark.slow
def test_grpc_server_on_two_processes_matches_one_device(tmp_path):
    """`jaxserve serve` on two processes: process 0 serves gRPC, process 1 follows. Concurrent
    streams (one cancelled by its client mid-way) give one device's greedy tokens; SIGTERM on
    process 0 stops both."""
    import contextlib
    import queue
    import re
    import signal
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from server.client import Client

    model = _tiny_mixtral_dir(tmp_path)
    prompts = ["w5 w6 w7 w8 w9", "w10 w11", "w3 w4 w5 w6 w7 w8 w9 w10 w11 w12", "w20", "w7 w7 w7"]
    procs = _two_process_cli(tmp_path, ["serve", "--model", str(model), "--port", "0", "--http-port", "-1",
                                          "--shutdown-grace-s", "5"])
    deadline = time.monotonic() + TIMEOUT_S
    try:
        lines: queue.Queue = queue.Queue()  # read beside the test: a silent process cannot block it

        def read():
            with contextlib.suppress(ValueError, OSError):  # closed by _finish at the end
                for line in procs[0].stdout:
                    lines.put(line)

        threading.Thread(target=read, daemon=True).start()
        match, seen = None, []
        while match is None and procs[0].poll() is None and time.monotonic() < deadline:
            try:
                seen.append(lines.get(timeout=1.0))  # gloo prints its connections first
            except queue.Empty:
                continue
            match = re.search(r"serving \S+ on 127\.0\.0\.1:(\d+)", seen[-1])
        assert match, (seen, procs[0].poll())
        with Client(f"127.0.0.1:{match.group(1)}") as client:
            def complete(prompt):
                text, ids, _ = client.complete(prompt, max_tokens=10, temperature=0.0, timeout=120)
                return ids

            def cancelled(prompt):  # the client walks away after 3 chunks: the server aborts it
                stream = client.generate(prompt, max_tokens=40, temperature=0.0, timeout=120)
                chunks = [next(stream) for _ in range(3)]
                stream.close()
                return chunks

            with ThreadPoolExecutor(len(prompts) + 1) as pool:
                got = list(pool.map(complete, prompts))
                assert len(pool.submit(cancelled, prompts[0]).result()) == 3
                again = complete(prompts[1])  # the engine keeps serving after the cancel
        want = [out.token_ids for out in _one_device_greedy(model, prompts, 10)]
        assert got == want and again == want[1]
    finally:
        if procs[0].poll() is None:
            procs[0].send_signal(signal.SIGTERM)  # stops the follower too, through the event log
        (_, err0), (_, err1) = _finish(procs, min(deadline, time.monotonic() + 60))
    assert procs[0].returncode == 0, err0[-3000:]
    assert procs[1].returncode == 0, err1[-3000:]  # the follower stops with the leader


# ---- in-process: the protocol on one device ----

@pytest.fixture(scope="module")
def loaded():
    return tiny_loaded_model()


def _leader(loaded, store=None, **options) -> LeaderEngine:
    return LeaderEngine(tiny_engine(loaded, **options), EventLog(store or InMemoryStore(), "test/events"))


# Priority policy with 17 KV blocks: requests preempt each other (recompute) in this workload.
SCARCE_KV = dict(scheduling_policy="priority", max_model_len=64, kv_cache_memory_bytes=18 * 2048)


@pytest.mark.parametrize("options", [{}, SCARCE_KV], ids=["fcfs", "priority_preempting"])
def test_follower_replaying_the_log_matches_leader_and_plain_engine(loaded, options):
    """The leader applies each event LOOKAHEAD_STEPS after logging it (or at once when idle); a
    follower that finds every event already written still applies each at its stamped step."""
    store = InMemoryStore()
    leader = _leader(loaded, store, **options)
    led = drive(leader, shift=0)
    leader.shutdown()
    followed = {}
    follower = FollowerEngine(tiny_engine(loaded, **options), EventLog(store, "test/events"),
                              on_output=lambda out: followed.update({out.request_id: out}) if out.finished else None)
    follower.run()
    plain = tiny_engine(loaded, **options)
    assert led == drive(plain, shift=LOOKAHEAD_STEPS)
    assert {rid: out.outputs[0].token_ids for rid, out in followed.items()} == {
        rid: out["tokens"] for rid, out in led.items()}
    assert led["3"]["finish"] == "abort" and follower.step_index == leader.step_index
    assert follower.log.next_index == leader.log.next_index  # read the whole log, shutdown included
    preemptions = leader.core.scheduler.num_preemptions
    assert follower.core.scheduler.num_preemptions == plain.scheduler.num_preemptions == preemptions
    assert (preemptions > 0) == bool(options)


def test_leader_logs_only_valid_requests_and_syncs_when_idle(loaded):
    leader = _leader(loaded)
    with pytest.raises(ValueError, match="max_tokens"):
        leader.add_request("a", [5, 6, 7], SamplingParams(max_tokens=0))
    with pytest.raises(ValueError, match="prompt_token_ids"):
        leader.add_request("a", [5, 1000], SamplingParams())
    assert leader.log.next_index == 0
    leader.add_request("a", [5, 6, 7], SamplingParams(max_tokens=3, temperature=0))
    with pytest.raises(ValueError, match="already in use"):
        leader.add_request("a", [5, 6, 7], SamplingParams())
    assert leader.has_unfinished_requests() and not leader.core.states  # logged, not applied yet
    leader.step()  # idle: a sync event, then the request applies at once
    events = [leader.log.store.key_value_try_get_bytes(f"test/events/{i}") for i in range(2)]
    assert [pickle.loads(e).kind for e in events] == ["add", SYNC]
    while leader.has_unfinished_requests():
        leader.step()
    leader.shutdown()
    assert pickle.loads(leader.log.store.key_value_try_get_bytes("test/events/2")).kind == SHUTDOWN
    with pytest.raises(RuntimeError, match="shut down"):
        leader.add_request("b", [5], SamplingParams())


def test_async_llm_serves_through_a_leader(loaded):
    """The server's front end drives a LeaderEngine unchanged; tokens as from the plain engine."""
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)

    async def generate(llm):
        async def one(i):
            return [t async for out in llm.generate(PROMPTS[i], params, request_id=str(i))
                    for t in out.outputs[0].token_ids]
        return await asyncio.gather(*(one(i) for i in range(3)))

    with AsyncLLM(engine=_leader(loaded)) as llm:
        got = asyncio.run(generate(llm))
    with AsyncLLM(engine=tiny_engine(loaded)) as llm:
        want = asyncio.run(generate(llm))
    assert got == want and all(len(t) == 6 for t in got)


def test_a_paused_stream_pauses_every_process_at_the_same_step(loaded):
    """Backpressure under multi-host: AsyncLLM pauses a request whose reader stopped, through the
    leader's log; a follower replaying it schedules the same steps and computes the same tokens."""
    store = InMemoryStore()
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)

    async def main(llm):
        slow = llm.generate(PROMPTS[0], params, request_id="slow")
        tokens = list((await anext(slow)).outputs[0].token_ids)
        other = [t async for out in llm.generate(PROMPTS[1], params, request_id="other") for t in out.outputs[0].token_ids]
        generated = len(llm.engine.core.states["slow"].trackers[0].token_ids)
        tokens += [t async for out in slow for t in out.outputs[0].token_ids]
        return tokens, other, generated

    leader = _leader(loaded, store)
    with AsyncLLM(engine=leader, stream_buffer=8, stream_stall_timeout_s=None) as llm:
        slow, other, generated = asyncio.run(main(llm))
    leader.shutdown()
    assert generated < 20 and len(slow) == len(other) == 60
    followed = {"slow": [], "other": []}  # streamed deltas
    follower = FollowerEngine(tiny_engine(loaded), EventLog(store, "test/events"),
                              on_output=lambda out: followed[out.request_id].extend(out.outputs[0].token_ids))
    follower.run()
    assert followed == {"slow": slow, "other": other}
    assert follower.step_index == leader.step_index


def test_stream_left_before_its_request_applies_is_aborted(loaded):
    """LLM.stream's caller leaving (here: the first step raises) while the leader has only logged
    its request: the abort is logged too, and the request never runs to completion."""
    from jaxserve.llm import LLM

    llm = LLM.__new__(LLM)  # an LLM front end over a leader, without loading a model again
    leader = _leader(loaded)
    llm.engine, llm.tokenizer = leader, leader.core.tokenizer
    llm._ids = iter(range(100))
    step = leader.step
    leader.step = lambda: (_ for _ in ()).throw(KeyboardInterrupt)  # noqa: E731
    stream = llm.stream([5, 6, 7], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    with pytest.raises(KeyboardInterrupt):
        next(stream)
    assert leader.has_unfinished_requests() and not leader.core.states  # logged, not applied yet
    leader.step = step
    outputs = []
    while leader.has_unfinished_requests():
        outputs += leader.step()
    outputs += leader.step()  # the abort's final output comes out of the next step
    (final,) = [out for out in outputs if out.finished]
    assert final.outputs[0].finish_reason == "abort" and len(final.outputs[0].token_ids) < 30


# ---- options ----

@pytest.mark.parametrize("options, message", [
    (dict(num_processes=0), "num_processes must be an integer >= 1"),
    (dict(num_processes=2, process_id=2), r"process_id must be an integer in \[0, 2\)"),
    (dict(process_id=-1), "process_id must be an integer >= 0"),
    (dict(coordinator_address="localhost"), "coordinator_address must be 'host:port'"),
    (dict(coordinator_address="localhost:99999"), "coordinator_address must be 'host:port'"),
])
def test_engine_config_rejects_bad_distributed_options(options, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**options)


def test_spec_reads_the_environment_and_names_it_in_errors():
    env = {"JAXSERVE_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAXSERVE_NUM_PROCESSES": "4",
           "JAXSERVE_PROCESS_ID": "3"}
    spec = resolve_spec(environ=env)
    assert (spec.coordinator_address, spec.num_processes, spec.process_id) == ("10.0.0.1:1234", 4, 3)
    assert resolve_spec(process_id=0, environ=env).is_leader  # a given value wins
    assert not resolve_spec(environ={}).is_multihost
    with pytest.raises(ValueError, match=r"\$JAXSERVE_NUM_PROCESSES must be an integer"):
        resolve_spec(environ={"JAXSERVE_NUM_PROCESSES": "two"})
    with pytest.raises(ValueError, match=r"\$JAXSERVE_PROCESS_ID must be an integer in \[0, 4\)"):
        resolve_spec(environ=dict(env, JAXSERVE_PROCESS_ID="4"))
    with pytest.raises(ValueError, match="coordinator_address .* is required"):
        resolve_spec(num_processes=2, environ={})


def test_each_process_numbers_its_engines_in_the_store():
    """The n-th engine of every process shares log n, counted in the cluster's store: a process
    that builds its engines later, or interleaved with others, still gets the same numbers."""
    store = InMemoryStore()
    assert [claim_engine_number(store, 0) for _ in range(2)] == [0, 1]
    assert claim_engine_number(store, 1) == 0
    assert claim_engine_number(store, 0) == 2
    assert [claim_engine_number(store, 1) for _ in range(2)] == [1, 2]


def test_follower_process_cannot_build_a_front_end_engine():
    follower = EngineConfig(model="tiny", coordinator_address="127.0.0.1:1", num_processes=2, process_id=1)
    with pytest.raises(ValueError, match="process_id 1 follows process 0"):
        build_engine(follower)
