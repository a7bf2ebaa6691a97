"""`jaxserve bench host-tier`: what the host KV tier buys and costs, in one run.

Two engines share one loaded model and one small device KV pool (`--device-kv-tokens`): the tier
off and the tier on (`--cpu-kv-cache-bytes`). Both see the same prompts.

- TTFT of a host-tier hit against recompute: a target prompt is run, distinct filler prompts
  evict its blocks from the device, then it is run again: the tier-off engine recomputes it, the
  tier-on engine loads its full blocks from host memory and computes only the tail. The floor
  of a hit is its bytes over the host->device bandwidth measured in the same run.
- Step time with the tier on and no hits against off: batches of distinct prompts (nothing is
  ever hit; later batches evict earlier ones' cached blocks, so the tier saves them), the engines
  alternating run by run to share the machine's noise.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from jaxserve.benchmarks.report import report
from jaxserve.benchmarks.throughput import make_prompts, percentiles


def add_parser(sub) -> None:
    p = sub.add_parser("host-tier", help="host KV tier: TTFT of a hit vs recompute, step time on vs off")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--prompt-len", type=int, default=512, help="tokens of each TTFT target prompt")
    p.add_argument("--num-targets", type=int, default=3)
    p.add_argument("--device-kv-tokens", type=int, default=4096, help="device KV pool size, in tokens")
    p.add_argument("--cpu-kv-cache-bytes", type=int, default=1 << 30)
    p.add_argument("--batch-size", type=int, default=8, help="requests per step-time batch")
    p.add_argument("--batch-prompt-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2, help="step-time batches per engine, alternating")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    p.set_defaults(bench=run)


def measure_host_to_device_bandwidth(num_bytes: int = 64 << 20) -> float:
    """Bytes per second of `jax.device_put` of a host array (best of 5)."""
    import jax

    host = np.ones(num_bytes // 4, np.float32)
    best = float("inf")
    for _ in range(6):
        start = time.perf_counter()
        jax.device_put(host).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return num_bytes / best


def _generate(engine, prompts, max_tokens, tag):
    """Run prompts to completion; returns their RequestOutputs in order."""
    from jaxserve.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    for request_id, prompt in zip(ids, prompts):
        engine.add_request(request_id, {"prompt_token_ids": prompt}, params)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return [done[i] for i in ids]


def _ttft_round(engine, target, fillers, tag) -> dict:
    _generate(engine, [target], 1, f"{tag}-first")
    _generate(engine, fillers, 1, f"{tag}-fill")
    from jaxserve.request import Request

    hashes = engine.kv_manager.block_hashes(Request("probe", target, max_tokens=1))
    evicted = not any(engine.kv_manager.block_pool.get_cached_block(h) for h in hashes)
    loaded_before = getattr(engine.kv_connector, "num_loaded_blocks", 0)
    (out,) = _generate(engine, [target], 1, f"{tag}-again")
    return {"ttft_s": out.metrics.ttft, "evicted": evicted,
            "loaded_blocks": getattr(engine.kv_connector, "num_loaded_blocks", 0) - loaded_before}


def _step_round(engine, prompts, output_len, tag) -> dict:
    engine.stats.reset()
    engine._last_result_time = None  # else the first interval spans the other engine's run
    start = time.perf_counter()
    _generate(engine, prompts, output_len, tag)
    duration = time.perf_counter() - start
    s = engine.stats
    return {"steps": s.steps, "step_s": duration / max(s.steps, 1),
            "decode_step_s": s.decode_time / max(s.decode_steps, 1)}


def run(args: argparse.Namespace) -> int:
    import jax

    from jaxserve.config import EngineConfig
    from jaxserve.engine import EngineCore, resolve_dtype
    from jaxserve.kv.sizing import kv_bytes_per_token
    from models.loader import load_model

    loaded = load_model(args.model, dtype=resolve_dtype("auto"))
    kv_dtype = resolve_dtype("auto")
    per_token = kv_bytes_per_token(loaded.config, kv_dtype)
    max_len = max(args.prompt_len, args.batch_prompt_len + args.output_len) + 16
    common = dict(model=args.model, max_model_len=max_len, kv_cache_memory_bytes=args.device_kv_tokens * per_token,
                  max_num_seqs=args.batch_size, max_num_batched_tokens=512, seed=args.seed)
    start = time.perf_counter()
    engines = {"off": EngineCore(EngineConfig(**common), loaded=loaded),
               "on": EngineCore(EngineConfig(**common, cpu_kv_cache_bytes=args.cpu_kv_cache_bytes), loaded=loaded)}
    startup_s = time.perf_counter() - start
    vocab = loaded.config.vocab_size

    warm = make_prompts(args.batch_size, args.batch_prompt_len, args.batch_prompt_len, vocab, args.seed + 10)
    for name, engine in engines.items():  # untimed: first-use uploads and host-side caches
        _generate(engine, warm, 2, "warm")

    ttft = {"off": [], "on": []}
    num_fillers = args.device_kv_tokens // args.prompt_len + 1
    for i in range(args.num_targets):
        prompts = make_prompts(1 + num_fillers, args.prompt_len, args.prompt_len, vocab, args.seed + 100 + i)
        for name, engine in engines.items():
            ttft[name].append(_ttft_round(engine, prompts[0], prompts[1:], f"t{i}"))

    connector = engines["on"].kv_connector
    saved_before, loaded_before = connector.tier.num_saved_blocks, connector.num_loaded_blocks
    steps = {"off": [], "on": []}
    for r in range(args.rounds):
        prompts = make_prompts(args.batch_size, args.batch_prompt_len, args.batch_prompt_len, vocab,
                               args.seed + 1000 + r)
        order = ("off", "on") if r % 2 == 0 else ("on", "off")
        for name in order:
            steps[name].append(_step_round(engines[name], prompts, args.output_len, f"s{r}"))

    tier = engines["on"].kv_connector.tier
    h2d = measure_host_to_device_bandwidth()
    hit_blocks = [t["loaded_blocks"] for t in ttft["on"]]
    block_bytes = engines["on"].kv_layout.block_bytes
    result = {
        "benchmark": "host-tier",
        "model": args.model,
        "device": jax.devices()[0].device_kind,
        "config": {k: v for k, v in vars(args).items() if k not in ("func", "bench") and v is not None},
        "startup_s": startup_s,
        "device_kv_blocks": engines["on"].kv_plan.num_blocks,
        "block_bytes": block_bytes,
        "ttft_recompute_ms": percentiles([t["ttft_s"] * 1e3 for t in ttft["off"]]),
        "ttft_host_hit_ms": percentiles([t["ttft_s"] * 1e3 for t in ttft["on"]]),
        "target_evicted_from_device": all(t["evicted"] for t in ttft["on"] + ttft["off"]),
        "hit_loaded_blocks": hit_blocks,
        "recompute_loaded_blocks": [t["loaded_blocks"] for t in ttft["off"]],
        "host_to_device_gb_s": h2d / 1e9,
        "hit_load_floor_ms": float(np.median(hit_blocks)) * block_bytes / h2d * 1e3,
        "step_ms_off": [s["step_s"] * 1e3 for s in steps["off"]],
        "step_ms_on_no_hits": [s["step_s"] * 1e3 for s in steps["on"]],
        "decode_step_ms_off": [s["decode_step_s"] * 1e3 for s in steps["off"]],
        "decode_step_ms_on_no_hits": [s["decode_step_s"] * 1e3 for s in steps["on"]],
        "step_phase_saved_blocks": tier.num_saved_blocks - saved_before,
        "step_phase_loaded_blocks": connector.num_loaded_blocks - loaded_before,
    }
    result["step_ratio_on_over_off"] = float(np.mean(result["step_ms_on_no_hits"]) / np.mean(result["step_ms_off"]))
    return report(result, _rows(result), args.json)


def _rows(r: dict) -> list[tuple[str, str]]:
    rows = [
        ("device / device KV blocks", f"{r['device']} / {r['device_kv_blocks']} of {r['block_bytes']} bytes"),
        ("TTFT recompute p50 (tier off)", f"{r['ttft_recompute_ms']['p50']:.0f} ms"),
        ("TTFT host-tier hit p50", f"{r['ttft_host_hit_ms']['p50']:.0f} ms "
                                   f"(loaded {r['hit_loaded_blocks']} blocks; load floor {r['hit_load_floor_ms']:.1f} ms "
                                   f"at {r['host_to_device_gb_s']:.1f} GB/s host->device)"),
        ("targets evicted from device before repeat", str(r["target_evicted_from_device"])),
        ("step ms, tier off", ", ".join(f"{x:.1f}" for x in r["step_ms_off"])),
        ("step ms, tier on, no hits", ", ".join(f"{x:.1f}" for x in r["step_ms_on_no_hits"])),
        ("decode step ms off / on", f"{np.mean(r['decode_step_ms_off']):.1f} / {np.mean(r['decode_step_ms_on_no_hits']):.1f}"),
        ("step time ratio on / off", f"{r['step_ratio_on_over_off']:.3f}"),
        ("tier blocks saved / loaded in the step rounds",
         f"{r['step_phase_saved_blocks']} / {r['step_phase_loaded_blocks']}"),
    ]
    return rows
