"""Where a steady decode step's time goes, by ablation, measured in one run.

Builds the default model's decode step as the engine runs it in `bench throughput` (32 rows,
contexts 100-300, paged KV cache donated and updated in place), times it, then times it again with
one part after another replaced by a no-op of the same shape: paged attention, the KV-cache write,
the MLPs, the remaining projections, the LM head. Each difference is that part's share. The
replacements are monkeypatches of this process only: a diagnostic, never a code path.

    .venv/bin/python tools/decode_breakdown.py [--rows 32] [--min-ctx 100] [--max-ctx 300]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import models.layers as layers
import models.transformer as transformer
from jaxserve.benchmarks.roofline import measure_matmul_rate
from models.layers import AttentionMetadata
from models.loader import load_model
from models.kv_spec import KVCache


def decode_batch(config, rows: int, min_ctx: int, max_ctx: int, block_size: int = 16, seed: int = 0):
    """Random caches and one decode token per row, each row's blocks allocated back to back."""
    rng = np.random.default_rng(seed)
    ctx = rng.integers(min_ctx, max_ctx + 1, rows)
    width = -(-max_ctx // block_size)
    tables = np.zeros((rows, width), np.int32)
    next_block = 1  # block 0 is the null block
    for r, n in enumerate(-(-ctx // block_size)):
        tables[r, :n] = np.arange(next_block, next_block + n)
        next_block += n
    shape = (next_block, block_size, config.num_kv_heads, config.head_dim)
    caches = [KVCache(tuple(jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(2)))
              for _ in range(config.num_layers)]
    last = ctx - 1
    meta = AttentionMetadata(
        slot_mapping=jnp.asarray(tables[np.arange(rows), last // block_size] * block_size + last % block_size),
        query_start_loc=jnp.arange(rows + 1, dtype=jnp.int32), seq_lens=jnp.asarray(ctx, jnp.int32),
        block_tables=jnp.asarray(tables), num_seqs=jnp.int32(rows))
    ids = jnp.asarray(rng.integers(0, config.vocab_size, rows), jnp.int32)
    return caches, ids, jnp.asarray(last, jnp.int32), meta


def time_step(graphdef, params, caches, ids, positions, meta, repeats: int = 8):
    """Best time of the forward + logits, caches donated as the engine does; returns (s, caches)."""
    def forward(params, caches, ids, positions, meta):
        model = nnx.merge(graphdef, params)
        hidden, caches = model(ids, positions, caches, meta)
        return model.compute_logits(hidden), caches

    step = jax.jit(forward, donate_argnums=1)  # a new function each call: no stale trace
    logits, caches = step(params, caches, ids, positions, meta)
    jax.block_until_ready(logits)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        logits, caches = step(params, caches, ids, positions, meta)
        jax.block_until_ready(logits)
        best = min(best, time.perf_counter() - start)
    return best, caches


def _same_width(self, x):
    """A Linear replaced by a slice or pad to its output width."""
    out = self.kernel.shape[1]
    return x[..., :out] if x.shape[-1] >= out else jnp.pad(x, ((0, 0), (0, out - x.shape[-1])))


ABLATIONS = [  # (part, what replaces it); each stays replaced for the rows below it
    ("paged attention", lambda: setattr(layers.pallas_kernels, "ragged_paged_attention", lambda q, *a, **k: q)),
    ("KV-cache write", lambda: setattr(layers.pallas_kernels, "write_kv_cache", lambda kc, vc, *a, **k: (kc, vc))),
    ("MLP matmuls", lambda: setattr(layers.DenseMLP, "__call__", lambda self, x, **kwargs: x)),
    ("q/k/v/o projections", lambda: setattr(layers.Linear, "__call__", _same_width)),
    ("LM head", lambda: setattr(transformer.CausalLM, "compute_logits", lambda self, h: h)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--min-ctx", type=int, default=100)
    parser.add_argument("--max-ctx", type=int, default=300)
    args = parser.parse_args()
    model = load_model(args.model, dtype=jnp.float32).model
    graphdef, params = nnx.split(model)
    caches, ids, positions, meta = decode_batch(model.config, args.rows, args.min_ctx, args.max_ctx)
    flops = 2 * args.rows * sum(x.size for x in jax.tree.leaves(params))
    matmul = measure_matmul_rate()
    total, caches = time_step(graphdef, params, caches, ids, positions, meta)
    print(f"decode step, {args.rows} rows, contexts {args.min_ctx}-{args.max_ctx}: {total * 1e3:.1f} ms; "
          f"weight-matmul floor {flops / matmul * 1e3:.1f} ms at the measured {matmul / 1e9:.0f} GFLOP/s "
          f"({flops / matmul / total:.0%} reached)")
    previous = total
    for part, ablate in ABLATIONS:
        ablate()
        t, caches = time_step(graphdef, params, caches, ids, positions, meta)
        print(f"  {part:<22} {(previous - t) * 1e3:6.1f} ms  {(previous - t) / total:5.0%}")
        previous = t
    print(f"  {'everything else':<22} {previous * 1e3:6.1f} ms  {previous / total:5.0%}")


if __name__ == "__main__":
    main()
