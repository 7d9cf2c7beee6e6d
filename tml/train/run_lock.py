"""One training per run directory: an exclusive lock on `<out_dir>/train.lock`, held for the whole run.

Two trainings into one out_dir would resume from each other's checkpoints and overwrite `last`, `best` and the
TensorBoard logs. One process per run (rank 0) takes the lock before anything in out_dir is read or written; a
second training is refused at once, naming the holder. How the lock works (flock, never stale, the holder record)
is in tml/locks.py. On NFS, Linux maps flock onto NFS locks, so trainings on different machines are kept apart too.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from tml.files import write_failure
from tml.locks import NO_FLOCK_ERRNOS, open_lock_file, read_holder, write_holder

LOCK_FILE = "train.lock"
# Every variable a launcher tml runs under sets to say which process this is: Fabric's own launcher (LOCAL_RANK,
# NODE_RANK), torchrun (RANK, LOCAL_RANK, GROUP_RANK) and srun (SLURM_PROCID, as in slurm/train.sbatch, where
# every task starts with LOCAL_RANK unset). The process where all that are set are 0 is the run's rank 0.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")
# A requeued SLURM job (SLURM_RESTART_COUNT > 0) after a node failure can find its dead predecessor's lock still
# held on NFS until the server's lease runs out (90 s by default on NFSv4): it waits up to this long, not refusing
# at once and ending the job for good.
REQUEUE_LOCK_WAIT_S = 180.0
LOCK_RETRY_S = 1.0
READER_GRACE_S = 0.05  # training_in_progress holds a shared lock for microseconds; a training retries past that


class RunLockError(RuntimeError):
    """The run directory cannot be locked: another training holds it, or it cannot be created."""


def is_lock_holder(environ: Mapping[str, str] = os.environ) -> bool:
    """True in the one process of a local, torchrun or srun launch that holds the run's lock (its rank 0)."""
    return all(environ.get(name, "0") in ("", "0") for name in RANK_VARIABLES)


def lock_wait_s(environ: Mapping[str, str] = os.environ) -> float:
    """How long to wait for a held lock: REQUEUE_LOCK_WAIT_S in a requeued SLURM job, else not at all."""
    restarts = environ.get("SLURM_RESTART_COUNT", "0")
    return REQUEUE_LOCK_WAIT_S if restarts.isdigit() and int(restarts) > 0 else 0.0


def flock_within(fd: int, wait_s: float) -> None:
    """flock(LOCK_EX) without blocking, retried for up to wait_s seconds (at least READER_GRACE_S, so a reader's
    instant of shared lock never refuses a training); BlockingIOError when still held."""
    deadline = time.monotonic() + max(wait_s, READER_GRACE_S)
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise
            time.sleep(min(LOCK_RETRY_S, remaining))


def training_in_progress(out_dir: str | Path) -> str | None:
    """`pid 1234 on host gpu7, since 18:02` when a training holds out_dir's lock now, else None (for readers such as
    `tml compare`). A shared lock taken and dropped at once; a training starting in that instant retries
    (READER_GRACE_S) rather than being refused."""
    path = Path(out_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # closing the descriptor below drops it again
    except BlockingIOError:
        return read_holder(fd)
    except OSError:  # a file system that cannot lock: nothing to tell
        pass
    finally:
        os.close(fd)
    return None


@contextlib.contextmanager
def hold_run_lock(out_dir: str | Path, wait_s: float | None = None) -> Iterator[None]:
    """Hold `out_dir` for the block, creating it when missing; RunLockError, with nothing written, when another
    training holds it (after waiting wait_s seconds; default lock_wait_s())."""
    wait_s = lock_wait_s() if wait_s is None else wait_s
    directory = Path(out_dir)
    try:
        fd = open_lock_file(directory / LOCK_FILE)  # a process Fabric starts never holds it after rank 0 dies
    except OSError as error:
        raise RunLockError(f"cannot lock {out_dir} for training: {error.strerror or error}") from error
    try:
        try:
            flock_within(fd, wait_s)
        except BlockingIOError:
            holder = read_holder(fd)
            raise RunLockError(f"{out_dir} is in use by another training ({holder}); wait for it to end or use "
                               "another --train.out_dir") from None
        except OSError as error:
            if error.errno not in NO_FLOCK_ERRNOS:
                raise RunLockError(f"cannot lock {out_dir} for training: {error.strerror or error}") from error
            print(f"tml: warning: the file system of {out_dir} cannot lock files ({error.strerror}); nothing stops "
                  "a second training into it", file=sys.stderr)
        else:
            try:
                write_holder(fd)
            except OSError as error:  # a full disk: training could not save a checkpoint there either
                raise RunLockError(f"cannot write to {out_dir}: {write_failure(error, directory)}") from error
        yield
    finally:
        os.close(fd)  # releases the lock
