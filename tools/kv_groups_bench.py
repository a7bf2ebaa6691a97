"""What KV groups for sliding-window layers buy (jaxserve/kv/cache_manager.py), measured.

Serve: a tiny gpt-oss-shaped model (one window-128 layer, one full layer, block 16) serves the
same 24 greedy requests (prompts of 600..900 tokens, 64 output tokens) from one KV budget, with
KV groups and with one group (`disable_hybrid_kv_cache_manager`), back to back. Reported: the
full-attention tokens the budget holds, the most requests running at once, preemptions, steps,
output tokens per second (both engines compile every bucket first), and whether both runs gave
the same tokens.

Plan: the KV tokens gpt-oss-20b and -120b's specs get from a 40 GiB bf16 budget, both ways
(arithmetic only, `plan_kv_cache`).

Run: PYTHONPATH=. python tools/kv_groups_bench.py [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import time

import jax.numpy as jnp
import numpy as np

from jaxserve.config import EngineConfig
from jaxserve.kv.sizing import plan_kv_cache
from jaxserve.sampling_params import SamplingParams
from models.config import ModelConfig
from tests.engine_utils import tiny_engine, tiny_loaded_model

WINDOW, BLOCK = 128, 16


def tiny_gpt_oss() -> ModelConfig:
    return ModelConfig.from_hf(dict(
        architectures=["GptOssForCausalLM"], vocab_size=96, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=4096, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"],
        attention_bias=True, eos_token_id=1, rms_norm_eps=1e-5))


def serve(loaded, prompts, **options) -> dict:
    per_token = 2 * 2 * 2 * 16 * 4  # layers, K and V, KV heads, head_dim, f32
    engine = tiny_engine(loaded, block_size=BLOCK, max_model_len=1024, max_num_seqs=8, max_num_batched_tokens=256,
                         token_buckets=(64, 256), request_buckets=(4, 8), kv_cache_memory_bytes=3000 * per_token,
                         compile_at_startup=True, **options)
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), {"prompt_token_ids": prompt}, params)
    outputs, peak, steps, start = {}, 0, 0, time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out.outputs[0].token_ids
        peak = max(peak, engine.num_running())
        steps += 1
    seconds = time.perf_counter() - start
    plan = engine.kv_plan
    return {"groups": [str(w) for w in plan.group_windows], "blocks": list(plan.group_blocks),
            "full_attention_tokens": (plan.group_blocks[0] - 1) * BLOCK, "peak_running": peak,
            "preemptions": engine.scheduler.num_preemptions, "steps": steps,
            "output_tok_s": round(64 * len(prompts) / seconds, 1), "tokens": [outputs[str(i)] for i in range(len(prompts))]}


def plans() -> list[dict]:
    rows = []
    for name, layers in (("gpt-oss-20b", 24), ("gpt-oss-120b", 36)):
        model = ModelConfig.from_hf(dict(
            architectures=["GptOssForCausalLM"], vocab_size=201088, hidden_size=2880, intermediate_size=2880,
            num_hidden_layers=layers, num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=32,
            num_experts_per_tok=4, max_position_embeddings=131072, sliding_window=128,
            layer_types=["sliding_attention", "full_attention"] * (layers // 2), attention_bias=True))
        config = EngineConfig(model="x", max_model_len="auto", kv_cache_memory_bytes=40 << 30, max_num_seqs=256,
                              max_num_batched_tokens=8192, max_num_reqs=4096)
        one = plan_kv_cache(config, model, jnp.bfloat16)
        groups = plan_kv_cache(config, model, jnp.bfloat16, (None, 128))
        rows.append({"model": name, "one_group_tokens": one.num_tokens,
                     "groups_full_tokens": (groups.group_blocks[0] - 1) * 16,
                     "window_pool_blocks": groups.group_blocks[1],
                     "ratio": round((groups.group_blocks[0] - 1) / (one.num_blocks - 1), 3)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json")
    args = parser.parse_args()
    loaded = tiny_loaded_model(tiny_gpt_oss())
    rng = np.random.default_rng(0)
    prompts = [rng.integers(2, 96, int(n)).tolist() for n in rng.integers(600, 901, 24)]
    one = serve(loaded, prompts, disable_hybrid_kv_cache_manager=True)  # both compiled before timing
    groups = serve(loaded, prompts)
    result = {"serve": {"groups": {k: v for k, v in groups.items() if k != "tokens"},
                        "one_group": {k: v for k, v in one.items() if k != "tokens"},
                        "same_tokens": groups["tokens"] == one["tokens"]},
              "plans": plans()}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
