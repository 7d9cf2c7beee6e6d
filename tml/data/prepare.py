"""`tml-prepare`: books -> clean text -> GPT-2 tokens -> shards, once.

The inputs (every book's sha256, the cleaning code, the tokenizer files, the split and shard settings) are
hashed into a fingerprint stored in the index: a second run with the same inputs returns at once, and any
change rebuilds. Books are read, cleaned and encoded a bounded batch at a time, and a big file in parts (a .txt
file of your own: tml/data/text_files.py; a JSON Lines file: tml/data/jsonl.py), so memory does not grow with the
corpus or with its files, only with its largest Gutenberg book or JSON Lines record.

A local directory may hold your own text as well as Gutenberg books: .txt files (each a document; only those that
open like a Gutenberg file are stripped) and .jsonl files (each record a document: tml/data/jsonl.py). Validation
holds out whole files or, for a corpus of a few files, the tail of each (data.val_split). The index also lists the
directory's files (path, size, mtime, ctime), so data_is_ready notices an edited corpus without reading it, and a
file that was only touched keeps its shards.

Preparations of one shard_dir (two launches started together on a fresh corpus) take turns on the exclusive lock
`<shard_dir>/prepare.lock`: the second waits, then finds the shards the first built up to date.
"""

from __future__ import annotations

import codecs
import contextlib
import fcntl
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from tml.config import GUTENBERG_SOURCE, ConfigError, build_parser, load_config
from tml.data import clean
from tml.data.clean import has_gutenberg_header, strip_gutenberg
from tml.data.config import AUTO_MIN_BOOKS, DataConfig
from tml.data.gutenberg import (
    Book,
    GutenbergError,
    books_from_directory,
    dangling_links,
    display_name,
    gather_books,
    local_book_paths,
    printable,
    skipped_files,
    source_root,
)
from tml.data.jsonl import SURROGATES_REPLACED, JsonlError, is_jsonl, jsonl_parts, lines_shown
from tml.data.shards import (
    FORMAT_VERSION,
    INDEX_FILE,
    SHARD_DTYPE,
    ShardError,
    ShardIndex,
    SplitIndex,
    choose_val_books,
    remove_temporaries,
    write_shards,
)
from tml.data.text_files import LATIN_1, NotText, decode_text, text_encoding, text_parts
from tml.data.tokenizer import GPT2_FILES, TOKENIZER_NAME, TokenizerError, encode_documents, get_tokenizer
from tml.files import file_sha256, write_failure
from tml.locks import NO_FLOCK_ERRNOS, open_lock_file, read_holder, write_holder

LOCAL_SOURCE = "local"  # data_settings' source for a directory or file of your own text
PREPARE_VERSION = 1  # bump when the way documents become tokens changes (e.g. the separator), to force rebuilds
# Text encoded per tiktoken batch: large enough that every thread stays busy (the batch's longest book is
# encoded first), small enough to bound the text and tokens held at once (~2M tokens, ~8 MB of uint32).
ENCODE_BATCH_CHARS = 8_000_000
# A JSON Lines file is read and tokenized in parts of about this many characters, so memory stays bounded by a part
# whatever the file's size. With val_split "tail" each part gives its last val_frac of tokens to val: changing this
# moves the split, so bump PREPARE_VERSION with it.
JSONL_PART_CHARS = 8_000_000
# A local .txt file bigger than this many bytes that does not open like a Gutenberg file is read in parts of about
# this many characters (tml/data/text_files.py), its tokens exactly the whole file's: the split and the shards are
# those of reading it whole, so this may change freely. A quarter of ENCODE_BATCH_CHARS, so a batch's parts keep
# several threads busy. Gutenberg books are read whole: their footer is at the end.
TEXT_PART_CHARS = 2_000_000
SPILL_READ_TOKENS = 1 << 22  # tokens read back at a time from a TokenSpill (16 MB)
# Names listed in a one-line notice before "and N more": enough to find the files, short enough to read.
SHOWN_NAMES = 5
# A val split under this share of val_frac (one small book held out of a few) is worth a warning.
LOW_VAL_SHARE = 1 / 3
# Whole books are held out by count, so a few long ones can hold far more than val_frac of the tokens (War and
# Peace among 20 books: 28%); past this multiple of val_frac, prepare says so and how to hold out exactly val_frac.
HIGH_VAL_SHARE = 2.0
ENCODING_LABELS = {LATIN_1: "Latin-1"}  # how the not-UTF-8 notice names an encoding, where not by its codec name
# What data_is_ready compares of each source file: a stat, no read. ctime because an edit that keeps size and
# mtime (sed, then touch -r) still moves it; a changed stat only leads to a re-hash, never by itself to a rebuild.
LISTED_STAT = ("path", "bytes", "mtime_ns", "ctime_ns")
PREPARE_LOCK = "prepare.lock"  # in shard_dir; not an input: index.json and the shards do not depend on it


