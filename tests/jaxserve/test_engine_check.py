"""The engine check of `make gpu-check`, on CPU: the Pallas kernels run inside real engine steps in
interpret mode and must agree with the reference engine; a kernel that is slightly wrong fails."""

from __future__ import annotations

import json

import pytest

import pallas_kernels.moe as moe_kernels
import pallas_kernels.triton_paged_attention as attention_kernels
from jaxserve.benchmarks import engine_check
from pallas_kernels.interpret import interpret_mode


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the engine's calls (traces) of the two Pallas kernels."""
    calls = {"attention": 0, "moe": 0}

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            assert kwargs.get("interpret"), "the kernel runs compiled on CPU: interpret_mode() was lost"
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(attention_kernels, "ragged_paged_attention_triton",
                        counted("attention", attention_kernels.ragged_paged_attention_triton))
    monkeypatch.setattr(moe_kernels, "moe_ffn_pallas", counted("moe", moe_kernels.moe_ffn_pallas))
    return calls


@pytest.mark.slow
def test_the_engine_check_runs_the_kernels_in_the_engine_and_they_agree(tmp_path, kernel_calls):
    status = engine_check.main(["--tiny", "--json", str(tmp_path / "e.json"), "--markdown", str(tmp_path / "e.md")])
    result = json.loads((tmp_path / "e.json").read_text())
    assert status == 0 and result["interpret"] and result["backend"] == "cpu"
    assert [c["case"] for c in result["agreement"]] == list(engine_check.CASES)
    for case in result["agreement"]:
        # float32 on both sides: the kernels differ from the reference only in summation order
        assert case["passed"] and case["positions"] == 16 and case["dtype"] == "float32", case
        assert case["agreement"] >= 0.75 and case["max_logprob_diff"] < 1e-4, case
    assert kernel_calls["attention"] > 0 and kernel_calls["moe"] > 0
    assert "| mixtral-8x2 | 16 |" in (tmp_path / "e.md").read_text()


def test_a_slightly_wrong_attention_kernel_fails_the_check(monkeypatch):
    """Negative control: the kernel's output scaled by 1.02 (a wrong softmax scale would look so)."""
    kernel = attention_kernels.ragged_paged_attention_triton
    monkeypatch.setattr(attention_kernels, "ragged_paged_attention_triton",
                        lambda *args, **kwargs: kernel(*args, **kwargs) * 1.02)
    with interpret_mode():
        case = engine_check.run_case("llama-gqa3", tiny=True)
    assert not case["passed"] and case["max_logprob_diff"] > case["tolerance"], case


@pytest.mark.slow
def test_in_bfloat16_correct_kernels_pass_and_a_two_percent_error_fails(monkeypatch):
    """The dtype a GPU runs: the check's real (not tiny) GQA-3 model in bfloat16 at the calibrated
    weight scale. The Triton kernel (interpret mode) passes within the bf16 tolerance; the same
    kernel with its output 2% off fails it (measured on CPU: drift 0.031 against 0.122 with jax 0.12,
    0.016 against 0.12 with jax 0.11: XLA:CPU's bf16 rounding moved, the 2% error did not)."""
    with interpret_mode():
        good = engine_check.run_case("llama-gqa3", tiny=False, backend="triton", dtype="bfloat16")
        kernel = attention_kernels.ragged_paged_attention_triton
        monkeypatch.setattr(attention_kernels, "ragged_paged_attention_triton",
                            lambda *args, **kwargs: kernel(*args, **kwargs) * 1.02)
        bad = engine_check.run_case("llama-gqa3", tiny=False, backend="triton", dtype="bfloat16")
    assert good["dtype"] == "bfloat16" and good["tolerance"] == engine_check.TOLERANCE["bfloat16"]
    assert good["kernels"]["attention"]["backend"] == "triton"
    assert good["passed"] and good["max_logprob_diff"] < 0.75 * good["tolerance"], good
    assert not bad["passed"] and bad["max_logprob_diff"] > 1.5 * bad["tolerance"], bad


def test_compare_explains_only_near_ties():
    class Output:
        def __init__(self, tokens, logprobs):
            self.outputs = [type("C", (), {"token_ids": tokens, "logprobs": logprobs})()]

    lp = lambda **v: {int(k[1:]): type("L", (), {"logprob": x})() for k, x in v.items()}  # noqa: E731
    reference = [Output([5, 6], [lp(t5=-0.1, t7=-3.0), lp(t6=-0.70, t8=-0.7003)])]
    flipped_near_tie = [Output([5, 8], [lp(t5=-0.1002, t7=-3.0), lp(t8=-0.70, t6=-0.7003)])]
    result = engine_check.compare(reference, flipped_near_tie, tolerance=1e-3)
    assert result["passed"] and result["agreeing"] == 1 and result["divergences"][0]["step"] == 1
    assert result["max_logprob_diff"] == pytest.approx(2e-4)
    assert not engine_check.compare(reference, flipped_near_tie, tolerance=1e-4)["passed"]  # drift too large
    flipped_clear = [Output([7, 6], [lp(t7=-0.1, t5=-3.0), lp(t6=-0.7)])]
    result = engine_check.compare(reference, flipped_clear, tolerance=1e-3)
    assert not result["passed"] and result["unexplained"][0]["margin"] == pytest.approx(2.9)


def test_the_throughput_part_reports_against_the_roofline():
    """The GPU check's throughput part, wired end to end on a small model (the 1B one is GPU-sized)."""
    hf = {**engine_check.LLAMA_1B, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
    result = engine_check.run_throughput(hf, num_prompts=4, output_len=4, name="small",
                                         kv_cache_bytes=64 << 20)
    assert result["num_requests"] == 4 and result["output_tokens"] == 16
    assert result["compilations_during_run"] == 0 and result["roofline"]["decode_roofline_floor_s"] > 0
    text = engine_check.markdown({"device": "cpu", "backend": "cpu", "interpret": True, "agreement": [],
                                  "throughput": result})
    assert "Throughput, small: " in text and "tok/s over 4 requests" in text
