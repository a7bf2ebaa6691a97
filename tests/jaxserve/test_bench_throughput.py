"""`jaxserve bench throughput` end to end on a tiny random-weight model: the report's counts and
roofline fields agree with the workload, and serving compiles nothing new."""

from __future__ import annotations

import argparse
import json

from jaxserve.benchmarks import throughput
from jaxserve.benchmarks.throughput import make_prompts, model_flops
from jaxserve.config import EngineConfig
from jaxserve.llm import LLM
from tests.engine_utils import tiny_loaded_model


def test_bench_throughput_reports_the_workload_and_its_roofline(tmp_path, capsys):
    loaded = tiny_loaded_model()
    config = EngineConfig(model="tiny", block_size=4, max_num_seqs=8, max_num_batched_tokens=64,
                          max_model_len=128, token_buckets=(16, 64), request_buckets=(8,),
                          kv_cache_memory_bytes=1 << 20)
    llm = LLM(config=config, loaded=loaded)
    args = argparse.Namespace(num_prompts=6, min_input_len=3, max_input_len=40, output_len=5, seed=0,
                              json=str(tmp_path / "r.json"))
    assert throughput.run(args, llm=llm) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    prompts = make_prompts(6, 3, 40, loaded.config.vocab_size, 0)
    assert result["num_requests"] == 6
    assert result["prompt_tokens"] == sum(map(len, prompts))
    assert result["output_tokens"] == 6 * 5  # EOS ignored: every request runs to output_len
    assert result["compilations_during_run"] == 0  # every bucket compiled at warm-up
    roof = result["roofline"]
    assert roof["flops_decode"] == model_flops(
        loaded.config, 6 * 4, 6 * 4, sum(sum(len(p) + i for i in range(1, 5)) for p in prompts))
    assert roof["decode_roofline_floor_s"] == max(roof["decode_compute_floor_s"], roof["decode_memory_floor_s"])
    assert roof["matmul_gflop_s"] > 0 and roof["copy_bandwidth_gb_s"] > 0
    assert 0 < roof["fraction_of_compute_floor"]
    assert "output throughput" in capsys.readouterr().out


def test_bench_throughput_and_speculative_report_acceptance(tmp_path, capsys):
    from jaxserve.benchmarks import spec_decode

    loaded = tiny_loaded_model()
    options = dict(model="tiny", block_size=4, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=128,
                   token_buckets=(16, 64), request_buckets=(8,), kv_cache_memory_bytes=1 << 20)
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 2}
    llms = {"plain": LLM(config=EngineConfig(**options), loaded=loaded),
            "spec": LLM(config=EngineConfig(**options, speculative_config=spec), loaded=loaded)}
    args = argparse.Namespace(num_prompts=4, min_input_len=3, max_input_len=20, output_len=12, seed=0,
                              json=str(tmp_path / "t.json"))
    assert throughput.run(args, llm=llms["spec"]) == 0
    result = json.loads((tmp_path / "t.json").read_text())
    assert result["compilations_during_run"] == 0  # the verifier's programs compiled at warm-up
    assert result["output_tokens"] == 4 * 12
    assert result["speculative"]["num_draft_tokens"] >= result["speculative"]["num_accepted_tokens"] >= 0
    assert "mean accepted length" in capsys.readouterr().out

    args = argparse.Namespace(batch_sizes="1,2", workloads="random", batches=1, output_len=8, repeats=1, seed=0,
                              min_input_len=3, max_input_len=20,
                              json=str(tmp_path / "s.json"))
    assert spec_decode.run(args, llms=llms) == 0
    rows = json.loads((tmp_path / "s.json").read_text())["rows"]
    assert [(r["workload"], r["batch"], r["output_tokens"]) for r in rows] == [("random", 1, 8), ("random", 2, 16)]
    assert all(r["plain_tok_s"] > 0 and r["spec_tok_s"] > 0 for r in rows)
