"""The fixed cost of a decode step: one row of one token, engine against the jitted model alone.

Part 1, the engine as it serves one stream (async scheduling: step N + 1 is dispatched before
step N's token reaches the host). Each piece of `EngineCore.step` is wrapped in a timer (a
monkeypatch of this process only): scheduling, the runner's state update, the sampling tensors,
the diff uploads, the step's input arrays and their upload, the dispatch of the model program and
of the sampler program, the wait for the async copy back, and the host's output processing.

Part 2, the same step's programs synchronously, on the inputs the engine built: the model program
(in its bucket, and at exactly 1 token x 1 row), the sampler program, one small upload, one empty
jitted call, and the copy of the sampled token back. The gap between part 1's step and part 2's
model is the per-step overhead.

    PYTHONPATH=. .venv/bin/python tools/step_overhead.py [--steps 64] [--json out.json]
        [--token-buckets 16,...] [--request-buckets 8,...] [--dtype auto]
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxserve.model_runner as model_runner
from jaxserve.benchmarks.throughput import weight_dtype
from jaxserve.config import EngineConfig
from jaxserve.engine_flags import _int_tuple
from jaxserve.input_batch import RowPlan, shard_major_index, step_inputs
from jaxserve.llm import LLM
from jaxserve.sampler import make_step_key, needs_only_argmax, place_rows
from jaxserve.sampling_params import SamplingParams

# (label, owner, attribute); owner "engine" / "runner" / "scheduler" / a module / a class.
PIECES = [
    ("scheduler.schedule", "scheduler", "schedule"),
    ("runner.update_states", "runner", "update_states"),
    ("sampling_tensors (host)", "runner", "sampling_tensors"),
    ("flush diff uploads", "runner", "_flush_updates"),
    ("shard_major_index", model_runner, "shard_major_index"),
    ("step_inputs (host)", model_runner, "step_inputs"),
    ("step inputs upload", "runner", "_device_inputs"),
    ("place_rows (sampling)", model_runner, "place_rows"),
    ("dispatch: model program", "runner", "_step_fn"),
    ("dispatch: sampler program", "runner", "_sample_fn"),
    ("StepResult.get (wait + copy back)", model_runner.StepResult, "get"),
    ("engine._process (incl. get)", "engine", "_process"),
]


def instrument(engine, totals: dict[str, list[float]]):
    """Wrap every piece of `PIECES` in a timer that appends to `totals[label]`; -> a function
    that puts the originals back."""
    originals = []
    owners = {"engine": engine, "runner": engine.runner, "scheduler": engine.scheduler}
    for label, owner, name in PIECES:
        owner = owners.get(owner, owner) if isinstance(owner, str) else owner
        original = getattr(owner, name)
        originals.append((owner, name, original))

        def timed(*args, _original=original, _label=label, **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                totals[_label].append(time.perf_counter() - start)

        if isinstance(owner, type):  # a method: keep it one, so `self` is passed
            timed = functools.wraps(original)(timed)
        setattr(owner, name, timed)
    return lambda: [setattr(owner, name, original) for owner, name, original in originals]


def engine_steps(llm: LLM, num_steps: int, prompt_len: int) -> tuple[list[float], dict[str, list[float]]]:
    """Time `num_steps` steady decode steps of one stream, piece by piece; -> (step times, pieces)."""
    engine = llm.engine
    params = SamplingParams(max_tokens=num_steps + 16, temperature=0.0, ignore_eos=True)
    llm.generate([{"prompt_token_ids": list(range(1, prompt_len + 1))}], params, use_tqdm=False)  # compiles
    engine.add_request("timed", {"prompt_token_ids": list(range(2, prompt_len + 2))}, params)
    for _ in range(4):  # prefill and the first decode steps, untimed
        engine.step()
    totals: dict[str, list[float]] = collections.defaultdict(list)
    restore = instrument(engine, totals)
    steps = []
    for _ in range(num_steps):
        start = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - start)
    restore()
    while engine.has_unfinished_requests():
        engine.step()
    return steps, totals


def best(fn, repeats: int = 20) -> float:
    """Median of `repeats` timed calls of `fn` (which must block), after two untimed calls."""
    fn(), fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def programs_alone(runner, context: int) -> dict[str, float]:
    """Seconds of the step's programs run synchronously, one decode row at `context` tokens."""
    rows = [RowPlan(slot=0, num_computed=context, num_new=1, sample=True, prompt_len=context - 1)]
    sampling = runner.sampling_tensors([SamplingParams(temperature=0.0)], [1])
    out = {}

    def model_step(num_tokens, num_rows):
        row_index, _ = shard_major_index(rows, num_tokens, num_rows)
        inputs = runner._device_inputs(step_inputs(rows, row_index, 1, num_rows))

        def run():
            logits, _, runner.kv_caches, _ = runner._step_fn(runner.params, runner.kv_caches, runner.history,
                                                             runner.block_tables, inputs, num_tokens=num_tokens)
            return jax.block_until_ready(logits)
        return run, inputs, row_index

    num_tokens, num_rows = runner.buckets_for(rows)
    run, inputs, row_index = model_step(num_tokens, num_rows)
    out[f"model program, bucket ({num_tokens} tokens, {num_rows} rows)"] = best(run)
    logits = run()
    placed = place_rows(sampling, row_index, num_rows)

    def sampler():
        token, runner.history, runner.penalty_state = runner._sample_fn(
            logits, placed, make_step_key(0, 0), runner.history, runner.penalty_state, inputs,
            argmax_only=needs_only_argmax(placed))
        return jax.block_until_ready(token)
    out[f"sampler program (argmax only), {num_rows} rows"] = best(sampler)
    token = sampler()
    out["copy back of the sampled tokens"] = best(lambda: np.asarray(jnp.copy(token.token_ids)))
    out["model program, exactly 1 token x 1 row"] = best(model_step(1, 1)[0])
    out["one small device_put (int32[8])"] = best(lambda: jax.block_until_ready(jnp.asarray(np.zeros(8, np.int32))))
    empty = jax.jit(lambda x: x + 1)
    small = jnp.zeros(8, jnp.int32)
    out["one empty jitted call"] = best(lambda: jax.block_until_ready(empty(small)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--token-buckets", type=_int_tuple, default=None)
    parser.add_argument("--request-buckets", type=_int_tuple, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    config = EngineConfig(model=args.model, dtype=args.dtype, max_model_len=1024, compile_at_startup=False,
                          token_buckets=args.token_buckets, request_buckets=args.request_buckets)
    llm = LLM(config=config)
    steps, pieces = engine_steps(llm, args.steps, args.prompt_len)
    step_ms = statistics.median(steps) * 1e3
    print(f"engine step, one stream decoding (median of {len(steps)}): {step_ms:.2f} ms")
    result = {"tool": "step_overhead", "model": args.model, "dtype": str(weight_dtype(llm.engine.loaded.model)),
              "token_buckets": llm.engine.runner.token_buckets, "request_buckets": llm.engine.runner.request_buckets,
              "engine_step_ms": step_ms, "pieces_ms_per_step": {}, "alone_ms": {}}
    for label, *_ in PIECES:
        per_step = sum(pieces[label]) / len(steps) * 1e3
        result["pieces_ms_per_step"][label] = per_step
        print(f"  {label:<36} {per_step:7.3f} ms per step ({len(pieces[label])} calls)")
    print("alone, synchronous (median):")
    for label, seconds in programs_alone(llm.engine.runner, args.prompt_len + args.steps).items():
        result["alone_ms"][label] = seconds * 1e3
        print(f"  {label:<52} {seconds * 1e3:7.3f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
