"""`jaxserve bench disagg`: what disaggregated prefill/decode buys, in one run.

1. Decode ITL under long prefills, colocated against disaggregated. `--num-decode` streaming
   requests (short prompts, `--decode-output-len` tokens, EOS ignored) run while long prompts
   (`--prefill-len` random tokens, max_tokens=1, each distinct so nothing is a prefix hit) keep
   arriving: `--prefill-concurrency` of them in flight at all times until the decode streams end.
   ITL = every gap between two chunks of a decode stream, seen by the client. First one server
   (colocated: long prefills are chunked into the same steps as the decodes), then a router +
   prefill worker + decode worker (the decode worker only loads the prompts' KV). Processes are
   pinned with `os.sched_setaffinity` when the machine has >= 2 cores: the colocated server on
   cores {0, 1}; the prefill worker on core 0, the decode worker on core 1, the router unpinned.
   Each setup gets an unmeasured warm-up round first (compilation).
2. The host KV tier (`jaxserve bench host-tier`, reused as is, after the servers are gone): TTFT
   of a host-tier hit against recompute, and step time with the tier on and no hits against off.

`--worker-command` runs something else than `jaxserve serve` (the CI test's tiny-model worker):
a template with `{python}` and `{role}` that starts a server printing "... on HOST:PORT".
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time

import grpc
import numpy as np

from jaxserve.benchmarks.report import report
from jaxserve.benchmarks.throughput import percentiles

_ADDRESS = re.compile(r"(?:serving|router)\b.*? on ([\w.]+):(\d+)")
_PIN = "import os, sys; os.sched_setaffinity(0, {int(c) for c in sys.argv[1].split(',')}); " \
       "os.execv(sys.argv[2], sys.argv[2:])"
DEFAULT_WORKER = "{python} -m server.main serve --role {role} --port 0 --http-port -1 --model {model} {engine_args}"


def add_parser(sub) -> None:
    p = sub.add_parser("disagg", help="decode ITL under long prefills, colocated vs disaggregated; host tier")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--prefill-len", type=int, default=4096, help="tokens of each long prompt")
    p.add_argument("--prefill-concurrency", type=int, default=1, help="long prompts in flight at all times")
    p.add_argument("--num-decode", type=int, default=4, help="streaming decode requests measured")
    p.add_argument("--decode-prompt-len", type=int, default=32)
    p.add_argument("--decode-output-len", type=int, default=64)
    p.add_argument("--engine-args", default="--max-num-batched-tokens 512 --max-num-seqs 16",
                   help="engine flags of every server (--max-model-len is added to fit --prefill-len)")
    p.add_argument("--worker-command", default=DEFAULT_WORKER,
                   help="server command template ({python}, {role}, {model}, {engine_args})")
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    p.add_argument("--skip-host-tier", action="store_true", help="only the colocated/disaggregated part")
    p.add_argument("--timeout-s", type=float, default=600.0, help="per server start and per measured round")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    p.set_defaults(bench=run)


def _check(args: argparse.Namespace) -> None:
    for name in ("prefill_len", "prefill_concurrency", "num_decode", "decode_prompt_len", "decode_output_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(args, name)}")
    if args.decode_output_len < 2:
        raise ValueError(f"decode_output_len must be >= 2 (an ITL needs two chunks), got {args.decode_output_len}")


# ---- processes ----

class _Process:
    """A server process started from `command`, serving once it printed its address."""

    def __init__(self, command: list[str], cores: set[int] | None, timeout_s: float):
        if cores is not None:  # pinned before exec, so every thread of the server inherits it
            command = [sys.executable, "-c", _PIN, ",".join(map(str, sorted(cores))), *command]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        found = threading.Event()
        self.target = None

        def read():
            for line in self.proc.stdout:
                self.lines.append(line)
                match = _ADDRESS.search(line)
                if match and self.target is None:
                    self.target = f"{match.group(1)}:{match.group(2)}"
                    found.set()
            found.set()

        threading.Thread(target=read, daemon=True).start()
        if not found.wait(timeout_s) or self.target is None:
            self.stop()
            raise RuntimeError(f"{command} did not start within {timeout_s} s:\n{''.join(self.lines[-30:])}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _worker_command(args, role: str) -> list[str]:
    max_len = args.prefill_len + args.decode_prompt_len + args.decode_output_len + 16
    engine_args = f"--max-model-len {max_len} {args.engine_args}"
    return shlex.split(args.worker_command.format(python=sys.executable, role=role, model=args.model,
                                                  engine_args=engine_args))


def _cores(pin: bool, wanted: set[int]) -> set[int] | None:
    return wanted if pin else None


# ---- load ----

def _stream(target: str, prompt: list[int], max_tokens: int, timeout_s: float) -> list[float]:
    """Send one greedy request; the arrival time of each chunk."""
    from server import generation_pb2_grpc as pb_grpc
    from server.client import make_request

    times = []
    with grpc.insecure_channel(target) as channel:
        call = pb_grpc.GenerationStub(channel).Generate(
            make_request(prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True), timeout=timeout_s)
        for chunk in call:
            if chunk.token_ids:
                times.append(time.perf_counter())
    return times


def _round(target: str, args, rng: np.random.Generator, vocab: int) -> dict:
    """Decode streams while long prompts keep arriving; their chunk gaps and the prefill latencies."""
    decode_prompts = [rng.integers(0, vocab, args.decode_prompt_len).tolist() for _ in range(args.num_decode)]
    done = threading.Event()
    prefill_s: list[float] = []
    errors: list[str] = []

    def prefills(rng):
        while not done.is_set():
            prompt = rng.integers(0, vocab, args.prefill_len).tolist()
            start = time.perf_counter()
            try:
                _stream(target, prompt, 1, args.timeout_s)
            except grpc.RpcError as exc:
                errors.append(f"prefill: {exc.code().name} {exc.details()}")
                return
            prefill_s.append(time.perf_counter() - start)

    chunk_times: list[list[float]] = [[] for _ in decode_prompts]

    def decode(i):
        try:
            chunk_times[i] = _stream(target, decode_prompts[i], args.decode_output_len, args.timeout_s)
        except grpc.RpcError as exc:
            errors.append(f"decode: {exc.code().name} {exc.details()}")

    loaders = [threading.Thread(target=prefills, args=(np.random.default_rng(rng.integers(1 << 31)),))
               for _ in range(args.prefill_concurrency)]
    for t in loaders:
        t.start()
    time.sleep(0.2)  # the first long prompts are in before the decodes start
    start = time.perf_counter()
    decoders = [threading.Thread(target=decode, args=(i,)) for i in range(args.num_decode)]
    for t in decoders:
        t.start()
    for t in decoders:
        t.join()
    duration = time.perf_counter() - start
    done.set()
    for t in loaders:
        t.join()
    if errors:
        raise RuntimeError(f"requests failed: {errors[:3]}")
    itls = [gap for times in chunk_times for gap in np.diff(times)]
    return {"itl_ms": percentiles([g * 1e3 for g in itls]), "num_itls": len(itls),
            "decode_ttft_ms": percentiles([(times[0] - start) * 1e3 for times in chunk_times]),
            "long_prefill_latency_ms": percentiles([s * 1e3 for s in prefill_s]),
            "long_prefills_done": len(prefill_s), "duration_s": duration}


def _measure(name: str, target_of, args, vocab: int) -> dict:
    warm = _round(target_of(), _with(args, decode_output_len=4), np.random.default_rng(args.seed + 1),
                  vocab)
    result = _round(target_of(), args, np.random.default_rng(args.seed + 2), vocab)
    result["warmup_s"] = warm["duration_s"]
    print(f"{name}: decode ITL p50 {result['itl_ms']['p50']:.1f} ms, p99 {result['itl_ms']['p99']:.1f} ms "
          f"({result['long_prefills_done']} long prefills during the decodes)", flush=True)
    return result


def _with(args, **changes) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), **changes})


def _vocab_size(target: str) -> int:
    from server import generation_pb2 as pb
    from server import generation_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target) as channel:
        info = pb_grpc.GenerationStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
    return info.vocab_size


def _colocated(args, pin: bool) -> dict:
    server = _Process(_worker_command(args, "colocated"), _cores(pin, {0, 1}), args.timeout_s)
    try:
        return _measure("colocated", lambda: server.target, args, _vocab_size(server.target))
    finally:
        server.stop()


def _disaggregated(args, pin: bool) -> dict:
    started = []
    try:
        prefill = _Process(_worker_command(args, "prefill"), _cores(pin, {0}), args.timeout_s)
        started.append(prefill)
        decode = _Process(_worker_command(args, "decode"), _cores(pin, {1}), args.timeout_s)
        started.append(decode)
        router = _Process([sys.executable, "-m", "server.main", "router", "--prefill", prefill.target,
                           "--decode", decode.target, "--port", "0", "--worker-timeout-s", str(args.timeout_s)],
                          None, args.timeout_s)
        started.append(router)
        return _measure("disaggregated", lambda: router.target, args, _vocab_size(decode.target))
    finally:
        for process in reversed(started):
            process.stop()


def _host_tier(args) -> dict:
    import tempfile

    from jaxserve.benchmarks import host_tier

    parser = argparse.ArgumentParser()
    host_tier.add_parser(parser.add_subparsers())
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "host_tier.json")
        tier_args = parser.parse_args(["host-tier", "--model", args.model, "--seed", str(args.seed), "--json", path])
        host_tier.run(tier_args)
        with open(path) as f:
            return json.load(f)


def run(args: argparse.Namespace) -> int:
    _check(args)
    pin = not args.no_pin and len(os.sched_getaffinity(0)) >= 2 and {0, 1} <= os.sched_getaffinity(0)
    result = {"benchmark": "disagg", "model": args.model, "pinned": pin, "cpu_count": os.cpu_count(),
              "config": {k: v for k, v in vars(args).items() if k not in ("func", "bench") and v is not None}}
    result["colocated"] = _colocated(args, pin)
    result["disaggregated"] = _disaggregated(args, pin)
    result["itl_p50_ratio_disagg_over_colocated"] = (result["disaggregated"]["itl_ms"]["p50"]
                                                     / result["colocated"]["itl_ms"]["p50"])
    result["itl_p99_ratio_disagg_over_colocated"] = (result["disaggregated"]["itl_ms"]["p99"]
                                                     / result["colocated"]["itl_ms"]["p99"])
    if not args.skip_host_tier:
        result["host_tier"] = _host_tier(args)
    return report(result, _rows(result), args.json)


def _rows(r: dict) -> list[tuple[str, str]]:
    rows = [("processes pinned to cores", "yes: colocated {0,1}; prefill {0}, decode {1}" if r["pinned"] else "no")]
    for name in ("colocated", "disaggregated"):
        m = r[name]
        itl = f"{m['itl_ms']['p50']:.1f} / {m['itl_ms']['p99']:.1f} ms ({m['num_itls']} gaps)"
        rows += [(f"{name}: decode ITL p50 / p99", itl),
                 (f"{name}: decode TTFT p50", f"{m['decode_ttft_ms']['p50']:.0f} ms"),
                 (f"{name}: long prefills done / latency p50",
                  f"{m['long_prefills_done']} / {m['long_prefill_latency_ms']['p50'] or float('nan'):.0f} ms")]
    ratios = f"{r['itl_p50_ratio_disagg_over_colocated']:.2f}, {r['itl_p99_ratio_disagg_over_colocated']:.2f}"
    rows.append(("ITL ratio disagg / colocated p50, p99", ratios))
    if "host_tier" in r:
        h = r["host_tier"]
        rows += [("host tier: TTFT recompute / hit p50",
                  f"{h['ttft_recompute_ms']['p50']:.0f} / {h['ttft_host_hit_ms']['p50']:.0f} ms"),
                 ("host tier: step time ratio on (no hits) / off", f"{h['step_ratio_on_over_off']:.3f}")]
    return rows
