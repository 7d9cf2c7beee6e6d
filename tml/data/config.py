"""Where the corpus comes from and how it is cut into training windows.

Each field's meaning is in DataConfig's `Attributes:` docstring, which jsonargparse shows in `--help`.

Every value is checked when the config is built (`__post_init__`), so a bad one is refused at load time with its
key named, before anything is downloaded or queued.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# A small, varied default set of English books; configs/books.yaml lists a larger one.
DEFAULT_BOOK_IDS: tuple[int, ...] = (
    11, 12, 16, 23, 74, 76, 84, 98, 1342, 1661, 2701, 345, 1080, 1400, 174, 215, 244, 1952, 2600, 5200,
)
VAL_SPLITS = ("books", "tail", "auto")
# Below 20 documents whole ones are too coarse a hold-out (5 files: 20% of the tokens for val_frac 0.1).
AUTO_MIN_BOOKS = 20
# What token shards are built from (tml/data/prepare.py data_settings): runs that differ in one need their own.
SHARD_SETTINGS = ("source", "text_field", "book_ids", "max_books", "val_frac", "val_split", "split_seed",
                  "shard_tokens")


class DataConfigError(ValueError):
    """A data.* value that cannot prepare or feed a corpus; the message names the key and the value."""


@dataclass
class DataConfig:
    """Where the books come from, how they become token shards, and how training reads them.

    Attributes:
        source: "gutenberg" (download book_ids), a local directory of .txt files (your own text, or Gutenberg
            books, whose headers are stripped) and .jsonl/.ndjson files, or either .gz (one JSON object per line,
            each a document; other files are skipped), or one such file
        text_field: the field of a .jsonl record that holds its text
        mirror: base URL or directory standing in for gutenberg.org (env TML_GUTENBERG_MIRROR does the same)
        book_ids: Gutenberg ebook numbers to download when source is "gutenberg"
        max_books: cap on the books taken from the source (null = all of them)
        raw_dir: where downloaded books land
        shard_dir: token shards and their index.json
        val_frac: fraction of the corpus held out for validation
        val_split: how it is held out: "books" (whole files, so no text of a val book is trained on), "tail"
            (the last val_frac of every file's tokens, as nanoGPT does, or of every part of about 8 M characters
            of a JSON Lines file; works for a single file) or "auto"
            (books for "gutenberg" or a directory of at least 20 files, else tail)
        split_seed: seed of the choice of validation books
        shard_tokens: bound on tokens per shard file (50M tokens = 100 MB of uint16)
        stride: tokens between the starts of training windows; below model.block_size the windows overlap
        encode_threads: tokenizer threads; 0 = all cores
        download_concurrency: books downloaded at the same time
        requests_per_second: polite rate limit towards the mirror; 0 = none
        request_timeout: seconds a request may stall before it is retried
        max_retries: retries of a failed request (with growing waits) before preparation gives up
        num_workers: DataLoader worker processes; 0 = load batches in the training process
    """

    source: str = "gutenberg"
    text_field: str = "text"
    mirror: str | None = None
    book_ids: list[int] = field(default_factory=lambda: list(DEFAULT_BOOK_IDS))
    max_books: int | None = None
    raw_dir: str = "data/gutenberg/raw"
    shard_dir: str = "data/gutenberg/shards"
    val_frac: float = 0.1
    val_split: str = "auto"
    split_seed: int = 1337
    shard_tokens: int = 50_000_000
    stride: int = 256
    encode_threads: int = 0
    download_concurrency: int = 4
    requests_per_second: float = 2.0
    request_timeout: float = 30.0
    max_retries: int = 5
    num_workers: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """The download settings (book_ids, rates, retries) are checked by tml/data/gutenberg.py, which alone uses
        them, and only when it downloads; max_books also caps a local source, so it is checked here."""

        def fail(key: str, why: str) -> None:
            raise DataConfigError(f"data.{key}={getattr(self, key)!r}: {why}")

        # Training always validates, so some text must be held out and some kept.
        if not 0 < self.val_frac < 1:
            fail("val_frac", "must be between 0 and 1 (exclusive): the fraction of the corpus held out for validation")
        if not self.text_field:
            fail("text_field", "must name the field of a .jsonl record that holds its text")
        if self.val_split not in VAL_SPLITS:
            fail("val_split", f"must be one of {', '.join(VAL_SPLITS)}")
        for key in ("shard_tokens", "stride"):
            if getattr(self, key) < 1:
                fail(key, "must be at least 1")
        if self.max_books is not None and self.max_books < 1:
            fail("max_books", "must be at least 1, or null for all of them")
        if self.encode_threads < 0:
            fail("encode_threads", "must be >= 0 (0 = all cores)")
        if self.num_workers < 0:
            fail("num_workers", "must be >= 0 (0 = load batches in the training process)")
