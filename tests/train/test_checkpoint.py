import json
import os
import random

import numpy as np
import pytest
import torch

from tests.conftest import debug_model_config
from tml.config import Config
from tml.data.packed import PackedDataset
from tml.data.sampler import BatchStream
from tml.model import Transformer
from tml.train.checkpoint import (
    Checkpointer,
    CheckpointError,
    check_resume_config,
    load_model_weights,
    resolve_resume,
    verify_checkpoint,
    write_manifest,
)
from tml.train.config import TrainConfig
from tml.train.fabric import build_fabric
from tml.train.optim import build_optimizer, build_scheduler


def training_objects(shard_dir, seed=0):
    torch.manual_seed(seed)
    train = TrainConfig(accelerator="cpu", precision="32-true", max_steps=10)
    fabric = build_fabric(train)
    model = Transformer(debug_model_config())
    optimizer = build_optimizer(model, train)
    model, optimizer = fabric.setup(model), fabric.setup_optimizers(optimizer)
    scheduler = build_scheduler(optimizer.optimizer, train)
    stream = BatchStream(PackedDataset(shard_dir, "train", 32, 16), 4, 0, 1, seed=3)
    return fabric, model, optimizer, scheduler, stream


def take_steps(model, optimizer, scheduler, stream, n):
    for _ in range(n):
        x, y = next(stream)
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()


def saved_run(tmp_path, shards, steps=(2, 4, 6), keep=1, best_at=(2,)):
    fabric, model, optimizer, scheduler, stream = training_objects(shards)
    checkpointer = Checkpointer(fabric, tmp_path, keep=keep)
    config = Config(model=debug_model_config())
    done = 0
    for step in steps:
        take_steps(model, optimizer, scheduler, stream, step - done)
        done = step
        checkpointer.save(step, model, optimizer, scheduler, stream, {"step": step}, config, "run123",
                          best=step in best_at)
    return fabric, model, optimizer, scheduler, stream


def draws():
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_round_trip_restores_weights_optimizer_schedule_stream_and_rng(tmp_path, tiny_shards):
    fabric, model, optimizer, scheduler, stream = saved_run(tmp_path, tiny_shards, steps=(3,), best_at=())
    expected_next = next(stream)
    expected_rng = draws()  # saving consumed no randomness: these are the draws right after the save

    random.seed(11), np.random.seed(11), torch.manual_seed(11)  # states a resumed run must not keep
    fabric2, model2, optimizer2, scheduler2, stream2 = training_objects(tiny_shards, seed=99)
    restored = Checkpointer(fabric2, tmp_path, keep=1).load(
        resolve_resume("auto", tmp_path), model2, optimizer2, scheduler2, stream2)
    assert draws() == expected_rng
    assert restored["loop"] == {"step": 3}
    assert restored["meta"]["wandb_run_id"] == "run123"
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()
    assert torch.equal(optimizer2.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert all(torch.equal(a, b) for a, b in zip(next(stream2), expected_next, strict=True))
    assert (tmp_path / "checkpoints" / "last").is_symlink()


def test_keep_n_prunes_old_steps_but_never_last_or_best(tmp_path, tiny_shards):
    saved_run(tmp_path, tiny_shards, steps=(2, 4, 6, 8), keep=1, best_at=(2,))
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.glob("step-*")) == ["step-0000002", "step-0000008"]
    assert os.readlink(root / "best") == "step-0000002"
    assert os.readlink(root / "last") == "step-0000008"
    assert not list(root.glob(".tmp-*"))


def test_truncated_file_is_refused_naming_it(tmp_path, tiny_shards):
    saved_run(tmp_path, tiny_shards, steps=(2,))
    target = tmp_path / "checkpoints" / "step-0000002" / "model.pt"
    target.write_bytes(target.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model.pt.*truncated"):
        verify_checkpoint(target.parent)
    fabric, model, optimizer, scheduler, stream = training_objects(tiny_shards)
    with pytest.raises(CheckpointError, match="model.pt"):
        Checkpointer(fabric, tmp_path, keep=1).load(target.parent, model, optimizer, scheduler, stream)


def test_altered_bytes_are_refused_naming_the_file(tmp_path, tiny_shards):
    saved_run(tmp_path, tiny_shards, steps=(2,))
    target = tmp_path / "checkpoints" / "step-0000002" / "optimizer.pt"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="optimizer.pt.*corrupted"):
        verify_checkpoint(target.parent)


