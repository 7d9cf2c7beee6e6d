"""Resuming: a run killed with SIGKILL and resumed with `--train.resume auto` ends bit-identical to an uninterrupted
run, and tml/train/resume.py refuses what a checkpoint cannot continue under (model, optimizer, data, strategy)
and lists the rest."""

import dataclasses
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console

from tests.conftest import REPO_ROOT, debug_model_config
from tests.train.conftest import requires_muon, tiny_run_config
from tests.train.test_checkpoint import saved_run
from tests.train.test_loop import SUBPROCESS_TIMEOUT_S, launch
from tml.config import Config, dump_yaml
from tml.data.config import DataConfig
from tml.data.prepare import data_is_ready, prepare_data, shards_without_source
from tml.train.checkpoint import (
    DATA_CONTENT,
    CheckpointError,
    checkpoints_dir,
    read_meta,
    resolve_resume,
    safe_load,
    step_name,
    write_manifest,
)
from tml.train.config import TrainConfig
from tml.train.loop import train
from tml.train.resume import changed_settings, check_resume_config, check_resume_layout, resume_checkpoint

POLL_S = 0.05


def final_state(run_dir):
    last = checkpoints_dir(run_dir) / "last"
    return safe_load(last / "model.pt"), safe_load(last / "optimizer.pt"), read_meta(last)["step"]


