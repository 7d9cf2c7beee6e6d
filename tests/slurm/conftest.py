"""A real two-node SLURM cluster for the session (slurm/dev-cluster.sh), and the small run its jobs train.

The cluster is started once, in its own state directory and on its own ports (so a developer's dev cluster can
keep running), and stopped in a `finally`, so a failing test never leaves daemons behind. Tests skip only when
SLURM is not installed and this machine cannot install it (not root, or no apt-get), and say so.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, debug_model_config

DEV_CLUSTER = REPO_ROOT / "slurm" / "dev-cluster.sh"
LAUNCHER = REPO_ROOT / "launch" / "slurm.py"
SLURM_COMMANDS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue")
TEST_CLUSTER_PORT = "26817"  # not the script's default 16817, which a developer's own cluster may hold
INSTALL_TIMEOUT_S = 600
CLUSTER_TIMEOUT_S = 180

# The run every SLURM end-to-end test trains: configs/tiny.yaml shrunk to the debug model on synthetic tokens,
# with a checkpoint every few steps so a test can requeue it between two of them.
RUN_STEPS = 40
RUN_CKPT_INTERVAL = 5
VOCAB = 256  # the debug model's vocabulary
SYNTHETIC_DOCUMENTS = 10  # the last one is the validation split
DOCUMENT_TOKENS = 3000
SHARD_TOKENS = 10_000


def missing_slurm_commands() -> list[str]:
    return [name for name in SLURM_COMMANDS if shutil.which(name) is None]


def install_slurm_or_skip() -> None:
    missing = missing_slurm_commands()
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} missing) and this machine cannot install it "
                    "(needs root and apt-get); run `bash slurm/dev-cluster.sh install` where it can")
    result = subprocess.run(["bash", str(DEV_CLUSTER), "install"], capture_output=True, text=True,
                            timeout=INSTALL_TIMEOUT_S)
    if result.returncode != 0 or missing_slurm_commands():
        pytest.skip(f"SLURM's packages could not be installed on this machine: {result.stderr.strip()[-800:]}")


@pytest.fixture(scope="session")
def slurm_cluster() -> Path:
    """Starts the two-node cluster; points SLURM_CONF and PATH (for the sacct stand-in) at it. Yields its dir."""
    install_slurm_or_skip()
    # Not under pytest's private (0700) tmp dir: munged wants every directory above its socket searchable by all.
    state_dir = Path(tempfile.mkdtemp(prefix="tml-slurm-test-"))
    state_dir.chmod(0o755)
    env = {**os.environ, "TML_SLURM_DIR": str(state_dir), "TML_SLURM_PORT": TEST_CLUSTER_PORT}
    with pytest.MonkeyPatch.context() as patch:
        try:
            up = subprocess.run(["bash", str(DEV_CLUSTER), "up"], env=env, capture_output=True, text=True,
                                timeout=CLUSTER_TIMEOUT_S)
            if up.returncode != 0:
                pytest.fail(f"slurm/dev-cluster.sh up failed:\n{up.stdout}\n{up.stderr}")
            patch.setenv("SLURM_CONF", str(state_dir / "etc" / "slurm.conf"))
            patch.setenv("PATH", f"{state_dir / 'bin'}{os.pathsep}{os.environ['PATH']}")
            yield state_dir
        finally:
            subprocess.run(["bash", str(DEV_CLUSTER), "down"], env=env, capture_output=True, timeout=CLUSTER_TIMEOUT_S)
            shutil.rmtree(state_dir, ignore_errors=True)


def synthetic_documents(seed: int = 0):
    """(split, id, title, tokens): noisy arithmetic sequences below the debug vocabulary, so the loss falls."""
    rng = random.Random(seed)
    for doc in range(SYNTHETIC_DOCUMENTS):
        stride, offset = rng.randint(1, 6), rng.randint(0, 63)
        tokens = [rng.randrange(64, VOCAB) if rng.random() < 0.05 else (offset + i * stride) % 64
                  for i in range(DOCUMENT_TOKENS)]
        yield ("val" if doc == SYNTHETIC_DOCUMENTS - 1 else "train"), doc, f"synthetic {doc}", tokens


def model_overrides() -> list[str]:
    """The debug model every fast test uses, as --model.* overrides."""
    model = debug_model_config()
    keys = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "q_lora_rank", "kv_lora_rank",
            "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
    return [arg for key in keys for arg in (f"--model.{key}", str(getattr(model, key)))]


@pytest.fixture(scope="session")
def slurm_run_args(tmp_path_factory) -> list[str]:
    """`--config configs/tiny.yaml` plus overrides for a short debug run on shards prepared here, beforehand.

    The shards are synthetic (the debug model's 256-token vocabulary keeps every step and checkpoint tiny), and
    their index records the settings of this very config, so the launcher finds the data ready, as it would
    after `tml-prepare` on a real login node.
    """
    from tml.config import load_config
    from tml.data.prepare import data_settings
    from tml.data.shards import write_shards

    shard_dir = tmp_path_factory.mktemp("slurm-shards")
    args = [
        "--config", str(REPO_ROOT / "configs" / "tiny.yaml"),
        "--data.source", str(shard_dir), "--data.shard_dir", str(shard_dir), "--data.stride", "16",
        *model_overrides(),
        "--train.max_steps", str(RUN_STEPS), "--train.batch_size", "4", "--train.grad_accum", "1",
        "--train.val_interval", str(RUN_STEPS), "--train.val_batches", "2",
        "--train.ckpt_interval", str(RUN_CKPT_INTERVAL), "--train.log_interval", "1",
        "--train.precision", "32-true", "--train.resume", "none",
    ]
    write_shards(shard_dir, synthetic_documents(), tokenizer="synthetic", vocab_size=VOCAB,
                 shard_tokens=SHARD_TOKENS, fingerprint="tests/slurm", settings=data_settings(load_config(args).data))
    return args
