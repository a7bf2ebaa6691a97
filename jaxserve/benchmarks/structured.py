"""`jaxserve bench structured`: what JSON-schema constraints cost, against the same requests
unconstrained, measured in one run on one machine.

The design keeps both runs the same workload: the same prompts, the same sampling (temperature 1,
a seed per request), the same `max_tokens`, and both run every request to `max_tokens`. The
unconstrained requests ignore EOS; the constrained ones follow a schema that cannot complete
within `max_tokens` (a list of at least `min_records` person records: objects with a bounded
name, an age, a city enum and a boolean), so every step carries all of them and the grammar
masks real structure. The difference is then what structured outputs cost per step: filling the
masks on the host, applying them on device, and the overlap a step loses waiting for the one
before it (jaxserve/engine.py). The unconstrained run is this benchmark's ceiling; the report
gives the ratio, and the mask-fill time per step that the host spent.
"""

from __future__ import annotations

import argparse
import time

from jaxserve.benchmarks.report import report
from jaxserve.benchmarks.throughput import percentiles
from jaxserve.engine_flags import add_engine_benchmark_flags, engine_config_from_args

CITIES = ["Paris", "London", "Rome", "Berlin", "Madrid", "Lisbon", "Vienna", "Prague"]


def records_schema(min_records: int) -> dict:
    person = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city", "member"],
              "properties": {"name": {"type": "string", "minLength": 2, "maxLength": 16},
                             "age": {"type": "integer", "minimum": 0, "maximum": 120},
                             "city": {"enum": CITIES}, "member": {"type": "boolean"}}}
    return {"type": "array", "items": person, "minItems": min_records}


def add_parser(sub) -> None:
    p = sub.add_parser("structured", help="JSON-schema-constrained requests against the same ones unconstrained")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--min-records", type=int, default=100, help="records the schema asks for (never reached)")
    p.add_argument("--rounds", type=int, default=2, help="alternate the two runs this often; report the best")
    add_engine_benchmark_flags(p, run)


def run(args: argparse.Namespace, llm=None) -> int:
    result = measure(args, llm)
    return report(result, rows(result), args.json)


def measure(args: argparse.Namespace, llm=None) -> dict:
    """The benchmark's result (what `--json` writes); `args` needs num_requests, output_len,
    min_records, rounds and seed, and the engine flags when `llm` is not given."""
    from jaxserve.benchmarks.roofline import measure_ceilings
    from jaxserve.llm import LLM
    from jaxserve.sampling_params import SamplingParams, StructuredOutputsParams

    start = time.perf_counter()
    llm = llm or LLM(config=engine_config_from_args(args))
    startup_s = time.perf_counter() - start
    engine = llm.engine
    prompts = [f"Person records #{i} as a JSON list of objects with name, age, city and member:"
               for i in range(args.num_requests)]
    constraint = StructuredOutputsParams(json=records_schema(args.min_records))

    def params(i: int, constrained: bool) -> SamplingParams:
        if constrained:
            return SamplingParams(temperature=1.0, seed=args.seed + i, max_tokens=args.output_len,
                                  structured_outputs=constraint)
        return SamplingParams(temperature=1.0, seed=args.seed + i, max_tokens=args.output_len, ignore_eos=True)

    # Warm-up: the grammar and llguidance's tokenizer are built once, outside the measured runs.
    llm.generate(prompts[:2], [params(0, True), params(1, False)], use_tqdm=False)
    compiles_before = engine.compile_count()
    runs = {"unconstrained": [], "constrained": []}
    for _ in range(args.rounds):
        for name in runs:
            runs[name].append(_timed_run(llm, prompts, [params(i, name == "constrained") for i in range(len(prompts))]))
    best = {name: max(results, key=lambda r: r["output_tok_s"]) for name, results in runs.items()}
    free, held = best["unconstrained"], best["constrained"]
    compilations_during_run = engine.compile_count() - compiles_before
    ceilings = measure_ceilings()
    return {
        "benchmark": "structured",
        "model": engine.config.model,
        "device": ceilings["device"],
        "config": {k: v for k, v in vars(args).items() if k not in ("func", "bench") and v is not None},
        "num_requests": len(prompts),
        "output_tokens": held["output_tokens"],
        "duration_s": held["duration_s"],
        "startup_s": startup_s,
        "output_tok_s": held["output_tok_s"],
        "ttft_ms": held["ttft_ms"], "tpot_ms": held["tpot_ms"], "itl_ms": held["tpot_ms"], "e2el_ms": held["e2el_ms"],
        "unconstrained": free,
        "constrained": held,
        "throughput_ratio": held["output_tok_s"] / free["output_tok_s"],
        "decode_step_ratio": held["decode_step_ms"] / free["decode_step_ms"],
        "compilations_during_run": compilations_during_run,
        # The ceiling that matters here is the same workload without constraints, measured above.
        "roofline": {**ceilings, "ceiling": "the unconstrained run", "ceiling_output_tok_s": free["output_tok_s"],
                     "fraction_of_ceiling": held["output_tok_s"] / free["output_tok_s"]},
    }


