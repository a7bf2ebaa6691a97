"""The parts of the GPU check, one per process (`gpu_check.py` starts them in order of value):

    python -m jaxserve.benchmarks.gpu_parts PART --out PART.json --seconds S [--context CTX.json] [--tiny]

A part fills `result` and writes it after every row, so a part stopped at its time limit keeps what
it measured; it stops starting new rows once `seconds` are spent. `--context` holds what earlier
parts found (the ceilings, the kernels that passed the smoke test). `--tiny` runs tiny sizes, with
the Pallas kernels in interpret mode where there is no GPU (CI).

The environment variable JAXSERVE_GPU_CHECK_INJECT ("part:raise" or "part:hang", comma-separated)
makes a part fail or hang on purpose: the driver's isolation is tested with it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.benchmarks import kernel_check, kernels as kernel_bench
from jaxserve.benchmarks.roofline import best_time, measure_copy_bandwidth, measure_matmul_rate
from pallas_kernels.interpret import interpret_mode
from pallas_kernels.kv_cache import FP8_DTYPE


class Part:
    """What a part sees: its result (written by `save()`), its deadline, earlier parts' findings."""

    def __init__(self, out: str, seconds: float, context: dict, tiny: bool):
        self.out, self.context, self.tiny = out, context, tiny
        self.deadline = time.monotonic() + seconds
        self.result: dict = {}

    @property
    def interpret(self) -> bool:
        """Pallas interpret mode where there is no GPU. Asking starts jax's backend, which takes
        most of the GPU's memory: the transformers peer's part never asks."""
        return jax.default_backend() != "gpu"

    def add_row(self, row: dict, measure) -> dict:
        """`row` updated with what `measure()` returns, or with the error it raised (the other rows
        still run), appended to the result's rows, printed and saved."""
        try:
            row.update(measure())
        except Exception as err:  # noqa: BLE001 - recorded; the other rows still run
            row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
        self.result.setdefault("rows", []).append(row)
        print(json.dumps(row), flush=True)
        self.save()
        return row

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        tmp = self.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.result, f, indent=1, default=str)
        os.replace(tmp, self.out)

    def kernels(self) -> tuple[str, ...]:
        """The Pallas kernels that passed the smoke test without an error (all before it runs),
        Mosaic GPU first."""
        usable = self.context.get("usable_kernels", kernel_check.KERNELS)
        return tuple(k for k in ("mosaic", "triton") if k in usable)


def versions(part: Part) -> None:
    packages = {}
    for name in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "numpy", "triton", "torch",
                 "transformers", "orbax-checkpoint"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            packages[name] = importlib.metadata.version(name)
    device = jax.devices()[0]
    part.result.update(python=platform.python_version(), packages=packages, backend=jax.default_backend(),
                       device_kind=device.device_kind, device_count=jax.device_count(),
                       compute_capability=getattr(device, "compute_capability", None))
    part.save()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        query = "name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit,compute_cap"
        smi = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
        part.result["nvidia_smi"] = dict(zip(query.split(","), (x.strip() for x in smi.stdout.split(","))))
    part.save()


def smoke(part: Part) -> None:
    """One jitted attention case per cache dtype and one grouped matmul per kernel, against the
    references; a kernel that raises (or never finishes) here is left out of the later parts."""
    case = dict(group=4, head_dim=64 if part.tiny else 128, block_size=16, window=None, cap=None, splits=2)
    for kernel in kernel_check.KERNELS:
        rows = part.result.setdefault(kernel, {})
        checks = [(f"attention_{kind}", "attention", {**case, "kind": kind}) for kind in ("bf16", "fp8", "f32")]
        checks.append(("grouped_bf16", "grouped", {"sizes": (0, 100, 3, 0, 250), "dtype": "bfloat16"}))
        for name, kind, params in checks:
            start = time.perf_counter()
            try:
                unsupported = (kernel_check.attention_unsupported if kind == "attention"
                               else kernel_check.grouped_unsupported)(kernel, params)
                if unsupported:
                    rows[name] = {"skipped": unsupported}
                    continue
                run = kernel_check.attention_case if kind == "attention" else kernel_check.grouped_case
                ok, err = run(params, kernel, interpret=part.interpret)
                rows[name] = {"passed": ok, "rel_err": err, "seconds": time.perf_counter() - start}
            except Exception as err:  # noqa: BLE001 - recorded; the kernel is then left out
                rows[name] = {"error": f"{type(err).__name__}: {str(err)[:500]}", "seconds": time.perf_counter() - start}
            print(kernel, name, rows[name], flush=True)
            part.save()
        rows["verdict"] = ("error" if any("error" in r for r in rows.values() if isinstance(r, dict))
                           else "wrong" if any(r.get("passed") is False for r in rows.values() if isinstance(r, dict))
                           else "ok")
        part.save()


