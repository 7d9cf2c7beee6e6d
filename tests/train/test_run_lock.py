"""One training per out_dir: a second holder is refused naming the first, and the lock never outlives its holder."""

import errno
import fcntl
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.train.conftest import tiny_run_config
from tml.config import dump_yaml
from tml.slurm import TrainTask
from tml.train.run_lock import (
    LOCK_FILE,
    REQUEUE_LOCK_WAIT_S,
    RunLockError,
    hold_run_lock,
    is_lock_holder,
    lock_wait_s,
    training_in_progress,
)

HOLDER_START_S = 30  # a bare Python importing one module, on a busy 2-core machine
TRAINING_START_S = 180  # launch/local.py importing torch and Lightning and taking its first steps, same machine
SECOND_RUN_S = 60  # the refused run imports no torch: seconds, with a wide margin

HOLD_FOREVER = """
import sys, time
from tml.train.run_lock import hold_run_lock
with hold_run_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def start_holder(out_dir: Path, script: str = HOLD_FOREVER) -> subprocess.Popen:
    """Another process holding `out_dir`, returned once it holds it."""
    process = subprocess.Popen([sys.executable, "-c", script, str(out_dir)], cwd=REPO_ROOT,
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "held\n"
    except BaseException:
        process.kill()
        raise
    return process


@pytest.fixture
def holder(tmp_path):
    process = start_holder(tmp_path / "run")
    yield process
    process.kill()
    process.wait(timeout=HOLDER_START_S)


@pytest.mark.timeout(HOLDER_START_S * 2)
def test_a_second_holder_is_refused_naming_the_first_and_writes_nothing(tmp_path, holder):
    lock_file = tmp_path / "run" / LOCK_FILE
    recorded = lock_file.read_bytes()
    with pytest.raises(RunLockError) as refused, hold_run_lock(tmp_path / "run"):
        pytest.fail("the lock was granted twice")
    message = str(refused.value)
    assert re.fullmatch(rf"{re.escape(str(tmp_path / 'run'))} is in use by another training \(pid {holder.pid} on "
                        rf"host {re.escape(socket.gethostname())}, since \d\d:\d\d\); wait for it to end or use "
                        r"another --train\.out_dir", message), message
    assert lock_file.read_bytes() == recorded and sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK_FILE]


def test_the_same_process_cannot_hold_one_run_twice_and_holds_it_again_after_the_block(tmp_path):
    with hold_run_lock(tmp_path / "new" / "run"):  # a missing out_dir is created
        with pytest.raises(RunLockError, match=r"in use by another training \(pid \d+"), \
                hold_run_lock(tmp_path / "new" / "run"):
            pass
    with hold_run_lock(tmp_path / "new" / "run"):
        pass


@pytest.mark.timeout(HOLDER_START_S * 2)
def test_a_sigkilled_holder_leaves_no_stale_lock(tmp_path):
    process = start_holder(tmp_path / "run")
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=HOLDER_START_S)
    assert (tmp_path / "run" / LOCK_FILE).exists()  # the file stays; only the kernel's lock went with the holder
    with hold_run_lock(tmp_path / "run"):
        pass


@pytest.mark.timeout(HOLDER_START_S * 2)
def test_a_wait_outlasts_a_holder_that_goes_away(tmp_path):
    """A requeued job whose dead predecessor's lock lingers (NFS leases) gets it once the holder is gone."""
    process = start_holder(tmp_path / "run", HOLD_FOREVER.replace("time.sleep(600)", "time.sleep(1.5)"))
    start = time.monotonic()
    with hold_run_lock(tmp_path / "run", wait_s=HOLDER_START_S):
        assert time.monotonic() - start >= 0.5  # it did wait for the holder
    process.wait(timeout=HOLDER_START_S)


@pytest.mark.parametrize(("environ", "wait"), [({}, 0.0), ({"SLURM_RESTART_COUNT": "0"}, 0.0),
                                               ({"SLURM_RESTART_COUNT": "2"}, REQUEUE_LOCK_WAIT_S)])
def test_only_a_requeued_job_waits_for_the_lock(environ, wait):
    assert lock_wait_s(environ) == wait


