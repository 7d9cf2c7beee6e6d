import errno
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning import Fabric

from tests.conftest import debug_model_config
from tests.train.conftest import tiny_run_config
from tml.config import Config
from tml.data.packed import PackedDataset
from tml.data.sampler import BatchStream
from tml.model import Transformer
from tml.train import checkpoint
from tml.train.checkpoint import (
    Checkpointer,
    CheckpointError,
    branches_another_run,
    checkpoints_dir,
    disk_space_warning,
    load_model_weights,
    read_meta,
    resolve_resume,
    verify_checkpoint,
    write_manifest,
)
from tml.train.config import TrainConfig
from tml.train.fabric import build_fabric
from tml.train.loop import teardown as teardown_ranks  # not `teardown`: pytest 8.0 would call it
from tml.train.loop import train
from tml.train.optim import build_optimizer, build_scheduler
from tml.train.resume import resume_checkpoint


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


def saved_run(tmp_path, shards, steps=(2, 4, 6), keep=1, best_at=(2,), config=None):
    fabric, model, optimizer, scheduler, stream = training_objects(shards)
    checkpointer = Checkpointer(fabric, tmp_path, keep=keep)
    config = config or Config(model=debug_model_config())
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


def test_a_checkpoint_that_cannot_be_read_is_a_checkpoint_error_every_rank_raises(tmp_path, tiny_shards, monkeypatch):
    """Rank 0 checks the files for all: an I/O error there must reach the other ranks as a refusal, not a hang."""
    saved_run(tmp_path, tiny_shards, steps=(2,))
    fabric, model, optimizer, scheduler, stream = training_objects(tiny_shards)

    def unreadable(path):
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))

    monkeypatch.setattr(checkpoint, "file_sha256", unreadable)
    directory = resolve_resume("auto", tmp_path)
    with pytest.raises(CheckpointError, match=re.escape(f"cannot read checkpoint {directory}: [Errno 5] "
                                                        "Input/output error")):
        Checkpointer(fabric, tmp_path, keep=1).load(directory, model, optimizer, scheduler, stream)


def test_a_corrupted_last_is_refused_naming_the_newest_older_checkpoint_to_resume_from(tmp_path, tiny_shards):
    saved_run(tmp_path, tiny_shards, steps=(2, 4, 6), keep=3, best_at=())
    root = tmp_path / "checkpoints"
    target = root / "step-0000006" / "model.pt"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    fabric, model, optimizer, scheduler, stream = training_objects(tiny_shards)
    with pytest.raises(CheckpointError, match=re.escape(f"{target} is corrupted: its sha256 does not match "
                                                        f"MANIFEST.json; an older checkpoint is there: "
                                                        f"--train.resume {root / 'step-0000004'}")):
        Checkpointer(fabric, tmp_path, keep=3).load(resolve_resume("auto", tmp_path), model, optimizer, scheduler,
                                                   stream)
    shutil.rmtree(root / "step-0000002"), shutil.rmtree(root / "step-0000004")
    with pytest.raises(CheckpointError, match="no older checkpoint is left in this run"):
        Checkpointer(fabric, tmp_path, keep=3).load(resolve_resume("auto", tmp_path), model, optimizer, scheduler,
                                                   stream)


def test_an_unreadable_meta_json_in_last_names_the_older_checkpoint_too(tmp_path, tiny_shards):
    config = Config(model=debug_model_config(), train=TrainConfig(out_dir=str(tmp_path), resume="auto"))
    saved_run(tmp_path, tiny_shards, steps=(2, 4), keep=2, best_at=(), config=config)
    root = checkpoints_dir(tmp_path)
    meta = root / "step-0000004" / "meta.json"
    advice = re.escape(f"; an older checkpoint is there: --train.resume {root / 'step-0000002'}")
    meta.write_text("{not json".ljust(meta.stat().st_size))  # its size kept: only reading it finds it out
    with pytest.raises(CheckpointError, match=re.escape(f"cannot read {meta}: ") + ".*" + advice):
        resume_checkpoint(config)
    meta.write_text("{not json")  # the manifest's size check comes first: no file of it is read, only listed
    with pytest.raises(CheckpointError, match=re.escape(f"{meta} is truncated or altered: 9 bytes") + ".*" + advice):
        resume_checkpoint(config)


