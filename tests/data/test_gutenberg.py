"""gather_books against a local HTTP server with scripted faults, mirror directories and local sources."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.progress import Progress

from tests.conftest import REPO_ROOT
from tests.data.gutenberg_server import Fault, GutenbergServer, write_layout_book
from tml.config import load_config
from tml.data import gutenberg
from tml.data.config import DEFAULT_BOOK_IDS, DataConfig
from tml.data.gutenberg import (
    LOCAL_ID_BASE,
    LOCAL_ID_BITS,
    MANIFEST_NAME,
    MIRROR_ENV,
    GutenbergError,
    MissingBookWarning,
    dangling_links,
    gather_books,
    local_book_paths,
    parse_title_author,
    retry_after_seconds,
    skipped_files,
)


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    """Retries wait milliseconds, not seconds; no developer's mirror setting leaks in."""
    monkeypatch.setattr(gutenberg, "RETRY_BACKOFF_S", 0.01)
    monkeypatch.delenv(MIRROR_ENV, raising=False)


def book_text(book_id: int) -> str:
    """A book in today's Gutenberg format, ~20 KB so truncation and chunked reads are real."""
    body = "".join(f"Line {line} of book {book_id}: it was the best of times.\n" for line in range(400))
    return (
        f"\ufeffThe Project Gutenberg EBook of Book {book_id}, by Author {book_id}\r\n\r\n"
        f"Title: Book {book_id}\r\n\r\nAuthor: Author {book_id}\r\n\r\n"
        f"*** START OF THIS PROJECT GUTENBERG EBOOK BOOK {book_id} ***\r\n\r\n{body}\r\n"
        f"*** END OF THIS PROJECT GUTENBERG EBOOK BOOK {book_id} ***\r\n\r\nThe licence.\r\n"
    )


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cache_path(book_id: int) -> str:
    return f"/cache/epub/{book_id}/pg{book_id}.txt"


def config(tmp_path: Path, mirror: str | None, book_ids, **overrides) -> DataConfig:
    values = dict(mirror=mirror, book_ids=list(book_ids), raw_dir=str(tmp_path / "raw"), requests_per_second=0,
                  download_concurrency=2, max_retries=3, request_timeout=5.0)
    values.update(overrides)
    return DataConfig(**values)


@pytest.fixture
def tree(tmp_path) -> Path:
    root = tmp_path / "site"
    for book_id in (1, 2, 3, 4, 5):
        write_layout_book(root, book_id, book_text(book_id))
    return root


@pytest.fixture
def server(tree):
    with GutenbergServer(tree) as running:
        yield running


def test_downloads_books_with_a_named_user_agent_and_records_a_manifest(tmp_path, server):
    books = gather_books(config(tmp_path, server.base_url, [3, 1, 2]))
    assert [book.id for book in books] == [3, 1, 2]
    for book in books:
        data = book.path.read_bytes()
        assert data == book_text(book.id).encode()
        assert (book.title, book.author) == (f"Book {book.id}", f"Author {book.id}")
        assert (book.bytes, book.sha256) == (len(data), sha256(data))
    manifest = json.loads((tmp_path / "raw" / MANIFEST_NAME).read_text())
    entry = manifest["books"]["3"]
    assert entry == {"id": 3, "title": "Book 3", "author": "Author 3", "path": "pg3.txt", "bytes": books[0].bytes,
                     "sha256": books[0].sha256, "url": server.base_url + cache_path(3)}
    assert all("tml" in request.user_agent for request in server.state.requests)
    assert not list((tmp_path / "raw").glob("*.part"))


def test_falls_back_to_the_older_url_forms(tmp_path):
    root = tmp_path / "site"
    write_layout_book(root, 7, book_text(7), form="files-0")
    write_layout_book(root, 8, book_text(8), form="files")
    with GutenbergServer(root) as server:
        books = gather_books(config(tmp_path, server.base_url, [7, 8]))
        assert [book.path.read_bytes() for book in books] == [book_text(7).encode(), book_text(8).encode()]
        assert [(request.path, request.status) for request in server.state.requests if "/8" in request.path] == [
            ("/cache/epub/8/pg8.txt", 404), ("/files/8/8-0.txt", 404), ("/files/8/8.txt", 200)]


