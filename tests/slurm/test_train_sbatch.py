"""slurm/train.sbatch, the plain template: valid bash, one task per GPU, and the launcher's rendezvous port."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.slurm.conftest import REPO_ROOT
from tml.slurm import rendezvous_port

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
