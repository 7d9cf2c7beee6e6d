"""Token shards on disk: size-bounded uint16 files per split plus an index.json that describes them.

Layout: `{shard_dir}/index.json` and `{shard_dir}/{split}_{k:05d}.bin`. The writer streams: a document's tokens are
appended to the open shard and only the current shard's hash lives in memory, so corpora far larger than RAM
can be written. A rebuild writes its shards into a build directory beside them (`.build-<pid>/`) and moves
them in only once all are written, the index last: until then the previous data set stays complete and usable, and
a build that fails (a full disk, Ctrl-C) leaves it exactly as it was. A crash during the final moves leaves no
index, never a half-written set that loads. The build directory carries the writer's pid, so one writer never
takes another's half-written files as its own; callers serialise whole builds (tml-prepare holds a lock on the
directory) and clear leftovers only while they hold it (remove_temporaries).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from tml.files import file_sha256, fresh_directory, write_atomic, write_failure

INDEX_FILE = "index.json"
FORMAT_VERSION = 1  # bump when the index layout changes; older indexes are then refused and rebuilt
SHARD_DTYPE = np.dtype(np.uint16)  # GPT-2's 50,257 ids fit in 16 bits: half the disk and page cache of int32
SPLITS = ("train", "val")
SCAN_CHUNK_TOKENS = 1 << 24  # 32 MB of uint16 per step when scanning a shard, so scans never load a whole shard


class ShardError(ValueError):
    """Shards on disk that do not match their index (or no usable index)."""


@dataclass(frozen=True)
class ShardInfo:
    file: str  # relative to the shard directory
    tokens: int
    sha256: str
    max_token: int


@dataclass(frozen=True)
class DocumentSpan:
    """Where one book's tokens (and its trailing <|endoftext|>) start in a split, and how many there are. With
    data.val_split "tail" a book appears in both splits: its head in train, its tail in val, each ending in
    <|endoftext|>."""

    id: int
    title: str
    shard: int  # index into the split's shard list where the document starts
    offset: int  # token offset inside that shard
    length: int  # may run on into the following shards


@dataclass
class SplitIndex:
    shards: list[ShardInfo] = field(default_factory=list)
    documents: list[DocumentSpan] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(shard.tokens for shard in self.shards)


@dataclass
class ShardIndex:
    shard_dir: Path
    tokenizer: str
    vocab_size: int
    shard_tokens: int
    fingerprint: str  # hash of every input (books, cleaning, tokenizer, split); equal means nothing to redo
    settings: dict[str, Any]  # the data config values the shards were built from (checked by data_is_ready)
    splits: dict[str, SplitIndex]
    dtype: str = SHARD_DTYPE.name
    format_version: int = FORMAT_VERSION
    # hash of the books' ids and bytes alone: checkpoints keep it, so a resume notices that the text changed
    content_fingerprint: str = ""
    # a local source's files ({path, bytes, mtime_ns, ctime_ns, sha256}): data_is_ready sees an edit without reading
    source_files: list[dict[str, Any]] = field(default_factory=list)
    # where a local source was read from: not an input (moved text is the same data); it tells shards copied without
    # their text from a mistyped data.source (tml/data/prepare.py shards_stand_alone)
    source_path: str = ""

    def to_json(self) -> dict[str, Any]:
        values = asdict(self)
        values.pop("shard_dir")
        return values

    def save(self) -> None:
        """Write index.json atomically: readers see the previous index or this one."""
        write_atomic(self.shard_dir / INDEX_FILE, json.dumps(self.to_json(), indent=1).encode())

    @classmethod
    def from_json(cls, shard_dir: Path, values: dict[str, Any]) -> ShardIndex:
        splits = {
            name: SplitIndex(
                shards=[ShardInfo(**shard) for shard in split["shards"]],
                documents=[DocumentSpan(**document) for document in split["documents"]],
            )
            for name, split in values.pop("splits").items()
        }
        return cls(shard_dir=shard_dir, splits=splits, **values)

    @classmethod
    def load_or_none(cls, shard_dir: str | Path) -> ShardIndex | None:
        """The index (its files checked, tokens not scanned), or None where there is no valid one: for the cheap
        questions launchers and resume checks ask (are the shards there, built from what?)."""
        try:
            return cls.load(shard_dir, scan_tokens=False)
        except ShardError:
            return None

    @classmethod
    def load(cls, shard_dir: str | Path, verify: bool = False, scan_tokens: bool = True) -> ShardIndex:
        """Read index.json and check it against the shard files; ShardError names the first file at fault.

        Always checked: format, dtype, every file present with the size the index gives, documents tiling each
        split. `scan_tokens` reads every token once (memory-mapped, chunked) to refuse ids >= vocab size before
        they reach an embedding; `verify` also recomputes each shard's sha256.
        """
        shard_dir = Path(shard_dir)
        index_path = shard_dir / INDEX_FILE
        if not index_path.is_file():
            raise ShardError(f"{index_path} not found: run `tml-prepare --config FILE` to build the shards")
        try:
            index = cls.from_json(shard_dir, json.loads(index_path.read_text()))
            index.check(verify=verify, scan_tokens=scan_tokens)
        except ShardError:
            raise
        # ValueError covers bad JSON and bytes that are not UTF-8; TypeError a value of the wrong type (met in check).
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise ShardError(f"{index_path} is not a tml shard index ({error}); rebuild with tml-prepare --force") from error
        return index

    def check(self, verify: bool = False, scan_tokens: bool = True) -> None:
        index_path = self.shard_dir / INDEX_FILE
        if self.format_version != FORMAT_VERSION:
            raise ShardError(f"{index_path}: format_version {self.format_version}, this tml reads {FORMAT_VERSION}")
        if self.dtype != SHARD_DTYPE.name:
            raise ShardError(f"{index_path}: dtype {self.dtype!r}, tml shards are {SHARD_DTYPE.name}")
        if not 0 < self.vocab_size <= np.iinfo(SHARD_DTYPE).max + 1:
            raise ShardError(f"{index_path}: vocab_size {self.vocab_size} does not fit {SHARD_DTYPE.name}")
        missing = [split for split in SPLITS if split not in self.splits]
        if missing:
            raise ShardError(f"{index_path}: no {missing[0]!r} split")
        for split_name, split in self.splits.items():
            for number, shard in enumerate(split.shards):
                self._check_shard(split_name, number, shard, verify)
            self._check_documents(split_name, split)
            if scan_tokens:
                self.check_token_range(split_name)

    def check_token_range(self, split: str) -> None:
        """Read every token of one split once (memory-mapped, chunked): ids >= vocab size never reach an embedding."""
        for shard in self.splits[split].shards:
            path = self.shard_dir / shard.file
            actual_max = scan_max_token(path)
            if actual_max >= self.vocab_size:
                raise ShardError(f"{path} holds token {actual_max} >= vocab size {self.vocab_size}")
            if actual_max != shard.max_token:
                raise ShardError(f"{path}: max token {actual_max}, {INDEX_FILE} says {shard.max_token} (edited?)")

    def _check_shard(self, split: str, number: int, shard: ShardInfo, verify: bool) -> None:
        path = self.shard_dir / shard.file
        if shard.file != shard_name(split, number):
            raise ShardError(f"{self.shard_dir / INDEX_FILE}: {split} shard {number} is {shard.file!r}")
        if not path.is_file():
            raise ShardError(f"{path} is missing (listed in {INDEX_FILE}); rebuild with tml-prepare --force")
        expected = shard.tokens * SHARD_DTYPE.itemsize
        size = path.stat().st_size
        if size != expected:
            raise ShardError(
                f"{path} is {size} bytes but {INDEX_FILE} says {shard.tokens} {SHARD_DTYPE.name} tokens "
                f"= {expected} bytes (truncated, replaced, or written with another dtype)"
            )
        if not 0 < shard.tokens <= self.shard_tokens:
            raise ShardError(f"{path}: {shard.tokens} tokens, outside 1..shard_tokens={self.shard_tokens}")
        if shard.max_token >= self.vocab_size:
            raise ShardError(f"{path}: max token {shard.max_token} >= vocab size {self.vocab_size}")
        if verify:
            digest = file_sha256(path)
            if digest != shard.sha256:
                raise ShardError(f"{path}: sha256 {digest} differs from {INDEX_FILE} ({shard.sha256})")

    def _check_documents(self, split_name: str, split: SplitIndex) -> None:
        """Documents must tile the split exactly, in order: each starts where the previous one ended."""
        index_path = self.shard_dir / INDEX_FILE
        starts = shard_starts(split)
        position = 0
        for document in split.documents:
            inside = 0 <= document.shard < len(split.shards) and 0 <= document.offset < split.shards[document.shard].tokens
            if not inside or starts[document.shard] + document.offset != position or document.length <= 0:
                raise ShardError(f"{index_path}: {split_name} document {document.id} does not start where the previous ended")
            position += document.length
        if position != split.tokens:
            raise ShardError(f"{index_path}: {split_name} documents cover {position} tokens, its shards hold {split.tokens}")


def shard_name(split: str, number: int) -> str:
    return f"{split}_{number:05d}.bin"


def build_dir_name() -> str:
    """`.build-<pid>`: this process's directory for a data set it is still writing."""
    return f".build-{os.getpid()}"


