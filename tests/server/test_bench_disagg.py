"""`jaxserve bench disagg` end to end on the tiny model: a colocated server, then router + prefill
+ decode workers (tests/server/disagg_worker.py), decode streams under long prompts; every figure
present and consistent with its definition, the JSON written, every process gone afterwards."""

from __future__ import annotations

import json
import os

import pytest

from server.main import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_bench_disagg_tiny_runs_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "disagg.json"
    code = main(["bench", "disagg", "--worker-command", "{python} -m tests.server.disagg_worker {role} 0",
                 "--prefill-len", "64", "--num-decode", "2", "--decode-prompt-len", "8", "--decode-output-len", "8",
                 "--skip-host-tier", "--timeout-s", "120", "--json", str(out)])
    assert code == 0
    r = json.loads(out.read_text())
    assert r["benchmark"] == "disagg" and "host_tier" not in r
    assert r["pinned"] == ({0, 1} <= os.sched_getaffinity(0))
    for name in ("colocated", "disaggregated"):
        m = r[name]
        assert m["num_itls"] == 2 * 7, f"{name}: 2 streams of 8 tokens, one chunk each (stream_interval 1)"
        assert 0 < m["itl_ms"]["p50"] <= m["itl_ms"]["p99"]
        assert m["long_prefills_done"] >= 1
    assert r["itl_p99_ratio_disagg_over_colocated"] == pytest.approx(
        r["disaggregated"]["itl_ms"]["p99"] / r["colocated"]["itl_ms"]["p99"])
    assert "disaggregated: decode ITL p50 / p99" in capsys.readouterr().out


def test_bench_disagg_rejects_bad_values_naming_the_field():
    with pytest.raises(ValueError, match="decode_output_len must be >= 2"):
        main(["bench", "disagg", "--decode-output-len", "1"])
    with pytest.raises(ValueError, match="prefill_len must be >= 1"):
        main(["bench", "disagg", "--prefill-len", "0"])
