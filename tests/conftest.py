"""Fixtures every test shares: where ../shared lives, and a debug-size model config."""

from __future__ import annotations

import collections
import itertools
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


# Rendezvous ports for the tests' multi-process runs: below Linux's ephemeral range (32768+), so no outgoing
# connection holds one, and above tml.slurm's job ports (10000-29999).
TEST_PORTS = range(30_000, 32_768)
_tests_started = itertools.count()


@pytest.hookimpl(tryfirst=True)  # before the test's fixtures, module-scoped ones too, start any run
def pytest_runtest_setup(item):
    """A MASTER_PORT of its own for every test, distinct across xdist workers. Lightning otherwise picks a free port,
    closes it and binds it again seconds later; with two workers another test's process took it in between
    (EADDRINUSE in a DDP test)."""
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    port = TEST_PORTS[(worker + workers * next(_tests_started)) % len(TEST_PORTS)]
    os.environ["MASTER_PORT"] = str(port)


def scheduling_scope(nodeid: str) -> str:
    """What one xdist worker runs whole: a test file, or all of tests/slurm (a machine has one test cluster: its
    ports and daemons). Whole files, so a file's module fixtures (the ZeRO runs, the SLURM reference run) are built
    once."""
    path = nodeid.split("::", 1)[0]
    return "tests/slurm" if path.startswith("tests/slurm/") else path


def pytest_collection_modifyitems(config, items):
    """The scopes with the most end-to-end (`slow`) tests first, so that with `-n N` the longest ones start at once
    instead of leaving one worker running them alone at the end; within a scope, the order is the files'."""
    scopes = {item.nodeid: scheduling_scope(item.nodeid) for item in items}
    slow, count = collections.Counter(), collections.Counter(scopes.values())
    for item in items:
        slow[scopes[item.nodeid]] += item.get_closest_marker("slow") is not None
    items.sort(key=lambda item: (-slow[scopes[item.nodeid]], -count[scopes[item.nodeid]]))


def pytest_xdist_make_scheduler(config, log):
    """`pytest -n N` (pytest-xdist) hands out `scheduling_scope`s in collection order. Any other --dist is xdist's."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ScopeScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return scheduling_scope(nodeid)

    config.option.loadscopereorder = False  # keep pytest_collection_modifyitems' order
    return ScopeScheduling(config, log)


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
