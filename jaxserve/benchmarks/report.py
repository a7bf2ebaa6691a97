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
