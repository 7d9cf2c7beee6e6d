"""Loggers: hyper-parameters reach TensorBoard, wandb is built only when asked, the console speaks only on rank 0."""

import math
from pathlib import Path

import pytest
import torch
from lightning.fabric.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from tests.conftest import debug_model_config
from tests.train.conftest import tiny_run_config
from tml.model import Transformer
from tml.train.loggers import (
    WANDB_ID_ALPHABET,
    ConsoleReport,
    build_loggers,
    describe_model,
    flat_hyperparameters,
    model_hyperparameters,
    new_wandb_run_id,
    wandb_credentials_found,
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


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory, tiny_shards):
    """A 4-step run validating at steps 2 and 4, and what it returned."""
    out_dir = tmp_path_factory.mktemp("logged_run")
    result = train(tiny_run_config(tiny_shards, out_dir, max_steps=4, lr=2e-3, val_interval=2))
    return out_dir, result


def test_a_run_writes_its_hyperparameters_and_its_model_figures_to_tensorboard(logged_run):
    run_dir, _ = logged_run
    logged = logged_hyperparameters(run_dir)
    assert logged["train.lr"] == pytest.approx(2e-3)
    assert logged["train.max_steps"] == 4
    assert logged["model.attention"] == "mla"
    model = Transformer(debug_model_config())
    assert logged["model/params"] == model.num_params(non_embedding=False)
    assert logged["model/kv_cache_bytes_per_token"] == model.kv_cache_bytes_per_token(torch.float32)  # 32-true
    assert logged["model/flops_per_token"] == model.flops_per_token()


def test_tensorboard_hparams_rank_runs_by_val_perplexity_with_no_placeholder(logged_run):
    run_dir, result = logged_run
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/experiment"]
    columns = {info.name.tag for info in plugin_data_pb2.HParamsPluginData.FromString(content).experiment.metric_infos}
    assert {"val/perplexity", "val/best_perplexity"} <= columns and "hp_metric" not in columns
    assert "hp_metric" not in events.Tags()["scalars"]
    # The HParams view shows each column's latest value in the run: the real final and best val perplexity.
    final, best = (events.Scalars(tag)[-1] for tag in ("val/perplexity", "val/best_perplexity"))
    assert final.step == best.step == 4
    assert final.value == pytest.approx(result.val_perplexity, rel=1e-6)
    assert best.value == pytest.approx(math.exp(result.best_val_loss), rel=1e-6)
    assert [s.step for s in events.Scalars("val/perplexity")] == [2, 4]  # written once per validation


def test_model_figures_count_parameters_cache_and_flops_at_the_runs_precision():
    model = Transformer(debug_model_config())  # MLA: kv_lora_rank 32 + rope 8 numbers, 2 layers, n_embd 64
    figures = model_hyperparameters(model, "bf16-mixed")
    assert figures["model/params"] == model.num_params(non_embedding=False)
    assert figures["model/params_non_embedding"] == model.num_params(non_embedding=True)
    assert figures["model/kv_cache_numbers_per_token_per_layer"] == 32 + 8
    assert figures["model/kv_cache_bytes_per_token"] == 2 * 40 * 2
    assert figures["model/mha_kv_cache_bytes_per_token"] == 2 * (2 * 64) * 2  # K and V of every head
    assert figures["model/kv_cache_fraction_of_mha"] == pytest.approx(40 / 128)
    assert figures["model/flops_per_token"] == model.flops_per_token()
    assert model_hyperparameters(model, "32-true")["model/kv_cache_bytes_per_token"] == 2 * 40 * 4
    line = describe_model(figures)
    assert f"{figures['model/params']:,} parameters" in line and "40 numbers/token/layer, 160 B/token in bfloat16" in line
    assert "MHA of this width: 512 B/token" in line and "MLA caches 31.2% of it" in line

    mha = model_hyperparameters(Transformer(debug_model_config(attention="mha")), "16-mixed")
    assert mha["model/kv_cache_bytes_per_token"] == 2 * 128 * 2 and "model/mha_kv_cache_bytes_per_token" not in mha
    assert "MHA of this width" not in describe_model(mha)

    gqa = model_hyperparameters(Transformer(debug_model_config(attention="mha", n_kv_head=1)), "bf16-mixed")
    assert gqa["model/kv_cache_bytes_per_token"] == 2 * (2 * 16) * 2  # one key/value head of 16 dims
    assert "MHA of this width: 512 B/token; MQA caches 25.0% of it" in describe_model(gqa)


def test_loggers_are_built_as_configured(tmp_path, tiny_shards, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    config = tiny_run_config(tiny_shards, tmp_path)
    config.log.tensorboard, config.log.wandb = True, False
    [tensorboard] = build_loggers(config, "abc")
    assert isinstance(tensorboard, TensorBoardLogger) and Path(tensorboard.log_dir) == tmp_path / "tensorboard"
    config.log.tensorboard, config.log.wandb = False, True
    [wandb] = build_loggers(config, "run12345")
    assert type(wandb).__name__ == "WandbLogger" and wandb.version == "run12345"
    config.log.tensorboard = config.log.wandb = False
    assert build_loggers(config, None) == []


def test_wandb_goes_online_with_a_key_from_the_environment_or_from_wandb_login(tmp_path):
    netrc_file = tmp_path / "netrc"
    netrc_file.write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")  # as `wandb login`
    assert wandb_credentials_found({"WANDB_API_KEY": "0123"})
    assert wandb_credentials_found({"NETRC": str(netrc_file)})
    assert not wandb_credentials_found({"NETRC": str(netrc_file), "WANDB_BASE_URL": "https://wandb.example.org"})
    assert not wandb_credentials_found({"NETRC": str(tmp_path / "absent")})
    netrc_file.write_text("not netrc syntax")  # unparsable: offline rather than a crash at start-up
    assert not wandb_credentials_found({"NETRC": str(netrc_file)})


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