def ceilings(part: Part) -> None:
    copy = measure_copy_bandwidth(4 << 20 if part.tiny else 2 << 30)
    part.result.update(device=jax.devices()[0].device_kind, backend=jax.default_backend(), copy_gb_s=copy / 1e9)
    part.save()
    x = jnp.ones(((1 << 18) if part.tiny else (1 << 29),), jnp.float32)
    read = best_time(jax.jit(jnp.sum), x)
    part.result["read_gb_s"] = x.size * 4 / read / 1e9  # a streaming reduction: reads only
    del x
    part.result["bf16_tflop_s"] = measure_matmul_rate(256 if part.tiny else 8192, dtype=jnp.bfloat16) / 1e12
    part.save()


def decode(part: Part) -> None:
    sizes = dict(kernel_bench.TINY_SIZES if part.tiny else kernel_bench.REDUCED_SIZES)
    copy = part.context.get("ceilings", {}).get("copy_gb_s") or measure_copy_bandwidth(4 << 20 if part.tiny else 2 << 30) / 1e9
    part.result["copy_gb_s"] = copy
    kernel_bench.bench_decode(sizes, part.interpret, 1 if part.tiny else 5, copy * 1e9,
                              rows=part.result.setdefault("rows", []), on_row=part.save, kernels=part.kernels(),
                              deadline=part.deadline, peer_batches=(64,),
                              variants=() if part.tiny else kernel_bench.DECODE_VARIANTS)


# gpt-oss-120b's attention (64 q heads, 8 KV heads, head_dim 64, 16-token pages; half its layers
# slide a 128-token window) at the decode batches the sinks part times; tiny: CI's wiring.
SINKS_SIZES = dict(q_heads=64, kv_heads=8, head_dim=64, block_size=16, batches=(64, 32), context=4096,
                   windows=(128, None), check_lens=([1, 1, 9, 20, 1], [15, 200, 9, 300, 150]))
SINKS_TINY_SIZES = dict(q_heads=8, kv_heads=2, head_dim=64, block_size=16, batches=(2,), context=40, windows=(16,),
                        check_lens=([1, 9, 1], [15, 30, 40]))


def _alternating_times(fns, args, calls: int, repeats: int) -> list[float]:
    """Seconds per call of each function: `calls` calls queued back to back (dispatch hides behind
    the GPU's work), best of `repeats` rounds that alternate the functions (clock drift hits all)."""
    for fn in fns:
        jax.block_until_ready(fn(*args))
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            jax.block_until_ready([fn(*args) for _ in range(calls)][-1])
            best[i] = min(best[i], (time.perf_counter() - start) / calls)
    return best


