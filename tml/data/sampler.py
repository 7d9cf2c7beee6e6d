"""Which windows each rank reads, in what order, and how to pick up exactly where a run stopped.

Every epoch, all ranks compute the same permutation of the dataset from (seed, epoch). Rank r takes positions
r, r + W, r + 2W, ... of it (W = world size), after dropping the last len % W positions so every rank has the
same number of windows: DDP ranks must step together, and dropping (rather than padding with repeats) keeps the
shares disjoint. The dropped windows differ from epoch to epoch because the permutation does.

Interleaving makes "k batches consumed on every rank" the same as "the first k * batch_size * W positions of the
epoch's permutation consumed", so a saved position is meaningful even when a run resumes with another world
size or batch size (exact when the new global batch divides the consumed count, else rounded down).
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset


def epoch_permutation(length: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    if not shuffle:
        return torch.arange(length)
    generator = torch.Generator().manual_seed(seed + epoch)  # from (seed, epoch) alone: identical on every rank
    return torch.randperm(length, generator=generator)


class RankShares:
    """Each epoch's permutation of the dataset, and this rank's disjoint, equal share of it."""

    def __init__(self, dataset: Sized | int, rank: int, world_size: int, seed: int, shuffle: bool = True):
        length = dataset if isinstance(dataset, int) else len(dataset)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of size {world_size}")
        if length < world_size:
            raise ValueError(f"{length} windows cannot give each of {world_size} ranks one")
        self.length, self.rank, self.world_size = length, rank, world_size
        self.seed, self.shuffle = seed, shuffle

    def __len__(self) -> int:
        return self.length // self.world_size

    def share(self, epoch: int) -> torch.Tensor:
        """This rank's window indices for `epoch`, in the order it reads them."""
        used = len(self) * self.world_size
        return epoch_permutation(self.length, self.seed, epoch, self.shuffle)[:used][self.rank :: self.world_size]


class _BatchesFrom:
    """Index batches from (epoch, batch) onwards, forever: the batch_sampler behind BatchStream's DataLoader."""

    def __init__(self, sampler: RankShares, batch_size: int, epoch: int, batch: int):
        self.sampler, self.batch_size, self.epoch, self.batch = sampler, batch_size, epoch, batch

    def __iter__(self) -> Iterator[list[int]]:
        epoch, batch = self.epoch, self.batch
        batches_per_epoch = len(self.sampler) // self.batch_size
        while True:
            share = self.sampler.share(epoch)
            for b in range(batch, batches_per_epoch):
                yield share[b * self.batch_size : (b + 1) * self.batch_size].tolist()
            epoch, batch = epoch + 1, 0


class BatchStream:
    """Endless (x [B, T], y [B, T]) batches for one rank, rolling over epochs, resumable exactly.

    The position saved is what the caller has received, not what DataLoader workers have prefetched, so a
    stream rebuilt from `state_dict()` yields exactly the batches the original would have yielded next. The
    state holds no rank, and every rank's is the same, so saving rank 0's is enough. Each epoch's last partial
    batch is dropped (at most batch_size - 1 windows, different ones every epoch).
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        shuffle: bool = True,
        num_workers: int = 0,
        pin_memory: bool = False,
    ):
        self.sampler = RankShares(dataset, rank, world_size, seed, shuffle)
        if batch_size < 1 or len(self.sampler) < batch_size:
            raise ValueError(
                f"batch_size {batch_size} does not fit this rank's {len(self.sampler)} windows per epoch "
                f"({len(dataset)} windows over {world_size} ranks); use a smaller batch or more data"
            )
        self.dataset, self.batch_size = dataset, batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.batches_per_epoch = len(self.sampler) // batch_size
        self.epoch = 0
        self.batch = 0  # batches of the current epoch handed to the caller
        self._iterator: Iterator | None = None

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._iterator is None:
            loader = DataLoader(
                self.dataset,
                batch_sampler=_BatchesFrom(self.sampler, self.batch_size, self.epoch, self.batch),
                num_workers=self.num_workers,
                pin_memory=self.pin_memory,
                # Its workers' base seed comes from here, not from torch's global generator: a resumed run builds
                # its first iterator after the checkpoint restored that generator, which dropout must find as the
                # uninterrupted run left it (exact resume).
                generator=torch.Generator().manual_seed(self.sampler.seed),
            )
            self._iterator = iter(loader)
        x, y = next(self._iterator)
        self.batch += 1
        if self.batch == self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        return x, y

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batches": self.batch,
            "batch_size": self.batch_size,
            "seed": self.sampler.seed,
            "world_size": self.sampler.world_size,
            "dataset_len": self.sampler.length,
            "shuffle": self.sampler.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; same seed and dataset required, world size and batch size may differ."""
        for key, mine in (("seed", self.sampler.seed), ("dataset_len", self.sampler.length),
                          ("shuffle", self.sampler.shuffle)):
            if state[key] != mine:
                raise ValueError(f"stream state has {key}={state[key]!r} but this stream has {key}={mine!r}: "
                                 "it would not continue the same sequence")
        consumed = state["batches"] * state["batch_size"] * state["world_size"]  # a prefix of the permutation
        self.epoch, self.batch = state["epoch"], consumed // (self.batch_size * self.sampler.world_size)
        if self.batch >= self.batches_per_epoch:  # a larger world finishes the epoch sooner
            self.epoch, self.batch = self.epoch + 1, 0
        self.close()

    def close(self) -> None:
        """Stop the DataLoader workers; the next batch starts a new loader at the current position."""
        self._iterator = None