@pytest.mark.slow
@pytest.mark.timeout(3 * SUBPROCESS_TIMEOUT_S + 30)
def test_sigkilled_run_resumed_with_auto_matches_an_uninterrupted_run_bit_for_bit(tmp_path, tiny_shards):
    settings = dict(max_steps=20, batch_size=8, grad_accum=2, ckpt_interval=4, val_interval=8, keep_checkpoints=1)
    reference = tiny_run_config(tiny_shards, tmp_path / "reference", **settings)
    done = launch(reference)
    assert done.returncode == 0, done.stderr[-3000:]

    killed = tiny_run_config(tiny_shards, tmp_path / "killed", resume="auto", **settings)
    config_path = tmp_path / "killed.yaml"
    config_path.write_text(dump_yaml(killed))
    process = subprocess.Popen([sys.executable, str(REPO_ROOT / "launch" / "local.py"), "--config", str(config_path)],
                               cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = checkpoints_dir(killed.train.out_dir) / "last"
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
    try:
        while not last.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(POLL_S)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    killed_at = read_meta(last)["step"]
    assert killed_at < settings["max_steps"], "the run finished before it could be killed"

    resumed = launch(killed)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {killed_at}" in resumed.stdout + resumed.stderr

    model_ref, optim_ref, step_ref = final_state(reference.train.out_dir)
    model_res, optim_res, step_res = final_state(killed.train.out_dir)
    assert step_ref == step_res == settings["max_steps"]
    for name, value in model_ref.items():
        assert torch.equal(model_res[name], value), name
    for index, state in optim_ref["state"].items():
        assert torch.equal(optim_res["state"][index]["exp_avg_sq"], state["exp_avg_sq"])


def test_resume_with_another_rank_count_or_dropout_prints_one_line_notices_not_warnings(
        tmp_path, tiny_shards, capsys, recwarn):
    config = tiny_run_config(tiny_shards, tmp_path, max_steps=2, val_interval=2, ckpt_interval=2)
    train(config)
    last = (checkpoints_dir(tmp_path) / "last").resolve()
    meta = read_meta(last)
    meta["world_size"] = 2  # as if saved by two DDP ranks, which all save the same data position
    (last / "meta.json").write_text(json.dumps(meta))
    write_manifest(last)
    capsys.readouterr()

    config.model, config.train.resume, config.train.max_steps = debug_model_config(dropout=0.1), "auto", 3
    assert train(config).final_step == 3
    out = capsys.readouterr().out
    notice = (f"{last} was saved with 2 ranks, this run has 1: the data stream continues from the saved position "
              "(rounded down to a whole global batch) and RNG states are re-seeded")
    assert out.count(notice) == 1
    assert "resuming with changed settings: model.dropout 0.0 -> 0.1, train.max_steps 2 -> 3" in out
    assert not [w for w in recwarn if "ranks, this run has" in str(w.message)]


def test_a_run_with_dropout_stopped_and_resumed_matches_an_uninterrupted_run_bit_for_bit(tmp_path, tiny_shards):
    """Dropout draws from torch's global generator, which the checkpoint restores: nothing in the resumed start
    (the CPU speed probe, the data loader's first iterator) may draw from it before the first step."""
    uninterrupted, resumed = stopped_at_3_and_resumed(tiny_shards, tmp_path, debug_model_config(dropout=0.1))
    assert all(torch.equal(resumed.model[name], value) for name, value in uninterrupted.model.items())


def stopped_at_3_and_resumed(tiny_shards, tmp_path, model=None, **train_settings):
    """Final states (model, optimizer) of a 6-step run trained straight through and of one stopped at step 3 (as a
    preemption stops it) and resumed with --train.resume auto."""
    from tests.train.test_loop import PreemptAtStep

    settings = dict(max_steps=6, ckpt_interval=100, val_interval=100, keep_checkpoints=1, **train_settings)
    runs = []
    for name in ("reference", "stopped"):
        config = tiny_run_config(tiny_shards, tmp_path / name, **settings)
        config.model = model or config.model
        if name == "stopped":
            assert train(config, preemption=PreemptAtStep(3)).final_step == 3
            config.train.resume = "auto"
        train(config)
        model_state, optimizer_state, step = final_state(config.train.out_dir)
        assert step == 6
        runs.append(SimpleNamespace(model=model_state, optimizer=optimizer_state, out_dir=Path(config.train.out_dir)))
    return runs


@pytest.mark.parametrize("optimizer", ["adamw", pytest.param("muon", marks=requires_muon)])
def test_optimizer_settings_changed_on_resume_are_the_ones_it_then_steps_with(tmp_path, tiny_shards, capsys, optimizer):
    config = tiny_run_config(tiny_shards, tmp_path, max_steps=2, val_interval=2, ckpt_interval=2, optimizer=optimizer)
    train(config)
    config.train = dataclasses.replace(config.train, resume="auto", max_steps=3, weight_decay=0.0, beta2=0.99,
                                       muon_momentum=0.5)
    train(config)
    out = capsys.readouterr().out
    assert "train.weight_decay 0.1 -> 0.0" in out and "train.beta2 0.95 -> 0.99" in out
    groups = safe_load(checkpoints_dir(tmp_path) / "last" / "optimizer.pt")["param_groups"]
    assert all(group["weight_decay"] == 0.0 for group in groups)  # listed as changed, and changed
    assert all(group["betas"] == (0.9, 0.99) for group in groups if group.get("algorithm", "adamw") == "adamw")
    assert all(group["momentum"] == 0.5 for group in groups if group.get("algorithm") == "muon")
    assert [group.get("algorithm") for group in groups][:1] == (["muon"] if optimizer == "muon" else [None])


def test_a_changed_model_is_refused_naming_each_key_both_values_and_the_way_out(tmp_path):
    saved = Config(model=debug_model_config()).to_dict()
    current = Config(model=debug_model_config(attention="mha", n_layer=3))
    with pytest.raises(CheckpointError) as refused:
        check_resume_config(tmp_path, saved, current, "auto")
    message = str(refused.value)
    assert "model.n_layer 2 -> 3" in message and "model.attention mla -> mha" in message
    assert "another --train.out_dir" in message and "--model.n_layer 2 --model.attention mla" in message
    current.train.out_dir = str(tmp_path / "new")
    with pytest.raises(CheckpointError, match="new run with --train.resume none, or"):  # resumed from a path
        check_resume_config(tmp_path, saved, current, str(tmp_path))
    (checkpoints_dir(current.train.out_dir) / step_name(4)).mkdir(parents=True)  # resume none would be refused
    with pytest.raises(CheckpointError, match="--train.resume none and another --train.out_dir, or"):
        check_resume_config(tmp_path, saved, current, str(tmp_path))


@pytest.mark.parametrize("section, key, value", [
    ("data", "stride", 8), ("data", "book_ids", [11, 12]), ("data", "val_frac", 0.2), ("train", "seed", 1),
])
def test_a_changed_data_stream_or_seed_is_refused(tmp_path, section, key, value):
    saved = Config().to_dict()
    current = Config()
    setattr(getattr(current, section), key, value)
    with pytest.raises(CheckpointError, match=f"{section}.{key} .* -> .*data position"):
        check_resume_config(tmp_path, saved, current, "auto")


def test_other_changes_are_listed_for_the_notice_and_paths_of_the_run_are_not(tmp_path):
    saved = Config().to_dict()
    current = Config()
    current.train.max_steps, current.train.lr, current.data.shard_dir = 400, 1e-3, "/scratch/shards"
    current.train.resume, current.train.out_dir, current.data.num_workers = "auto", "runs/moved", 4
    current.model.dropout, current.train.devices, current.train.num_nodes = 0.1, 2, 2
    assert check_resume_config(tmp_path, saved, current, "auto") == [
        "model.dropout 0.0 -> 0.1", "data.shard_dir data/gutenberg/shards -> /scratch/shards",
        "train.max_steps 18370 -> 400", "train.lr 0.0003 -> 0.001", "train.devices 1 -> 2", "train.num_nodes 1 -> 2",
    ]
    del saved["data"]["shard_dir"]  # a data key the checkpoint predates is not compared (train keys: their default)
    assert "data.shard_dir" not in " ".join(check_resume_config(tmp_path, saved, current, "auto"))


def test_a_path_written_absolute_is_the_same_setting(tmp_path, monkeypatch):
    """launch/slurm.py makes data paths absolute: a SLURM restart of a run started with relative ones changes nothing."""
    monkeypatch.chdir(tmp_path)
    saved = Config().to_dict()
    saved["data"]["source"] = "books"
    current = Config()
    current.data.source, current.data.shard_dir = str(tmp_path / "books"), str(tmp_path / "data/gutenberg/shards/")
    assert check_resume_config(tmp_path, saved, current, "auto") == []
    current.data.source = "gutenberg"  # the download keyword, not a directory called gutenberg
    with pytest.raises(CheckpointError, match="data.source books -> gutenberg"):
        check_resume_config(tmp_path, saved, current, "auto")


def fake_saved_run(out_dir, saved_config, world_size, deepspeed):
    """The meta.json resume_checkpoint reads, behind `last`: enough for a refusal that must come first."""
    step = out_dir / "checkpoints" / "step-0000004"
    step.mkdir(parents=True)
    meta = {"format": 1, "step": 4, "world_size": world_size, "deepspeed": deepspeed, "wandb_run_id": None,
            "config": saved_config.to_dict()}
    (step / "meta.json").write_text(json.dumps(meta))
    write_manifest(step)
    os.symlink(step.name, out_dir / "checkpoints" / "last")
    return step


def test_a_zero_checkpoint_under_another_rank_count_is_refused_before_anything_is_written(tmp_path, tiny_shards):
    zero = dict(strategy="deepspeed", zero_stage=2, resume="auto")
    step = fake_saved_run(tmp_path, tiny_run_config(tiny_shards, tmp_path, devices=2, **zero), 2, True)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(CheckpointError) as refused:
        train(tiny_run_config(tiny_shards, tmp_path, devices=1, **zero))
    message = str(refused.value)
    assert "\n" not in message
    assert f"{step} holds ZeRO shards for 2 ranks but this run has 1" in message
    assert "resume it with 2 ranks" in message and f"`tml eval --checkpoint {step}` read its weights" in message
    assert "`tml export` writes them as one fp32 .pt" in message
    assert sorted(tmp_path.rglob("*")) == before  # no config.yaml, no logger files


@pytest.mark.parametrize("saved_deepspeed, saved_strategy, advice", [
    (True, "deepspeed", "with 2 ranks (train.devices x train.num_nodes) and --train.strategy deepspeed "
                        "--train.zero_stage 3; `tml generate`/`tml eval"),
    (False, "ddp", "resume it with --train.strategy ddp; `tml generate`/`tml eval"),
])
def test_a_checkpoint_of_another_strategy_is_refused_with_advice_that_exists(tmp_path, saved_deepspeed,
                                                                             saved_strategy, advice):
    saved = Config(train=TrainConfig(strategy=saved_strategy, zero_stage=3)).to_dict()
    meta = {"world_size": 2, "deepspeed": saved_deepspeed, "config": saved}
    with pytest.raises(CheckpointError, match=re.escape(advice)) as refused:
        check_resume_layout(tmp_path, meta, deepspeed=not saved_deepspeed, world_size=2)
    assert "start a new run from the weights" not in str(refused.value)
    check_resume_layout(tmp_path, meta, deepspeed=saved_deepspeed, world_size=1 if not saved_deepspeed else 2)


def run_on_own_corpus(tmp_path, tiny_shards):
    """A run whose config names a prepared local corpus (the steps themselves train on the tiny shards)."""
    source = tmp_path / "corpus"
    source.mkdir()
    for name in ("a.txt", "b.txt"):
        (source / name).write_text(f"The text of {name}, repeated. " * 40, encoding="utf-8")
    data = DataConfig(source=str(source), shard_dir=str(tmp_path / "shards"), encode_threads=1)
    prepare_data(data, console=Console(file=io.StringIO()))
    config = Config(model=debug_model_config(), data=data, train=TrainConfig(out_dir=str(tmp_path / "run"),
                                                                             resume="auto"))
    saved_run(tmp_path / "run", tiny_shards, steps=(2,), best_at=(), config=config)
    return source, config


def test_a_resume_onto_changed_corpus_files_is_refused_but_not_after_a_touch(tmp_path, tiny_shards):
    source, config = run_on_own_corpus(tmp_path, tiny_shards)
    assert DATA_CONTENT in read_meta(resolve_resume("auto", config.train.out_dir))
    assert resume_checkpoint(config)[0] is not None
    os.utime(source / "a.txt", ns=(0, 10**18))  # touched: same bytes
    assert resume_checkpoint(config)[0] is not None
    original = (source / "a.txt").read_text()
    (source / "a.txt").write_text(original.replace("repeated", "REPEATED"))
    with pytest.raises(CheckpointError) as refused:
        resume_checkpoint(config)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"cannot resume {resolve_resume('auto', config.train.out_dir)}")
    assert f"its shards in {config.data.shard_dir} were built from other text than data.source {source}" in message
    assert "restore those files as they were, or start a new run on the changed corpus with another --train.out_dir" \
        in message
    (source / "a.txt").write_text(original)
    assert resume_checkpoint(config)[0] is not None


