"""`jaxserve bench kernels --interpret` (and its --check sweep) runs end to end on CPU."""

import json

import pytest

from jaxserve.benchmarks import kernel_check
from jaxserve.cli import main

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")


@pytest.mark.slow
def test_bench_kernels_interpret_end_to_end(tmp_path, monkeypatch):
    # A two-case sweep: the full one is for the GPU (make gpu-check).
    monkeypatch.setattr(kernel_check, "ATTENTION_SWEEP", [(3, 64, "fp8", 24, 20.0, 4), (4, 64, "bf16", None, None, 1)])
    out_json, out_md = tmp_path / "kernels.json", tmp_path / "kernels.md"
    rc = main(["bench", "kernels", "--interpret", "--check", "--check-seconds", "60",
               "--json", str(out_json), "--markdown", str(out_md)])
    assert rc == 0
    result = json.loads(out_json.read_text())
    assert result["check"]["failed"] == 0 and result["check"]["run"] >= 2
    assert result["ceilings"]["copy_gb_s"] > 0 and result["ceilings"]["bf16_tflop_s"] > 0
    assert {r["kv_dtype"] for r in result["decode_attention"]} == {"bf16", "fp8"}
    assert all(r["gb_s"] > 0 for r in result["decode_attention"])
    (moe,) = result["moe_grouped_matmul"]
    assert moe["rel_err"] < 2e-2  # bf16 kernel vs bf16 ragged_dot
    assert "| fp8 |" in out_md.read_text()


def test_a_failing_part_keeps_the_figures_measured_before_it(tmp_path, monkeypatch):
    """The GPU run has one try: a part that fails (here the MoE benchmark) must not lose the decode
    rows already written, and the exit status says something failed."""
    from jaxserve.benchmarks import kernels

    def broken(*args, **kwargs):
        raise RuntimeError("out of shared memory")

    monkeypatch.setattr(kernels, "grouped_matmul_swiglu", broken)
    out_json, out_md = tmp_path / "kernels.json", tmp_path / "kernels.md"
    rc = main(["bench", "kernels", "--interpret", "--json", str(out_json), "--markdown", str(out_md)])
    result = json.loads(out_json.read_text())
    assert rc == 1 and result["moe_grouped_matmul"] == []
    assert result["errors"] == {"moe_grouped_matmul": "RuntimeError: out of shared memory"}
    assert len(result["decode_attention"]) == 4 and all(r["gb_s"] > 0 for r in result["decode_attention"])
    assert all(r["fp8_speedup"] > 0 for r in result["decode_attention"] if r["kv_dtype"] == "fp8")
    assert "moe_grouped_matmul stopped with RuntimeError: out of shared memory" in out_md.read_text()
