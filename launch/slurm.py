"""Train on a SLURM cluster: `python launch/slurm.py --config FILE --nodes N [SLURM options] [--section.key value]`,
the same command as `tml slurm` (tml/slurm_submit.py), runnable from a checkout without installing: it prepares the
token shards here, then submits one Submitit job per run (`--sweep KEY=V1,V2`: one per combination); `--dry-run`
prints the sbatch script, `--wait` blocks until the job ends. See docs/slurm.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from tml.slurm_submit import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="launch/slurm.py"))
