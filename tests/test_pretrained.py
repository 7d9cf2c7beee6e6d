"""tml.load and tml export's files: one model, whichever of a run, a checkpoint or an export it is read from."""

import json
from dataclasses import asdict

import pytest
import torch

import tml
from tests.conftest import debug_model_config
from tests.train.conftest import tiny_run_config, write_synthetic_shards
from tml.files import file_sha256
from tml.pretrained import EXPORT_FORMAT, description_path, export
from tml.run_dir import checkpoints_dir
from tml.train.checkpoint import CheckpointError, read_meta
from tml.train.loop import train

# Grouped-query attention: the newest model kind goes through training, checkpoint, export and load end to end.
MODEL = debug_model_config(attention="mha", n_kv_head=2)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    shards = write_synthetic_shards(tmp_path_factory.mktemp("shards"))
    config = tiny_run_config(shards, tmp_path_factory.mktemp("run"), max_steps=2, val_interval=2, ckpt_interval=2)
    config.model = MODEL
    train(config)
    return config.train.out_dir


def logits(model: torch.nn.Module) -> torch.Tensor:
    idx = torch.arange(24).view(2, 12) % MODEL.vocab_size
    return model(idx, idx)[0]


def test_a_run_its_checkpoint_and_its_export_load_as_the_same_model_in_eval_mode(run, tmp_path):
    exported, _, tensors = export(run, tmp_path / "model.pt")
    models = [tml.load(run), tml.load(checkpoints_dir(run) / "last", device="cpu"), tml.load(exported)]
    assert tensors == len(models[0].state_dict())
    for model in models:
        assert not model.training and model.config == MODEL
        torch.testing.assert_close(logits(model), logits(models[0]), rtol=0, atol=0)


def test_the_description_names_the_model_tokenizer_source_and_the_weights_it_belongs_to(run, tmp_path):
    exported, described, _ = export(run, tmp_path / "weights.pth")
    assert described == tmp_path / "weights.json" == description_path(exported)
    description = json.loads(described.read_text())
    last = (checkpoints_dir(run) / "last").resolve()
    assert description["format"] == EXPORT_FORMAT and description["model"] == asdict(MODEL)
    assert (description["checkpoint"], description["step"]) == (str(last), read_meta(last)["step"])
    assert description["weights_sha256"] == file_sha256(exported) and description["tokenizer"] == "gpt2"
    assert description["config"]["train"]["max_steps"] == 2  # the whole run's settings, for the record


def test_an_export_of_an_export_keeps_the_weights_and_where_they_came_from(run, tmp_path):
    first, first_description, _ = export(run, tmp_path / "first.pt")
    second, second_description, _ = export(first, tmp_path / "second.pt")
    assert file_sha256(first) == file_sha256(second)
    keep = ("model", "checkpoint", "step", "config")
    old, new = (json.loads(path.read_text()) for path in (first_description, second_description))
    assert {key: old[key] for key in keep} == {key: new[key] for key in keep}


def test_a_description_of_another_format_is_refused_naming_the_file(run, tmp_path):
    exported, described, _ = export(run, tmp_path / "model.pt")
    description = json.loads(described.read_text())
    described.write_text(json.dumps(description | {"format": "tml-export/99"}))
    with pytest.raises(CheckpointError, match=f"{described} is not a usable export description: format "
                                              "'tml-export/99', expected 'tml-export/1'"):
        tml.load(exported)
    with pytest.raises(CheckpointError, match="is an export's description; name its weights file instead"):
        tml.load(described)
