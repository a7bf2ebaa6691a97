"""`jaxserve bench kernels --interpret` (and its --check sweep) runs end to end on CPU, through the
benchmark's own entry point (`python -m jaxserve.benchmarks.kernels`: the same parser, no server)."""

import json

import pytest

from jaxserve.benchmarks import kernel_check
from jaxserve.benchmarks.kernels import main

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")


@pytest.mark.slow
def test_bench_kernels_interpret_end_to_end(tmp_path, monkeypatch):
    # A three-case sweep: the full one is for the GPU (make gpu-check).
    case = dict(group=3, head_dim=64, block_size=16, kind="fp8", window=24, cap=20.0, splits=4)
    cases = [("attention", "triton", case), ("attention", "triton", {**case, "kind": "bf16", "head_dim": 80}),
             ("grouped", "triton", {"sizes": (0, 100, 3, 0, 250), "dtype": "bfloat16"})]
    monkeypatch.setattr(kernel_check, "sweep_cases", lambda kernels: cases)
    out_json, out_md = tmp_path / "kernels.json", tmp_path / "kernels.md"
    rc = main(["--interpret", "--check", "--check-seconds", "60",
               "--json", str(out_json), "--markdown", str(out_md)])
    assert rc == 0
    result = json.loads(out_json.read_text())
    assert result["check"]["failed"] == 0 and result["check"]["run"] == 3
    assert result["ceilings"]["copy_gb_s"] > 0 and result["ceilings"]["bf16_tflop_s"] > 0
    assert {r["kv_dtype"] for r in result["decode_attention"]} == {"bf16", "fp8"}
    assert all(r["gb_s"] > 0 and r["kernel"] == "triton" for r in result["decode_attention"])
    (moe,) = result["moe_grouped_matmul"]
    assert moe["rel_err"] < 2e-2  # bf16 kernel vs bf16 ragged_dot
    assert "| fp8 |" in out_md.read_text()


def test_a_failing_kernel_keeps_the_other_figures(tmp_path, monkeypatch):
    """The GPU run has one try: a kernel that fails (here the MoE grouped matmul) must not lose
    the rows measured before and beside it, and the exit status says something failed."""
    from jaxserve.benchmarks import kernels

    def broken(*args, **kwargs):
        raise RuntimeError("out of shared memory")

    monkeypatch.setattr(kernels, "grouped_kernels", lambda kernel: (broken, broken))
    out_json, out_md = tmp_path / "kernels.json", tmp_path / "kernels.md"
    rc = main(["--interpret", "--json", str(out_json), "--markdown", str(out_md)])
    result = json.loads(out_json.read_text())
    assert rc == 1
    (moe,) = result["moe_grouped_matmul"]
    assert moe["error"] == "RuntimeError: out of shared memory" and moe["ragged_dot_ms"] > 0
    assert len(result["decode_attention"]) == 4 and all(r["gb_s"] > 0 for r in result["decode_attention"])
    assert all(r["fp8_speedup"] > 0 for r in result["decode_attention"] if r["kv_dtype"] == "fp8")
    assert "failed: RuntimeError: out of shared memory" in out_md.read_text()


def test_the_decode_grid_starts_where_the_targets_are():
    from jaxserve.benchmarks.kernels import REDUCED_SIZES, decode_grid

    grid = decode_grid(REDUCED_SIZES)
    assert len(grid) == 12 and grid[:2] == [("bf16", 64, 4096), ("fp8", 64, 4096)]
    assert [b for _, b, _ in grid[-4:]] == [8, 8, 8, 8]  # batch 8 is outside the targets: last


def test_pairwise_covers_every_pair():
    import itertools

    factors = kernel_check.ATTENTION_FACTORS
    cases = kernel_check.pairwise(factors)
    for a, b in itertools.combinations(factors, 2):
        pairs = {(repr(c[a]), repr(c[b])) for c in cases}
        assert len(pairs) == len(factors[a]) * len(factors[b]), (a, b)
    assert len(cases) <= 30  # 6 head sizes x 4 groups = 24 is the least possible
    full = kernel_check.full_sweep(factors)
    assert full[:len(cases)] == cases and len({tuple(map(repr, c.values())) for c in full}) == len(full) == 2304


def test_a_case_that_raises_is_a_failure_and_the_sweep_goes_on(monkeypatch):
    def boom(case, kernel, **kwargs):
        raise RuntimeError("cannot compile")

    monkeypatch.setattr(kernel_check, "grouped_case", boom)
    cases = [("grouped", "triton", {"sizes": (1,), "dtype": "float32"}),
             ("attention", "triton", dict(group=1, head_dim=64, block_size=16, kind="f32", window=None, cap=None,
                                          splits=1))]
    rows = []
    summary = kernel_check.run_sweep(interpret=True, cases=cases, on_case=rows.append)
    assert summary["run"] == 2 and summary["failed"] == 1 and summary["passed"] == 1
    assert rows[0]["error"] == "RuntimeError: cannot compile" and rows[1]["passed"]


def test_decode_variants_run_after_the_grid():
    """The GPU check's questions for the next run (fp8 via bfloat16 operands, 4x KV splits) come
    back as rows beside the grid's, compared with the grid row of the same shape."""
    import jax.numpy as jnp

    from jaxserve.benchmarks import kernels

    sizes = dict(kernels.TINY_SIZES, batches=(3,))
    variants = [dict(variant="fp8 via bfloat16", kernel="triton", kv_dtype="fp8", batch=3, context=40,
                     options={"fp8_compute_dtype": jnp.bfloat16}),
                dict(variant="4x splits", kernel="triton", kv_dtype="bf16", batch=3, context=40, splits_factor=4),
                dict(variant="other kernel", kernel="mosaic", kv_dtype="bf16", batch=3, context=40)]
    rows = kernels.bench_decode(sizes, True, 1, 1e9, kernels=("triton",), variants=variants)
    assert [r.get("variant") for r in rows] == [None, None, "fp8 via bfloat16", "4x splits"]
    grid_bf16 = rows[0]
    assert rows[3]["kv_splits"] == 4 * grid_bf16["kv_splits"] and all("error" not in r for r in rows)
    assert rows[2]["fp8_speedup"] == grid_bf16["pallas_ms"] / rows[2]["pallas_ms"]
    assert all(r["kernel"] == "triton" for r in rows)