class PrepareError(RuntimeError):
    """The source gave nothing to train on, or a file tml cannot read as text."""


def is_local(cfg: DataConfig) -> bool:
    return cfg.source != "gutenberg"


def source_listing(cfg: DataConfig) -> list[dict[str, Any]]:
    """Path under data.source, size, mtime and ctime of each .txt or .jsonl file a local source contributes ([] for
    downloads): a stat per file, so launchers notice an edited corpus without reading it."""
    if not is_local(cfg):
        return []
    try:
        root = source_root(cfg)
        paths = local_book_paths(cfg)
    except GutenbergError:  # no such directory: prepare_data says so
        return []
    listing = []
    for path in paths.values():
        stat = path.stat()
        listing.append({"path": display_name(path, root), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                        "ctime_ns": stat.st_ctime_ns})
    return sorted(listing, key=lambda entry: entry["path"])


def source_path(cfg: DataConfig) -> str:
    """Where a local source was read from, absolute ("" for downloads): kept in the index, not an input
    (shards_stand_alone and the messages read it)."""
    return str(Path(cfg.source).expanduser().resolve()) if is_local(cfg) else ""


def resolved_val_split(cfg: DataConfig, documents: int) -> str:
    """"books" or "tail": auto holds out whole books only when there are enough for their share to land near val_frac."""
    if cfg.val_split != "auto":
        return cfg.val_split
    return "books" if not is_local(cfg) or documents >= AUTO_MIN_BOOKS else "tail"


