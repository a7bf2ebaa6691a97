"""One process of a multi-host engine test, or the one-process reference; prints one JSON result.

Usage: python -m tests.jaxserve.multihost_worker NUM_PROCESSES PROCESS_ID PORT CASES
With NUM_PROCESSES 1 it runs the reference: one process of 8 fake devices, plain `EngineCore`,
each scripted arrival and abort applied LOOKAHEAD_STEPS steps after the leader logs it (as the
multi-host engine applies it). Otherwise each of NUM_PROCESSES processes has 8 / NUM_PROCESSES
fake devices and joins the coordinator on 127.0.0.1:PORT; process 0 runs the script through
its `LeaderEngine`, the others follow. Output: {case: {"outputs": {id: {"tokens", "finish", "logprobs"}}, ...}}.
"""

from __future__ import annotations

import json
import os
import sys
import time

if __name__ == "__main__":  # before jax initialises; importing this module (tests) sets nothing
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={8 // int(sys.argv[1])}")

import numpy as np  # noqa: E402

from jaxserve.event_log import LOOKAHEAD_STEPS  # noqa: E402
from jaxserve.sampling_params import SamplingParams  # noqa: E402
from tests.engine_utils import (random_prompts, tiny_config, tiny_engine, tiny_engine_config,  # noqa: E402
                                tiny_loaded_model)

# The parallel tests' Mixtral-like model (8 experts, top-2) and two layouts over 8 devices: every
# expert on its own device (EP spans the processes), and DP across processes x EP within each.
# (Not imported from parallel_worker: importing it sets 8 devices per process.)
MIXTRAL = dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32)
# ep8_host_tier: a pool of 24 blocks, so cached blocks are evicted to the host tier, and LATE's
# prompt extends the aborted request 3's, whose blocks are evicted first: it loads them back.
CASES = {"ep8": dict(expert_parallel_size=8),
         "dp2_ep4_a2a": dict(data_parallel_size=2, expert_parallel_size=4, expert_dispatch="all_to_all"),
         "ep8_host_tier": dict(expert_parallel_size=8, kv_cache_memory_bytes=24 * 2048, max_model_len=64,
                               cpu_kv_cache_bytes=1 << 20)}

PROMPTS = random_prompts(np.random.default_rng(1), 6, 5, 20, 96)
PROMPTS[5] = PROMPTS[3] + PROMPTS[5]
SHORT = SamplingParams(temperature=0.0, max_tokens=10, logprobs=2, ignore_eos=True)
LONG = SamplingParams(temperature=0.0, max_tokens=40, logprobs=2, ignore_eos=True)
# Leader step call -> what the front end does before it (staggered arrivals, one abort).
SCRIPT = {0: [("add", "0", SHORT), ("add", "1", SHORT)],
          2: [("add", "2", SHORT), ("add", "3", LONG)],
          5: [("abort", "3", None)],
          7: [("add", "4", SHORT)]}
LATE = "5"  # added once everything above has finished: the engine goes idle and back


def drive(engine, shift: int) -> dict:
    """Run SCRIPT (each action `shift` calls late), then LATE after idling; finished outputs."""
    outputs: dict[str, list] = {}
    script = {call + (shift if call else 0): actions for call, actions in SCRIPT.items()}

    def step():
        for out in engine.step():
            _record(outputs, out)

    call = 0
    while call <= max(script) or engine.has_unfinished_requests():
        for kind, request_id, params in script.get(call, []):
            if kind == "add":
                engine.add_request(request_id, PROMPTS[int(request_id)], params)
            else:
                engine.abort_request(request_id)
        step()
        call += 1
    engine.add_request(LATE, PROMPTS[int(LATE)], SHORT)
    while engine.has_unfinished_requests():
        step()
    return outputs


def _record(outputs: dict, out) -> None:
    if out.finished:
        completion = out.outputs[0]
        logprobs = [{str(t): lp.logprob for t, lp in pos.items()} for pos in completion.logprobs]
        outputs[out.request_id] = {"tokens": completion.token_ids, "finish": completion.finish_reason,
                                   "logprobs": logprobs}


def main(num_processes: int, process_id: int, port: int, cases: list[str]) -> dict:
    from jaxserve.distributed import build_engine, build_follower, init_distributed

    if num_processes > 1:  # before the model is built: nothing may touch a device earlier
        init_distributed(f"127.0.0.1:{port}", num_processes, process_id)
    loaded = tiny_loaded_model(tiny_config("MixtralForCausalLM", **MIXTRAL))
    from jaxserve.kv.sizing import smallest_across_processes

    results = {"smallest_budget": smallest_across_processes(1000 + 10 * process_id)}
    for case in cases:
        start = time.perf_counter()
        if num_processes == 1:
            engine = tiny_engine(loaded, **CASES[case])
            results[case] = {"outputs": drive(engine, shift=LOOKAHEAD_STEPS), "seconds": time.perf_counter() - start,
                             **_kv_stats(engine)}
            continue
        config = tiny_engine_config(**CASES[case], coordinator_address=f"127.0.0.1:{port}",
                                    num_processes=num_processes, process_id=process_id)
        if process_id == 0:
            engine = build_engine(config, loaded=loaded)
            results[case] = {"outputs": drive(engine, shift=0), "steps": engine.step_index, **_kv_stats(engine.core)}
            engine.shutdown()
            results[case]["seconds"] = time.perf_counter() - start
        else:
            followed: dict[str, list] = {}
            follower = build_follower(config, loaded=loaded, on_output=lambda out: _record(followed, out))
            follower.run()
            results[case] = {"outputs": followed, "steps": follower.step_index, "waits": follower.log.num_waits,
                             "polls": follower.log.num_polls, "empty_polls": follower.log.num_empty_polls,
                             "seconds": time.perf_counter() - start}
            results[case]["poll_ms"] = _poll_ms(follower.log)
            results[case].update(_kv_stats(follower.core))
    return results


def _kv_stats(core) -> dict:
    """Prefix-cache hits and, with a host tier, the blocks it saved and loaded back."""
    stats = {"prefix_hits": core.kv_manager.prefix_cache_hits}
    tier = getattr(core.kv_connector, "tier", None)
    if tier is not None:
        stats.update(tier_saved=tier.num_saved_blocks, tier_loaded=core.kv_connector.num_loaded_blocks)
    return stats


def _poll_ms(log) -> float:
    """Milliseconds one non-blocking read of a key not yet written takes (a busy step's cost)."""
    start, count = time.perf_counter(), 50
    for _ in range(count):
        assert log.poll() is None
    log.num_polls -= count
    log.num_empty_polls -= count
    return 1000 * (time.perf_counter() - start) / count


if __name__ == "__main__":
    num_processes, process_id, port = (int(x) for x in sys.argv[1:4])
    print("RESULT " + json.dumps(main(num_processes, process_id, port, sys.argv[4].split(","))), flush=True)
