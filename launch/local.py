"""Train on this machine: `python launch/local.py [--config FILE] [--section.key value ...]`, the same command as
`tml train` (tml/cli.py's train_main), runnable from a checkout without installing.

Loads the config (the reference setup, configs/reference.yaml, without `--config`), prepares the token shards when
they are missing, then trains; `--sweep KEY=V1,V2` trains one run per value and `--dry-run` says what the start
would do. `--train.devices N` starts N local processes: Fabric re-runs this script once per extra rank, and those
find the data ready.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from tml.cli import train_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_main(sys.argv[1:]))
