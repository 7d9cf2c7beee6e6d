"""The dev cluster is a real two-node SLURM: a Submitit job spans both nodes and its tasks all-reduce over gloo."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.slurm.conftest import LAUNCHER, REPO_ROOT
from tml.slurm import SlurmResources, SlurmSubmitError, make_executor, set_rendezvous, submit

SUBMIT_REFUSAL_BUDGET_S = 30  # SLURM answers sbatch at once; anything near this would be a hang


def all_reduce_rank_sum() -> tuple[int, str, float, str]:
    """Runs in every task: Fabric finds SLURM by itself; returns (rank, node, sum of rank+1 over ranks, job name)."""
    import submitit
    import torch
    from lightning import Fabric

    set_rendezvous(submitit.JobEnvironment())
    fabric = Fabric(accelerator="cpu", devices=1, num_nodes=2, strategy="ddp")
    fabric.launch()
    total = fabric.all_reduce(torch.tensor(float(fabric.global_rank + 1)), reduce_op="sum")
    fabric.barrier()
    torch.distributed.destroy_process_group()
    return fabric.global_rank, os.environ["SLURMD_NODENAME"], float(total), os.environ["SLURM_JOB_NAME"]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_submitit_job_all_reduces_over_gloo_across_two_nodes(slurm_cluster, tmp_path):
    marker = tmp_path / "injected"
    job_name = f"tml $(touch {marker}); touch {marker}"  # must reach SLURM as a name, never a shell
    resources = SlurmResources(nodes=2, gpus_per_node=0, tasks_per_node=1, time="5", job_name=job_name)
    job = submit(make_executor(resources, tmp_path / "logs"), all_reduce_rank_sum)
    results = sorted(job.results())
    assert results == [(0, "node1", 3.0, job_name), (1, "node2", 3.0, job_name)]
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("request_args", "slurm_says"),
    [(["--partition", "no-such-partition"], "invalid partition"), (["--nodes", "5"], "submission failed")],
    ids=["bad-partition", "more-nodes-than-the-cluster"],
)
def test_request_slurm_cannot_meet_fails_at_once_with_slurms_message(
    slurm_cluster, slurm_run_args, tmp_path, request_args, slurm_says
):
    start = time.monotonic()
    launched = subprocess.run(
        [sys.executable, str(LAUNCHER), "--gpus-per-node", "0", "--time", "5", *request_args, *slurm_run_args,
         "--train.out_dir", str(tmp_path / "run")],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
    )
    assert launched.returncode == 1
    assert slurm_says in launched.stderr.lower()
    assert "SLURM refused the job" in launched.stderr
    assert time.monotonic() - start < SUBMIT_REFUSAL_BUDGET_S
    assert not (tmp_path / "run" / "slurm").exists()  # the refused submission's files went with it


def test_submit_raises_slurm_refusal_as_slurm_submit_error(slurm_cluster, tmp_path):
    resources = SlurmResources(nodes=2, gpus_per_node=0, time="5", partition="no-such-partition")
    with pytest.raises(SlurmSubmitError, match="(?i)invalid partition"):
        submit(make_executor(resources, tmp_path), all_reduce_rank_sum)
