"""`python launch/slurm.py` on the two-node dev cluster: DDP over gloo across nodes, and requeues that lose nothing.

The requeued run is checked against an uninterrupted run of the same config: every step's training loss must
be the same number, so no step was skipped, repeated from stale state, or fed different batches. The two jobs run
at the same time (the cluster has room for both), so the reference costs no extra wall time: it trains while the
requeued job waits out SLURM's requeue delays.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.util import tensor_util

from tests.slurm.conftest import LAUNCHER, REPO_ROOT, RUN_CKPT_INTERVAL, RUN_STEPS
from tml.slurm import QUEUED_STATES, SlurmResources, render_sbatch, slurm_job_state

TWO_CPU_NODES = ["--nodes", "2", "--gpus-per-node", "0", "--tasks-per-node", "1", "--time", "10"]
JOB_TIMEOUT_S = 240
POLL_S = 0.05  # checkpoints come every few steps; the requeue must land well before the run ends
LOSS_TOLERANCE = 1e-5  # same data, same restored state, same gloo reduction order: equal up to float noise


def launch(args: list[str], wait: bool = True) -> subprocess.Popen:
    command = [sys.executable, str(LAUNCHER), *TWO_CPU_NODES, *args] + (["--wait"] if wait else [])
    return subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def read_job_id(process: subprocess.Popen) -> tuple[str, list[str]]:
    """Reads the launcher's output up to the `submitted job N` line."""
    lines = []
    for line in process.stdout:
        lines.append(line)
        if match := re.match(r"submitted job (\d+)", line):
            return match.group(1), lines
    raise AssertionError("launcher printed no job id:\n" + "".join(lines))


def finish(process: subprocess.Popen, lines: list[str]) -> str:
    """The rest of the launcher's output (read through the same buffer as read_job_id; pytest-timeout guards it)."""
    rest = process.stdout.read()
    process.wait()
    return "".join(lines) + rest


def logged_losses(run_dir: Path) -> dict[int, list[float]]:
    """Every `train/loss` value in the run's TensorBoard files, by step (a redone step would appear twice)."""
    losses: dict[int, list[float]] = {}
    for events_file in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(events_file)).Load():
            for value in event.summary.value:
                if value.tag == "train/loss":
                    number = value.simple_value if value.HasField("simple_value") else float(
                        tensor_util.make_ndarray(value.tensor))
                    losses.setdefault(event.step, []).append(number)
    return losses


def last_checkpoint_step(run_dir: Path) -> int:
    last = run_dir / "checkpoints" / "last"
    return int(os.readlink(last).rsplit("-", 1)[1]) if last.is_symlink() else 0


