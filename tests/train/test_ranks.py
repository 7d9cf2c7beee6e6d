"""One process per machine prints the notices meant for a person, under every launcher tml runs under."""

import pytest

from tml.train.ranks import is_first_local_process


@pytest.mark.parametrize(("environ", "first"), [
    ({}, True),  # a plain single-process run
    ({"LOCAL_RANK": "0"}, True), ({"LOCAL_RANK": "2"}, False),  # Fabric's local ranks, torchrun
    ({"SLURM_LOCALID": "0"}, True), ({"SLURM_LOCALID": "1"}, False),  # srun tasks of one node
    ({"LOCAL_RANK": "0", "SLURM_LOCALID": "3"}, True),  # Fabric under SLURM: Fabric's own numbering counts
])
def test_the_first_local_process_is_local_rank_0_by_any_launcher(environ, first):
    assert is_first_local_process(environ) is first
