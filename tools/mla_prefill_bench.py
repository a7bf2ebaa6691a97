"""MLA prefill: the absorbed form (what the engine runs) against the expanded form, on this machine.

    PYTHONPATH=. python tools/mla_prefill_bench.py [--heads 16] [--tokens 512] [--context 512,2048] [--dtype float32]

One prefill chunk of `tokens` queries at the end of a `context`-token sequence, DeepSeek-V3's
per-head sizes (latent 512, rope 64, nope 128, v 128), fewer heads than V3's 128 to fit a CPU:
- absorbed: q_nope taken into the latent space by W_UK, attention over the latent rows (576 per
  key for the logits, 512 for the values), the output taken back through W_UV;
- expanded: every context row expanded by kv_b_proj into per-head K (128 + the shared 64 rope) and V
  (128), then ordinary attention.
Both are dense jitted XLA over contiguous rows (no paging: the difference measured is the form's
arithmetic, which the paged kernels inherit). Prints each median time and expanded / absorbed.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

LATENT, ROPE, NOPE, VDIM = 512, 64, 128, 128


def absorbed(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, scale):
    q_lat = jnp.einsum("thn,lhn->thl", q_nope, w_uk)
    logits = (jnp.einsum("thl,cl->thc", q_lat, c_kv) + jnp.einsum("thr,cr->thc", q_rope, k_rope)) * scale
    probs = _causal_softmax(logits)
    out = jnp.einsum("thc,cl->thl", probs, c_kv)
    return jnp.einsum("thl,lhv->thv", out, w_uv)


def expanded(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, scale):
    k_nope = jnp.einsum("cl,lhn->chn", c_kv, w_uk)
    values = jnp.einsum("cl,lhv->chv", c_kv, w_uv)
    logits = (jnp.einsum("thn,chn->thc", q_nope, k_nope) + jnp.einsum("thr,cr->thc", q_rope, k_rope)) * scale
    probs = _causal_softmax(logits)
    return jnp.einsum("thc,chv->thv", probs, values)


def _causal_softmax(logits):
    tokens, context = logits.shape[0], logits.shape[-1]
    visible = jnp.arange(context)[None, :] <= (context - tokens + jnp.arange(tokens))[:, None]
    logits = jnp.where(visible[:, None, :], logits.astype(jnp.float32), -jnp.inf)
    return jax.nn.softmax(logits, axis=-1).astype(logits.dtype)


def median_time(fn, args, repeats: int = 5) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--context", default="512,2048")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)
    dtype = jnp.dtype(args.dtype)
    rng = np.random.default_rng(0)
    h, t = args.heads, args.tokens
    print(f"{jax.devices()[0].platform}, {args.dtype}, {h} heads, {t} queries; median of 5")
    print(f"{'context':>8}{'absorbed ms':>13}{'expanded ms':>13}{'expanded/absorbed':>19}")
    for context in map(int, args.context.split(",")):
        def arr(*shape):
            return jnp.asarray(rng.standard_normal(shape) * 0.1, dtype)

        inputs = (arr(t, h, NOPE), arr(t, h, ROPE), arr(context, LATENT), arr(context, ROPE),
                  arr(LATENT, h, NOPE), arr(LATENT, h, VDIM))
        scale = (NOPE + ROPE) ** -0.5
        a = jax.jit(lambda *x: absorbed(*x, scale))
        e = jax.jit(lambda *x: expanded(*x, scale))
        np.testing.assert_allclose(np.asarray(a(*inputs), np.float32), np.asarray(e(*inputs), np.float32),
                                   rtol=0.05, atol=0.05 if dtype == jnp.bfloat16 else 1e-3)
        ta, te = median_time(a, inputs), median_time(e, inputs)
        print(f"{context:>8}{ta * 1e3:>13.1f}{te * 1e3:>13.1f}{te / ta:>19.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