def test_a_truncated_weights_file_is_refused_before_the_start_reads_a_tensor(tmp_path, tiny_shards):
    config = Config(model=debug_model_config(), train=TrainConfig(out_dir=str(tmp_path), resume="auto"))
    saved_run(tmp_path, tiny_shards, steps=(2, 4), keep=2, best_at=(), config=config)
    weights = next((checkpoints_dir(tmp_path) / "step-0000004").glob("model*"))
    with open(weights, "r+b") as file:
        file.truncate(100)
    with pytest.raises(CheckpointError, match=re.escape(f"{weights} is truncated or altered: 100 bytes")):
        resume_checkpoint(config)  # what launchers, sweeps and --dry-run ask before data or a queued job


def test_a_link_that_cannot_be_pointed_is_one_clear_error_on_every_rank(tmp_path, tiny_shards, monkeypatch):
    """Pointing `last` is a phase the ranks agree on too: raised here, not left for a barrier to wait on."""
    fabric, model, optimizer, scheduler, stream = saved_run(tmp_path, tiny_shards, steps=(2,), best_at=())
    root = tmp_path / "checkpoints"

    def symlink_on_a_full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "symlink", symlink_on_a_full_disk)
    with pytest.raises(CheckpointError, match=re.escape(f"cannot write checkpoint {root / 'step-0000004'}: "
                                                        "No space left on device")):
        Checkpointer(fabric, tmp_path, keep=1).save(4, model, optimizer, scheduler, stream, {"step": 4},
                                                    Config(model=debug_model_config()), "run123")
    assert os.readlink(root / "last") == "step-0000002"  # still the last complete checkpoint it points at


def test_a_pruned_checkpoint_a_reader_holds_open_does_not_fail_the_save(tmp_path, tiny_shards, monkeypatch):
    """On NFS a file open elsewhere (`tml eval` on an old step) cannot be deleted (EBUSY): pruning leaves the rest
    for the next start instead of failing the run."""
    fabric, model, optimizer, scheduler, stream = saved_run(tmp_path, tiny_shards, steps=(2,), best_at=())
    root = tmp_path / "checkpoints"
    real_unlink = os.unlink

    def unlink_busy(path, *args, **kwargs):
        if os.fspath(path) == "optimizer.pt":
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), path)
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink_busy)
    take_steps(model, optimizer, scheduler, stream, 2)
    Checkpointer(fabric, tmp_path, keep=1).save(4, model, optimizer, scheduler, stream, {"step": 4},
                                                Config(model=debug_model_config()), "run123")
    assert os.readlink(root / "last") == "step-0000004" and not (root / "step-0000002").exists()
    assert (root / ".stale-step-0000002" / "optimizer.pt").exists()  # what could not be deleted
    monkeypatch.setattr(os, "unlink", real_unlink)
    Checkpointer(fabric, tmp_path, keep=1)  # the next start
    assert not (root / ".stale-step-0000002").exists()


def test_a_full_disk_while_saving_is_one_clear_error_and_the_previous_checkpoint_stays_last(
        tmp_path, tiny_shards, monkeypatch):
    fabric, model, optimizer, scheduler, stream = saved_run(tmp_path, tiny_shards, steps=(2,), best_at=())
    root = tmp_path / "checkpoints"
    before = {path: path.read_bytes() for path in root.rglob("*") if path.is_file()}
    real_save = torch.save

    def save_until_the_disk_fills(obj, path, *args, **kwargs):
        if str(path).endswith("optimizer.pt"):  # what torch's zip writer raises when the disk fills mid-file
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3187968 vs 3187860")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_fills)
    with pytest.raises(CheckpointError, match=re.escape(f"cannot write checkpoint {root / 'step-0000004'}: "
                                                        "RuntimeError: [enforce fail") + r".* \([\d,.]+ MB free\); the "
                                              r"checkpoints already in .* are left as they were"):
        Checkpointer(fabric, tmp_path, keep=1).save(4, model, optimizer, scheduler, stream, {"step": 4},
                                                    Config(model=debug_model_config()), "run123")
    assert {path: path.read_bytes() for path in root.rglob("*") if path.is_file()} == before
    assert os.readlink(root / "last") == "step-0000002" and not list(root.glob(".tmp-*"))


