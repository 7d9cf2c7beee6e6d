"""What a run's start would refuse, asked before anything is spent on it.

Launchers call `check_run_can_start` before they prepare data, queue a SLURM job or start the first run of a
sweep: a resume that the checkpoint cannot continue (tml/train/resume.py) and train.init_from weights of
another shape or with a truncated file (tml/pretrained.py), and a local data.source that is not there or holds
no text when shards are to be built, are then one line at once, not an error after minutes of data preparation or
in a job's log. Nothing is written and no tensor is read; train() checks both again for itself. `describe_start`
is the same check said as a line of what the start would do, for `tml train --dry-run`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tml.config import Config, ConfigError, same_setting
from tml.data.config import DataConfig
from tml.data.shards import ShardIndex
from tml.files import what_blocks_directory
from tml.pretrained import check_start_from
from tml.train.budget import describe_budget, horizon_key
from tml.train.checkpoint import branches_another_run
from tml.train.optim import branch_schedule_notes
from tml.train.resume import resume_checkpoint
from tml.train.run_lock import RunLockError, training_in_progress


def check_run_can_start(config: Config) -> tuple[Path | None, dict[str, Any], list[str]]:
    """Raises CheckpointError, naming the file or setting, for a run that would be refused at its start, and
    GutenbergError for a local data.source that is not there or holds no text; returns resume_checkpoint's
    (checkpoint to resume or None, its meta.json, the settings changed since)."""
    check_data_source(config.data)
    resume = resume_checkpoint(config)
    if config.train.init_from and resume[0] is None:
        check_start_from(config.train.init_from, config.model)
    return resume


def ignored_init_from(config: Config, meta: dict[str, Any]) -> bool:
    """True when a resumed run is given another train.init_from than it started from (meta: its checkpoint's):
    the resume continues its own weights and ignores it."""
    given = config.train.init_from
    return bool(given) and not same_setting("train.init_from", meta["config"]["train"].get("init_from"), given)


def check_data_source(data: DataConfig) -> None:
    """Shards to be built need a local data.source that is there and holds .txt files (GutenbergError): the start's
    data preparation stops at once otherwise, after the queue or, in a sweep, after the runs before it. Its files
    are listed, not read."""
    from tml.data.gutenberg import local_corpus
    from tml.data.prepare import data_is_ready, is_local

    if is_local(data) and not data_is_ready(data):
        local_corpus(data)


def check_vocabulary(config: Config) -> None:
    """The shards' token ids must all have a row in the embedding; cheap (the index only), so checked first."""
    data_vocab = ShardIndex.load(config.data.shard_dir, scan_tokens=False).vocab_size
    if data_vocab > config.model.vocab_size:
        raise ConfigError(f"model.vocab_size={config.model.vocab_size} is smaller than the vocabulary of the shards "
                          f"in {config.data.shard_dir} ({data_vocab}): token ids would fall outside the embedding; "
                          f"set --model.vocab_size {data_vocab} or more")


def describe_start(config: Config) -> str:
    """What starting this run now would do, in a line (`--dry-run`): fresh, from init_from's weights, resumed from
    step N (with the settings changed since), or nothing left to train. Raises what the start itself would raise
    first: RunLockError (another training holds the run, or a file stands where its directory would be),
    PrepareError (a file where the shards would be), CheckpointError (its resume or init_from), GutenbergError (a
    local data.source that is not there or holds no .txt files), ConfigError (shards with more tokens than the
    model's vocabulary, an accelerator this machine lacks). Reads no tensor and writes nothing."""
    from tml.data.prepare import PrepareError, data_is_ready, shards_without_source
    from tml.train.fabric import check_accelerator

    train = config.train
    if (holder := training_in_progress(train.out_dir)) is not None:
        raise RunLockError(f"{train.out_dir} is in use by another training ({holder}): a start would be refused")
    for directory, error in ((train.out_dir, RunLockError), (config.data.shard_dir, PrepareError)):
        if (reason := what_blocks_directory(Path(directory))) is not None:
            raise error(f"cannot make {directory}: {reason}")
    resume_dir, meta, changed = check_run_can_start(config)
    check_accelerator(train)
    if ready := data_is_ready(config.data):
        check_vocabulary(config)
    budget = describe_budget(config)
    if resume_dir is None:
        start = f"starts from the weights of {train.init_from}" if train.init_from else "starts fresh"
        start += "" if budget else f", {train.max_steps:,} steps"  # else said with the budget it comes from
    else:
        if (step := int(meta["step"])) >= train.max_steps:
            start = (f"already at step {step:,} of train.max_steps {train.max_steps:,}: validates once, trains "
                     f"nothing (a larger --{horizon_key(train)} continues it)")
        else:
            start = f"resumes {resume_dir} at step {step:,} of {train.max_steps:,}"
            if branches_another_run(resume_dir, train.out_dir):
                notes = branch_schedule_notes(Config.from_dict(meta["config"]).train, train, step)
                start += " as a branch (a run of its own)" + "".join(f"; {note}" for note in notes)
            if changed:
                start += f" (changed since: {'; '.join(changed)})"
        if ignored_init_from(config, meta):
            start += f"; train.init_from={train.init_from} ignored: the run resumes its own weights"
    if budget:
        start += f"; {budget}"
    data = "its shards are ready" if ready else "prepares its shards first"
    if ready and (standing_alone := shards_without_source(config.data)):
        return f"{start}; {standing_alone}"
    return f"{start}; {data} ({config.data.shard_dir})"
