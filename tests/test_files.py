"""The shared file helpers: hashes match hashlib's, and an interrupted write never replaces the good file."""

import hashlib
import os

import pytest

from tml.files import HASH_CHUNK_BYTES, file_sha256, write_atomic


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
