"""Where training reports go: TensorBoard and wandb through Fabric's logger interface, and a Rich console.

Fabric hands every `fabric.log_dict` to each logger; the loggers themselves only write on rank 0. wandb runs
offline (files under `{out_dir}/wandb`, `wandb sync` later) when no WANDB_API_KEY is set, and a restarted run
passes the id saved in its checkpoint so wandb continues the same run instead of starting a new one.

TensorBoard's HParams view shows, per run, the latest value of each scalar its hparams summary names as a metric.
Lightning writes that summary only together with metric values, a `hp_metric` of -1 when given none, which ranks
nothing; so the placeholder is off and TensorBoard gets the hyper-parameters at the first validation, with the real
`val/perplexity` and `val/best_perplexity` (`log_validation`). Other loggers (wandb) get them at the start.
"""

from __future__ import annotations

import netrc
import os
import secrets
import sys
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

from lightning.fabric.loggers import Logger, TensorBoardLogger
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from tml.config import Config
from tml.model import Transformer
from tml.model.kv_cache import (
    PRECISION_CACHE_DTYPE,
    cache_numbers_per_token,
    kv_cache_bytes_per_token,
    mha_numbers_per_token,
)

WANDB_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"  # wandb's own id alphabet
WANDB_ID_LENGTH = 8
WANDB_DEFAULT_HOST = "https://api.wandb.ai"  # where `wandb login` stores its key when WANDB_BASE_URL is unset


def new_wandb_run_id() -> str:
    """Chosen before wandb starts so the checkpoint can carry it and a restart resumes the same run."""
    return "".join(secrets.choice(WANDB_ID_ALPHABET) for _ in range(WANDB_ID_LENGTH))


def wandb_credentials_found(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether wandb can log in without asking: WANDB_API_KEY, or the key `wandb login` stored in the netrc file
    (NETRC, else ~/.netrc) for the wandb host (WANDB_BASE_URL). Without one a run logs offline, for `wandb sync`
    later, rather than stopping every rank at a login prompt."""
    if environ.get("WANDB_API_KEY"):
        return True
    host = urllib.parse.urlparse(environ.get("WANDB_BASE_URL") or WANDB_DEFAULT_HOST).hostname
    path = environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):  # no such file, or one wandb could not read either
        return False


def build_loggers(config: Config, wandb_run_id: str | None) -> list[Logger]:
    loggers: list[Logger] = []
    out_dir = config.train.out_dir
    if config.log.tensorboard:
        # version="" puts event files directly in {out_dir}/tensorboard, the same directory after a restart.
        loggers.append(TensorBoardLogger(root_dir=out_dir, name="tensorboard", version="", default_hp_metric=False))
    if config.log.wandb:
        from lightning.pytorch.loggers import WandbLogger

        os.makedirs(out_dir, exist_ok=True)
        loggers.append(
            WandbLogger(
                project=config.log.wandb_project,
                entity=config.log.wandb_entity,
                name=config.log.run_name,
                group=config.log.wandb_group,
                id=wandb_run_id,
                save_dir=out_dir,
                offline=not wandb_credentials_found(),
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


def model_hyperparameters(model: Transformer, precision: str) -> dict[str, int | float | str]:
    """What the model's shape costs, as `model/...` hyper-parameters: parameters, KV cache per token, FLOPs per token.

    Call before the strategy wraps the model (ZeRO-3 partitions the parameters, so counting afterwards would miss
    them). For MLA, GQA and MQA the cache of MHA at the same width (K and V of every head) is given beside it: that
    ratio is what they buy.
    """
    config = model.config
    dtype = PRECISION_CACHE_DTYPE[precision]
    figures: dict[str, int | float | str] = {
        "model/attention_kind": config.attention_kind,
        "model/params": model.num_params(non_embedding=False),
        "model/params_non_embedding": model.num_params(non_embedding=True),
        "model/kv_cache_numbers_per_token_per_layer": cache_numbers_per_token(config),
        "model/kv_cache_bytes_per_token": kv_cache_bytes_per_token(config, dtype),
        "model/kv_cache_dtype": str(dtype).removeprefix("torch."),
        "model/flops_per_token": model.flops_per_token(),
    }
    if config.attention_kind != "MHA":
        mha_bytes = config.n_layer * mha_numbers_per_token(config) * dtype.itemsize
        figures["model/mha_kv_cache_bytes_per_token"] = mha_bytes
        figures["model/kv_cache_fraction_of_mha"] = figures["model/kv_cache_bytes_per_token"] / mha_bytes
    return figures


def describe_model(figures: dict[str, int | float | str]) -> str:
    """`model_hyperparameters` as the one line rank 0 prints when training starts."""
    cache = (f"KV cache {figures['model/kv_cache_numbers_per_token_per_layer']:,} numbers/token/layer, "
             f"{figures['model/kv_cache_bytes_per_token']:,} B/token in {figures['model/kv_cache_dtype']}")
    if "model/mha_kv_cache_bytes_per_token" in figures:
        cache += (f" (MHA of this width: {figures['model/mha_kv_cache_bytes_per_token']:,} B/token; "
                  f"{figures['model/attention_kind']} caches {figures['model/kv_cache_fraction_of_mha']:.1%} of it)")
    return (f"model: {figures['model/params']:,} parameters ({figures['model/params_non_embedding']:,} "
            f"non-embedding) | {cache} | {figures['model/flops_per_token'] / 1e9:.3g} GFLOPs/token (train)")


def log_hyperparameters(loggers: Sequence[Logger], hparams: dict[str, Any]) -> None:
    """At the start, for every logger but TensorBoard, which waits for real metric values (`log_validation`)."""
    for logger in loggers:
        if not isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(hparams)


def log_validation(loggers: Sequence[Logger], metrics: dict[str, float], step: int,
                   hparams: dict[str, Any] | None) -> None:
    """Log one validation's metrics; with `hparams` (the first validation of this process) TensorBoard writes its
    hparams summary, naming these metrics as the HParams view's columns and writing their values (once, not twice)."""
    for logger in loggers:
        if hparams is not None and isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(hparams, metrics=metrics, step=step)
        else:
            logger.log_metrics(metrics, step=step)


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
        if self.enabled:  # other ranks never start it: older rich prints a newline when a disabled bar stops
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
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
