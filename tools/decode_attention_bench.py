"""Decode attention (one query per row) over the paged cache against its floor, in one run (issue 20).

The floor of a decode step's attention is reading each row's keys and values once: `sum of
kv_lens x KV bytes per position / copy bandwidth`, with the in-place copy bandwidth
(jaxserve/benchmarks/roofline.py) measured in the same run. Shapes are the default model's
(SmolLM2-135M: 9 query heads, 3 KV heads, head_dim 64, blocks of 16) in a bf16 cache; block tables
are as wide as the engine's at `--max-model-len`, each row's blocks scattered over a cache of
`--num-blocks` blocks (as a long-running engine's are). Each case runs `--layers` layers' attention
in one jitted program (the model calls it once per layer), so a per-call cost is counted as the
model pays it.

    PYTHONPATH=. .venv/bin/python tools/decode_attention_bench.py [--json PATH]

`--compare-with FILE` times another version of pallas_kernels/paged_attention.py beside this
one, case by case in the same process (e.g. `git show REV:pallas_kernels/paged_attention.py >
/tmp/before.py`): its decode pass (`_single_query_rows`) replaces this one's while it runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.benchmarks.roofline import best_time, measure_copy_bandwidth
import pallas_kernels.paged_attention as paged_attention
from pallas_kernels.paged_attention import ragged_paged_attention_reference

Q_HEADS, KV_HEADS, HEAD_DIM, BLOCK = 9, 3, 64, 16


def decode_case(rng, rows: int, context: int, width: int, num_blocks: int, dtype):
    """One decode query per row, every row `context` long, its blocks drawn at random."""
    blocks_per_row = -(-context // BLOCK)
    tables = np.zeros((rows, width), np.int32)
    chosen = rng.choice(np.arange(1, num_blocks), rows * blocks_per_row, replace=False)
    tables[:, :blocks_per_row] = chosen.reshape(rows, blocks_per_row)
    cache_shape = (num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
    k_cache, v_cache = (jnp.asarray(rng.standard_normal(cache_shape), dtype) for _ in range(2))
    q = jnp.asarray(rng.standard_normal((rows, Q_HEADS, HEAD_DIM)), dtype)
    kv_lens = jnp.full((rows,), context, jnp.int32)
    cu = jnp.arange(rows + 1, dtype=jnp.int32)
    return q, k_cache, v_cache, kv_lens, jnp.asarray(tables), cu, jnp.int32(rows)


def layers_program(num_layers: int):
    """`num_layers` attention calls in one program, each layer's query depending on the last.

    Calls the reference unjitted (its `__wrapped__`): the jitted one would keep the program it
    traced first when `--compare-with` swaps the decode pass."""
    reference = ragged_paged_attention_reference.__wrapped__

    def run(q, k_cache, v_cache, kv_lens, tables, cu, num_seqs):
        for _ in range(num_layers):
            out = reference(q, k_cache, v_cache, kv_lens, tables, cu, num_seqs,
                                                   sm_scale=HEAD_DIM**-0.5)
            q = (q + out * 1e-3).astype(q.dtype)
        return q
    return jax.jit(run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="1,8,32")
    parser.add_argument("--contexts", default="256,1000")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--num-blocks", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--compare-with", default=None, help="another paged_attention.py, timed as 'before'")
    parser.add_argument("--json")
    args = parser.parse_args()
    versions = {"after" if args.compare_with else "this": paged_attention._single_query_rows}
    if args.compare_with:
        spec = importlib.util.spec_from_file_location("paged_attention_before", args.compare_with)
        before = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(before)
        versions = {"before": before._single_query_rows, **versions}
    rng = np.random.default_rng(0)
    dtype = jnp.bfloat16
    bandwidth = measure_copy_bandwidth() / 1e9
    width = -(-args.max_model_len // BLOCK)
    results = []
    for rows in map(int, args.rows.split(",")):
        for context in map(int, args.contexts.split(",")):
            case = decode_case(rng, rows, context, width, args.num_blocks, dtype)
            kv_bytes = args.layers * rows * context * 2 * KV_HEADS * HEAD_DIM * jnp.dtype(dtype).itemsize
            floor = kv_bytes / (bandwidth * 1e9)
            best = {}
            for _ in range(2):  # versions alternate, so that a busy machine slows each alike
                for name, single_query_rows in versions.items():
                    paged_attention._single_query_rows = single_query_rows
                    seconds = best_time(layers_program(args.layers), *case, repeats=8)
                    best[name] = min(best.get(name, float("inf")), seconds)
            paged_attention._single_query_rows = versions["after" if args.compare_with else "this"]
            r = {"rows": rows, "context": context, "floor_ms": floor * 1e3}
            for name, seconds in best.items():
                r.update({f"{name}_ms": seconds * 1e3, f"{name}_kv_gb_s": kv_bytes / seconds / 1e9,
                          f"{name}_fraction_of_floor": floor / seconds})
                print(f"rows {rows:3} context {context:5} {name:6}: {seconds * 1e3:7.2f} ms for {args.layers} "
                      f"layers (floor {floor * 1e3:.2f} ms), K/V read at {kv_bytes / seconds / 1e9:5.1f} GB/s, "
                      f"{floor / seconds:.1%} of the floor", flush=True)
            if args.compare_with:
                r["speedup"] = best["before"] / best["after"]
            results.append(r)
    print(f"copy bandwidth {bandwidth:.1f} GB/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"copy_bandwidth_gb_s": bandwidth, "dtype": jnp.dtype(dtype).name, "layers": args.layers,
                       "max_model_len": args.max_model_len, "cases": results}, f, indent=1)


if __name__ == "__main__":
    main()
