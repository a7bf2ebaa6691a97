"""Warm step time of the multi-host test workload: one process of 8 fake CPU devices against two
processes of 4, with the event log (leader + follower) and without it (both processes drive their
own engine with the same script, which is what the log buys without a second front end).

    PYTHONPATH=. python tools/multihost_bench.py      # runs the three set-ups, prints a table

The workload is tests/jaxserve/multihost_worker.py's script (6 requests, staggered, one abort,
an idle gap, 29 steps), run twice per layout; the second run is timed (no compilation).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

MODES = ("one_process", "log", "lockstep")


def worker(mode: str, num_processes: int, process_id: int, port: int) -> dict:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={8 // num_processes}"
    from jaxserve.distributed import build_engine, build_follower, init_distributed

    if num_processes > 1:
        init_distributed(f"127.0.0.1:{port}", num_processes, process_id)
    from jaxserve.engine import EngineCore
    from tests.engine_utils import tiny_config, tiny_engine_config, tiny_loaded_model
    from tests.jaxserve.multihost_worker import CASES, LOOKAHEAD_STEPS, MIXTRAL, drive

    loaded = tiny_loaded_model(tiny_config("MixtralForCausalLM", **MIXTRAL))
    results = {}
    for case, options in CASES.items():
        if num_processes > 1:
            options = dict(options, coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes,
                           process_id=process_id)
        config = tiny_engine_config(**options)
        if mode == "log" and process_id > 0:
            build_follower(config, loaded=loaded).run()
            continue
        engine = build_engine(config, loaded=loaded) if mode == "log" else EngineCore(config, loaded=loaded)
        shift = 0 if mode == "log" else LOOKAHEAD_STEPS
        drive(engine, shift)
        steps = engine.runner.num_dispatched_steps
        start = time.perf_counter()
        drive(engine, shift)
        seconds = time.perf_counter() - start
        results[case] = {"steps": engine.runner.num_dispatched_steps - steps, "ms_per_step": 0.0}
        results[case]["ms_per_step"] = 1000 * seconds / results[case]["steps"]
        if mode == "log":
            engine.shutdown()
    return results


def main() -> None:
    table = {}
    for mode in MODES:
        num_processes = 1 if mode == "one_process" else 2
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        procs = [subprocess.Popen([sys.executable, __file__, mode, str(num_processes), str(pid), str(port)],
                                  stdout=subprocess.PIPE, text=True) for pid in range(num_processes)]
        outputs = [proc.communicate(timeout=600)[0] for proc in procs]
        line = next(l for l in outputs[0].splitlines() if l.startswith("RESULT "))
        table[mode] = json.loads(line[len("RESULT "):])
    print("| layout | " + " | ".join(MODES) + " |")
    print("|---|" + "---|" * len(MODES))
    for case in table["one_process"]:
        print(f"| {case} | " + " | ".join(f"{table[m][case]['ms_per_step']:.1f} ms" for m in MODES) + " |")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        print("RESULT " + json.dumps(worker(sys.argv[1], *(int(x) for x in sys.argv[2:5]))), flush=True)
    else:
        main()
