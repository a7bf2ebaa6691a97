"""`jaxserve bench serve`: load a server the way `vllm bench serve` does.

`--backend` picks where the requests go (server/bench_backends.py): `grpc` (a running `jaxserve
serve`, `--target`), `openai` (its OpenAI-compatible HTTP API, `--base-url`: streamed
`/v1/completions`) or `python` (an `AsyncLLM` in this process, built from the engine flags). The
workload, the clock and the report are the same for all three, so their numbers compare.

Requests arrive as a Poisson process at `--request-rate` (inf: all at once), optionally capped at
`--max-concurrency` in flight. Prompts are random token ids, or `shared-prefix` ones (a common
prefix per group, then a random suffix). Definitions (DESIGN.md): TTFT = send -> first chunk;
TPOT = (E2EL - TTFT) / (output tokens - 1); ITL = every gap between chunks; goodput = requests
meeting every `--goodput` SLO / duration. `--request-rate` takes a comma-separated sweep; with
`--plot PATH` the sweep's latency against throughput is drawn to a PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import time

import numpy as np

from jaxserve.benchmarks.report import print_rows
from jaxserve.benchmarks.throughput import percentiles
from jaxserve.engine_flags import add_engine_benchmark_flags, engine_config_from_args
from server.bench_backends import GrpcBackend, OpenAIBackend, PythonBackend


@dataclasses.dataclass
class RequestResult:
    ok: bool
    send: float
    chunk_times: list[float]
    output_tokens: int
    error: str = ""

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.send

    @property
    def e2el(self) -> float:
        return self.chunk_times[-1] - self.send

    @property
    def tpot(self) -> float | None:
        return (self.e2el - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None

    @property
    def itls(self) -> list[float]:
        return list(np.diff(self.chunk_times))


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="online serving: a running `jaxserve serve` (gRPC or HTTP), or AsyncLLM")
    p.add_argument("--backend", choices=("grpc", "openai", "python"), default="grpc",
                   help="grpc: --target; openai: the HTTP API at --base-url; python: AsyncLLM in this process "
                        "(built from the engine options below)")
    p.add_argument("--target", default="127.0.0.1:50051", help="grpc: the server's address")
    p.add_argument("--base-url", default=None,
                   help="openai: the server's URL, with or without /v1 (default http://127.0.0.1:HTTP_PORT)")
    p.add_argument("--http-port", type=int, default=8000, help="openai: the port, when --base-url is not given")
    p.add_argument("--tokenizer", default=None,
                   help="openai: the jaxserve model whose vocabulary the random prompts are drawn from "
                        "(default: --model, else the first model the server lists)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--dataset", choices=("random", "shared-prefix"), default="random")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens (random suffix for shared-prefix)")
    p.add_argument("--prefix-len", type=int, default=256, help="shared-prefix: tokens of each common prefix")
    p.add_argument("--num-prefixes", type=int, default=4, help="shared-prefix: number of prompt groups")
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--request-rate", default="inf", help="requests/s (Poisson), or a comma-separated sweep")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--goodput", nargs="*", default=[], metavar="METRIC:MS",
                   help="SLOs for goodput, e.g. ttft:2000 tpot:200 e2el:10000")
    p.add_argument("--plot", default=None, help="PNG of latency against throughput over the sweep")
    # The engine's options: `--backend python` builds its engine from them; `--model` also names
    # the model in OpenAI requests; `--seed` seeds the prompts and arrivals (and that engine).
    add_engine_benchmark_flags(p, run, json_help="write the results here (a list for a sweep)")


def make_backend(args):
    """The backend `--backend` names, built from the command's flags (not entered yet)."""
    if args.backend == "grpc":
        return GrpcBackend(args.target, api_key=args.api_key)
    if args.backend == "openai":
        return OpenAIBackend(args.base_url or f"http://127.0.0.1:{args.http_port}", api_key=args.api_key,
                             model=args.model, tokenizer=args.tokenizer)
    return PythonBackend(engine_config_from_args(args))


def make_prompts(args, vocab_size: int) -> list[list[int]]:
    rng = np.random.default_rng(args.seed)
    if args.dataset == "random":
        return [rng.integers(0, vocab_size, args.input_len).tolist() for _ in range(args.num_prompts)]
    prefixes = [rng.integers(0, vocab_size, args.prefix_len).tolist() for _ in range(args.num_prefixes)]
    return [prefixes[i % args.num_prefixes] + rng.integers(0, vocab_size, args.input_len).tolist()
            for i in range(args.num_prompts)]


def parse_slos(items: list[str]) -> dict[str, float]:
    slos = {}
    for item in items:
        name, _, value = item.partition(":")
        if name not in ("ttft", "tpot", "e2el") or not value:
            raise ValueError(f"--goodput entries must be ttft:MS, tpot:MS or e2el:MS, got {item!r}")
        slos[name] = float(value) / 1e3
    return slos


async def one_request(backend, prompt: list[int], output_len: int) -> RequestResult:
    """Send one request through `backend`, timing every message of output as it arrives."""
    chunk_times: list[float] = []
    send = time.perf_counter()
    try:
        tokens = await backend.request(prompt, output_len, lambda: chunk_times.append(time.perf_counter()))
    except Exception as exc:  # noqa: BLE001 - counted as a failed request
        return RequestResult(False, send, chunk_times, 0, str(exc) or type(exc).__name__)
    return RequestResult(bool(chunk_times), send, chunk_times, tokens)


