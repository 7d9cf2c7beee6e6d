"""tml.load and tml export's files: one model, whichever of a run, a checkpoint or an export it is read from."""

import errno
import json
import os
import re
import shutil
from dataclasses import asdict

import pytest
import torch

import tml
from tests.conftest import debug_model_config
from tests.train.conftest import tiny_run_config, write_synthetic_shards
from tml.files import file_sha256
from tml.pretrained import EXPORT_FORMAT, ExportWriteError, description_path, export
from tml.run_dir import checkpoints_dir
from tml.train.checkpoint import CheckpointError, find_checkpoint, read_meta
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
    assert description["config"]["train"]["max_steps"] == 2  # the run's other settings, for the record
    assert "model" not in description["config"]  # one model section, the one loads read


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
                                              f"'tml-export/99', expected '{EXPORT_FORMAT}'"):
        tml.load(exported)
    with pytest.raises(CheckpointError, match="is an export's description; name its weights file instead"):
        tml.load(described)


@pytest.mark.parametrize(("edit", "said"), [
    (lambda d: d["model"].pop("n_kv_head"), "model.n_kv_head missing"),  # a default would build another model
    (lambda d: d["model"].pop("norm_type"), "model.norm_type missing"),  # only the first format predates it
    (lambda d: d["model"].update(n_heads=4), "unknown model.n_heads"),
    (lambda d: d["model"].update(n_head="4"), "model.n_head is '4', not a int"),
    (lambda d: d.pop("model"), "it has no 'model' section"),
])
def test_an_edited_description_is_refused_naming_what_is_wrong(run, tmp_path, edit, said):
    exported, described, _ = export(run, tmp_path / "model.pt")
    description = json.loads(described.read_text())
    edit(description)
    described.write_text(json.dumps(description))
    with pytest.raises(CheckpointError, match=f"{described} is not a usable export description: {said}"):
        tml.load(exported)


def test_a_first_format_description_names_gpt2s_block_which_it_predates_the_fields_of(run, tmp_path):
    exported, described, _ = export(run, tmp_path / "model.pt")
    description = json.loads(described.read_text())
    for field in ("mlp", "norm_type"):
        del description["model"][field]
    described.write_text(json.dumps(description | {"format": "tml-export/1"}))
    model = tml.load(exported)
    assert (model.config.mlp, model.config.norm_type) == ("gelu", "layernorm") and model.config == MODEL


def test_a_second_format_description_names_a_model_without_yarn_which_it_predates_the_fields_of(run, tmp_path):
    exported, described, _ = export(run, tmp_path / "model.pt")
    description = json.loads(described.read_text())
    yarn_fields = [name for name in description["model"] if name.startswith("rope_yarn_")]
    assert len(yarn_fields) == 5
    for field in yarn_fields:
        del description["model"][field]
    described.write_text(json.dumps(description | {"format": "tml-export/2"}))
    assert tml.load(exported).config == MODEL and MODEL.rope_yarn_factor == 1.0
    described.write_text(json.dumps(description))  # the current format names every field
    with pytest.raises(CheckpointError, match="model.rope_yarn_factor, model.rope_yarn_original_block_size, .* missing"):
        tml.load(exported)


def test_a_description_whose_model_does_not_fit_the_weights_is_refused_in_one_line(run, tmp_path):
    exported, described, _ = export(run, tmp_path / "model.pt")
    description = json.loads(described.read_text())
    description["model"]["n_kv_head"] = 1  # valid, but the weights hold 2 key/value heads
    described.write_text(json.dumps(description))
    with pytest.raises(CheckpointError, match=f"{exported}: the weights do not fit the model its description or "
                                              "config names \\(size mismatch for blocks.0.attn.qkv_proj.weight"):
        tml.load(exported)


def test_an_export_that_fails_half_way_leaves_the_previous_pair_whole_and_loadable(run, tmp_path, monkeypatch):
    exported, described, _ = export(run, tmp_path / "model.pt")
    previous = torch.load(exported, weights_only=True)  # a pair unlike the one the failing export would write
    previous["tok_emb.weight"] += 1
    torch.save(previous, exported)
    described.write_text(json.dumps(json.loads(described.read_text()) | {"weights_sha256": file_sha256(exported)}))
    before = {path: path.read_bytes() for path in (exported, described)}
    calls = []

    def description_write_fails(descriptor):  # the weights are written; the description finds the disk full
        calls.append(descriptor)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", description_write_fails)
    with pytest.raises(ExportWriteError, match=f"cannot write {described}: No space left on device"):
        export(run, exported)
    assert {path: path.read_bytes() for path in (exported, described)} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.json", "model.pt"]  # no temporaries
    monkeypatch.undo()
    assert tml.load(exported).config == MODEL


