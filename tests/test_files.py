"""The shared file helpers: hashes match hashlib's, an interrupted write never replaces the good file, and a failed
write never leaves its temporary file behind."""

import hashlib
import os

import pytest

from tml.files import HASH_CHUNK_BYTES, file_sha256, make_directory, replaced_on_success, write_atomic


def test_sha256_of_a_file_larger_than_one_chunk_matches_hashlib(tmp_path):
    data = os.urandom(2 * HASH_CHUNK_BYTES + 123)
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()


def test_write_atomic_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_bytes(b"old")
    write_atomic(path, b"new")
    assert path.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def test_a_write_that_fails_midway_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "index.json"
    path.write_bytes(b"good")

    def failing_fsync(fd):  # fault injection: the disk fails before the data is safe
        raise OSError("No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space left"):
        write_atomic(path, b"half")
    assert path.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["index.json"]  # the temporary went with the failure


def test_a_directory_in_the_way_fails_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "model.pt"
    target.mkdir()
    with pytest.raises(IsADirectoryError):
        write_atomic(target, b"weights")
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"] and not any(target.iterdir())


def test_an_interrupted_writer_leaves_neither_file_nor_temporary(tmp_path):
    target = tmp_path / "weights.pt"
    with pytest.raises(KeyboardInterrupt), replaced_on_success(target, tmp_path / ".weights.pt.tmp") as temporary:
        temporary.write_bytes(b"half of the weights")
        raise KeyboardInterrupt  # Ctrl-C in the middle of torch.save
    assert list(tmp_path.iterdir()) == []


def test_a_successful_writer_is_renamed_into_place(tmp_path):
    target = tmp_path / "weights.pt"
    with replaced_on_success(target) as temporary:
        temporary.write_bytes(b"all of the weights")
        assert not target.exists()  # readers never see the file before it is complete
    assert target.read_bytes() == b"all of the weights" and list(tmp_path.iterdir()) == [target]


def test_make_directory_names_the_file_that_stands_in_the_way(tmp_path):
    (tmp_path / "data").write_text("a file")
    with pytest.raises(NotADirectoryError, match=f"{tmp_path / 'data'} is a file, not a directory"):
        make_directory(tmp_path / "data" / "raw" / "books")
    make_directory(tmp_path / "runs" / "tiny")
    make_directory(tmp_path / "runs" / "tiny")  # already there: fine
    (tmp_path / "moved").symlink_to(tmp_path / "gone")  # a link whose target was moved away
    with pytest.raises(NotADirectoryError, match=f"{tmp_path / 'moved'} is a link to {tmp_path / 'gone'}, which does "
                                                 "not exist"):
        make_directory(tmp_path / "moved" / "run")
    (tmp_path / "linked").symlink_to(tmp_path / "runs")  # a link to a directory is one
    make_directory(tmp_path / "linked" / "tiny")
    assert (tmp_path / "runs" / "tiny").is_dir()