def test_directory_without_manifest_is_not_a_checkpoint(tmp_path, tiny_shards):
    saved_run(tmp_path, tiny_shards, steps=(2,))
    directory = tmp_path / "checkpoints" / "step-0000002"
    (directory / "MANIFEST.json").unlink()
    with pytest.raises(CheckpointError, match="MANIFEST.json is missing"):
        verify_checkpoint(directory)


def test_pickled_code_is_refused_even_with_a_valid_manifest(tmp_path, tiny_shards):
    saved_run(tmp_path, tiny_shards, steps=(2,))
    directory = tmp_path / "checkpoints" / "step-0000002"
    torch.save({"weights": Config()}, directory / "model.pt")  # an arbitrary object, not tensors
    write_manifest(directory)
    with pytest.raises(CheckpointError, match="cannot load .*model.pt"):
        load_model_weights(directory)


def test_model_weights_and_config_load_from_a_run_directory(tmp_path, tiny_shards):
    _, model, *_ = saved_run(tmp_path, tiny_shards, steps=(2, 4), best_at=(2,))
    state, config = load_model_weights(tmp_path)  # a run directory means its best checkpoint
    assert config.model == debug_model_config()
    assert json.loads((tmp_path / "checkpoints" / "best" / "meta.json").read_text())["step"] == 2
    assert set(state) == set(model.state_dict())


def test_resume_setting_is_resolved_or_refused(tmp_path):
    assert resolve_resume("none", tmp_path) is None
    assert resolve_resume("auto", tmp_path) is None  # nothing saved yet: start fresh
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        resolve_resume(str(tmp_path / "missing"), tmp_path)


def test_a_fresh_run_over_an_existing_run_is_refused_naming_its_last_step(tmp_path, tiny_shards):
    saved_run(tmp_path, tiny_shards, steps=(2, 4), keep=1, best_at=(2,))
    with pytest.raises(CheckpointError, match=r"up to step 4 .*--train\.resume auto continues it, another "
                                              r"--train\.out_dir starts a new run"):
        resolve_resume("none", tmp_path)
    assert resolve_resume("none", tmp_path / "elsewhere") is None


def test_auto_resumes_the_newest_step_when_a_run_died_before_pointing_last(tmp_path, tiny_shards):
    saved_run(tmp_path, tiny_shards, steps=(2, 4), keep=2, best_at=())
    (tmp_path / "checkpoints" / "last").unlink()
    assert resolve_resume("auto", tmp_path) == (tmp_path / "checkpoints" / "step-0000004").resolve()
    with pytest.raises(CheckpointError, match="up to step 4"):
        resolve_resume("none", tmp_path)


def test_a_changed_model_is_refused_naming_each_key_both_values_and_the_way_out(tmp_path):
    saved = Config(model=debug_model_config()).to_dict()
    current = Config(model=debug_model_config(attention="mha", n_layer=3))
    with pytest.raises(CheckpointError) as refused:
        check_resume_config(tmp_path, saved, current, "auto")
    message = str(refused.value)
    assert "model.n_layer 2 -> 3" in message and "model.attention mla -> mha" in message
    assert "another --train.out_dir" in message and "--model.n_layer 2 --model.attention mla" in message
    with pytest.raises(CheckpointError, match="--train.resume none"):  # resumed from a path: no out_dir to change
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
    assert check_resume_config(tmp_path, saved, current, "auto") == [
        "data.shard_dir data/gutenberg/shards -> /scratch/shards", "train.max_steps 18370 -> 400",
        "train.lr 0.0003 -> 0.001",
    ]
    del saved["train"]["max_steps"]  # a key the checkpoint predates is not compared
    assert "train.max_steps" not in " ".join(check_resume_config(tmp_path, saved, current, "auto"))


def test_a_stream_over_other_windows_is_refused_as_a_checkpoint_error(tmp_path, tiny_shards):
    saved_run(tmp_path, tiny_shards, steps=(2,))
    fabric, model, optimizer, scheduler, _ = training_objects(tiny_shards)
    other_windows = BatchStream(PackedDataset(tiny_shards, "train", 32, 8), 4, 0, 1, seed=3)
    with pytest.raises(CheckpointError, match="rank-00000.pt.*dataset_len"):
        Checkpointer(fabric, tmp_path, keep=1).load(resolve_resume("auto", tmp_path), model, optimizer, scheduler,
                                                    other_windows)
