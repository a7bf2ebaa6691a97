"""Options that hold a JSON object, given as a dict or as its JSON text (vLLM accepts both for
`speculative_config` and for a structured-output schema)."""

from __future__ import annotations

import json
from typing import Any


def json_object(value: Any, field: str) -> dict:
    """`value` as a dict; ValueError naming `field` when it is neither a dict nor a JSON object's text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"{field}: must be a JSON object, got text that is not JSON ({err.msg} at "
                             f"position {err.pos})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{field}: must be a dict or a JSON object's text, got {type(value).__name__}")
    return value
