"""How outputs read: a short repr with long token lists elided, and escaped HTML for notebooks."""

from __future__ import annotations

import html.parser

from jaxserve.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput


def _output(text=" Paris <b>&</b>\nnext line", prompt="1 < 2 & \"x\"", prompt_ids=None, finished=True):
    completion = CompletionOutput(index=0, text=text, token_ids=list(range(100, 140)),
                                  finish_reason="stop" if finished else None, stop_reason="\n\n" if finished else None,
                                  logprobs=[{7: Logprob(-0.5, 1, "x")}] * 40)
    metrics = RequestMetrics(arrival_time=10.0, first_token_time=10.25, finished_time=12.5 if finished else None)
    return RequestOutput(request_id="r<1>", prompt=prompt, prompt_token_ids=prompt_ids or list(range(30)),
                         outputs=[completion], finished=finished, metrics=metrics, num_cached_tokens=16)


class _Cells(html.parser.HTMLParser):
    """The text of every table cell, and every tag seen (to catch unescaped markup)."""

    def __init__(self, markup: str):
        super().__init__()
        self.cells, self.tags, self._cell = [], [], None
        self.feed(markup)

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.cells.append(self._cell)
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def test_repr_elides_long_token_lists_and_shows_timing():
    text = repr(_output())
    assert text.startswith("RequestOutput(request_id='r<1>', prompt='1 < 2 & \"x\"', ")
    assert "prompt_token_ids=[0, 1, 2, 3, 4, 5, ... 30 ids]" in text
    assert "token_ids=[100, 101, 102, 103, 104, 105, ... 40 ids]" in text
    assert "finish_reason='stop', stop_reason='\\n\\n', logprobs=<40 positions>" in text
    assert "num_cached_tokens=16" in text and "metrics=<ttft 250.0 ms, e2e 2.50 s>" in text
    assert "139" not in text and "RequestMetrics" not in text  # the tail of the list and the raw timestamps
    assert len(text) < 500


def test_repr_keeps_short_lists_and_elides_long_text():
    out = _output(text="y" * 1000, prompt_ids=[5, 6, 7])
    out.outputs[0].token_ids = [1, 2]
    text = repr(out)
    assert "prompt_token_ids=[5, 6, 7]" in text and "token_ids=[1, 2]" in text
    assert "'" + "y" * 200 + "'... (1000 chars)" in text and "y" * 201 not in text
    assert repr(out.outputs[0]).startswith("CompletionOutput(index=0, text='yyy")


def test_html_shows_prompt_completions_finish_reasons_counts_and_timing_escaped():
    out = _output()
    markup = out._repr_html_()
    page = _Cells(markup)
    # Only the table's own markup: the <b> in the text and the quotes in the prompt arrive as text.
    assert set(page.tags) == {"div", "b", "table", "tr", "th", "td"}
    assert page.tags.count("b") == 1  # the title, not the completion's "<b>"
    rows = [page.cells[i:i + 4] for i in range(0, len(page.cells), 4)]
    assert rows == [["", "text", "finish reason", "tokens"],
                    ["prompt", "1 < 2 & \"x\"", "", "30 (16 cached)"],
                    ["output 0", " Paris <b>&</b>\nnext line", "stop ('\\n\\n')", "40"]]
    assert "TTFT 250.0 ms" in markup and "e2e 2.50 s" in markup and "finished" in markup
    assert "r&lt;1&gt;" in markup


def test_html_of_a_token_id_prompt_and_a_running_request():
    out = _output(prompt=None, finished=False)
    page = _Cells(out._repr_html_())
    assert page.cells[5] == "token ids [0, 1, 2, 3, 4, 5, ... 30 ids]"
    assert page.cells[10] == "running"
    assert "e2e -" in out._repr_html_()
    one = _Cells(out.outputs[0]._repr_html_())
    assert one.cells[4:] == ["output 0", " Paris <b>&</b>\nnext line", "running", "40"]
