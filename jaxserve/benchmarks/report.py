"""How every `jaxserve bench` subcommand reports: a two-column table on stdout, the full result as
JSON when asked."""

from __future__ import annotations

import json


def print_rows(rows: list[tuple[str, str]]) -> None:
    """A two-column table: keys padded to the longest."""
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def report(result: dict, rows: list[tuple[str, str]], json_path: str | None) -> int:
    """Print `rows`, write `result` to `json_path` (when given); the command's exit status."""
    print_rows(rows)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def save_partial(result: dict, markdown, json_path: str | None, markdown_path: str | None) -> None:
    """Write `result` (JSON) and `markdown(result)` where asked. The GPU checks call it after every
    part, so a run cut short by a time limit keeps what it measured."""
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
    if markdown_path:
        with open(markdown_path, "w") as f:
            f.write(markdown(result))