def test_a_book_missing_at_every_url_is_skipped_with_a_warning(tmp_path, server):
    with pytest.warns(MissingBookWarning, match=r"1 book\(s\) not found .* 99"):
        books = gather_books(config(tmp_path, server.base_url, [1, 99, 2]))
    assert [book.id for book in books] == [1, 2]
    assert [path for path in server.paths_requested() if "99" in path] == [
        "/cache/epub/99/pg99.txt", "/files/99/99-0.txt", "/files/99/99.txt"]


def test_server_errors_are_retried_until_the_book_arrives(tmp_path, server):
    server.add_faults(cache_path(1), Fault.status_code(500), Fault.status_code(503))
    [book] = gather_books(config(tmp_path, server.base_url, [1]))
    assert [request.status for request in server.requests_for(cache_path(1))] == [500, 503, 200]
    assert book.path.read_bytes() == book_text(1).encode()


def test_429_waits_as_long_as_retry_after_says(tmp_path, server):
    server.add_faults(cache_path(1), Fault.status_code(429, retry_after="1"))
    gather_books(config(tmp_path, server.base_url, [1]))
    first, second = server.requests_for(cache_path(1))
    assert first.status == 429 and second.status == 200
    # The backoff alone would have waited 10 ms; Retry-After asked for a second.
    assert second.started - first.started >= 0.95


def test_retry_after_accepts_seconds_and_http_dates():
    assert retry_after_seconds("7") == 7.0
    in_a_minute = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 60))
    assert 55 <= retry_after_seconds(in_a_minute) <= 61
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None


def test_a_truncated_body_is_detected_by_content_length_and_fetched_again(tmp_path, server):
    server.add_faults(cache_path(2), Fault.truncated(0.3))
    [book] = gather_books(config(tmp_path, server.base_url, [2]))
    assert len(server.requests_for(cache_path(2))) == 2
    assert book.sha256 == sha256(book_text(2).encode())


def test_a_timeout_is_retried(tmp_path, server):
    server.add_faults(cache_path(3), Fault.slow(1.0))
    [book] = gather_books(config(tmp_path, server.base_url, [3], request_timeout=0.3))
    assert len(server.requests_for(cache_path(3))) == 2
    assert book.path.read_bytes() == book_text(3).encode()


def test_persistent_errors_give_up_with_a_clear_error(tmp_path, server):
    server.fail_all_after(0)
    with pytest.raises(GutenbergError, match=r"giving up on .*pg1\.txt after 3 attempts: HTTP 500.*resume"):
        gather_books(config(tmp_path, server.base_url, [1], max_retries=2))
    assert not list((tmp_path / "raw").glob("pg1.txt*"))


def test_a_forbidden_answer_is_not_retried(tmp_path, server):
    server.add_faults(cache_path(1), Fault.status_code(403))
    with pytest.raises(GutenbergError, match=r"pg1\.txt answered HTTP 403.*data.mirror"):
        gather_books(config(tmp_path, server.base_url, [1]))
    assert len(server.requests_for(cache_path(1))) == 1


def test_a_download_that_cannot_be_written_fails_at_once_naming_the_file(tmp_path, server):
    """A local write failure is the disk's, not the server's: no retries, no "run again later"."""
    (tmp_path / "raw" / "pg1.txt.part").mkdir(parents=True)  # the temp file cannot be opened
    with pytest.raises(GutenbergError, match=r"cannot write .*pg1\.txt\.part: Is a directory \(.* free\)"):
        gather_books(config(tmp_path, server.base_url, [1]))
    assert len(server.requests_for(cache_path(1))) == 1


def test_a_full_disk_mid_download_fails_at_once_naming_the_file(tmp_path, server):
    """Writes past a file-size limit fail with EFBIG, as a full disk fails with ENOSPC: in a child process, so
    the limit binds only the download."""
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        "from tml.data.config import DataConfig\n"
        "from tml.data.gutenberg import GutenbergError, gather_books\n"
        "try:\n"
        f"    gather_books(DataConfig(mirror={server.base_url!r}, book_ids=[1], raw_dir={str(tmp_path / 'raw')!r},"
        " requests_per_second=0, max_retries=3))\n"
        "except GutenbergError as error:\n"
        "    sys.exit(str(error))\n"
    )
    child = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert child.returncode == 1
    assert re.fullmatch(r"cannot write .*pg1\.txt\.part: File too large \(.* free\)\n", child.stderr), child.stderr
    assert len(server.requests_for(cache_path(1))) == 1
    assert not list((tmp_path / "raw").glob("pg1.txt*"))


