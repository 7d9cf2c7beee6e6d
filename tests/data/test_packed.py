"""Windows are exact slices of the split's token stream, across shard boundaries and for any stride."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from tml.data.packed import PackedDataset
from tml.data.shards import ShardError, write_shards

VOCAB = 50257


def write_stream(shard_dir, train_tokens: np.ndarray, shard_tokens: int, val_tokens=(1, 2, 3)) -> None:
    """Train = the given tokens cut into a few documents; val = a small fixed document."""
    cuts = np.array_split(train_tokens, 3)
    documents = [("train", i, f"doc {i}", cut.tolist()) for i, cut in enumerate(cuts)]
    documents.append(("val", 99, "val doc", list(val_tokens)))
    write_shards(shard_dir, documents, tokenizer="test", vocab_size=VOCAB, shard_tokens=shard_tokens,
                 fingerprint="0" * 64, settings={})


@pytest.fixture
def stream(tmp_path):
    tokens = np.arange(103) * 7 % VOCAB  # every position distinct, so any misplaced token shows
    write_stream(tmp_path, tokens, shard_tokens=10)  # 11 shards: most windows cross a boundary
    return tmp_path, tokens


@pytest.mark.parametrize("block_size,stride", [(8, 8), (8, 3), (8, 1), (5, 11), (102, 1)])
def test_windows_are_exact_slices_of_the_stream(stream, block_size, stride):
    shard_dir, tokens = stream
    dataset = PackedDataset(shard_dir, "train", block_size=block_size, stride=stride)
    assert len(dataset) == (len(tokens) - block_size - 1) // stride + 1
    for i in range(len(dataset)):
        x, y = dataset[i]
        start = i * stride
        assert x.dtype == torch.int64 and y.dtype == torch.int64
        assert x.tolist() == tokens[start : start + block_size].tolist()
        assert y.tolist() == tokens[start + 1 : start + block_size + 1].tolist()
    last_start = (len(dataset) - 1) * stride
    assert last_start + block_size + 1 <= len(tokens) < last_start + stride + block_size + 1


def test_window_spanning_three_shards_is_stitched(stream):
    shard_dir, tokens = stream
    dataset = PackedDataset(shard_dir, "train", block_size=24, stride=5)
    x, y = dataset[1]  # tokens 5..29: shards 0, 1 and 2
    assert x.tolist() == tokens[5:29].tolist() and y.tolist() == tokens[6:30].tolist()


def test_index_errors_and_negative_indexes(stream):
    shard_dir, tokens = stream
    dataset = PackedDataset(shard_dir, "train", block_size=8, stride=4)
    assert dataset[-1][1].tolist() == dataset[len(dataset) - 1][1].tolist()
    with pytest.raises(IndexError, match="window"):
        dataset[len(dataset)]


def test_split_shorter_than_one_window_is_refused_with_sizes(stream):
    shard_dir, _ = stream
    with pytest.raises(ShardError, match=r"^model.block_size=8 needs block_size \+ 1 = 9 tokens for one window, "
                                         r"but split 'val' in .* has 3; use --model.block_size 2 or less, or a "
                                         r"larger data.val_frac or more books$"):
        PackedDataset(shard_dir, "val", block_size=8, stride=8)
    with pytest.raises(ValueError, match="no split 'test'"):
        PackedDataset(shard_dir, "test", block_size=2, stride=1)
    with pytest.raises(ValueError, match="stride"):
        PackedDataset(shard_dir, "train", block_size=8, stride=0)


def test_pickles_without_the_token_maps(stream):
    shard_dir, _ = stream
    dataset = PackedDataset(shard_dir, "train", block_size=8, stride=8)
    expected = dataset[3]
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone._tokens is None
    assert all(torch.equal(a, b) for a, b in zip(clone[3], expected, strict=True))


def test_large_token_ids_survive_uint16_storage(tmp_path):
    tokens = np.array([50256, 65535 % VOCAB, 40000, 1, 0, 50255, 12345, 50256, 7])
    write_stream(tmp_path, tokens, shard_tokens=4)
    x, y = PackedDataset(tmp_path, "train", block_size=8, stride=1)[0]
    assert x.tolist() == tokens[:8].tolist() and y.tolist() == tokens[1:].tolist()


def test_token_outside_the_vocabulary_in_its_own_split_is_refused_by_name(stream):
    shard_dir, _ = stream
    path = shard_dir / "train_00002.bin"
    tokens = np.fromfile(path, dtype=np.uint16)
    tokens[0] = VOCAB
    tokens.tofile(path)
    with pytest.raises(ShardError, match=f"train_00002.bin holds token {VOCAB} >= vocab size {VOCAB}"):
        PackedDataset(shard_dir, "train", block_size=8, stride=8)
    assert len(PackedDataset(shard_dir, "val", block_size=2, stride=1)) == 1  # val reads none of train's tokens
