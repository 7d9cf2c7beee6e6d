"""tml/slurm.py without a cluster: the request, the sbatch script it renders, and the task-side settings."""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.slurm.conftest import LAUNCHER, REPO_ROOT
from tml.config import Config
from tml.slurm import (
    RENDEZVOUS_PORT_BASE,
    SlurmRequestError,
    SlurmResources,
    SlurmSubmitError,
    config_for_job,
    config_for_restart,
    job_state_line,
    make_executor,
    parse_time_limit,
    python_path_setup,
    render_sbatch,
    rendezvous_port,
    restart_count,
    submit,
)


def sbatch_options(script: str) -> dict[str, str]:
    return dict(line.removeprefix("#SBATCH --").split("=", 1) for line in script.splitlines()
                if line.startswith("#SBATCH --") and "=" in line)


def test_dry_run_for_two_nodes_of_eight_gpus_asks_one_task_per_gpu():
    dry_run = subprocess.run(
        [sys.executable, str(LAUNCHER), "--config", "configs/tiny.yaml", "--nodes", "2", "--gpus-per-node", "8",
         "--partition", "gpu", "--time", "2-00:00:00", "--dry-run"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )
    assert dry_run.returncode == 0, dry_run.stderr
    options = sbatch_options(dry_run.stdout)
    assert options["nodes"] == "2"
    assert options["ntasks-per-node"] == "8"
    assert options["gpus-per-node"] == "8"
    assert options["partition"] == "gpu"
    assert options["time"] == str(2 * 24 * 60)
    assert options["signal"].startswith("USR2@")
    assert "#SBATCH --requeue\n" in dry_run.stdout  # requeueable on clusters whose default (JobRequeue=0) is not
    assert "srun " in dry_run.stdout and "submitit.core._submit" in dry_run.stdout
    assert "nothing submitted" in dry_run.stderr


def test_gpu_tasks_per_node_must_equal_gpus_per_node():
    with pytest.raises(SlurmRequestError, match="--tasks-per-node 4 with --gpus-per-node 8"):
        SlurmResources(nodes=2, gpus_per_node=8, tasks_per_node=4)
    assert SlurmResources(nodes=2, gpus_per_node=8, tasks_per_node=8).devices_per_node == 8


def test_cpu_job_runs_tasks_per_node_processes_per_node():
    resources = SlurmResources(nodes=3, gpus_per_node=0, tasks_per_node=4)
    assert (resources.devices_per_node, resources.world_size, resources.accelerator) == (4, 12, "cpu")
    options = sbatch_options(render_sbatch(resources, "/runs/x/slurm"))
    assert options["ntasks-per-node"] == "4" and "gpus-per-node" not in options


def test_fabric_layout_comes_from_the_slurm_request(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = Config()
    config.train.devices, config.train.accelerator, config.train.out_dir = 2, "cpu", "runs/x"
    job_config, notices = config_for_job(config, SlurmResources(nodes=4, gpus_per_node=8))
    assert (job_config.train.devices, job_config.train.num_nodes, job_config.train.accelerator) == (8, 4, "cuda")
    assert job_config.train.out_dir == str(tmp_path / "runs" / "x")
    assert Path(job_config.data.shard_dir).is_absolute()
    assert len(notices) == 2 and "train.devices=2 replaced by 8" in notices[0]
    assert config.train.devices == 2  # the caller's config is left alone


def test_relative_paths_become_absolute_without_dot_dot(tmp_path, monkeypatch):
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")
    config = Config()
    config.data.source, config.train.out_dir = "../corpus", "../runs/./x"
    job_config, _ = config_for_job(config, SlurmResources(nodes=1, gpus_per_node=0, tasks_per_node=1))
    assert (job_config.data.source, job_config.train.out_dir) == (str(tmp_path / "corpus"), str(tmp_path / "runs" / "x"))
    assert job_config.data.source.count("..") == 0
    config.train.resume, config.train.init_from = "../runs/a/checkpoints/last", "../exports/model.pt"
    job_config, _ = config_for_job(config, SlurmResources(nodes=1, gpus_per_node=0, tasks_per_node=1))
    assert job_config.train.resume == str(tmp_path / "runs" / "a" / "checkpoints" / "last")
    assert job_config.train.init_from == str(tmp_path / "exports" / "model.pt")
    for word in ("auto", "none"):  # not paths
        config.train.resume = word
        assert config_for_job(config, SlurmResources(nodes=1, gpus_per_node=0, tasks_per_node=1))[0].train.resume == word
    for mirror, for_job in (("../mirror", str(tmp_path / "mirror")), ("https://example.org/pg", "https://example.org/pg"),
                            ("file:///srv/pg", "file:///srv/pg"), (None, None)):  # a directory, or a URL as it is
        config.data.mirror = mirror
        assert config_for_job(config, SlurmResources(nodes=1, gpus_per_node=0, tasks_per_node=1))[0].data.mirror == for_job


@pytest.mark.parametrize(
    ("limit", "minutes"),
    [("90", 90), ("1:30", 2), ("2:00:00", 120), ("1-2", 26 * 60), ("1-0:30", 24 * 60 + 30), ("0-0:0:59", 1)],
)
def test_slurm_time_formats_become_minutes(limit, minutes):
    assert parse_time_limit(limit) == minutes


@pytest.mark.parametrize("limit", ["", "1h", "24:00:00:00", "-5", "0", "1:2:3:4"])
def test_time_limits_slurm_would_not_understand_are_refused(limit):
    with pytest.raises(SlurmRequestError, match="--time"):
        parse_time_limit(limit)


@pytest.mark.parametrize(
    ("field", "value", "option"),
    [
        ("partition", "debug\nrm -rf ~", "--partition"),
        ("partition", "debug; rm -rf ~", "--partition"),
        ("account", "$(whoami)", "--account"),
        ("qos", "high normal", "--qos"),
        ("constraint", "a100`id`", "--constraint"),
        ("mem", "64G; reboot", "--mem"),
        ("job_name", "ok\n#SBATCH --nodes=100", "--job-name"),
        ("time", "10\nhostname", "--time"),
        ("job_name", "interactive", "--job-name"),
    ],
)
def test_values_that_could_escape_into_the_script_are_refused(field, value, option):
    with pytest.raises(SlurmRequestError, match=option):
        SlurmResources(**{field: value})


def test_the_rendered_script_passes_hostile_text_to_srun_as_plain_arguments(tmp_path):
    """Run the script with a stand-in `srun` that records its argv: nothing may be executed by the shell."""
    marker = tmp_path / "injected"
    folder = tmp_path / f"logs $(touch {marker}) ';touch {marker}'"
    script = render_sbatch(SlurmResources(gpus_per_node=0, job_name=f"x'; touch {marker} #"), folder)
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    srun = fake_bin / "srun"
    srun.write_text('#!/bin/sh\nfor arg in "$@"; do printf "%s\\n" "$arg"; done > "$SRUN_ARGS"\n')
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    (tmp_path / "job.sh").write_text(script)
    env = {**os.environ, "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}", "SRUN_ARGS": str(tmp_path / "argv")}
    subprocess.run(["bash", str(tmp_path / "job.sh")], env=env, check=True, timeout=30)
    argv = (tmp_path / "argv").read_text().splitlines()
    assert not marker.exists()
    assert argv[-1] == str(folder)  # the folder reaches Submitit as one literal argument
    assert f"{folder}/%j_%t_log.out" in argv


def test_rendezvous_port_is_the_same_for_all_tasks_and_differs_between_jobs_and_restarts():
    ports = {rendezvous_port(job, restarts) for job in range(1000, 1100) for restarts in range(4)}
    assert len(ports) == 400
    assert all(RENDEZVOUS_PORT_BASE <= port < 32768 for port in ports)  # below Linux's ephemeral range
    assert rendezvous_port(123456, 1) == rendezvous_port(123456, 1)


def test_a_restarted_job_resumes_from_last_only_when_it_exists(tmp_path):
    config = Config()
    config.train.out_dir, config.train.resume = str(tmp_path), "/pretrained/step-0001000"
    assert config_for_restart(config).train.resume == "/pretrained/step-0001000"  # killed before any save
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last").symlink_to("step-0000010")
    assert config_for_restart(config).train.resume == "auto"


def test_a_restarted_job_resumes_its_step_directory_when_last_was_never_pointed(tmp_path):
    config = Config()
    config.train.out_dir, config.train.resume = str(tmp_path), "none"
    (tmp_path / "checkpoints" / "step-0000010").mkdir(parents=True)  # killed before `last` pointed at it
    assert config_for_restart(config).train.resume == "auto"


def test_restart_count_reads_slurms_counter(monkeypatch):
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert restart_count() == 0
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert restart_count() == 2


def test_launcher_reports_a_bad_request_without_a_traceback():
    launched = subprocess.run(
        [sys.executable, str(LAUNCHER), "--config", "configs/tiny.yaml", "--gpus-per-node", "8",
         "--tasks-per-node", "2", "--dry-run"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )
    assert launched.returncode == 2
    assert "--tasks-per-node 2 with --gpus-per-node 8" in launched.stderr
    assert "Traceback" not in launched.stderr


def run_launcher(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(LAUNCHER), "--config", "configs/tiny.yaml", "--gpus-per-node", "0",
                           *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)


def test_launcher_refuses_a_bad_train_value_before_submitting(tmp_path):
    launched = run_launcher("--train.batch_size", "0", "--train.out_dir", str(tmp_path / "run"))
    assert launched.returncode == 2
    assert launched.stderr.strip() == "launch/slurm.py: train.batch_size=0: must be at least 1"
    assert not (tmp_path / "run").exists()


def test_launcher_reports_a_data_preparation_failure_in_one_line(tmp_path):
    missing = tmp_path / "no-such-books"
    launched = run_launcher("--data.source", str(missing), "--data.shard_dir", str(tmp_path / "shards"),
                            "--train.out_dir", str(tmp_path / "run"))
    assert launched.returncode == 1
    assert launched.stderr.strip().splitlines() == [
        f"launch/slurm.py: data.source={str(missing)!r} is neither 'gutenberg' nor an existing directory of "
        ".txt or .jsonl files or such a file"]
    assert not (tmp_path / "run" / "slurm").exists()


def test_launcher_refuses_weights_it_cannot_start_from_before_data_or_the_queue(tmp_path):
    launched = run_launcher("--train.init_from", str(tmp_path / "gone"), "--train.out_dir", str(tmp_path / "run"),
                            "--data.shard_dir", str(tmp_path / "shards"))
    assert launched.returncode == 1
    assert launched.stderr.strip() == (f"launch/slurm.py: train.init_from={tmp_path / 'gone'}: no such run directory, "
                                       "checkpoint or exported file")
    assert not (tmp_path / "run").exists() and not (tmp_path / "shards").exists()
    dry_run = run_launcher("--train.init_from", str(tmp_path / "gone"), "--train.out_dir", str(tmp_path / "run"),
                           "--dry-run")  # refused as the submission would be, not printed as if it would run
    assert dry_run.returncode == 1 and dry_run.stderr == launched.stderr and dry_run.stdout == ""


def test_a_file_where_the_runs_folder_would_be_is_refused_in_one_line_before_data_or_the_queue(tmp_path):
    (tmp_path / "file").write_text("x")
    for dry_run in ((), ("--dry-run",)):
        launched = run_launcher("--train.out_dir", str(tmp_path / "file" / "run"), "--data.shard_dir",
                                str(tmp_path / "shards"), *dry_run)
        assert launched.returncode == 1 and launched.stdout == ""
        assert launched.stderr == (f"launch/slurm.py: cannot make {tmp_path / 'file' / 'run'}: {tmp_path / 'file'} is "
                                   "a file, not a directory\n")
    assert not (tmp_path / "shards").exists()


def test_a_sweep_submitted_again_queues_no_job_for_runs_in_training_and_refuses_another_run_in_a_runs_place(tmp_path):
    from tml.config import dump_yaml, load_config
    from tml.train.run_lock import hold_run_lock

    sweep = ["--train.out_dir", str(tmp_path / "sweep"), "--data.shard_dir", str(tmp_path / "shards"),
             "--sweep", "train.lr=1e-3,3e-3"]
    with hold_run_lock(tmp_path / "sweep" / "lr=1e-3"), hold_run_lock(tmp_path / "sweep" / "lr=3e-3"):
        launched = run_launcher(*sweep)  # both runs' jobs still training: no job, and no cluster needed to say so
    assert launched.returncode == 0, launched.stderr
    assert launched.stdout.count("is being trained (pid ") == 2 and "nothing to submit" in launched.stdout

    other = load_config(["--config", "configs/tiny.yaml", "--model.attention", "mha"])  # another sweep's run
    (tmp_path / "sweep" / "lr=1e-3" / "config.yaml").write_text(dump_yaml(other))
    launched = run_launcher(*sweep)
    assert launched.returncode == 2
    assert launched.stderr.startswith("launch/slurm.py: sweep run lr=1e-3: ") and "model.attention 'mha' there, " \
        "'mla' here" in launched.stderr and not (tmp_path / "shards").exists()


@pytest.fixture
def refusing_sbatch(tmp_path, monkeypatch):
    """An `sbatch` that refuses every job as SLURM does (message on stderr, status 1), and an `srun` for Submitit's
    check that it runs on a cluster: a real refusal needs a cluster (tests/slurm/test_dev_cluster.py has one)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("sbatch", "echo 'sbatch: error: invalid partition specified: nope' >&2\nexit 1"),
                       ("srun", "exit 1")):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_refused_submission_removes_the_files_and_folder_it_made(tmp_path, refusing_sbatch):
    folder = tmp_path / "run" / "slurm"
    with pytest.raises(SlurmSubmitError, match="invalid partition"):
        submit(make_executor(SlurmResources(gpus_per_node=0, time="5"), folder), print)
    assert not folder.exists()


def test_refused_submission_keeps_what_was_in_the_folder_before(tmp_path, refusing_sbatch):
    folder = tmp_path / "slurm"
    folder.mkdir()
    earlier = [folder / "123_submitted.pkl", folder / "123_0_log.out", folder / f"{'a' * 32}.pkl"]
    for path in earlier:
        path.write_text("from an earlier job")
    with pytest.raises(SlurmSubmitError):
        submit(make_executor(SlurmResources(gpus_per_node=0, time="5"), folder), print)
    assert sorted(folder.iterdir()) == sorted(earlier)


def test_job_state_line_shows_a_reason_only_when_slurm_gives_one():
    assert job_state_line({"JobState": "PENDING", "Reason": "Resources"}, "UNKNOWN") == "PENDING (Resources)"
    assert job_state_line({"JobState": "RUNNING", "Reason": "None"}, "UNKNOWN") == "RUNNING"
    assert job_state_line({}, "COMPLETED") == "COMPLETED"  # scontrol forgot the job: Submitit's view


def test_a_bare_time_limit_is_described_in_minutes():
    assert SlurmResources(nodes=1, time="30").describe().endswith("time limit 30 min")
    assert SlurmResources(nodes=1, time="4:00:00").describe().endswith("time limit 4:00:00")


@pytest.mark.skipif(sys.version_info < (3, 11), reason="PYTHONSAFEPATH is Python 3.11's")
def test_a_jobs_tasks_import_the_submitting_tml_not_a_tml_folder_in_the_submission_directory(tmp_path):
    (tmp_path / "tml").mkdir()
    (tmp_path / "tml" / "__init__.py").write_text("raise ImportError('the tml folder in the submission directory')\n")
    script = f"{python_path_setup()}\n{shlex.quote(sys.executable)} -m tml.cli --version\n"
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={key: value for key, value in os.environ.items() if key != "PYTHONPATH"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("tml ")
    assert python_path_setup() in render_sbatch(SlurmResources(nodes=1), tmp_path)
