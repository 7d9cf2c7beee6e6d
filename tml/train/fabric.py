"""Build the Lightning Fabric that runs training: accelerator, devices, precision and DDP or DeepSpeed ZeRO.

Everything about *how* training is distributed is decided here, from `TrainConfig`, so the loop stays plain
Fabric code with one DeepSpeed branch, picked by `is_deepspeed(fabric)`. Under DeepSpeed the engine owns
accumulation, clipping and loss scaling (see `deepspeed_config`), and the loop must:
  - build the LambdaLR on the torch optimizer before `fabric.setup(model, optimizer)` (one call for both);
  - not build the model under `fabric.init_module()` for ZeRO-3 (zero.Init would skip the model's own init);
  - per micro-batch: `fabric.backward(loss)` with the loss NOT divided by grad_accum, then `engine.step()`
    (`fabric.strategy.model`; Fabric's `optimizer.step()` would bypass the engine's accumulation);
  - read the pre-clip norm from `engine.get_global_grad_norm()`; never call `fabric.clip_gradients`;
  - save and load with `fabric.save/load(directory, ...)` on every rank (checkpoints are directories).
"""

from __future__ import annotations

import os
import sys
import warnings

import torch
from lightning.fabric import Fabric
from lightning.fabric.strategies import DDPStrategy, DeepSpeedStrategy, Strategy

from tml.config import ConfigError
from tml.train.config import TrainConfig
from tml.train.ranks import is_first_local_process

# fp16 dynamic loss scaling under DeepSpeed (DeepSpeed's usual values; the DDP path uses torch's GradScaler, which
# doubles after 2000 clean steps and has no hysteresis): start at 2**16, halve on overflow (after `hysteresis`
# overflows in a row), double after `window` clean steps, never below 1.
FP16_INITIAL_SCALE_POWER = 16
FP16_LOSS_SCALE_WINDOW = 1000
FP16_HYSTERESIS = 2
FP16_MIN_LOSS_SCALE = 1

# DeepSpeed prints a throughput line every `steps_per_print` steps; the loop does its own logging.
DEEPSPEED_STEPS_PER_PRINT = 2**31 - 1

# Warnings that tell a tml user nothing, silenced by message (re.match) and category only:
# Lightning's hint on any machine with SLURM's client tools, shown even when the run is local on purpose;
SRUN_HINT = r"The `srun` command is available on your system but is not used"
# DeepSpeed's ZeRO still calls these deprecated torch collectives (one warning per call site and rank).
ZERO_COLLECTIVE_DEPRECATION = r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"


class FabricConfigError(ConfigError):
    """A train.* setting that cannot run on this machine (the values themselves were checked by TrainConfig).

    A ConfigError, so the entry points print it as one line like any other config mistake.
    """


def _notice(message: str) -> None:
    """Print once per machine, not once per local rank."""
    if is_first_local_process():
        print(f"tml: {message}", file=sys.stderr)


def resolve_accelerator(train: TrainConfig, notify: bool = False) -> str:
    """`auto` means CUDA when present, else CPU with a notice, so nobody trains on CPU by accident."""
    if train.accelerator == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if notify:
            _notice("no CUDA device found, training on CPU (train.accelerator=cpu silences this)")
        return "cpu"
    return train.accelerator


def check_accelerator(train: TrainConfig) -> None:
    """FabricConfigError for an accelerator this machine does not have (asked by --dry-run too)."""
    if train.accelerator == "cuda" and not torch.cuda.is_available():
        raise FabricConfigError("train.accelerator=cuda but no CUDA device is available (use auto or cpu)")


def resolve_precision(train: TrainConfig, accelerator: str, notify: bool = False) -> str:
    """CPU has no fp16 autocast: 16-mixed becomes bf16-mixed there, as Fabric itself would do, but said aloud."""
    if accelerator == "cpu" and train.precision == "16-mixed":
        if notify:
            _notice("16-mixed (fp16 with loss scaling) needs a GPU; using bf16-mixed on CPU")
        return "bf16-mixed"
    return train.precision


def deepspeed_config(train: TrainConfig) -> dict:
    """The DeepSpeed config for `train`.

    DeepSpeed owns three things the DDP loop does itself: gradient accumulation (the engine divides the loss
    by `gradient_accumulation_steps` and steps the optimizer only on the last micro-batch), gradient
    clipping (Fabric's `clip_gradients` refuses DeepSpeed) and mixed precision (fp16 loss scaling or bf16
    weights). Hence they live here and the loop must not repeat them.
    """
    precision = resolve_precision(train, resolve_accelerator(train))
    return _deepspeed_config(train, precision)


