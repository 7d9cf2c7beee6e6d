"""File helpers every stage shares: content hashes and writes that never leave a half-written file behind.

Shards, downloaded books, tokenizer files, checkpoints and run configs all go through these, so "a good file is
never replaced by a partial one" holds in one place, and so does its other half: a write that fails (full disk,
a directory in the way, Ctrl-C) takes its temporary file with it instead of leaving it beside the target.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

HASH_CHUNK_BYTES = 1 << 20  # read files in 1 MB pieces: shards and checkpoints can be larger than memory wants


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def replaced_on_success(path: Path, temporary: Path | None = None) -> Iterator[Path]:
    """Yield a temporary path to write (default `<name>.tmp` beside `path`); rename it over `path` when the block
    succeeds, delete it when anything fails (including the rename itself and KeyboardInterrupt)."""
    temporary = temporary or path.with_name(f"{path.name}.tmp")
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):  # never hide the error that got us here
            temporary.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: bytes) -> None:
    """Write to `<name>.tmp`, fsync, then rename over `path`: readers see the old file or the new one, never half."""
    with replaced_on_success(path) as temporary, open(temporary, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def free_space(directory: Path) -> str:
    """`412.0 MB free`: what a message about a failed write says, so a full disk is recognised at once."""
    try:
        return f"{shutil.disk_usage(directory).free / 1e6:,.1f} MB free"
    except OSError:
        return "free space unknown"


def make_directory(path: Path) -> None:
    """mkdir -p, saying which path is a file when one stands in the way (mkdir itself only says "File exists")."""
    blocking = next((part for part in (path, *path.parents) if part.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"{blocking} is a file, not a directory")
    path.mkdir(parents=True, exist_ok=True)
