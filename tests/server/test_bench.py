"""`jaxserve bench serve` against a real server: every request completes, the figures follow
their definitions, the JSON and the sweep's plot are written."""

from __future__ import annotations

import json

import pytest

from server.bench import RequestResult, parse_slos, summarize
from server.main import main
from tests.server.test_generate import scrape


def test_bench_serve_sweep_writes_json_and_plot(server, tmp_path, capsys):
    out, png = tmp_path / "serve.json", tmp_path / "sweep.png"
    before = scrape(server)
    code = main(["bench", "serve", "--target", server.target, "--num-prompts", "12", "--input-len", "8",
                 "--output-len", "6", "--request-rate", "50,inf", "--max-concurrency", "8",
                 "--dataset", "shared-prefix", "--prefix-len", "16", "--num-prefixes", "2",
                 "--goodput", "e2el:60000", "--json", str(out), "--plot", str(png)])
    assert code == 0
    sweep = json.loads(out.read_text())
    assert [r["config"]["request_rate"] for r in sweep] == [50.0, float("inf")]
    for r in sweep:
        assert r["benchmark"] == "serve" and r["model"] == "tiny" and r["device"].startswith("cpu")
        assert (r["completed"], r["failed"], r["output_tokens"]) == (12, 0, 72)
        assert r["goodput"] == pytest.approx(r["request_throughput"])  # a 60 s SLO: every request meets it
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
            assert set(r[key]) == {"p50", "p90", "p99", "mean"}
        assert r["ttft_ms"]["p50"] <= r["e2el_ms"]["p50"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    after = scrape(server)
    # 24 prompts of a 16-token prefix shared in 2 groups: all but the first of each group hit it.
    hits = after["jaxserve:prefix_cache_hits_total"] - before["jaxserve:prefix_cache_hits_total"]
    assert hits >= (24 - 2 * 2) * 16 * 0.5
    assert after["jaxserve:prefix_cache_queries_total"] - before["jaxserve:prefix_cache_queries_total"] >= 24 * 24
    assert "TTFT p50 / p90 / p99" in capsys.readouterr().out


def test_summary_follows_the_definitions():
    # Sent at 0; chunks at 1.0 (2 tokens), 1.5 (1 token), 3.0 (1 token): 4 tokens.
    fast = RequestResult(True, 0.0, [1.0, 1.5, 3.0], 4)
    slow = RequestResult(True, 0.0, [5.0], 1)
    failed = RequestResult(False, 0.0, [], 0, "UNAVAILABLE")
    r = summarize([fast, slow, failed], duration=10.0, slos=parse_slos(["ttft:2000"]))
    assert (r["completed"], r["failed"], r["output_tokens"]) == (2, 1, 5)
    assert r["ttft_ms"]["p50"] == pytest.approx(3000.0)  # median of 1000 and 5000
    assert r["tpot_ms"]["mean"] == pytest.approx(2000.0 / 3)  # (3.0 - 1.0) / (4 - 1); the 1-token request has none
    assert r["itl_ms"]["p50"] == pytest.approx(1000.0)  # gaps 500 and 1500
    assert r["goodput"] == pytest.approx(0.1)  # only `fast` has TTFT <= 2 s
    assert r["messages_per_s"] == pytest.approx(0.4)
    with pytest.raises(ValueError, match="--goodput"):
        parse_slos(["latency:5"])
