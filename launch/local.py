"""Train on this machine: `python launch/local.py [--config FILE] [--section.key value ...]`.

Loads the config, prepares the token shards when they are missing, then runs the loop (tml.cli.train_main, which
also takes `--sweep KEY=V1,V2`: one run per value, and `--dry-run`: what the start would do).
Without `--config` it runs the reference setup (configs/reference.yaml), the run this toolkit exists to reproduce.
`--train.devices N` starts N local processes: Fabric re-runs this script once per extra rank, and those find
the data ready.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # runnable from a checkout without installing

from tml.cli import train_main  # noqa: E402
from tml.train.ranks import is_first_local_process  # noqa: E402

DEFAULT_CONFIG = REPO_ROOT / "configs" / "reference.yaml"
HELP_FLAGS = ("-h", "--help")


def with_default_config(argv: list[str]) -> list[str]:
    """Prepend `--config configs/reference.yaml` when no config file is named (and help was not asked for)."""
    if any(arg == "--config" or arg.startswith("--config=") or arg in HELP_FLAGS for arg in argv):
        return argv
    if is_first_local_process():  # Fabric re-runs this script, with these arguments, for each extra rank
        print(f"tml: no --config given: using {DEFAULT_CONFIG.relative_to(REPO_ROOT)} (the reference setup)",
              file=sys.stderr)
    return ["--config", str(DEFAULT_CONFIG), *argv]


if __name__ == "__main__":
    sys.exit(train_main(with_default_config(sys.argv[1:])))