def sinks(part: Part) -> None:
    """Attention sinks (gpt-oss) at gpt-oss-120b's shape: each kernel with and without sinks on
    bf16 decode batches of 64 and 32 over 4k contexts, window 128 and none (target: sinks <= 5%
    slower), after a check of each kernel with sinks and a window against the reference on a
    mixed batch. GB/s counts the keys and values inside the window. Tiny (CI): the check with
    every kernel, the timed rows with the last one only (interpret mode's compiles cost seconds)."""
    from pallas_kernels import ragged_paged_attention_reference

    sizes = SINKS_TINY_SIZES if part.tiny else SINKS_SIZES
    copy = part.context.get("ceilings", {}).get("copy_gb_s") or measure_copy_bandwidth(4 << 20 if part.tiny else 2 << 30) / 1e9
    part.result.update(copy_gb_s=copy, sizes=sizes, target_slowdown=1.05)
    sm_scale, heads, kv_heads = sizes["head_dim"] ** -0.5, sizes["q_heads"], sizes["kv_heads"]
    rng = np.random.default_rng(0)
    sink_logits = jnp.asarray(rng.uniform(-2.0, 5.0, heads), jnp.float32)
    attend = lambda kernel, window, **opts: jax.jit(lambda *a: kernel_check.attention_kernel(kernel)(  # noqa: E731
        *a[:7], sm_scale=sm_scale, sliding_window=window, k_scale=a[7], v_scale=a[7], interpret=part.interpret,
        **opts))
    window = sizes["windows"][0]
    q_lens, kv_lens = sizes["check_lens"]
    q, k, v, lens, tables, cu = kernel_check.make_batch(
        rng, q_lens, kv_lens, num_kv_heads=kv_heads, group=heads // kv_heads, head_dim=sizes["head_dim"],
        block_size=sizes["block_size"], pad_rows=1, pad_tokens=2)
    args = (jnp.asarray(q, jnp.bfloat16), jnp.asarray(k, jnp.bfloat16), jnp.asarray(v, jnp.bfloat16),
            *map(jnp.asarray, (lens, tables, cu)), jnp.int32(len(q_lens)), None)
    ref = np.asarray(jax.jit(lambda *a: ragged_paged_attention_reference(
        *a[:7], sm_scale=sm_scale, sliding_window=window, sinks=sink_logits))(*args), np.float32)
    for kernel in part.kernels():
        out = np.asarray(attend(kernel, window, sinks=sink_logits)(*args), np.float32)
        err = float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))
        part.result.setdefault("check", {})[kernel] = dict(rel_err=err, passed=err < 2e-2)  # bf16 output: 2^-9
        part.save()
    for batch in sizes["batches"]:
        args = kernel_bench.decode_case(rng, batch, sizes["context"], sizes, "bf16")
        for window in sizes["windows"]:
            read = 2 * batch * min(sizes["context"], window or sizes["context"]) * kv_heads * sizes["head_dim"] * 2
            for kernel in part.kernels()[-1:] if part.tiny else part.kernels():
                if part.time_left() < 0:
                    return
                def measure():
                    plain, with_sinks = _alternating_times(
                        [attend(kernel, window), attend(kernel, window, sinks=sink_logits)], args,
                        calls=1 if part.tiny else 20, repeats=1 if part.tiny else 5)
                    return dict(plain_ms=plain * 1e3, sinks_ms=with_sinks * 1e3, slowdown=with_sinks / plain,
                                gb_s=read / with_sinks / 1e9, frac_copy=read / with_sinks / (copy * 1e9))

                part.add_row(dict(kernel=kernel, batch=batch, context=sizes["context"], window=window), measure)
        del args


def moe(part: Part) -> None:
    dense = part.context.get("ceilings", {}).get("bf16_tflop_s")
    dense = dense * 1e12 if dense else measure_matmul_rate(256 if part.tiny else 8192, dtype=jnp.bfloat16)
    copy = part.context.get("ceilings", {}).get("copy_gb_s")
    part.result.update(dense_bf16_tflop_s=dense / 1e12, copy_gb_s=copy)
    shapes = kernel_bench.TINY_MOE_SHAPES if part.tiny else kernel_bench.MOE_SHAPES
    kernel_bench.bench_moe(shapes, 8 if part.tiny else 1024, part.interpret, 1 if part.tiny else 5, dense,
                           rows=part.result.setdefault("rows", []), on_row=part.save, kernels=part.kernels(),
                           deadline=part.deadline, bandwidth=copy * 1e9 if copy else None)


