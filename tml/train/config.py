"""Training and logging settings. Field names are part of the YAML schema: keep them stable.

Each field's meaning is in its class's `Attributes:` docstring, which jsonargparse shows in `--help`.

Every value is checked when the config is built (`__post_init__`), so a bad setting is refused at load time with
its key named, before data is prepared or a SLURM job is queued. What depends on the machine (is there a CUDA
device?) is checked later, where the Fabric is built (tml/train/fabric.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

Precision = Literal["16-mixed", "bf16-mixed", "32-true"]
Strategy = Literal["auto", "ddp", "deepspeed"]
ZeroOffload = Literal["none", "optimizer", "optimizer+params"]
Accelerator = Literal["auto", "cpu", "cuda"]
Schedule = Literal["cosine", "wsd"]
Optimizer = Literal["adamw", "muon"]
ZERO_STAGES = (1, 2, 3)  # DeepSpeed's stage 0 is plain data parallelism: use strategy=ddp for that


class TrainConfigError(ValueError):
    """A train.* value no run can use; the message names the key and the value."""


@dataclass
class TrainConfig:
    """How to train: schedule, optimizer, validation, checkpoints and distribution.

    Attributes:
        max_steps: optimizer steps to train for; set from max_tokens or max_flops when one is given (a max_steps
            given too is not used)
        max_tokens: a training budget in tokens: max_steps becomes the most whole optimizer steps within it
            (tokens a step = batch_size x grad_accum x devices x num_nodes x model.block_size); null = none
        max_flops: a training budget in FLOPs: max_steps becomes the most whole optimizer steps within it (a step
            = the model's training FLOPs per token x its tokens), so runs of other shapes train at equal
            compute; null = none. At most one of max_tokens and max_flops (tml/train/budget.py)
        batch_size: sequences per micro-batch, on each device
        grad_accum: micro-batches accumulated into one optimizer step
        lr: peak learning rate, reached at the end of warm-up
        min_lr: learning rate at the last step, where the decay ends
        warmup_frac: fraction of max_steps over which the learning rate rises linearly to lr (its first step uses
            lr/(W+1) of W warm-up steps, never 0: tml/train/optim.py)
        warmup_steps: the warm-up in steps instead, whatever max_steps is (null: warmup_frac decides); runs of other
            lengths, such as a WSD run and its branches, then share one warm-up
        schedule: after warm-up, "cosine" decays from lr to min_lr over all the remaining steps (the reference);
            "wsd" (warm-up, stable, decay) holds lr, then decays to min_lr over the last decay_frac of max_steps, so
            its checkpoints before the decay can be continued to any longer horizon (README: branching a run)
        decay_frac: schedule "wsd" only: the fraction of max_steps at the end over which lr falls to min_lr
        optimizer: "adamw" (the reference), or "muon": Muon for the hidden weight matrices and AdamW for the
            embedding, an untied LM head, biases and norms (Moonlight's recipe, tml/train/muon.py; torch >= 2.9,
            not with strategy deepspeed). Muon's update is scaled to AdamW's RMS, so lr and weight_decay carry over
        muon_lr: optimizer "muon" only: Muon's peak learning rate (null: lr); the schedule scales it as it scales lr
        muon_momentum: optimizer "muon" only: Muon's momentum (Nesterov)
        weight_decay: weight decay of the linear layers' weights only (AdamW's, and Muon's)
        beta1: AdamW's decay rate for the gradient mean
        beta2: AdamW's decay rate for the squared gradient (0.95, GPT-3's choice for stability)
        grad_clip: clip the global gradient norm to this; 0 disables clipping
        val_interval: optimizer steps between validations
        val_batches: batches of batch_size windows per validation, spread evenly over the validation split
        early_stop_patience: validations without improvement before stopping; 0 disables
        early_stop_min_delta: how much lower a validation loss must be to count as an improvement
        ckpt_interval: optimizer steps between `last` checkpoints
        keep_checkpoints: newest step checkpoints kept (`last` is one of them, and a save of a better validation
            between ckpt_intervals counts too), plus `best`; 0 keeps only those two
        precision: 16-mixed (fp16 with loss scaling; bf16-mixed on CPU), bf16-mixed or 32-true
        strategy: auto (one process), ddp, or deepspeed (ZeRO, see zero_stage)
        zero_stage: DeepSpeed ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also parameters
        zero_offload: DeepSpeed CPU offload: none, optimizer, or optimizer+params (ZeRO-3 only)
        accelerator: auto (CUDA when present, else CPU with a notice), cpu or cuda
        devices: processes per node, one per GPU (tml slurm, launch/slurm.py, sets it from the SLURM request)
        num_nodes: nodes (tml slurm, launch/slurm.py, sets it from --nodes)
        out_dir: run directory: checkpoints, config.yaml and TensorBoard logs
        resume: "none", "auto" (latest checkpoint in out_dir) or a checkpoint path (a run directory: its latest)
        init_from: start a new run from these weights (a run directory, a checkpoint or a `tml export` file) with a
            fresh optimizer, schedule and data order, on any data: fine-tuning, or continued pre-training. Its model
            must have this run's shape (model.dropout, block_size, rope_theta and rope_yarn_* may differ). Unused on
            resume
        seed: seed of the initial weights and of the data order
        compile: run the model through torch.compile (on an H200 the reference step ran 1.9x faster in 41% less
            memory, after about 45 s of compiling: docs/benchmarks.md)
        tf32: on CUDA, fp32 matmuls run on TF32 tensor cores (torch.set_float32_matmul_precision("high")): what
            autocast leaves in fp32, and all of a 32-true run; false keeps them IEEE fp32. CPU runs are unaffected
        activation_checkpointing: keep only each block's input in the forward pass and recompute the rest during
            backward: activation memory of one block instead of all, for at most a third more block compute
        log_interval: optimizer steps between console and logger lines
    """

    max_steps: int = 18_370
    max_tokens: int | float | None = None  # a float too: 1e9 on the command line
    max_flops: float | None = None
    batch_size: int = 20
    grad_accum: int = 4
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_frac: float = 0.1
    warmup_steps: int | None = None
    schedule: Schedule = "cosine"
    decay_frac: float = 0.2
    optimizer: Optimizer = "adamw"
    muon_lr: float | None = None
    muon_momentum: float = 0.95
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    val_interval: int = 500
    val_batches: int = 50
    early_stop_patience: int = 0
    early_stop_min_delta: float = 0.0
    ckpt_interval: int = 500
    keep_checkpoints: int = 2
    precision: Precision = "16-mixed"
    strategy: Strategy = "auto"
    zero_stage: int = 2
    zero_offload: ZeroOffload = "none"
    accelerator: Accelerator = "auto"
    devices: int = 1
    num_nodes: int = 1
    out_dir: str = "runs/default"
    resume: str = "none"
    init_from: str | None = None
    seed: int = 1337
    compile: bool = False
    tf32: bool = True
    activation_checkpointing: bool = False
    log_interval: int = 10

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def fail(key: str, why: str) -> None:
            raise TrainConfigError(f"train.{key}={getattr(self, key)!r}: {why}")

        for key in ("max_steps", "batch_size", "grad_accum", "devices", "num_nodes", "val_interval", "val_batches",
                    "ckpt_interval", "log_interval"):
            if getattr(self, key) < 1:
                fail(key, "must be at least 1")
        for key in ("max_tokens", "max_flops"):
            value = getattr(self, key)
            if value is not None and not (math.isfinite(value) and value > 0):  # isfinite: NaN and inf refused
                fail(key, "must be a number > 0 (or null: no budget)")
        if self.max_tokens is not None and self.max_flops is not None:
            raise TrainConfigError(f"train.max_tokens={self.max_tokens:g} and train.max_flops={self.max_flops:g} are "
                                   "both set: a run has one budget, give one of them")
        for key in ("keep_checkpoints", "early_stop_patience", "weight_decay", "early_stop_min_delta"):
            if getattr(self, key) < 0:
                fail(key, "must be >= 0")
        if self.grad_clip < 0:
            fail("grad_clip", "must be >= 0 (0 disables clipping)")
        if not self.lr >= 0:  # `not >=` also refuses NaN; 0 is allowed: frozen weights (a plateau on purpose)
            fail("lr", "must be >= 0")
        if not 0 <= self.min_lr <= self.lr:
            fail("min_lr", f"must be in [0, lr={self.lr}]: the cosine schedule decays from lr down to min_lr")
        # 1.0 is allowed: the whole run warms up, reaching lr at the last step.
        if not 0 <= self.warmup_frac <= 1:
            fail("warmup_frac", "must be in [0, 1] (a fraction of max_steps)")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            fail("warmup_steps", "must be >= 0 (or null: warmup_frac decides)")
        if not 0 < self.decay_frac <= 1:
            fail("decay_frac", "must be in (0, 1] (a fraction of max_steps)")
        wsd_by_fractions = self.schedule == "wsd" and self.warmup_steps is None
        if wsd_by_fractions and self.warmup_frac + self.decay_frac > 1 + 1e-9:  # 1e-9: 0.7 + 0.3 in floats
            fail("decay_frac", f"with warmup_frac={self.warmup_frac} must be at most {1 - self.warmup_frac:g}: warm-up "
                               "and decay together cannot last longer than the run")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                fail(key, "must be in [0, 1) (AdamW's moment decay)")
        for key, allowed in (("precision", Precision), ("strategy", Strategy), ("zero_offload", ZeroOffload),
                             ("accelerator", Accelerator), ("schedule", Schedule), ("optimizer", Optimizer)):
            if getattr(self, key) not in get_args(allowed):
                fail(key, f"must be one of {', '.join(get_args(allowed))}")
        if self.muon_lr is not None and not self.muon_lr >= 0:
            fail("muon_lr", "must be >= 0 (or null: lr)")
        if not 0 <= self.muon_momentum < 1:
            fail("muon_momentum", "must be in [0, 1)")
        if self.optimizer == "muon":
            if self.strategy == "deepspeed":
                fail("optimizer", "cannot run under strategy deepspeed: ZeRO hands the optimizer flat shards of the "
                                  "parameters, and Muon orthogonalises whole matrices (use strategy ddp)")
            from tml.train.muon import muon_unavailable  # here: torch is imported only for a config that needs it

            if reason := muon_unavailable():
                fail("optimizer", reason)
        if self.strategy == "deepspeed" and self.zero_stage not in ZERO_STAGES:
            fail("zero_stage", "must be 1, 2 or 3 with strategy=deepspeed")
        if self.zero_offload != "none" and self.strategy != "deepspeed":
            fail("zero_offload", f"needs train.strategy=deepspeed (got {self.strategy!r})")
        if self.zero_offload == "optimizer+params" and self.zero_stage != 3:
            fail("zero_offload", f"needs train.zero_stage=3 (got {self.zero_stage}): only ZeRO-3 partitions the "
                                 "parameters it would offload")
        if not self.out_dir:
            fail("out_dir", "must name a directory")
        if not self.resume:
            fail("resume", "must be 'none', 'auto' or a checkpoint path")
        if self.init_from is not None and not self.init_from.strip():
            fail("init_from", "must name a run directory, a checkpoint or an exported file (or be null)")


@dataclass
class LogConfig:
    """Where training metrics go besides the console.

    Attributes:
        tensorboard: write TensorBoard event files to {out_dir}/tensorboard
        wandb: also log to Weights & Biases (offline under {out_dir}/wandb without WANDB_API_KEY or a `wandb login`)
        wandb_project: Weights & Biases project
        wandb_entity: Weights & Biases team or user (null = your default entity)
        run_name: run name shown by the loggers (null = chosen by the logger)
        wandb_group: Weights & Biases group shown around the run (null = none; a --sweep groups its runs by its
            out_dir as given and names each by its values)
        attention_stats: at every validation also log each layer's largest attention logit, attention entropy and
            the effective rank of its KV cache (what `tml inspect` measures) on 8 fixed validation windows, as
            attention/* curves; not under ZeRO-3, whose parameters are partitioned (tml inspect reads its checkpoints)
    """

    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "tml"
    wandb_entity: str | None = None
    run_name: str | None = None
    wandb_group: str | None = None
    attention_stats: bool = True
