"""Every Pallas kernel against its pure-JAX reference over the parameter sweep.

Used by the GPU check (`make gpu-check`: pairwise cases first, then the rest of the full product,
until its time runs out) and by CI (the pairwise cases in interpret mode, and every case's CUDA
lowering through the MLIR verifier). Needs jax and numpy only.

A case is a dict of factor values; `attention_case` / `grouped_case` run one with a kernel
("triton" or "mosaic") and return (passed, relative error); `attention_lowering` /
`grouped_lowering` give the same computation as (function, abstract arguments) for lowering.
"""

from __future__ import annotations

import functools
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import FP8_DTYPE, quantize_kv, ragged_paged_attention_reference

KERNELS = ("triton", "mosaic")
Q_LENS = [1, 1, 1, 9, 20, 5, 1, 70]
KV_LENS = [15, 16, 17, 9, 52, 33, 32, 300]
ATTENTION_FACTORS = {
    "group": [1, 3, 4, 8],
    "head_dim": [64, 128, 80, 96, 192, 256],
    "block_size": [16, 8, 64, 128],
    "kind": ["f32", "bf16", "fp8"],
    "window": [None, 24],
    "cap": [None, 20.0],
    "splits": [1, 4],
}
GROUPED_FACTORS = {
    "sizes": [(0, 100, 3, 0, 250), (1,) * 16, (640,)],
    "dtype": ["float32", "bfloat16"],
}
# Tolerances, relative to the output's max: f32 caches differ from the reference in accumulation
# order, and GPU dots may use TF32 (10-bit mantissa: 5e-3); bf16/fp8 caches are read exactly by
# both, but the kernel feeds bf16 operands to the dots when q is bf16 (2^-8 rounding: 2e-2).
TOLERANCE = {"f32": 5e-3, "bf16": 2e-2, "fp8": 2e-2}


def pairwise(factors: dict) -> list[dict]:
    """Cases covering every pair of values of any two factors (greedy, deterministic): each new
    case takes, factor by factor, the value that covers most pairs not yet covered."""
    names = list(factors)
    uncovered = {((a, va), (b, vb)) for a, b in itertools.combinations(names, 2)
                 for va in factors[a] for vb in factors[b]}
    key = lambda value: repr(value)  # noqa: E731 - values may be None or tuples
    uncovered = {(a, key(va), b, key(vb)) for (a, va), (b, vb) in uncovered}
    cases = []
    while uncovered:
        case = {}
        for name in names:
            def gain(value):
                new = sum((other, key(case[other]), name, key(value)) in uncovered for other in case)
                ahead = sum(1 for (a, va, _, _) in uncovered if a == name and va == key(value))
                return new, ahead

            case[name] = max(factors[name], key=gain)
        covered = {(a, key(case[a]), b, key(case[b])) for a, b in itertools.combinations(names, 2)}
        uncovered -= covered
        cases.append(case)
    return cases


def full_sweep(factors: dict) -> list[dict]:
    """The pairwise cases first, then the rest of the full product."""
    first = pairwise(factors)
    seen = {tuple(map(repr, c.values())) for c in first}
    rest = [dict(zip(factors, values)) for values in itertools.product(*factors.values())]
    return first + [c for c in rest if tuple(map(repr, c.values())) not in seen]


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


def attention_kernel(kernel: str):
    """The kernel entry point by name (imported late: a Mosaic GPU kernel may not import here)."""
    if kernel == "mosaic":
        from pallas_kernels.mosaic_paged_attention import ragged_paged_attention_mosaic

        return ragged_paged_attention_mosaic
    from pallas_kernels.triton_paged_attention import ragged_paged_attention_triton

    return ragged_paged_attention_triton


def attention_unsupported(kernel: str, case: dict, num_kv_heads: int = 2) -> str | None:
    shape = dict(num_q_heads=num_kv_heads * case["group"], num_kv_heads=num_kv_heads, head_dim=case["head_dim"],
                 block_size=case["block_size"], q_dtype=jnp.dtype(jnp.float32 if case["kind"] == "f32" else jnp.bfloat16),
                 cache_dtype=jnp.dtype({"f32": jnp.float32, "bf16": jnp.bfloat16, "fp8": FP8_DTYPE}[case["kind"]]))
    if kernel == "mosaic":
        from pallas_kernels.mosaic_paged_attention import mosaic_unsupported_reason

        return mosaic_unsupported_reason(**shape)
    from pallas_kernels.triton_paged_attention import unsupported_reason

    return unsupported_reason(**shape)


