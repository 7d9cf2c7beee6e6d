"""Ranks read disjoint shares, reshuffled per epoch, and a restored stream continues exactly."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from torch.utils.data import Dataset

from tml.data.sampler import BatchStream, RankShares

BLOCK = 4


class IndexDataset(Dataset):
    """Window i is (i, i, ...) so a batch shows which windows it holds."""

    def __init__(self, length: int):
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        return torch.full((BLOCK,), i, dtype=torch.int64), torch.full((BLOCK,), i + 1, dtype=torch.int64)


def shares(length: int, world_size: int, epoch: int, seed: int = 5) -> list[list[int]]:
    result = []
    for rank in range(world_size):
        result.append(RankShares(length, rank, world_size, seed).share(epoch).tolist())
    return result


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_rank_shares_are_disjoint_equal_and_cover_the_epoch(world_size):
    for epoch in (0, 1):
        per_rank = shares(24, world_size, epoch)
        assert {len(share) for share in per_rank} == {24 // world_size}
        flat = [i for share in per_rank for i in share]
        assert sorted(flat) == list(range(24))


def test_uneven_length_drops_a_different_remainder_each_epoch():
    dropped = []
    for epoch in range(4):
        per_rank = shares(23, 4, epoch)
        flat = [i for share in per_rank for i in share]
        assert len(flat) == len(set(flat)) == 20 and {len(share) for share in per_rank} == {5}
        dropped.append(frozenset(range(23)) - set(flat))
    assert len(set(dropped)) > 1


def test_reshuffled_per_epoch_and_reproducible_from_the_seed():
    assert shares(50, 2, epoch=0) == shares(50, 2, epoch=0)
    assert shares(50, 2, epoch=0) != shares(50, 2, epoch=1)
    assert shares(50, 2, epoch=0, seed=1) != shares(50, 2, epoch=0, seed=2)
    ordered = RankShares(10, rank=1, world_size=2, seed=0, shuffle=False)
    assert ordered.share(epoch=3).tolist() == [1, 3, 5, 7, 9]


def windows(batch) -> list[int]:
    x, y = batch
    assert torch.equal(y, x + 1)
    return x[:, 0].tolist()


def stream(length=37, batch_size=4, rank=0, world_size=2, seed=3, num_workers=0) -> BatchStream:
    return BatchStream(IndexDataset(length), batch_size, rank, world_size, seed, num_workers=num_workers)


def test_stream_rolls_over_epochs_with_whole_batches():
    batches = stream()  # 18 windows per rank -> 4 batches an epoch, 2 windows dropped
    assert batches.batches_per_epoch == 4
    x, y = next(batches)
    assert x.shape == y.shape == (4, BLOCK) and x.dtype == torch.int64
    epoch0 = windows((x, y)) + [i for batch in itertools.islice(batches, 3) for i in windows(batch)]
    shares = RankShares(37, 0, 2, 3)
    assert epoch0 == shares.share(epoch=0).tolist()[:16]
    assert batches.state_dict()["epoch"] == 1 and batches.state_dict()["batches"] == 0
    assert windows(next(batches)) == shares.share(epoch=1).tolist()[:4]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_restored_stream_continues_exactly(num_workers):
    consumed, following = 6, 7  # crosses the end of epoch 1 and of epoch 2 (4 batches an epoch)
    uninterrupted = stream(num_workers=num_workers)
    expected = [windows(batch) for batch in itertools.islice(uninterrupted, consumed + following)]

    first = stream(num_workers=num_workers)
    seen = [windows(batch) for batch in itertools.islice(first, consumed)]
    state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON checkpoint
    assert state["epoch"] == 1 and state["batches"] == 2  # workers' prefetched batches are not counted
    first.close()

    resumed = stream(num_workers=num_workers)
    resumed.load_state_dict(state)
    rest = [windows(batch) for batch in itertools.islice(resumed, following)]
    assert seen + rest == expected
    resumed.close()
    uninterrupted.close()


def test_every_rank_resumes_at_the_same_point():
    for rank in range(2):
        original = stream(rank=rank)
        expected = [windows(batch) for batch in itertools.islice(original, 9)]
        cut = stream(rank=rank)
        list(itertools.islice(cut, 5))
        resumed = stream(rank=rank)
        resumed.load_state_dict(cut.state_dict())
        assert [windows(batch) for batch in itertools.islice(resumed, 4)] == expected[5:]


def test_resume_on_another_world_size_continues_the_same_permutation():
    old_ranks = [stream(length=40, batch_size=2, rank=rank, world_size=2) for rank in range(2)]
    for old in old_ranks:
        list(itertools.islice(old, 4))  # 4 batches x 2 windows x 2 ranks = the epoch's first 16 windows
    next_old = sorted(i for old in old_ranks for i in windows(next(old)) + windows(next(old)))
    single = stream(length=40, batch_size=8, rank=0, world_size=1)
    single.load_state_dict(stream(length=40, batch_size=2, rank=0, world_size=2).state_dict() | {"batches": 4})
    assert sorted(windows(next(single))) == next_old


def test_state_from_another_dataset_is_refused():
    state = stream(length=37).state_dict()
    with pytest.raises(ValueError, match="dataset_len=37"):
        stream(length=38).load_state_dict(state)


def test_batch_larger_than_a_rank_share_is_refused():
    with pytest.raises(ValueError, match="batch_size 16 does not fit this rank's 9 windows"):
        BatchStream(IndexDataset(19), batch_size=16, rank=0, world_size=2, seed=0)