def engine(part: Part) -> None:
    """The Pallas engine against the reference engine (engine_check.py), in the GPU's dtype: each
    case with each kernel that passed the smoke test, named explicitly (Mosaic GPU first: what
    "pallas" picks on Hopper), so a kernel that hung there cannot hang this part."""
    from jaxserve.benchmarks import engine_check

    backends = ["pallas"] if part.tiny else list(part.kernels())  # tiny (CI): the wiring only
    names = list(engine_check.CASES)[:1 if part.tiny else None]  # tiny: CI checks the wiring only
    cases = part.result.setdefault("cases", [])
    references: dict = {}  # the reference engine's outputs, once per case for all the kernels
    with interpret_mode() if part.interpret else contextlib.nullcontext():
        for backend in backends:
            for name in names:
                if part.time_left() < 0:
                    return
                try:
                    cases.append(engine_check.run_case(name, part.tiny, backend=backend, references=references))
                except Exception as err:  # noqa: BLE001 - recorded, next case
                    cases.append({"case": name, "backend": backend, "passed": False,
                                  "error": f"{type(err).__name__}: {str(err)[:500]}"})
                part.save()


def e2e(part: Part) -> None:
    """A random Llama-3.1-8B-shaped model in the engine's dtype: batch-1 decode against the HBM
    floor, then offline throughput on 256 prompts of 512 tokens, 128 out (end_to_end.py)."""
    from jaxserve.benchmarks.end_to_end import run_end_to_end

    run_end_to_end(part.result, part.save, tiny=part.tiny, deadline=part.deadline,
                                copy_gb_s=part.context.get("ceilings", {}).get("copy_gb_s"))


def e2e_peer(part: Part) -> None:
    """Hugging Face transformers `generate` on the same prompts and card (tools/gpu_transformers_peer.py),
    in its own process: torch is in the GPU image, never a dependency of jaxserve."""
    script = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "gpu_transformers_peer.py")
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as err:
        part.result["skipped"] = f"no peer here: {err}"
        part.save()
        return
    out = part.out + ".peer.json"
    command = [sys.executable, script, "--json", out] + (["--tiny"] if part.tiny else [])
    run = subprocess.run(command, capture_output=True, text=True, timeout=max(10.0, part.time_left()))
    print(run.stdout[-3000:], run.stderr[-3000:], flush=True)
    if os.path.exists(out):
        with open(out) as f:
            part.result.update(json.load(f))
    else:
        part.result["error"] = f"exit {run.returncode}: {run.stderr[-800:]}"
    part.save()


def sweep(part: Part) -> None:
    """Every kernel over the sweep, jitted, pairwise cases first, until the time runs out; the
    summary plus every failure."""
    cases = kernel_check.sweep_cases(part.kernels())
    if part.tiny:
        cases = cases[:2] + [c for c in cases if c[1] == "triton" and c[0] == "grouped"][:1]

    def on_case(row):
        part.result.setdefault("rows", 0)
        part.result["rows"] += 1
        if time.monotonic() > part.last_save + 5:
            part.save()
            part.last_save = time.monotonic()

    part.last_save = time.monotonic()
    part.result["summary"] = kernel_check.run_sweep(part.kernels(), interpret=part.interpret,
                                                    seconds=max(0.0, part.time_left() - 5), on_case=on_case,
                                                    cases=cases)
    part.save()


# DeepSeek-V3's MLA (128 heads, latent 512 + rope 64, 64-token pages) and its decode grid; tiny:
# CI's interpret-mode wiring. Variants (Triton options, bf16 at 4k) answer how to tune it.
MLA_SIZES = dict(heads=128, rank=512, rope=64, block_size=64, batch=64, contexts=(4096, 32768))
MLA_TINY_SIZES = dict(heads=4, rank=64, rope=32, block_size=16, batch=3, contexts=(40,))
MLA_VARIANTS = [dict(block_h=16), dict(block_h=64), dict(block_k=64), dict(num_warps=4), dict(num_kv_splits=2)]


