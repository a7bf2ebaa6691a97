"""Decode-shaped matrix products on this CPU against its copy bandwidth, measured in one run (issue 20).

A decode step of the default model multiplies M = 1..8 rows by every weight matrix once; at
M = 1 it can go no faster than reading the weights, so GB/s of weights read, as a fraction of
the in-place copy bandwidth (jaxserve/benchmarks/roofline.py), is the figure of merit. Each
formulation runs over 30 layers' worth of one SmolLM2 matrix shape (576 x 1536, the MLP's gate),
inside one jitted program (a Python-unrolled chain over separate arrays, as the model's layers
are, and a `fori_loop` over one stacked array), in float32 and in bfloat16 with float32
accumulation:
- `dot`: x [M, K] @ W [K, N] (the model's `Linear`);
- `dot_t`: W stored transposed [N, K], contracted on its last axis (a weight layout chosen at load);
- `mulsum`: broadcast multiply and reduce over K (VPU-shaped, no dot);
- `split2`: two dots over halves of N (two independent ops the CPU runtime may run at once);
- `linear`: the model's `Linear` product (models/layers.py `two_row_product`: one 16-bit row
  padded to two, which XLA:CPU runs in its bf16 kernel instead of an f32 matrix-vector product).
Run: PYTHONPATH=. python tools/matvec_bench.py [--json PATH]. XLA_FLAGS apply as usual, so a
flag's effect is one more run under it.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp

from jaxserve.benchmarks.roofline import best_time, measure_copy_bandwidth
from models.layers import two_row_product

K, N, LAYERS = 576, 1536, 30


def product(name: str, x, w):
    """x [M, K] times one layer's weight (stored as `name` wants it), float32 out."""
    if name == "dot":
        return jnp.dot(x, w, preferred_element_type=jnp.float32)
    if name == "dot_t":
        return jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    if name == "mulsum":
        return (x[:, :, None].astype(jnp.float32) * w[None].astype(jnp.float32)).sum(axis=1)
    if name == "linear":
        return two_row_product(lambda x: jnp.dot(x, w, preferred_element_type=jnp.float32), x)
    if name == "split2":
        half = w.shape[1] // 2
        return jnp.concatenate([jnp.dot(x, w[:, :half], preferred_element_type=jnp.float32),
                                jnp.dot(x, w[:, half:], preferred_element_type=jnp.float32)], axis=1)
    raise ValueError(name)


def chain(name: str):
    """Every layer's product, each layer's input depending on the previous output (as in a model)."""
    def unrolled(x, weights):
        for w in weights:
            y = product(name, x, w)
            x = (x + y[:, : x.shape[1]].astype(x.dtype) * 1e-3)
        return x

    def looped(x, stacked):
        def body(i, x):
            y = product(name, x, stacked[i])
            return x + y[:, : x.shape[1]].astype(x.dtype) * 1e-3
        return jax.lax.fori_loop(0, LAYERS, body, x)

    return jax.jit(unrolled), jax.jit(looped)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json")
    args = parser.parse_args()
    bandwidth = measure_copy_bandwidth() / 1e9
    rows = []
    for dtype in (jnp.float32, jnp.bfloat16):
        for name in ("dot", "dot_t", "mulsum", "split2", "linear"):
            shape = (N, K) if name == "dot_t" else (K, N)
            weights = [jnp.full(shape, 0.01, dtype) for _ in range(LAYERS)]
            stacked = jnp.stack(weights)
            unrolled, looped = chain(name)
            for m in (1, 4, 8):
                x = jnp.ones((m, K), dtype)
                nbytes = LAYERS * K * N * jnp.dtype(dtype).itemsize
                for form, fn, w in (("unrolled", unrolled, weights), ("fori_loop", looped, stacked)):
                    seconds = best_time(fn, x, w, repeats=15)
                    rows.append({"dtype": jnp.dtype(dtype).name, "formulation": name, "form": form, "m": m,
                                 "weights_gb_s": nbytes / seconds / 1e9,
                                 "fraction_of_copy": nbytes / seconds / 1e9 / bandwidth,
                                 "gflop_s": 2 * LAYERS * m * K * N / seconds / 1e9})
                    r = rows[-1]
                    print(f"{r['dtype']:9} {name:7} {form:9} M={m}: {r['weights_gb_s']:6.1f} GB/s "
                          f"({r['fraction_of_copy']:.0%} of copy), {r['gflop_s']:6.1f} GFLOP/s", flush=True)
    result = {"copy_bandwidth_gb_s": bandwidth, "xla_flags": os.environ.get("XLA_FLAGS", ""), "rows": rows}
    print(f"copy bandwidth {bandwidth:.1f} GB/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