def test_an_interrupted_run_resumes_and_skips_finished_books(tmp_path, server):
    cfg = config(tmp_path, server.base_url, [1, 2, 3, 4, 5], download_concurrency=1, max_retries=1)
    server.fail_all_after(2)  # the server dies after two books
    with pytest.raises(GutenbergError):
        gather_books(cfg)
    raw = tmp_path / "raw"
    assert sorted(json.loads((raw / MANIFEST_NAME).read_text())["books"]) == ["1", "2"]
    (raw / "pg3.txt.part").write_text("half a book from a killed process")

    server.fail_all_after(None)
    server.state.requests.clear()
    books = gather_books(cfg)
    assert [book.id for book in books] == [1, 2, 3, 4, 5]
    assert server.paths_requested() == [cache_path(3), cache_path(4), cache_path(5)]
    assert all(book.path.read_bytes() == book_text(book.id).encode() for book in books)
    assert not list(raw.glob("*.part"))


def test_a_finished_file_that_changed_is_downloaded_again(tmp_path, server):
    cfg = config(tmp_path, server.base_url, [1, 2])
    gather_books(cfg)
    (tmp_path / "raw" / "pg2.txt").write_bytes(book_text(2).encode()[:-5] + b"XXXXX")
    server.state.requests.clear()
    books = gather_books(cfg)
    assert server.paths_requested() == [cache_path(2)]
    assert books[1].path.read_bytes() == book_text(2).encode()


def test_an_unreadable_manifest_means_downloading_again_not_failing(tmp_path, server):
    cfg = config(tmp_path, server.base_url, [1])
    gather_books(cfg)
    (tmp_path / "raw" / MANIFEST_NAME).write_text("{not json")
    server.state.requests.clear()
    [book] = gather_books(cfg)
    assert server.paths_requested() == [cache_path(1)] and book.path.read_bytes() == book_text(1).encode()
    assert json.loads((tmp_path / "raw" / MANIFEST_NAME).read_text())["books"]["1"]["sha256"] == book.sha256


def test_progress_counts_every_requested_book(tmp_path, server):
    progress = Progress()
    with pytest.warns(MissingBookWarning):
        books = gather_books(config(tmp_path, server.base_url, [1, 2, 77]), progress)
    [task] = progress.tasks
    assert task.description == "download 3/3"
    assert task.total == task.completed == sum(book.bytes for book in books)


def test_requests_respect_the_rate_limit(tmp_path, server):
    gather_books(config(tmp_path, server.base_url, [1, 2, 3, 4, 5], requests_per_second=10, download_concurrency=4))
    starts = sorted(request.started for request in server.state.requests)
    gaps = [later - earlier for earlier, later in zip(starts, starts[1:], strict=False)]
    # Sent 0.1 s apart; the server sees them with its own delays (on a loaded machine one request seen 60 ms late
    # left the next gap at 0.04 s). Unlimited, four threads would send the first four at once: gaps of about 0,
    # and all five within a few milliseconds.
    assert len(starts) == 5 and min(gaps) >= 0.02 and starts[-1] - starts[0] >= 0.35


def test_concurrency_is_bounded(tmp_path, server):
    for book_id in (1, 2, 3, 4, 5):
        server.add_faults(cache_path(book_id), Fault.slow(0.2))
    gather_books(config(tmp_path, server.base_url, [1, 2, 3, 4, 5], download_concurrency=2))
    assert server.max_in_flight == 2


def test_unreachable_server_error_says_how_to_set_a_mirror(tmp_path):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    cfg = config(tmp_path, None, [1, 2, 3], max_retries=1)
    for set_base in ("config", "env"):
        base = f"http://127.0.0.1:{closed_port}"
        cfg.mirror = base if set_base == "config" else None
        with pytest.MonkeyPatch.context() as patch:
            if set_base == "env":
                patch.setenv(MIRROR_ENV, base)
            with pytest.raises(GutenbergError) as failure:
                gather_books(cfg)
        message = str(failure.value)
        assert f"cannot reach the Gutenberg server {base}" in message
        for instruction in ("--data.mirror", f"export {MIRROR_ENV}=", "--data.source"):
            assert instruction in message


def test_the_environment_mirror_is_used_when_the_config_names_none(tmp_path, server, monkeypatch):
    monkeypatch.setenv(MIRROR_ENV, server.base_url)
    books = gather_books(config(tmp_path, None, [4]))
    assert [book.id for book in books] == [4] and server.paths_requested() == [cache_path(4)]