def test_an_out_dir_that_cannot_be_created_is_refused_by_name(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(RunLockError, match=f"cannot lock {re.escape(str(tmp_path / 'file' / 'run'))} for training"), \
            hold_run_lock(tmp_path / "file" / "run"):
        pass


@pytest.mark.parametrize(("environ", "holds"), [
    ({}, True),  # a plain local run
    ({"LOCAL_RANK": "0", "NODE_RANK": "0"}, True),
    ({"LOCAL_RANK": "1"}, False),  # a rank Fabric's launcher started
    ({"SLURM_PROCID": "3"}, False),  # an srun task of slurm/train.sbatch: LOCAL_RANK is not set there
    ({"SLURM_PROCID": "0"}, True),
    ({"LOCAL_RANK": "1", "SLURM_PROCID": "0"}, False),  # Fabric's ranks inside an interactive `srun --pty bash`
    ({"NODE_RANK": "1"}, False),  # rank 0 of the second node shares the out_dir with the first
    ({"RANK": "2", "LOCAL_RANK": "0", "GROUP_RANK": "1"}, False),  # torchrun
])
def test_only_the_run_s_rank_0_holds_the_lock(environ, holds):
    assert is_lock_holder(environ) is holds


@pytest.mark.timeout(HOLDER_START_S * 2)
def test_rank_0_of_a_slurm_job_into_a_held_out_dir_fails_before_touching_it(tmp_path, holder, tiny_shards, monkeypatch):
    """The task fails (Submitit exits non-zero) and srun's --kill-on-bad-exit ends the ranks waiting for it."""
    task_environment = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0", "SLURM_NTASKS": "2",
                        "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_JOB_NUM_NODES": "1",
                        "SLURM_JOB_NODELIST": "node1", "MASTER_ADDR": "", "MASTER_PORT": ""}  # restored afterwards
    for name, value in task_environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(RunLockError, match=f"pid {holder.pid} on host"):
        TrainTask(tiny_run_config(tiny_shards, tmp_path / "run"))()
    assert [p.name for p in (tmp_path / "run").iterdir()] == [LOCK_FILE]


@pytest.mark.slow
@pytest.mark.timeout(TRAINING_START_S + SECOND_RUN_S + 60)
def test_a_second_launch_into_a_running_out_dir_exits_1_in_one_line_touching_nothing(tmp_path, tiny_shards):
    out_dir = tmp_path / "run"
    config = tiny_run_config(tiny_shards, out_dir, max_steps=10_000, val_interval=10_000, ckpt_interval=10_000,
                             resume="auto")
    config_file = tmp_path / "run.yaml"
    config_file.write_text(dump_yaml(config))
    command = [sys.executable, str(REPO_ROOT / "launch" / "local.py"), "--config", str(config_file)]
    log = tmp_path / "first.log"
    with open(log, "w") as output:
        first = subprocess.Popen(command, cwd=REPO_ROOT, stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + TRAINING_START_S
        while not re.search(r"^step\s+\d+ \| loss", log.read_text(), re.MULTILINE):
            assert first.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        before = {path: path.stat().st_mtime_ns for path in out_dir.rglob("*") if not path.name.startswith("events")}
        events = sorted(out_dir.rglob("events.out.tfevents.*"))

        second = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=SECOND_RUN_S)

        assert second.returncode == 1, second.stderr[-3000:]
        assert second.stdout == ""
        assert re.fullmatch(rf"tml: {re.escape(str(out_dir))} is in use by another training \(pid {first.pid} on "
                            r"host .+, since \d\d:\d\d\); wait for it to end or use another --train\.out_dir\n",
                            second.stderr), second.stderr
        assert first.poll() is None  # the first run trains on
        after = {path: path.stat().st_mtime_ns for path in out_dir.rglob("*") if not path.name.startswith("events")}
        assert after == before and sorted(out_dir.rglob("events.out.tfevents.*")) == events
    finally:
        first.kill()
        first.wait(timeout=SECOND_RUN_S)


def test_a_full_disk_at_start_is_one_line_naming_the_run_and_the_free_space(tmp_path, monkeypatch):
    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("tml.train.run_lock.write_holder", disk_full)
    with pytest.raises(RunLockError, match=rf"cannot write to {re.escape(str(tmp_path))}: No space left on device "
                                           r"\([\d,.]+ MB free\)"), hold_run_lock(tmp_path, wait_s=0):
        pass


def test_a_reader_sees_a_training_in_progress_and_a_training_is_not_refused_for_its_look(tmp_path, monkeypatch):
    assert training_in_progress(tmp_path) is None  # never trained here: no lock file
    with hold_run_lock(tmp_path, wait_s=0):
        assert training_in_progress(tmp_path).startswith(f"pid {os.getpid()} on host {socket.gethostname()}")
    assert training_in_progress(tmp_path) is None  # the file stays, the lock does not
    fd = os.open(tmp_path / LOCK_FILE, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)  # a reader caught mid-look
    monkeypatch.setattr("tml.train.run_lock.READER_GRACE_S", 2.0)  # the retry is tested, not the constant's size
    threading.Timer(0.01, os.close, [fd]).start()  # a reader's look ends well within the grace
    with hold_run_lock(tmp_path, wait_s=0):
        pass