def test_a_disk_too_small_for_two_checkpoints_is_warned_about_at_start_up(tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    params = 100_000_000  # 1.2 GB a checkpoint
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=2_000_000_000))
    assert disk_space_warning(tmp_path / "runs" / "new", params) == (
        f"warning: {tmp_path} has 2.00 GB free, and two checkpoints of this model take about 2.40 GB: saving may "
        "fail (free space, or another --train.out_dir)")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=3_000_000_000))
    assert disk_space_warning(tmp_path, params) is None


def test_directories_of_killed_saves_are_removed_when_the_next_training_starts(tmp_path, tiny_shards):
    saved_run(tmp_path, tiny_shards, steps=(2,), best_at=())
    root = tmp_path / "checkpoints"
    for leftover in (".tmp-step-0000005", ".stale-step-0000002"):  # SIGKILL mid-save, mid-replace
        (root / leftover).mkdir()
        (root / leftover / "model.pt").write_bytes(b"partial")
    fabric, *_ = training_objects(tiny_shards)
    Checkpointer(fabric, tmp_path, keep=1)
    assert sorted(path.name for path in root.iterdir()) == ["last", "step-0000002"]


def test_a_run_directory_whose_links_dangle_names_them_and_the_newest_complete_checkpoint(tmp_path, tiny_shards):
    saved_run(tmp_path, tiny_shards, steps=(2, 4), keep=2, best_at=(4,))
    root = tmp_path / "checkpoints"
    shutil.rmtree(root / "step-0000004")
    with pytest.raises(CheckpointError, match=re.escape(
            f"{tmp_path}: {root / 'best'} -> step-0000004 and {root / 'last'} -> step-0000004 point to missing "
            f"checkpoints; the newest complete one is {root / 'step-0000002'}")):
        load_model_weights(tmp_path)


def test_a_checkpoint_path_that_does_not_exist_is_said_so(tmp_path):
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'nope'}: no such checkpoint or run directory")):
        load_model_weights(tmp_path / "nope")


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


def test_a_deepspeed_checkpoint_that_cannot_be_consolidated_is_a_checkpoint_error(tmp_path, tiny_shards):
    """generate, eval, export and init_from all catch CheckpointError: ZeRO's own refusals arrive as one."""
    saved_run(tmp_path, tiny_shards, steps=(2,))
    directory = tmp_path / "checkpoints" / "step-0000002"
    meta = json.loads((directory / "meta.json").read_text())
    (directory / "meta.json").write_text(json.dumps({**meta, "deepspeed": True}))
    (directory / "deepspeed").mkdir()  # no `latest` tag file: not a ZeRO checkpoint
    (directory / "deepspeed" / "notes.txt").write_text("not a shard")
    write_manifest(directory)
    with pytest.raises(CheckpointError, match="latest is missing"):
        load_model_weights(directory)


@pytest.mark.parametrize("files", [[], {"meta.json": {"size": 3}}, {"meta.json": "sha"}, "files"])
def test_a_manifest_of_the_wrong_shape_is_refused_as_corrupted(tmp_path, tiny_shards, files):
    saved_run(tmp_path, tiny_shards, steps=(2,))
    directory = tmp_path / "checkpoints" / "step-0000002"
    (directory / "MANIFEST.json").write_text(json.dumps({"format": 1, "files": files}))
    with pytest.raises(CheckpointError, match="MANIFEST.json is corrupted"):
        verify_checkpoint(directory)