async def run_load(backend, prompts, output_len: int, rate: float, max_concurrency: int | None, seed: int):
    """Send every prompt (Poisson arrivals at `rate`, at most `max_concurrency` in flight); the
    results in prompt order and the duration."""
    rng = np.random.default_rng(seed)
    limit = asyncio.Semaphore(max_concurrency or len(prompts))

    async def limited(prompt):
        async with limit:
            return await one_request(backend, prompt, output_len)

    tasks = []
    start = time.perf_counter()
    for prompt in prompts:
        tasks.append(asyncio.create_task(limited(prompt)))
        if math.isfinite(rate):
            await asyncio.sleep(rng.exponential(1.0 / rate))
    results = await asyncio.gather(*tasks)
    return results, time.perf_counter() - start


def summarize(results: list[RequestResult], duration: float, slos: dict[str, float]) -> dict:
    done = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    chunks = sum(len(r.chunk_times) for r in done)
    good = [r for r in done if all(
        (getattr(r, name) or 0.0) <= limit for name, limit in slos.items())]
    ms = lambda values: percentiles([v * 1e3 for v in values if v is not None])  # noqa: E731
    return {
        "num_requests": len(results),
        "completed": len(done),
        "failed": len(results) - len(done),
        "output_tokens": output_tokens,
        "duration_s": duration,
        "request_throughput": len(done) / duration,
        "output_tok_s": output_tokens / duration,
        "messages_per_s": chunks / duration,
        "goodput": len(good) / duration if slos else None,
        "ttft_ms": ms([r.ttft for r in done]),
        "tpot_ms": ms([r.tpot for r in done]),
        "itl_ms": ms([gap for r in done for gap in r.itls]),
        "e2el_ms": ms([r.e2el for r in done]),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
    }


def run(args: argparse.Namespace, backend=None) -> int:
    """The command; `backend` (tests, notebooks) replaces the one the flags name."""
    return asyncio.run(_run(args, backend or make_backend(args)))


async def _run(args: argparse.Namespace, backend) -> int:
    slos = parse_slos(args.goodput)
    rates = [float(rate) for rate in str(args.request_rate).split(",")]
    sweep = []
    async with backend:
        served = await backend.served_model()
        prompts = make_prompts(args, served.vocab_size)
        for rate in rates:
            results, duration = await run_load(backend, prompts, args.output_len, rate, args.max_concurrency, args.seed)
            summary = summarize(results, duration, slos)
            sweep.append({
                "benchmark": "serve", "backend": args.backend, "model": served.model, "device": served.device,
                "config": {**{k: v for k, v in vars(args).items() if k not in ("func", "bench")},
                           "request_rate": rate, "stream_interval": served.stream_interval,
                           "max_num_seqs": served.max_num_seqs},
                **summary,
                # A client-side benchmark: the device ceilings come from `jaxserve bench throughput`.
                "roofline": None,
            })
            _print_table(sweep[-1])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(sweep if len(sweep) > 1 else sweep[0], f, indent=2)
    if args.plot:
        plot(sweep, args.plot)
    return 0 if all(r["failed"] == 0 for r in sweep) else 1


def plot(sweep: list[dict], path: str) -> None:
    try:
        import matplotlib
    except ImportError as exc:
        raise SystemExit("--plot needs matplotlib: pip install 'jaxserve[bench]'") from exc

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    throughput = [r["output_tok_s"] for r in sweep]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, metric in zip(axes, ("ttft_ms", "tpot_ms")):
        for q in ("p50", "p99"):
            axis.plot(throughput, [r[metric][q] for r in sweep], marker="o", label=q)
        for r, x in zip(sweep, throughput):
            axis.annotate(f"{r['config']['request_rate']:g}/s", (x, r[metric]["p50"]), fontsize=7)
        axis.set_xlabel("output tokens/s")
        axis.set_ylabel(metric.replace("_ms", " (ms)").upper())
        axis.legend()
    fig.suptitle(f"jaxserve bench serve ({sweep[0]['backend']}): {sweep[0]['model']} on {sweep[0]['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _print_table(r: dict) -> None:
    c = r["config"]
    fmt = lambda m: f"{r[m]['p50']:.1f} / {r[m]['p90']:.1f} / {r[m]['p99']:.1f} ms" if r[m]["p50"] is not None else "-"  # noqa: E731
    rows = [
        ("backend / model / device", f"{r['backend']} / {r['model']} / {r['device']}"),
        ("rate / max concurrency / stream interval",
         f"{c['request_rate']:g} / {c['max_concurrency'] or '-'} / {c['stream_interval'] or '-'}"),
        ("requests (failed)", f"{r['completed']} ({r['failed']})"),
        ("duration", f"{r['duration_s']:.2f} s"),
        ("request / output token throughput", f"{r['request_throughput']:.2f} req/s / {r['output_tok_s']:.1f} tok/s"),
        ("messages/s", f"{r['messages_per_s']:.1f}"),
        ("goodput", "-" if r["goodput"] is None else f"{r['goodput']:.2f} req/s"),
        ("TTFT p50 / p90 / p99", fmt("ttft_ms")),
        ("TPOT p50 / p90 / p99", fmt("tpot_ms")),
        ("ITL p50 / p90 / p99", fmt("itl_ms")),
        ("E2EL p50 / p90 / p99", fmt("e2el_ms")),
    ]
    if r["errors"]:
        rows.append(("errors (first 5 kinds)", "; ".join(r["errors"])))
    print_rows(rows)
    print()
