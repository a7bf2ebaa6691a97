"""`jaxserve bench structured` end to end on a tiny random-weight model with a byte-level vocabulary:
both runs are the same workload (every request to output_len), the constrained one masked every
step, and the report's ratios are the ratios of its two runs."""

from __future__ import annotations

import argparse
import dataclasses
import json

from jaxserve.benchmarks import structured
from jaxserve.config import EngineConfig
from jaxserve.llm import LLM
from server.main import build_parser
from tests.engine_utils import tiny_config, tiny_loaded_model
from tests.jaxserve.test_structured_output import TINY_VOCAB, byte_level_tokenizer


def test_bench_structured_compares_the_same_workload(tmp_path, capsys):
    loaded = dataclasses.replace(tiny_loaded_model(tiny_config(vocab_size=TINY_VOCAB)),
                                 tokenizer=byte_level_tokenizer())
    config = EngineConfig(model="tiny", block_size=4, max_num_seqs=8, max_num_batched_tokens=256,
                          max_model_len=128, token_buckets=(16, 256), request_buckets=(8,),
                          kv_cache_memory_bytes=1 << 20)
    llm = LLM(config=config, loaded=loaded)
    args = argparse.Namespace(num_requests=6, output_len=12, min_records=50, rounds=1, seed=0,
                              json=str(tmp_path / "r.json"))
    assert structured.run(args, llm=llm) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    free, held = result["unconstrained"], result["constrained"]
    assert free["output_tokens"] == held["output_tokens"] == 6 * 12
    assert free["finish_reasons"] == held["finish_reasons"] == ["length"]
    assert free["masked_steps"] == free["steps_that_waited"] == 0
    assert held["masked_rows"] == 6 * 12  # every sampled token was masked
    assert held["steps_that_waited"] > 0 and held["mask_fill_ms_per_step"] > 0
    assert result["throughput_ratio"] == held["output_tok_s"] / free["output_tok_s"]
    assert result["compilations_during_run"] == 0
    assert "throughput ratio" in capsys.readouterr().out
    assert build_parser("bench").parse_args(["bench", "structured", "--num-requests", "4"]).num_requests == 4
