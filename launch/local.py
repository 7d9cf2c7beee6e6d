"""Train on this machine: `python launch/local.py --config FILE [--section.key value ...]`.

Loads the config, prepares the token shards when they are missing, then runs the loop (tml.cli.train_main).
`--train.devices N` starts N local processes: Fabric re-runs this script once per extra rank, and those find
the data ready.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from tml.cli import train_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_main(sys.argv[1:]))