def test_a_corpus_moved_elsewhere_resumes_with_a_notice_and_other_text_there_is_refused(tmp_path, tiny_shards):
    """Copied to another machine, the same files at another path are the same data: the position still fits."""
    source, config = run_on_own_corpus(tmp_path, tiny_shards)
    moved = tmp_path / "cluster" / "corpus"
    shutil.copytree(source, moved)  # new path, new ctimes: the shard index no longer vouches for the files
    config.data.source = str(moved)
    directory, _, changed = resume_checkpoint(config)
    assert directory is not None and changed == [f"data.source {source} -> {moved}"]
    (moved / "b.txt").write_text("Other text at the new place.\n")
    with pytest.raises(CheckpointError, match=re.escape(f"changed data.source {source} -> {moved}")):
        resume_checkpoint(config)


def test_a_moved_corpus_holding_other_text_is_refused_naming_the_files(tmp_path, tiny_shards):
    source, config = run_on_own_corpus(tmp_path, tiny_shards)
    moved = tmp_path / "cluster" / "corpus"
    shutil.copytree(source, moved)
    (moved / "b.txt").write_text("Edited on the way.\n")
    config.data.source = str(moved)
    with pytest.raises(CheckpointError, match=re.escape(f"changed data.source {source} -> {moved} (other text: 1 "
                                                        "changed (b.txt) against the checkpoint's)")):
        resume_checkpoint(config)


