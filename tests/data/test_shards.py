"""Shards round-trip, split by whole book, and refuse to load when they do not match their index."""

from __future__ import annotations

import errno
import json
import os

import numpy as np
import pytest

from tml.data.shards import (
    INDEX_FILE,
    ShardError,
    ShardIndex,
    SplitWriter,
    choose_val_books,
    remove_temporaries,
    shard_starts,
    write_shards,
)

VOCAB = 1000


def make_documents(count: int = 6, seed: int = 0) -> list[tuple[str, int, str, list[int]]]:
    rng = np.random.default_rng(seed)
    documents = []
    for book_id in range(count):
        tokens = rng.integers(0, VOCAB - 1, size=int(rng.integers(5, 40))).tolist() + [VOCAB - 1]
        documents.append(("val" if book_id % 3 == 2 else "train", book_id, f"book {book_id}", tokens))
    return documents


def build(shard_dir, documents, shard_tokens: int = 16) -> ShardIndex:
    return write_shards(
        shard_dir, documents, tokenizer="test", vocab_size=VOCAB, shard_tokens=shard_tokens,
        fingerprint="f" * 64, settings={"source": "test"},
    )


def split_stream(index: ShardIndex, split: str) -> np.ndarray:
    paths = [index.shard_dir / shard.file for shard in index.splits[split].shards]
    return np.concatenate([np.fromfile(path, dtype=np.uint16) for path in paths]) if paths else np.array([])


def test_round_trip_keeps_every_token_and_document_boundary(tmp_path):
    documents = make_documents()
    build(tmp_path, documents)
    index = ShardIndex.load(tmp_path, verify=True)
    for split in ("train", "val"):
        expected = [tokens for name, _, _, tokens in documents if name == split]
        stream = split_stream(index, split)
        assert stream.tolist() == [token for tokens in expected for token in tokens]
        starts = shard_starts(index.splits[split])
        spans = index.splits[split].documents
        assert [span.length for span in spans] == [len(tokens) for tokens in expected]
        for span, tokens in zip(spans, expected, strict=True):
            start = starts[span.shard] + span.offset
            assert stream[start : start + span.length].tolist() == tokens
    assert all(shard.tokens <= 16 for split in index.splits.values() for shard in split.shards)
    assert len(index.splits["train"].shards) > 1  # documents really ran across shard files
    assert not list(tmp_path.glob("*.tmp"))


def test_parts_of_one_document_in_a_row_stay_one_document_across_shard_files(tmp_path):
    parts = [("train", 7, "big.jsonl", list(range(10))), ("train", 7, "big.jsonl", list(range(10, 25))),
             ("val", 7, "big.jsonl", [1, 2]), ("train", 8, "next.txt", [3, 4, 5])]
    build(tmp_path, parts)
    index = ShardIndex.load(tmp_path, verify=True)
    train = index.splits["train"]
    assert [(span.id, span.shard, span.offset, span.length) for span in train.documents] == [(7, 0, 0, 25),
                                                                                            (8, 1, 9, 3)]
    assert split_stream(index, "train").tolist() == [*range(25), 3, 4, 5]
    assert [(span.id, span.length) for span in index.splits["val"].documents] == [(7, 2)]


def test_rebuild_removes_shards_of_the_previous_larger_build(tmp_path):
    build(tmp_path, make_documents(count=9))
    first = {path.name for path in tmp_path.glob("*.bin")}
    build(tmp_path, make_documents(count=2))
    index = ShardIndex.load(tmp_path, verify=True)
    kept = {shard.file for split in index.splits.values() for shard in split.shards}
    assert {path.name for path in tmp_path.glob("*.bin")} == kept < first


def files_and_bytes(directory):
    return {path.relative_to(directory): path.read_bytes() for path in directory.rglob("*") if path.is_file()}


def test_an_interrupted_rebuild_leaves_the_previous_shards_complete_and_usable(tmp_path):
    build(tmp_path, make_documents())
    before = files_and_bytes(tmp_path)

    def failing_documents():
        yield from make_documents(count=12, seed=1)  # more than before: every shard name would be rewritten
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build(tmp_path, failing_documents())
    assert files_and_bytes(tmp_path) == before  # nothing left behind, nothing replaced
    ShardIndex.load(tmp_path, verify=True)


