"""Where the corpus comes from and how it is cut into training windows."""

from __future__ import annotations

from dataclasses import dataclass, field

# A small, varied default set of English books; configs/books.yaml lists a larger one.
DEFAULT_BOOK_IDS: tuple[int, ...] = (
    11, 12, 16, 23, 74, 76, 84, 98, 1342, 1661, 2701, 345, 1080, 1400, 174, 215, 244, 1952, 2600, 5200,
)


@dataclass
class DataConfig:
    source: str = "gutenberg"  # "gutenberg" (download by id) or a local directory of Gutenberg .txt files
    mirror: str | None = None  # base URL or directory standing in for gutenberg.org; env TML_GUTENBERG_MIRROR
    book_ids: list[int] = field(default_factory=lambda: list(DEFAULT_BOOK_IDS))
    max_books: int | None = None  # cap on books taken from the source (None = all)
    raw_dir: str = "data/gutenberg/raw"  # downloaded books land here
    shard_dir: str = "data/gutenberg/shards"  # token shards + index.json
    val_frac: float = 0.1  # fraction of whole books held out for validation
    split_seed: int = 1337
    shard_tokens: int = 50_000_000  # bound on tokens per shard file (100 MB of uint16)
    stride: int = 256  # distance between window starts; < block_size overlaps windows
    encode_threads: int = 0  # 0 = all cores
    download_concurrency: int = 4
    requests_per_second: float = 2.0  # polite rate limit towards the mirror
    request_timeout: float = 30.0
    max_retries: int = 5
    num_workers: int = 0  # DataLoader workers