def data_settings(cfg: DataConfig, listing: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The config values and code versions the shards depend on; equal settings mean the shards are current
    unless a book's bytes changed, which only `prepare_data` checks (it has to read the books).
    `listing` is source_listing(cfg) when the caller has it (auto's choice counts a local source's files)."""
    from_network = not is_local(cfg)
    listing = source_listing(cfg) if listing is None else listing
    # Which field of a .jsonl record is read decides the text; a corpus without one keeps the settings it had.
    text_field = {"text_field": cfg.text_field} if any(is_jsonl(entry["path"]) for entry in listing) else {}
    return {
        # Where local text lies is no input: a corpus moved or copied elsewhere is the same data (its files' names
        # and bytes are compared, and hashed into the fingerprint, instead).
        "source": GUTENBERG_SOURCE if from_network else LOCAL_SOURCE,
        "book_ids": [int(book_id) for book_id in cfg.book_ids] if from_network else None,
        "max_books": cfg.max_books,
        "val_frac": cfg.val_frac,
        "val_split": resolved_val_split(cfg, len(listing)),
        "split_seed": cfg.split_seed,
        "shard_tokens": cfg.shard_tokens,
        **text_field,
        "code": {
            "prepare": PREPARE_VERSION,
            "format": FORMAT_VERSION,
            # a fix to header stripping changes the text, so the cleaning code itself is an input
            "clean": file_sha256(Path(clean.__file__)),
            "tokenizer": {name: expected for name, (_, expected) in GPT2_FILES.items()},
        },
    }


def inputs_fingerprint(settings: dict[str, Any], books: Sequence[Book]) -> str:
    values = {"settings": settings, "books": [[book.id, book.sha256] for book in books]}
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


def content_fingerprint(books: Sequence[Book], text_field: str) -> str:
    """The books' ids and bytes alone (and which field of a .jsonl record is read, when one is): what a checkpoint's
    data position depends on beyond the config."""
    values: list[Any] = [[book.id, book.sha256] for book in books]
    if any(is_jsonl(book.path) for book in books):
        values.append({"text_field": text_field})
    return hashlib.sha256(json.dumps(values).encode()).hexdigest()


def listed_stats(source_files: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The LISTED_STAT of each entry; a key an older index lacks reads as None, so its files are re-hashed once."""
    return [{key: entry.get(key) for key in LISTED_STAT} for entry in source_files]


def data_is_ready(cfg: DataConfig) -> bool:
    """Cheap check for launchers: a valid index built from these settings, and (local source) from files with
    the same names, sizes, mtimes and ctimes, exists (no book is read). Shards copied to a machine without the
    text they were built from stand alone (shards_without_source says so)."""
    index = ShardIndex.load_or_none(cfg.shard_dir)
    if index is None:
        return False
    settings = settings_recorded_now(index.settings)
    if shards_stand_alone(cfg, index):
        return settings == data_settings(cfg, index.source_files)
    listing = source_listing(cfg)
    return settings == data_settings(cfg, listing) and listed_stats(index.source_files) == listing


def settings_recorded_now(settings: dict[str, Any]) -> dict[str, Any]:
    """An index's settings in today's form: an index written before a local source's path stopped being an input
    holds that path as its `source`."""
    if settings.get("source") in (GUTENBERG_SOURCE, LOCAL_SOURCE):
        return settings
    return {**settings, "source": LOCAL_SOURCE}


def built_from(index: ShardIndex) -> str:
    """Where the index's local text was read from ("" when downloaded or not recorded)."""
    recorded = index.settings.get("source")
    return index.source_path or (recorded if recorded not in (None, GUTENBERG_SOURCE, LOCAL_SOURCE) else "")


def shards_stand_alone(cfg: DataConfig, index: ShardIndex) -> bool:
    """Shards copied to a machine without their text: neither the local data.source nor the text they were built
    from is here. (When that text is here, a data.source that is not is a wrong path, which prepare refuses.)"""
    origin = built_from(index)
    return is_local(cfg) and not Path(cfg.source).expanduser().exists() and not (origin and Path(origin).exists())


def shards_without_source(cfg: DataConfig) -> str | None:
    """The line a start says when it trains on ready shards that stand alone (shards_stand_alone), else None."""
    index = ShardIndex.load_or_none(cfg.shard_dir)
    if index is None or not shards_stand_alone(cfg, index):
        return None
    origin = f", built from {built_from(index)}" if built_from(index) else ""
    return f"data.source {cfg.source} is not on this machine: training on the shards in {cfg.shard_dir}{origin}"


def indexed_jsonl(index: ShardIndex) -> list[str]:
    """The JSON Lines files among those the index's shards were built from."""
    return [entry["path"] for entry in index.source_files if is_jsonl(entry["path"])]


def read_field_as(index: ShardIndex, cfg: DataConfig) -> bool:
    """True when the index's .jsonl files, if any, were read as cfg reads them: records, by cfg.text_field. An index
    written before tml read .jsonl files as records holds no text_field: its .jsonl text was read as plain text."""
    return not indexed_jsonl(index) or index.settings.get("text_field") == cfg.text_field


def source_content_fingerprint(cfg: DataConfig) -> str | None:
    """content_fingerprint of the text cfg's shards hold, or will hold once prepared, without building them.

    The index's own when it is current; for a local source whose files changed since, hashed from the files
    (a `touch` keeps it). None when neither tells (no index, or no source directory to read).
    """
    index = ShardIndex.load_or_none(cfg.shard_dir)
    if index is not None and index.content_fingerprint and read_field_as(index, cfg) and (
        not is_local(cfg) or shards_stand_alone(cfg, index) or listed_stats(index.source_files) == source_listing(cfg)
    ):
        return index.content_fingerprint
    if not is_local(cfg):
        return None
    try:
        return content_fingerprint(books_from_directory(cfg), cfg.text_field)
    except GutenbergError:
        return None


def read_book(path: Path) -> tuple[str, str]:
    """decode_text of a corpus file; a file it refuses stops preparation, naming the file and the way out."""
    try:
        return decode_text(Path(path).read_bytes())
    except NotText as error:
        raise not_text(path, error) from error


def not_text(path: Path, error: NotText) -> PrepareError:
    return PrepareError(f"{path} is not text tml can read: {error}; convert it to UTF-8 (e.g. `iconv -f UTF-16LE -t "
                        "UTF-8`) or move it out of data.source")


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def shown(names: Sequence[str]) -> str:
    """`a, b, c` or `a, b, c, ... and 7 more`: a notice stays one line however many files it concerns."""
    listed = ", ".join(names[:SHOWN_NAMES])
    return listed + (f", ... and {len(names) - SHOWN_NAMES} more" if len(names) > SHOWN_NAMES else "")


@dataclass
class ReadNotes:
    """What reading a local source found, for one summary line each instead of a warning per file; each line
    lists its names sorted, so a file is easy to find in it."""

    text_files: int = 0  # files read as plain text (Gutenberg's or not)
    kept_whole: list[str] = field(default_factory=list)
    jsonl_files: int = 0
    jsonl_records: int = 0
    # `docs.jsonl lines 4, 9`: records whose lone surrogates were replaced by U+FFFD (tml/data/jsonl.py).
    repaired: list[str] = field(default_factory=list)
    # Files that were not UTF-8, by the encoding read_book fell back to (Latin-1, cp1252).
    not_utf8: dict[str, list[str]] = field(default_factory=dict)
    # Documents without a word: each adds only an <|endoftext|> separator.
    empty: list[str] = field(default_factory=list)
    # Names by content: two names under one sha256 are copies, and with val_split books one may land in val.
    by_sha256: dict[str, list[str]] = field(default_factory=dict)
    dangling: list[str] = field(default_factory=list)

    def add_file(self, name: str, sha256: str, has_text: bool) -> None:
        """A local file read: copies are found by content, and a file without a word is named."""
        self.by_sha256.setdefault(sha256, []).append(name)
        if not has_text:
            self.empty.append(name)

    def add_text_file(self, name: str, sha256: str, encoding: str, kept_whole: bool, has_text: bool) -> None:
        """A .txt file read, whole or in parts: add_file, and its encoding and Gutenberg header as found."""
        self.add_file(name, sha256, has_text)
        self.text_files += 1
        if not encoding.startswith("utf"):
            self.not_utf8.setdefault(encoding, []).append(name)
        if kept_whole:
            self.kept_whole.append(name)

    def lines(self) -> list[str]:
        lines = []
        if self.kept_whole:
            lines.append(f"{len(self.kept_whole)} of {plural(self.text_files, 'text file')} had no Project Gutenberg "
                         f"header: kept whole ({shown(sorted(self.kept_whole))})")
        if self.jsonl_files:
            lines.append(f"{plural(self.jsonl_records, 'record')} from {plural(self.jsonl_files, 'JSON Lines file')}, "
                         "each record a document")
        if self.repaired:
            lines.append(f"{SURROGATES_REPLACED} {shown(sorted(self.repaired))}")
        if self.not_utf8:
            read_as = [f"{ENCODING_LABELS.get(encoding, encoding)}: {plural(len(names), 'file')} ({shown(sorted(names))})"
                       for encoding, names in sorted(self.not_utf8.items())]
            lines.append(f"not UTF-8, so read as {'; as '.join(read_as)}; convert them to UTF-8 if their text looks wrong")
        if self.empty:
            lines.append(f"no text, so only a document separator: {plural(len(self.empty), 'file')} "
                         f"({shown(sorted(self.empty))})")
        copies = sorted(sorted(names) for names in self.by_sha256.values() if len(names) > 1)
        if copies:
            lines.append(f"byte-identical files, each kept as a document: {plural(len(copies), 'group')} "
                         f"({shown([' = '.join(names) for names in copies])}); with val_split books a copy of a "
                         "training document may be held out for validation")
        if self.dangling:
            lines.append(f"symbolic links to nothing, so skipped: {plural(len(self.dangling), 'link')} "
                         f"({shown(sorted(self.dangling))})")
        return lines


def book_documents(books: Sequence[Book], cfg: DataConfig, notes: ReadNotes) -> Iterator[tuple[Book, list[str]]]:
    """Each file's documents to train on. Downloads are always stripped of Gutenberg's header and footer; a local
    .txt file only when it opens like a Gutenberg file, else it is kept exactly as read; a .jsonl file gives its
    records' text fields (data.text_field) as they are, one document each."""
    if is_local(cfg):
        root = source_root(cfg)
        notes.dangling = [display_name(path, root) for path in dangling_links(cfg)]
    for book in books:
        if is_local(cfg) and is_jsonl(book.path):
            yield from jsonl_book_parts(book, cfg, display_name(book.path, root), notes)
            continue
        if is_local(cfg) and book.bytes > TEXT_PART_CHARS:
            encoding = file_encoding(book.path)
            if not opens_like_gutenberg(book.path, encoding):
                yield from text_book_parts(book, encoding, display_name(book.path, root), notes)
                continue
        text, encoding = read_book(book.path)
        if not is_local(cfg):
            yield book, [strip_gutenberg(text, name=str(book.path))]
            continue
        kept_whole = not has_gutenberg_header(text)
        if not kept_whole:
            text = strip_gutenberg(text, name=str(book.path))
        notes.add_text_file(display_name(book.path, root), book.sha256, encoding, kept_whole, not is_blank(text))
        yield book, [text]


@dataclass(frozen=True)
class ContinuedBook(Book):
    """A part of a big file whose text goes on in the next part: no <|endoftext|> after its tokens."""


def file_encoding(path: Path) -> str:
    """text_encoding, refused as read_book refuses."""
    try:
        return text_encoding(path)
    except NotText as error:
        raise not_text(path, error) from error


def opens_like_gutenberg(path: Path, encoding: str) -> bool:
    """has_gutenberg_header on the start of the file, decoded as reading it whole would."""
    with open(path, "rb") as file:
        head = file.read(4 * clean.HEADER_PROBE_CHARS + 4)  # 4 bytes a character at most, and a byte-order mark
    return has_gutenberg_header(codecs.getincrementaldecoder(encoding)(errors="ignore").decode(head))


def text_book_parts(book: Book, encoding: str, name: str, notes: ReadNotes) -> Iterator[tuple[Book, list[str]]]:
    """A big .txt file of your own in parts of about TEXT_PART_CHARS characters, each a Book with the bytes read
    for it, all but the last a ContinuedBook: one document, whose tokens are the whole file's."""
    tokenizer = get_tokenizer()
    parts = changed_while_read(book.path, text_parts(book.path, encoding, TEXT_PART_CHARS,
                                                     lambda text: tokenizer.encode(text, disallowed_special=())))
    has_text = False
    part, part_bytes = next(parts)
    for following, following_bytes in parts:  # one part ahead: the last one ends the document
        has_text = has_text or not is_blank(part)
        yield ContinuedBook(**vars(replace(book, bytes=part_bytes))), [part]
        part, part_bytes = following, following_bytes
    has_text = has_text or not is_blank(part)
    yield replace(book, bytes=part_bytes), [part]
    notes.add_text_file(name, book.sha256, encoding, kept_whole=True, has_text=has_text)


def changed_while_read(path: Path, parts: Iterator[tuple[str, int]]) -> Iterator[tuple[str, int]]:
    """text_parts, with a decoding error (the file was written to after its encoding was decided) named."""
    try:
        yield from parts
    except UnicodeDecodeError as error:
        raise PrepareError(f"{path} changed while tml-prepare read it ({error}); run tml-prepare again once "
                           "nothing writes to it") from error


def is_blank(text: str) -> bool:
    return text == "" or text.isspace()


def jsonl_book_parts(book: Book, cfg: DataConfig, name: str, notes: ReadNotes) -> Iterator[tuple[Book, list[str]]]:
    """A JSON Lines file's records in parts of about JSONL_PART_CHARS characters, each a Book whose `bytes` are
    those of the file read for it (the progress bar's share). Its parts' tokens follow each other into one document
    of the index (SplitWriter.add), so the file is never held whole however big it is."""
    repaired: list[int] = []
    records = 0
    has_text = False
    try:
        for part, part_bytes in jsonl_parts(book.path, cfg.text_field, repaired, part_chars=JSONL_PART_CHARS):
            records += len(part)
            has_text = has_text or not all(is_blank(text) for text in part)
            yield replace(book, bytes=part_bytes), part or [""]  # no record: still a separator, as an empty .txt
    except JsonlError as error:
        raise PrepareError(f"{book.path}: {error} (or move the file out of data.source)") from error
    notes.add_file(name, book.sha256, has_text)
    notes.jsonl_files += 1
    notes.jsonl_records += records
    if repaired:
        notes.repaired.append(f"{name} {lines_shown(repaired)}")


def tail_start(body: int, val_frac: float) -> int:
    """Where the val tail of a document of `body` tokens (its <|endoftext|> not counted) starts."""
    return body - round(val_frac * body)


def split_tail(tokens: np.ndarray, val_frac: float) -> tuple[np.ndarray, np.ndarray | None]:
    """A document's head for train and its last val_frac of tokens for val (None when that rounds to nothing),
    each ending in the document's <|endoftext|> so both splits keep documents apart."""
    body, end = tokens[:-1], tokens[-1:]
    cut = tail_start(len(body), val_frac)
    val = np.concatenate((body[cut:], end)) if cut < len(body) else None
    return np.concatenate((body[:cut], end)), val


class TokenSpill:
    """A big file's tokens while its parts arrive, in an unnamed temporary file, so that val_split "tail" can hold
    out the last val_frac of the whole file (what split_tail does with one array) without holding it in memory."""

    def __init__(self, directory: Path | None) -> None:
        self.file = tempfile.TemporaryFile(dir=directory)  # gone when closed, or when the process dies
        self.count = 0

    def add(self, tokens: np.ndarray) -> None:
        np.ascontiguousarray(tokens, dtype=np.uint32).tofile(self.file)
        self.count += len(tokens)

    def read(self, start: int, stop: int) -> Iterator[np.ndarray]:
        for offset in range(start, stop, SPILL_READ_TOKENS):
            self.file.seek(offset * 4)
            yield np.fromfile(self.file, dtype=np.uint32, count=min(SPILL_READ_TOKENS, stop - offset))

    def split_tail(self, val_frac: float) -> Iterator[tuple[str, np.ndarray]]:
        """split_tail's (split, tokens) over everything added, in pieces: the train head, then the val tail."""
        try:
            body = self.count - 1  # the last token is the file's <|endoftext|>
            cut = tail_start(body, val_frac)
            end = next(self.read(body, self.count))
            yield from (("train", piece) for piece in self.read(0, cut))
            yield "train", end
            if cut < body:
                yield from (("val", piece) for piece in self.read(cut, body))
                yield "val", end
        finally:
            self.file.close()


def tokenized_books(
    texts: Iterable[tuple[Book, list[str]]], val_split: str, val_ids: set[int], val_frac: float, threads: int,
    progress: Progress | None = None, task: TaskID | None = None, spill_dir: Path | None = None,
) -> Iterator[tuple[str, int, str, np.ndarray]]:
    """(split, id, title, tokens) per book, or per part of a big file (and per split, for "tail"), in source
    order, encoding about ENCODE_BATCH_CHARS at a time. A book's tokens are its documents', each ended by
    <|endoftext|>. "books" sends val_ids' books to val whole; "tail" splits every book (every part of a JSON Lines
    file; a big .txt file as a whole, its parts' tokens kept in a TokenSpill in spill_dir until its last)."""
    spill: TokenSpill | None = None

    def encode(batch: list[tuple[Book, list[str]]]) -> Iterator[tuple[str, int, str, np.ndarray]]:
        nonlocal spill
        encoded = iter(encode_documents([text for _, documents in batch for text in documents], threads))
        for book, documents in batch:
            parts = [next(encoded) for _ in documents]
            tokens = parts[0] if len(parts) == 1 else np.concatenate(parts)
            continues = isinstance(book, ContinuedBook)
            if continues:
                tokens = tokens[:-1]  # the document goes on in the next part: no <|endoftext|> yet
            if progress is not None and task is not None:
                progress.advance(task, book.bytes)
            if val_split != "tail":
                yield ("val" if book.id in val_ids else "train"), book.id, book.title, tokens
            elif continues or spill is not None:  # a big .txt file's part: its tail is the whole file's
                spill = spill or TokenSpill(spill_dir)
                spill.add(tokens)
                if not continues:
                    yield from ((split, book.id, book.title, piece) for split, piece in spill.split_tail(val_frac))
                    spill = None
            else:
                head, tail = split_tail(tokens, val_frac)
                yield "train", book.id, book.title, head
                if tail is not None:
                    yield "val", book.id, book.title, tail

    batch, batch_chars = [], 0
    for book, documents in texts:
        batch.append((book, documents))
        batch_chars += sum(len(text) for text in documents)
        if batch_chars >= ENCODE_BATCH_CHARS:
            yield from encode(batch)
            batch, batch_chars = [], 0
    if batch:
        yield from encode(batch)


def progress_bars(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description:>9}"), BarColumn(), TaskProgressColumn(), DownloadColumn(),
        TransferSpeedColumn(), TimeRemainingColumn(), console=console,
    )


