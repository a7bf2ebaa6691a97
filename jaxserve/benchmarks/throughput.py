"""`jaxserve bench throughput`: offline generation over random-token prompts, against the
roofline measured in the same run.

Prompts follow one recipe shared with tools/bench_transformers.py, so both engines see the same
tokens: `rng = np.random.default_rng(seed)`, `lens = rng.integers(min_in, max_in + 1, n)`, then
for each length in order `rng.integers(0, vocab_size, length)`.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from jaxserve.benchmarks.report import report
from jaxserve.engine_flags import add_engine_benchmark_flags, engine_config_from_args
from models.registry import kv_spec


def make_prompts(num_prompts: int, min_len: int, max_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    lens = rng.integers(min_len, max_len + 1, num_prompts)
    return [rng.integers(0, vocab_size, int(n)).tolist() for n in lens]


SENTENCES = [
    "The river rose slowly through the night and by morning it had covered the lower fields.",
    "Every lighthouse on the coast was built from the same grey stone, quarried inland.",
    "She wrote the numbers in a small notebook and checked them twice before sending the letter.",
    "The committee agreed to meet again in the spring, once the new budget had been approved.",
    "A function that reads the configuration file should report which field is missing.",
    "The train to the mountains leaves at seven and arrives a little after noon.",
    "Most of the old maps in the library show the harbour larger than it ever was.",
    "He replaced the broken window, painted the door green and planted two apple trees.",
    "The results were stored in a table with one row per experiment and one column per setting.",
    "When the market opened, the price of wheat fell for the third week in a row.",
    "The museum keeps a collection of clocks, the oldest of which still keeps good time.",
    "After the storm, volunteers cleared the roads and repaired the bridge over the stream.",
]


def copy_prompts(tokenizer, num_prompts: int, seed: int, sentences_per_passage=(7, 10)) -> list[list[int]]:
    """Prompts of a passage (7 to 10 sentences, ~130-190 tokens) written twice, a blank line after
    each: a model answers with a third copy, so a 128-token answer is mostly copied."""
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(num_prompts):
        count = int(rng.integers(sentences_per_passage[0], sentences_per_passage[1] + 1))
        passage = " ".join(SENTENCES[i] for i in rng.permutation(len(SENTENCES))[:count])
        prompts.append(tokenizer.encode(f"{passage}\n\n{passage}\n\n"))
    return prompts


def add_parser(sub) -> None:
    p = sub.add_parser("throughput", help="offline throughput on random-token (or copy-heavy) prompts")
    p.add_argument("--dataset", choices=("random", "copy"), default="random",
                   help="copy: passages written twice, answered by a third copy (`copy_prompts`)")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--min-input-len", type=int, default=16)
    p.add_argument("--max-input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=64)
    add_engine_benchmark_flags(p, run)  # its --seed seeds both the engine and the prompts


def percentiles(values) -> dict:
    if not len(values):
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    arr = np.asarray(values, np.float64)
    return {"p50": float(np.percentile(arr, 50)), "p90": float(np.percentile(arr, 90)),
            "p99": float(np.percentile(arr, 99)), "mean": float(arr.mean())}


def model_flops(config, num_tokens: int, num_sampled: int, attended_pairs: int) -> float:
    """Matmul FLOPs: every layer for every token, the LM head for sampled rows, attention scores
    and values for every (query, key) pair."""
    h, d = config.hidden_size, config.head_dim
    attn = h * d * (config.num_heads * 2 + config.num_kv_heads * 2)
    if config.is_moe:
        mlp = 3 * h * config.moe_intermediate_size * config.num_experts_per_tok
        mlp += 3 * h * config.shared_expert_intermediate_size
    else:
        mlp = 3 * h * config.intermediate_size
    per_token = 2 * config.num_layers * (attn + mlp)
    head = 2 * h * config.vocab_size
    attention = 4 * config.num_layers * config.num_heads * d * attended_pairs
    return per_token * num_tokens + head * num_sampled + attention


def weight_bytes(model) -> int:
    from models.quantization import weight_summary

    return weight_summary(model).bytes


def weight_dtype(model):
    """The dtype most weight bytes are in (the matmul rate of the roofline is measured in it);
    block-FP8 kernels aside, which multiply in the activations' dtype (models/quantization.py)."""
    import jax
    from flax import nnx

    from models.quantization import FP8

    by_dtype: dict = {}
    for x in jax.tree.leaves(nnx.state(model, nnx.Param)):
        if x.dtype != FP8:
            by_dtype[x.dtype] = by_dtype.get(x.dtype, 0) + x.size * x.dtype.itemsize
    return max(by_dtype, key=by_dtype.get)


