"""File locks that say who holds them: shared by the run lock (tml/train/run_lock.py) and the shard directory's
preparation lock (tml/data/prepare.py).

The lock is `fcntl.flock` on an open file, so the kernel releases it when the holder exits in any way (a crash,
OOM, SIGKILL): there is never a stale lock to delete by hand. The pid, host and start time written into the file
are only for the message another process prints while it is refused or waits. The file itself stays after
release: deleting it would let a third process lock a new file while a second still holds the old, deleted one.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from datetime import datetime
from pathlib import Path

from tml.files import make_directory

# File systems that cannot flock (Lustre mounted without `-o flock`) answer with one of these; the caller goes on
# unprotected, with a warning, rather than not at all.
NO_FLOCK_ERRNOS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP)
HOLDER_READ_BYTES = 4096  # far more than one holder record


def open_lock_file(path: Path) -> int:
    """The lock file's descriptor, creating the file and its directory. Not inheritable (Python's default): a
    program the holder starts never keeps the lock after the holder dies. A forked child (a DataLoader worker)
    shares it until it exits, seconds after the holder (PyTorch's workers watch their parent)."""
    make_directory(path.parent)
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)


def write_holder(fd: int) -> None:
    """Record this process as the holder: written first, then cut, so a reader never sees an empty file."""
    since = datetime.now().astimezone().isoformat(timespec="seconds")
    record = (json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}) + "\n").encode()
    os.pwrite(fd, record, 0)
    os.ftruncate(fd, len(record))


def read_holder(fd: int) -> str:
    """`pid 1234 on host gpu7, since 18:02`, read from the lock file that another process holds."""
    return describe_holder(os.pread(fd, HOLDER_READ_BYTES, 0).decode(errors="replace"))


def describe_holder(text: str, today: datetime | None = None) -> str:
    """`pid 1234 on host gpu7, since 18:02` from the lock file's contents (the date too when not today)."""
    try:
        holder = json.loads(text.splitlines()[0])
        since = datetime.fromisoformat(holder["since"])
        pid, host = int(holder["pid"]), str(holder["host"])
    except (IndexError, ValueError, KeyError, TypeError):  # written by a holder that has not finished writing
        return "holder not recorded yet"
    today = today or datetime.now(since.tzinfo)
    when = since.strftime("%H:%M" if since.date() == today.date() else "%Y-%m-%d %H:%M")
    return f"pid {pid} on host {host}, since {when}"