def wait_until(predicate, what: str, job_id: str, timeout: float = JOB_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        assert slurm_job_state(job_id).get("JobState") != "COMPLETED", (
            f"job {job_id} finished before {what}: training outran the test, raise RUN_STEPS")
        time.sleep(POLL_S)


class LaunchedRun:
    """A `launch/slurm.py --wait` run in the background; `finished()` waits for it once and keeps the answer."""

    def __init__(self, run_args: list[str], run_dir: Path) -> None:
        self.run_dir = run_dir
        self.process = launch([*run_args, "--train.out_dir", str(run_dir)])
        self.job_id, self._lines = read_job_id(self.process)
        self._output: str | None = None

    def finished(self) -> str:
        if self._output is None:
            self._output = finish(self.process, self._lines)
        return self._output

    def stop(self) -> None:
        if self.process.poll() is None:
            subprocess.run(["scancel", self.job_id])
            self.process.kill()
            self.process.wait()





@pytest.fixture(scope="module")
def uninterrupted_run(slurm_cluster, slurm_run_args, tmp_path_factory):
    """The reference run: two nodes, one CPU task each, never interrupted. Started here, awaited by the tests."""
    run = LaunchedRun(slurm_run_args, tmp_path_factory.mktemp("uninterrupted") / "run")
    yield run
    run.stop()


@pytest.mark.slow
@pytest.mark.timeout(2 * JOB_TIMEOUT_S)
def test_run_preempted_twice_finishes_with_every_step_done_once(uninterrupted_run, slurm_run_args, tmp_path):
    """First `scontrol requeue` (SIGTERM, SLURM requeues), then the time-limit warning (USR2, Submitit requeues)."""
    run = LaunchedRun(slurm_run_args, tmp_path / "run")
    job_id, run_dir = run.job_id, run.run_dir
    try:
        wait_until(lambda: last_checkpoint_step(run_dir) >= RUN_CKPT_INTERVAL, "the first checkpoint", job_id)
        subprocess.run(["scontrol", "requeue", job_id], check=True)
        wait_until(lambda: slurm_job_state(job_id).get("Restarts") == "1"
                   and slurm_job_state(job_id).get("JobState") == "RUNNING", "the restarted job", job_id)
        resumed = last_checkpoint_step(run_dir)  # attempt 1 is gone, so its last save is final
        wait_until(lambda: last_checkpoint_step(run_dir) > resumed, "a checkpoint of the second attempt", job_id)
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
        output = run.finished()
    finally:
        run.stop()
    assert run.process.returncode == 0, output
    assert f"finished: step {RUN_STEPS}" in output
    rank0 = (run_dir / "slurm" / f"{job_id}_0_log.out").read_text()
    assert "preempted by SIGTERM" in rank0 and "preempted by SIGUSR2" in rank0
    assert "attempt 3" in rank0  # the same job id, restarted twice
    resumed_at = [int(step) for step in re.findall(r"resumed from .* at step (\d+)", rank0)]
    assert len(resumed_at) == 2 and 0 < resumed_at[0] < resumed_at[1] < RUN_STEPS

    reference_output = uninterrupted_run.finished()
    assert uninterrupted_run.process.returncode == 0, reference_output
    reference = logged_losses(uninterrupted_run.run_dir)
    requeued = logged_losses(run_dir)
    assert sorted(requeued) == list(range(1, RUN_STEPS + 1))
    for step, values in requeued.items():
        assert values == pytest.approx([reference[step][0]] * len(values), abs=LOSS_TOLERANCE), f"step {step}"


@pytest.mark.slow
@pytest.mark.timeout(JOB_TIMEOUT_S + 60)
def test_two_node_run_trains_ddp_over_gloo_with_a_log_per_rank(uninterrupted_run):
    output = uninterrupted_run.finished()
    run_dir, job_id = uninterrupted_run.run_dir, uninterrupted_run.job_id
    assert uninterrupted_run.process.returncode == 0, output
    assert f"tail -f {run_dir}/slurm/{job_id}_0_log.out" in output
    assert f"finished: step {RUN_STEPS}" in output
    rank0 = (run_dir / "slurm" / f"{job_id}_0_log.out").read_text()
    rank1 = (run_dir / "slurm" / f"{job_id}_1_log.out").read_text()
    assert "task 0 of 2 (node 0, local rank 0) on node1" in rank0
    assert "task 1 of 2 (node 1, local rank 0) on node2" in rank1
    assert "distributed_backend=gloo" in rank0 and "Starting with 2 processes" in rank0
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in rank1
    # Rank 0 reports the steps and writes the checkpoints, once, in the run directory.
    assert f"step {RUN_STEPS:>7d} | loss" in rank0 and "| loss" not in rank1
    assert last_checkpoint_step(run_dir) == RUN_STEPS
    assert sorted(logged_losses(run_dir)) == list(range(1, RUN_STEPS + 1))


@pytest.mark.slow
@pytest.mark.timeout(JOB_TIMEOUT_S + 60)
def test_dry_run_prints_exactly_the_script_that_was_submitted(uninterrupted_run):
    uninterrupted_run.finished()
    resources = SlurmResources(nodes=2, gpus_per_node=0, tasks_per_node=1, time="10")
    folder = uninterrupted_run.run_dir / "slurm"
    submitted = (folder / f"{uninterrupted_run.job_id}_submission.sh").read_text()
    assert submitted == render_sbatch(resources, folder)


@pytest.mark.slow
@pytest.mark.timeout(2 * JOB_TIMEOUT_S)
def test_a_sweep_submits_a_job_per_run_and_submits_none_for_runs_that_ended(slurm_cluster, slurm_run_args, tmp_path):
    sweep_dir = tmp_path / "sweep"
    command = [sys.executable, str(LAUNCHER), "--nodes", "1", "--gpus-per-node", "0", "--tasks-per-node", "1",
               "--time", "10", *slurm_run_args, "--train.max_steps", "3", "--train.val_interval", "3",
               "--train.out_dir", str(sweep_dir), "--sweep", "train.lr=1e-3,3e-3", "--wait"]
    first = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    output = first.stdout + first.stderr
    assert first.returncode == 0, output
    submitted = re.findall(r"^submitted job (\d+): .* \(run (lr=[0-9e-]+)\)$", output, flags=re.MULTILINE)
    assert [name for _, name in submitted] == ["lr=1e-3", "lr=3e-3"] and submitted[0][0] != submitted[1][0]
    for job_id, name in submitted:
        assert f"job {job_id} finished: step 3" in output
        assert (sweep_dir / name / "slurm" / f"{job_id}_0_log.out").exists()  # each run keeps its own logs
        assert last_checkpoint_step(sweep_dir / name) == 3

    again = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("already ended at its max_steps: not submitted") == 2
    assert "submitted job" not in again.stdout


@pytest.mark.slow
@pytest.mark.timeout(2 * JOB_TIMEOUT_S)
def test_a_sweep_submitted_again_while_its_jobs_wait_or_run_queues_nothing(slurm_cluster, slurm_run_args, tmp_path):
    command = [sys.executable, str(LAUNCHER), "--nodes", "1", "--gpus-per-node", "0", "--tasks-per-node", "1",
               "--time", "10", *slurm_run_args, "--train.max_steps", "3", "--train.val_interval", "3",
               "--train.out_dir", str(tmp_path / "sweep"), "--sweep", "train.lr=1e-3,3e-3"]
    first = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert first.returncode == 0, first.stdout + first.stderr
    job_ids = re.findall(r"^submitted job (\d+)", first.stdout, flags=re.MULTILINE)
    subprocess.run(["scontrol", "hold", job_ids[0]], capture_output=True)  # kept waiting (when it has not started)
    one_run = [arg for arg in command if arg not in ("--sweep", "train.lr=1e-3,3e-3")]
    one_run[one_run.index(str(tmp_path / "sweep"))] = str(tmp_path / "sweep" / "lr=1e-3")
    single = subprocess.run(one_run, cwd=REPO_ROOT, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    if slurm_job_state(job_ids[0]).get("JobState") in QUEUED_STATES:  # not one that ended in the meantime
        assert single.returncode == 1, single.stdout + single.stderr
        assert re.search(r"lr=1e-3 (is being trained \(pid|has job \d+ still queued or running).*not submitted",
                         single.stderr), single.stderr
        assert "submitted job" not in single.stdout
    job_ids += re.findall(r"^submitted job (\d+)", single.stdout, flags=re.MULTILINE)  # the job had ended: a new one
    subprocess.run(["scontrol", "release", job_ids[0]], capture_output=True)
    again = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "submitted job" not in again.stdout  # each run still queued, training or (if quick) ended: no second job
    assert again.stdout.count("not submitted") == 2
    deadline = time.monotonic() + JOB_TIMEOUT_S  # let them finish before the cluster is taken down
    while any(slurm_job_state(job_id).get("JobState") in QUEUED_STATES for job_id in job_ids):
        assert time.monotonic() < deadline, f"jobs {job_ids} did not end"
        time.sleep(1)
