"""The GPU check's driver (`make gpu-check`) at tiny sizes on CPU: parts run in order, each in its
own process; a part that raises or hangs is recorded and the next one runs; a budget that runs out
still leaves a valid results file."""

from __future__ import annotations

import json
import time

import pytest

from jaxserve.benchmarks import gpu_check, gpu_report


def _results(out):
    return json.loads((out / "results.json").read_text())


def test_a_part_that_raises_is_recorded_and_the_next_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXSERVE_GPU_CHECK_INJECT", "ceilings:raise")
    results = gpu_check.run(str(tmp_path), budget=150, tiny=True, parts=["versions", "ceilings", "moe"])
    parts = results["parts"]
    assert list(parts) == ["versions", "ceilings", "moe"]
    assert parts["versions"]["status"] == "ok" and parts["versions"]["result"]["backend"] == "cpu"
    assert parts["ceilings"]["status"] == "failed (exit 1)"
    assert any("injected failure in ceilings" in line for line in parts["ceilings"]["log_tail"])
    assert parts["moe"]["status"] == "ok" and parts["moe"]["result"]["rows"][0]["rel_err"] < 2e-2
    assert _results(tmp_path)["parts"] == json.loads(json.dumps(parts))
    text = (tmp_path / "results.md").read_text()
    assert "| ceilings | failed (exit 1) |" in text and "tiny-moe" in text