def test_model_weights_and_config_load_from_a_run_directory(tmp_path, tiny_shards):
    _, model, *_ = saved_run(tmp_path, tiny_shards, steps=(2, 4), best_at=(2,))
    state, config = load_model_weights(tmp_path)  # a run directory means its best checkpoint
    assert config.model == debug_model_config()
    assert json.loads((tmp_path / "checkpoints" / "best" / "meta.json").read_text())["step"] == 2
    assert set(state) == set(model.state_dict())


def test_reading_the_weights_checks_only_the_files_that_hold_them(tmp_path, tiny_shards):
    """generate/eval/export read meta.json and model.pt; a damaged optimizer file is training's problem (a resume
    still refuses it), and hashing it would only make the read slower."""
    saved_run(tmp_path, tiny_shards, steps=(2,))
    directory = tmp_path / "checkpoints" / "step-0000002"
    (directory / "optimizer.pt").write_bytes(b"damaged")
    state, _ = load_model_weights(directory)
    assert "tok_emb.weight" in state
    with pytest.raises(CheckpointError, match="optimizer.pt is truncated or altered"):
        verify_checkpoint(directory)
    (directory / "model.pt").write_bytes(b"damaged")
    with pytest.raises(CheckpointError, match="model.pt is truncated or altered"):
        load_model_weights(directory)


def test_a_checkpoint_pruned_while_it_is_read_is_replaced_by_the_one_the_link_points_at_now(tmp_path, tiny_shards,
                                                                                            monkeypatch):
    """A training running in the same run moves `last` on and removes the step it pointed at mid-read."""
    saved_run(tmp_path, tiny_shards, steps=(2, 4), keep=2, best_at=())
    root = tmp_path / "checkpoints"
    real_verify, moves = checkpoint.verify_checkpoint, [1]

    def training_moves_on(directory, only=None):
        if directory.name == "step-0000004" and moves:
            moves.pop()
            os.replace(root / "step-0000002", root / "moved-step-0000002")  # stands in for a newer checkpoint
            (root / "last").unlink()
            (root / "last").symlink_to("moved-step-0000002")
            os.replace(directory, root / ".stale-step-0000004")  # pruned: renamed away, then deleted
        return real_verify(directory, only)

    monkeypatch.setattr(checkpoint, "verify_checkpoint", training_moves_on)
    state, _ = load_model_weights(root / "last")
    assert "tok_emb.weight" in state
    os.replace(root / ".stale-step-0000004", root / "step-0000004")
    (root / "last").unlink()
    (root / "last").symlink_to("step-0000004")
    monkeypatch.setattr(checkpoint, "verify_checkpoint", lambda directory, only=None: os.replace(
        directory, root / ".stale-step-0000004") or real_verify(directory, only))
    with pytest.raises(CheckpointError, match=re.escape(f"{root / 'step-0000004'} was removed while it was read: a "
                                                        "training still running in this run keeps only")):
        load_model_weights(root / "step-0000004")  # named directly: nothing to follow again


def test_resume_setting_is_resolved_or_refused(tmp_path):
    assert resolve_resume("none", tmp_path) is None
    assert resolve_resume("auto", tmp_path) is None  # nothing saved yet: start fresh
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        resolve_resume(str(tmp_path / "missing"), tmp_path)


def test_a_run_directory_given_as_resume_continues_from_its_last_not_its_best(tmp_path, tiny_shards):
    run = tmp_path / "run"
    saved_run(run, tiny_shards, steps=(2, 4), keep=2, best_at=(2,))
    root = checkpoints_dir(run)
    assert resolve_resume(str(run), tmp_path / "elsewhere") == (root / "step-0000004").resolve()
    assert resolve_resume(str(root / "best"), tmp_path / "elsewhere") == (root / "step-0000002").resolve()


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


def test_a_dangling_last_names_the_newest_complete_step_and_how_auto_reaches_it(tmp_path, tiny_shards):
    saved_run(tmp_path, tiny_shards, steps=(2, 4), keep=2, best_at=())
    root = tmp_path / "checkpoints"
    shutil.rmtree(root / "step-0000004")  # `last` now points at nothing
    with pytest.raises(CheckpointError, match=r"last points to a missing checkpoint \(step-0000004\); if the run was "
                                              r"copied without step-0000004, copy it too; otherwise the newest "
                                              r"complete checkpoint is step-0000002: remove the last link and "
                                              r"--train.resume auto continues from it"):
        resolve_resume("auto", tmp_path)
    (root / "last").unlink()
    assert resolve_resume("auto", tmp_path) == (root / "step-0000002").resolve()


