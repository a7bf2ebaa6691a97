"""`jaxserve bench kernels`: the Pallas kernels against the card's own ceilings.

First measures copy bandwidth and the bf16 matmul rate, then reports
- decode attention (one query per sequence) over batch x context, bf16 and fp8 KV: achieved GB/s
  of KV read and its fraction of the copy bandwidth, beside the pure-JAX reference and jax's own
  (deprecated) Pallas GPU paged attention where it still imports;
- MoE grouped matmul (fused gate/up + down) on Mixtral-like and Qwen3-MoE-like shapes: TFLOP/s
  and fraction of the dense bf16 rate, beside `jax.lax.ragged_dot`.
With `--check` it first runs every kernel against its reference over the full parameter sweep.
`--interpret` runs everything at tiny sizes in Pallas interpret mode (CPU CI).
Imports jax, numpy and the kernels only (no jinja2, no tokenizer): `make gpu-check` runs it bare.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.benchmarks.kernel_check import KERNELS, attention_kernel, grouped_kernels
from jaxserve.benchmarks.gpu_report import decode_table, moe_table
from jaxserve.benchmarks.report import save_partial
from jaxserve.benchmarks.roofline import best_time, measure_copy_bandwidth, measure_matmul_rate
from pallas_kernels import FP8_DTYPE, ragged_paged_attention_reference

FULL_SIZES = dict(batches=(1, 8, 32, 128, 256), contexts=(512, 4096, 32768), kv_heads=8, q_heads=32,
                  head_dim=128, block_size=16, max_kv_bytes=24 << 30, moe_tokens=1024)
# The GPU check's reduced grid: bf16/fp8 x batch 8/64/256 x context 4k/32k.
REDUCED_SIZES = dict(FULL_SIZES, batches=(8, 64, 256), contexts=(4096, 32768), max_kv_bytes=40 << 30)
TINY_SIZES = dict(batches=(1, 3), contexts=(40,), kv_heads=1, q_heads=4, head_dim=64, block_size=16,
                  max_kv_bytes=1 << 30, moe_tokens=8)
MOE_SHAPES = {  # name: (experts, top_k, hidden, intermediate)
    "mixtral-8x7b": (8, 2, 4096, 14336),
    "qwen3-30b-a3b": (128, 8, 2048, 768),
}
TINY_MOE_SHAPES = {"tiny-moe": (4, 2, 64, 64)}


def add_parser(sub) -> None:
    p = sub.add_parser("kernels", help="Pallas kernels vs copy bandwidth / bf16 matmul rate")
    p.add_argument("--interpret", action="store_true", help="tiny sizes in Pallas interpret mode (CPU)")
    p.add_argument("--check", action="store_true", help="first check every kernel against its reference")
    p.add_argument("--check-seconds", type=float, default=240.0, help="time cap for --check's sweep")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--markdown", default=None, help="write a markdown table here")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--kernels", default="triton", help="comma-separated: triton, mosaic")
    p.set_defaults(bench=run)


def _kv_splits(batch: int, kv_heads: int) -> int:
    """Flash-decoding: aim for >= ~256 programs so a 132-SM card stays busy at small batch."""
    return int(min(16, max(1, 256 // (batch * kv_heads))))


def decode_case(rng, batch, context, sizes, kv_dtype):
    bs, hkv, hq, d = sizes["block_size"], sizes["kv_heads"], sizes["q_heads"], sizes["head_dim"]
    per_seq = -(-context // bs)
    num_blocks = batch * per_seq + 1
    tables = (1 + rng.permutation(batch * per_seq)).reshape(batch, per_seq).astype(np.int32)
    shape = (num_blocks, bs, hkv, d)
    key = jax.random.key(int(rng.integers(1 << 30)))
    scale = None
    if kv_dtype == "fp8":
        # Random finite e4m3 bit patterns, made in place: quantizing a bf16 cache first would
        # need 3x the fp8 cache's memory at batch 256 x 32k.
        scale = jnp.float32(4.0 / 448)
        k, v = (jax.lax.bitcast_convert_type(
            jax.random.randint(jax.random.fold_in(key, i), shape, 0, 0x78, jnp.uint8) ^ jnp.uint8(0x80 * (i % 2)),
            FP8_DTYPE) for i in range(2))
    else:
        k = jax.random.normal(key, shape, jnp.bfloat16)
        v = jax.random.normal(jax.random.fold_in(key, 1), shape, jnp.bfloat16)
    q = jax.random.normal(jax.random.fold_in(key, 2), (batch, hq, d), jnp.bfloat16)
    lens = jnp.full((batch,), context, jnp.int32)
    cu = jnp.arange(batch + 1, dtype=jnp.int32)
    return q, k, v, lens, jnp.asarray(tables), cu, jnp.int32(batch), scale


def decode_grid(sizes) -> list[tuple[str, int, int]]:
    """(KV dtype, batch, context) rows in the order of value: the targets' region (batch >= 32,
    context >= 4k) first, each bf16 row followed by its fp8 twin."""
    rows = sorted(itertools.product(sizes["batches"], sizes["contexts"]),
                  key=lambda bc: (bc[0] < 32 or bc[1] < 4096, bc[1], bc[0]))
    return [(kv, b, c) for b, c in rows for kv in ("bf16", "fp8")]


# Variants the GPU check times after the grid (question each answers): fp8 with bfloat16 operands
# (is the float16 default faster?), and 4x the default KV splits (are 256 programs too few for
# 132 SMs at batch 64 x 4k, where both kernels read at ~40% of the copy bandwidth?).
DECODE_VARIANTS = [
    dict(variant="fp8 via bfloat16", kernel="triton", kv_dtype="fp8", batch=64, context=4096,
         options={"fp8_compute_dtype": jnp.bfloat16}),
    dict(variant="fp8 via bfloat16", kernel="triton", kv_dtype="fp8", batch=256, context=32768,
         options={"fp8_compute_dtype": jnp.bfloat16}),
    dict(variant="4x splits", kernel="triton", kv_dtype="bf16", batch=64, context=4096, splits_factor=4),
    dict(variant="4x splits", kernel="mosaic", kv_dtype="bf16", batch=64, context=4096, splits_factor=4),
    dict(variant="4x splits", kernel="triton", kv_dtype="fp8", batch=64, context=4096, splits_factor=4),
]


def _decode_row(kernel, args, kv_bytes, bandwidth, splits, interpret, repeats, options=None) -> dict:
    """One kernel's time on one decode batch: ms, GB/s of KV read, fraction of the copy bandwidth."""
    fn = attention_kernel(kernel)
    sm = args[0].shape[-1] ** -0.5
    options = options or {}
    try:
        timed = jax.jit(lambda *a: fn(*a[:7], sm_scale=sm, k_scale=a[7], v_scale=a[7], num_kv_splits=splits,
                                      interpret=interpret, **options))
        t = best_time(timed, *args, repeats=repeats)
        return dict(pallas_ms=t * 1e3, gb_s=kv_bytes / t / 1e9, frac_copy=kv_bytes / t / bandwidth)
    except Exception as err:  # noqa: BLE001 - one kernel failing must not lose the others' rows
        return {"error": f"{type(err).__name__}: {str(err)[:300]}"}