def test_a_full_disk_during_a_rebuild_is_one_clear_error_and_the_previous_shards_survive(tmp_path, monkeypatch):
    build(tmp_path, make_documents())
    before = files_and_bytes(tmp_path)
    real_write = SplitWriter._write
    written = {"n": 0}

    def write_until_the_disk_fills(self, piece):
        written["n"] += 1
        if written["n"] > 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(self, piece)

    monkeypatch.setattr(SplitWriter, "_write", write_until_the_disk_fills)
    with pytest.raises(ShardError, match=rf"cannot write shards to {tmp_path}: No space left on device "
                                         r"\([\d,.]+ MB free\); the shards there are left as they were"):
        build(tmp_path, make_documents(seed=1))
    assert files_and_bytes(tmp_path) == before
    ShardIndex.load(tmp_path, verify=True)


def test_leftover_build_directories_are_removed_by_the_lock_holder(tmp_path):
    build(tmp_path, make_documents())
    crashed = tmp_path / ".build-999999"  # a build killed with SIGKILL
    crashed.mkdir()
    (crashed / "train_00000.bin").write_bytes(b"\x00\x00")
    remove_temporaries(tmp_path)
    assert not crashed.exists()
    ShardIndex.load(tmp_path, verify=True)


def test_token_outside_vocab_is_refused_at_write(tmp_path):
    with pytest.raises(ShardError, match="document 7"):
        build(tmp_path, [("train", 7, "bad", [1, 2, VOCAB])])


def test_val_books_are_deterministic_and_whole():
    ids = list(range(100, 140))
    val = choose_val_books(ids, 0.1, seed=3)
    assert len(val) == 4 and val <= set(ids)
    assert choose_val_books(list(reversed(ids)), 0.1, seed=3) == val
    assert choose_val_books(ids, 0.1, seed=4) != val
    assert len(choose_val_books([1, 2], 0.01, seed=0)) == 1  # two books: one is held out
    assert len(choose_val_books([1, 2], 0.9, seed=0)) == 1  # ... and one kept for training
    assert choose_val_books([1], 0.5, seed=0) == set()
    with pytest.raises(ValueError, match="val_frac"):
        choose_val_books(ids, 1.0, seed=0)


@pytest.fixture
def shards(tmp_path):
    build(tmp_path, make_documents())
    return tmp_path


def first_train_shard(shard_dir):
    return shard_dir / "train_00000.bin"


def edit_index(shard_dir, change):
    values = json.loads((shard_dir / INDEX_FILE).read_text())
    change(values)
    (shard_dir / INDEX_FILE).write_text(json.dumps(values))


def test_truncated_shard_is_refused_by_name(shards):
    path = first_train_shard(shards)
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(ShardError, match="train_00000.bin is 30 bytes"):
        ShardIndex.load(shards)


def test_shard_written_with_another_dtype_is_refused_by_name(shards):
    path = first_train_shard(shards)
    path.write_bytes(np.fromfile(path, dtype=np.uint16).astype(np.int32).tobytes())
    with pytest.raises(ShardError, match="train_00000.bin.*another dtype"):
        ShardIndex.load(shards)


def test_token_at_or_above_vocab_is_refused_by_name(shards):
    path = first_train_shard(shards)
    tokens = np.fromfile(path, dtype=np.uint16)
    tokens[3] = VOCAB
    tokens.tofile(path)
    with pytest.raises(ShardError, match=f"train_00000.bin holds token {VOCAB} >= vocab size {VOCAB}"):
        ShardIndex.load(shards)


def test_missing_shard_is_refused_by_name(shards):
    (shards / "val_00000.bin").unlink()
    with pytest.raises(ShardError, match="val_00000.bin is missing"):
        ShardIndex.load(shards)


