"""KV capacity and admission under data-parallel attention, on fake CPU devices.

Every dp shard gets the whole per-device KV budget as its own block pool, so the engine's KV
tokens grow with dp. This serves the same 16 greedy requests (48..64 prompt tokens, 32 output
tokens) on a tiny Llama with one fixed per-device budget at DP=1, 2, 4 and reports the KV tokens,
the most requests running at once, preemptions and steps. It also prints the planned KV tokens
of the default model (SmolLM2-135M, bf16) for a 1 GiB per-device budget (arithmetic only).

Per-shard step budgets (`budget` table): `max_num_batched_tokens` and `max_num_seqs` hold per dp
shard, so at one fixed per-shard budget (32 tokens, 4 requests) and KV to spare, the same 32
requests are served at DP=1, 2, 4 and the table reports tokens scheduled per step (mean, max, and
the most any one shard got), steps to finish and the most requests running at once.
Run: PYTHONPATH=. python tools/dp_capacity_bench.py [capacity|budget]  (both by default)
"""

from __future__ import annotations

import os
import sys
import time

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxserve.config import EngineConfig  # noqa: E402
from jaxserve.kv.sizing import plan_kv_cache  # noqa: E402
from jaxserve.sampling_params import SamplingParams  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from tests.engine_utils import random_prompts, tiny_config, tiny_engine, tiny_loaded_model  # noqa: E402

BYTES_PER_TOKEN = 512  # tiny Llama: 2 layers x (K, V) x 2 KV heads x 16 dims x 4 bytes


def serve(loaded, prompts, dp: int) -> dict:
    engine = tiny_engine(loaded, data_parallel_size=dp, max_model_len=128, max_num_seqs=16, request_buckets=(16,),
                         kv_cache_memory_bytes=64 * 4 * BYTES_PER_TOKEN)  # 64 blocks of 4 tokens per device
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    peak, steps, start = 0, 0, time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
        peak = max(peak, engine.num_running())
        steps += 1
    return {"kv_tokens": dp * (engine.kv_plan.num_blocks - 1) * engine.config.block_size, "peak_running": peak,
            "preemptions": engine.scheduler.num_preemptions, "steps": steps,
            "seconds": time.perf_counter() - start}


def serve_budget(loaded, prompts, dp: int, tokens_per_shard: int, seqs_per_shard: int) -> dict:
    """Serve `prompts` with a per-shard budget, recording every step's scheduled tokens."""
    engine = tiny_engine(loaded, data_parallel_size=dp, max_model_len=128, max_num_seqs=seqs_per_shard,
                         max_num_batched_tokens=tokens_per_shard, request_buckets=(seqs_per_shard,),
                         kv_cache_memory_bytes=256 * 4 * BYTES_PER_TOKEN)  # room for every request
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    scheduler, steps = engine.scheduler, []
    schedule = scheduler.schedule

    def recording_schedule():
        out = schedule()
        if out.scheduled:
            per_shard = [0] * dp
            for row in out.scheduled:
                per_shard[engine.kv_manager.shard_of(row.request_id) if dp > 1 else 0] += row.num_new_tokens
            steps.append((out.num_scheduled_tokens, max(per_shard), scheduler.num_running))
        return out

    scheduler.schedule = recording_schedule
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    tokens = [t for t, _, _ in steps]
    return {"mean_tokens": float(np.mean(tokens)), "max_tokens": max(tokens),
            "max_shard_tokens": max(s for _, s, _ in steps), "steps": len(steps),
            "peak_running": max(r for _, _, r in steps), "preemptions": scheduler.num_preemptions,
            "seconds": time.perf_counter() - start}


def budget_table(loaded) -> None:
    tokens_per_shard, seqs_per_shard = 32, 4
    prompts = random_prompts(np.random.default_rng(4), 32, 48, 64, loaded.config.vocab_size)
    print(f"\nPer-shard budget: {tokens_per_shard} tokens, {seqs_per_shard} requests per step per shard; "
          "32 requests (48..64 prompt tokens, 32 output tokens)")
    print("| dp | tokens/step mean | tokens/step max | most on one shard | steps | most running at once "
          "| preemptions | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for dp in (1, 2, 4):
        r = serve_budget(loaded, prompts, dp, tokens_per_shard, seqs_per_shard)
        print(f"| {dp} | {r['mean_tokens']:.1f} | {r['max_tokens']} | {r['max_shard_tokens']} | {r['steps']} "
              f"| {r['peak_running']} | {r['preemptions']} | {r['seconds']:.1f} |")


def default_model_plan() -> None:
    smollm = ModelConfig.from_hf(dict(
        architectures=["LlamaForCausalLM"], vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192))
    print("\nSmolLM2-135M, bf16 KV, 1 GiB KV budget per device, block 16:")
    print("| dp | KV tokens per shard | KV tokens, engine |")
    print("|---|---|---|")
    for dp in (1, 2, 8):
        config = EngineConfig(model="x", kv_cache_memory_bytes=1 << 30, max_model_len=8192, data_parallel_size=dp)
        plan = plan_kv_cache(config, smollm, jnp.bfloat16)
        print(f"| {dp} | {plan.num_tokens:,} | {dp * plan.num_tokens:,} |")


def capacity_table(loaded) -> None:
    prompts = random_prompts(np.random.default_rng(3), 16, 48, 64, loaded.config.vocab_size)
    print("| dp | KV tokens | most running at once | preemptions | steps | seconds |")
    print("|---|---|---|---|---|---|")
    for dp in (1, 2, 4):
        r = serve(loaded, prompts, dp)
        print(f"| {dp} | {r['kv_tokens']} | {r['peak_running']} | {r['preemptions']} | {r['steps']} "
              f"| {r['seconds']:.1f} |")
    default_model_plan()


def main(modes: list[str]) -> int:
    unknown = sorted(set(modes) - {"capacity", "budget"})
    if unknown:
        raise SystemExit(f"modes must be 'capacity' and/or 'budget', got {unknown}")
    loaded = tiny_loaded_model(tiny_config())
    if "capacity" in modes:
        capacity_table(loaded)
    if "budget" in modes:
        budget_table(loaded)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["capacity", "budget"]))
