"""`LLM.generate`'s progress bar comes from `tqdm.auto`, so a notebook shows a widget and a
terminal a text bar; `use_tqdm=False` shows none."""

from __future__ import annotations

import sys
import types

from jaxserve.llm import LLM
from jaxserve.sampling_params import SamplingParams
from tests.engine_utils import tiny_engine_config, tiny_loaded_model


class _RecordingBar:
    made: list["_RecordingBar"] = []

    def __init__(self, total, desc):
        self.total, self.desc, self.count, self.closed = total, desc, 0, False
        _RecordingBar.made.append(self)

    def update(self, n=1):
        self.count += n

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.closed = True


def test_generate_counts_finished_requests_on_a_tqdm_auto_bar(monkeypatch):
    # Only `tqdm.auto` is replaced: a bar from plain `tqdm` would not be recorded.
    monkeypatch.setitem(sys.modules, "tqdm.auto", types.SimpleNamespace(tqdm=_RecordingBar))
    _RecordingBar.made.clear()
    llm = LLM(config=tiny_engine_config(), loaded=tiny_loaded_model())
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    outputs = llm.generate([[4, 5, 6], [7, 8], [9]], params)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [3, 3, 3]
    (bar,) = _RecordingBar.made
    assert (bar.total, bar.desc, bar.count, bar.closed) == (3, "generate", 3, True)

    llm.generate([[4, 5, 6]], params, use_tqdm=False)
    assert len(_RecordingBar.made) == 1