def split_unit(index: ShardIndex) -> str:
    """What the index's entries are to a reader: documents, or files where a .jsonl file holds many documents."""
    return "file" if indexed_jsonl(index) else "document"


def split_lines(index: ShardIndex, val_frac: float) -> list[str]:
    """How validation was held out, what share of the tokens it got, and a warning when that share is far from
    data.val_frac (whole books are held out by count, whatever their length)."""
    train, val = index.splits["train"], index.splits["val"]
    share = val.tokens / max(1, train.tokens + val.tokens)
    unit = split_unit(index)
    if index.settings.get("val_split") == "tail":
        held = f"the last {val_frac * 100:g}% of every {unit}'s tokens ({plural(len(train.documents), unit)})"
        if indexed_jsonl(index):
            held += f", of every part of about {JSONL_PART_CHARS / 1e6:g} M characters of a JSON Lines file"
    else:
        names = sorted(document.title or str(document.id) for document in val.documents)
        held = f"{len(names)} of {len(train.documents) + len(names)} {unit}s: {shown(names)}"
    lines = [f"val split {index.settings.get('val_split')}: {held}; val holds {share:.1%} of the tokens "
             f"(data.val_frac {val_frac:g})"]
    if share < LOW_VAL_SHARE * val_frac:
        lines.append(f"[yellow]warning:[/] val holds {share:.1%} of the tokens, under a third of data.val_frac "
                     f"{val_frac:g}: --data.val_split tail holds out val_frac of every {unit}")
    elif share > HIGH_VAL_SHARE * val_frac:
        lines.append(f"note: val holds {share:.1%} of the tokens, over twice data.val_frac {val_frac:g}: whole "
                     f"{unit}s are held out by count, and these are long (training sees the rest); "
                     f"--data.val_split tail holds out val_frac of every {unit}")
    return lines


