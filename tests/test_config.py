from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tml.config import Config, ConfigError, load_config, load_yaml_config
from tml.model.config import ModelConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_yaml_values_and_cli_overrides_are_applied(tmp_path):
    path = write(tmp_path, "model:\n  n_layer: 2\ntrain:\n  lr: 1.0e-3\n")
    config = load_yaml_config(path, ["--train.lr", "2e-4", "--data.book_ids=[11,12]"])
    assert config.model.n_layer == 2
    assert config.train.lr == pytest.approx(2e-4)
    assert config.data.book_ids == [11, 12]


def test_unknown_yaml_key_is_rejected_by_name(tmp_path):
    path = write(tmp_path, "model:\n  n_layers: 2\n")
    with pytest.raises(ConfigError, match="n_layers"):
        load_yaml_config(path)


def test_unknown_cli_key_is_rejected_by_name():
    with pytest.raises(ConfigError, match="train.learning_rate"):
        load_config(["--train.learning_rate=1"])


def test_wrong_type_is_rejected_with_the_key_named(tmp_path):
    path = write(tmp_path, "train:\n  max_steps: many\n")
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_yaml_config(path)


def test_invalid_model_combination_names_the_field(tmp_path):
    path = write(tmp_path, "model:\n  n_head: 5\n")
    with pytest.raises((ConfigError, ModelConfigError), match="n_embd"):
        load_yaml_config(path)


def test_config_round_trips_through_a_dict():
    config = load_config(["--model.n_layer=3", "--train.seed=7"])
    assert Config.from_dict(config.to_dict()) == config


def test_from_dict_refuses_unknown_keys():
    with pytest.raises(ConfigError, match="train.bogus"):
        Config.from_dict({"train": {"bogus": 1}})


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_yaml_config(tmp_path / "nope.yaml")


def test_abbreviated_key_is_not_taken_for_a_longer_one():
    with pytest.raises(ConfigError, match="max_step"):
        load_config(["--train.max_step", "3"])


CONFIGS_DIR = REPO_ROOT / "configs"
MULTI_GPU_CONFIGS = ("ddp", "zero2", "zero3")  # the reference run with DDP, ZeRO-2 and ZeRO-3


@pytest.mark.parametrize("path", sorted(CONFIGS_DIR.glob("*.yaml")), ids=lambda path: path.name)
def test_every_shipped_config_loads(path):
    assert isinstance(load_yaml_config(path), Config)


def test_reference_config_is_exactly_the_reference_setup():
    config = load_yaml_config(CONFIGS_DIR / "reference.yaml")
    m, t = config.model, config.train
    assert (m.block_size, m.n_layer, m.n_head, m.n_embd, m.attention, m.norm) == (512, 12, 12, 768, "mla", "post")
    assert (t.batch_size, t.grad_accum, t.max_steps) == (20, 4, 18_370)
    assert (t.lr, t.min_lr, t.warmup_frac, t.grad_clip) == (3e-4, 3e-5, 0.1, 1.0)
    assert (t.val_interval, t.precision, t.devices, t.num_nodes, t.strategy) == (500, "16-mixed", 1, 1, "auto")
    assert t.early_stop_patience > 0 and t.ckpt_interval > 0
    assert config.data.source == "gutenberg" and config.log.tensorboard


@pytest.mark.parametrize("name", MULTI_GPU_CONFIGS)
def test_multi_gpu_configs_keep_the_reference_model_global_batch_and_schedule(name):
    reference = load_yaml_config(CONFIGS_DIR / "reference.yaml")
    config = load_yaml_config(CONFIGS_DIR / f"{name}.yaml")
    assert config.model == reference.model
    global_batch = config.train.batch_size * config.train.grad_accum * config.train.devices * config.train.num_nodes
    assert global_batch == reference.train.batch_size * reference.train.grad_accum == 80
    for key in ("max_steps", "lr", "min_lr", "warmup_frac", "weight_decay", "grad_clip", "val_interval",
                "val_batches", "early_stop_patience", "precision"):
        assert getattr(config.train, key) == getattr(reference.train, key), key
    assert config.train.devices > 1 and config.train.strategy != "auto"