def kv_bytes_per_position(config, kv_caches) -> int:
    """Cache bytes that one token position holds across all layers (the family's KV spec)."""
    return kv_spec(config).bytes_per_token(kv_caches[0].dtype)


def run(args: argparse.Namespace, llm=None) -> int:
    """Runs the benchmark on `llm` (built from the engine flags in `args` when not given)."""
    result = measure(args, llm)
    return report(result, rows(result), args.json)


def measure(args: argparse.Namespace, llm=None) -> dict:
    """The benchmark's result (what `--json` writes); `args` needs num_prompts, min_input_len,
    max_input_len, output_len and seed, and the engine flags when `llm` is not given."""
    from jaxserve.benchmarks.roofline import measure_ceilings
    from jaxserve.llm import LLM
    from jaxserve.sampling_params import SamplingParams

    start = time.perf_counter()
    llm = llm or LLM(config=engine_config_from_args(args))
    startup_s = time.perf_counter() - start
    engine = llm.engine
    config = engine.model_config
    if getattr(args, "dataset", "random") == "copy":
        prompts = copy_prompts(llm.tokenizer, args.num_prompts, args.seed)
    else:
        prompts = make_prompts(args.num_prompts, args.min_input_len, args.max_input_len, config.vocab_size, args.seed)
    spec_before = _spec_counts(engine.metrics)
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    compiles_before = engine.compile_count()
    engine.stats.reset()
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    duration = time.perf_counter() - start
    compilations_during_run = engine.compile_count() - compiles_before
    stats = engine.stats
    ceilings = measure_ceilings(dtype=weight_dtype(engine.loaded.model))
    output_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    prompt_tokens = sum(len(p) for p in prompts)
    decode_tokens = output_tokens - len(prompts)  # the first token comes from the prefill step
    pairs_prefill = sum(n * (n + 1) // 2 for n in map(len, prompts))
    pairs_decode = sum(sum(len(p) + i for i in range(1, args.output_len)) for p in prompts)
    flops_prefill = model_flops(config, prompt_tokens, len(prompts), pairs_prefill)
    flops_decode = model_flops(config, decode_tokens, decode_tokens, pairs_decode)
    matmul = ceilings["matmul_gflop_s"] * 1e9
    bandwidth = ceilings["copy_bandwidth_gb_s"] * 1e9
    from models.quantization import weight_summary

    weights = weight_summary(engine.loaded.model)
    wbytes = weights.bytes
    compute_floor = (flops_prefill + flops_decode) / matmul
    decode_compute_floor = flops_decode / matmul
    # Each decode step reads every weight once and each sequence's KV so far (pairs_decode).
    decode_kv_bytes = pairs_decode * kv_bytes_per_position(config, engine.runner.kv_caches)
    decode_memory_floor = (stats.decode_steps * wbytes + decode_kv_bytes) / bandwidth
    decode_roofline_floor = max(decode_compute_floor, decode_memory_floor)
    ttft = [o.metrics.ttft * 1e3 for o in outputs if o.metrics and o.metrics.ttft is not None]
    e2el = [o.metrics.e2e * 1e3 for o in outputs if o.metrics and o.metrics.e2e is not None]
    tpot = [(o.metrics.e2e - o.metrics.ttft) * 1e3 / (len(o.outputs[0].token_ids) - 1)
            for o in outputs if o.metrics and len(o.outputs[0].token_ids) > 1]
    result = {
        "benchmark": "throughput",
        "model": llm.engine.config.model,
        "device": ceilings["device"],
        "config": {k: v for k, v in vars(args).items() if k not in ("func", "bench") and v is not None},
        "num_requests": len(prompts),
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "duration_s": duration,
        "startup_s": startup_s,
        "output_tok_s": output_tokens / duration,
        "prefill_s": stats.prefill_time,
        "decode_s": stats.decode_time,
        "num_steps": stats.steps,
        "compiled_buckets": engine.runner.num_buckets(),
        "compilations_during_run": compilations_during_run,
        "ttft_ms": percentiles(ttft),
        "tpot_ms": percentiles(tpot),
        "itl_ms": percentiles(tpot),  # offline: one token per step per request, so ITL == TPOT
        "e2el_ms": percentiles(e2el),
        "weights": {"bytes": weights.bytes, "params": weights.params, "bytes_per_param": weights.bytes_per_param,
                    "formats": weights.formats, "summary": str(weights)},
        "roofline": {
            **ceilings,
            "weight_bytes": wbytes,
            "flops_prefill": flops_prefill,
            "flops_decode": flops_decode,
            "compute_floor_s": compute_floor,
            "fraction_of_compute_floor": compute_floor / duration,
            "decode_compute_floor_s": decode_compute_floor,
            "decode_memory_floor_s": decode_memory_floor,
            "decode_kv_bytes": decode_kv_bytes,
            "decode_roofline_floor_s": decode_roofline_floor,
            "decode_fraction_of_compute_roofline": decode_compute_floor / stats.decode_time if stats.decode_time else None,
            "decode_fraction_of_roofline": decode_roofline_floor / stats.decode_time if stats.decode_time else None,
        },
    }
    if engine.config.speculative_config is not None:
        drafts, draft_tokens, accepted = (after - before for after, before in zip(_spec_counts(engine.metrics),
                                                                                  spec_before))
        result["speculative"] = {"num_drafts": drafts, "num_draft_tokens": draft_tokens, "num_accepted_tokens": accepted,
                                 "mean_accepted_length": 1 + accepted / drafts if drafts else None,
                                 "config": engine.config.speculative_config.to_dict()}
    eplb = engine.runner.eplb
    if eplb is not None:
        from jaxserve.eplb import balancedness

        per_rank = eplb.rank_token_counts(engine.runner.params)
        result["expert_parallel"] = {
            "rank_tokens": per_rank.tolist(),  # (token, expert) assignments per ep rank, all MoE layers
            "balancedness": balancedness(per_rank),
            "rebalances": eplb.history,
        }
    return result


def rows(r: dict) -> list[tuple[str, str]]:
    roof = r["roofline"]
    rows = [
        ("device", r["device"]),
        ("requests / prompt tokens / output tokens", f"{r['num_requests']} / {r['prompt_tokens']} / {r['output_tokens']}"),
        ("duration", f"{r['duration_s']:.2f} s (start-up {r['startup_s']:.1f} s)"),
        ("output throughput", f"{r['output_tok_s']:.1f} tok/s"),
        ("prefill / decode time", f"{r['prefill_s']:.2f} s / {r['decode_s']:.2f} s over {r['num_steps']} steps"),
        ("weights", r["weights"]["summary"]),
        ("compiled buckets (new compilations in run)", f"{r['compiled_buckets']} ({r['compilations_during_run']})"),
        ("TTFT p50 / p99", f"{r['ttft_ms']['p50']:.0f} / {r['ttft_ms']['p99']:.0f} ms"),
        ("TPOT p50 / p99", f"{r['tpot_ms']['p50']:.1f} / {r['tpot_ms']['p99']:.1f} ms"),
        ("measured matmul / copy bandwidth", f"{roof['matmul_gflop_s']:.0f} GFLOP/s / {roof['copy_bandwidth_gb_s']:.1f} GB/s"),
        ("compute floor (fraction reached)", f"{roof['compute_floor_s']:.2f} s ({roof['fraction_of_compute_floor']:.0%})"),
        ("decode compute floor (fraction reached)",
         f"{roof['decode_compute_floor_s']:.2f} s ({(roof['decode_fraction_of_compute_roofline'] or 0):.0%})"),
        ("decode memory floor (weights + KV read per step)", f"{roof['decode_memory_floor_s']:.2f} s"),
        ("decode roofline floor, max of both (fraction reached)",
         f"{roof['decode_roofline_floor_s']:.2f} s ({(roof['decode_fraction_of_roofline'] or 0):.0%})"),
    ]
    if "speculative" in r:
        spec = r["speculative"]
        rows.append(("speculative drafts / accepted (mean accepted length)",
                     f"{spec['num_draft_tokens']} / {spec['num_accepted_tokens']} ({spec['mean_accepted_length'] or 0:.2f})"))
    if "expert_parallel" in r:
        ep = r["expert_parallel"]
        rows.append(("tokens per ep rank", " ".join(f"{int(t)}" for t in ep["rank_tokens"])))
        rows.append(("balancedness (mean / max per rank)", f"{ep['balancedness']:.3f} over the run, "
                     f"{len(ep['rebalances'])} EPLB rebalances"))
    return rows


def _spec_counts(metrics) -> tuple[int, int, int]:
    return (metrics.spec_decode_num_drafts, metrics.spec_decode_num_draft_tokens,
            metrics.spec_decode_num_accepted_tokens)