def print_summary(console: Console, index: ShardIndex, seconds: float, status: str, notes: Sequence[str] = ()) -> None:
    table = Table(show_header=True)
    for column in ("split", f"{split_unit(index)}s", "tokens", "shards", "MB on disk"):
        table.add_column(column, justify="left" if column == "split" else "right")
    rows = [(name, len(split.documents), split.tokens, len(split.shards)) for name, split in index.splits.items()]
    documents = len({document.id for split in index.splits.values() for document in split.documents})
    rows.append(("total", documents, *(sum(row[column] for row in rows) for column in (2, 3))))
    for name, books, tokens, shards in rows:
        megabytes = tokens * SHARD_DTYPE.itemsize / 1e6
        table.add_row(name, f"{books:,}", f"{tokens:,}", f"{shards:,}", f"{megabytes:,.1f}", end_section=name == "val")
    shard_dir = printable(str(index.shard_dir))
    console.print(f"[bold]tml-prepare[/]: {status} in {seconds:.1f} s: {escape(shard_dir)}", soft_wrap=True)
    console.print(table)
    console.print(f"{index.tokenizer} tokens stored as {index.dtype} (vocab {index.vocab_size:,})")
    for line in map(printable, [*split_lines(index, index.settings.get("val_frac", 0.0)), *notes]):
        console.print(line if line.startswith("[yellow]") else escape(line), soft_wrap=True, highlight=False)


