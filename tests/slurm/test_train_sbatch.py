"""slurm/train.sbatch, the plain template: valid bash, one task per GPU, the launcher's rendezvous port, and a real
two-node run on the dev cluster that requeues itself at the time-limit warning."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.slurm.conftest import REPO_ROOT, RUN_CKPT_INTERVAL, RUN_STEPS
from tests.slurm.test_launch_slurm import JOB_TIMEOUT_S, POLL_S, last_checkpoint_step, logged_losses
from tml.slurm import rendezvous_port, slurm_job_state

TEMPLATE = REPO_ROOT / "slurm" / "train.sbatch"


def directives() -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([a-z-]+)(?:=(\S+))?", TEMPLATE.read_text(), flags=re.MULTILINE))


def test_template_is_valid_bash():
    subprocess.run(["bash", "-n", str(TEMPLATE)], check=True)


def test_template_runs_one_task_per_gpu_and_tells_fabric_the_same_numbers():
    options = directives()
    assert options["ntasks-per-node"] == options["gpus-per-node"]
    text = TEMPLATE.read_text()
    assert '--train.devices "$SLURM_NTASKS_PER_NODE"' in text
    assert '--train.num_nodes "$SLURM_JOB_NUM_NODES"' in text


def test_template_saves_and_requeues_before_the_time_limit():
    options = directives()
    assert options["signal"].startswith("B:USR2@")
    assert "requeue" in options and options["open-mode"] == "append"
    assert "trap requeue_before_the_time_limit USR2" in TEMPLATE.read_text()


@pytest.mark.parametrize(("job_id", "restarts"), [(1, 0), (123457, 1), (99999, 6)])
def test_template_rendezvous_port_matches_the_launchers(job_id, restarts):
    line = next(line for line in TEMPLATE.read_text().splitlines() if line.startswith("MASTER_PORT="))
    env = {"SLURM_JOB_ID": str(job_id), "SLURM_RESTART_COUNT": str(restarts), "PATH": "/usr/bin:/bin"}
    port = subprocess.run(["bash", "-c", f'{line}; echo "$MASTER_PORT"'], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()
    assert int(port) == rendezvous_port(job_id, restarts)


JOB_ENDED_BADLY = ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def own_text_corpus(directory: Path) -> Path:
    """A small .txt corpus: the template prepares data itself (`tml-prepare`, a no-op once it is ready)."""
    directory.mkdir()
    for book in range(3):
        lines = [f"Chapter {chapter}. The {book} lantern of line {line} was lit at {line * chapter} past the hour."
                 for chapter in range(1, 30) for line in range(1, 20)]
        (directory / f"book{book}.txt").write_text("\n".join(lines))
    return directory


@pytest.mark.slow
@pytest.mark.timeout(2 * JOB_TIMEOUT_S)
def test_template_trains_on_two_nodes_and_requeues_itself_at_the_time_limit_warning(slurm_cluster, slurm_run_args,
                                                                                   tmp_path):
    """The template submitted for real, on two CPU nodes: it prepares the data, trains, and on USR2 to the batch
    shell (what --signal=B:USR2@120 sends before the time limit) every task saves `last`; the job requeues itself,
    resumes and finishes, and every step is trained exactly once."""
    (tmp_path / "launch").symlink_to(REPO_ROOT / "launch")  # the template runs `launch/local.py` from the submit dir
    logs = tmp_path / "logs"
    logs.mkdir()  # as the template's header says: SLURM does not create it
    run_dir = tmp_path / "run"
    config = slurm_run_args[slurm_run_args.index("--config") + 1]
    overrides = [arg for arg in slurm_run_args if arg not in ("--config", config)]
    data = ["--data.source", str(own_text_corpus(tmp_path / "text")), "--data.shard_dir", str(tmp_path / "shards"),
            "--model.vocab_size", "50304"]  # GPT-2 tokens now; later flags win
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # the job's python
    submitted = subprocess.run(["sbatch", "--parsable", "--nodes", "2", "--ntasks-per-node", "1", "--gpus-per-node",
                                "0", "--cpus-per-task", "1", "--time", "10", str(TEMPLATE), config, *overrides, *data,
                                "--train.out_dir", str(run_dir)], cwd=tmp_path, env=env, capture_output=True,
                               text=True, check=True)
    job_id = submitted.stdout.strip().split(";")[0]

    def wait_for(predicate, what: str) -> None:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not predicate():
            state = slurm_job_state(job_id)
            logs_text = "\n".join(f"--- {path.name}\n{path.read_text()[-2000:]}" for path in sorted(logs.glob("*")))
            assert state.get("JobState") not in JOB_ENDED_BADLY, f"job {job_id} {state.get('JobState')}:\n{logs_text}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {state}\n{logs_text}"
            time.sleep(POLL_S)

    try:
        wait_for(lambda: last_checkpoint_step(run_dir) >= RUN_CKPT_INTERVAL, "the first checkpoint")
        assert slurm_job_state(job_id).get("JobState") == "RUNNING", "training outran the test: raise RUN_STEPS"
        subprocess.run(["scancel", "--batch", "--signal=USR2", job_id], check=True)
        wait_for(lambda: slurm_job_state(job_id).get("JobState") == "COMPLETED", "the requeued job to finish")
    finally:
        subprocess.run(["scancel", job_id])
    assert slurm_job_state(job_id).get("Restarts") == "1"
    assert "time limit near: saving and requeueing" in (logs / f"tml-{job_id}.out").read_text()
    rank0 = (logs / f"tml-{job_id}-0.out").read_text()  # both attempts: --open-mode=append
    assert "preempted by SIGUSR2" in rank0
    resumed_at = [int(step) for step in re.findall(r"resumed from .* at step (\d+)", rank0)]
    assert len(resumed_at) == 1 and RUN_CKPT_INTERVAL <= resumed_at[0] < RUN_STEPS
    losses = logged_losses(run_dir)
    assert sorted(losses) == list(range(1, RUN_STEPS + 1)) and all(len(values) == 1 for values in losses.values())
