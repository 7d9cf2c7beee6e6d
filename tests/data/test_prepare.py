"""prepare_data turns a directory of books or of your own text into shards once, and again only when an input changes."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from tml.data import prepare
from tml.data.clean import strip_gutenberg
from tml.data.config import DataConfig
from tml.data.gutenberg import local_book_paths
from tml.data.packed import PackedDataset
from tml.data.prepare import (
    PrepareError,
    data_is_ready,
    data_settings,
    main,
    prepare_data,
    read_book,
    shards_without_source,
    source_content_fingerprint,
    split_lines,
)
from tml.data.shards import INDEX_FILE, ShardIndex, choose_val_books, shard_starts, write_shards
from tml.data.tokenizer import EOT_TOKEN_ID, get_tokenizer

HEADER = "The Project Gutenberg EBook of {title}\n\n*** START OF THIS PROJECT GUTENBERG EBOOK {title} ***\n\n"
FOOTER = "\n\n*** END OF THIS PROJECT GUTENBERG EBOOK {title} ***\n\nLicence text that must not be trained on.\n"


def write_book(directory, book_id: int, body: str) -> None:
    title = f"BOOK {book_id}"
    (directory / f"pg{book_id}.txt").write_text(HEADER.format(title=title) + body + FOOTER.format(title=title))


@pytest.fixture
def books(tmp_path):
    source = tmp_path / "books"
    source.mkdir()
    for book_id in (11, 12, 13, 14):
        paragraph = f"Chapter {book_id}. It was a bright cold day in April, and the clocks were striking thirteen. "
        write_book(source, book_id, paragraph * (20 + book_id))
    return source


def config(tmp_path, source, **overrides) -> DataConfig:
    values = dict(source=str(source), raw_dir=str(tmp_path / "raw"), shard_dir=str(tmp_path / "shards"),
                  shard_tokens=500, val_frac=0.25, encode_threads=2)
    values.update(overrides)
    return DataConfig(**values)


def quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


def split_tokens(index: ShardIndex, split: str) -> np.ndarray:
    return np.concatenate([np.fromfile(index.shard_dir / shard.file, dtype=np.uint16)
                           for shard in index.splits[split].shards])


def test_shards_hold_each_stripped_book_followed_by_endoftext(tmp_path, books, monkeypatch):
    monkeypatch.setattr(prepare, "ENCODE_BATCH_CHARS", 3000)  # several encode batches, as on a big corpus
    cfg = config(tmp_path, books, val_split="books")
    shard_dir = prepare_data(cfg, console=quiet())
    index = ShardIndex.load(shard_dir, verify=True)
    assert [len(index.splits[split].documents) for split in ("train", "val")] == [3, 1]
    assert len(index.splits["train"].shards) > 1
    encoding = get_tokenizer()
    for split in ("train", "val"):
        stream = split_tokens(index, split)
        starts = shard_starts(index.splits[split])
        for document in index.splits[split].documents:
            text = strip_gutenberg((books / f"pg{document.id}.txt").read_text())
            assert text.startswith(f"Chapter {document.id}.") and "Licence" not in text
            start = starts[document.shard] + document.offset
            tokens = stream[start : start + document.length].tolist()
            assert tokens == encoding.encode_ordinary(text) + [EOT_TOKEN_ID]
    assert len(PackedDataset(shard_dir, "train", block_size=16, stride=8)) > 0


def written_files(shard_dir) -> dict[str, int]:
    """Each data file's mtime: the lock file, rewritten by every preparation to name its holder, is not data."""
    return {path.name: path.stat().st_mtime_ns for path in shard_dir.iterdir() if path.name != prepare.PREPARE_LOCK}


def test_second_run_with_same_inputs_rebuilds_nothing(tmp_path, books):
    cfg = config(tmp_path, books)
    assert not data_is_ready(cfg)
    prepare_data(cfg, console=quiet())
    assert data_is_ready(cfg)
    written = written_files(tmp_path / "shards")
    output = quiet()
    prepare_data(cfg, console=output)
    assert "up to date" in output.file.getvalue()
    assert written_files(tmp_path / "shards") == written


