"""`jaxserve bench latency`: one sequence at a time, time to first token and time per output token
at several prompt lengths, beside their floors measured in the same run.

Floors. A decode step must read every weight and the sequence's K/V so far once:
`(weight bytes + position x KV bytes per position) / copy bandwidth` per output token, averaged
over the output. The first token needs the prompt's matmuls at the measured matmul rate, and at
least one read of the weights: `max(prefill FLOPs / matmul rate, weight bytes / bandwidth)`. Each
prompt length runs once to compile (not timed), then `--repeats` times; the median is reported.
Prompts are random tokens (`bench throughput`'s recipe), outputs greedy with `ignore_eos`.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from jaxserve.benchmarks.report import report
from jaxserve.benchmarks.throughput import kv_bytes_per_position, make_prompts, model_flops, weight_dtype
from jaxserve.engine_flags import add_engine_benchmark_flags, engine_config_from_args


def add_parser(sub) -> None:
    p = sub.add_parser("latency", help="single-stream TTFT and time per output token beside their floors")
    p.add_argument("--prompt-lens", default="16,128,512", help="comma-separated prompt lengths")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    add_engine_benchmark_flags(p, run)


def run(args: argparse.Namespace, llm=None) -> int:
    result = measure(args, llm)
    return report(result, rows(result), args.json)


def measure(args: argparse.Namespace, llm=None) -> dict:
    from jaxserve.benchmarks.roofline import measure_ceilings
    from jaxserve.llm import LLM
    from jaxserve.sampling_params import SamplingParams
    from models.quantization import weight_summary

    llm = llm or LLM(config=engine_config_from_args(args))
    engine = llm.engine
    config = engine.model_config
    lens = [int(n) for n in str(args.prompt_lens).split(",")]
    too_long = [n for n in lens if n + args.output_len > engine.max_model_len]
    if too_long:
        raise ValueError(f"prompt_lens {too_long} plus output_len {args.output_len} exceed max_model_len "
                         f"{engine.max_model_len}")
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    ceilings = measure_ceilings(dtype=weight_dtype(engine.loaded.model))
    bandwidth, matmul = ceilings["copy_bandwidth_gb_s"] * 1e9, ceilings["matmul_gflop_s"] * 1e9
    weights = weight_summary(engine.loaded.model).bytes
    kv_per_position = kv_bytes_per_position(config, engine.runner.kv_caches)
    rows = []
    for length in lens:
        prompts = make_prompts(args.repeats + 1, length, length, config.vocab_size, args.seed + length)
        ttfts, tpots = [], []
        for i, prompt in enumerate(prompts):
            (out,) = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
            if i == 0:
                continue  # compiles this length's buckets
            metrics, count = out.metrics, len(out.outputs[0].token_ids)
            ttfts.append(metrics.ttft)
            tpots.append((metrics.e2e - metrics.ttft) / max(count - 1, 1))
        positions = np.arange(length + 1, length + args.output_len)
        decode_floor = float(np.mean((weights + positions * kv_per_position) / bandwidth))
        prefill_flops = model_flops(config, length, 1, length * (length + 1) // 2)
        first_floor = max(prefill_flops / matmul, weights / bandwidth)
        ttft, tpot = float(np.median(ttfts)), float(np.median(tpots))
        rows.append({"prompt_len": length, "ttft_ms": ttft * 1e3, "tpot_ms": tpot * 1e3,
                     "ttft_floor_ms": first_floor * 1e3, "tpot_floor_ms": decode_floor * 1e3,
                     "tpot_fraction_of_floor": decode_floor / tpot, "ttft_fraction_of_floor": first_floor / ttft,
                     "output_tok_s": 1.0 / tpot})
    return {"benchmark": "latency", "model": engine.config.model, "device": ceilings["device"],
            "dtype": str(weight_dtype(engine.loaded.model)),
            "config": {k: v for k, v in vars(args).items() if k not in ("func", "bench") and v is not None},
            "weight_bytes": weights, "kv_bytes_per_position": kv_per_position, "roofline": ceilings,
            "output_len": args.output_len, "repeats": args.repeats, "lengths": rows}


def rows(result: dict) -> list[tuple[str, str]]:
    out = [("device", result["device"]), ("weights", f"{result['weight_bytes'] / 2**20:.0f} MiB ({result['dtype']})"),
           ("copy bandwidth / matmul rate", f"{result['roofline']['copy_bandwidth_gb_s']:.1f} GB/s / "
                                            f"{result['roofline']['matmul_gflop_s']:.0f} GFLOP/s")]
    for r in result["lengths"]:
        out.append((f"prompt {r['prompt_len']}: TTFT (floor)", f"{r['ttft_ms']:.1f} ms ({r['ttft_floor_ms']:.1f} ms, "
                                                               f"{r['ttft_fraction_of_floor']:.0%} of it)"))
        out.append((f"prompt {r['prompt_len']}: time per output token (floor)",
                    f"{r['tpot_ms']:.1f} ms ({r['tpot_floor_ms']:.1f} ms, {r['tpot_fraction_of_floor']:.0%} of it)"))
    return out
