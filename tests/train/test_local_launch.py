"""launch/local.py end to end: prepares real Gutenberg shards when missing, trains, and refuses bad keys."""

import json
import subprocess
import sys

import pytest

from tests.conftest import GUTENBERG_DIR, REPO_ROOT, debug_model_config
from tests.train.test_loop import launch
from tml.config import Config
from tml.data.config import DataConfig
from tml.model.config import GPT2_PADDED_VOCAB
from tml.train.checkpoint import checkpoints_dir, read_meta
from tml.train.config import LogConfig, TrainConfig


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.timeout(300)
def test_launch_prepares_missing_data_trains_then_resumes_without_rebuilding(tmp_path, shared_gutenberg):
    config = Config(
        model=debug_model_config(vocab_size=GPT2_PADDED_VOCAB),
        data=DataConfig(source=str(GUTENBERG_DIR), max_books=3, raw_dir=str(tmp_path / "raw"),
                        shard_dir=str(tmp_path / "shards"), stride=32),
        train=TrainConfig(max_steps=3, batch_size=2, val_interval=3, val_batches=1, ckpt_interval=3,
                          precision="32-true", accelerator="cpu", out_dir=str(tmp_path / "run"), resume="auto"),
        log=LogConfig(tensorboard=False),
    )
    first = launch(config)
    assert first.returncode == 0, first.stderr[-3000:]
    index = tmp_path / "shards" / "index.json"
    assert json.loads(index.read_text())["splits"]["train"]
    built_at = index.stat().st_mtime_ns
    assert read_meta(checkpoints_dir(tmp_path / "run") / "last")["step"] == 3

    config.train.max_steps = 5
    second = launch(config)
    assert second.returncode == 0, second.stderr[-3000:]
    assert index.stat().st_mtime_ns == built_at  # data was ready: not rebuilt
    assert "resumed from" in second.stdout + second.stderr
    assert read_meta(checkpoints_dir(tmp_path / "run") / "last")["step"] == 5


def test_unknown_key_is_rejected_by_name_before_anything_runs():
    done = subprocess.run([sys.executable, str(REPO_ROOT / "launch" / "local.py"), "--train.bogus_key", "3"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "train.bogus_key" in done.stderr
    assert "no --config given: using tml's configs/reference.yaml" in done.stderr

