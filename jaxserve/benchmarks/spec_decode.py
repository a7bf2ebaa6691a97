"""`jaxserve bench speculative`: output tok/s and mean accepted length with and without
speculative decoding, in one run, on a copy-heavy and a random-token workload.

The copy-heavy workload (`throughput.copy_prompts`): each prompt is a passage of English sentences written
twice; a model continues by writing it a third time, so its answer repeats long spans of its
prompt (what prompt lookup is for: editing, summarizing with quotes, code rewrites). The random
workload is `jaxserve bench throughput`'s (random token ids). Both engines (plain, and with the
`--speculative-config` given) are built once, warmed on each shape, then timed back to back on
the same prompts, greedy with EOS ignored; `--repeats` alternates them to spread the machine's
drift over both.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np

from jaxserve.benchmarks.report import report
from jaxserve.engine_flags import add_engine_benchmark_flags, engine_config_from_args

def add_parser(sub) -> None:
    p = sub.add_parser("speculative", help="with and without speculative decoding, same run")
    p.add_argument("--batch-sizes", default="1,8", help="requests at once (comma-separated)")
    p.add_argument("--workloads", default="copy,random", help="copy and/or random")
    p.add_argument("--batches", type=int, default=2, help="batches of each size timed per engine and repeat")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--min-input-len", type=int, default=16, help="random workload: prompt lengths")
    p.add_argument("--max-input-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2, help="alternations of the two engines")
    add_engine_benchmark_flags(p, run)  # --speculative-config: the speculating engine's


def run(args: argparse.Namespace, llms: dict | None = None) -> int:
    result = measure(args, llms)
    rows = [("device", result["device"]), ("speculative_config", str(result["speculative_config"]))]
    for r in result["rows"]:
        rows.append((f"{r['workload']:<6} batch {r['batch']:<2}",
                     f"plain {r['plain_tok_s']:7.1f} tok/s | speculative {r['spec_tok_s']:7.1f} tok/s "
                     f"({r['speedup']:.2f}x), mean accepted length {r['mean_accepted_length'] or 0:.2f}, "
                     f"acceptance per position {', '.join(f'{a:.2f}' for a in r['acceptance_per_pos'])}"))
    return report(result, rows, args.json)


def measure(args: argparse.Namespace, llms: dict | None = None) -> dict:
    """The result `--json` writes; `llms`: {"plain": LLM, "spec": LLM} already built (tests), else
    both are built from the engine flags."""
    import jax

    from jaxserve.benchmarks.throughput import copy_prompts, make_prompts
    from jaxserve.llm import LLM

    config = llms["spec"].engine.config if llms else engine_config_from_args(args)
    if config.speculative_config is None:
        raise SystemExit("jaxserve bench speculative: --speculative-config is required")
    engines = llms or {"plain": LLM(config=dataclasses.replace(config, speculative_config=None)),
                       "spec": LLM(config=config)}
    tokenizer = engines["plain"].tokenizer
    vocab = engines["plain"].engine.model_config.vocab_size
    rows = []
    for workload in args.workloads.split(","):
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            total = batch * args.batches
            prompts = (copy_prompts(tokenizer, total, args.seed) if workload == "copy"
                       else make_prompts(total, args.min_input_len, args.max_input_len, vocab, args.seed))
            batches = [prompts[i: i + batch] for i in range(0, total, batch)]
            for llm in engines.values():  # warm-up: every shape this workload reaches compiles here
                _generate(llm, batches[0], args.output_len)
            timing = {name: [0.0, 0] for name in engines}
            before = _spec_counts(engines["spec"])
            for _ in range(args.repeats):
                for name, llm in engines.items():
                    for group in batches:
                        seconds, tokens = _generate(llm, group, args.output_len)
                        timing[name][0] += seconds
                        timing[name][1] += tokens
            counts = _spec_counts(engines["spec"]) - before
            plain, spec = (timing[n][1] / timing[n][0] for n in ("plain", "spec"))
            rows.append({
                "workload": workload, "batch": batch, "num_requests": total * args.repeats,
                "output_tokens": timing["spec"][1], "plain_tok_s": plain, "spec_tok_s": spec, "speedup": spec / plain,
                "plain_duration_s": timing["plain"][0], "spec_duration_s": timing["spec"][0],
                "num_drafts": int(counts[0]), "num_draft_tokens": int(counts[1]),
                "num_accepted_tokens": int(counts[2]),
                "mean_accepted_length": float(1 + counts[2] / counts[0]) if counts[0] else None,
                "acceptance_per_pos": [float(a / counts[0]) if counts[0] else 0.0 for a in counts[3:]],
            })
            print(rows[-1], flush=True)
    return {"benchmark": "speculative", "model": config.model, "device": jax.devices()[0].device_kind,
            "speculative_config": config.speculative_config.to_dict(),
            "config": {k: v for k, v in vars(args).items() if k not in ("func", "bench") and v is not None},
            "rows": rows}


def _generate(llm, prompts, output_len: int) -> tuple[float, int]:
    from jaxserve.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in outputs)


def _spec_counts(llm) -> np.ndarray:
    """The engine's drafts, draft tokens, accepted tokens, then accepted tokens per position."""
    m = llm.engine.metrics
    k = llm.engine.config.speculative_config.num_speculative_tokens
    per_pos = (m.spec_decode_num_accepted_tokens_per_pos + [0] * k)[:k]
    return np.array([m.spec_decode_num_drafts, m.spec_decode_num_draft_tokens, m.spec_decode_num_accepted_tokens,
                     *per_pos], np.float64)
