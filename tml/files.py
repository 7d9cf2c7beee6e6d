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
    with replaced_on_success(path) as temporary:
        write_synced(temporary, data)


def write_synced(path: Path, data: bytes) -> None:
    """Write `data` and fsync it: on disk before a rename publishes it."""
    with open(path, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def existing_ancestor(path: Path) -> Path | None:
    """`path` itself or its nearest parent that exists: where a directory about to be made would live."""
    return next((part for part in (path, *path.parents) if part.exists()), None)


def free_bytes(directory: Path) -> int | None:
    """Free bytes on the disk of `directory` (or of its nearest existing parent); None when unknown."""
    try:
        return shutil.disk_usage(existing_ancestor(Path(directory)) or ".").free
    except OSError:
        return None


def free_space(directory: Path) -> str:
    """`412.0 MB free` on the disk of `directory` (or of its nearest existing parent)."""
    free = free_bytes(directory)
    return "free space unknown" if free is None else f"{free / 1e6:,.1f} MB free"


def write_failure(error: BaseException, directory: Path) -> str:
    """Why a write into `directory` failed, and the disk's free space, so a full disk is recognised at once:
    `No space left on device (0.3 MB free)`. torch.save reports a full disk as a RuntimeError from its zip writer,
    whose first line is given instead of errno's text."""
    if isinstance(error, OSError) and error.strerror:
        reason = error.strerror
    else:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else "write failed"
        reason = f"{type(error).__name__}: {first_line}"
    return f"{reason} ({free_space(directory)})"


def what_blocks_directory(path: Path) -> str | None:
    """Why `path` cannot be made a directory, when a file or a link to nothing stands where it or a parent would
    be (mkdir itself only says "File exists"); None when nothing does."""
    blocking = next((part for part in (path, *path.parents) if os.path.lexists(part)), None)
    if blocking is None or blocking.is_dir():
        return None
    if blocking.is_symlink() and not blocking.exists():
        return f"{blocking} is a link to {os.readlink(blocking)}, which does not exist"
    return f"{blocking} is a file, not a directory"


def make_directory(path: Path) -> None:
    """mkdir -p, saying which path is a file (or a link to nothing) when one stands in the way."""
    if (reason := what_blocks_directory(path)) is not None:
        raise NotADirectoryError(errno.ENOTDIR, reason)
    path.mkdir(parents=True, exist_ok=True)


def fresh_directory(path: Path) -> None:
    """An empty directory at `path`: one left by a write that was killed is removed first."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