def _mla_decode_case(sizes, context, kv_dtype, key):
    """A decode batch over a random latent cache (fp8: random finite e4m3 bit patterns, with a scale)."""
    batch, width, bs = sizes["batch"], sizes["rank"] + sizes["rope"], sizes["block_size"]
    per_seq = -(-context // bs)
    shape = (batch * per_seq + 1, bs, width)
    if kv_dtype == "fp8":
        sign = jax.random.randint(jax.random.fold_in(key, 2), shape, 0, 2, jnp.uint8) * jnp.uint8(0x80)
        bits = jax.random.randint(key, shape, 0, 0x78, jnp.uint8) ^ sign
        cache, scale = jax.lax.bitcast_convert_type(bits, FP8_DTYPE), jnp.float32(2.0 / 448)
    else:
        cache, scale = jax.random.normal(key, shape, jnp.bfloat16), None
    tables = (1 + jax.random.permutation(key, batch * per_seq)).reshape(batch, per_seq).astype(jnp.int32)
    q = jax.random.normal(jax.random.fold_in(key, 1), (batch, sizes["heads"], width), jnp.bfloat16)
    return (q, cache, jnp.full((batch,), context, jnp.int32), tables, jnp.arange(batch + 1, dtype=jnp.int32),
            jnp.int32(batch)), scale


def mla(part: Part) -> None:
    """MLA decode at DeepSeek-V3's shape (batch 64, contexts 4k and 32k, bf16 and fp8 latent caches)
    with each MLA kernel, as a fraction of the copy bandwidth (bytes read: the batch's latent rows;
    target >= 70%), after a check of each kernel against the reference on a small mixed batch."""
    from pallas_kernels import choose_mla_kernel, mla_paged_attention_reference
    from pallas_kernels.triton_mla_attention import mla_paged_attention_triton

    sizes = MLA_TINY_SIZES if part.tiny else MLA_SIZES
    copy = part.context.get("ceilings", {}).get("copy_gb_s") or measure_copy_bandwidth(4 << 20 if part.tiny else 2 << 30) / 1e9
    part.result.update(copy_gb_s=copy, sizes=sizes, target_frac_copy=0.7)
    rank, sm_scale = sizes["rank"], (128 + sizes["rope"]) ** -0.5  # V3's query head: 128 no-rope + rope
    kernels = []
    for kernel in ("mosaic", "triton"):
        try:
            choose_mla_kernel(kernel, num_heads=sizes["heads"], kv_lora_rank=rank, rope_dim=sizes["rope"],
                              block_size=sizes["block_size"], q_dtype=jnp.bfloat16, cache_dtype=jnp.bfloat16)
            kernels += [kernel] if kernel in part.kernels() else []
        except ValueError as err:
            part.result.setdefault("skipped", {})[kernel] = str(err)
    run = lambda options: jax.jit(lambda *a: mla_paged_attention_triton(  # noqa: E731
        *a[:6], kv_lora_rank=rank, sm_scale=sm_scale, scale=a[6], interpret=part.interpret, **options))
    reference = jax.jit(lambda *a: mla_paged_attention_reference(*a[:6], kv_lora_rank=rank, sm_scale=sm_scale,
                                                                 scale=a[6]))
    key = jax.random.key(0)
    for kernel in kernels:  # the check: 3 decodes and a 5-token chunk over 4k-or-less contexts
        q_lens, kv_lens = [1, 1, 5, 1], [17, 700 if not part.tiny else 40, 40, 1]
        q, cache, _, lens, tables, cu = kernel_check.make_batch(
            np.random.default_rng(0), q_lens, kv_lens, num_kv_heads=1, group=sizes["heads"],
            head_dim=rank + sizes["rope"], block_size=sizes["block_size"], pad_rows=1, pad_tokens=2)
        args = (jnp.asarray(q, jnp.bfloat16), jnp.asarray(cache[:, :, 0], jnp.bfloat16),
                *map(jnp.asarray, (lens, tables, cu)), jnp.int32(len(q_lens)), None)
        out, ref = (np.asarray(f(*args), np.float32) for f in (run({}), reference))
        err = float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))
        part.result.setdefault("check", {})[kernel] = dict(rel_err=err, passed=err < 2e-2)  # bf16 output: 2^-9
        part.save()
    plan = [(kv, c, {}) for c in sizes["contexts"] for kv in ("bf16", "fp8")]
    plan += [] if part.tiny else [("bf16", sizes["contexts"][0], v) for v in MLA_VARIANTS]
    for kv_dtype, context, options in plan:
        if part.time_left() < 0:
            return
        args, scale = _mla_decode_case(sizes, context, kv_dtype, jax.random.fold_in(key, context))
        read = sizes["batch"] * context * (rank + sizes["rope"]) * (1 if kv_dtype == "fp8" else 2)
        for kernel in kernels:
            def measure():
                t = best_time(run(options), *args, scale, repeats=1 if part.tiny else 5)
                return dict(ms=t * 1e3, gb_s=read / t / 1e9, frac_copy=read / t / (copy * 1e9))

            part.add_row(dict(kernel=kernel, kv_dtype=kv_dtype, batch=sizes["batch"], context=context, **options),
                         measure)
        del args


