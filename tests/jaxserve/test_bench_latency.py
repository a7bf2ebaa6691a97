"""`jaxserve bench latency` on a tiny random-weight model: one row per prompt length, each with its
TTFT and time per output token beside floors computed from the weights, the KV per position and
the ceilings measured in the run; bad lengths are refused naming the field."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from jaxserve.benchmarks import latency
from jaxserve.benchmarks.throughput import model_flops
from jaxserve.config import EngineConfig
from jaxserve.llm import LLM
from tests.engine_utils import tiny_loaded_model


@pytest.fixture(scope="module")
def llm():
    config = EngineConfig(model="tiny", block_size=4, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=128,
                          token_buckets=(16, 64), request_buckets=(4,), kv_cache_memory_bytes=1 << 20)
    return LLM(config=config, loaded=tiny_loaded_model())


def test_bench_latency_reports_each_length_beside_its_floor(llm, tmp_path, capsys):
    args = argparse.Namespace(prompt_lens="5,40", output_len=6, repeats=2, seed=0, json=str(tmp_path / "r.json"))
    assert latency.run(args, llm=llm) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert [r["prompt_len"] for r in result["lengths"]] == [5, 40]
    bandwidth = result["roofline"]["copy_bandwidth_gb_s"] * 1e9
    matmul = result["roofline"]["matmul_gflop_s"] * 1e9
    weights, per_position = result["weight_bytes"], result["kv_bytes_per_position"]
    assert per_position == 2 * 2 * 2 * 16 * 4  # tiny Llama: layers, K and V, KV heads, head_dim, f32
    for row in result["lengths"]:
        n = row["prompt_len"]
        floor = np.mean([(weights + p * per_position) / bandwidth for p in range(n + 1, n + 6)])
        assert row["tpot_floor_ms"] == pytest.approx(floor * 1e3)
        first = max(model_flops(llm.engine.model_config, n, 1, n * (n + 1) // 2) / matmul, weights / bandwidth)
        assert row["ttft_floor_ms"] == pytest.approx(first * 1e3)
        assert row["ttft_ms"] > 0 and row["tpot_ms"] > 0
        assert row["tpot_fraction_of_floor"] == pytest.approx(row["tpot_floor_ms"] / row["tpot_ms"])
    assert "time per output token" in capsys.readouterr().out


def test_bench_latency_refuses_lengths_past_max_model_len(llm):
    args = argparse.Namespace(prompt_lens="120", output_len=16, repeats=1, seed=0, json=None)
    with pytest.raises(ValueError, match="prompt_lens"):
        latency.run(args, llm=llm)
