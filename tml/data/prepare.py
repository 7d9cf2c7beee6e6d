"""`tml-prepare`: books -> clean text -> GPT-2 tokens -> shards, once.

The inputs (every book's sha256, the cleaning code, the tokenizer files, the split and shard settings) are
hashed into a fingerprint stored in the index: a second run with the same inputs returns at once, and any
change rebuilds. Books are read, cleaned and encoded a bounded batch at a time, so memory does not grow with
the corpus.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
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

from tml.config import ConfigError, build_parser, load_config
from tml.data import clean
from tml.data.clean import strip_gutenberg
from tml.data.config import DataConfig
from tml.data.gutenberg import Book, GutenbergError, gather_books
from tml.data.shards import (
    FORMAT_VERSION,
    SHARD_DTYPE,
    ShardError,
    ShardIndex,
    choose_val_books,
    write_shards,
)
from tml.data.tokenizer import GPT2_FILES, TOKENIZER_NAME, TokenizerError, encode_documents, get_tokenizer
from tml.files import file_sha256

PREPARE_VERSION = 1  # bump when the way documents become tokens changes (e.g. the separator), to force rebuilds
# Text encoded per tiktoken batch: large enough that every thread stays busy (the batch's longest book is
# encoded first), small enough that the batch's Python token lists (~36 bytes a token) stay near 100 MB.
ENCODE_BATCH_CHARS = 8_000_000


class PrepareError(RuntimeError):
    """The source gave nothing to train on."""


def data_settings(cfg: DataConfig) -> dict[str, Any]:
    """The config values and code versions the shards depend on; equal settings mean the shards are current
    unless a book's bytes changed, which only `prepare_data` checks (it has to read the books)."""
    from_network = cfg.source == "gutenberg"
    return {
        "source": "gutenberg" if from_network else str(Path(cfg.source).expanduser().resolve()),
        "book_ids": [int(book_id) for book_id in cfg.book_ids] if from_network else None,
        "max_books": cfg.max_books,
        "val_frac": cfg.val_frac,
        "split_seed": cfg.split_seed,
        "shard_tokens": cfg.shard_tokens,
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


def data_is_ready(cfg: DataConfig) -> bool:
    """Cheap check for launchers: a valid index built from these settings exists (no book is read)."""
    try:
        index = ShardIndex.load(cfg.shard_dir, scan_tokens=False)
    except ShardError:
        return False
    return index.settings == data_settings(cfg)


def read_book(path: Path) -> str:
    """Gutenberg files are UTF-8 since the 2000s; the older ones that are not are Latin-1."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def stripped_books(books: Sequence[Book]) -> Iterator[tuple[Book, str]]:
    for book in books:
        yield book, strip_gutenberg(read_book(book.path), name=str(book.path))


def tokenized_books(
    texts: Iterable[tuple[Book, str]], val_ids: set[int], threads: int, progress: Progress | None = None,
    task: TaskID | None = None,
) -> Iterator[tuple[str, int, str, np.ndarray]]:
    """(split, id, title, tokens) per book, in source order, encoding about ENCODE_BATCH_CHARS at a time."""

    def encode(batch: list[tuple[Book, str]]) -> Iterator[tuple[str, int, str, np.ndarray]]:
        for (book, _), tokens in zip(batch, encode_documents([text for _, text in batch], threads), strict=True):
            if progress is not None and task is not None:
                progress.advance(task, book.bytes)
            yield ("val" if book.id in val_ids else "train"), book.id, book.title, tokens

    batch, batch_chars = [], 0
    for book, text in texts:
        batch.append((book, text))
        batch_chars += len(text)
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


def print_summary(console: Console, index: ShardIndex, seconds: float, status: str) -> None:
    table = Table(show_header=True)
    for column in ("split", "books", "tokens", "shards", "MB on disk"):
        table.add_column(column, justify="left" if column == "split" else "right")
    rows = [(name, len(split.documents), split.tokens, len(split.shards)) for name, split in index.splits.items()]
    rows.append(("total", *(sum(row[column] for row in rows) for column in (1, 2, 3))))
    for name, books, tokens, shards in rows:
        megabytes = tokens * SHARD_DTYPE.itemsize / 1e6
        table.add_row(name, f"{books:,}", f"{tokens:,}", f"{shards:,}", f"{megabytes:,.1f}", end_section=name == "val")
    console.print(f"[bold]tml-prepare[/]: {status} in {seconds:.1f} s: {escape(str(index.shard_dir))}", soft_wrap=True)
    console.print(table)
    console.print(f"{index.tokenizer} tokens stored as {index.dtype} (vocab {index.vocab_size:,})")


def prepare_data(cfg: DataConfig, console: Console | None = None, force: bool = False) -> Path:
    """Build cfg.shard_dir from cfg.source unless shards from the same inputs are already there."""
    console = console or Console()
    started = time.perf_counter()
    shard_dir = Path(cfg.shard_dir)
    with progress_bars(console) as progress:
        books = gather_books(cfg, progress)
        if not books:
            raise PrepareError(f"no books found in data.source={cfg.source!r}")
        settings = data_settings(cfg)
        fingerprint = inputs_fingerprint(settings, books)
        if not force:
            try:
                existing = ShardIndex.load(shard_dir)
            except ShardError:
                existing = None
            if existing is not None and existing.fingerprint == fingerprint:
                progress.stop()
                print_summary(console, existing, time.perf_counter() - started, "up to date")
                return shard_dir
        encoding = get_tokenizer()
        task = progress.add_task("tokenize", total=sum(book.bytes for book in books))
        val_ids = choose_val_books([book.id for book in books], cfg.val_frac, cfg.split_seed)
        index = write_shards(
            shard_dir,
            tokenized_books(stripped_books(books), val_ids, cfg.encode_threads, progress, task),
            tokenizer=TOKENIZER_NAME,
            vocab_size=encoding.n_vocab,
            shard_tokens=cfg.shard_tokens,
            fingerprint=fingerprint,
            settings=settings,
        )
    print_summary(console, index, time.perf_counter() - started, "built")
    return shard_dir


def main(argv: Sequence[str] | None = None) -> int:
    """`tml-prepare --config FILE [--data.key value ...] [--force]`; only the data section is used."""
    args = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog="tml-prepare", description="Download, clean, tokenize and shard the corpus.")
    parser.add_argument("--force", action="store_true", help="rebuild even when the shards are up to date")
    errors = Console(stderr=True)
    try:
        config = load_config(args, parser=parser)
        prepare_data(config.data, console=Console(), force="--force" in args)
    except (ConfigError, GutenbergError, PrepareError, ShardError, TokenizerError, OSError, ValueError) as error:
        errors.print(f"[bold red]tml-prepare: error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        errors.print("tml-prepare: interrupted; the next run starts the unfinished work again")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