# DeepSeek-V3's block-FP8 linears (name, in, out): an expert's 7168 -> 2048 -> 7168, and attention's.
FP8_MATMUL_SHAPES = [("expert_up", 7168, 2048), ("expert_down", 2048, 7168), ("q_b_proj", 1536, 24576),
                     ("kv_b_proj", 512, 32768), ("o_proj", 16384, 7168)]
FP8_MATMUL_TOKENS = (64, 256, 1024, 4096)
FP8_MATMUL_TINY = ([("tiny", 300, 200)], (8, 40))


def fp8_matmul(part: Part) -> None:
    """Block-FP8 linears (128 x 128 weight blocks) at DeepSeek-V3's shapes, M = 64..4096 tokens, bf16
    activations: the product on fp8 weights kept in memory by each method of
    `models.quantization.block_fp8_matmul` ("dequantize": the weight dequantized in the step, then a
    bf16 dot; "scaled": per-token-group fp8 activations and the block-scaled fp8 dot in XLA;
    "pallas": the same activations into the Triton block-scaled kernel), and "pallas_nk": that
    kernel on the weight stored [N, K] (the checkpoint's layout, K-major as Hopper's fp8 wgmma wants
    its B operand; the model keeps [K, N]), against bf16 weights dequantized at load, each as a
    fraction of the card's dense fp8 and bf16 rates (square dots measured here) and, for small M, of
    the copy bandwidth (weight bytes read). The fastest method decides
    `models.quantization.DEFAULT_MATMUL` on GPU ("auto" prefers "pallas" there, unmeasured)."""
    from models.quantization import BlockFP8, block_fp8_matmul, dequantize, quantize, quantize_activations
    from pallas_kernels.triton_fp8_matmul import block_fp8_matmul_triton

    size = 256 if part.tiny else 8192
    square = jnp.ones((size, size), FP8_DTYPE)
    fp8_rate = 2 * size**3 / best_time(jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.bfloat16)),
                                       square, square)
    del square
    bf16_rate = (part.context.get("ceilings", {}).get("bf16_tflop_s") or 0) * 1e12
    bf16_rate = bf16_rate or measure_matmul_rate(size, dtype=jnp.bfloat16)
    copy = part.context.get("ceilings", {}).get("copy_gb_s")
    part.result.update(dense_fp8_tflop_s=fp8_rate / 1e12, dense_bf16_tflop_s=bf16_rate / 1e12, copy_gb_s=copy)
    part.save()
    quant = BlockFP8((128, 128))

    def transposed(x, w_nk, scale):
        xq, xs = quantize_activations(x, quant.block_in)
        return block_fp8_matmul_triton(xq[:, :x.shape[1]], xs, w_nk, scale, w_transposed=True,
                                       interpret=part.interpret)

    shapes, tokens = FP8_MATMUL_TINY if part.tiny else (FP8_MATMUL_SHAPES, FP8_MATMUL_TOKENS)
    methods = {"bf16": jax.jit(lambda x, w, s: x @ w),
               "dequantize": jax.jit(lambda x, w, s: block_fp8_matmul(x, w, s, quant, "dequantize")),
               "scaled": jax.jit(lambda x, w, s: block_fp8_matmul(x, w, s, quant, "scaled")),
               "pallas": jax.jit(lambda x, w, s: block_fp8_matmul(x, w, s, quant, "pallas")),
               "pallas_nk": jax.jit(transposed)}
    rows = part.result.setdefault("rows", [])
    key = jax.random.key(0)
    for name, k, n in shapes:
        kernel, scale = quantize(0.02 * jax.random.normal(jax.random.fold_in(key, k * n), (k, n)), quant.kernel_block)
        weights = {"bf16": dequantize(kernel, scale, quant.kernel_block, jnp.bfloat16), "dequantize": kernel,
                   "scaled": kernel, "pallas": kernel, "pallas_nk": kernel.T}
        for m in tokens:
            if part.time_left() < 0:
                return
            x = jax.random.normal(jax.random.fold_in(key, m), (m, k), jnp.bfloat16)
            want = np.asarray(x.astype(jnp.float32) @ weights["bf16"].astype(jnp.float32))
            row = dict(shape=name, tokens=m, k=k, n=n)
            for method, run in methods.items():
                try:
                    with interpret_mode() if part.interpret else contextlib.nullcontext():  # read while tracing
                        t = best_time(run, x, weights[method], scale, repeats=1 if part.tiny else 5)
                        out = np.asarray(run(x, weights[method], scale), np.float32)
                except Exception as err:  # noqa: BLE001 - recorded; the other methods still run
                    row[f"{method}_error"] = f"{type(err).__name__}: {str(err)[:300]}"
                    continue
                read = k * n * (2 if method == "bf16" else 1) + scale.size * 4 + m * k * 2
                row.update({f"{method}_ms": t * 1e3, f"{method}_frac_fp8": 2 * m * k * n / t / fp8_rate,
                            f"{method}_frac_bf16": 2 * m * k * n / t / bf16_rate,
                            f"{method}_rel_err": float(np.max(np.abs(out - want)) / np.max(np.abs(want)))})
                if copy:
                    row[f"{method}_frac_copy"] = read / t / (copy * 1e9)
            rows.append(row)
            print(json.dumps(row), flush=True)
            part.save()


