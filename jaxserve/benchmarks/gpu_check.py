"""`make gpu-check`: everything a GPU can tell us, in order of value, within a time budget.

    python -m jaxserve.benchmarks.gpu_check --out DIR [--budget 510] [--tiny] [--parts a,b,...]

GPU time is rare: one run of at most 10 minutes, where only DIR comes back. So the check
- runs each part (gpu_parts.py) in its own process, under a deadline: a part that raises, hangs or
  crashes the process is recorded, and the next part runs;
- writes DIR/results.json and DIR/results.md after every part (each part also saves its rows as it
  goes, so one stopped at its limit keeps what it measured); a budget that runs out still leaves a
  valid results file, with the parts it never reached marked so;
- gives each part at most its share (PLAN) and never more than what is left, the kernel sweep
  whatever remains at the end;
- leaves out of the later parts a Pallas kernel that failed or hung in the smoke test;
- keeps jax's persistent compilation cache in /tmp, so a retry on the same machine skips compiles.

This process never imports jax: each part's process owns the GPU while it runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

# (part, seconds at most), in order of value; the sweep takes what is left. Sized from the first
# H200 runs (2026-12-04): versions 6 s, smoke 25, ceilings 5, decode 56, moe 30; the engine part
# needs ~30 s per case and kernel (it was cut at 75 s after one case), the end-to-end part took
# 162 s (the 8B model's start-up 139-158 s of it), transformers 53 s. DeepSeek's MLA decode and
# block-FP8 linears (unmeasured yet: ~10 Triton compiles, then up to 60 small XLA compiles) come
# before the transformers peer, which those runs already measured and which gets what is left
# of the 510 s budget after them; the sweep (caches up to 2.4 GB) last. The attention sinks' cost
# (gpt-oss, unmeasured: ~16 small compiles) follows decode; gpt-oss-120b's MXFP4 expert matmul
# (unmeasured: 2 Triton kernels, 3 token counts) after the fp8 linears.
PLAN = [("versions", 30), ("smoke", 60), ("ceilings", 20), ("decode", 80), ("sinks", 30), ("moe", 45),
        ("engine", 80), ("e2e", 175), ("mla", 75), ("fp8_matmul", 50), ("mxfp4_moe", 40),
        ("e2e_peer", 65), ("sweep", None)]
# Below this many seconds left, a part is not started (starting jax alone takes a few).
MIN_SECONDS = 8.0
# A part's own deadline comes this much before the hard kill, so that it can save.
GRACE_SECONDS = 5.0


def _write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _run_part(name: str, seconds: float, workdir: str, context: dict, tiny: bool, env: dict) -> dict:
    """Runs one part in its own process; returns its record (status, seconds, result, log tail)."""
    out = os.path.join(workdir, f"{name}.json")
    context_path = os.path.join(workdir, "context.json")
    _write(context_path, json.dumps(context))
    command = [sys.executable, "-m", "jaxserve.benchmarks.gpu_parts", name, "--out", out, "--seconds",
               str(max(1.0, seconds - GRACE_SECONDS)), "--context", context_path] + (["--tiny"] if tiny else [])
    start = time.monotonic()
    if name == "e2e_peer":  # torch needs the card's memory: jax, if anything starts it, must not take it
        env = dict(env, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    tail: list[str] = []

    def echo():  # the part's output reaches the log live; the last lines go into the record
        for line in process.stdout:
            print(f"[{name}] {line}", end="", flush=True)
            tail.append(line.rstrip())
            del tail[:-40]

    reader = threading.Thread(target=echo, daemon=True)
    reader.start()
    try:
        returncode = process.wait(timeout=seconds)
        status = "ok" if returncode == 0 else f"failed (exit {returncode})"
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        status = f"stopped at its limit ({seconds:.0f} s)"
    reader.join(timeout=5)
    record = {"status": status, "seconds": round(time.monotonic() - start, 1), "limit_s": round(seconds, 1)}
    try:
        with open(out) as f:
            record["result"] = json.load(f)
    except (OSError, ValueError):
        record["result"] = {}
    if status != "ok":
        record["log_tail"] = tail[-25:]
    return record


def _usable_kernels(smoke: dict) -> list[str]:
    """Kernels whose smoke test finished without an error (a wrong result still runs later, flagged)."""
    return [k for k, rows in smoke.items() if isinstance(rows, dict) and rows.get("verdict") in ("ok", "wrong")]


def _context(results: dict) -> dict:
    parts = results["parts"]
    context = {}
    if "smoke" in parts:
        context["usable_kernels"] = _usable_kernels(parts["smoke"].get("result", {}))
    if parts.get("ceilings", {}).get("result", {}).get("bf16_tflop_s"):
        context["ceilings"] = parts["ceilings"]["result"]
    return context


def run(out_dir: str, budget: float, tiny: bool = False, parts: list[str] | None = None) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    deadline = time.monotonic() + budget
    plan = [(name, limit) for name, limit in PLAN if parts is None or name in parts]
    results = {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "budget_s": budget, "tiny": tiny, "plan": [name for name, _ in plan], "parts": {}}
    env = dict(os.environ)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "jaxserve-gpu-check-xla"))
    env.setdefault("PYTHONUNBUFFERED", "1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")

    def save():
        _write(os.path.join(out_dir, "results.json"), json.dumps(results, indent=1, default=str))
        try:  # the JSON is the record; a report that trips on an odd result must not end the run
            from jaxserve.benchmarks.gpu_report import markdown

            text = markdown(results)
        except Exception as err:  # noqa: BLE001
            text = f"The report failed ({type(err).__name__}: {err}); results.json holds every figure.\n"
        _write(os.path.join(out_dir, "results.md"), text)

    save()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as workdir:
        for name, limit in plan:
            left = deadline - time.monotonic()
            if left < MIN_SECONDS:
                results["parts"][name] = {"status": "not run: the budget ran out", "seconds": 0}
                save()
                continue
            seconds = left if limit is None else min(limit, left)
            print(f"== {name}: up to {seconds:.0f} s ({left:.0f} s of the budget left)", flush=True)
            results["parts"][name] = _run_part(name, seconds, workdir, _context(results), tiny, env)
            print(f"== {name}: {results['parts'][name]['status']} in {results['parts'][name]['seconds']} s", flush=True)
            save()
    results["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    save()
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for results.json and results.md")
    parser.add_argument("--budget", type=float, default=510.0, help="seconds for all parts together")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes; interpret mode without a GPU (CI)")
    parser.add_argument("--parts", default=None, help="comma-separated subset of " + ",".join(n for n, _ in PLAN))
    args = parser.parse_args(argv)
    parts = args.parts.split(",") if args.parts else None
    results = run(args.out, args.budget, args.tiny, parts)
    return 0 if all(p["status"] == "ok" for p in results["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