def test_shards_standing_alone_with_other_text_are_refused_naming_where_they_came_from(tmp_path, tiny_shards):
    source, config = run_on_own_corpus(tmp_path, tiny_shards)
    other = tmp_path / "other"
    shutil.copytree(source, other)
    (other / "b.txt").write_text("Other text.\n")
    prepare_data(replace(config.data, source=str(other)), console=Console(file=io.StringIO()))  # rebuilt from it
    shutil.rmtree(source), shutil.rmtree(other)  # neither corpus on this machine
    with pytest.raises(CheckpointError, match=re.escape(f"the shards in {config.data.shard_dir} hold other text than "
                                                        f"it was trained on (built from {other}; data.source "
                                                        f"{source} is not on this machine)")):
        resume_checkpoint(config)


def test_shards_copied_without_their_corpus_resume_from_the_shards_alone(tmp_path, tiny_shards):
    source, config = run_on_own_corpus(tmp_path, tiny_shards)
    shutil.rmtree(source)  # the text stayed on the workstation; the shards came along
    assert data_is_ready(config.data)
    assert shards_without_source(config.data) == (f"data.source {source} is not on this machine: training on the "
                                                  f"shards in {config.data.shard_dir}, built from {source}")
    assert resume_checkpoint(config)[0] is not None


