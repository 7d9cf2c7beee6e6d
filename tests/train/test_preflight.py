"""What a run's start would do or refuse, said before anything is spent on it (`--dry-run`)."""

import pytest
import torch

from tests.train.conftest import tiny_run_config
from tml.cli import main
from tml.config import ConfigError, dump_yaml
from tml.data.gutenberg import GutenbergError
from tml.data.prepare import PrepareError
from tml.train.checkpoint import CheckpointError
from tml.train.loop import train
from tml.train.preflight import describe_start
from tml.train.run_lock import RunLockError, hold_run_lock


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_shards):
    out_dir = tmp_path_factory.mktemp("preflight") / "run"
    config = tiny_run_config(tiny_shards, out_dir, max_steps=2, val_interval=2, ckpt_interval=2)
    train(config)
    return config


def test_a_new_run_starts_fresh_or_from_its_init_from_weights_and_says_whether_its_shards_are_ready(
        finished_run, tiny_shards, tmp_path):
    fresh = tiny_run_config(tiny_shards, tmp_path / "new", max_steps=5)
    assert describe_start(fresh) == f"starts fresh, 5 steps; its shards are ready ({tiny_shards})"
    fresh.train.init_from = finished_run.train.out_dir
    assert describe_start(fresh).startswith(f"starts from the weights of {finished_run.train.out_dir}, 5 steps")
    fresh.data.shard_dir = str(tmp_path / "no-shards")
    with pytest.raises(GutenbergError, match="holds no .txt or .jsonl files"):  # shards to build, from a source without text
        describe_start(fresh)
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("Some text.\n")
    fresh.data.source = str(tmp_path / "corpus")
    assert describe_start(fresh).endswith(f"prepares its shards first ({tmp_path / 'no-shards'})")
    assert not (tmp_path / "new").exists() and not (tmp_path / "no-shards").exists()  # nothing written


def test_a_saved_run_resumes_at_its_step_with_the_changes_named_or_has_nothing_left_to_train(finished_run):
    longer = tiny_run_config(finished_run.data.shard_dir, finished_run.train.out_dir, max_steps=6, resume="auto",
                             val_interval=2, ckpt_interval=2, lr=1e-3)
    assert describe_start(longer).startswith(f"resumes {finished_run.train.out_dir}/checkpoints/step-")
    assert "at step 2 of 6 (changed since: train.max_steps 2 -> 6; train.lr 0.003 -> 0.001)" in describe_start(longer)
    longer.train.max_steps = 2
    assert describe_start(longer).startswith("already at step 2 of train.max_steps 2: validates once, trains nothing")
    longer.train.init_from = finished_run.train.out_dir  # as the loop says it: a resumed run keeps its own weights
    assert f"; train.init_from={finished_run.train.out_dir} ignored: the run resumes its own weights" in (
        describe_start(longer))


def test_a_start_that_would_be_refused_raises_what_the_start_would_raise_first(finished_run, tmp_path):
    again = tiny_run_config(finished_run.data.shard_dir, finished_run.train.out_dir, resume="none")
    with pytest.raises(CheckpointError, match="train.resume is 'none'"):
        describe_start(again)
    with hold_run_lock(finished_run.train.out_dir), pytest.raises(RunLockError, match="in use by another training"):
        describe_start(again)
    fresh = tiny_run_config(finished_run.data.shard_dir, tmp_path / "new")
    fresh.model.vocab_size = 8  # the synthetic shards hold larger token ids
    with pytest.raises(ConfigError, match="model.vocab_size=8 is smaller than the vocabulary of the shards"):
        describe_start(fresh)
    fresh = tiny_run_config(tmp_path / "no-shards", tmp_path / "new")
    fresh.data.source = str(tmp_path / "no-corpus")
    with pytest.raises(GutenbergError, match="no-corpus' is neither 'gutenberg' nor an existing directory"):
        describe_start(fresh)
    (tmp_path / "no-corpus").mkdir()  # there, but holding no text
    with pytest.raises(GutenbergError, match="no-corpus' holds no .txt or .jsonl files"):
        describe_start(fresh)
    fresh = tiny_run_config(finished_run.data.shard_dir, tmp_path / "new", accelerator="cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="train.accelerator=cuda but no CUDA device"):
            describe_start(fresh)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(RunLockError, match=f"cannot make {tmp_path / 'afile' / 'run'}: .*afile is a file"):
        describe_start(tiny_run_config(finished_run.data.shard_dir, tmp_path / "afile" / "run"))
    fresh = tiny_run_config(tmp_path / "afile", tmp_path / "new")
    with pytest.raises(PrepareError, match=f"cannot make {tmp_path / 'afile'}: .*afile is a file"):
        describe_start(fresh)
    assert not (tmp_path / "new").exists() and not (tmp_path / "no-shards").exists()


def test_tml_train_dry_run_prints_the_line_and_trains_nothing(finished_run, tiny_shards, tmp_path, capsys):
    config = tiny_run_config(tiny_shards, tmp_path / "run", max_steps=3)
    (tmp_path / "run.yaml").write_text(dump_yaml(config))
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"tml: {tmp_path / 'run'}: starts fresh, 3 steps; its shards are ready ({tiny_shards})\n"
    assert captured.err == "tml: nothing trained (--dry-run)\n" and not (tmp_path / "run").exists()
    refused = ["train", "--config", str(tmp_path / "run.yaml"), "--train.out_dir", finished_run.train.out_dir,
               "--train.resume", "none", "--dry-run"]
    assert main(refused) == 1 and "train.resume is 'none'" in capsys.readouterr().err
    with hold_run_lock(finished_run.train.out_dir):  # as `tml train`: 1 for a run another training holds
        assert main([*refused[:-3], "--dry-run"]) == 1 and "in use by another training" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "--model.vocab_size", "8", "--dry-run"]) == 2
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "--train.lr", "x", "--dry-run"]) == 2
