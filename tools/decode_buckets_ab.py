"""Single-stream time per output token under two bucket settings, interleaved in one process.

The engine pads a step to its (tokens, rows) buckets. Until 2026-12-06 the smallest derived ones
were 16 tokens and 8 rows, so one stream decoded 16 tokens of 8 rows to produce 1; the derived
buckets now start at 1 token and 1 row. This builds two engines on one loaded model, the old
buckets (A, given explicitly) and the derived defaults (B), and alternates A, B request by
request at each prompt length, so that a busy machine slows both alike. Greedy, random prompt
tokens (`bench latency`'s recipe), median over `--repeats`.

    PYTHONPATH=. .venv/bin/python tools/decode_buckets_ab.py [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics

from jaxserve.benchmarks.roofline import measure_copy_bandwidth
from jaxserve.benchmarks.throughput import make_prompts, weight_dtype
from jaxserve.config import EngineConfig
from jaxserve.engine_flags import _int_tuple
from jaxserve.llm import LLM
from jaxserve.sampling_params import SamplingParams


def time_per_output_token(llm: LLM, prompt, params: SamplingParams) -> float:
    (out,) = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    metrics = out.metrics
    return (metrics.e2e - metrics.ttft) / max(len(out.outputs[0].token_ids) - 1, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompt-lens", default="16,128,512")
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline-token-buckets", type=_int_tuple, default=(16, 32, 64, 128, 256, 512))
    parser.add_argument("--baseline-request-buckets", type=_int_tuple, default=(8, 32, 64))
    parser.add_argument("--json")
    args = parser.parse_args()
    common = dict(model=args.model, max_model_len=1024, compile_at_startup=False, kv_cache_memory_bytes=256 << 20)
    a = LLM(config=EngineConfig(**common, token_buckets=args.baseline_token_buckets,
                                request_buckets=args.baseline_request_buckets))
    b = LLM(config=EngineConfig(**common), loaded=a.engine.loaded)
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    rows = []
    for length in map(int, args.prompt_lens.split(",")):
        prompts = make_prompts(args.repeats + 1, length, length, a.engine.model_config.vocab_size, length)
        times = {"A": [], "B": []}
        for i, prompt in enumerate(prompts):
            for name, llm in (("A", a), ("B", b)):
                seconds = time_per_output_token(llm, prompt, params)
                if i:  # the first compiles this length's buckets
                    times[name].append(seconds)
        median = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        rows.append({"prompt_len": length, "baseline_buckets_ms": median["A"], "default_buckets_ms": median["B"],
                     "speedup": median["A"] / median["B"]})
        print(f"prompt {length}: time per output token {median['A']:.1f} ms (baseline buckets) -> "
              f"{median['B']:.1f} ms (derived defaults), {median['A'] / median['B']:.2f}x", flush=True)
    bandwidth = measure_copy_bandwidth() / 1e9
    print(f"copy bandwidth after the run {bandwidth:.1f} GB/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "dtype": str(weight_dtype(a.engine.loaded.model)),
                       "baseline_buckets": [a.engine.runner.token_buckets, a.engine.runner.request_buckets],
                       "default_buckets": [b.engine.runner.token_buckets, b.engine.runner.request_buckets],
                       "copy_bandwidth_gb_s": bandwidth, "output_len": args.output_len, "repeats": args.repeats,
                       "lengths": rows}, f, indent=1)


if __name__ == "__main__":
    main()