def bench_decode(sizes, interpret, repeats, bandwidth, rows=None, on_row=lambda: None, kernels=("triton",),
                 deadline=None, peer_batches=None, variants=()):
    """Appends one row per (KV dtype, batch, context, kernel) to `rows`, calling `on_row` after
    each, then one per variant (DECODE_VARIANTS) whose kernel is in `kernels`; stops at `deadline`
    (time.monotonic()). jax's own paged attention (which compiles per shape too) runs beside the
    bf16 rows of `peer_batches` (None: every batch)."""
    rows = [] if rows is None else rows
    rng = np.random.default_rng(0)
    plan = [(kv, b, c, None) for kv, b, c in decode_grid(sizes)]
    plan += [(v["kv_dtype"], v["batch"], v["context"], v) for v in variants if v["kernel"] in kernels]
    for kv_dtype, batch, context, variant in plan:
        itemsize = 1 if kv_dtype == "fp8" else 2
        kv_bytes = 2 * batch * context * sizes["kv_heads"] * sizes["head_dim"] * itemsize
        if kv_bytes > sizes["max_kv_bytes"]:
            continue
        if deadline is not None and time.monotonic() > deadline:
            break
        q, k, v, lens, tables, cu, n, scale = decode_case(rng, batch, context, sizes, kv_dtype)
        splits = _kv_splits(batch, sizes["kv_heads"])
        args = (q, k, v, lens, tables, cu, n, scale)
        for kernel in kernels if variant is None else (variant["kernel"],):
            row = dict(kernel=kernel, kv_dtype=kv_dtype, batch=batch, context=context, kv_splits=splits)
            options = None
            if variant is not None:
                row["kv_splits"] = splits * variant.get("splits_factor", 1)
                row["variant"], options = variant["variant"], variant.get("options")
            row.update(_decode_row(kernel, args, kv_bytes, bandwidth, row["kv_splits"], interpret, repeats, options))
            if kernel == kernels[0] and variant is None:
                # The reference gathers every token's keys in float32: only time it where that is cheap.
                sm = sizes["head_dim"] ** -0.5
                reference = jax.jit(lambda *a: ragged_paged_attention_reference(*a[:7], sm_scale=sm, k_scale=a[7],
                                                                                v_scale=a[7]))
                row["reference_ms"] = (best_time(reference, *args, repeats=max(1, repeats // 2)) * 1e3
                                       if kv_bytes <= 256 << 20 else None)
                row["jax_paged_ms"] = (_jax_paged_attention_ms(q, k, v, lens, tables, repeats, interpret)
                                       if peer_batches is None or batch in peer_batches else None)
            bf16 = next((r for r in rows if (r["kernel"], r["kv_dtype"], r["batch"], r["context"], r.get("variant"))
                         == (kernel, "bf16", batch, context, None)), None)
            if kv_dtype == "fp8" and bf16 is not None and "pallas_ms" in bf16 and "pallas_ms" in row:
                row["fp8_speedup"] = bf16["pallas_ms"] / row["pallas_ms"]
            rows.append(row)
            print(json.dumps(row, default=str), flush=True)
            on_row()
        del q, k, v, args
    return rows


def _jax_paged_attention_ms(q, k, v, lens, tables, repeats, interpret):
    """jax's deprecated Triton decode kernel (bf16 only), or None where it no longer imports."""
    if k.dtype != jnp.bfloat16 or interpret:  # interpret: CPU smoke run, keep it short
        return None
    try:
        from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention
    except ImportError:
        return None
    k_pages, v_pages = (x.transpose(2, 0, 1, 3) for x in (k, v))  # [Hkv, pages, page, D]
    pages = tables.shape[1]
    k_splits = next(s for s in (16, 8, 4, 2, 1) if pages % s == 0)
    fn = jax.jit(lambda q, kp, vp, t, n: paged_attention(q, kp, vp, t, n, k_splits=k_splits))
    try:
        return best_time(fn, q, k_pages, v_pages, tables, lens, repeats=repeats) * 1e3
    except Exception as err:  # noqa: BLE001 - a deprecated kernel: report, don't fail the bench
        print(f"jax paged_attention failed: {type(err).__name__}: {str(err)[:200]}")
        return None


def bench_moe(shapes, tokens, interpret, repeats, dense_rate, rows=None, on_row=lambda: None, kernels=("triton",),
              deadline=None, bandwidth=None):
    """One row per (shape, kernel): the fused gate/up + down grouped matmuls' rate as a fraction of
    the dense bf16 matmul rate, beside `jax.lax.ragged_dot` (which XLA on GPU computes as a dense
    dot over all experts: its time means little on its own). With `bandwidth` (bytes/s) also the
    roofline: the larger of the compute floor and the memory floor (every routed expert's weights
    and the activations read or written once). Qwen3-MoE at 1024 tokens does ~64 FLOP per weight
    byte, under an H200's ~200: there the memory floor is the one that counts."""
    rows = [] if rows is None else rows
    for name, (experts, top_k, hidden, inter) in shapes.items():
        if deadline is not None and time.monotonic() > deadline:
            break
        key = jax.random.key(1)
        rows_n = tokens * top_k
        ids = jax.random.randint(key, (tokens, top_k), 0, experts)
        sizes = jnp.bincount(ids.reshape(-1), length=experts).astype(jnp.int32)
        x = jax.random.normal(key, (rows_n, hidden), jnp.bfloat16)
        w_gate = jax.random.normal(jax.random.fold_in(key, 1), (experts, hidden, inter), jnp.bfloat16) * 0.02
        w_up = jax.random.normal(jax.random.fold_in(key, 2), (experts, hidden, inter), jnp.bfloat16) * 0.02
        w_down = jax.random.normal(jax.random.fold_in(key, 3), (experts, inter, hidden), jnp.bfloat16) * 0.02

        def ragged(x, g, u, dn, s):
            h = jax.nn.silu(jax.lax.ragged_dot(x, g, s)) * jax.lax.ragged_dot(x, u, s)
            return jax.lax.ragged_dot(h.astype(x.dtype), dn, s)

        args = (x, w_gate, w_up, w_down, sizes)
        flops = 2 * rows_n * hidden * inter * 3
        used = int(jnp.sum(sizes > 0))
        moved = 2 * (3 * used * hidden * inter + rows_n * (2 * hidden + 2 * inter))  # bf16 bytes
        floor = max(flops / dense_rate, moved / bandwidth) if bandwidth else None
        t_r = best_time(jax.jit(ragged), *args, repeats=repeats)
        out_r = jax.jit(ragged)(*args).astype(jnp.float32)
        for kernel in kernels:
            matmul, swiglu = grouped_kernels(kernel)

            def pallas(x, g, u, dn, s):
                return matmul(swiglu(x, g, u, s, interpret=interpret), dn, s, interpret=interpret)

            row = dict(shape=name, kernel=kernel, experts=experts, top_k=top_k, hidden=hidden, intermediate=inter,
                       tokens=tokens, ragged_dot_ms=t_r * 1e3, ragged_dot_frac_dense=flops / t_r / dense_rate)
            try:
                t_p = best_time(jax.jit(pallas), *args, repeats=repeats)
                out_p = jax.jit(pallas)(*args).astype(jnp.float32)
                err = float(jnp.max(jnp.abs(out_p - out_r)) / jnp.max(jnp.abs(out_r)))
                row.update(pallas_ms=t_p * 1e3, tflop_s=flops / t_p / 1e12, frac_dense=flops / t_p / dense_rate,
                           speedup_vs_ragged_dot=t_r / t_p, rel_err=err, bytes=moved,
                           frac_roofline=None if floor is None else floor / t_p)
            except Exception as err:  # noqa: BLE001 - keep the other kernel's row
                row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
            on_row()
    return rows


def check_kernels(interpret: bool, seconds: float, kernels=("triton",)) -> dict:
    """Every kernel against its reference over the sweep (pairwise first, until `seconds` run out)."""
    from jaxserve.benchmarks.kernel_check import run_sweep

    return run_sweep(kernels, interpret=interpret, seconds=seconds)


def markdown(result: dict) -> str:
    """The tables of what `result` holds so far (a run cut short by a time limit keeps its rows)."""
    c = result.get("ceilings")
    lines = [f"Device: {c['device']} (backend {c['backend']}, interpret={result['interpret']}); "
             f"copy bandwidth {c['copy_gb_s']:.1f} GB/s, bf16 matmul {c['bf16_tflop_s']:.2f} TFLOP/s"
             if c else f"Device: {jax.devices()[0].device_kind} (ceilings not measured yet)", ""]
    if "check" in result:
        ch = result["check"]
        lines += [f"Kernel check: {ch['passed']}/{ch['run']} cases passed of {ch['total']} "
                  f"({ch['skipped']} skipped as unsupported; max rel err {ch['max_rel_err']:.2e})", ""]
    lines += decode_table(result.get("decode_attention", [])) + [""] + moe_table(result.get("moe_grouped_matmul", []))
    for name, error in result.get("errors", {}).items():
        lines += ["", f"{name} stopped with {error}"]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    interpret = args.interpret
    sizes = TINY_SIZES if interpret else FULL_SIZES
    result = {"interpret": interpret}
    kernels = tuple(k for k in args.kernels.split(",") if k)
    unknown = set(kernels) - set(KERNELS)
    if unknown:
        raise SystemExit(f"--kernels must name {KERNELS}, got {sorted(unknown)}")

    def save():  # after every part and row
        save_partial(result, markdown, args.json, args.markdown)

    if args.check:
        result["check"] = check_kernels(interpret, args.check_seconds, kernels)
        save()
    copy = measure_copy_bandwidth(4 << 20 if interpret else 1 << 30)
    dense = measure_matmul_rate(256 if interpret else 8192, dtype=jnp.bfloat16)
    result["ceilings"] = dict(device=jax.devices()[0].device_kind, backend=jax.default_backend(),
                              copy_gb_s=copy / 1e9, bf16_tflop_s=dense / 1e12)
    print(json.dumps(result["ceilings"]), flush=True)
    save()
    repeats = 1 if interpret else args.repeats
    parts = {
        "decode_attention": lambda rows: bench_decode(sizes, interpret, repeats, copy, rows=rows, on_row=save,
                                                      kernels=kernels),
        "moe_grouped_matmul": lambda rows: bench_moe(TINY_MOE_SHAPES if interpret else MOE_SHAPES, sizes["moe_tokens"],
                                                     interpret, repeats, dense, rows=rows, on_row=save, kernels=kernels),
    }
    for name, bench in parts.items():
        try:
            bench(result.setdefault(name, []))
        except Exception as err:  # noqa: BLE001 - keep the other part's figures; the exit status says it failed
            result.setdefault("errors", {})[name] = f"{type(err).__name__}: {str(err)[:500]}"
            print(f"{name} failed: {result['errors'][name]}", flush=True)
        save()
    print(markdown(result))
    failed = result.get("check", {}).get("failed", 0)
    broken = [r for part in ("decode_attention", "moe_grouped_matmul") for r in result.get(part, []) if "error" in r]
    return 1 if failed or broken or result.get("errors") else 0


def main(argv=None) -> int:
    """`python -m jaxserve.benchmarks.kernels ...`: the same benchmark without the full CLI, whose
    `serve` and `bench serve` parsers import the gRPC server (absent from a bare GPU image)."""
    parser = argparse.ArgumentParser(prog="jaxserve bench")
    add_parser(parser.add_subparsers(dest="bench_name", required=True))
    args = parser.parse_args(["kernels", *(sys.argv[1:] if argv is None else argv)])
    return args.bench(args)


if __name__ == "__main__":
    sys.exit(main())
