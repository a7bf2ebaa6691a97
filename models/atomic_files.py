"""Writing small files so that a reader never sees half of one: the text goes to a temporary
file in the same folder, which then replaces the target in one rename. A crash or a full disk
leaves the old file (or none), never a truncated config that fails with a bare JSONDecodeError.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"  # unique: writers may race
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, value, **dump_kwargs) -> None:
    atomic_write_text(path, json.dumps(value, **dump_kwargs))