@pytest.mark.parametrize("layout", ["flat", "gutenberg.org", "file-url"])
def test_a_mirror_directory_is_copied(tmp_path, tree, layout):
    if layout == "flat":
        mirror_dir = tmp_path / "flat"
        mirror_dir.mkdir()
        for book_id in (1, 2):
            (mirror_dir / f"pg{book_id}.txt").write_text(book_text(book_id), encoding="utf-8", newline="")
        mirror = str(mirror_dir)
    else:
        mirror = str(tree) if layout == "gutenberg.org" else tree.as_uri()
    with pytest.warns(MissingBookWarning, match="mirror directory"):
        books = gather_books(config(tmp_path, mirror, [1, 2, 42]))
    assert [book.id for book in books] == [1, 2]
    assert all(book.path.parent == tmp_path / "raw" and book.path.read_bytes() == book_text(book.id).encode()
               for book in books)
    assert sorted(json.loads((tmp_path / "raw" / MANIFEST_NAME).read_text())["books"]) == ["1", "2"]


def test_a_mirror_that_is_neither_url_nor_directory_is_refused(tmp_path):
    with pytest.raises(GutenbergError, match=r"data.mirror='/no/such/dir' is neither an http\(s\) URL nor"):
        gather_books(config(tmp_path, "/no/such/dir", [1]))


def test_a_local_source_directory_is_used_in_place(tmp_path):
    source = tmp_path / "books"
    (source / "nested").mkdir(parents=True)
    names = {"pg5.txt": 5, "6-0.txt": 6, "nested/7.txt": 7}
    for name, book_id in names.items():
        (source / name).write_text(book_text(book_id), encoding="utf-8")
    (source / "my notes.txt").write_text("no header at all\n", encoding="utf-8")
    (source / "README.md").write_text("not a book\n", encoding="utf-8")
    books = gather_books(DataConfig(source=str(source), raw_dir=str(tmp_path / "raw")))
    ids = [book.id for book in books]
    assert ids[:3] == [5, 6, 7] and len(ids) == 4 and ids[3] >= LOCAL_ID_BASE
    assert books[0].path == source / "pg5.txt" and books[0].title == "Book 5"
    assert books[3].title == "my notes.txt"  # no Title: header: its path under the source names it
    assert not (tmp_path / "raw").exists()  # nothing copied
    # The id of an oddly named file is stable from run to run; max_books keeps the lowest ids.
    assert gather_books(DataConfig(source=str(source)))[3].id == ids[3]
    assert [book.id for book in gather_books(DataConfig(source=str(source), max_books=2))] == [5, 6]


