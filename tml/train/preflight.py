"""What a run's start would refuse, asked before anything is spent on it.

Launchers call `check_run_can_start` before they prepare data, queue a SLURM job or start the first run of a
sweep: a resume that the checkpoint cannot continue (tml/train/checkpoint.py) and train.init_from weights of
another shape (tml/pretrained.py) are then one line at once, not an error after minutes of data preparation or in
a job's log. Nothing is written and no tensor is read; train() checks both again for itself. `describe_start`
is the same check said as a line of what the start would do, for `tml train --dry-run`.
"""

from __future__ import annotations

from tml.config import Config
from tml.pretrained import check_start_from
from tml.train.checkpoint import resume_checkpoint
from tml.train.run_lock import training_in_progress


def check_run_can_start(config: Config) -> None:
    """Raises CheckpointError, naming the file or setting, for a run that would be refused at its start."""
    resume_dir, _, _ = resume_checkpoint(config)
    if config.train.init_from and resume_dir is None:
        check_start_from(config.train.init_from, config.model)


def describe_start(config: Config) -> str:
    """What starting this run now would do, in a line (`--dry-run`): fresh, from init_from's weights, resumed from
    step N (with the settings changed since), or nothing left to train. Checks what check_run_can_start checks,
    raising the same CheckpointError; reads no tensor and writes nothing."""
    from tml.data.prepare import data_is_ready

    train = config.train
    if (holder := training_in_progress(train.out_dir)) is not None:
        return f"being trained now ({holder}): a start would be refused"
    check_run_can_start(config)
    resume_dir, meta, changed = resume_checkpoint(config)
    if resume_dir is None:
        start = f"starts from the weights of {train.init_from}" if train.init_from else "starts fresh"
        start += f", {train.max_steps:,} steps"
    elif (step := int(meta["step"])) >= train.max_steps:
        start = (f"already at step {step:,} of train.max_steps {train.max_steps:,}: validates once, trains nothing "
                 "(a larger --train.max_steps continues it)")
    else:
        start = f"resumes {resume_dir} at step {step:,} of {train.max_steps:,}"
        if changed:
            start += f" (changed since: {'; '.join(changed)})"
    data = "its shards are ready" if data_is_ready(config.data) else "prepares its shards first"
    return f"{start}; {data} ({config.data.shard_dir})"
