"""build_fabric / deepspeed_config: the right strategy, precision and accelerator, and clear errors (no processes).

Bad values are refused by TrainConfig itself (tests/test_config.py); here only what depends on the machine.
"""

import os
import shutil
import warnings

import pytest
import torch
from lightning.fabric.plugins.precision import DeepSpeedPrecision, MixedPrecision, Precision
from lightning.fabric.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy

from tml.config import ConfigError
from tml.train.config import TrainConfig
from tml.train.fabric import (
    CPUDeepSpeedStrategy,
    FabricConfigError,
    build_fabric,
    build_strategy,
    deepspeed_config,
    is_deepspeed,
    set_fp32_matmul_precision,
    silence_known_noise,
)

needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")


def cpu_train(**values) -> TrainConfig:
    return TrainConfig(**{"accelerator": "cpu", "precision": "32-true", **values})


def test_auto_strategy_on_one_cpu_is_a_plain_single_device_run():
    fabric = build_fabric(cpu_train())
    assert isinstance(fabric.strategy, SingleDeviceStrategy)
    assert type(fabric.strategy.precision) is Precision  # 32-true: no autocast
    assert fabric.device == torch.device("cpu")
    assert not is_deepspeed(fabric)


@needs_no_gpu
def test_auto_accelerator_falls_back_to_cpu_and_says_so(capsys):
    fabric = build_fabric(TrainConfig(accelerator="auto", precision="32-true"))
    assert fabric.device.type == "cpu"
    assert "no CUDA device found, training on CPU" in capsys.readouterr().err


@needs_no_gpu
def test_asking_for_cuda_without_a_gpu_is_refused_by_name():
    with pytest.raises(FabricConfigError, match="train.accelerator=cuda"):
        build_fabric(TrainConfig(accelerator="cuda"))


def test_ddp_on_cpu_talks_over_gloo():
    fabric = build_fabric(cpu_train(strategy="ddp", devices=2))
    assert isinstance(fabric.strategy, DDPStrategy)
    assert fabric.strategy._process_group_backend == "gloo"
    assert fabric.world_size == 2
    assert not is_deepspeed(fabric)


def test_deepspeed_on_cpu_uses_the_cpu_subclass_with_tml_config():
    train = cpu_train(strategy="deepspeed", zero_stage=3, devices=2, batch_size=3, grad_accum=5)
    fabric = build_fabric(train)
    assert isinstance(fabric.strategy, CPUDeepSpeedStrategy)
    assert isinstance(fabric.strategy.precision, DeepSpeedPrecision)
    assert fabric.strategy._process_group_backend == "gloo"
    assert fabric.strategy.config == deepspeed_config(train)
    assert is_deepspeed(fabric)


def test_16_mixed_on_cpu_becomes_bf16_mixed_with_a_notice(capsys):
    fabric = build_fabric(cpu_train(precision="16-mixed"))
    assert isinstance(fabric.strategy.precision, MixedPrecision)
    assert fabric.strategy.precision.precision == "bf16-mixed"
    assert "using bf16-mixed on CPU" in capsys.readouterr().err
    ds = deepspeed_config(cpu_train(strategy="deepspeed", precision="16-mixed"))
    assert "fp16" not in ds and ds["bf16"] == {"enabled": True}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_config_carries_stage_batch_accumulation_and_clipping(stage):
    config = deepspeed_config(cpu_train(strategy="deepspeed", zero_stage=stage, batch_size=7, grad_accum=3,
                                        grad_clip=0.5))
    assert config["zero_optimization"] == {"stage": stage}
    assert config["train_micro_batch_size_per_gpu"] == 7
    assert config["gradient_accumulation_steps"] == 3
    assert config["gradient_clipping"] == 0.5
    assert config["zero_allow_untested_optimizer"] is True  # tml's AdamW with its decay groups
    assert "fp16" not in config and "bf16" not in config  # 32-true


def test_grad_clip_zero_disables_deepspeed_clipping():
    assert deepspeed_config(cpu_train(strategy="deepspeed", grad_clip=0.0))["gradient_clipping"] == 0.0


def test_fp16_on_cuda_gets_dynamic_loss_scaling():
    # deepspeed_config only writes a dict, so the GPU section can be checked on any machine.
    config = deepspeed_config(TrainConfig(strategy="deepspeed", accelerator="cuda", precision="16-mixed"))
    assert config["fp16"]["enabled"] is True
    assert config["fp16"]["loss_scale"] == 0  # dynamic
    assert "bf16" not in config