def test_changed_book_or_setting_rebuilds(tmp_path, books):
    cfg = config(tmp_path, books)
    prepare_data(cfg, console=quiet())
    before = ShardIndex.load(cfg.shard_dir)
    write_book(books, 12, "A different text entirely. " * 30)
    output = quiet()
    prepare_data(cfg, console=output)
    assert "built" in output.file.getvalue()
    assert ShardIndex.load(cfg.shard_dir).fingerprint != before.fingerprint

    reseeded = config(tmp_path, books, split_seed=7)
    assert not data_is_ready(reseeded)
    prepare_data(reseeded, console=quiet())
    assert data_is_ready(reseeded) and not data_is_ready(cfg)


def test_force_rebuilds_and_a_damaged_build_is_redone(tmp_path, books):
    cfg = config(tmp_path, books)
    prepare_data(cfg, console=quiet())
    output = quiet()
    prepare_data(cfg, console=output, force=True)
    assert "built" in output.file.getvalue()
    (tmp_path / "shards" / "train_00000.bin").write_bytes(b"\x00\x00")
    assert not data_is_ready(cfg)
    prepare_data(cfg, console=quiet())
    ShardIndex.load(cfg.shard_dir, verify=True)


def test_cli_prints_summary_and_exits_nonzero_with_the_message(tmp_path, books, capsys):
    shard_dir = tmp_path / "cli-shards"
    assert main(["--data.source", str(books), "--data.shard_dir", str(shard_dir), "--data.val_frac", "0.25"]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "val" in out and "built" in out
    assert (shard_dir / INDEX_FILE).is_file()

    missing = tmp_path / "no-such-dir"
    assert main(["--data.source", str(missing), "--data.shard_dir", str(shard_dir)]) == 1
    assert "no-such-dir" in capsys.readouterr().err
    assert main(["--data.no_such_key", "1"]) == 1
    assert "no_such_key" in capsys.readouterr().err


@pytest.mark.shared
def test_real_books_tokenize_without_licence_text(tmp_path, shared_gutenberg):
    cfg = config(tmp_path, shared_gutenberg, max_books=3, val_frac=0.34, shard_tokens=100_000, val_split="books")
    index = ShardIndex.load(prepare_data(cfg, console=quiet()), verify=True)
    assert sum(len(split.documents) for split in index.splits.values()) == 3
    text = get_tokenizer().decode(split_tokens(index, "train").tolist())
    assert "Project Gutenberg" not in text.split("<|endoftext|>")[0][:2000]
    assert text.endswith("<|endoftext|>")


# ------------------------------------------------------------------------------------------ your own text

OWN_TEXT = "".join(f"Line {n}: the quick brown fox jumps over the lazy dog, and then it rests a while.\n"
                   for n in range(120))


def own_corpus(tmp_path, files: dict[str, str]):
    source = tmp_path / "own"
    for name, text in files.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text(text, encoding="utf-8")
    return source


def two_file_corpus(tmp_path) -> tuple[Path, DataConfig]:
    """A two-file corpus of your own and its config (shards in tmp_path/shards), not prepared yet."""
    source = own_corpus(tmp_path, {"a.txt": OWN_TEXT, "b.txt": OWN_TEXT[:2000]})
    return source, config(tmp_path, source)


def shard_mtimes(tmp_path) -> dict[str, int]:
    """Each shard file's mtime: unchanged means the shards were kept, not written again."""
    return {path.name: path.stat().st_mtime_ns for path in (tmp_path / "shards").glob("*.bin")}


def document_tokens(index: ShardIndex, split: str) -> dict[str, list[int]]:
    """Each document's tokens in one split, by title."""
    stream, starts = split_tokens(index, split), shard_starts(index.splits[split])
    return {document.title: stream[starts[document.shard] + document.offset:][: document.length].tolist()
            for document in index.splits[split].documents}


def output_of(cfg, **kwargs) -> str:
    console = quiet()
    prepare_data(cfg, console=console, **kwargs)
    return console.file.getvalue()


def test_a_single_file_corpus_holds_out_the_tail_of_its_tokens(tmp_path):
    source = own_corpus(tmp_path, {"input.txt": OWN_TEXT})
    cfg = config(tmp_path, source, val_frac=0.1)  # val_split auto
    output = output_of(cfg)
    index = ShardIndex.load(cfg.shard_dir, verify=True)
    assert index.settings["val_split"] == "tail"
    assert "val split tail: the last 10% of every document's tokens (1 document); val holds 10." in output
    train, val = document_tokens(index, "train")["input.txt"], document_tokens(index, "val")["input.txt"]
    assert train[-1] == EOT_TOKEN_ID and val[-1] == EOT_TOKEN_ID  # both parts stay delimited
    assert train[:-1] + val[:-1] == get_tokenizer().encode_ordinary(OWN_TEXT)  # kept whole, cut once
    assert len(val[:-1]) / (len(train) + len(val) - 2) == pytest.approx(0.1, abs=0.005)
    assert "warning" not in output


def test_a_file_named_as_the_source_is_the_whole_corpus_and_editing_it_rebuilds(tmp_path):
    source = own_corpus(tmp_path, {"input.txt": OWN_TEXT, "other.txt": "Not read: only the named file is.\n"})
    cfg = config(tmp_path, str(source / "input.txt"))
    assert "1 of 1 text file had no Project Gutenberg header: kept whole (input.txt)" in output_of(cfg)
    index = ShardIndex.load(cfg.shard_dir, verify=True)
    assert [entry["path"] for entry in index.source_files] == ["input.txt"]
    tokens = document_tokens(index, "train")["input.txt"][:-1] + document_tokens(index, "val")["input.txt"][:-1]
    assert tokens == get_tokenizer().encode_ordinary(OWN_TEXT)
    assert data_is_ready(cfg)
    (source / "input.txt").write_text(OWN_TEXT + "More.\n", encoding="utf-8")
    assert not data_is_ready(cfg)
    assert "rebuilt because data.source changed: 1 changed (input.txt)" in output_of(cfg)


def test_auto_holds_out_whole_books_only_from_twenty_documents_or_for_downloads(tmp_path):
    source = own_corpus(tmp_path, {f"part{n:02d}.txt": f"Part {n}.\n" for n in range(20)})
    assert data_settings(config(tmp_path, source))["val_split"] == "books"
    assert data_settings(config(tmp_path, source, max_books=19))["val_split"] == "tail"
    (source / "part00.txt").unlink()
    assert data_settings(config(tmp_path, source))["val_split"] == "tail"
    assert data_settings(config(tmp_path, source, val_split="books"))["val_split"] == "books"
    assert data_settings(config(tmp_path, "gutenberg", book_ids=[11]))["val_split"] == "books"


def test_gutenberg_downloads_still_hold_out_whole_stripped_books(tmp_path, books):
    """source gutenberg (here from a mirror directory) resolves to books: today's shards, token for token."""
    cfg = config(tmp_path, "gutenberg", mirror=str(books), book_ids=[11, 12, 13, 14])
    index = ShardIndex.load(prepare_data(cfg, console=quiet()), verify=True)
    assert index.settings["val_split"] == "books" and index.source_files == []
    val_ids = choose_val_books([11, 12, 13, 14], cfg.val_frac, cfg.split_seed)
    encoding = get_tokenizer()
    for split in ("train", "val"):
        assert {document.id for document in index.splits[split].documents} == (
            val_ids if split == "val" else {11, 12, 13, 14} - val_ids)
        stream, starts = split_tokens(index, split), shard_starts(index.splits[split])
        for document in index.splits[split].documents:
            text = strip_gutenberg((books / f"pg{document.id}.txt").read_text())
            start = starts[document.shard] + document.offset
            assert stream[start : start + document.length].tolist() == encoding.encode_ordinary(text) + [EOT_TOKEN_ID]


def test_a_touched_file_is_up_to_date_without_a_rebuild(tmp_path):
    source, cfg = two_file_corpus(tmp_path)
    prepare_data(cfg, console=quiet())
    shards = shard_mtimes(tmp_path)
    before = ShardIndex.load(cfg.shard_dir)
    stat = (source / "a.txt").stat()
    os.utime(source / "a.txt", ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    assert not data_is_ready(cfg)  # a stat differs: launchers call prepare_data
    assert source_content_fingerprint(cfg) == before.content_fingerprint  # the bytes did not change
    assert "up to date" in output_of(cfg)
    assert shard_mtimes(tmp_path) == shards
    assert data_is_ready(cfg)
    assert ShardIndex.load(cfg.shard_dir).fingerprint == before.fingerprint


def test_an_edited_added_or_removed_file_rebuilds_and_is_named(tmp_path):
    source = own_corpus(tmp_path, {"a.txt": OWN_TEXT, "b.txt": OWN_TEXT[:2000], "notes/c.txt": "Short notes.\n"})
    cfg = config(tmp_path, source)
    prepare_data(cfg, console=quiet())
    content = ShardIndex.load(cfg.shard_dir).content_fingerprint
    (source / "b.txt").write_text(OWN_TEXT[:1999] + "!", encoding="utf-8")  # same size, other bytes
    (source / "d.txt").write_text("A new file.\n", encoding="utf-8")
    (source / "notes" / "c.txt").unlink()
    assert not data_is_ready(cfg)
    assert source_content_fingerprint(cfg) != content
    output = output_of(cfg)
    assert "built" in output
    assert "rebuilt because data.source changed: 1 added (d.txt), 1 removed (notes/c.txt), 1 changed (b.txt)" in output
    assert data_is_ready(cfg)
    assert "Short notes" not in get_tokenizer().decode(split_tokens(ShardIndex.load(cfg.shard_dir), "train").tolist())


def test_titles_of_local_files_are_their_paths_and_books_mode_lists_the_val_documents(tmp_path, books):
    source = own_corpus(tmp_path, {"notes/mine.txt": OWN_TEXT})
    for path in books.iterdir():
        (source / path.name).write_bytes(path.read_bytes())
    (source / "cover.jpg").write_bytes(b"\xff\xd8")
    cfg = config(tmp_path, source, val_split="books", val_frac=0.2)
    output = output_of(cfg)
    index = ShardIndex.load(cfg.shard_dir)
    titles = {document.id: document.title for split in index.splits.values() for document in split.documents}
    assert sorted(titles.values()) == ["BOOK 11", "BOOK 12", "BOOK 13", "BOOK 14", "notes/mine.txt"]
    val_titles = ", ".join(titles[document.id] for document in index.splits["val"].documents)
    assert f"val split books: 1 of 5 documents: {val_titles}; val holds" in output
    assert "neither .txt nor .jsonl, so skipped: 1 file (cover.jpg)" in output
    assert "1 of 5 text files had no Project Gutenberg header: kept whole (notes/mine.txt)" in output


def test_a_val_split_far_below_val_frac_is_warned_about_in_one_line(tmp_path):
    documents = [("train", 1, "long.txt", list(range(990))), ("val", 2, "notes.txt", list(range(10)))]
    index = write_shards(tmp_path, documents, tokenizer="t", vocab_size=1000, shard_tokens=1000, fingerprint="f",
                         settings={"val_split": "books", "val_frac": 0.1})
    lines = split_lines(index, 0.1)
    assert lines[0] == "val split books: 1 of 2 documents: notes.txt; val holds 1.0% of the tokens (data.val_frac 0.1)"
    assert len(lines) == 2 and "under a third of data.val_frac 0.1: --data.val_split tail" in lines[1]


def test_a_val_split_far_above_val_frac_says_why_and_how_to_hold_out_exactly_val_frac(tmp_path):
    documents = [("train", 1, "short.txt", list(range(700))), ("val", 2, "war-and-peace.txt", list(range(300)))]
    index = write_shards(tmp_path, documents, tokenizer="t", vocab_size=1000, shard_tokens=1000, fingerprint="f",
                         settings={"val_split": "books", "val_frac": 0.1})
    lines = split_lines(index, 0.1)
    assert len(lines) == 2 and lines[1].startswith("note: val holds 30.0% of the tokens, over twice data.val_frac "
                                                   "0.1: whole documents are held out by count")
    assert len(split_lines(index, 0.2)) == 1  # 30% against a val_frac of 20%: not far off, no note


def test_a_non_gutenberg_file_ending_like_a_gutenberg_footer_is_kept_whole(tmp_path):
    text = OWN_TEXT + "\nEnd of the Project Gutenberg discussion, now our results.\nResult one.\r\nResult two.\n"
    source = own_corpus(tmp_path, {"minutes.txt": text})
    cfg = config(tmp_path, source)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no GutenbergStripWarning per file
        output = output_of(cfg)
    index = ShardIndex.load(cfg.shard_dir)
    tokens = document_tokens(index, "train")["minutes.txt"][:-1] + document_tokens(index, "val")["minutes.txt"][:-1]
    assert get_tokenizer().decode(tokens) == text  # byte for byte, CRLF included
    assert "1 of 1 text file had no Project Gutenberg header: kept whole (minutes.txt)" in output


def test_utf16_and_utf8_byte_order_marks_are_decoded(tmp_path):
    text = "Grüße aus Köln, 東京から。\n" * 3
    (tmp_path / "utf16.txt").write_bytes(text.encode("utf-16"))
    (tmp_path / "utf8bom.txt").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    assert read_book(tmp_path / "utf16.txt") == (text, "utf-16")
    assert read_book(tmp_path / "utf8bom.txt") == (text, "utf-8-sig")
    source = own_corpus(tmp_path, {})
    source.mkdir()
    (source / "utf16.txt").write_bytes(text.encode("utf-16"))
    index = ShardIndex.load(prepare_data(config(tmp_path, source, val_frac=0.3), console=quiet()))
    tokens = document_tokens(index, "train")["utf16.txt"][:-1] + document_tokens(index, "val")["utf16.txt"][:-1]
    assert tokens == get_tokenizer().encode_ordinary(text)


def test_a_file_with_nul_bytes_is_refused_by_name(tmp_path):
    source = own_corpus(tmp_path, {"fine.txt": OWN_TEXT})
    (source / "wide.txt").write_bytes("no byte-order mark".encode("utf-16-le"))
    with pytest.raises(PrepareError, match=r"wide\.txt is not text tml can read: it holds NUL bytes \(the first at "
                                           r"offset 1\): .*UTF-16/UTF-32 without a byte-order mark; convert it to UTF-8"):
        prepare_data(config(tmp_path, source), console=quiet())
    assert not (tmp_path / "shards" / INDEX_FILE).exists()


def test_latin1_files_of_a_local_source_are_named_in_one_notice(tmp_path):
    source = own_corpus(tmp_path, {"new.txt": OWN_TEXT})
    (source / "old.txt").write_bytes("Café crème, à la française.\n".encode("latin-1") * 20)
    output = output_of(config(tmp_path, source))
    assert "not UTF-8, so read as Latin-1: 1 file (old.txt)" in output
    assert read_book(source / "old.txt")[0].startswith("Café crème")


def test_a_corpus_too_small_to_split_is_refused_instead_of_an_empty_split(tmp_path):
    source = own_corpus(tmp_path, {"tiny.txt": "Hi there"})
    with pytest.raises(PrepareError, match="val split of data.source=.* is empty"):
        prepare_data(config(tmp_path, source, val_frac=0.1), console=quiet())
    assert not (tmp_path / "shards" / INDEX_FILE).exists()
    assert not list((tmp_path / "shards").glob("*.bin"))  # no shard of the refused build
    with pytest.raises(PrepareError, match="val_split=books holds out whole files.*gives 1: use --data.val_split tail"):
        prepare_data(config(tmp_path, source, val_split="books"), console=quiet())


def test_a_refused_empty_split_leaves_the_previous_shards_as_they_were(tmp_path):
    source = own_corpus(tmp_path, {"story.txt": OWN_TEXT})
    prepare_data(config(tmp_path, source), console=quiet())
    shard_dir = tmp_path / "shards"
    def data_set() -> dict[str, bytes]:  # not prepare.lock, which names its latest holder
        return {path.name: path.read_bytes() for path in shard_dir.iterdir() if path.name != prepare.PREPARE_LOCK}

    before = data_set()
    (source / "story.txt").write_text("Hi there")
    with pytest.raises(PrepareError, match="val split of data.source=.* is empty"):
        prepare_data(config(tmp_path, source), console=quiet())
    assert data_set() == before  # the index and the shards of the good corpus, not the refused one's (nor its build)


PREPARE_IN_A_CHILD = """
import dataclasses, json, sys
from rich.console import Console
from tml.data.config import DataConfig
from tml.data.prepare import prepare_data
prepare_data(DataConfig(**json.loads(sys.argv[1])), console=Console(width=200))
"""


@pytest.mark.timeout(120)
def test_two_preparations_of_one_shard_dir_take_turns_and_the_second_finds_it_up_to_date(tmp_path):
    source = own_corpus(tmp_path, {"a.txt": OWN_TEXT * 10, "b.txt": OWN_TEXT})
    cfg = config(tmp_path, source, shard_tokens=300)  # several shards a split: unlocked writers would interleave
    shard_dir = Path(cfg.shard_dir)
    shard_dir.mkdir()
    leftover = shard_dir / "train_00000.bin.999999.tmp"  # from a crashed build: cleared under the lock
    leftover.write_bytes(b"\x00" * 10)
    with prepare.hold_prepare_lock(shard_dir, quiet()):  # held here until both children wait for it
        children = [subprocess.Popen([sys.executable, "-c", PREPARE_IN_A_CHILD, json.dumps(dataclasses.asdict(cfg))],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
        first_lines = [child.stdout.readline() for child in children]
    outputs = [line + child.communicate(timeout=100)[0] for line, child in zip(first_lines, children, strict=True)]
    assert [child.returncode for child in children] == [0, 0], outputs
    holder = f"pid {os.getpid()} on host {socket.gethostname()}, since "
    assert all(line.startswith(f"tml-prepare: waiting for the other preparation of {shard_dir} ({holder}")
               for line in first_lines), first_lines
    assert sorted("tml-prepare: built in" in output for output in outputs) == [False, True]
    assert sorted("tml-prepare: up to date in" in output for output in outputs) == [False, True]
    ShardIndex.load(shard_dir, verify=True)
    assert data_is_ready(cfg) and not list(shard_dir.glob("*.tmp"))
    assert (shard_dir / prepare.PREPARE_LOCK).is_file()


def test_a_same_size_edit_that_keeps_the_mtime_is_noticed_by_its_ctime(tmp_path):
    source, cfg = two_file_corpus(tmp_path)
    prepare_data(cfg, console=quiet())
    before = (source / "b.txt").stat()
    (source / "b.txt").write_text(OWN_TEXT[:1999] + "!", encoding="utf-8")  # sed, then touch -r
    os.utime(source / "b.txt", ns=(before.st_atime_ns, before.st_mtime_ns))
    after = (source / "b.txt").stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert not data_is_ready(cfg)
    assert "rebuilt because data.source changed: 1 changed (b.txt)" in output_of(cfg)
    assert data_is_ready(cfg)


def test_a_build_directory_left_by_a_killed_rebuild_goes_even_when_the_shards_are_up_to_date(tmp_path):
    source, cfg = two_file_corpus(tmp_path)
    prepare_data(cfg, console=quiet())
    leftover = tmp_path / "shards" / ".build-999999"  # a rebuild killed with SIGKILL
    leftover.mkdir()
    (leftover / "train_00000.bin.999999.tmp").write_bytes(b"\x00" * 100)
    assert "up to date" in output_of(cfg)
    assert not leftover.exists()


def test_shards_that_no_longer_match_their_index_are_rebuilt_saying_why(tmp_path):
    source, cfg = two_file_corpus(tmp_path)
    prepare_data(cfg, console=quiet())
    shard = tmp_path / "shards" / "train_00000.bin"
    shard.write_bytes(shard.read_bytes()[:100])  # truncated by a full disk or a bad copy
    output = " ".join(output_of(cfg).split())
    assert f"rebuilt because the shards there were unusable: {shard} is 100 bytes but index.json says" in output
    ShardIndex.load(tmp_path / "shards", verify=True)


def test_a_corpus_moved_to_another_path_keeps_its_shards(tmp_path):
    """Where the text lies is no input: a copy elsewhere (another machine's path, new ctimes) is hashed, found to
    be the same books and kept, and the index remembers the new place."""
    source, cfg = two_file_corpus(tmp_path)
    prepare_data(cfg, console=quiet())
    shards = shard_mtimes(tmp_path)
    moved = tmp_path / "cluster" / "own"
    shutil.copytree(source, moved)
    cfg = config(tmp_path, moved)
    assert not data_is_ready(cfg)  # the listing's ctimes differ: hashing decides
    assert "up to date" in output_of(cfg)
    assert shard_mtimes(tmp_path) == shards
    assert ShardIndex.load(tmp_path / "shards").source_path == str(moved) and data_is_ready(cfg)


def test_shards_whose_corpus_is_not_here_are_ready_and_say_so(tmp_path):
    source, cfg = two_file_corpus(tmp_path)
    prepare_data(cfg, console=quiet())
    assert shards_without_source(cfg) is None  # the text is here
    typo = config(tmp_path, tmp_path / "onw")  # a mistyped path while the text the shards hold is here
    assert not data_is_ready(typo) and shards_without_source(typo) is None
    shutil.rmtree(source)
    assert data_is_ready(cfg)
    assert shards_without_source(cfg) == (f"data.source {source} is not on this machine: training on the shards in "
                                          f"{cfg.shard_dir}, built from {source}")
    assert not data_is_ready(config(tmp_path, source, val_frac=0.5))  # shards built another way are not these
    assert "up to date" in output_of(cfg) and "is not on this machine" in output_of(cfg)  # tml-prepare agrees


def test_an_index_written_before_paths_stopped_being_inputs_is_recorded_anew_not_rebuilt(tmp_path):
    source, cfg = two_file_corpus(tmp_path)
    prepare_data(cfg, console=quiet())
    index_path = tmp_path / "shards" / INDEX_FILE
    values = json.loads(index_path.read_text())
    values["settings"]["source"] = str(source)  # as earlier versions recorded it, with their fingerprint
    values["fingerprint"] = prepare.inputs_fingerprint(values["settings"], prepare.gather_books(cfg))
    del values["source_path"]
    index_path.write_text(json.dumps(values))
    assert data_is_ready(cfg)  # the same files, read the new way
    shards = shard_mtimes(tmp_path)
    assert "up to date" in output_of(cfg, force=False)
    assert shard_mtimes(tmp_path) == shards
    index = ShardIndex.load(tmp_path / "shards")
    assert index.settings["source"] == "local" and index.source_path == str(source)


def test_a_garbled_index_is_rebuilt_saying_why(tmp_path):
    source, cfg = two_file_corpus(tmp_path)
    prepare_data(cfg, console=quiet())
    (tmp_path / "shards" / INDEX_FILE).write_bytes(b"\xff" * 64)  # not even UTF-8
    output = " ".join(output_of(cfg).split())
    assert "rebuilt because the shards there were unusable:" in output and "is not a tml shard index" in output
    ShardIndex.load(tmp_path / "shards", verify=True)


def test_an_index_listed_without_ctimes_is_rehashed_once_and_keeps_its_shards(tmp_path):
    source, cfg = two_file_corpus(tmp_path)
    prepare_data(cfg, console=quiet())
    index_path = tmp_path / "shards" / INDEX_FILE
    values = json.loads(index_path.read_text())
    for entry in values["source_files"]:
        del entry["ctime_ns"]  # as written before the listing had ctimes
    index_path.write_text(json.dumps(values))
    shards = shard_mtimes(tmp_path)
    assert not data_is_ready(cfg)
    assert source_content_fingerprint(cfg) == values["content_fingerprint"]
    assert "up to date" in output_of(cfg)
    assert shard_mtimes(tmp_path) == shards
    assert data_is_ready(cfg)


def test_windows_text_is_read_as_cp1252_unless_it_leaves_a_byte_undefined(tmp_path):
    windows = tmp_path / "windows.txt"
    windows.write_bytes(b"\x93Quoted\x94 \x96 it\x92s \x80 5, caf\xe9\n")
    assert read_book(windows) == ("\u201cQuoted\u201d \u2013 it\u2019s \u20ac 5, caf\u00e9\n", "cp1252")
    undefined = tmp_path / "undefined.txt"  # 0x81 has no cp1252 character
    undefined.write_bytes(b"\x93Quoted\x94 \x81\n")
    assert read_book(undefined) == ("\x93Quoted\x94 \x81\n", "latin-1")
    plain = tmp_path / "plain.txt"
    plain.write_bytes("Café crème\n".encode("latin-1"))
    assert read_book(plain) == ("Café crème\n", "latin-1")


def strict_utf8_console() -> Console:
    """A console that, like a UTF-8 terminal, refuses text that is not valid Unicode (StringIO accepts anything)."""
    return Console(file=io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict"), width=200)


def console_text(console: Console) -> str:
    console.file.flush()
    return console.file.buffer.getvalue().decode("utf-8")


def test_a_file_name_that_is_not_utf8_is_prepared_and_shown_escaped(tmp_path):
    source = own_corpus(tmp_path, {"plain.txt": OWN_TEXT})
    (source / os.fsdecode(b"caf\xe9.txt")).write_text(OWN_TEXT[:3000], encoding="utf-8")
    (source / os.fsdecode(b"men\xfa.png")).write_bytes(b"\x89PNG")
    console = strict_utf8_console()
    cfg = config(tmp_path, source)
    prepare_data(cfg, console=console)
    output = console_text(console)
    assert "kept whole (caf\\xe9.txt, plain.txt)" in output
    assert "neither .txt nor .jsonl, so skipped: 1 file (men\\xfa.png)" in output
    index = ShardIndex.load(cfg.shard_dir, verify=True)
    assert sorted(document.title for document in index.splits["train"].documents) == ["caf\\xe9.txt", "plain.txt"]


def test_byte_identical_files_are_named_in_one_notice_and_both_kept(tmp_path):
    source = own_corpus(tmp_path, {"b.txt": OWN_TEXT, "copy/a.txt": OWN_TEXT, "other.txt": OWN_TEXT[:3000]})
    cfg = config(tmp_path, source)
    output = output_of(cfg)
    assert "byte-identical files, each kept as a document: 1 group (b.txt = copy/a.txt); with val_split books" in output
    index = ShardIndex.load(cfg.shard_dir)
    assert len(index.splits["train"].documents) == 3


def test_empty_files_are_named_in_one_notice(tmp_path):
    source = own_corpus(tmp_path, {"text.txt": OWN_TEXT, "z.txt": "", "blank/lines.txt": "\n \n"})
    output = output_of(config(tmp_path, source))
    assert "no text, so only a document separator: 2 files (blank/lines.txt, z.txt)" in output


def test_a_dangling_symlink_is_named_in_a_skipped_notice(tmp_path):
    source = own_corpus(tmp_path, {"text.txt": OWN_TEXT})
    (source / "gone.txt").symlink_to(tmp_path / "moved-away.txt")
    output = output_of(config(tmp_path, source))
    assert "symbolic links to nothing, so skipped: 1 link (gone.txt)" in output


def test_notices_list_file_names_sorted_not_in_id_order(tmp_path):
    source = own_corpus(tmp_path, {"pg9.txt": OWN_TEXT, "b.txt": OWN_TEXT[:3000], "a.txt": OWN_TEXT[:2000]})
    assert list(local_book_paths(config(tmp_path, source)).values())[0].name == "pg9.txt"  # id 9 comes first
    output = output_of(config(tmp_path, source))
    assert "3 of 3 text files had no Project Gutenberg header: kept whole (a.txt, b.txt, pg9.txt)" in output


def test_files_read_as_latin1_and_cp1252_share_one_notice(tmp_path):
    source = own_corpus(tmp_path, {"new.txt": OWN_TEXT})
    (source / "windows.txt").write_bytes(b"\x93Quoted\x94 it\x92s fine.\n" * 20)
    (source / "old.txt").write_bytes("Caf\u00e9 cr\u00e8me.\n".encode("latin-1") * 20)
    output = output_of(config(tmp_path, source))
    assert ("not UTF-8, so read as cp1252: 1 file (windows.txt); as Latin-1: 1 file (old.txt); convert them to UTF-8"
            in output)


def test_help_shows_the_data_section_it_reads_and_says_the_others_are_accepted(capsys, tmp_path):
    assert prepare.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--data.shard_dir" in out and "--force" in out
    assert "--train." not in out and "--model." not in out
    assert "model, train and log sections" in " ".join(out.split())
    # ... and they are accepted: a run's own command line prepares its data (here: refused for its source only)
    assert prepare.main(["--model.n_layer", "3", "--train.lr", "0.1", "--data.source",
                         str(tmp_path / "absent")]) == 1
    assert "absent" in capsys.readouterr().err
