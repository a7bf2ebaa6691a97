"""Speculative decoding from the command line and in the Prometheus export."""

import types

from prometheus_client import generate_latest

from jaxserve.engine_flags import engine_config_from_args
from jaxserve.sampling_params import SamplingParams
from jaxserve.spec_decode.config import SpeculativeConfig
from server.main import build_parser
from server.metrics import engine_registry
from tests.engine_utils import tiny_engine

SPEC = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 2}'


def test_speculative_config_flag_on_serve_and_bench():
    for argv in (["serve", "--speculative-config", SPEC],
                 ["bench", "throughput", "--dataset", "copy", "--speculative-config", SPEC],
                 ["bench", "speculative", "--speculative-config", SPEC]):
        args = build_parser(argv[0]).parse_args(argv)
        assert engine_config_from_args(args).speculative_config == SpeculativeConfig("ngram", 3, 1, 2)


def test_prometheus_exports_spec_decode_counters():
    engine = tiny_engine(speculative_config=SPEC)
    prompt = [5, 6, 7, 8] * 4
    engine.add_request("a", prompt, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    llm = types.SimpleNamespace(engine=engine, num_running=0, num_waiting=0, kv_cache_usage=0.0)
    text = generate_latest(engine_registry(llm, "tiny")).decode()
    m = engine.metrics
    assert m.spec_decode_num_drafts > 0
    assert f'jaxserve:spec_decode_num_drafts_total{{model_name="tiny"}} {float(m.spec_decode_num_drafts)}' in text
    assert (f'jaxserve:spec_decode_num_accepted_tokens_total{{model_name="tiny"}} '
            f'{float(m.spec_decode_num_accepted_tokens)}') in text
    assert 'jaxserve:spec_decode_num_accepted_tokens_per_pos_total{model_name="tiny",position="0"}' in text