@pytest.fixture
def restore_fp32_matmul_precision():
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


def test_tf32_on_cuda_sets_and_unsets_torchs_fp32_matmul_precision(restore_fp32_matmul_precision):
    # The setting is a process-wide flag, so the CUDA branch can be checked on any machine.
    set_fp32_matmul_precision(TrainConfig(accelerator="cuda"), "cuda")
    assert torch.get_float32_matmul_precision() == "high"  # TF32 on by default, as Lightning's warning asks
    set_fp32_matmul_precision(TrainConfig(accelerator="cuda", tf32=False), "cuda")  # the next run of a sweep
    assert torch.get_float32_matmul_precision() == "highest"


def test_cpu_runs_keep_exact_fp32_matmuls(restore_fp32_matmul_precision):
    torch.set_float32_matmul_precision("highest")
    build_fabric(cpu_train(tf32=True))
    assert torch.get_float32_matmul_precision() == "highest"


def test_bf16_gets_a_bf16_section():
    config = deepspeed_config(TrainConfig(strategy="deepspeed", accelerator="cuda", precision="bf16-mixed"))
    assert config["bf16"] == {"enabled": True} and "fp16" not in config


def test_offload_settings_reach_the_zero_section():
    optimizer_only = deepspeed_config(cpu_train(strategy="deepspeed", zero_stage=2, zero_offload="optimizer"))
    assert optimizer_only["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "offload_param" not in optimizer_only["zero_optimization"]
    both = deepspeed_config(cpu_train(strategy="deepspeed", zero_stage=3, zero_offload="optimizer+params"))
    assert both["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert both["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert both["zero_force_ds_cpu_optimizer"] is False  # torch AdamW is allowed with offload


def test_fabric_config_error_is_a_config_error_so_entry_points_print_one_line():
    assert issubclass(FabricConfigError, ConfigError)


def test_cuda_deepspeed_uses_lightnings_own_strategy():
    strategy = build_strategy(TrainConfig(strategy="deepspeed"), "cuda", "16-mixed")
    assert type(strategy) is DeepSpeedStrategy
    assert strategy.config["fp16"]["enabled"] is True


@pytest.fixture
def srun_on_path(tmp_path, monkeypatch):
    """Lightning only asks `shutil.which("srun")`; a machine without SLURM gets a stand-in that is never run."""
    if shutil.which("srun") is None:
        srun = tmp_path / "bin" / "srun"
        srun.parent.mkdir()
        srun.write_text("#!/bin/sh\nexit 1\n")
        srun.chmod(0o755)
        monkeypatch.setenv("PATH", f"{srun.parent}{os.pathsep}{os.environ['PATH']}")


def warnings_while_building(train: TrainConfig) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # before build_fabric adds its own filters, which then take precedence
        build_fabric(train)
    return [str(warning.message) for warning in caught]


def test_local_run_does_not_show_lightnings_srun_hint(srun_on_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    assert not [message for message in warnings_while_building(cpu_train()) if "srun" in message]


def test_srun_hint_still_shows_inside_a_slurm_allocation(srun_on_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "42")  # e.g. salloc, then python without srun: the hint is right there
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    assert [message for message in warnings_while_building(cpu_train()) if "`srun` command is available" in message]


def test_deepspeed_runs_hide_only_the_deprecations_of_zeros_collectives():
    hidden = ["`torch.distributed.all_gather_into_tensor` is deprecated. Please use `all_gather_single` instead.",
              "`torch.distributed.reduce_scatter_tensor` is deprecated. Please use `reduce_scatter_single` instead."]
    shown = [(hidden[0], UserWarning), ("`torch.distributed.reduce_op` is deprecated", FutureWarning)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_known_noise(cpu_train(strategy="deepspeed"))
        for message in hidden:
            warnings.warn(message, FutureWarning, stacklevel=1)
        for message, category in shown:
            warnings.warn(message, category, stacklevel=1)
    assert [(str(warning.message), warning.category) for warning in caught] == shown


def test_other_strategies_leave_torchs_deprecations_alone():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_known_noise(cpu_train(strategy="ddp"))
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated.", FutureWarning, stacklevel=1)
    assert len(caught) == 1
