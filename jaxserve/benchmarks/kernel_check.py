"""Every Pallas kernel against its pure-JAX reference over the full parameter sweep.

Used by `jaxserve bench kernels --check` (`make gpu-check`); CI covers the same space pairwise in
tests/pallas_kernels. Needs jax and numpy only.
"""

from __future__ import annotations

import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import FP8_DTYPE, quantize_kv, ragged_paged_attention_reference
from pallas_kernels.triton_grouped_matmul import grouped_matmul, grouped_matmul_swiglu
from pallas_kernels.triton_paged_attention import ragged_paged_attention_triton

BLOCK = 16
Q_LENS = [1, 1, 1, 9, 20, 5, 1, 70]
KV_LENS = [15, 16, 17, 9, 52, 33, 32, 300]
ATTENTION_SWEEP = list(itertools.product([1, 3, 4, 8], [64, 128], ["f32", "bf16", "fp8"], [None, 24],
                                         [None, 20.0], [1, 4]))
# Tolerances, relative to the output's max: f32 caches differ from the reference in accumulation
# order, and GPU dots may use TF32 (10-bit mantissa: 5e-3); bf16/fp8 caches are read exactly by
# both, but the kernel feeds bf16 operands to the dots when q is bf16 (2^-8 rounding: 2e-2).
TOLERANCE = {"f32": 5e-3, "bf16": 2e-2, "fp8": 2e-2}


def make_batch(rng, q_lens, kv_lens, *, num_kv_heads, group, head_dim, block_size, width=None,
               pad_rows=0, pad_tokens=0):
    """Random caches and a ragged batch (float32 numpy); each sequence owns distinct, shuffled blocks
    (never 0). Also the kernel tests' batch builder: this module imports without pytest."""
    blocks_per_seq = [-(-kv // block_size) for kv in kv_lens]
    width = width or max(blocks_per_seq)
    num_blocks = 1 + sum(blocks_per_seq) + 3
    ids = rng.permutation(np.arange(1, num_blocks))
    tables = np.zeros((len(q_lens) + pad_rows, width), np.int32)
    at = 0
    for s, n in enumerate(blocks_per_seq):
        tables[s, :n] = ids[at:at + n]
        at += n
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = rng.standard_normal(shape).astype(np.float32)
    v_cache = rng.standard_normal(shape).astype(np.float32)
    total = sum(q_lens) + pad_tokens
    q = rng.standard_normal((total, num_kv_heads * group, head_dim)).astype(np.float32)
    cu = np.zeros(len(q_lens) + pad_rows + 1, np.int32)
    cu[1:len(q_lens) + 1] = np.cumsum(q_lens)
    cu[len(q_lens) + 1:] = cu[len(q_lens)]
    lens = np.zeros(len(q_lens) + pad_rows, np.int32)
    lens[:len(kv_lens)] = kv_lens
    return q, k_cache, v_cache, lens, tables, cu


def attention_case(group, head_dim, kind, window, cap, splits, seed, interpret):
    rng = np.random.default_rng(seed)
    q, k, v, lens, tables, cu = make_batch(
        rng, Q_LENS, KV_LENS, num_kv_heads=2, group=group, head_dim=head_dim, block_size=BLOCK,
        width=max(-(-kv // BLOCK) for kv in KV_LENS) + 1, pad_rows=2, pad_tokens=3)
    k, v = jnp.asarray(k), jnp.asarray(v)
    q = jnp.asarray(q, jnp.float32 if kind == "f32" else jnp.bfloat16)
    scale = None
    if kind == "bf16":
        k, v = k.astype(jnp.bfloat16), v.astype(jnp.bfloat16)
    elif kind == "fp8":
        scale = jnp.float32(4.0 / 448)
        k, v = quantize_kv(k, scale, FP8_DTYPE), quantize_kv(v, scale, FP8_DTYPE)
    k, v = k.at[0].set(jnp.nan), v.at[0].set(jnp.nan)  # the null block must never be read
    args = (q, k, v, jnp.asarray(lens), jnp.asarray(tables), jnp.asarray(cu), jnp.int32(len(Q_LENS)))
    opts = dict(sm_scale=head_dim ** -0.5, sliding_window=window, soft_cap=cap, k_scale=scale, v_scale=scale)
    out = ragged_paged_attention_triton(*args, **opts, num_kv_splits=splits, interpret=interpret)
    ref = ragged_paged_attention_reference(*args, **opts)
    valid = int(cu[len(Q_LENS)])
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    err = float(np.max(np.abs(out[:valid] - ref[:valid])) / np.max(np.abs(ref[:valid])))
    ok = bool(np.all(np.isfinite(out)) and err < TOLERANCE[kind] and np.all(out[valid:] == 0))
    return ok, err


def grouped_case(sizes, dtype, interpret):
    rng = np.random.default_rng(sum(sizes))
    lhs = jnp.asarray(rng.standard_normal((sum(sizes) + 5, 256)), dtype)
    rhs = jnp.asarray(rng.standard_normal((len(sizes), 256, 128)) * 0.1, dtype)
    up = jnp.asarray(rng.standard_normal((len(sizes), 256, 128)) * 0.1, dtype)
    groups = jnp.asarray(sizes, jnp.int32)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    ref = jax.lax.ragged_dot(f32(lhs), f32(rhs), groups)
    ref_swiglu = jax.nn.silu(ref) * jax.lax.ragged_dot(f32(lhs), f32(up), groups)
    errs = []
    for out, r in ((grouped_matmul(lhs, rhs, groups, interpret=interpret), ref),
                   (grouped_matmul_swiglu(lhs, rhs, up, groups, interpret=interpret), ref_swiglu)):
        errs.append(float(jnp.max(jnp.abs(f32(out) - r)) / jnp.max(jnp.abs(r))))
    err = max(errs)
    return err < (5e-3 if dtype == jnp.float32 else 2e-2), err


def run_sweep(interpret: bool = False, seconds: float = 240.0) -> dict:
    start = time.perf_counter()
    cases = [("attention", c) for c in ATTENTION_SWEEP] + [
        ("grouped", (sizes, dtype)) for sizes in ([0, 100, 3, 0, 250], [1] * 16, [640])
        for dtype in (jnp.float32, jnp.bfloat16)]
    run = passed = 0
    max_err, failures = 0.0, []
    for i, (kind, case) in enumerate(cases):
        if time.perf_counter() - start > seconds:
            break
        if kind == "attention":
            ok, err = attention_case(*case, seed=i, interpret=interpret)
        else:
            ok, err = grouped_case(*case, interpret=interpret)
        run += 1
        passed += ok
        max_err = max(max_err, err)
        if not ok:
            failures.append(f"{kind} {case}: rel err {err:.2e}")
            print("FAIL", failures[-1])
    summary = dict(total=len(cases), run=run, passed=passed, failed=run - passed, max_rel_err=max_err,
                   failures=failures[:20], seconds=time.perf_counter() - start)
    print({k: v for k, v in summary.items() if k != "failures"})
    return summary
