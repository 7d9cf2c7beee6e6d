"""build_fabric / deepspeed_config: the right strategy, precision and accelerator, and clear errors (no processes)."""

import pytest
import torch
from lightning.fabric.plugins.precision import DeepSpeedPrecision, MixedPrecision, Precision
from lightning.fabric.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy

from tml.train.config import TrainConfig
from tml.train.fabric import (
    CPUDeepSpeedStrategy,
    FabricConfigError,
    build_fabric,
    build_strategy,
    deepspeed_config,
    is_deepspeed,
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


@pytest.mark.parametrize(
    ("values", "named"),
    [
        (dict(strategy="deepspeed", zero_stage=0), "train.zero_stage"),
        (dict(strategy="deepspeed", zero_stage=4), "train.zero_stage"),
        (dict(strategy="ddp", zero_offload="optimizer"), "train.zero_offload"),
        (dict(strategy="deepspeed", zero_stage=2, zero_offload="optimizer+params"), "train.zero_stage=3"),
        (dict(strategy="deepspeed", zero_offload="nvme"), "train.zero_offload"),
        (dict(strategy="fsdp"), "train.strategy"),
        (dict(precision="16-true"), "train.precision"),
        (dict(accelerator="tpu"), "train.accelerator"),
        (dict(devices=0), "train.devices"),
        (dict(grad_accum=0), "train.grad_accum"),
        (dict(grad_clip=-1.0), "train.grad_clip"),
    ],
)
def test_invalid_settings_are_refused_naming_the_key(values, named):
    with pytest.raises(FabricConfigError, match=named):
        build_fabric(cpu_train(**values))


def test_deepspeed_config_refuses_an_invalid_stage_too():
    with pytest.raises(FabricConfigError, match="train.zero_stage must be 1, 2 or 3, got 5"):
        deepspeed_config(cpu_train(strategy="deepspeed", zero_stage=5))


def test_cuda_deepspeed_uses_lightnings_own_strategy():
    strategy = build_strategy(TrainConfig(strategy="deepspeed"), "cuda", "16-mixed")
    assert type(strategy) is DeepSpeedStrategy
    assert strategy.config["fp16"]["enabled"] is True
