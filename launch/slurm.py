"""Train on a SLURM cluster: `python launch/slurm.py --config FILE --nodes N [SLURM options] [--section.key value]`.

Prepares the token shards here (once, before anything is queued), then submits one Submitit job whose tasks all
run `tml.train.loop.train`. Prints the job id and where its logs go; `--dry-run` prints the sbatch script and
submits nothing; `--wait` blocks until the job has finished (through requeues) and exits with its status.
See docs/slurm.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from tml.config import ConfigError, load_config  # noqa: E402
from tml.slurm import (  # noqa: E402
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
    render_sbatch,
    submit,
    task_log,
    wait,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launch/slurm.py",
        description="Submit a tml training run to SLURM (one task per device on every node).",
        epilog="Every other argument is the experiment: --config FILE and --section.key value overrides, as for "
        "launch/local.py (python launch/local.py --help lists them).",
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, experiment = parser.parse_known_args(argv)
    try:
        config = load_config(experiment)
        resources = SlurmResources(
            nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
            partition=args.partition, account=args.account, qos=args.qos, time=args.time, mem=args.mem,
            cpus_per_task=args.cpus_per_task, constraint=args.constraint, job_name=args.job_name,
            signal_delay_s=args.signal_delay, max_requeues=args.max_requeues,
        )
    except (ConfigError, SlurmRequestError) as error:
        print(f"launch/slurm.py: {error}", file=sys.stderr)
        return 2
    config, notices = config_for_job(config, resources)
    for notice in notices:
        print(f"launch/slurm.py: {notice}", file=sys.stderr)
    folder = log_folder(config)

    if args.dry_run:
        print(f"# {resources.describe()}; nothing submitted (--dry-run)", file=sys.stderr)
        print(render_sbatch(resources, folder))
        return 0

    from tml.data.gutenberg import GutenbergError
    from tml.data.prepare import PrepareError, data_is_ready, prepare_data
    from tml.data.shards import ShardError
    from tml.train.checkpoint import CheckpointError, resume_checkpoint

    try:
        resume_checkpoint(config)  # a resume the run would refuse is refused here, before data or the queue
        if not data_is_ready(config.data):  # here, once, rather than racing in every task
            prepare_data(config.data)
    except (GutenbergError, PrepareError, ShardError, ConfigError, CheckpointError) as error:  # as `tml train`
        print(f"launch/slurm.py: {error}", file=sys.stderr)
        return 1
    try:
        job = submit(make_executor(resources, folder), TrainTask(config))
    except (SlurmSubmitError, RuntimeError) as error:  # RuntimeError: Submitit finds no srun here
        print(f"launch/slurm.py: {error}", file=sys.stderr)
        return 1
    rank0_log = task_log(folder, job.job_id, 0)
    print(f"submitted job {job.job_id}: {resources.describe()}")
    print(f"  logs        {folder}/{job.job_id}_<rank>_log.out (one per task)")
    print(f"  follow      tail -f {rank0_log}")
    print(f"  state       squeue -j {job.job_id}        cancel: scancel {job.job_id}")
    print(f"  checkpoints {Path(config.train.out_dir) / 'checkpoints'}")
    if config.log.tensorboard:
        print(f"  tensorboard tensorboard --logdir {Path(config.train.out_dir) / 'tensorboard'}")
    sys.stdout.flush()
    if not args.wait:
        return 0
    try:
        status, result = wait(job)
    except KeyboardInterrupt:
        print(f"\nstopped waiting; job {job.job_id} keeps running (scancel {job.job_id} stops it)")
        return 130
    if result is not None:
        print(f"job {job.job_id} finished: step {result.final_step}, best val loss {result.best_val_loss:.4f}, "
              f"stopped early {result.stopped_early}")
    return status


if __name__ == "__main__":
    sys.exit(main())
