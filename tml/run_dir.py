"""The run directory's layout (train.out_dir): what a training writes where, read by training and by `tml compare`.

    {out_dir}/config.yaml          the resolved config, a comment line with the model's cost on top
    {out_dir}/summary.json         the final numbers, written when a run ends
    {out_dir}/train.lock           held by the training using out_dir (tml/train/run_lock.py)
    {out_dir}/tensorboard/         event files; wandb/ beside it with log.wandb
    {out_dir}/checkpoints/step-N/  complete checkpoints; `last` and `best` are symlinks to them, and a checkpoint
                                   set aside after a divergence is diverged-step-N/ (tml/train/checkpoint.py)

Kept free of torch and Lightning so that commands which only read a run directory start at once.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
CHECKPOINTS = "checkpoints"
STEP_DIR = re.compile(r"step-(\d+)")  # the names step_name() gives
RESUME_WORDS = ("", "none", "auto")  # train.resume values that are not a checkpoint path


def checkpoints_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / CHECKPOINTS


def step_name(step: int) -> str:
    return f"step-{step:07d}"


def saved_steps(out_dir: str | Path) -> list[int]:
    """Steps of the complete checkpoints in out_dir (a step directory only appears once its manifest is written)."""
    root = checkpoints_dir(out_dir)
    return sorted(int(match[1]) for p in root.glob("step-*") if (match := STEP_DIR.fullmatch(p.name)) and p.is_dir())


def newest_checkpoint(out_dir: str | Path, before: int | None = None) -> Path | None:
    """The newest complete step directory (of a step below `before`, when given), or None: where a resume falls
    back to, and what the messages about a missing or refused checkpoint point at."""
    steps = [step for step in saved_steps(out_dir) if before is None or step < before]
    return checkpoints_dir(out_dir) / step_name(max(steps)) if steps else None


def another_runs_config(argv: Sequence[str], out_dir: str) -> str | None:
    """A line when `--config` is a run's own config.yaml, in another directory than train.out_dir (which came from
    that file, not the command line): a run copied or renamed and started this way trains afresh where it was made,
    rather than continuing where it is now."""
    config_file = None
    for position, arg in enumerate(argv):
        if arg == "--config" and position + 1 < len(argv):
            config_file = argv[position + 1]
        elif arg.startswith("--config="):
            config_file = arg.split("=", 1)[1]
        elif arg == "--train.out_dir" or arg.startswith("--train.out_dir="):
            return None  # chosen on the command line: nothing to point out
    if config_file is None or Path(config_file).name != CONFIG_FILE:
        return None
    run_dir = Path(config_file).expanduser().resolve().parent
    if not checkpoints_dir(run_dir).is_dir() or run_dir == Path(out_dir).expanduser().resolve():
        return None
    return (f"--config {config_file} is the config of the run in {run_dir}, whose train.out_dir says {out_dir}: "
            f"this run goes there; --train.out_dir {run_dir} continues the run in {run_dir}")
