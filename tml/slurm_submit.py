"""`tml slurm --config FILE --nodes N [SLURM options] [--section.key value]`: train on a SLURM cluster.

Prepares the token shards here (once, before anything is queued), then submits one Submitit job whose tasks all
run `tml.train.loop.train`. Prints the job id and where its logs go; `--dry-run` prints the sbatch script and
submits nothing; `--wait` blocks until the job has finished (through requeues) and exits with its status.
`--sweep KEY=V1,V2` (tml/sweep.py) submits one such job per combination, each checked before any is queued.
launch/slurm.py is the same command for a checkout; what a job does once it runs is tml/slurm.py's. See docs/slurm.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tml.config import Config, ConfigError, load_config, with_default_config
from tml.files import what_blocks_directory
from tml.run_dir import another_runs_config
from tml.slurm import (
    DEFAULT_JOB_NAME,
    DEFAULT_TIME,
    MAX_TIMEOUT_REQUEUES,
    SIGNAL_DELAY_S,
    SlurmRequestError,
    SlurmResources,
    SlurmSubmitError,
    TrainTask,
    config_for_job,
    log_folder,
    make_executor,
    queued_job,
    render_sbatch,
    submit,
    task_log,
    wait,
)
from tml.sweep import (
    SweepError,
    expand_sweep,
    has_ended,
    is_sweep,
    refuse_another_run_in_its_place,
    split_sweep_arguments,
)
from tml.train.budget import describe_budget
from tml.train.config import TrainConfigError

if TYPE_CHECKING:
    from submitit.slurm.slurm import SlurmJob


def build_parser(prog: str = "tml slurm") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Submit a tml training run to SLURM (one task per device on every node).",
        epilog="Every other argument is the experiment: --config FILE and --section.key value overrides, as for "
        "tml train or launch/local.py (tml train --help lists them), and --sweep KEY=V1,V2,... (repeatable): one "
        "job per combination of the values, each run in its own directory under train.out_dir.",
        allow_abbrev=False,  # `--t` must not silently mean --time, nor a config key's prefix a SLURM option
    )
    slurm = parser.add_argument_group("SLURM request")
    slurm.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    slurm.add_argument("--gpus-per-node", type=int, default=1,
                       help="GPUs per node, one task each (default 1); 0 = CPU tasks, see --tasks-per-node")
    slurm.add_argument("--tasks-per-node", type=int, default=None,
                       help="tasks per node; only for CPU jobs (--gpus-per-node 0), otherwise it equals the GPUs")
    slurm.add_argument("--partition", help="partition (queue) to submit to")
    slurm.add_argument("--account", help="account to charge")
    slurm.add_argument("--qos", help="quality of service")
    slurm.add_argument("--time", default=DEFAULT_TIME, help=f"time limit per run of the job (default {DEFAULT_TIME})")
    slurm.add_argument("--mem", help="memory per node, SLURM syntax (64G, 500M; 0 = all)")
    slurm.add_argument("--cpus-per-task", type=int, help="CPUs per task (data loading workers + 1 is a good start)")
    slurm.add_argument("--constraint", help="node features required, SLURM syntax (a100&ib)")
    slurm.add_argument("--job-name", default=DEFAULT_JOB_NAME, help=f"job name (default {DEFAULT_JOB_NAME})")
    slurm.add_argument("--signal-delay", type=int, default=SIGNAL_DELAY_S,
                       help=f"seconds before the time limit to save and requeue (default {SIGNAL_DELAY_S})")
    slurm.add_argument("--max-requeues", type=int, default=MAX_TIMEOUT_REQUEUES,
                       help=f"time-limit requeues before giving up (default {MAX_TIMEOUT_REQUEUES})")
    run = parser.add_argument_group("launcher")
    run.add_argument("--dry-run", action="store_true", help="print the sbatch script, submit nothing")
    run.add_argument("--wait", action="store_true", help="block until the job ends; exit with its status")
    return parser


def experiment_runs(experiment: list[str]) -> list[tuple[str | None, Config]]:
    """(name, config) of each run to submit: one unnamed run, or one per combination of a `--sweep`."""
    if not is_sweep(experiment):
        return [(None, load_config(experiment))]
    return [(run.name, run.config) for run in expand_sweep(*split_sweep_arguments(experiment))]


def main(argv: Sequence[str] | None = None, prog: str = "tml slurm") -> int:
    """`tml slurm` / launch/slurm.py (prog names which, in usage and messages). Exit status: 0 when submitted (with
    --wait: when every job succeeded, else the first failure's), 1 when a run cannot start or a submission fails,
    2 on a bad config or request, 130 when Ctrl-C stops the waiting."""
    parser = build_parser(prog)
    args, experiment = parser.parse_known_args(None if argv is None else list(argv))
    experiment = with_default_config(experiment)  # the reference setup, as tml train runs without --config
    try:
        runs = experiment_runs(experiment)
        resources = SlurmResources(
            nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
            partition=args.partition, account=args.account, qos=args.qos, time=args.time, mem=args.mem,
            cpus_per_task=args.cpus_per_task, constraint=args.constraint, job_name=args.job_name,
            signal_delay_s=args.signal_delay, max_requeues=args.max_requeues,
        )
        # The job's devices and nodes: a token or FLOPs budget is turned into steps again for its global batch.
        for_jobs = [config_for_job(config, resources) for _, config in runs]
    except (ConfigError, SlurmRequestError, SweepError, TrainConfigError) as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 2
    if not is_sweep(experiment) and (notice := another_runs_config(experiment, runs[0][1].train.out_dir)):
        print(f"{prog}: {notice}", file=sys.stderr)
    for notice in dict.fromkeys(notice for _, notices in for_jobs for notice in notices):  # a sweep's: said once
        print(f"{prog}: {notice}", file=sys.stderr)
    runs = [(name, config) for (name, _), (config, _) in zip(runs, for_jobs, strict=True)]

    if args.dry_run:
        from tml.data.gutenberg import GutenbergError
        from tml.train.checkpoint import CheckpointError

        try:  # what the submission checks before the queue (a run that ended is not submitted: not checked)
            for _, config in runs:
                if not has_ended(config):
                    check_before_the_queue(config)
        except (CheckpointError, GutenbergError, ConfigError, OSError) as error:
            print(f"{prog}: {error}", file=sys.stderr)
            return 1
        print(f"# {resources.describe()}; nothing submitted (--dry-run)", file=sys.stderr)
        if len(runs) > 1:
            print(f"# a sweep of {len(runs)} jobs, this script for each with its run's folder: "
                  + ", ".join(str(name) for name, _ in runs), file=sys.stderr)
        for name, config in runs:  # the job's global batch decides the steps a budget buys
            if budget := describe_budget(config):
                print(f"# {name + ': ' if name else ''}{budget}", file=sys.stderr)
        print(render_sbatch(resources, log_folder(runs[0][1])))
        return 0

    from tml.data.gutenberg import GutenbergError
    from tml.data.prepare import PrepareError, data_is_ready, prepare_data, shards_without_source
    from tml.data.shards import ShardError
    from tml.train.checkpoint import CheckpointError

    if is_sweep(experiment):  # maybe submitted again: queue only what is left to do
        try:
            runs = [(name, config) for name, config in runs if not left_out_of_the_queue(name, config)]
        except SweepError as error:
            print(f"{prog}: {error}", file=sys.stderr)
            return 2
        if not runs:
            print(f"{prog}: every run of the sweep has ended or is being trained: nothing to submit")
            return 0
    elif (taken := already_taken(runs[0][1])) is not None:  # a second job would only be refused by the first's lock
        print(f"{prog}: {runs[0][1].train.out_dir} {taken}: not submitted", file=sys.stderr)
        return 1
    try:
        for _, config in runs:
            check_before_the_queue(config)
            if not data_is_ready(config.data):  # here, once, rather than racing in every task
                prepare_data(config.data)
            elif standing_alone := shards_without_source(config.data):
                print(f"{prog}: {standing_alone}", file=sys.stderr)
    except (GutenbergError, PrepareError, ShardError, ConfigError, CheckpointError, OSError) as error:  # as `tml train`
        print(f"{prog}: {error}", file=sys.stderr)
        return 1
    jobs = []
    for name, config in runs:
        folder = log_folder(config)
        try:
            job = submit(make_executor(resources, folder), TrainTask(config))
        except (SlurmSubmitError, RuntimeError, OSError) as error:  # RuntimeError: Submitit finds no srun here
            print(f"{prog}: {error}", file=sys.stderr)
            if jobs:
                print(f"{prog}: jobs already submitted keep running: {' '.join(j.job_id for j in jobs)}",
                      file=sys.stderr)
            return 1
        jobs.append(job)
        print_submitted(job, resources, config, folder, name)
    sys.stdout.flush()
    if not args.wait:
        return 0
    statuses = []
    for position, job in enumerate(jobs):
        try:
            status, result = wait(job)
        except KeyboardInterrupt:
            left = [other.job_id for other in jobs[position:]]
            running = " ".join(left)
            print("\nstopped waiting; " + (f"job {running} keeps running (scancel {running} stops it)" if len(left) == 1
                  else f"jobs {running} keep running (scancel {running} stops them)"))
            return 130
        if result is not None:
            print(f"job {job.job_id} finished: step {result.final_step}, best val loss {result.best_val_loss:.4f}, "
                  f"stopped early {result.stopped_early}")
        statuses.append(status)
    return next((status for status in statuses if status != 0), 0)


def check_before_the_queue(config: Config) -> None:
    """What the run would refuse at its start, asked before data or the queue: a file (or a link to nothing) where
    its folder would be (NotADirectoryError), and tml train's own pre-check (its resume, its init_from weights, a
    local data.source without text)."""
    from tml.train.preflight import check_run_can_start

    if (reason := what_blocks_directory(log_folder(config))) is not None:
        raise NotADirectoryError(f"cannot make {config.train.out_dir}: {reason}")
    check_run_can_start(config)


def left_out_of_the_queue(name: str, config: Config) -> bool:
    """A sweep's run that ended, that a job is training, or whose job is still in the queue gets no job (said so);
    another run under its name is refused (SweepError)."""
    refuse_another_run_in_its_place(name, config)
    if has_ended(config):
        print(f"run {name}: {config.train.out_dir} already ended at its max_steps: not submitted")
        return True
    if (taken := already_taken(config)) is not None:
        print(f"run {name}: {config.train.out_dir} {taken}: not submitted")
        return True
    return False


def already_taken(config: Config) -> str | None:
    """Why the run already has a job (`is being trained (pid ...)`, `has job 12 still queued or running`), or None.
    A job waiting in the queue holds no run lock yet, so SLURM is asked too."""
    from tml.train.run_lock import training_in_progress

    if (holder := training_in_progress(config.train.out_dir)) is not None:
        return f"is being trained ({holder})"
    if (job_id := queued_job(log_folder(config))) is not None:
        return f"has job {job_id} still queued or running (scancel {job_id} first to replace it)"
    return None


def print_submitted(job: SlurmJob, resources: SlurmResources, config: Config, folder: Path, name: str | None) -> None:
    """Where the job's logs, checkpoints and curves are, and how to follow or stop it."""
    print(f"submitted job {job.job_id}: {resources.describe()}" + (f" (run {name})" if name else ""))
    print(f"  logs        {folder}/{job.job_id}_<rank>_log.out (one per task)")
    print(f"  follow      tail -f {task_log(folder, job.job_id, 0)}")
    print(f"  state       squeue -j {job.job_id}        cancel: scancel {job.job_id}")
    print(f"  checkpoints {Path(config.train.out_dir) / 'checkpoints'}")
    if config.log.tensorboard:
        print(f"  tensorboard tensorboard --logdir {Path(config.train.out_dir) / 'tensorboard'}")

