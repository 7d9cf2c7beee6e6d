"""Loggers: hyper-parameters reach TensorBoard, wandb is built only when asked, the console speaks only on rank 0."""

from pathlib import Path

import pytest
from lightning.fabric.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from tests.train.conftest import tiny_run_config
from tml.train.loggers import (
    WANDB_ID_ALPHABET,
    ConsoleReport,
    build_loggers,
    flat_hyperparameters,
    new_wandb_run_id,
)
from tml.train.loop import train


def logged_hyperparameters(run_dir) -> dict:
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    return {key: value.number_value if value.HasField("number_value") else value.string_value
            for key, value in hparams.items() if not value.HasField("bool_value")}


def test_every_config_key_is_flattened_to_a_scalar(tmp_path, tiny_shards):
    config = tiny_run_config(tiny_shards, tmp_path)
    config.data.book_ids = [11, 12]
    flat = flat_hyperparameters(config)
    assert len(flat) == sum(len(section) for section in config.to_dict().values())
    assert flat["train.lr"] == config.train.lr and flat["model.attention"] == "mla"
    assert flat["data.book_ids"] == "[11, 12]"  # TensorBoard's hparams take scalars only
    assert all(isinstance(value, (int, float, str, bool)) for value in flat.values())


def test_a_run_writes_its_hyperparameters_to_tensorboard(tmp_path, tiny_shards):
    config = tiny_run_config(tiny_shards, tmp_path, max_steps=2, lr=2e-3)
    train(config)
    logged = logged_hyperparameters(tmp_path)
    assert logged["train.lr"] == pytest.approx(2e-3)
    assert logged["train.max_steps"] == 2
    assert logged["model.attention"] == "mla"


def test_loggers_are_built_as_configured(tmp_path, tiny_shards, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    config = tiny_run_config(tiny_shards, tmp_path)
    config.log.tensorboard, config.log.wandb = True, False
    [tensorboard] = build_loggers(config, "abc")
    assert isinstance(tensorboard, TensorBoardLogger) and Path(tensorboard.log_dir) == tmp_path / "tensorboard"
    config.log.tensorboard, config.log.wandb = False, True
    [wandb] = build_loggers(config, "run12345")
    assert type(wandb).__name__ == "WandbLogger" and wandb.version == "run12345"
    config.log.tensorboard = config.log.wandb = False
    assert build_loggers(config, None) == []


def test_wandb_run_ids_use_wandbs_alphabet_and_differ():
    ids = {new_wandb_run_id() for _ in range(50)}
    assert len(ids) == 50
    assert all(len(run_id) == 8 and set(run_id) <= set(WANDB_ID_ALPHABET) for run_id in ids)


def test_console_report_prints_lines_and_a_summary_on_rank_zero_only(capsys):
    with ConsoleReport(enabled=True, max_steps=10, start_step=0) as report:
        report.print("step       5 | loss 1.2345")
        report.advance(5, "loss 1.2345")
        report.summary({"final val perplexity": "3.44", "stopped early": "False"})
    shown = capsys.readouterr().out
    assert "step       5 | loss 1.2345" in shown
    assert "tml training summary" in shown and "final val perplexity" in shown and "3.44" in shown

    with ConsoleReport(enabled=False, max_steps=10, start_step=0) as report:  # any other rank
        report.print("step       5 | loss 1.2345")
        report.summary({"final val perplexity": "3.44"})
    assert capsys.readouterr().out == ""
