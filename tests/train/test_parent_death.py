"""Extra local ranks die with rank 0's process: a plain parent and child, then a real 2-process Fabric run."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.train.conftest import tiny_run_config
from tml.config import dump_yaml
from tml.train.parent_death import RANK0_PID_VARIABLE, die_with_local_rank0

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")

START_S = 30  # two bare Python processes, on a busy 2-core machine
DEATH_S = 10  # the kernel signals at once; this is only room for a loaded machine to schedule it
TRAINING_START_S = 240  # a 2-process CPU run taking its first steps on a busy 2-core machine

# Rank 0 stand-in: records its pid as train_main does, starts one local rank, prints that rank's pid once armed.
RANK0 = """
import os, subprocess, sys, time
from tml.train.parent_death import die_with_local_rank0
die_with_local_rank0()
environ = {**os.environ, "LOCAL_RANK": "1"}
if sys.argv[1] == "other-launcher":
    del environ["TML_LOCAL_RANK0_PID"]
child = subprocess.Popen([sys.executable, "-c", sys.argv[2]], env=environ, stdout=subprocess.PIPE, text=True)
assert child.stdout.readline() == "armed\\n"
print(child.pid, flush=True)
time.sleep(600)
"""
LOCAL_RANK = """
import time
from tml.train.parent_death import die_with_local_rank0
die_with_local_rank0()
print("armed", flush=True)
time.sleep(600)
"""


def is_running(pid: int) -> bool:
    """Alive and not a zombie (a container's init may be slow to reap, or never reap, an orphan)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def wait_until_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while is_running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def local_rank_of(pid: int) -> str | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except FileNotFoundError:
        return None
    values = [entry.split(b"=", 1)[1].decode() for entry in environ if entry.startswith(b"LOCAL_RANK=")]
    return values[0] if values else None


def start_rank0(mode: str) -> tuple[subprocess.Popen, int]:
    rank0 = subprocess.Popen([sys.executable, "-c", RANK0, mode, LOCAL_RANK], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                             text=True)
    return rank0, int(rank0.stdout.readline())


@pytest.mark.timeout(START_S + DEATH_S + 30)
def test_a_local_rank_dies_when_rank0_is_sigkilled():
    rank0, rank1 = start_rank0("tml")
    try:
        rank0.send_signal(signal.SIGKILL)
        rank0.wait(timeout=START_S)
        assert wait_until_gone(rank1, DEATH_S), f"local rank 1 (pid {rank1}) outlived rank 0"
    finally:
        if is_running(rank1):
            os.kill(rank1, signal.SIGKILL)


@pytest.mark.timeout(START_S + DEATH_S + 30)
def test_a_process_another_launcher_started_is_left_alone():
    """No TML_LOCAL_RANK0_PID (torchrun, srun): nothing is armed, so the child outlives its parent."""
    rank0, rank1 = start_rank0("other-launcher")
    try:
        rank0.send_signal(signal.SIGKILL)
        rank0.wait(timeout=START_S)
        assert not wait_until_gone(rank1, 1.0)
    finally:
        os.kill(rank1, signal.SIGKILL)


@pytest.mark.timeout(START_S)
def test_a_local_rank_whose_rank0_is_already_gone_exits_at_once():
    not_the_parent = os.getppid()  # this test's parent: never the child's
    done = subprocess.run([sys.executable, "-c", LOCAL_RANK], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=START_S, env={**os.environ, "LOCAL_RANK": "1",
                                                RANK0_PID_VARIABLE: str(not_the_parent)})
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == f"tml: local rank 1: rank 0 (pid {not_the_parent}) is gone; exiting\n"


def test_rank0_records_its_pid_for_the_ranks_fabric_starts(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv(RANK0_PID_VARIABLE, "stale")  # restored after the test
    die_with_local_rank0()
    assert os.environ[RANK0_PID_VARIABLE] == str(os.getpid())


@pytest.mark.slow
@pytest.mark.timeout(TRAINING_START_S + DEATH_S + 60)
def test_fabric_s_local_rank_dies_when_rank0_of_a_two_process_run_is_sigkilled(tmp_path, tiny_shards):
    config = tiny_run_config(tiny_shards, tmp_path / "run", devices=2, strategy="ddp", max_steps=10_000,
                             val_interval=10_000, ckpt_interval=10_000)
    config_file = tmp_path / "run.yaml"
    config_file.write_text(dump_yaml(config))
    log = tmp_path / "run.log"
    with open(log, "w") as output:
        rank0 = subprocess.Popen([sys.executable, str(REPO_ROOT / "launch" / "local.py"), "--config", str(config_file)],
                                 cwd=REPO_ROOT, stdout=output, stderr=subprocess.STDOUT)
    rank1 = None
    try:
        deadline = time.monotonic() + TRAINING_START_S
        while not re.search(r"^step\s+\d+ \| loss", log.read_text(), re.MULTILINE):  # both ranks in collectives
            assert rank0.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        rank1 = next(pid for pid in children(rank0.pid) if local_rank_of(pid) == "1")
        # Stopped, so only the kernel can end it: a running rank 1 that happens to be reading rank 0's gloo socket
        # dies of "Connection reset by peer" by itself; one computing, or waiting on other ranks, does not.
        os.kill(rank1, signal.SIGSTOP)
        rank0.send_signal(signal.SIGKILL)
        rank0.wait(timeout=START_S)
        assert wait_until_gone(rank1, DEATH_S), f"local rank 1 (pid {rank1}) outlived rank 0"
    finally:
        rank0.kill()
        rank0.wait(timeout=START_S)
        if rank1 is not None and is_running(rank1):
            os.kill(rank1, signal.SIGKILL)