def test_a_checkpoint_without_a_data_fingerprint_resumes_as_before(tmp_path, tiny_shards):
    source, config = run_on_own_corpus(tmp_path, tiny_shards)
    directory = resolve_resume("auto", config.train.out_dir)
    meta = read_meta(directory)
    del meta[DATA_CONTENT]  # as written before checkpoints recorded it
    (directory / "meta.json").write_text(json.dumps(meta))
    write_manifest(directory)
    (source / "c.txt").write_text("A file added since.\n")
    assert resume_checkpoint(config)[0] == directory


def test_a_run_from_before_val_split_resumes_only_with_whole_books_held_out(tmp_path, tiny_shards):
    source, config = run_on_own_corpus(tmp_path, tiny_shards)  # 2 files: auto means tail
    directory = resolve_resume("auto", config.train.out_dir)
    meta = read_meta(directory)
    del meta["config"]["data"]["val_split"], meta[DATA_CONTENT]
    (directory / "meta.json").write_text(json.dumps(meta))
    write_manifest(directory)
    with pytest.raises(CheckpointError, match=r"predates data.val_split\), and data.val_split auto now means tail "
                                              r".*continue it with --data.val_split books"):
        resume_checkpoint(config)
    config.data.val_split = "books"
    assert resume_checkpoint(config)[0] == directory


def test_a_refused_resume_names_the_files_added_removed_or_changed(tmp_path, tiny_shards):
    source, config = run_on_own_corpus(tmp_path, tiny_shards)
    (source / "a.txt").write_text("The text of a.txt, edited.\n", encoding="utf-8")
    (source / "b.txt").unlink()
    (source / "c.txt").write_text("A file added since.\n", encoding="utf-8")
    with pytest.raises(CheckpointError, match=re.escape(
            f"than data.source {source} holds now (1 added (c.txt), 1 removed (b.txt), 1 changed (a.txt) since), so "
            "its data position would point into other text")):
        resume_checkpoint(config)
    prepare_data(config.data, console=Console(file=io.StringIO()))  # the index now lists the new files only
    with pytest.raises(CheckpointError, match=re.escape("holds now (files added, removed or edited since)")):
        resume_checkpoint(config)


def test_naming_the_val_split_that_auto_chose_resumes_and_another_split_is_refused(tmp_path, tiny_shards):
    source, config = run_on_own_corpus(tmp_path, tiny_shards)  # 2 files: auto means tail
    config.data.val_split = "tail"  # what auto chose: the same windows
    directory, _, changed = resume_checkpoint(config)
    assert directory is not None and changed == ["data.val_split auto -> tail"]
    config.data.val_split = "books"  # whole files instead: every window moves
    with pytest.raises(CheckpointError, match=r"changed data\.val_split auto -> books"):
        resume_checkpoint(config)


def test_a_run_reading_its_unchanged_shards_resumes_after_the_source_is_edited_but_not_after_a_rebuild(
        tmp_path, tiny_shards):
    """What a SLURM restart meets: it prepares nothing, so a corpus edited during the job leaves its shards as
    they were, and the requeue must go on; shards rebuilt from the edited text are refused."""
    source, config = run_on_own_corpus(tmp_path, tiny_shards)
    (source / "a.txt").write_text((source / "a.txt").read_text() + "A line appended during the job.\n")
    with pytest.raises(CheckpointError, match=r"1 changed \(a\.txt\) since"):
        resume_checkpoint(config)  # a launcher, before it would rebuild the shards
    assert resume_checkpoint(config, shards_built=True)[0] is not None
    prepare_data(config.data, console=Console(file=io.StringIO()))  # someone rebuilds them from the edited text
    with pytest.raises(CheckpointError, match=r"were rebuilt since from other text .*run tml-prepare"):
        resume_checkpoint(config, shards_built=True)


