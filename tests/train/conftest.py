"""Tiny synthetic token shards and run configs shared by the training tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import debug_model_config
from tml.config import Config
from tml.data.config import DataConfig
from tml.data.prepare import data_settings
from tml.data.shards import write_shards
from tml.train.config import LogConfig, TrainConfig
from tml.train.muon import muon_unavailable

VOCAB = 256  # the debug model's vocabulary
DOC_TOKENS = 3000
# torch.optim.Muon came with torch 2.9; the suite also runs on torch 2.5 (README), where train.optimizer muon is refused.
requires_muon = pytest.mark.skipif(muon_unavailable() is not None, reason=f"train.optimizer muon {muon_unavailable()}")


def synthetic_documents(n_train: int = 8, n_val: int = 2, seed: int = 0):
    """Documents with learnable structure (noisy arithmetic sequences), so a few steps visibly lower the loss."""
    rng = np.random.default_rng(seed)
    for doc in range(n_train + n_val):
        step = int(rng.integers(1, 7))
        tokens = (np.arange(DOC_TOKENS) * step + doc) % 64
        noise = rng.random(DOC_TOKENS) < 0.05
        tokens[noise] = rng.integers(64, VOCAB, noise.sum())
        yield ("train" if doc < n_train else "val"), doc, f"doc {doc}", tokens.tolist()


def synthetic_data_config(shard_dir: Path) -> DataConfig:
    return DataConfig(source=str(shard_dir), shard_dir=str(shard_dir), stride=16)


def write_synthetic_shards(shard_dir: Path) -> Path:
    """Shards whose recorded settings match `synthetic_data_config`, so launchers find the data ready."""
    write_shards(shard_dir, synthetic_documents(), tokenizer="synthetic", vocab_size=VOCAB, shard_tokens=10_000,
                 fingerprint="synthetic-test", settings=data_settings(synthetic_data_config(shard_dir)))
    return shard_dir


def tiny_run_config(shard_dir: Path, out_dir: Path, **train) -> Config:
    """A debug-model run on the synthetic shards: CPU, 32-true, a handful of steps."""
    values = dict(max_steps=12, batch_size=4, grad_accum=1, lr=3e-3, min_lr=3e-4, warmup_frac=0.1,
                  val_interval=6, val_batches=2, ckpt_interval=6, log_interval=1, precision="32-true",
                  accelerator="cpu", devices=1, out_dir=str(out_dir), seed=7)
    values.update(train)
    return Config(
        model=debug_model_config(),
        data=synthetic_data_config(shard_dir),
        train=TrainConfig(**values),
        log=LogConfig(tensorboard=True, wandb=False),
    )
