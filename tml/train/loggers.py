"""Where training reports go: TensorBoard and wandb through Fabric's logger interface, and a Rich console.

Fabric hands every `fabric.log_dict` to each logger; the loggers themselves only write on rank 0. wandb runs
offline (files under `{out_dir}/wandb`, `wandb sync` later) when no WANDB_API_KEY is set, and a restarted run
passes the id saved in its checkpoint so wandb continues the same run instead of starting a new one.
"""

from __future__ import annotations

import os
import secrets
import sys
from typing import Any

from lightning.fabric.loggers import Logger, TensorBoardLogger
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from tml.config import Config

WANDB_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"  # wandb's own id alphabet
WANDB_ID_LENGTH = 8


def new_wandb_run_id() -> str:
    """Chosen before wandb starts so the checkpoint can carry it and a restart resumes the same run."""
    return "".join(secrets.choice(WANDB_ID_ALPHABET) for _ in range(WANDB_ID_LENGTH))


def build_loggers(config: Config, wandb_run_id: str | None) -> list[Logger]:
    loggers: list[Logger] = []
    out_dir = config.train.out_dir
    if config.log.tensorboard:
        # version="" puts event files directly in {out_dir}/tensorboard, the same directory after a restart.
        loggers.append(TensorBoardLogger(root_dir=out_dir, name="tensorboard", version=""))
    if config.log.wandb:
        from lightning.pytorch.loggers import WandbLogger

        os.makedirs(out_dir, exist_ok=True)
        loggers.append(
            WandbLogger(
                project=config.log.wandb_project,
                entity=config.log.wandb_entity,
                name=config.log.run_name,
                id=wandb_run_id,
                save_dir=out_dir,
                offline=not os.environ.get("WANDB_API_KEY"),
                resume="allow",
            )
        )
    return loggers


def flat_hyperparameters(config: Config) -> dict[str, Any]:
    """`section.key` -> value with lists as strings, as TensorBoard's hparams plugin only takes scalars."""
    flat: dict[str, Any] = {}
    for section, values in config.to_dict().items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


class ConsoleReport:
    """Rank 0's console: a progress bar, a line every log interval and a summary table at the end."""

    def __init__(self, enabled: bool, max_steps: int, start_step: int) -> None:
        self.enabled = enabled
        self.console = Console(file=sys.stdout, highlight=False)
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=True,
            disable=not (enabled and self.console.is_terminal),
        )
        self.task = self.progress.add_task("train", total=max_steps, completed=start_step, status="")

    def __enter__(self) -> ConsoleReport:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def print(self, text: str) -> None:
        if self.enabled:
            self.progress.console.print(text)

    def advance(self, step: int, status: str) -> None:
        if self.enabled:
            self.progress.update(self.task, completed=step, status=status)

    def summary(self, rows: dict[str, str]) -> None:
        if not self.enabled:
            return
        table = Table(title="tml training summary")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key, value in rows.items():
            table.add_row(key, value)
        self.console.print(table)
