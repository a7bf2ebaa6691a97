"""Per-rank expert token counts and balancedness with and without EPLB, on fake CPU devices.

A random tiny Qwen3-MoE-like model (60 experts: not a multiple of 8) served under EP=8, the same
greedy requests with EPLB off and on. Run: PYTHONPATH=. python tools/ep_balance_bench.py
(`jaxserve bench throughput --expert-parallel-size 8 [--enable-eplb]` prints the same rows
for a model on disk.)
"""

from __future__ import annotations

import os
import sys
import time

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import numpy as np  # noqa: E402

from jaxserve.eplb import balancedness  # noqa: E402
from jaxserve.sampling_params import SamplingParams  # noqa: E402
from tests.engine_utils import random_prompts, tiny_config, tiny_engine, tiny_loaded_model  # noqa: E402


def main() -> int:
    config = tiny_config("Qwen3MoeForCausalLM", num_experts=60, num_experts_per_tok=4, moe_intermediate_size=32,
                         norm_topk_prob=True, intermediate_size=64)
    loaded = tiny_loaded_model(config)
    prompts = random_prompts(np.random.default_rng(1), 16, 16, 48, config.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    for label, options in [("EP=8", {}), ("EP=8 + EPLB (8 redundant)", dict(enable_eplb=True, num_redundant_experts=8,
                                                                          eplb_step_interval=8, eplb_window_size=8))]:
        engine = tiny_engine(loaded, expert_parallel_size=8, max_num_seqs=16, request_buckets=(16,),
                             token_buckets=(64,), max_num_batched_tokens=64, **options)
        start = time.perf_counter()
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, params)
        while engine.has_unfinished_requests():
            engine.step()
        elapsed = time.perf_counter() - start
        eplb = engine.runner.eplb
        per_rank = eplb.rank_token_counts(engine.runner.params)
        print(f"{label}: {elapsed:.1f} s; tokens per rank {[int(t) for t in per_rank]}; "
              f"balancedness {balancedness(per_rank):.3f}")
        for entry in eplb.history[:3]:
            print(f"  rebalance at step {entry['step']}: window balancedness {entry['before']:.3f} -> {entry['after']:.3f}")
        if len(eplb.history) > 3:
            print(f"  ... {len(eplb.history)} rebalances")
    return 0


if __name__ == "__main__":
    sys.exit(main())
