"""Run `tml.train.loop.train(config)` as a SLURM job through Submitit: one task per device on every node.

Three things here are easy to get wrong on a real cluster, so they are decided in one place:

- Task layout. Submitit's `srun` starts `tasks_per_node` processes on each of `nodes` nodes, and Fabric (which
  recognises SLURM from the `SLURM_*` variables) expects exactly `train.devices` processes per node on
  `train.num_nodes` nodes. Both pairs are set here from the same `SlurmResources`, so the mismatch that hangs
  Fabric at "Initializing distributed" cannot be requested.
- Rendezvous. Every task gets the same MASTER_ADDR (the job's first node) and a MASTER_PORT derived from the job
  id, so two jobs sharing a node never race for one port and a requeued job does not reuse its old one.
- Preemption. SLURM sends the warning signal (`--signal=USR2@N`) to every task N seconds before the time
  limit, and SIGTERM to every task when the job is preempted, requeued or cancelled. The training loop's flag
  handler catches both; the loop all-reduces the flag, saves `last` on every rank together and returns
  `preempted=True`. Only then is Submitit's own handler (which requeues at once and exits, so it must not run
  before the checkpoint exists) given the warning signal again on rank 0: it calls `TrainTask.checkpoint`
  and `scontrol requeue`s the job. On SIGTERM SLURM itself decides (requeue on preemption or
  `scontrol requeue`, nothing on `scancel`), so the tasks just exit. A restarted task resumes from
  `checkpoints/last`, with the wandb run id stored in that checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import FailedJobError, JobPaths, UncompletedJobError

# The renderer SlurmExecutor itself writes its sbatch file with; --dry-run prints its output for the same
# parameters, so what is shown is what would be submitted.
from submitit.slurm.slurm import SlurmJob, _make_sbatch_string

from tml.config import Config
from tml.run_dir import RESUME_WORDS
from tml.sweep import checkout_root

# Seconds before the time limit at which SLURM sends the warning signal: room to finish the current step and
# write `last` (Submitit's default of 90 s is tight for a multi-GB checkpoint on a shared file system).
SIGNAL_DELAY_S = 120
# Time-limit requeues allowed before the job gives up: a week of 24 h jobs is 7; the cap only stops a job that
# never gets anywhere from requeueing forever. Preemptions (SIGTERM) do not count.
MAX_TIMEOUT_REQUEUES = 100
DEFAULT_TIME = "24:00:00"
DEFAULT_JOB_NAME = "tml"
# MASTER_PORT = base + (job id mod slots) * restarts-slots + (restart mod restart-slots): 10000-29999, below
# Linux's ephemeral range (32768+) so no outgoing connection holds it; distinct for any two jobs whose ids
# differ by less than 5000 and for four consecutive restarts of one job.
RENDEZVOUS_PORT_BASE = 10_000
RENDEZVOUS_JOB_SLOTS = 5_000
RENDEZVOUS_RESTART_SLOTS = 4
# SLURM job states in which a job will still train (or is training): a run with such a job gets no second one.
QUEUED_STATES = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                 "RESIZING", "SUSPENDED", "STOPPED")
# How often `--wait` asks SLURM for the job's state; the result file itself is looked for every second.
WAIT_POLL_S = 10
# Fabric ignores SLURM for jobs with these names (its convention for interactive allocations), so a job named
# like this would run every task as a separate single-process training.
FABRIC_INTERACTIVE_JOB_NAMES = ("bash", "interactive")

# Names SLURM accepts for partitions, accounts and QOS (comma lists for several partitions); constraints add
# the feature operators. Anything else (spaces, quotes, `$`, `;`, newlines) is refused before it gets near sbatch.
SLURM_NAME = re.compile(r"[A-Za-z0-9_.\-,+]+")
SLURM_CONSTRAINT = re.compile(r"[A-Za-z0-9_.\-,+&|*\[\]()!:]+")
SLURM_MEMORY = re.compile(r"[0-9]+[KMGT]?", re.IGNORECASE)
# SLURM's time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.
SLURM_TIME = re.compile(r"(?:(?P<days>\d+)-)?(?P<a>\d+)(?::(?P<b>\d+))?(?::(?P<c>\d+))?")
# Names Submitit gives a submission's files until sbatch returns a job id (then they become <job id>_*); the
# script's name has a leading dot since Submitit 1.5.2.
SUBMITIT_TEMPORARY_FILE = re.compile(r"[0-9a-f]{32}\.pkl|\.?submission_file_[0-9a-f]{32}\.sh")


class SlurmRequestError(ValueError):
    """A SLURM option that cannot be submitted; the message names the option and the value."""


class SlurmSubmitError(RuntimeError):
    """SLURM refused the job (sbatch's own message is included)."""


def parse_time_limit(value: str) -> int:
    """SLURM's time formats to whole minutes (rounded up): Submitit needs minutes to count time-outs."""
    match = SLURM_TIME.fullmatch(value.strip())
    if match is None:
        raise SlurmRequestError(
            f"--time {value!r}: use minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS (e.g. 24:00:00)"
        )
    days = int(match["days"] or 0)
    parts = [int(p) for p in (match["a"], match["b"], match["c"]) if p is not None]
    if match["days"] is not None:  # D-H[:M[:S]]
        hours, minutes, seconds = (parts + [0, 0])[:3]
    elif len(parts) == 3:  # H:M:S
        hours, minutes, seconds = parts
    elif len(parts) == 2:  # M:S
        hours, (minutes, seconds) = 0, parts
    else:  # M
        hours, minutes, seconds = 0, parts[0], 0
    total = days * 24 * 60 + hours * 60 + minutes + math.ceil(seconds / 60)
    if total < 1:
        raise SlurmRequestError(f"--time {value!r} is shorter than a minute")
    return total


def _check_text(option: str, value: str | None, pattern: re.Pattern[str] | None = None) -> None:
    if value is None:
        return
    if not value or any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise SlurmRequestError(f"{option} {value!r}: empty or contains control characters (newline, tab, ...)")
    if pattern is not None and not pattern.fullmatch(value):
        raise SlurmRequestError(f"{option} {value!r}: not a SLURM name (letters, digits and _ . - , + only)")


@dataclass(frozen=True)
class SlurmResources:
    """What the job asks SLURM for. `gpus_per_node=0` means a CPU job with `tasks_per_node` tasks per node."""

    nodes: int = 1
    gpus_per_node: int = 1
    tasks_per_node: int | None = None  # defaults to gpus_per_node (GPU) or 1 (CPU); must equal gpus_per_node
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = DEFAULT_TIME
    mem: str | None = None  # per node, SLURM syntax: 64G, 500M, 0 = all of it
    cpus_per_task: int | None = None
    constraint: str | None = None
    job_name: str = DEFAULT_JOB_NAME
    signal_delay_s: int = SIGNAL_DELAY_S
    max_requeues: int = MAX_TIMEOUT_REQUEUES

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise SlurmRequestError(f"--nodes {self.nodes}: at least 1")
        if self.gpus_per_node < 0:
            raise SlurmRequestError(f"--gpus-per-node {self.gpus_per_node}: 0 (CPU) or more")
        if self.tasks_per_node is not None and self.tasks_per_node < 1:
            raise SlurmRequestError(f"--tasks-per-node {self.tasks_per_node}: at least 1")
        if self.gpus_per_node and self.tasks_per_node not in (None, self.gpus_per_node):
            raise SlurmRequestError(
                f"--tasks-per-node {self.tasks_per_node} with --gpus-per-node {self.gpus_per_node}: Fabric runs one "
                "process per GPU, so tasks per node must equal GPUs per node (leave --tasks-per-node out)"
            )
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise SlurmRequestError(f"--cpus-per-task {self.cpus_per_task}: at least 1")
        if self.signal_delay_s < 1:
            raise SlurmRequestError(f"--signal-delay {self.signal_delay_s}: at least 1 second")
        if self.max_requeues < 0:
            raise SlurmRequestError(f"--max-requeues {self.max_requeues}: 0 or more")
        for option, value in (("--partition", self.partition), ("--account", self.account), ("--qos", self.qos)):
            _check_text(option, value, SLURM_NAME)
        _check_text("--constraint", self.constraint, SLURM_CONSTRAINT)
        _check_text("--job-name", self.job_name)
        if self.job_name in FABRIC_INTERACTIVE_JOB_NAMES:
            raise SlurmRequestError(
                f"--job-name {self.job_name!r}: Fabric treats jobs with this name as interactive and ignores SLURM"
            )
        _check_text("--mem", self.mem, SLURM_MEMORY)
        _check_text("--time", self.time)
        if self.time_minutes * 60 <= self.signal_delay_s:
            raise SlurmRequestError(
                f"--time {self.time} leaves no time before the preemption warning ({self.signal_delay_s} s)"
            )

    @property
    def devices_per_node(self) -> int:
        """Tasks per node = Fabric devices per node: the one number both SLURM and Fabric are given."""
        if self.gpus_per_node:
            return self.gpus_per_node
        return self.tasks_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.devices_per_node

    @property
    def accelerator(self) -> str:
        return "cuda" if self.gpus_per_node else "cpu"

    @property
    def time_minutes(self) -> int:
        return parse_time_limit(self.time)

    def describe(self) -> str:
        per_node = f"{self.gpus_per_node} GPU tasks" if self.gpus_per_node else f"{self.devices_per_node} CPU tasks"
        backend = "nccl" if self.gpus_per_node else "gloo"
        unit = " min" if self.time.isdigit() else ""  # SLURM reads a bare number as minutes
        return (f"{self.nodes} node(s) x {per_node} = {self.world_size} ranks ({backend}), "
                f"time limit {self.time}{unit}")


def executor_parameters(resources: SlurmResources) -> dict[str, Any]:
    """SlurmExecutor parameters (sbatch's names) for `resources`; every value is shell-quoted by Submitit."""
    params: dict[str, Any] = {
        "job_name": resources.job_name,
        "nodes": resources.nodes,
        "ntasks_per_node": resources.devices_per_node,
        "time": resources.time_minutes,
        "signal_delay_s": resources.signal_delay_s,
        # One log per task: the Rich console (stdout) and tracebacks (stderr) interleaved in order.
        "stderr_to_stdout": True,
        # A task that crashes ends the step at once instead of leaving the others blocked in an all-reduce
        # until the NCCL/gloo timeout.
        "srun_args": ["--kill-on-bad-exit=1"],
        "wckey": None,  # Submitit's default "submitit" would be charged on clusters that track wckeys
        # Requeueable whatever the cluster's default (JobRequeue=0 makes jobs not requeueable unless they ask):
        # the time-limit handler and preemption both continue the run by requeueing this job.
        "additional_parameters": {"requeue": True},
    }
    if resources.gpus_per_node:
        params["gpus_per_node"] = resources.gpus_per_node
    params["setup"] = [python_path_setup()]
    optional = {
        "partition": resources.partition,
        "account": resources.account,
        "qos": resources.qos,
        "mem": resources.mem,
        "cpus_per_task": resources.cpus_per_task,
        "constraint": resources.constraint,
    }
    params.update({key: value for key, value in optional.items() if value is not None})
    return params


def python_path_setup() -> str:
    """The sbatch line that makes every task import the tml that submitted the job, installed or a checkout, and
    (Python 3.11+) not a tml/ folder in the submission directory, which Submitit's `python -m` would put first."""
    if (root := checkout_root()) is None:  # installed: the job's interpreter (this one) finds it
        return "export PYTHONSAFEPATH=1"
    return f'export PYTHONSAFEPATH=1 PYTHONPATH={shlex.quote(root)}"${{PYTHONPATH:+:$PYTHONPATH}}"'


def submitit_command(folder: str | Path) -> str:
    """The command Submitit's sbatch script runs in every task (as SlurmExecutor builds it)."""
    return " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])


def render_sbatch(resources: SlurmResources, folder: str | Path) -> str:
    """The sbatch script `submit` would hand to SLURM, for --dry-run (needs no SLURM on this machine)."""
    return _make_sbatch_string(command=submitit_command(folder), folder=folder, **executor_parameters(resources))


def log_folder(config: Config) -> Path:
    """Submitit's folder: sbatch scripts, pickled tasks, results and one log per task, beside the run."""
    return Path(config.train.out_dir) / "slurm"


def task_log(folder: str | Path, job_id: str, task: int = 0) -> Path:
    return JobPaths(folder, job_id=job_id, task_id=task).stdout


def _absolute(path: str) -> str:
    """`../corpus` as /home/me/corpus: `..` removed, symlinks kept (os.path.abspath; Path.absolute keeps `..`)."""
    return os.path.abspath(Path(path).expanduser())


def config_for_job(config: Config, resources: SlurmResources) -> tuple[Config, list[str]]:
    """The config every task trains with: Fabric's layout from `resources`, paths absolute.

    Returns the new config and a notice for each setting the resources overrode. Paths are made absolute
    because the tasks' working directory is the submission directory only as long as nobody moves it.
    """
    train = config.train
    layout = {"devices": resources.devices_per_node, "num_nodes": resources.nodes,
              "accelerator": resources.accelerator}
    defaults = {"devices": 1, "num_nodes": 1, "accelerator": "auto"}  # values nobody chose on purpose
    notices = [
        f"train.{key}={getattr(train, key)!r} replaced by {value!r} (from the SLURM request)"
        for key, value in layout.items() if getattr(train, key) not in (value, defaults[key])
    ]
    data = config.data
    source = data.source if data.source == "gutenberg" else _absolute(data.source)
    resume = train.resume if train.resume in RESUME_WORDS else _absolute(train.resume)
    init_from = _absolute(train.init_from) if train.init_from else train.init_from
    mirror = _absolute(data.mirror) if data.mirror and "://" not in data.mirror else data.mirror  # a directory
    new = dataclasses.replace(
        config,
        train=dataclasses.replace(train, out_dir=_absolute(train.out_dir), resume=resume, init_from=init_from,
                                  **layout),
        data=dataclasses.replace(data, source=source, mirror=mirror, raw_dir=_absolute(data.raw_dir),
                                 shard_dir=_absolute(data.shard_dir)),
    )
    return new, notices


def restart_count() -> int:
    """How often SLURM has restarted this job (requeue, preemption, node failure); 0 on the first run."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


def config_for_restart(config: Config) -> Config:
    """A restarted job resumes its own checkpoints when there are any (else it keeps the original resume).

    Any step directory counts, not only `last`: a job killed between writing its first step and pointing `last`
    at it would otherwise restart with `resume: none`, which refuses an out_dir holding checkpoints.
    """
    from tml.train.checkpoint import describe_saved_run  # torch: only in the job, not for --dry-run

    if describe_saved_run(config.train.out_dir) is None:
        return config
    return dataclasses.replace(config, train=dataclasses.replace(config.train, resume="auto"))


def rendezvous_port(job_id: int, restarts: int) -> int:
    return (RENDEZVOUS_PORT_BASE + (job_id % RENDEZVOUS_JOB_SLOTS) * RENDEZVOUS_RESTART_SLOTS
            + restarts % RENDEZVOUS_RESTART_SLOTS)


def set_rendezvous(env: submitit.JobEnvironment) -> str:
    """MASTER_ADDR/PORT for torch.distributed, the same in every task; overrides values sbatch copied from the
    submitting shell (which would point every job at one stale address). Returns a line for the task's log."""
    os.environ["MASTER_ADDR"] = env.hostnames[0]
    os.environ["MASTER_PORT"] = str(rendezvous_port(int(env.raw_job_id), restart_count()))
    node = os.environ.get("SLURMD_NODENAME", env.hostname)
    return (f"tml.slurm: task {env.global_rank} of {env.num_tasks} (node {env.node}, local rank {env.local_rank})"
            f" on {node}, job {env.job_id} attempt {restart_count() + 1}, "
            f"rendezvous {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}")


class TrainTask(submitit.helpers.Checkpointable):
    """What every SLURM task runs: `train(config)`, then the hand-over to SLURM if it was preempted.

    Submitit's requeue hook (`Checkpointable.checkpoint`) resubmits this task unchanged: a restarted task sees
    SLURM_RESTART_COUNT > 0 and resumes from `last` itself, whichever way (signal or preemption) it was requeued.
    """

    def __init__(self, config: Config) -> None:
        self.config = config

    def __call__(self):  # -> tml.train.loop.TrainResult
        from tml.train.loop import train
        from tml.train.preemption import install_preemption_handler
        from tml.train.run_lock import hold_run_lock

        env = submitit.JobEnvironment()
        print(set_rendezvous(env), flush=True)
        # Rank 0 holds out_dir for the whole training. When another training holds it, RunLockError fails this
        # task (exit 1) and srun's --kill-on-bad-exit ends the others, still waiting for rank 0 at Fabric's
        # rendezvous. A requeued job finds it free: the old job's processes are gone, and the lock with them.
        with hold_run_lock(self.config.train.out_dir) if env.global_rank == 0 else contextlib.nullcontext():
            config = config_for_restart(self.config) if restart_count() else self.config
            # Installed before train() so that a signal during start-up is also turned into a save; the loop
            # restores Submitit's handlers (the ones replaced here) when it returns.
            preemption = install_preemption_handler()
            result = train(config, preemption)
        if result.preempted:
            hand_over_preemption(env, preemption.signal_number, result.final_step)
        return result


def hand_over_preemption(env: submitit.JobEnvironment, signal_number: int | None, step: int) -> None:
    """After the loop saved `last`: requeue when nobody else will, then leave without a result.

    The warning signal (time limit, or `scancel --signal`) leaves the requeue to us: rank 0 re-raises it, now that
    Submitit's handler is back, and Submitit checkpoints this task and requeues the job. After SIGTERM SLURM
    has already decided (requeued, preempted or cancelled). Either way no task writes a result, so `--wait`
    keeps waiting for the restarted job; exit status 0 so that srun's --kill-on-bad-exit leaves rank 0 alone.
    """
    name = signal.Signals(signal_number).name if signal_number else "a signal"
    print(f"tml.slurm: task {env.global_rank} preempted by {name} at step {step}; checkpoint saved", flush=True)
    if signal_number is not None and signal_number != signal.SIGTERM and env.global_rank == 0:
        signal.raise_signal(submitit.JobEnvironment._usr_sig())  # Submitit: checkpoint(), requeue, sys.exit
    raise SystemExit(0)


def make_executor(resources: SlurmResources, folder: str | Path) -> submitit.SlurmExecutor:
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=resources.max_requeues)
    executor.update_parameters(**executor_parameters(resources))
    return executor