def test_a_budget_that_runs_out_still_leaves_a_valid_results_file(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXSERVE_GPU_CHECK_INJECT", "versions:hang")
    monkeypatch.setattr(gpu_check, "PLAN", [("versions", 15), ("ceilings", 30), ("sweep", None)])
    start = time.monotonic()
    results = gpu_check.run(str(tmp_path), budget=20, tiny=True)
    assert time.monotonic() - start < 40
    parts = _results(tmp_path)["parts"]
    assert parts["versions"]["status"] == "stopped at its limit (15 s)"
    assert parts["ceilings"]["status"] == "not run: the budget ran out"
    assert parts["sweep"]["status"] == "not run: the budget ran out"
    assert results["finished"] and "| sweep | not run: the budget ran out |" in (tmp_path / "results.md").read_text()


def test_kernels_that_fail_the_smoke_test_are_left_out_later():
    smoke = {"triton": {"attention_bf16": {"passed": True, "rel_err": 1e-3}, "verdict": "ok"},
             "mosaic": {"attention_bf16": {"error": "RuntimeError: no"}, "verdict": "error"}}
    assert gpu_check._usable_kernels(smoke) == ["triton"]
    hung = {"triton": {"attention_bf16": {"passed": False, "rel_err": 0.5}, "verdict": "wrong"},
            "mosaic": {"attention_bf16": {"passed": True, "rel_err": 1e-3}}}  # stopped before its verdict
    assert gpu_check._usable_kernels(hung) == ["triton"]
    context = gpu_check._context({"parts": {"smoke": {"result": hung},
                                            "ceilings": {"result": {"copy_gb_s": 4000.0, "bf16_tflop_s": 700.0}}}})
    assert context == {"usable_kernels": ["triton"], "ceilings": {"copy_gb_s": 4000.0, "bf16_tflop_s": 700.0}}


def test_the_report_says_which_targets_are_met():
    decode = [dict(kernel="triton", kv_dtype=kv, batch=64, context=4096, kv_splits=1, pallas_ms=1.0, gb_s=1.0,
                   frac_copy=frac, **({"fp8_speedup": 1.7} if kv == "fp8" else {}))
              for kv, frac in (("bf16", 0.85), ("fp8", 0.82))]
    decode.append(dict(kernel="triton", kv_dtype="bf16", batch=8, context=4096, kv_splits=4, pallas_ms=1.0, gb_s=1.0,
                       frac_copy=0.3))  # outside the targets' region
    results = {"parts": {
        "decode": {"status": "ok", "seconds": 1, "result": {"rows": decode}},
        "moe": {"status": "ok", "seconds": 1, "result": {"rows": [dict(
            shape="qwen3-30b-a3b", kernel="mosaic", tokens=1024, pallas_ms=1.0, tflop_s=400.0, frac_dense=0.55,
            ragged_dot_ms=3.0, ragged_dot_frac_dense=0.2, rel_err=1e-3)]}},
        "e2e": {"status": "ok", "seconds": 1, "result": {"batch1": dict(fraction_of_hbm_floor=0.9, tpot_ms=3.7,
                                                                        hbm_floor_ms=3.3),
                                                         "throughput": {"output_tok_s": 12000.0}}},
        "e2e_peer": {"status": "ok", "seconds": 1, "result": {"throughput": {"output_tok_s": 2000.0}}}}}
    met = {target: ok for target, _, ok in gpu_report.targets(results)}
    assert met == {
        "triton decode attention >= 80% of copy bandwidth (batch >= 32, context >= 4k)": True,
        "triton fp8 KV >= 1.6x bf16 there": True,
        "mosaic grouped matmul >= 60% of dense bf16 (Qwen3-MoE shape)": False,
        "8B batch-1 decode >= 85% of the HBM floor": True,
        "offline throughput >= 5x transformers generate": True,
    }
    assert "| mosaic grouped matmul >= 60% of dense bf16 (Qwen3-MoE shape) | 55% (of the roofline, memory-bound here: -) | NO |" in gpu_report.markdown(results)
    assert "unmeasured" in gpu_report.markdown({"parts": {}})


def test_report_judges_the_deepseek_targets():
    """MLA decode >= 70% of copy bandwidth over the default rows (tuning variants aside); the
    block-FP8 matmul >= 60% of the dense fp8 rate at >= 1024 tokens, by each row's best method."""
    mla = [dict(kernel="triton", kv_dtype=kv, batch=64, context=c, ms=1.0, gb_s=1.0, frac_copy=f)
           for kv, c, f in (("bf16", 4096, 0.75), ("fp8", 32768, 0.65))]
    mla.append(dict(kernel="triton", kv_dtype="bf16", batch=64, context=4096, block_h=16, ms=1.0, gb_s=1.0,
                    frac_copy=0.1))  # a tuning variant: not judged
    fp8 = [dict(shape="expert_up", tokens=1024, k=7168, n=2048, dequantize_ms=1.0, dequantize_frac_fp8=0.4,
                dequantize_rel_err=1e-3, scaled_ms=0.6, scaled_frac_fp8=0.7, scaled_rel_err=2e-2),
           dict(shape="expert_up", tokens=64, k=7168, n=2048, scaled_ms=0.6, scaled_frac_fp8=0.1, scaled_rel_err=2e-2)]
    results = {"parts": {"mla": {"status": "ok", "seconds": 1, "result": {"rows": mla}},
                         "fp8_matmul": {"status": "ok", "seconds": 1, "result": {"rows": fp8}}}}
    met = {target: (measured, ok) for target, measured, ok in gpu_report.targets(results)}
    assert met["triton MLA decode >= 70% of copy bandwidth (DeepSeek-V3, batch 64, 4k and 32k)"] == (
        "65% to 75% over 2 rows", False)
    assert met["block-FP8 matmul >= 60% of the dense fp8 rate (DeepSeek-V3 shapes, >= 1024 tokens)"] == (
        "70% to 70% over 1 rows (best method per row)", True)
    text = gpu_report.markdown(results)
    assert "| triton | bf16 | 64 | 4096 | block_h=16 | 1.000 | 1 | 10% |" in text
    assert "| expert_up | 1024 | 7168 x 2048 | - | 1.000 (40% fp8, 1e-03) | 0.600 (70% fp8, 2e-02) |" in text


@pytest.mark.slow
def test_every_part_runs_at_tiny_sizes(tmp_path):
    """The whole check, tiny, on CPU with the kernels in interpret mode: every part's wiring (the
    transformers peer reports that it has no torch here)."""
    results = gpu_check.run(str(tmp_path), budget=400, tiny=True)
    parts = results["parts"]
    assert [name for name, _ in gpu_check.PLAN] == list(parts)
    assert all(p["status"] == "ok" for p in parts.values()), {n: p["status"] for n, p in parts.items()}
    get = lambda name: parts[name]["result"]  # noqa: E731
    assert get("smoke")["triton"]["verdict"] == "ok"
    assert {r["kernel"] for r in get("decode")["rows"]} == set(gpu_check._usable_kernels(get("smoke")))
    assert all(c["passed"] for c in get("sinks")["check"].values()) and get("sinks")["rows"]
    assert all(c["passed"] for c in get("engine")["cases"])
    assert get("e2e")["batch1"]["output_tokens"] == 8 and get("e2e")["throughput"]["output_tokens"] == 48
    assert get("e2e_peer").get("skipped") or get("e2e_peer")["throughput"]["output_tok_s"] > 0
    assert get("sweep")["summary"]["failed"] == 0


def test_the_mla_part_checks_and_times_each_mla_kernel_at_tiny_sizes(tmp_path):
    """The MLA part in this process, tiny, in interpret mode: the Triton kernel checked against the
    reference and timed on bf16 and fp8 caches; Mosaic GPU, which has no MLA kernel, says so."""
    from jaxserve.benchmarks import gpu_parts

    out = tmp_path / "mla.json"
    assert gpu_parts.main(["mla", "--out", str(out), "--seconds", "60", "--tiny"]) == 0
    result = json.loads(out.read_text())
    assert result["check"]["triton"]["passed"] and "no Mosaic GPU MLA kernel" in result["skipped"]["mosaic"]
    assert [(r["kernel"], r["kv_dtype"]) for r in result["rows"]] == [("triton", "bf16"), ("triton", "fp8")]
    assert all(r["frac_copy"] > 0 for r in result["rows"])


def test_report_judges_the_attention_sinks_target():
    """Sinks at most 5% slower than the same kernel without them, over every row (gpt-oss-120b)."""
    rows = [dict(kernel="triton", batch=64, context=4096, window=w, plain_ms=1.0, sinks_ms=s, slowdown=s, gb_s=1.0,
                 frac_copy=0.5) for w, s in ((128, 1.02), (None, 1.08))]
    rows.append(dict(kernel="mosaic", batch=64, context=4096, window=128, error="RuntimeError: no"))
    results = {"parts": {"sinks": {"status": "ok", "seconds": 1, "result": {
        "rows": rows, "check": {"triton": {"rel_err": 3e-3, "passed": True}}}}}}
    met = {target: (measured, ok) for target, measured, ok in gpu_report.targets(results)}
    assert met["triton attention with sinks <= 5% slower than without (gpt-oss-120b decode, 4k)"] == (
        "+2.0% to +8.0% over 2 rows", False)
    assert not any(target.startswith("mosaic attention with sinks") for target in met)
    text = gpu_report.markdown(results)
    assert "| triton | 64 | 4096 | none | 1.000 | 1.080 | +8.0% | 1 | 50% |" in text
    assert "| mosaic | 64 | 4096 | 128 | failed: RuntimeError: no |" in text and "triton: ok 3.0e-03" in text


def test_report_judges_the_mxfp4_grouped_matmul_against_bf16():
    rows = [dict(tokens=64, rows=256, mxfp4_triton_ms=1.0, bf16_triton_ms=0.7, mxfp4_speed_of_bf16=0.7),
            dict(tokens=512, rows=2048, mxfp4_triton_ms=2.0, bf16_triton_ms=1.0, mxfp4_speed_of_bf16=0.5),
            dict(tokens=4096, rows=16384, mxfp4_triton_error="RuntimeError: boom")]
    results = {"parts": {"mxfp4_moe": {"status": "ok", "seconds": 1, "result": {"rows": rows}}}}
    met = {target: (measured, ok) for target, measured, ok in gpu_report.targets(results)}
    assert met["MXFP4 grouped matmul >= 60% of the bf16 grouped matmul's speed (gpt-oss-120b experts)"] == (
        "0.50x to 0.70x over 2 token counts", False)
    text = gpu_report.markdown(results)
    assert "| 64 | 1.000 | 0.700 | 0.70 |" in text and "| 4096 | failed: RuntimeError: boom | - | - |" in text
