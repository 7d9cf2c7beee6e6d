"""File helpers every stage shares: content hashes and writes that never leave a half-written file behind.

Shards, downloaded books, tokenizer files, checkpoints and run configs all go through these, so "a good file is
never replaced by a partial one" holds in one place.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

HASH_CHUNK_BYTES = 1 << 20  # read files in 1 MB pieces: shards and checkpoints can be larger than memory wants


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write to `<name>.tmp`, fsync, then rename over `path`: readers see the old file or the new one, never half."""
    temporary = path.with_name(f"{path.name}.tmp")
    with open(temporary, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