def test_a_model_field_added_since_a_checkpoint_is_compared_with_the_model_that_existed_before_it(tmp_path):
    """A checkpoint saved before model.mlp and model.norm_type existed holds GPT-2's block: resuming it as another
    block is a change (refused), resuming it as it was is none."""
    current = tiny_run_config(tmp_path, tmp_path)
    saved = current.to_dict()
    for key in ("mlp", "norm_type"):
        del saved["model"][key]
    assert changed_settings(saved, current) == []
    deepseek = replace(current, model=replace(current.model, norm_type="rmsnorm", mlp="swiglu"))
    assert changed_settings(saved, deepseek) == [("model.norm_type", "layernorm", "rmsnorm"),
                                                            ("model.mlp", "gelu", "swiglu")]


def test_a_train_field_added_since_a_checkpoint_is_listed_when_set_otherwise_on_resume(tmp_path):
    current = tiny_run_config(tmp_path, tmp_path)
    saved = current.to_dict()
    del saved["train"]["warmup_steps"]
    assert changed_settings(saved, current) == []
    fixed = replace(current, train=replace(current.train, warmup_steps=100))
    assert changed_settings(saved, fixed) == [("train.warmup_steps", None, 100)]


def test_another_text_field_is_refused_for_a_jsonl_corpus_and_only_listed_for_plain_text(tmp_path, tiny_shards):
    """Which field of a .jsonl record is read decides the text, so the saved data position; without a .jsonl file
    the field is never read."""
    source, config = run_on_own_corpus(tmp_path, tiny_shards)  # a.txt and b.txt
    config.data.text_field = "body"
    assert resume_checkpoint(config)[2] == ["data.text_field text -> body"]

    records = "".join(json.dumps({"text": f"Record {n} of a JSON Lines corpus. " * 20}) + "\n" for n in range(8))
    (tmp_path / "jsonl").mkdir()
    (tmp_path / "jsonl" / "docs.jsonl").write_text(records)
    data = DataConfig(source=str(tmp_path / "jsonl"), shard_dir=str(tmp_path / "jsonl-shards"), encode_threads=1)
    prepare_data(data, console=Console(file=io.StringIO()))
    jsonl_run = Config(model=debug_model_config(), data=data,
                       train=TrainConfig(out_dir=str(tmp_path / "jsonl-run"), resume="auto"))
    saved_run(tmp_path / "jsonl-run", tiny_shards, steps=(2,), best_at=(), config=jsonl_run)
    assert resume_checkpoint(jsonl_run)[2] == []
    jsonl_run.data.text_field = "body"
    with pytest.raises(CheckpointError, match=r"changed data\.text_field text -> body .*data position"):
        resume_checkpoint(jsonl_run)


def test_a_run_that_read_a_jsonl_file_as_plain_text_is_refused_before_its_shards_are_rebuilt(tmp_path, tiny_shards):
    """Before JSON Lines support a single .jsonl data.source was read as plain text; its checkpoint counts windows of
    that text, which no setting brings back."""
    (tmp_path / "corpus.jsonl").write_text(
        "".join(json.dumps({"text": f"Record {n} of a JSON Lines corpus. " * 20}) + "\n" for n in range(8)))
    data = DataConfig(source=str(tmp_path / "corpus.jsonl"), shard_dir=str(tmp_path / "shards"), encode_threads=1)
    prepare_data(data, console=Console(file=io.StringIO()))
    config = Config(model=debug_model_config(), data=data,
                    train=TrainConfig(out_dir=str(tmp_path / "run"), resume="auto"))
    saved_run(tmp_path / "run", tiny_shards, steps=(2,), best_at=(), config=config)
    directory = resolve_resume("auto", config.train.out_dir)
    meta = read_meta(directory)
    del meta["config"]["data"]["text_field"]  # as an older tml saved it
    (directory / "meta.json").write_text(json.dumps(meta))
    write_manifest(directory)
    index_before = (tmp_path / "shards" / "index.json").read_bytes()
    with pytest.raises(CheckpointError, match=re.escape(
            f"cannot resume {directory}: it was trained on corpus.jsonl read as plain text, by a tml that did not yet "
            "read JSON Lines files as records")):
        resume_checkpoint(config)
    assert (tmp_path / "shards" / "index.json").read_bytes() == index_before
