"""End to end on a random-weight Llama-3.1-8B-shaped model: part (g) of the GPU check.

1. Batch-1 decode: one 512-token prompt, 128 tokens out; TPOT against the HBM floor of a step
   (every weight byte plus the sequence's KV read once, at the copy bandwidth measured in the run).
2. Offline throughput: 256 prompts of 512 random tokens, 128 out, greedy, EOS ignored
   (`bench throughput`'s recipe, seed 0), against the roofline measured in the same run.

The prompts are `throughput.make_prompts(...)`: tools/gpu_transformers_peer.py builds the same ones
for Hugging Face transformers' `generate` on the same card. The model is described here as a plain
HF config dict, so the peer builds the same shape without importing jax.
"""

from __future__ import annotations

import time

LLAMA_8B = dict(architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False, eos_token_id=1,
                rope_theta=500000.0)
TINY = dict(LLAMA_8B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16)
# (prompts, prompt length, output length) of the batch-1 and throughput workloads.
WORKLOAD = {"batch1": (1, 512, 128), "throughput": (256, 512, 128)}
TINY_WORKLOAD = {"batch1": (1, 24, 8), "throughput": (6, 24, 8)}


def engine_config(tiny: bool):
    """Buckets for one-token decode at batch 1 and 256-row decode; a 256-token budget keeps a
    decode step of 256 rows in a bucket of its own size."""
    from jaxserve.config import EngineConfig

    if tiny:
        return EngineConfig(model="random-llama-tiny", block_size=16, max_model_len=128, max_num_seqs=8,
                            max_num_batched_tokens=32, token_buckets=(16, 32), request_buckets=(1, 8),
                            kv_cache_memory_bytes=16 << 20)
    return EngineConfig(model="random Llama-3.1-8B shape", block_size=16, max_model_len=1024, max_num_seqs=256,
                        max_num_batched_tokens=256, token_buckets=(16, 256), request_buckets=(1, 256),
                        kv_cache_memory_bytes=24 << 30)


def run_end_to_end(result: dict, save, *, tiny: bool, deadline: float, copy_gb_s: float | None = None,
                   backend: str = "auto") -> dict:
    """Fills `result` (saved after each stage): start-up, kernels, batch1, throughput. `backend`:
    the attention kernel (dispatch.BACKENDS)."""
    import argparse

    from jaxserve.benchmarks.roofline import measure_copy_bandwidth
    from jaxserve.benchmarks.throughput import kv_bytes_per_position, make_prompts, measure, weight_bytes
    from jaxserve.engine import resolve_dtype
    from jaxserve.llm import LLM
    from jaxserve.sampling_params import SamplingParams
    from models.config import ModelConfig
    from models.loader import random_model

    hf = TINY if tiny else LLAMA_8B
    workload = TINY_WORKLOAD if tiny else WORKLOAD
    config = ModelConfig.from_hf(hf)
    start = time.perf_counter()
    loaded = random_model(config, dtype=resolve_dtype("auto"), seed=0, attention_backend=backend)
    result["model_init_s"] = time.perf_counter() - start
    start = time.perf_counter()
    llm = LLM(config=engine_config(tiny), loaded=loaded)
    engine = llm.engine
    result["startup_s"] = time.perf_counter() - start  # compiling every bucket (parallel on a many-core host)
    result["warmup_seconds"] = engine.runner.warmup_seconds
    result["model"] = "random Llama-3.1-8B shape" if not tiny else "random tiny Llama"
    result["kernels"] = {part: {"backend": c.backend, "reason": c.reason} for part, c in engine.kernels.items()}
    result["weight_bytes"] = weight_bytes(loaded.model)
    save()

    count, prompt_len, output_len = workload["batch1"]
    prompt = make_prompts(count, prompt_len, prompt_len, config.vocab_size, seed=1)[0]
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)  # first run: any lazy compile
    (out,) = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    tokens = len(out.outputs[0].token_ids)
    tpot_s = (out.metrics.e2e - out.metrics.ttft) / (tokens - 1)
    copy = (copy_gb_s or measure_copy_bandwidth(4 << 20 if tiny else 2 << 30) / 1e9) * 1e9
    mean_context = prompt_len + tokens / 2
    step_bytes = result["weight_bytes"] + mean_context * kv_bytes_per_position(config, engine.runner.kv_caches)
    floor_s = step_bytes / copy
    result["batch1"] = {"prompt_tokens": prompt_len, "output_tokens": tokens, "ttft_ms": out.metrics.ttft * 1e3,
                        "tpot_ms": tpot_s * 1e3, "step_bytes": step_bytes, "copy_gb_s": copy / 1e9,
                        "hbm_floor_ms": floor_s * 1e3, "fraction_of_hbm_floor": floor_s / tpot_s}
    print("batch-1 decode:", result["batch1"], flush=True)
    save()

    if time.monotonic() > deadline:
        return result
    count, prompt_len, output_len = workload["throughput"]
    args = argparse.Namespace(num_prompts=count, min_input_len=prompt_len, max_input_len=prompt_len,
                              output_len=output_len, seed=0)
    result["throughput"] = measure(args, llm)
    print("throughput:", {k: result["throughput"][k] for k in ("output_tok_s", "duration_s", "compilations_during_run")},
          flush=True)
    save()
    return result