def test_local_files_without_a_title_header_are_titled_by_their_relative_path(tmp_path):
    source = tmp_path / "own"
    (source / "2024" / ".git").mkdir(parents=True)
    (source / "2024" / "diary.txt").write_text("Dear diary,\n", encoding="utf-8")
    (source / "2024" / "photo.png").write_bytes(b"\x89PNG")
    (source / "2024" / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    assert [book.title for book in gather_books(DataConfig(source=str(source)))] == ["2024/diary.txt"]
    assert skipped_files(DataConfig(source=str(source))) == [source / "2024" / "photo.png"]  # hidden ones not counted


def test_a_bad_local_source_is_refused_by_name(tmp_path):
    with pytest.raises(GutenbergError, match=r"data.source='/no/such/books' is neither 'gutenberg' nor"):
        gather_books(DataConfig(source="/no/such/books"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(GutenbergError, match="holds no .txt or .jsonl files"):
        gather_books(DataConfig(source=str(tmp_path / "empty")))


def corpus(root: Path, names: list[str | bytes]) -> Path:
    """A directory of small .txt files, each holding its own name (bytes names for names that are not UTF-8)."""
    for name in names:
        path = Path(os.fsdecode(os.path.join(os.fsencode(root), os.fsencode(name))))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"The text of {os.fsdecode(name)!r}.\n", encoding="utf-8")
    return root


def local_titles(source: Path) -> list[str]:
    return sorted(book.title for book in gather_books(DataConfig(source=str(source))))


def test_chapter_files_sharing_a_number_all_become_documents(tmp_path):
    source = corpus(tmp_path / "own", ["book_a/1.txt", "book_b/1.txt", "01.txt", "pg7.txt"])
    books = gather_books(DataConfig(source=str(source)))
    assert sorted(book.title for book in books) == ["01.txt", "book_a/1.txt", "book_b/1.txt", "pg7.txt"]
    ids = {book.title: book.id for book in books}
    assert ids["pg7.txt"] == 7  # a number no other file carries is still the ebook id
    assert len(set(ids.values())) == 4 and all(ids[name] >= LOCAL_ID_BASE for name in ids if name != "pg7.txt")


def test_names_whose_old_28_bit_ids_collide_are_both_kept(tmp_path):
    def old_id(name: str) -> int:
        return LOCAL_ID_BASE + int(hashlib.sha256(name.encode()).hexdigest()[:7], 16)

    assert old_id("doc_6483.txt") == old_id("doc_15880.txt")  # the pair the old ids merged into one document
    source = corpus(tmp_path / "own", ["doc_6483.txt", "doc_15880.txt"])
    books = gather_books(DataConfig(source=str(source)))
    assert sorted(book.title for book in books) == ["doc_15880.txt", "doc_6483.txt"]
    assert len({book.id for book in books}) == 2
    assert all(LOCAL_ID_BASE <= book.id < LOCAL_ID_BASE + 2**LOCAL_ID_BITS < 2**63 for book in books)  # fits int64


def test_distinct_pg_files_keep_their_ebook_ids(tmp_path):
    source = corpus(tmp_path / "mirror", ["pg5.txt", "pg12.txt", "31-0.txt", "nested/pg1080.txt", "1000000005.txt"])
    ids = sorted(local_book_paths(DataConfig(source=str(source))))
    assert ids[:4] == [5, 12, 31, 1080]
    assert ids[4] >= LOCAL_ID_BASE and ids[4] != 1_000_000_005  # a number in the path-id range is not an ebook id


@pytest.mark.shared
def test_the_shared_mirror_as_a_source_keeps_every_ebook_id(shared_gutenberg):
    """Shards built from ../shared/data/gutenberg keep their ids, so their index and val choice do not change."""
    ids = {book_id: path.name for book_id, path in local_book_paths(DataConfig(source=str(shared_gutenberg))).items()}
    assert ids == {book_id: row["file"] for book_id, row in shared_manifest(shared_gutenberg).items()}


def test_two_files_given_one_id_raise_naming_both(tmp_path, monkeypatch):
    monkeypatch.setattr(gutenberg, "LOCAL_ID_BITS", 1)  # two possible path ids: three files must share one
    source = corpus(tmp_path / "own", ["a.txt", "b.txt", "c.txt"])
    with pytest.raises(GutenbergError, match=r"^\S+\.txt and \S+\.txt in data.source=.* get the same id \d+: rename"):
        gather_books(DataConfig(source=str(source)))


def test_a_file_name_that_is_not_utf8_is_read_and_shown_escaped(tmp_path):
    source = corpus(tmp_path / "own", [b"caf\xe9.txt", b"menu/cr\xe8me.txt", "plain.txt"])
    books = gather_books(DataConfig(source=str(source)))
    assert sorted(book.title for book in books) == ["caf\\xe9.txt", "menu/cr\\xe8me.txt", "plain.txt"]
    assert all(book.path.is_file() for book in books)
    json.dumps([book.title for book in books]).encode("utf-8")  # printable and storable: no lone surrogates


def test_hidden_folders_and_files_are_not_read(tmp_path):
    source = corpus(tmp_path / "own", ["notes.txt", ".ipynb_checkpoints/notes-checkpoint.txt", ".draft.txt",
                                       "ch/.cache/old.txt", "ch/1.txt"])
    assert local_titles(source) == ["ch/1.txt", "notes.txt"]


def test_symlinked_folders_are_followed_once_and_a_loop_ends(tmp_path):
    source = corpus(tmp_path / "own", ["mine.txt", "sub/part.txt"])
    corpus(tmp_path / "elsewhere", ["theirs.txt"])
    (source / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (source / "sub" / "up").symlink_to(source, target_is_directory=True)  # a loop back to the root
    (source / "sub" / "again").symlink_to(source / "sub", target_is_directory=True)  # a folder reached twice
    (source / "gone.txt").symlink_to(tmp_path / "moved.txt")
    (source / "sub" / "self.txt").symlink_to(source / "sub" / "self.txt")  # a link loop points nowhere too
    assert local_titles(source) == ["linked/theirs.txt", "mine.txt", "sub/part.txt"]
    cfg = DataConfig(source=str(source))
    assert dangling_links(cfg) == [source / "gone.txt", source / "sub" / "self.txt"]
    assert skipped_files(cfg) == []


def test_skipped_files_are_sorted_by_name(tmp_path):
    source = corpus(tmp_path / "own", ["a.txt"])
    for name in ("z/apple.png", "b.pdf", "a/zebra.jpg"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(b"\0")
    assert [path.name for path in skipped_files(DataConfig(source=str(source)))] == ["apple.png", "b.pdf", "zebra.jpg"]


@pytest.mark.parametrize("key, value", [("download_concurrency", 0), ("max_retries", -1),
                                        ("requests_per_second", -1.0), ("request_timeout", 0.0)])
def test_invalid_download_settings_are_refused_by_name(tmp_path, key, value):
    with pytest.raises(GutenbergError, match=f"data.{key}"):
        gather_books(config(tmp_path, "http://127.0.0.1:9", [1], **{key: value}))


def test_title_and_author_come_from_the_header():
    assert parse_title_author(book_text(9)) == ("Book 9", "Author 9")
    glued = "re-use it under the terms of the Project Gutenberg License online at www.gutenberg.orgTitle: X\n\nAuthor: Y"
    assert parse_title_author(glued) == ("X", "Y")
    subtitle = "Title: Frankenstein\n       or The Modern Prometheus\n\nAuthor: Mary Shelley\n"
    assert parse_title_author(subtitle) == ("Frankenstein", "Mary Shelley")
    assert parse_title_author("\n*The Project Gutenberg Etext of Howard's End, by E. M. Forster*\n") == (
        "Howard's End", "E. M. Forster")
    assert parse_title_author("no header\n") == ("", "")


def test_books_yaml_is_a_loadable_data_config():
    cfg = load_config(["--config", str(REPO_ROOT / "configs" / "books.yaml")]).data
    assert cfg.source == "gutenberg" and len(cfg.book_ids) == len(set(cfg.book_ids)) >= 100


# ------------------------------------------------------------------------------------- the shared books


def shared_manifest(directory: Path) -> dict[int, dict]:
    with open(directory / "MANIFEST.tsv", encoding="utf-8") as file:
        return {int(row["gutenberg_id"]): row for row in csv.DictReader(file, delimiter="\t")}


@pytest.mark.shared
def test_every_shipped_book_list_is_in_the_shared_corpus(shared_gutenberg):
    available = set(shared_manifest(shared_gutenberg))
    assert set(DEFAULT_BOOK_IDS) <= available
    # So `TML_GUTENBERG_MIRROR=../shared/data/gutenberg` runs every shipped config offline, unchanged.
    for path in sorted((REPO_ROOT / "configs").glob("*.yaml")):
        data = load_config(["--config", str(path)]).data
        if data.source == "gutenberg":
            assert set(data.book_ids) <= available, path.name


@pytest.mark.shared
def test_shared_books_download_over_http_intact(tmp_path, shared_gutenberg):
    manifest = shared_manifest(shared_gutenberg)
    smallest = sorted(manifest, key=lambda book_id: int(manifest[book_id]["bytes"]))[:4]
    root = tmp_path / "site"
    for book_id in smallest:
        target = root / f"cache/epub/{book_id}/pg{book_id}.txt"
        target.parent.mkdir(parents=True)
        target.write_bytes((shared_gutenberg / manifest[book_id]["file"]).read_bytes())
    with GutenbergServer(root) as server:
        server.add_faults(cache_path(smallest[0]), Fault.truncated(0.5))
        books = gather_books(config(tmp_path, server.base_url, smallest))
    assert [(book.sha256, book.bytes, book.title) for book in books] == [
        (manifest[i]["sha256"], int(manifest[i]["bytes"]), manifest[i]["title"]) for i in smallest]


@pytest.mark.shared
def test_the_default_config_runs_offline_from_the_shared_mirror(tmp_path, shared_gutenberg, monkeypatch):
    monkeypatch.setenv(MIRROR_ENV, str(shared_gutenberg))
    books = gather_books(DataConfig(raw_dir=str(tmp_path / "raw")))
    manifest = shared_manifest(shared_gutenberg)
    assert [book.id for book in books] == list(DEFAULT_BOOK_IDS)
    assert all(book.sha256 == manifest[book.id]["sha256"] for book in books)


@pytest.mark.shared
def test_titles_and_authors_match_the_shared_manifest(shared_gutenberg):
    manifest = shared_manifest(shared_gutenberg)
    matches = sum(
        parse_title_author((shared_gutenberg / row["file"]).read_text(encoding="utf-8")) == (row["title"], row["author"])
        for row in manifest.values()
    )
    # The rest differ in editorial detail only ("Andrew Lang." with a period, a missing "Volume 1").
    assert matches >= 0.95 * len(manifest)