def test_a_dangling_last_with_no_step_left_says_removing_it_starts_afresh(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    os.symlink("step-0000140", root / "last")
    with pytest.raises(CheckpointError, match="no complete checkpoint is left: remove the last link"):
        resolve_resume("auto", tmp_path)


def test_another_rank_count_continues_the_data_position_with_a_notice(tmp_path, tiny_shards):
    """Every rank saves the same data position; only the per-rank RNG states cannot carry over."""
    _, _, _, _, stream = saved_run(tmp_path, tiny_shards, steps=(3,), best_at=())
    expected_next = next(stream)
    expected_rng = draws()
    directory = resolve_resume("auto", tmp_path)
    meta = read_meta(directory)
    meta["world_size"] = 2  # as if saved by 2 ranks; rank-00000.pt holds the position they all shared
    (directory / "meta.json").write_text(json.dumps(meta))
    write_manifest(directory)

    random.seed(11), np.random.seed(11), torch.manual_seed(11)
    fabric, model, optimizer, scheduler, stream2 = training_objects(tiny_shards, seed=99)
    restored = Checkpointer(fabric, tmp_path, keep=1).load(directory, model, optimizer, scheduler, stream2)
    assert restored["notices"] == [f"{directory} was saved with 2 ranks, this run has 1: the data stream continues "
                                   "from the saved position (rounded down to a whole global batch) and RNG states are "
                                   "re-seeded"]
    assert draws() != expected_rng
    assert all(torch.equal(a, b) for a, b in zip(next(stream2), expected_next, strict=True))


def test_a_stream_over_other_windows_is_refused_as_a_checkpoint_error(tmp_path, tiny_shards):
    saved_run(tmp_path, tiny_shards, steps=(2,))
    fabric, model, optimizer, scheduler, _ = training_objects(tiny_shards)
    other_windows = BatchStream(PackedDataset(tiny_shards, "train", 32, 8), 4, 0, 1, seed=3)
    with pytest.raises(CheckpointError, match="rank-00000.pt.*dataset_len"):
        Checkpointer(fabric, tmp_path, keep=1).load(resolve_resume("auto", tmp_path), model, optimizer, scheduler,
                                                    other_windows)


def run_copied_with_links_followed(tmp_path, tiny_shards, best_at=()) -> tuple[Path, Path]:
    """A run (steps 2 and 4, `last` at 4) copied as `cp -rL` would: `last` (and `best`) a directory beside its step
    directory. Returns the copy and its checkpoints directory."""
    run = tmp_path / "run"
    saved_run(run, tiny_shards, steps=(2, 4), keep=2, best_at=best_at)
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, symlinks=False)
    return copy, checkpoints_dir(copy)


def test_a_run_copied_with_its_links_followed_gets_its_links_back_and_saves_on(tmp_path, tiny_shards):
    """cp -rL, rsync -L and scp -r turn `last` and `best` into directories, which a save could not repoint."""
    copy, root = run_copied_with_links_followed(tmp_path, tiny_shards, best_at=(2,))
    shutil.rmtree(root / "step-0000004")  # `last` copied alone: the copy is then the only step 4
    assert not (root / "last").is_symlink() and resolve_resume("auto", copy) == (root / "last").resolve()
    fabric, model, optimizer, scheduler, stream = training_objects(tiny_shards)
    checkpointer = Checkpointer(fabric, copy, keep=2)
    assert os.readlink(root / "last") == "step-0000004" and os.readlink(root / "best") == "step-0000002"
    assert sorted(path.name for path in root.iterdir()) == ["best", "last", "step-0000002", "step-0000004"]
    checkpointer.load(resolve_resume("auto", copy), model, optimizer, scheduler, stream)
    take_steps(model, optimizer, scheduler, stream, 2)
    checkpointer.save(6, model, optimizer, scheduler, stream, {"step": 6}, Config(model=debug_model_config()), "r")
    assert os.readlink(root / "last") == "step-0000006"


