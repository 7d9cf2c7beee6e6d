"""What a run's start would refuse, asked before anything is spent on it.

Launchers call `check_run_can_start` before they prepare data, queue a SLURM job or start the first run of a
sweep: a resume that the checkpoint cannot continue (tml/train/checkpoint.py) and train.init_from weights of
another shape (tml/pretrained.py) are then one line at once, not an error after minutes of data preparation or in
a job's log. Nothing is written and no tensor is read; train() checks both again for itself.
"""

from __future__ import annotations

from tml.config import Config
from tml.pretrained import check_start_from
from tml.train.checkpoint import resume_checkpoint


def check_run_can_start(config: Config) -> None:
    """Raises CheckpointError, naming the file or setting, for a run that would be refused at its start."""
    resume_dir, _, _ = resume_checkpoint(config)
    if config.train.init_from and resume_dir is None:
        check_start_from(config.train.init_from, config.model)