def _attention_inputs(case: dict, seed: int):
    block = case["block_size"]
    rng = np.random.default_rng(seed)
    q, k, v, lens, tables, cu = make_batch(
        rng, Q_LENS, KV_LENS, num_kv_heads=2, group=case["group"], head_dim=case["head_dim"], block_size=block,
        width=max(-(-kv // block) for kv in KV_LENS) + 1, pad_rows=2, pad_tokens=3)
    k, v = jnp.asarray(k), jnp.asarray(v)
    q = jnp.asarray(q, jnp.float32 if case["kind"] == "f32" else jnp.bfloat16)
    scale = None
    if case["kind"] == "bf16":
        k, v = k.astype(jnp.bfloat16), v.astype(jnp.bfloat16)
    elif case["kind"] == "fp8":
        scale = jnp.float32(4.0 / 448)
        k, v = quantize_kv(k, scale, FP8_DTYPE), quantize_kv(v, scale, FP8_DTYPE)
    k, v = k.at[0].set(jnp.nan), v.at[0].set(jnp.nan)  # the null block must never be read
    return (q, k, v, jnp.asarray(lens), jnp.asarray(tables), jnp.asarray(cu), jnp.int32(len(Q_LENS)), scale), int(cu[len(Q_LENS)])


def _attention_fn(case: dict, kernel: str | None, interpret: bool, **kernel_options):
    """jit(q, k, v, lens, tables, cu, n, scale) of the kernel (None: the reference)."""
    opts = dict(sm_scale=case["head_dim"] ** -0.5, sliding_window=case["window"], soft_cap=case["cap"])
    if kernel is None:
        return jax.jit(lambda *a: ragged_paged_attention_reference(*a[:7], **opts, k_scale=a[7], v_scale=a[7]))
    fn = attention_kernel(kernel)
    return jax.jit(lambda *a: fn(*a[:7], **opts, k_scale=a[7], v_scale=a[7], num_kv_splits=case["splits"],
                                 interpret=interpret, **kernel_options))


def attention_case(case: dict, kernel: str = "triton", *, seed: int = 0, interpret: bool = False,
                   **kernel_options) -> tuple[bool, float]:
    args, valid = _attention_inputs(case, seed)
    out = _attention_fn(case, kernel, interpret, **kernel_options)(*args)
    ref = _attention_fn(case, None, interpret)(*args)
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    err = float(np.max(np.abs(out[:valid] - ref[:valid])) / np.max(np.abs(ref[:valid])))
    ok = bool(np.all(np.isfinite(out)) and err < TOLERANCE[case["kind"]] and np.all(out[valid:] == 0))
    return ok, err


def attention_lowering(case: dict, kernel: str = "triton", **kernel_options):
    """(function, abstract arguments) of `attention_case` without data: for CUDA lowering."""
    args, _ = _attention_inputs(case, 0)  # small: cheaper to build than to describe
    args = tuple(None if a is None else jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args)
    return _attention_fn(case, kernel, False, **kernel_options), args


def grouped_kernels(kernel: str):
    if kernel == "mosaic":
        from pallas_kernels.mosaic_grouped_matmul import grouped_matmul_mosaic, grouped_matmul_swiglu_mosaic

        return grouped_matmul_mosaic, grouped_matmul_swiglu_mosaic
    from pallas_kernels.triton_grouped_matmul import grouped_matmul, grouped_matmul_swiglu

    return grouped_matmul, grouped_matmul_swiglu


def grouped_unsupported(kernel: str, case: dict) -> str | None:
    if kernel != "mosaic":
        return None
    from pallas_kernels.mosaic_grouped_matmul import mosaic_unsupported_reason

    sizes = case["sizes"]
    return mosaic_unsupported_reason(num_rows=sum(sizes) + 5, k_dim=256, n_dim=128, num_groups=len(sizes),
                                     dtype=jnp.dtype(case["dtype"]))


def _grouped_inputs(case: dict):
    sizes, dtype = case["sizes"], jnp.dtype(case["dtype"])
    rng = np.random.default_rng(sum(sizes))
    lhs = jnp.asarray(rng.standard_normal((sum(sizes) + 5, 256)), dtype)
    rhs = jnp.asarray(rng.standard_normal((len(sizes), 256, 128)) * 0.1, dtype)
    up = jnp.asarray(rng.standard_normal((len(sizes), 256, 128)) * 0.1, dtype)
    return lhs, rhs, up, jnp.asarray(sizes, jnp.int32)


def _grouped_fn(kernel: str, interpret: bool):
    matmul, swiglu = grouped_kernels(kernel)
    return jax.jit(lambda lhs, rhs, up, groups: (matmul(lhs, rhs, groups, interpret=interpret),
                                                 swiglu(lhs, rhs, up, groups, interpret=interpret)))


def grouped_case(case: dict, kernel: str = "triton", *, interpret: bool = False) -> tuple[bool, float]:
    lhs, rhs, up, groups = _grouped_inputs(case)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    ref = jax.lax.ragged_dot(f32(lhs), f32(rhs), groups)
    ref_swiglu = jax.nn.silu(ref) * jax.lax.ragged_dot(f32(lhs), f32(up), groups)
    outs = _grouped_fn(kernel, interpret)(lhs, rhs, up, groups)
    errs = [float(jnp.max(jnp.abs(f32(out) - r)) / jnp.max(jnp.abs(r))) for out, r in zip(outs, (ref, ref_swiglu))]
    tail_zero = all(bool(jnp.all(out[sum(case["sizes"]):] == 0)) for out in outs)
    err = max(errs)
    return err < (5e-3 if case["dtype"] == "float32" else 2e-2) and tail_zero, err


def grouped_lowering(case: dict, kernel: str = "triton"):
    args = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in _grouped_inputs(case))
    return _grouped_fn(kernel, False), args


def sweep_cases(kernels=KERNELS) -> list[tuple[str, str, dict]]:
    """(kind, kernel, case): each kernel's pairwise cases first (attention, then grouped matmul),
    then the rest of the full products."""
    firsts, rests = [], []
    for kind, factors in (("attention", ATTENTION_FACTORS), ("grouped", GROUPED_FACTORS)):
        for kernel in kernels:
            cases = full_sweep(factors)
            count = len(pairwise(factors))
            firsts += [(kind, kernel, c) for c in cases[:count]]
            rests += [(kind, kernel, c) for c in cases[count:]]
    return firsts + rests


def run_sweep(kernels=KERNELS, interpret: bool = False, seconds: float = 240.0, on_case=lambda row: None,
              cases=None) -> dict:
    """Runs `cases` (default sweep_cases(kernels)) until `seconds` run out; a case that raises is
    a failure with its error, and the sweep goes on. `on_case(row)` after each."""
    start = time.perf_counter()
    cases = sweep_cases(kernels) if cases is None else cases
    summary = dict(total=len(cases), run=0, passed=0, failed=0, skipped=0, max_rel_err=0.0, failures=[],
                   skips={})
    for index, (kind, kernel, case) in enumerate(cases):
        if time.perf_counter() - start > seconds:
            break
        row = dict(kind=kind, kernel=kernel, case={k: v for k, v in case.items()})
        try:
            reason = (attention_unsupported if kind == "attention" else grouped_unsupported)(kernel, case)
            if reason:
                summary["skipped"] += 1
                summary["skips"][kernel] = summary["skips"].get(kernel, 0) + 1
                row["skipped"] = reason
            else:
                ok, err = (functools.partial(attention_case, seed=index) if kind == "attention" else grouped_case)(
                    case, kernel, interpret=interpret)
                row.update(passed=ok, rel_err=err)
        except Exception as err:  # noqa: BLE001 - one broken case must not end the sweep
            row.update(passed=False, error=f"{type(err).__name__}: {str(err)[:300]}")
        if "skipped" not in row:
            summary["run"] += 1
            summary["passed"] += bool(row["passed"])
            summary["max_rel_err"] = max(summary["max_rel_err"], row.get("rel_err", 0.0))
            if not row["passed"]:
                summary["failed"] += 1
                if len(summary["failures"]) < 20:
                    summary["failures"].append(row)
                print("FAIL", row, flush=True)
        on_case(row)
    summary["seconds"] = time.perf_counter() - start
    print({k: v for k, v in summary.items() if k != "failures"}, flush=True)
    return summary