def _deepspeed_config(train: TrainConfig, precision: str) -> dict:
    zero: dict = {"stage": train.zero_stage}
    if train.zero_offload in ("optimizer", "optimizer+params"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if train.zero_offload == "optimizer+params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config: dict = {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": float(train.grad_clip),
        "zero_optimization": zero,
        # tml's own AdamW (with its weight-decay groups) is the optimizer; DeepSpeed only tests its own.
        "zero_allow_untested_optimizer": True,
        # With offload DeepSpeed insists on its compiled CPU Adam; torch's AdamW is correct, only slower.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": DEEPSPEED_STEPS_PER_PRINT,
    }
    if precision == "16-mixed":
        config["fp16"] = {
            "enabled": True,
            "loss_scale": 0,  # 0 = dynamic
            "initial_scale_power": FP16_INITIAL_SCALE_POWER,
            "loss_scale_window": FP16_LOSS_SCALE_WINDOW,
            "hysteresis": FP16_HYSTERESIS,
            "min_loss_scale": FP16_MIN_LOSS_SCALE,
        }
    elif precision == "bf16-mixed":
        config["bf16"] = {"enabled": True}
    return config


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeed strategy on CPU processes talking over gloo, so CI exercises the real ZeRO path.

    Lightning refuses any accelerator but CUDA, yet DeepSpeed's CPU accelerator runs ZeRO 1-3. Two things
    stand in the way: the CUDA-only guard in `setup_environment`, and plain `cpu` devices having index
    `None`, which fails Lightning's device-index check and DeepSpeed's `device_rank >= 0`. Giving each
    process the device `cpu:<local rank>` (the same memory as `cpu`) satisfies both.
    """

    def setup_environment(self) -> None:
        assert self.parallel_devices is not None
        self.parallel_devices = [torch.device("cpu", index) for index in range(len(self.parallel_devices))]
        DDPStrategy.setup_environment(self)  # skips DeepSpeedStrategy's CUDA guard, keeps the rest


def build_strategy(train: TrainConfig, accelerator: str, precision: str) -> Strategy | str:
    if train.strategy == "deepspeed":
        config = _deepspeed_config(train, precision)
        if accelerator == "cpu":
            # DeepSpeed picks its accelerator once per process; ask for CPU even on a machine with a GPU.
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            from deepspeed.accelerator import get_accelerator

            if get_accelerator().device_name() != "cpu":
                raise FabricConfigError(
                    f"train.accelerator=cpu with strategy=deepspeed, but DeepSpeed already chose "
                    f"{get_accelerator().device_name()!r} in this process: set DS_ACCELERATOR=cpu before starting"
                )
            return CPUDeepSpeedStrategy(config=config, process_group_backend="gloo")
        return DeepSpeedStrategy(config=config)
    if train.strategy == "ddp":
        return DDPStrategy(process_group_backend="gloo" if accelerator == "cpu" else None)
    return "auto"


def silence_known_noise(train: TrainConfig) -> None:
    """Process-wide filters: the DeepSpeed warnings come from training steps, long after the Fabric is built."""
    if "SLURM_JOB_ID" not in os.environ:  # outside any SLURM job: local on purpose, srun is not forgotten
        warnings.filterwarnings("ignore", SRUN_HINT, UserWarning)
    if train.strategy == "deepspeed":
        warnings.filterwarnings("ignore", ZERO_COLLECTIVE_DEPRECATION, FutureWarning)


def build_fabric(train: TrainConfig, loggers: list | None = None) -> Fabric:
    """A Fabric for `train`; call `fabric.launch()` next (it starts the other local processes)."""
    silence_known_noise(train)
    check_accelerator(train)
    accelerator = resolve_accelerator(train, notify=True)
    precision = resolve_precision(train, accelerator, notify=True)
    set_fp32_matmul_precision(train, accelerator)
    return Fabric(
        accelerator=accelerator,
        strategy=build_strategy(train, accelerator, precision),
        devices=train.devices,
        num_nodes=train.num_nodes,
        precision=precision,
        loggers=loggers,
    )


def set_fp32_matmul_precision(train: TrainConfig, accelerator: str) -> None:
    """train.tf32 on CUDA: TF32 tensor cores for fp32 matmuls ("high") or IEEE fp32 ("highest", torch's default).

    Set both ways, so a sweep's runs in one process each get their own. CPU is left alone: its "high" lets oneDNN
    round fp32 matmuls too, and the CPU tests compare losses bit for bit.
    """
    if accelerator == "cuda":
        torch.set_float32_matmul_precision("high" if train.tf32 else "highest")


def is_deepspeed(fabric: Fabric) -> bool:
    """True when the loop must take the DeepSpeed branch (engine-owned accumulation, clipping and saving)."""
    return isinstance(fabric.strategy, DeepSpeedStrategy)