def remove_temporaries(shard_dir: str | Path) -> None:
    """Delete the *.tmp files and build directories interrupted builds left behind. Only safe while holding the
    directory's build lock: without it, another writer's shards in progress would be deleted under it."""
    for leftover in Path(shard_dir).glob("*.tmp"):
        leftover.unlink(missing_ok=True)
    for leftover in Path(shard_dir).glob(".build-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def shard_starts(split: SplitIndex) -> list[int]:
    """Offset of each shard's first token in the split's concatenated token stream."""
    starts, total = [], 0
    for shard in split.shards:
        starts.append(total)
        total += shard.tokens
    return starts


def scan_max_token(path: Path) -> int:
    tokens = np.memmap(path, dtype=SHARD_DTYPE, mode="r")
    return max(int(tokens[i : i + SCAN_CHUNK_TOKENS].max()) for i in range(0, len(tokens), SCAN_CHUNK_TOKENS))


def choose_val_books(book_ids: list[int], val_frac: float, seed: int) -> set[int]:
    """Whole books held out for validation: the same ids for the same seed whatever order the source lists them.

    At least one book is held out when there are two or more and val_frac > 0, and at least one is kept for
    training; a single book goes to train (a split by book cannot hold one out).
    """
    if not 0.0 <= val_frac < 1.0:
        raise ValueError(f"data.val_frac must be in [0, 1), got {val_frac}")
    ids = sorted(set(book_ids))
    count = round(val_frac * len(ids))
    if val_frac > 0 and len(ids) >= 2:
        count = min(max(count, 1), len(ids) - 1)
    return set(random.Random(seed).sample(ids, count))


class SplitWriter:
    """Appends one split's documents to shards of at most `shard_tokens` tokens each."""

    def __init__(self, shard_dir: Path, split: str, shard_tokens: int, vocab_size: int):
        if shard_tokens <= 0:
            raise ValueError(f"data.shard_tokens must be positive, got {shard_tokens}")
        self.shard_dir, self.split = shard_dir, split
        self.shard_tokens, self.vocab_size = shard_tokens, vocab_size
        self.index = SplitIndex()
        self._file: BinaryIO | None = None
        self._hash = hashlib.sha256()
        self._count = 0
        self._max_token = 0

    def add(self, document_id: int, title: str, tokens: np.ndarray | Sequence[int]) -> None:
        """Append one document, continuing into new shards when the current one fills up. Ids outside the
        vocabulary are refused, not wrapped into SHARD_DTYPE. Tokens of the document added last (the same id and
        title) lengthen it: a big file arrives in parts (tml/data/prepare.py), and stays one document of the index.
        Two files never share an id (tml/data/gutenberg.py local_book_ids), so only a file's parts follow this way."""
        array = np.asarray(tokens)
        if array.size == 0:
            return
        if int(array.min()) < 0 or int(array.max()) >= self.vocab_size:
            raise ShardError(f"document {document_id} ({title}) has token ids outside 0..{self.vocab_size - 1}")
        tokens = np.ascontiguousarray(array, dtype=SHARD_DTYPE)
        documents = self.index.documents
        if documents and (documents[-1].id, documents[-1].title) == (document_id, title):
            documents[-1] = replace(documents[-1], length=documents[-1].length + len(tokens))
        else:
            if self._file is None or self._count == self.shard_tokens:
                self._open_next()
            documents.append(DocumentSpan(id=document_id, title=title, shard=len(self.index.shards),
                                          offset=self._count, length=len(tokens)))
        while len(tokens):
            if self._count == self.shard_tokens:
                self._open_next()
            piece, tokens = tokens[: self.shard_tokens - self._count], tokens[self.shard_tokens - self._count :]
            self._write(piece)

    def _write(self, piece: np.ndarray) -> None:
        data = piece.tobytes()
        assert self._file is not None
        self._file.write(data)
        self._hash.update(data)
        self._count += len(piece)
        self._max_token = max(self._max_token, int(piece.max()))

    def _open_next(self) -> None:
        self._finish_current()
        self._file = open(self.shard_dir / shard_name(self.split, len(self.index.shards)), "wb")
        self._hash, self._count, self._max_token = hashlib.sha256(), 0, 0

    def _finish_current(self) -> None:
        if self._file is None:
            return
        name = shard_name(self.split, len(self.index.shards))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        self.index.shards.append(ShardInfo(name, self._count, self._hash.hexdigest(), self._max_token))

    def close(self) -> SplitIndex:
        self._finish_current()
        return self.index

    def abort(self) -> None:
        """Close the open shard; the build directory holding it is removed by write_shards."""
        if self._file is not None:
            self._file.close()
            self._file = None


def write_shards(
    shard_dir: str | Path,
    documents: Iterable[tuple[str, int, str, np.ndarray | Sequence[int]]],
    *,
    tokenizer: str,
    vocab_size: int,
    shard_tokens: int,
    fingerprint: str,
    settings: dict[str, Any],
    content_fingerprint: str = "",
    source_files: Sequence[dict[str, Any]] = (),
    source_path: str = "",
    check: Callable[[dict[str, SplitIndex]], None] | None = None,
) -> ShardIndex:
    """Stream (split, id, title, tokens) documents into shards and write the index last.

    The shards are written into a build directory and moved into shard_dir only when every one is complete (see
    the module docstring), so the previous data set survives a failed build. `check` sees the finished splits
    before they replace anything: an exception it raises (an unusable split) leaves shard_dir as it was too. A
    write error (a full disk) becomes a ShardError naming shard_dir and its free space. Shards of a previous,
    larger build are deleted at the end.
    """
    shard_dir = Path(shard_dir)
    shard_dir.mkdir(parents=True, exist_ok=True)
    build_dir = shard_dir / build_dir_name()
    writers: dict[str, SplitWriter] = {}
    try:
        fresh_directory(build_dir)  # a leftover of this pid's own is possible: pids are reused after a crash
        writers = {split: SplitWriter(build_dir, split, shard_tokens, vocab_size) for split in SPLITS}
        for split, document_id, title, tokens in documents:
            if split not in writers:
                raise ValueError(f"unknown split {split!r} (known: {', '.join(SPLITS)})")
            writers[split].add(document_id, title, tokens)
        splits = {split: writer.close() for split, writer in writers.items()}
        if check is not None:
            check(splits)
    except BaseException as error:
        for writer in writers.values():
            writer.abort()
        shutil.rmtree(build_dir, ignore_errors=True)
        if isinstance(error, OSError):
            raise ShardError(f"cannot write shards to {shard_dir}: {write_failure(error, shard_dir)}; the shards there "
                             "are left as they were") from error
        raise
    index = ShardIndex(
        shard_dir=shard_dir, tokenizer=tokenizer, vocab_size=vocab_size, shard_tokens=shard_tokens,
        fingerprint=fingerprint, settings=settings, splits=splits, content_fingerprint=content_fingerprint,
        source_files=list(source_files), source_path=source_path,
    )
    kept = {shard.file for split in splits.values() for shard in split.shards}
    (shard_dir / INDEX_FILE).unlink(missing_ok=True)  # from here until save() the directory holds no data set
    for name in kept:
        os.replace(build_dir / name, shard_dir / name)
    for stale in shard_dir.glob("*.bin"):
        if stale.name not in kept and stale.name.split("_")[0] in SPLITS:
            stale.unlink()
    index.save()
    build_dir.rmdir()
    return index
