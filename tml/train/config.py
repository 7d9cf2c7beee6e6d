"""Training and logging settings. Field names are part of the YAML schema: keep them stable."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class TrainConfig:
    max_steps: int = 18_370  # optimizer steps
    batch_size: int = 20  # micro-batch per device
    grad_accum: int = 4
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_frac: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    val_interval: int = 500
    val_batches: int = 50
    early_stop_patience: int = 0  # validations without improvement before stopping; 0 disables
    early_stop_min_delta: float = 0.0
    ckpt_interval: int = 500  # steps between `last` checkpoints
    keep_checkpoints: int = 2  # step checkpoints kept besides `last` and `best`
    precision: Literal["16-mixed", "bf16-mixed", "32-true"] = "16-mixed"
    strategy: Literal["auto", "ddp", "deepspeed"] = "auto"
    zero_stage: int = 2
    zero_offload: Literal["none", "optimizer", "optimizer+params"] = "none"
    accelerator: Literal["auto", "cpu", "cuda"] = "auto"
    devices: int = 1
    num_nodes: int = 1
    out_dir: str = "runs/default"
    resume: str = "none"  # "none", "auto" (latest in out_dir) or a checkpoint path
    seed: int = 1337
    compile: bool = False
    log_interval: int = 10


@dataclass
class LogConfig:
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "tml"
    wandb_entity: str | None = None
    run_name: str | None = None