def remove_submission_leftovers(folder: Path, before: set[str], created: bool) -> None:
    """Delete what Submitit wrote for a submission that got no job id: the pickled task and the sbatch script,
    still under the temporary names (`<uuid>.pkl`, `.submission_file_<uuid>.sh`) a successful submit renames."""
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if path.name not in before and SUBMITIT_TEMPORARY_FILE.fullmatch(path.name) and path.is_file():
            path.unlink()
    if created and not any(folder.iterdir()):
        folder.rmdir()


def submit(executor: submitit.SlurmExecutor, task: Any) -> SlurmJob:
    """Submit `task`; SLURM's refusal (bad partition, impossible request) becomes a SlurmSubmitError at once.

    A submission that fails leaves the log folder as it found it (and removes it again if it made it).
    """
    folder = Path(executor.folder)
    created = not folder.is_dir()
    before = set() if created else {path.name for path in folder.iterdir()}
    refusal = io.StringIO()
    try:
        with contextlib.redirect_stderr(refusal):  # Submitit echoes sbatch's stderr; it goes in the error instead
            return executor.submit(task)
    except BaseException as error:
        remove_submission_leftovers(folder, before, created)
        if isinstance(error, FailedJobError):
            message = str(error).strip() or refusal.getvalue().strip()
            raise SlurmSubmitError(f"SLURM refused the job:\n{message}") from None
        raise