def _timed_run(llm, prompts, params) -> dict:
    engine = llm.engine
    structured = engine.structured
    engine.stats.reset()
    fill_s, filled_steps, filled_rows, waits = (structured.fill_seconds, structured.num_filled_steps,
                                                structured.num_filled_rows, structured.num_waits)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    duration = time.perf_counter() - start
    output_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    stats = engine.stats
    steps = structured.num_filled_steps - filled_steps
    metrics = [o.metrics for o in outputs if o.metrics is not None]
    return {
        "output_tokens": output_tokens,
        "finish_reasons": sorted({o.outputs[0].finish_reason for o in outputs}),
        "duration_s": duration,
        "output_tok_s": output_tokens / duration,
        "num_steps": stats.steps,
        "decode_steps": stats.decode_steps,
        "decode_step_ms": 1e3 * stats.decode_time / max(stats.decode_steps, 1),
        "mask_fill_ms_per_step": 1e3 * (structured.fill_seconds - fill_s) / steps if steps else 0.0,
        "masked_steps": steps,
        "masked_rows": structured.num_filled_rows - filled_rows,
        "steps_that_waited": structured.num_waits - waits,
        "ttft_ms": percentiles([m.ttft * 1e3 for m in metrics if m.ttft is not None]),
        "tpot_ms": percentiles([(m.e2e - m.ttft) * 1e3 / (len(o.outputs[0].token_ids) - 1)
                                for o, m in zip(outputs, metrics)
                                if m.ttft is not None and len(o.outputs[0].token_ids) > 1]),
        "e2el_ms": percentiles([m.e2e * 1e3 for m in metrics if m.e2e is not None]),
    }


def rows(r: dict) -> list[tuple[str, str]]:
    free, held = r["unconstrained"], r["constrained"]

    def both(key: str, unit: str, digits: int = 1) -> str:
        return f"{held[key]:.{digits}f} / {free[key]:.{digits}f} {unit}"

    return [
        ("device", r["device"]),
        ("requests / output tokens (constrained / not)",
         f"{r['num_requests']} / {held['output_tokens']} / {free['output_tokens']}"),
        ("output throughput (constrained / not)", both("output_tok_s", "tok/s")),
        ("throughput ratio", f"{r['throughput_ratio']:.3f}"),
        ("decode step (constrained / not)", both("decode_step_ms", "ms", 2)),
        ("decode step ratio", f"{r['decode_step_ratio']:.3f}"),
        ("mask fill per masked step (rows per step)",
         f"{held['mask_fill_ms_per_step']:.2f} ms ({held['masked_rows'] / max(held['masked_steps'], 1):.1f})"),
        ("steps that waited for the step in flight", f"{held['steps_that_waited']} of {held['num_steps']}"),
        ("TPOT p50 (constrained / not)", f"{held['tpot_ms']['p50']:.1f} / {free['tpot_ms']['p50']:.1f} ms"),
        ("finish reasons (constrained / not)", f"{held['finish_reasons']} / {free['finish_reasons']}"),
        ("new compilations in the runs", str(r["compilations_during_run"])),
    ]
