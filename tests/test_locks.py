"""The holder record of a lock file: written by the holder, read back by whoever is refused or waits."""

import os
import socket
from datetime import datetime, timedelta, timezone

import pytest

from tml.locks import describe_holder, open_lock_file, read_holder, write_holder


def test_the_holder_is_described_with_the_date_only_when_not_today():
    since = datetime(2026, 11, 27, 18, 2, 30, tzinfo=timezone.utc)
    record = f'{{"pid": 1234, "host": "gpu7", "since": "{since.isoformat()}"}}\n'
    assert describe_holder(record, today=since + timedelta(hours=2)) == "pid 1234 on host gpu7, since 18:02"
    assert describe_holder(record, today=since + timedelta(days=1)) == "pid 1234 on host gpu7, since 2026-11-27 18:02"
    assert describe_holder("") == describe_holder('{"pid": 12') == "holder not recorded yet"


def test_a_holder_record_written_over_a_longer_one_reads_back_whole(tmp_path):
    path = tmp_path / "nested" / "x.lock"  # its directory is created
    fd = open_lock_file(path)
    try:
        os.write(fd, b"{" + b"x" * 500 + b"}\n")  # a longer, older record: cut, not left as a tail
        write_holder(fd)
        assert read_holder(fd).startswith(f"pid {os.getpid()} on host {socket.gethostname()}, since ")
        assert path.read_bytes().count(b"\n") == 1
    finally:
        os.close(fd)


def test_a_file_where_the_lock_directory_should_be_is_named_as_such(tmp_path):
    in_the_way = tmp_path / "runs"
    in_the_way.write_text("not a directory")
    with pytest.raises(NotADirectoryError, match=f"{in_the_way} is a file, not a directory"):
        open_lock_file(in_the_way / "tiny" / "train.lock")