def test_relinking_keeps_the_complete_copy_when_an_interrupted_copy_cut_the_step_directory_short(
        tmp_path, tiny_shards):
    """rsync -rL copies best/ and last/ before step-*/: interrupted, the step directory is the partial one."""
    copy, root = run_copied_with_links_followed(tmp_path, tiny_shards)
    (root / "step-0000004" / "optimizer.pt").unlink()
    Checkpointer(training_objects(tiny_shards)[0], copy, keep=2)
    assert os.readlink(root / "last") == "step-0000004"
    verify_checkpoint(root / "step-0000004")  # the whole copy, hashes and all
    assert not list(root.glob(".stale-*"))


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only a hash tells
    path.write_bytes(bytes(data))


def test_relinking_never_deletes_the_copy_that_hashes_right(tmp_path, tiny_shards):
    copy, root = run_copied_with_links_followed(tmp_path, tiny_shards)
    flip_a_byte(root / "step-0000004" / "model.pt")  # the step directory damaged, the `last` copy whole
    Checkpointer(training_objects(tiny_shards)[0], copy, keep=2)
    assert os.readlink(root / "last") == "step-0000004"
    verify_checkpoint(root / "step-0000004")


def test_relinking_leaves_both_copies_when_neither_hashes_right_and_the_refusal_names_an_older_step(
        tmp_path, tiny_shards):
    copy, root = run_copied_with_links_followed(tmp_path, tiny_shards)
    flip_a_byte(root / "step-0000004" / "model.pt")
    flip_a_byte(root / "last" / "model.pt")
    fabric, model, optimizer, scheduler, stream = training_objects(tiny_shards)
    checkpointer = Checkpointer(fabric, copy, keep=2)
    assert (root / "last").is_dir() and not (root / "last").is_symlink() and (root / "step-0000004").is_dir()
    with pytest.raises(CheckpointError, match=re.escape(f"an older checkpoint is there: --train.resume "
                                                        f"{root / 'step-0000002'}")):
        checkpointer.load(resolve_resume("auto", copy), model, optimizer, scheduler, stream)


def test_a_copied_last_cut_short_resumes_from_its_whole_step_directory(tmp_path, tiny_shards):
    copy, root = run_copied_with_links_followed(tmp_path, tiny_shards)
    weights = root / "last" / "model.pt"
    weights.write_bytes(weights.read_bytes()[:100])  # an interrupted copy
    config = Config(model=debug_model_config(), train=TrainConfig(out_dir=str(copy), resume="auto"))
    assert resume_checkpoint(config)[0] == (root / "step-0000004").resolve()


def test_a_link_copied_without_its_checkpoint_is_named_as_such(tmp_path, tiny_shards):
    saved_run(tmp_path, tiny_shards, steps=(2,), best_at=(2,))
    root = checkpoints_dir(tmp_path)
    copy = tmp_path / "laptop"
    copy.mkdir()
    shutil.copy(root / "best", copy / "best", follow_symlinks=False)  # the link, not the checkpoint
    with pytest.raises(CheckpointError, match=re.escape(f"{copy / 'best'}: no such checkpoint or run directory: it "
                                                        "links to step-0000002, which is not there")):
        load_model_weights(copy / "best")
    with pytest.raises(CheckpointError, match="links to step-0000002, which is not there .*cp -L"):
        resolve_resume(str(copy / "best"), tmp_path / "elsewhere")


