"""Expert-parallel layouts with and without dual-batch overlap, on 8 fake CPU devices.

For a tiny Mixtral-like model (2 layers, 8 experts) under EP=8, EP=4 x TP=2 and DP=2 x EP=4 with
both dispatch strategies, prints for the compiled 64-token step: the collectives per step and
the bytes they move (per device, outputs), then the time of the same greedy workload (16
requests x 32 tokens, fastest of 3 runs) with DBO against without. XLA:CPU runs collectives synchronously and never overlaps them, so the time
ratio measures what the split costs, not what overlap gains (a GPU profile is still to come).
Run: PYTHONPATH=. python tools/dbo_bench.py
"""

from __future__ import annotations

import os
import re
import sys
import time

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import numpy as np  # noqa: E402

from jaxserve.sampling_params import SamplingParams  # noqa: E402
from tests.engine_utils import random_prompts, tiny_config, tiny_engine, tiny_loaded_model  # noqa: E402
from tests.models.hlo_deps import COLLECTIVES  # noqa: E402

LAYOUTS = {
    "EP=8": dict(expert_parallel_size=8),
    "EP=4 x TP=2": dict(expert_parallel_size=4, tensor_parallel_size=2),
    "DP=2 x EP=4": dict(data_parallel_size=2, expert_parallel_size=4),
    "DP=8": dict(data_parallel_size=8),  # experts over the 8 dp shards
}
BYTES = {"f32": 4, "bf16": 2, "s32": 4, "pred": 1, "f16": 2, "s8": 1, "u32": 4}
_SHAPE = re.compile(r"(f32|bf16|s32|pred|f16|s8|u32)\[([\d,]*)\]")


def collective_stats(hlo_text: str) -> tuple[int, int]:
    """(collective instructions, bytes of their outputs) over every computation of a compiled
    module (loop bodies counted once)."""
    count = size = 0
    for line in hlo_text.splitlines():
        match = re.match(r"^\s*(?:ROOT\s+)?%[\w.\-]+\s*=\s*(.*?)\s([\w\-]+)\(", line)
        if not match or not any(match.group(2) in (c, c + "-start") for c in COLLECTIVES):
            continue
        count += 1
        for dtype, dims in _SHAPE.findall(match.group(1)):
            size += BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
    return count, size


def serve_seconds(engine, prompts, repeats: int = 3) -> float:
    """The fastest of `repeats` runs of the workload (every bucket compiled first)."""
    engine.runner.warmup()
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    best = float("inf")
    for repeat in range(repeats):
        for i, prompt in enumerate(prompts):
            engine.add_request(f"{repeat}-{i}", prompt, params)
        start = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    loaded = tiny_loaded_model(tiny_config("MixtralForCausalLM", num_local_experts=8, num_experts_per_tok=2,
                                           intermediate_size=32))
    prompts = random_prompts(np.random.default_rng(0), 16, 8, 40, 96)
    options = dict(max_num_seqs=16, request_buckets=(16,), token_buckets=(16, 64), max_num_batched_tokens=64)
    print(f"{'layout':<14} {'dispatch':<11} {'collectives':>11} {'KiB':>7} {'with DBO':>9} {'KiB':>7} "
          f"{'time DBO / no DBO':>18}")
    for layout, parallel in LAYOUTS.items():
        for dispatch in ("allgather", "all_to_all"):
            row = []
            seconds = []
            for dbo in (False, True):
                engine = tiny_engine(loaded, **options, **parallel, expert_dispatch=dispatch, enable_dbo=dbo)
                count, size = collective_stats(engine.runner.compiled_step_text(64, 16))
                row += [count, size / 1024]
                seconds.append(serve_seconds(engine, prompts))
            print(f"{layout:<14} {dispatch:<11} {row[0]:>11} {row[1]:>7.1f} {row[2]:>9} {row[3]:>7.1f} "
                  f"{seconds[1] / seconds[0]:>18.2f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
