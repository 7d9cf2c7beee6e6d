"""The extra local ranks of a multi-process run die with rank 0's process, however it dies.

Fabric's launcher starts local ranks 1..N-1 as child processes of rank 0 (the same command with LOCAL_RANK set)
and watches them from a thread in rank 0. When rank 0 itself is killed (OOM killer, `kill -9`) nothing watches
any more: the children sit in a collective that never completes, and SIGTERM or Ctrl-C cannot reach Python code
blocked there. On Linux each child asks the kernel for SIGKILL when its parent dies (prctl PR_SET_PDEATHSIG).

Telling such a child apart needs more than LOCAL_RANK: torchrun sets it too, and Fabric's other variables
(MASTER_ADDR, MASTER_PORT, NODE_RANK, WORLD_SIZE) do not name the parent. So rank 0 writes its own pid into
TML_LOCAL_RANK0_PID before Fabric starts the children, which inherit Fabric's copy of its environment; a child
then knows exactly which parent to expect, and that it was started by tml's rank 0 at all. (The kernel sends the
signal when the thread that started the child ends: Fabric starts them from the thread calling `fabric.launch()`,
tml's main thread, which lives as long as the process.)
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

RANK0_PID_VARIABLE = "TML_LOCAL_RANK0_PID"
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_local_rank0() -> None:
    """In rank 0: record its pid for the ranks Fabric will start. In such a rank: die when rank 0's process does.

    Call it first thing in the entry point, before Fabric launches. A rank whose parent is already gone exits.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if local_rank == 0:
        os.environ[RANK0_PID_VARIABLE] = str(os.getpid())
        return
    expected_parent = os.environ.get(RANK0_PID_VARIABLE)
    if expected_parent is None or not sys.platform.startswith("linux"):
        return  # started by another launcher (torchrun, srun), or no PR_SET_PDEATHSIG here
    if not signal_when_parent_dies(signal.SIGKILL, int(expected_parent)):
        print(f"tml: local rank {local_rank}: rank 0 (pid {expected_parent}) is gone; exiting", file=sys.stderr)
        raise SystemExit(1)


def signal_when_parent_dies(signal_number: int, parent_pid: int) -> bool:
    """Ask Linux to send this process `signal_number` when the thread that started it ends (prctl PR_SET_PDEATHSIG);
    False when the parent `parent_pid` is already gone, which nothing would then signal.

    Also what a sweep arms in each training it starts (SIGTERM: the training saves `last` and exits), so that a
    sweep killed outright leaves no training running on alone."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal_number, 0, 0, 0) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"prctl(PR_SET_PDEATHSIG): {os.strerror(error)}")
    # After arming, not before: a parent that died in between left this process to init, with nothing armed.
    return os.getppid() == parent_pid