def source_files(listing: list[dict[str, Any]], books: Sequence[Book], cfg: DataConfig) -> list[dict[str, Any]]:
    """The listing with each file's sha256 (from gathering the books), so a rebuild can name what changed."""
    if not is_local(cfg):
        return []
    root = source_root(cfg)
    hashes = {display_name(book.path, root): book.sha256 for book in books}  # the key source_listing uses
    return [{**entry, "sha256": hashes.get(entry["path"])} for entry in listing]


def changed_files(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> str | None:
    """`2 added (c.txt, d.txt), 1 changed (a.txt)` between two source_files lists, or None when the same."""
    before = {entry["path"]: entry.get("sha256") for entry in old}
    after = {entry["path"]: entry.get("sha256") for entry in new}
    groups = {
        "added": sorted(after.keys() - before.keys()),
        "removed": sorted(before.keys() - after.keys()),
        "changed": sorted(path for path in after.keys() & before.keys() if after[path] != before[path]),
    }
    parts = [f"{len(names)} {what} ({shown(names)})" for what, names in groups.items() if names]
    return ", ".join(parts) if parts else None


def check_splits(splits: dict[str, SplitIndex], cfg: DataConfig) -> None:
    """Training validates, so an empty split is refused here, before the new shards replace any, instead of crashing
    a run later."""
    for name, split in splits.items():
        if split.tokens == 0:
            raise PrepareError(f"the {name} split of data.source={cfg.source!r} is empty: every document is too short "
                               f"to hold out data.val_frac={cfg.val_frac:g} of its tokens; add text or raise val_frac")


def take_prepare_lock(fd: int, shard_dir: Path, console: Console) -> bool:
    """flock(LOCK_EX) on the open lock file, waiting while another preparation holds it (one line names the holder).
    False where the file system cannot lock files: the preparation goes on unprotected, with a warning."""
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = read_holder(fd)
            console.print(f"tml-prepare: waiting for the other preparation of {escape(str(shard_dir))} ({holder})",
                          soft_wrap=True, highlight=False)
            fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as error:
        if error.errno not in NO_FLOCK_ERRNOS:
            raise PrepareError(f"cannot lock {shard_dir} to prepare data: {error.strerror or error}") from error
        console.print(f"[yellow]warning:[/] the file system of {escape(str(shard_dir))} cannot lock files "
                      f"({error.strerror}); nothing stops a second preparation into it", soft_wrap=True)
        return False
    return True


@contextlib.contextmanager
def hold_prepare_lock(shard_dir: Path, console: Console) -> Iterator[None]:
    """Hold `<shard_dir>/prepare.lock` for the block (take_prepare_lock). flock, as tml/locks.py explains:
    the kernel releases it however the holder ends, so there is never a stale lock to delete."""
    try:
        fd = open_lock_file(shard_dir / PREPARE_LOCK)
    except OSError as error:
        raise PrepareError(f"cannot lock {shard_dir} to prepare data: {error.strerror or error}") from error
    try:
        if take_prepare_lock(fd, shard_dir, console):
            try:
                write_holder(fd)  # for the waiting line of the next preparation
            except OSError as error:  # a full disk: no shard could be written there either
                raise PrepareError(f"cannot write to {shard_dir}: {write_failure(error, shard_dir)}") from error
            # Only under the lock (no other preparation is writing), and before the up-to-date check, so what a
            # killed build left behind goes even when nothing needs building.
            remove_temporaries(shard_dir)
        yield
    finally:
        os.close(fd)  # releases the lock


def prepare_data(cfg: DataConfig, console: Console | None = None, force: bool = False) -> Path:
    """Build cfg.shard_dir from cfg.source unless shards from the same inputs are already there.

    A local source whose files were only touched (same bytes) keeps its shards: the index's listing is updated.
    The check and the build happen under the shard directory's lock, so a second preparation started meanwhile
    waits and then finds these shards up to date instead of writing over them.
    """
    console = console or Console()
    started = time.perf_counter()
    shard_dir = Path(cfg.shard_dir)
    notes: list[str] = []
    if is_local(cfg) and Path(cfg.source).expanduser().is_dir() and (skipped := skipped_files(cfg)):
        notes.append(f"neither .txt nor .jsonl, so skipped: {plural(len(skipped), 'file')} "
                     f"({shown([path.name for path in skipped])})")
    with hold_prepare_lock(shard_dir, console), progress_bars(console) as progress:
        if not force and data_is_ready(cfg) and (standing_alone := shards_without_source(cfg)):
            progress.stop()  # nothing to read the shards against: they are what there is
            print_summary(console, ShardIndex.load(shard_dir), time.perf_counter() - started, "up to date",
                          [standing_alone, *notes])
            return shard_dir
        listing = source_listing(cfg)  # stat before hashing: a file edited in between is seen as changed next time
        books = gather_books(cfg, progress)  # never empty: GutenbergError says why
        settings = data_settings(cfg, listing)
        fingerprint = inputs_fingerprint(settings, books)
        files = source_files(listing, books, cfg)
        unusable = None  # why the shards there cannot be used, when an index says there should be some
        try:
            existing = ShardIndex.load(shard_dir)
        except ShardError as error:
            existing = None
            if (shard_dir / INDEX_FILE).exists():
                unusable = str(error)
        # An index from before a local source's path stopped being an input, for the same data: recorded anew.
        written_before = existing is not None and existing.settings != settings_recorded_now(existing.settings)
        if written_before and inputs_fingerprint({**settings, "source": existing.settings["source"]},
                                                 books) == existing.fingerprint:
            existing.settings, existing.fingerprint = settings, fingerprint
        if existing is not None and existing.fingerprint == fingerprint and not force:
            if written_before or (existing.source_files, existing.source_path) != (files, source_path(cfg)):
                # touched, moved or recorded anew, not changed: keep the shards
                existing.source_files, existing.source_path = files, source_path(cfg)
                existing.save()
            progress.stop()
            print_summary(console, existing, time.perf_counter() - started, "up to date", notes)
            return shard_dir
        if existing is not None and (changes := changed_files(existing.source_files, files)):
            notes.insert(0, f"rebuilt because data.source changed: {changes}")
        elif unusable:
            notes.insert(0, f"rebuilt because the shards there were unusable: {unusable}")
        val_split = settings["val_split"]
        if val_split == "books" and len(books) < 2:
            raise PrepareError(f"data.val_split=books holds out whole files, but data.source={cfg.source!r} "
                               f"gives {len(books)}: use --data.val_split tail (the last val_frac of every file)")
        encoding = get_tokenizer()
        task = progress.add_task("tokenize", total=sum(book.bytes for book in books))
        val_ids = choose_val_books([book.id for book in books], cfg.val_frac, cfg.split_seed)
        read_notes = ReadNotes()
        index = write_shards(
            shard_dir,
            tokenized_books(book_documents(books, cfg, read_notes), val_split, val_ids, cfg.val_frac,
                            cfg.encode_threads, progress, task, spill_dir=shard_dir),
            tokenizer=TOKENIZER_NAME,
            vocab_size=encoding.n_vocab,
            shard_tokens=cfg.shard_tokens,
            fingerprint=fingerprint,
            settings=settings,
            content_fingerprint=content_fingerprint(books, cfg.text_field),
            source_files=files,
            source_path=source_path(cfg),
            check=lambda splits: check_splits(splits, cfg),
        )
    print_summary(console, index, time.perf_counter() - started, "built", [*notes, *read_notes.lines()])
    return shard_dir


def main(argv: Sequence[str] | None = None, prog: str = "tml-prepare") -> int:
    """`tml-prepare --config FILE [--data.key value ...] [--force]` (also `tml prepare`); only the data section is
    used."""
    args = list(sys.argv[1:] if argv is None else argv)
    asking_help = "-h" in args or "--help" in args  # shows the section it reads, not the 300 lines of every section
    parser = build_parser(prog=prog, description="Download, clean, tokenize and shard the corpus.",
                          sections=["data"] if asking_help else None,
                          epilog="The model, train and log sections of a config file or the command line are "
                                 "accepted and ignored, so a run's own command and config prepare its data.")
    parser.add_argument("--force", action="store_true", help="rebuild even when the shards are up to date")
    if asking_help:
        parser.print_help()
        return 0
    errors = Console(stderr=True)
    try:
        config = load_config(args, parser=parser)
        prepare_data(config.data, console=Console(), force="--force" in args)
    except (ConfigError, GutenbergError, PrepareError, ShardError, TokenizerError, OSError, ValueError) as error:
        errors.print(f"[bold red]{prog}: error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        errors.print(f"{prog}: interrupted; the next run starts the unfinished work again")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