def save_with_rank_1_out_of_space(fabric, tiny_shards, out_dir):
    """Runs in each of two spawned ranks: rank 1's own file hits a full disk mid-save."""
    torch.manual_seed(0)
    model = Transformer(debug_model_config())
    optimizer = build_optimizer(model, TrainConfig(max_steps=10))
    model, optimizer = fabric.setup(model), fabric.setup_optimizers(optimizer)
    scheduler = build_scheduler(optimizer.optimizer, TrainConfig(max_steps=10))
    stream = BatchStream(PackedDataset(tiny_shards, "train", 32, 16), 4, fabric.global_rank, 2, seed=3)
    real_save = torch.save

    def save(obj, path, *args, **kwargs):
        if fabric.global_rank == 1 and Path(path).name.startswith("rank-"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, path, *args, **kwargs)

    torch.save = save
    try:
        Checkpointer(fabric, out_dir, keep=1).save(2, model, optimizer, scheduler, stream, {"step": 2},
                                                   Config(model=debug_model_config()), "run123")
        outcome = "saved"
    except CheckpointError as error:
        outcome = str(error)
    finally:
        torch.save = real_save
    # The loop's own exit order: without it gloo aborts a spawned rank at exit now and then ("terminate called
    # without an active exception", SIGABRT), which fails the launch however the save went.
    del model, optimizer, scheduler, stream
    teardown_ranks(fabric)
    return outcome


@pytest.mark.timeout(120)
def test_a_rank_that_cannot_write_makes_every_rank_refuse_the_save_instead_of_hanging(tmp_path, tiny_shards):
    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp_spawn")
    messages = fabric.launch(save_with_rank_1_out_of_space, tiny_shards, tmp_path)
    final = checkpoints_dir(tmp_path) / "step-0000002"
    assert re.fullmatch(re.escape(f"cannot write checkpoint {final}: No space left on device (") + r"[\d,.]+ MB free"
                        + re.escape(f") on rank 1; the checkpoints already in {checkpoints_dir(tmp_path)} are left as "
                                    "they were"), messages)
    assert not final.exists() and not list(checkpoints_dir(tmp_path).glob(".tmp-*"))


def test_a_branch_starts_once_then_continues_as_its_own_run(tmp_path, tiny_shards):
    """train.resume naming another run's checkpoint starts a branch in an empty out_dir; the same command again,
    once the branch has checkpoints, is refused (it would train the branch again over them); auto continues it."""
    train(tiny_run_config(tiny_shards, tmp_path / "long", max_steps=4, ckpt_interval=2, keep_checkpoints=9))
    step_2 = checkpoints_dir(tmp_path / "long") / "step-0000002"
    assert resolve_resume(str(step_2), tmp_path / "branch") == step_2.resolve()
    with pytest.raises(CheckpointError, match=r"is at step 2: a branch of it trains on to train.max_steps, which must "
                                              r"be above that \(it is 2\)"):
        resume_checkpoint(tiny_run_config(tiny_shards, tmp_path / "branch", max_steps=2, resume=str(step_2)))
    train(tiny_run_config(tiny_shards, tmp_path / "branch", max_steps=3, ckpt_interval=3, resume=str(step_2)))
    with pytest.raises(CheckpointError, match=rf"^{tmp_path / 'branch'} already holds a run \(checkpoints up to step 3 "
                                              rf".*\) and train.resume names a checkpoint of another run \({step_2}\): "
                                              r"--train.resume auto continues"):
        resolve_resume(str(step_2), tmp_path / "branch")
    assert resolve_resume("auto", tmp_path / "branch").name == "step-0000003"


def test_a_runs_own_checkpoint_however_named_is_no_branch(tmp_path, tiny_shards):
    train(tiny_run_config(tiny_shards, tmp_path / "run", max_steps=4, ckpt_interval=2, keep_checkpoints=9))
    (tmp_path / "link").symlink_to(tmp_path / "run")
    own = [checkpoints_dir(tmp_path / "run") / "last", checkpoints_dir(tmp_path / "run") / "step-0000002",
           resolve_resume(str(tmp_path / "run"), tmp_path / "run"), checkpoints_dir(tmp_path / "link") / "last"]
    for out_dir in (tmp_path / "run", tmp_path / "link", Path(os.path.relpath(tmp_path / "run"))):
        for checkpoint_dir in own:
            assert not branches_another_run(checkpoint_dir, out_dir), (checkpoint_dir, out_dir)
    assert branches_another_run(own[0], tmp_path / "elsewhere")
