"""`tml slurm` (tml/slurm_submit.py), the launcher an installed tml has: the same submission as launch/slurm.py,
under its own name. No cluster needed: --dry-run and refusals submit nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.slurm.conftest import LAUNCHER, REPO_ROOT
from tml.cli import main

TINY_CONFIG = str(REPO_ROOT / "configs" / "tiny.yaml")


def both_launchers(args: list[str], capsys, monkeypatch) -> tuple[subprocess.CompletedProcess, pytest.CaptureResult]:
    """launch/slurm.py in a subprocess and `tml slurm` in this one, on the same arguments; the second's output is
    checked to be the first's, its notices under its own name."""
    launched = subprocess.run([sys.executable, str(LAUNCHER), *args], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=60)
    assert launched.returncode == 0, launched.stderr
    monkeypatch.chdir(REPO_ROOT)
    assert main(["slurm", *args]) == 0
    captured = capsys.readouterr()
    assert captured.out == launched.stdout
    assert captured.err == launched.stderr.replace("launch/slurm.py: ", "tml slurm: ")
    return launched, captured


def test_tml_slurm_dry_run_prints_the_same_sbatch_script_as_launch_slurm_py(tmp_path, capsys, monkeypatch):
    args = ["--config", TINY_CONFIG, "--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu", "--time",
            "2-00:00:00", "--train.out_dir", str(tmp_path / "run"), "--dry-run"]
    launched, captured = both_launchers(args, capsys, monkeypatch)
    assert "#SBATCH --nodes=2" in captured.out and f"{tmp_path / 'run' / 'slurm'}" in captured.out
    assert "launch/slurm.py: train.accelerator='cpu' replaced by 'cuda'" in launched.stderr


def test_a_sweep_dry_run_names_every_run_as_launch_slurm_py_does(tmp_path, capsys, monkeypatch):
    args = ["--config", TINY_CONFIG, "--gpus-per-node", "0", "--tasks-per-node", "2", "--train.out_dir",
            str(tmp_path / "sweep"), "--sweep", "train.lr=1e-3,3e-3", "--dry-run"]
    _, captured = both_launchers(args, capsys, monkeypatch)
    assert "# a sweep of 2 jobs, this script for each with its run's folder: lr=1e-3, lr=3e-3" in captured.err


def test_tml_slurm_reports_a_bad_request_under_its_own_name(capsys):
    argv = ["slurm", "--config", TINY_CONFIG, "--gpus-per-node", "8", "--tasks-per-node", "2", "--dry-run"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("tml slurm: ") and "--tasks-per-node 2 with --gpus-per-node 8" in err


def test_tml_slurm_help_is_the_launchers_under_the_name_tml_slurm(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["slurm", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: tml slurm ") and "launch/slurm.py" not in out
    assert "--gpus-per-node" in out and "--dry-run" in out and "--sweep KEY=V1,V2" in out


def test_the_installed_tml_command_runs_slurm_outside_the_checkout(tmp_path):
    console_script = Path(sys.executable).parent / "tml"
    if not console_script.exists():
        pytest.skip(f"no tml console script beside {sys.executable}: tml is not installed in this environment")
    helped = subprocess.run([str(console_script), "slurm", "--help"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: tml slurm ")


def test_a_dry_run_says_the_steps_a_budget_buys_at_the_jobs_global_batch(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    argv = ["slurm", "--config", TINY_CONFIG, "--nodes", "2", "--gpus-per-node", "4", "--train.max_tokens", "1e6",
            "--train.out_dir", str(tmp_path / "run"), "--dry-run"]
    assert main(argv) == 0
    # tiny: 8 sequences of 64 tokens on each of 2 x 4 ranks = 4,096 tokens a step
    assert "# max_steps 244 from train.max_tokens=1,000,000 (4,096 tokens a step)\n" in capsys.readouterr().err
    assert main([*argv[:-1], "--train.max_tokens", "1000", "--dry-run"]) == 2
    assert "train.max_tokens=1,000 is less than one optimizer step, which costs 4,096 tokens" in capsys.readouterr().err