def slurm_job_state(job_id: str) -> dict[str, str]:
    """JobState, Reason, ExitCode, ... from `scontrol show job` (finished jobs stay there for MinJobAge)."""
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def queued_job(folder: str | Path) -> str | None:
    """The id of a job submitted from `folder` (a run's Submitit folder) that SLURM still has pending or running:
    a run whose job waits in the queue holds no run lock yet, so this is how a second submission sees it."""
    # The newest only: an earlier job of the run has ended, or been requeued as this one.
    newest = max(Path(folder).glob("*_submission.sh"), key=lambda path: path.stat().st_mtime, default=None)
    if newest is None:
        return None
    job_id = newest.name.removesuffix("_submission.sh")
    return job_id if slurm_job_state(job_id).get("JobState") in QUEUED_STATES else None


def slurm_exit_code(job_id: str) -> int | None:
    """The job's exit code as a shell reports it (128 + signal when killed), or None when SLURM forgot it."""
    code = slurm_job_state(job_id).get("ExitCode")
    if not code or ":" not in code:
        return None
    status, sig = (int(part) for part in code.split(":", 1))
    return status or (128 + sig if sig else 0)


def wait(job: SlurmJob, poll_s: float = WAIT_POLL_S, out=sys.stdout) -> tuple[int, Any]:
    """Block until the job has finished for good (through any requeues); (exit status, rank 0's result)."""
    last_state, last_poll = "", 0.0
    while True:
        if time.monotonic() - last_poll >= poll_s:
            last_poll = time.monotonic()
            job.get_info(mode="force")
            state = job_state_line(slurm_job_state(job.job_id), job.state)
            if state != last_state:
                print(f"job {job.job_id}: {state}", file=out, flush=True)
                last_state = state
        if job.done():
            break
        time.sleep(1)
    try:
        results = job.results()
    except (UncompletedJobError, FailedJobError) as error:
        if slurm_job_state(job.job_id).get("JobState", "").startswith("CANCELLED"):  # not a failure: say so briefly
            print(f"job {job.job_id} was cancelled; its tasks save `last` on scancel's SIGTERM (submit again with "
                  "--train.resume auto to continue)", file=out, flush=True)
        else:
            print(f"job {job.job_id} failed:\n{error}", file=out, flush=True)
        return slurm_exit_code(job.job_id) or 1, None
    return 0, results[0]


def job_state_line(info: dict[str, str], fallback: str) -> str:
    """`RUNNING` or `PENDING (Resources)`: SLURM's state, with its reason when it gives one (it says "None")."""
    if not info:
        return fallback
    state, reason = info.get("JobState", fallback), info.get("Reason", "")
    return f"{state} ({reason})" if reason and reason != "None" else state