# gpt-oss-120b's experts: (experts, K, N, top-k); gate, up and down are all 2880 x 2880.
MXFP4_MOE_SHAPE = (128, 2880, 2880, 4)
MXFP4_MOE_TOKENS = (64, 512, 4096)
MXFP4_MOE_TINY = ((4, 64, 32, 2), (8, 40))


def mxfp4_moe(part: Part) -> None:
    """gpt-oss-120b's expert matmul (128 experts of 2880 x 2880, top-4, tokens routed uniformly),
    bf16 activations: the Triton MXFP4 grouped matmul on packed experts (W4A16, 0.53 bytes a
    weight) against the Triton bf16 grouped matmul on the same weights dequantized (2 bytes), XLA's
    ragged_dot on those, and the reference's in-step dequantization then ragged_dot. Each row gives
    times, MXFP4's speed as a fraction of the bf16 kernel's (the target: >= 0.6) and each method's
    rate as a fraction of the copy bandwidth (weight bytes read: the limit at few tokens)."""
    from pallas_kernels.mxfp4 import dequantize_packed_experts
    from pallas_kernels.triton_grouped_matmul import grouped_matmul
    from pallas_kernels.triton_mxfp4_grouped_matmul import grouped_matmul_mxfp4

    (experts, k, n, top_k), tokens = MXFP4_MOE_TINY if part.tiny else (MXFP4_MOE_SHAPE, MXFP4_MOE_TOKENS)
    copy = part.context.get("ceilings", {}).get("copy_gb_s")
    part.result.update(experts=experts, k=k, n=n, top_k=top_k, copy_gb_s=copy)
    rng = np.random.default_rng(0)
    packed = jnp.asarray(rng.integers(0, 256, (experts, k // 2, n)), jnp.uint8)
    scales = jnp.asarray(rng.integers(118, 122, (experts, k // 32, n)), jnp.uint8)
    dense = dequantize_packed_experts(packed, scales, jnp.bfloat16)
    methods = {"bf16_triton": (jax.jit(lambda x, w, s, g: grouped_matmul(x, w, g, interpret=part.interpret)), dense),
               "bf16_xla": (jax.jit(lambda x, w, s, g: jax.lax.ragged_dot(x, w, g)), dense),
               "mxfp4_triton": (jax.jit(lambda x, w, s, g: grouped_matmul_mxfp4(x, w, s, g, interpret=part.interpret)),
                                packed),
               "mxfp4_dequantize": (jax.jit(lambda x, w, s, g: jax.lax.ragged_dot(
                   x, dequantize_packed_experts(w, s, x.dtype), g)), packed)}
    rows = part.result.setdefault("rows", [])
    for m in tokens:
        if part.time_left() < 0:
            return
        sizes = jnp.asarray(np.bincount(rng.integers(0, experts, m * top_k), minlength=experts), jnp.int32)
        x = jnp.asarray(rng.standard_normal((m * top_k, k)), jnp.bfloat16)
        want = np.asarray(jax.lax.ragged_dot(x.astype(jnp.float32), dense.astype(jnp.float32), sizes))
        row = dict(tokens=m, rows=m * top_k)
        for method, (run, weight) in methods.items():
            try:
                t = best_time(run, x, weight, scales, sizes, repeats=1 if part.tiny else 5)
                out = np.asarray(run(x, weight, scales, sizes), np.float32)
            except Exception as err:  # noqa: BLE001 - recorded; the other methods still run
                row[f"{method}_error"] = f"{type(err).__name__}: {str(err)[:300]}"
                continue
            read = packed.size + scales.size if method.startswith("mxfp4") else dense.size * 2
            row.update({f"{method}_ms": t * 1e3,
                        f"{method}_rel_err": float(np.max(np.abs(out - want)) / np.max(np.abs(want)))})
            if copy:
                row[f"{method}_frac_copy"] = read / t / (copy * 1e9)
        if "mxfp4_triton_ms" in row and "bf16_triton_ms" in row:
            row["mxfp4_speed_of_bf16"] = row["bf16_triton_ms"] / row["mxfp4_triton_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        part.save()


PARTS = {"versions": versions, "smoke": smoke, "ceilings": ceilings, "decode": decode, "sinks": sinks, "moe": moe,
         "engine": engine, "e2e": e2e, "e2e_peer": e2e_peer, "sweep": sweep,
         "mla": mla, "fp8_matmul": fp8_matmul, "mxfp4_moe": mxfp4_moe}


def _inject(name: str) -> None:
    for item in filter(None, os.environ.get("JAXSERVE_GPU_CHECK_INJECT", "").split(",")):
        target, _, action = item.partition(":")
        if target == name and action == "raise":
            raise RuntimeError(f"injected failure in {name}")
        if target == name and action == "hang":
            time.sleep(3600)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=list(PARTS))
    parser.add_argument("--out", required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--context", default=None)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)
    context = {}
    if args.context and os.path.exists(args.context):
        with open(args.context) as f:
            context = json.load(f)
    part = Part(args.out, args.seconds, context, args.tiny)
    part.save()
    _inject(args.part)
    PARTS[args.part](part)
    part.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
