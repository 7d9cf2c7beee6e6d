"""Training windows read straight from memory-mapped token shards.

A split is one token stream: its shards concatenated in order. Window i is the block_size + 1 tokens starting at
i * stride (x is the first block_size, y the last block_size), so stride < block_size gives overlapping windows
like the reference project. Reads touch only the pages of the window asked for: the corpus never has to fit in
RAM, and a window that crosses a shard boundary is stitched from both files.
"""

from __future__ import annotations

import bisect
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from tml.data.shards import SHARD_DTYPE, ShardError, ShardIndex, shard_starts


class PackedDataset(Dataset):
    def __init__(self, shard_dir: str | Path, split: str, block_size: int, stride: int):
        if block_size < 1 or stride < 1:
            raise ValueError(f"block_size and stride must be >= 1, got block_size={block_size}, stride={stride}")
        index = ShardIndex.load(shard_dir, scan_tokens=False)
        if split not in index.splits:
            raise ValueError(f"no split {split!r} in {index.shard_dir} (splits: {', '.join(index.splits)})")
        index.check_token_range(split)  # only the tokens this dataset reads: train and val each scan their own
        shards = index.splits[split]
        self.split, self.block_size, self.stride = split, block_size, stride
        self.paths = [index.shard_dir / shard.file for shard in shards.shards]
        self.starts = shard_starts(shards)
        self.lengths = [shard.tokens for shard in shards.shards]
        self.total_tokens = shards.tokens
        self.window = block_size + 1
        if self.total_tokens < self.window:
            raise ShardError(too_short_message(split, index.shard_dir, self.total_tokens, block_size))
        self.num_windows = (self.total_tokens - self.window) // stride + 1
        self._tokens: list[np.ndarray] | None = None  # opened lazily, once per process

    def __len__(self) -> int:
        return self.num_windows

    def __getstate__(self) -> dict:
        # A pickled memmap would carry its whole file along; DataLoader workers reopen the shards instead.
        state = self.__dict__.copy()
        state["_tokens"] = None
        return state

    def _shard_tokens(self) -> list[np.ndarray]:
        if self._tokens is None:
            # Plain ndarray views of the maps: slicing a np.memmap subclass costs more per read.
            self._tokens = [np.memmap(path, dtype=SHARD_DTYPE, mode="r").view(np.ndarray) for path in self.paths]
        return self._tokens

    def window_tokens(self, i: int) -> np.ndarray:
        """The block_size + 1 tokens of window i as int64."""
        if i < 0:
            i += self.num_windows
        if not 0 <= i < self.num_windows:
            raise IndexError(f"window {i} out of range for {self.num_windows} windows in split {self.split!r}")
        start = i * self.stride
        shard = bisect.bisect_right(self.starts, start) - 1
        offset = start - self.starts[shard]
        tokens = self._shard_tokens()
        if offset + self.window <= self.lengths[shard]:
            return tokens[shard][offset : offset + self.window].astype(np.int64)
        pieces, needed = [], self.window
        while needed:
            piece = tokens[shard][offset : offset + needed]
            pieces.append(piece)
            needed -= len(piece)
            shard, offset = shard + 1, 0
        return np.concatenate(pieces).astype(np.int64)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        window = torch.from_numpy(self.window_tokens(i))
        return window[:-1], window[1:]


def too_short_message(split: str, shard_dir: Path, tokens: int, block_size: int) -> str:
    """One line naming the key, its value and both ways out. A ShardError: the CLI prints it without a traceback."""
    smaller = f"--model.block_size {tokens - 1} or less, or " if tokens >= 2 else ""
    more = "a larger data.val_frac or more books" if split == "val" else "more books or a smaller data.val_frac"
    return (f"model.block_size={block_size} needs block_size + 1 = {block_size + 1} tokens for one window, but split "
            f"{split!r} in {shard_dir} has {tokens:,}; use {smaller}{more}")
