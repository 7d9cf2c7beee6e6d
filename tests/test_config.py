from pathlib import Path

import pytest

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
