"""Fixtures every test shares: where ../shared lives, and a debug-size model config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tml.model.config import ModelConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
# CI and developers have shared/ beside the checkout; TML_SHARED overrides.
SHARED_DIR = Path(os.environ.get("TML_SHARED", REPO_ROOT.parent / "shared"))
GUTENBERG_DIR = SHARED_DIR / "data" / "gutenberg"


def pytest_configure(config):
    # One intra-op thread: on a busy 2-core CI machine, OpenMP threads waiting on each other slowed tests up to 20x.
    torch.set_num_threads(int(os.environ.get("TML_TEST_THREADS", "1")))


@pytest.fixture
def shared_gutenberg() -> Path:
    """The 135 real Gutenberg books; skips the test where ../shared is absent."""
    if not (GUTENBERG_DIR / "MANIFEST.tsv").is_file():
        pytest.skip(f"shared Gutenberg books not found at {GUTENBERG_DIR}")
    return GUTENBERG_DIR


def debug_model_config(**overrides) -> ModelConfig:
    """The debug-size model every fast test uses."""
    values = dict(
        vocab_size=256, block_size=32, n_layer=2, n_head=4, n_embd=64, attention="mla",
        q_lora_rank=0, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    )
    values.update(overrides)
    return ModelConfig(**values)


@pytest.fixture
def debug_config() -> ModelConfig:
    return debug_model_config()


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """Synthetic shards with learnable structure (tests/train/conftest.py), shared by every test of a session."""
    from tests.train.conftest import write_synthetic_shards

    return write_synthetic_shards(tmp_path_factory.mktemp("shards"))
