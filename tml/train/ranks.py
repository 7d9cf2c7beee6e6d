"""Which process of a multi-process launch this is, read from the variables the launchers set.

Fabric re-runs the entry point for each extra local rank with LOCAL_RANK >= 1; under srun (slurm/train.sbatch)
LOCAL_RANK is unset and SLURM_LOCALID numbers the tasks of a node. Notices meant for a person (the CPU fallback,
Ctrl-C, a run's final line) are printed by one process per machine, so they appear once, not once per rank.
"""

from __future__ import annotations

import os
from collections.abc import Mapping


def is_first_local_process(environ: Mapping[str, str] = os.environ) -> bool:
    """Local rank 0 of this machine (also true for a plain single-process run)."""
    return environ.get("LOCAL_RANK", environ.get("SLURM_LOCALID", "0")) == "0"