def test_same_size_edit_is_caught_by_verify(shards):
    path = first_train_shard(shards)
    tokens = np.fromfile(path, dtype=np.uint16)
    other = int(np.argmax(tokens != tokens[0]))  # swap two different tokens: same size, same max
    tokens[0], tokens[other] = tokens[other], tokens[0]
    tokens.tofile(path)
    ShardIndex.load(shards)  # sizes and token range still fine
    with pytest.raises(ShardError, match="train_00000.bin: sha256"):
        ShardIndex.load(shards, verify=True)


def test_edited_index_is_refused(shards):
    edit_index(shards, lambda v: v["splits"]["train"]["shards"][1].update(tokens=3))
    with pytest.raises(ShardError, match="train_00001.bin is 32 bytes but index.json says 3"):
        ShardIndex.load(shards)


def test_index_with_another_dtype_or_smaller_vocab_is_refused(shards):
    edit_index(shards, lambda v: v.update(dtype="uint32"))
    with pytest.raises(ShardError, match="index.json: dtype 'uint32'"):
        ShardIndex.load(shards)
    edit_index(shards, lambda v: v.update(dtype="uint16", vocab_size=10))
    with pytest.raises(ShardError, match=r"train_00000.bin: max token \d+ >= vocab size 10"):
        ShardIndex.load(shards)


def test_document_spans_that_do_not_tile_are_refused(shards):
    edit_index(shards, lambda v: v["splits"]["val"]["documents"][0].update(length=1))
    with pytest.raises(ShardError, match="val document"):
        ShardIndex.load(shards)


def test_unreadable_index_is_refused_by_name(shards):
    (shards / INDEX_FILE).write_text("{not json")
    with pytest.raises(ShardError, match="index.json is not a tml shard index"):
        ShardIndex.load(shards)


def test_an_index_that_is_not_utf8_is_refused_by_name(shards):
    (shards / INDEX_FILE).write_bytes(b"\xff\xfe{}")
    with pytest.raises(ShardError, match="index.json is not a tml shard index.*tml-prepare --force"):
        ShardIndex.load(shards)
    assert ShardIndex.load_or_none(shards) is None


def test_an_index_value_of_the_wrong_type_is_refused_by_name(shards):
    edit_index(shards, lambda v: v.update(vocab_size="x"))
    with pytest.raises(ShardError, match="index.json is not a tml shard index.*tml-prepare --force"):
        ShardIndex.load(shards)
    assert ShardIndex.load_or_none(shards) is None


def test_document_that_exactly_fills_a_shard_starts_the_next_one_cleanly(tmp_path):
    index = build(tmp_path, [("train", 1, "a", [1, 2, 3, 4]), ("train", 2, "b", [5, 6, 7, 8, 9])], shard_tokens=4)
    train = index.splits["train"]
    assert [shard.tokens for shard in train.shards] == [4, 4, 1]
    assert [(span.shard, span.offset, span.length) for span in train.documents] == [(0, 0, 4), (1, 0, 5)]
    assert index.splits["val"].shards == [] and index.splits["val"].documents == []
    ShardIndex.load(tmp_path, verify=True)


def test_shards_in_progress_live_in_the_writers_own_build_directory_and_anothers_is_left_alone(tmp_path):
    others = tmp_path / f".build-{os.getpid() + 1}"  # another process's build, half written
    others.mkdir()
    (others / "train_00000.bin").write_bytes(b"\x01\x00")
    seen_while_writing = []

    def documents():
        yield from make_documents(count=2)
        seen_while_writing.extend(path.relative_to(tmp_path).parts[0] for path in tmp_path.rglob("*.bin"))

    build(tmp_path, documents())
    assert f".build-{os.getpid()}" in seen_while_writing and "train_00000.bin" not in seen_while_writing
    assert (others / "train_00000.bin").read_bytes() == b"\x01\x00"
    assert not (tmp_path / f".build-{os.getpid()}").exists()  # moved in, then removed
    ShardIndex.load(tmp_path, verify=True)
    remove_temporaries(tmp_path)  # what a holder of the build lock does with leftovers
    assert not others.exists()
