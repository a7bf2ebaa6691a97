"""How outputs read: a short `repr` (token lists and long texts elided) and an HTML table for
notebooks (prompt, each completion's text, finish reason, token counts, TTFT and e2e latency).

The functions read the output dataclasses by attribute; jaxserve/outputs.py calls them from its
`__repr__` and `_repr_html_` methods."""

from __future__ import annotations

import html
from typing import Any

MAX_IDS = 8  # token ids shown before the list is elided
MAX_CHARS = 200  # characters of text shown in a repr before it is elided


def short_ids(ids: list[int]) -> str:
    """`[1, 2, 3]`, or the first ids and the count once longer than MAX_IDS."""
    if len(ids) <= MAX_IDS:
        return repr(list(ids))
    return "[" + ", ".join(map(str, ids[:MAX_IDS - 2])) + f", ... {len(ids)} ids]"


def short_text(text: str | None) -> str:
    if text is None or len(text) <= MAX_CHARS:
        return repr(text)
    return f"{text[:MAX_CHARS]!r}... ({len(text)} chars)"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def completion_repr(c: Any) -> str:
    fields = [f"index={c.index}", f"text={short_text(c.text)}", f"token_ids={short_ids(c.token_ids)}",
              f"finish_reason={c.finish_reason!r}"]
    if c.stop_reason is not None:
        fields.append(f"stop_reason={c.stop_reason!r}")
    if c.logprobs is not None:
        fields.append(f"logprobs=<{len(c.logprobs)} positions>")
    return f"CompletionOutput({', '.join(fields)})"


def request_repr(r: Any) -> str:
    fields = [f"request_id={r.request_id!r}", f"prompt={short_text(r.prompt)}",
              f"prompt_token_ids={short_ids(r.prompt_token_ids)}",
              f"outputs=[{', '.join(completion_repr(c) for c in r.outputs)}]", f"finished={r.finished}"]
    if r.num_cached_tokens:
        fields.append(f"num_cached_tokens={r.num_cached_tokens}")
    if r.prompt_logprobs is not None:
        fields.append(f"prompt_logprobs=<{len(r.prompt_logprobs)} positions>")
    if r.metrics is not None:
        fields.append(f"metrics=<ttft {duration(r.metrics.ttft)}, e2e {duration(r.metrics.e2e)}>")
    return f"RequestOutput({', '.join(fields)})"


_TABLE = '<table style="border-collapse: collapse">{}</table>'
_CELL = 'style="text-align: left; vertical-align: top; padding: 2px 8px"'
_TEXT_CELL = 'style="text-align: left; vertical-align: top; padding: 2px 8px; white-space: pre-wrap"'


def _row(label: str, text: str, finish: str, tokens: str) -> str:
    """One table row; every argument is already escaped."""
    return (f"<tr><th {_CELL}>{label}</th><td {_TEXT_CELL}>{text}</td>"
            f"<td {_CELL}>{finish}</td><td {_CELL}>{tokens}</td></tr>")


def _header() -> str:
    return _row("", "text", "finish reason", "tokens").replace("<td", "<th").replace("</td>", "</th>")


def _finish(c: Any) -> str:
    if c.finish_reason is None:
        return "<i>running</i>"
    stop = f" ({c.stop_reason!r})" if c.stop_reason is not None else ""
    return html.escape(c.finish_reason + stop)


def _completion_row(c: Any) -> str:
    return _row(f"output {c.index}", html.escape(c.text), _finish(c), str(len(c.token_ids)))


def completion_html(c: Any) -> str:
    return _TABLE.format(_header() + _completion_row(c))


def request_html(r: Any) -> str:
    if r.prompt is not None:
        prompt = html.escape(r.prompt)
    else:
        prompt = f"<i>token ids {html.escape(short_ids(r.prompt_token_ids))}</i>"
    cached = f" ({r.num_cached_tokens} cached)" if r.num_cached_tokens else ""
    rows = [_header(), _row("prompt", prompt, "", f"{len(r.prompt_token_ids)}{cached}")]
    rows += [_completion_row(c) for c in r.outputs]
    summary = [f"<b>RequestOutput</b> {html.escape(repr(r.request_id))}",
               "finished" if r.finished else "<i>running</i>"]
    if r.metrics is not None:
        summary += [f"TTFT {duration(r.metrics.ttft)}", f"e2e {duration(r.metrics.e2e)}"]
    return f"<div>{' &middot; '.join(summary)}</div>" + _TABLE.format("".join(rows))