def test_export_refuses_to_replace_a_json_that_is_not_an_export_description(run, tmp_path):
    (tmp_path / "summary.json").write_text('{"final_step": 2}')
    with pytest.raises(ValueError, match="summary.json exists and is not an export's description"):
        export(run, tmp_path / "summary.pt")
    assert json.loads((tmp_path / "summary.json").read_text()) == {"final_step": 2}


def test_weights_to_start_from_come_from_a_run_or_an_export_and_refuse_another_shape_naming_each_field(run, tmp_path):
    from tml.pretrained import check_start_from, weights_to_start_from

    exported, _, _ = export(run, tmp_path / "model.pt")
    for path in (run, exported):
        state, source = weights_to_start_from(path, MODEL)
        assert source.endswith("step 2)") and set(state) == set(tml.load(run).state_dict())
    assert source.startswith(f"{exported} (exported from ")  # the file read, then where it came from
    with pytest.raises(CheckpointError, match=r"^train.init_from=.*gone: no such run directory, checkpoint or"):
        check_start_from(tmp_path / "gone", MODEL)
    longer = weights_to_start_from(run, debug_model_config(attention="mha", n_kv_head=2, block_size=64))[1]
    assert longer.endswith("trained on windows of 32 tokens, this run's 64: positions past that are new to the weights")
    # What shapes no parameter may differ: a fine-tuning run with dropout, a longer block, another RoPE base.
    weights_to_start_from(run, debug_model_config(attention="mha", n_kv_head=2, dropout=0.1, block_size=64,
                                                  rope_theta=500_000.0))
    # YaRN's settings too: a run reading 4x the context the weights were trained at (DeepSeek-V2's 4K -> 128K).
    yarn = debug_model_config(attention="mha", n_kv_head=2, block_size=4 * MODEL.block_size, rope_yarn_factor=4.0,
                              rope_yarn_original_block_size=MODEL.block_size, rope_yarn_beta_fast=16.0,
                              rope_yarn_beta_slow=2.0, rope_yarn_mscale=0.707)
    for path in (run, exported):
        check_start_from(path, yarn)
        assert set(weights_to_start_from(path, yarn)[0]) == set(state)
    check_start_from(run, debug_model_config(attention="mha", n_kv_head=2, kv_lora_rank=8))  # MHA reads no MLA rank
    with pytest.raises(CheckpointError, match=r"^train.init_from=.*: its model has another shape \(model.n_layer 2 "
                                              r"there, 3 here; model.n_kv_head 2 there, 1 here\)"):
        weights_to_start_from(run, debug_model_config(attention="mha", n_kv_head=1, n_layer=3))
    with pytest.raises(CheckpointError, match=r"another shape \(model.attention 'mha' there, 'mla' here\);"):
        check_start_from(exported, debug_model_config())  # read from the description alone
    with pytest.raises(CheckpointError, match=r"another shape \(model.norm_type 'layernorm' there, 'rmsnorm' here; "
                                              r"model.mlp 'gelu' there, 'swiglu' here\)"):
        check_start_from(exported, debug_model_config(attention="mha", n_kv_head=2, norm_type="rmsnorm", mlp="swiglu"))


def test_a_truncated_file_of_the_weights_to_start_from_is_refused_before_a_tensor_is_read(run, tmp_path):
    from tml.pretrained import check_start_from

    exported, _, _ = export(run, tmp_path / "model.pt")
    copied = tmp_path / "run"
    shutil.copytree(run, copied, symlinks=True)
    weights = find_checkpoint(copied) / "model.pt"  # the run's best, else last: what it starts from
    for path, cut in ((exported, exported), (copied, weights)):  # an export, and a run's checkpoint
        check_start_from(path, MODEL)
        with open(cut, "r+b") as file:
            file.truncate(cut.stat().st_size - 10)
        with pytest.raises(CheckpointError, match=re.escape(f"{cut} is truncated or altered: ")):
            check_start_from(path, MODEL)  # what launchers, sweeps and --dry-run ask before data or the queue
