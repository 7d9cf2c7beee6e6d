"""prepare_data turns a directory of books or of your own text into shards once, and again only when an input changes."""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
import pytest
from rich.console import Console

from tml.data import prepare
from tml.data.clean import strip_gutenberg
from tml.data.config import DataConfig
from tml.data.packed import PackedDataset
from tml.data.prepare import (
    PrepareError,
    data_is_ready,
    data_settings,
    main,
    prepare_data,
    read_book,
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


def test_second_run_with_same_inputs_rebuilds_nothing(tmp_path, books):
    cfg = config(tmp_path, books)
    assert not data_is_ready(cfg)
    prepare_data(cfg, console=quiet())
    assert data_is_ready(cfg)
    written = {path.name: path.stat().st_mtime_ns for path in (tmp_path / "shards").iterdir()}
    output = quiet()
    prepare_data(cfg, console=output)
    assert "up to date" in output.file.getvalue()
    assert {path.name: path.stat().st_mtime_ns for path in (tmp_path / "shards").iterdir()} == written


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
    source = own_corpus(tmp_path, {"a.txt": OWN_TEXT, "b.txt": OWN_TEXT[:2000]})
    cfg = config(tmp_path, source)
    prepare_data(cfg, console=quiet())
    shards = {path.name: path.stat().st_mtime_ns for path in (tmp_path / "shards").glob("*.bin")}
    before = ShardIndex.load(cfg.shard_dir)
    stat = (source / "a.txt").stat()
    os.utime(source / "a.txt", ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    assert not data_is_ready(cfg)  # a stat differs: launchers call prepare_data
    assert source_content_fingerprint(cfg) == before.content_fingerprint  # the bytes did not change
    assert "up to date" in output_of(cfg)
    assert {path.name: path.stat().st_mtime_ns for path in (tmp_path / "shards").glob("*.bin")} == shards
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
    assert "not .txt, so skipped: 1 file (cover.jpg)" in output
    assert "1 of 5 files had no Project Gutenberg header: kept whole (notes/mine.txt)" in output


def test_a_val_split_far_below_val_frac_is_warned_about_in_one_line(tmp_path):
    documents = [("train", 1, "long.txt", list(range(990))), ("val", 2, "notes.txt", list(range(10)))]
    index = write_shards(tmp_path, documents, tokenizer="t", vocab_size=1000, shard_tokens=1000, fingerprint="f",
                         settings={"val_split": "books", "val_frac": 0.1})
    lines = split_lines(index, 0.1)
    assert lines[0] == "val split books: 1 of 2 documents: notes.txt; val holds 1.0% of the tokens (data.val_frac 0.1)"
    assert len(lines) == 2 and "under a third of data.val_frac 0.1: --data.val_split tail" in lines[1]


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
    assert "1 of 1 files had no Project Gutenberg header: kept whole (minutes.txt)" in output


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
    with pytest.raises(PrepareError, match=r"wide\.txt holds NUL bytes: .*UTF-16/UTF-32 without a byte-order mark; "
                                           r"convert it to UTF-8"):
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
    with pytest.raises(PrepareError, match="val_split=books holds out whole documents.*gives 1: use --data.val_split tail"):
        prepare_data(config(tmp_path, source, val_split="books"), console=quiet())
