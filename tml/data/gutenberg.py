"""Fetch raw Project Gutenberg books by ebook id, politely and resumably, or take them from a local directory.

Three sources, one result (`list[Book]`, raw unstripped files on disk):
- gutenberg.org or a mirror URL (`data.mirror` / env TML_GUTENBERG_MIRROR): HTTP with a rate limit, a few
  threads, retries with exponential backoff that honour Retry-After, and a Content-Length check;
- a mirror directory, in gutenberg.org layout or flat `pg{id}.txt` files: copied the same way;
- `data.source` = a directory of .txt and .jsonl files (your own text or Gutenberg books): used in place, every
  .txt file a document (every record of a .jsonl file one: tml/data/jsonl.py); hidden paths are skipped, symlinked
  folders followed.
Downloads land in `{raw_dir}/pg{id}.txt.part` and are renamed only when complete; `{raw_dir}/manifest.json`
(written atomically after every book) records what finished, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from rich.progress import Progress

from tml.data.clean import normalize_text
from tml.data.config import DataConfig
from tml.data.jsonl import is_jsonl
from tml.files import file_sha256, make_directory, replaced_on_success, write_atomic, write_failure

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://www.gutenberg.org"
MIRROR_ENV = "TML_GUTENBERG_MIRROR"
MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
# gutenberg.org asks robots to identify themselves; a named agent can be contacted instead of blocked.
USER_AGENT = "tml-gutenberg-scraper/0.1 (tml training toolkit; polite, rate-limited; Python urllib)"
# First retry waits this long, doubling each time; tests shrink it.
RETRY_BACKOFF_S = 1.0
# No single wait (backoff or Retry-After) runs longer than this, so a bad header cannot hang a run for hours.
MAX_RETRY_WAIT_S = 300.0
# 1 MiB reads: few syscalls, small memory, and the Content-Length check still sees every byte.
CHUNK_BYTES = 1 << 20
# Statuses worth another try: rate limiting and server-side trouble.
RETRY_STATUSES = {408, 425, 429, 500, 502, 503, 504}
MISSING_STATUSES = {404, 410}
# A corpus file whose name carries no ebook id, or one another file carries too, gets one from its path's hash,
# above every real id (~75k today).
LOCAL_ID_BASE = 1_000_000_000
# Bits of that hash: a million files collide with odds ~4e-7 (n^2 / 2^61), and LOCAL_ID_BASE + 2^60 stays under
# 2^63, so every id fits a signed 64-bit integer (numpy int64, JSON readers with 64-bit ints).
LOCAL_ID_BITS = 60
HEADER_SCAN_CHARS = 20_000  # Title:/Author: lines sit in the first few KB of a file
# Where a book lives on gutenberg.org (and mirrors), newest form first.
URL_FORMS = ("cache/epub/{id}/pg{id}.txt", "files/{id}/{id}-0.txt", "files/{id}/{id}.txt")
# File names a local directory may use for book {id}: the URL forms' names.
LOCAL_NAME = re.compile(r"^(?:pg)?(\d+)(?:-0)?\.txt$", re.IGNORECASE)
# Files named as the whole corpus that are neither text nor JSON Lines, with what to do instead of training on
# their bytes as text (a .json file read as text is JSON syntax, not the text in it).
NOT_A_CORPUS_FILE = {
    ".json": "one JSON document: write its records one per line as .jsonl (e.g. `jq -c '.[]' FILE > FILE.jsonl`)",
    **{suffix: f"compressed: decompress it first ({tool})"
       for suffix, tool in {".gz": "gunzip", ".bz2": "bunzip2", ".xz": "unxz", ".zst": "unzstd"}.items()},
    ".zip": "an archive: unpack it and name the directory",
}


class GutenbergError(RuntimeError):
    """Books could not be gathered and the user must act (set a mirror, fix a path, retry later)."""


class MissingBookWarning(UserWarning):
    """A requested book is not on the server (404 at every URL form) or not in the mirror directory."""


@dataclass(frozen=True)
class Book:
    id: int
    title: str
    author: str
    path: Path
    bytes: int
    sha256: str


# --------------------------------------------------------------------------------------------- metadata


def parse_title_author(text: str) -> tuple[str, str]:
    """Title and author from the header's `Title:` / `Author:` lines, or from the old first line
    `The Project Gutenberg Etext of X, by Y`; empty strings when neither is there."""
    header = normalize_text(text[:HEADER_SCAN_CHARS])
    fields = {}
    for key in ("Title", "Author"):
        # Some files glue the field onto the previous line ("...www.gutenberg.orgTitle: ..."), so no ^ anchor.
        # Indented lines under it hold a subtitle or a co-author; the first line is the name people know.
        match = re.search(rf"{key}:[ \t]*(\S.*)", header)
        fields[key] = " ".join(match.group(1).split()) if match else ""
    if not fields["Title"]:
        first = re.search(r"Project Gutenberg(?:'s|’s)?(?: E-?text| E-?book)?(?: of)? (.+?)(?:,? by (.+?))?\**$",
                          header.strip().split("\n", 1)[0], re.IGNORECASE)
        if first:
            fields["Title"] = first.group(1).strip()
            fields["Author"] = fields["Author"] or (first.group(2) or "").strip()
    return fields["Title"], fields["Author"]


def describe_file(book_id: int, path: Path, sha256: str | None = None) -> Book:
    """A Book for a complete file on disk (title/author read from its header; a .jsonl file has none)."""
    title = author = ""
    if not is_jsonl(path):  # a record's text may well hold "Title:": it is no header
        with open(path, encoding="utf-8", errors="replace") as file:
            title, author = parse_title_author(file.read(HEADER_SCAN_CHARS))
    return Book(book_id, title, author, path, path.stat().st_size, sha256 or file_sha256(path))


# --------------------------------------------------------------------------------------------- manifest


class Manifest:
    """`{raw_dir}/manifest.json`: the books that finished, rewritten atomically after each one."""

    def __init__(self, raw_dir: Path):
        self.path = raw_dir / MANIFEST_NAME
        self.lock = threading.Lock()
        self.books: dict[int, dict] = {}
        if self.path.is_file():
            try:
                values = json.loads(self.path.read_text(encoding="utf-8"))
                self.books = {int(key): entry for key, entry in values.get("books", {}).items()}
            except (ValueError, AttributeError) as error:
                # A manifest only saves work; a broken one means downloading again, not failing.
                log.warning("ignoring unreadable %s (%s); finished books will be fetched again", self.path, error)

    def finished(self, book_id: int, path: Path) -> Book | None:
        """The recorded Book when `path` still holds exactly the bytes the manifest recorded."""
        entry = self.books.get(book_id)
        if not isinstance(entry, dict) or not path.is_file() or path.stat().st_size != entry.get("bytes"):
            return None
        if file_sha256(path) != entry.get("sha256"):
            log.warning("%s changed since it was downloaded; fetching it again", path)
            return None
        return Book(book_id, entry.get("title", ""), entry.get("author", ""), path, entry["bytes"], entry["sha256"])

    def record(self, book: Book, url: str) -> None:
        with self.lock:
            entry = asdict(book) | {"path": book.path.name, "url": url}
            self.books[book.id] = entry
            values = {"version": MANIFEST_VERSION, "books": {str(key): self.books[key] for key in sorted(self.books)}}
            write_atomic(self.path, (json.dumps(values, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))


# --------------------------------------------------------------------------------------------- HTTP


class RateLimiter:
    """At most `per_second` request starts per second across all threads (0 = unlimited)."""

    def __init__(self, per_second: float):
        self.interval = 1.0 / per_second if per_second > 0 else 0.0
        self.lock = threading.Lock()
        self.next_start = 0.0

    def wait(self) -> None:
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_start)
            self.next_start = start + self.interval
        time.sleep(max(0.0, start - now))


class _Stopped(GutenbergError):
    """Another thread's download failed for good, so this one gave up too."""


class _Missing(Exception):
    """The URL answered 404/410: try the next URL form."""


class _Retryable(Exception):
    """A failure another attempt may cure; `wait` is the server's Retry-After, when it gave one."""

    def __init__(self, message: str, wait: float | None = None, unreachable: bool = False):
        super().__init__(message)
        self.wait = wait
        self.unreachable = unreachable


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After in seconds, from either of its forms (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def unreachable_message(base: str, origin: str, reason: str) -> str:
    return (
        f"cannot reach the Gutenberg server {base} ({origin}): {reason}.\n"
        "On a machine without internet access, point tml at a copy of the books instead:\n"
        "  - a mirror URL or a directory of pg{id}.txt files (or a gutenberg.org-layout tree):\n"
        "      --data.mirror /path/to/books        (or `data: {mirror: /path/to/books}` in the YAML)\n"
        f"      export {MIRROR_ENV}=/path/to/books   (same meaning, for every config)\n"
        "  - or a directory of .txt (or .jsonl) files as the source itself:\n"
        "      --data.source /path/to/books"
    )


class Downloader:
    """Fetches books from one base URL into raw_dir; thread-safe, so a pool of workers shares one."""

    def __init__(self, base_url: str, origin: str, cfg: DataConfig, manifest: Manifest):
        self.base_url = base_url.rstrip("/")
        self.origin = origin
        self.timeout = cfg.request_timeout
        self.max_retries = cfg.max_retries
        self.limiter = RateLimiter(cfg.requests_per_second)
        self.manifest = manifest
        self.raw_dir = Path(cfg.raw_dir)
        self.stop = threading.Event()  # set when one book failed for good: the others give up too

    def urls(self, book_id: int) -> list[str]:
        return [f"{self.base_url}/{form.format(id=book_id)}" for form in URL_FORMS]

    def fetch_book(self, book_id: int) -> Book | None:
        """Download one book unless the manifest says it is done; None when every URL form is missing."""
        path = self.raw_dir / f"pg{book_id}.txt"
        finished = self.manifest.finished(book_id, path)
        if finished:
            return finished
        for url in self.urls(book_id):
            try:
                sha256 = self.fetch_url(url, path)
            except _Missing:
                continue
            book = describe_file(book_id, path, sha256)
            self.manifest.record(book, url)
            return book
        return None

    def fetch_url(self, url: str, path: Path) -> str:
        """Download `url` to `path` through a temp file, retrying what may be transient; returns the sha256."""
        partial = path.with_name(path.name + ".part")
        for attempt in range(self.max_retries + 1):
            if self.stop.is_set():
                raise _Stopped("stopped because another download failed")
            self.limiter.wait()
            try:
                with replaced_on_success(path, partial):
                    return self._fetch_once(url, partial)
            except _Retryable as failure:
                if attempt == self.max_retries:
                    if failure.unreachable:
                        raise GutenbergError(unreachable_message(self.base_url, self.origin, str(failure))) from None
                    raise GutenbergError(
                        f"giving up on {url} after {attempt + 1} attempts: {failure}. Finished books are kept in "
                        f"{self.raw_dir}; run again later to resume, or set data.mirror / {MIRROR_ENV}"
                    ) from None
                backoff = RETRY_BACKOFF_S * 2**attempt
                delay = min(MAX_RETRY_WAIT_S, max(backoff, failure.wait or 0.0))
                log.warning("%s: %s; retrying in %.1f s (%d/%d)", url, failure, delay, attempt + 1, self.max_retries)
                if self.stop.wait(delay):
                    raise _Stopped("stopped because another download failed") from None
        raise AssertionError("unreachable")  # the loop always returns or raises

    def _fetch_once(self, url: str, partial: Path) -> str:
        """One download into `partial`. What the network does wrong is _Retryable or GutenbergError; what the
        local disk does wrong (full, read-only) is a GutenbergError at once, never retried and blamed on the server."""
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                expected = response.headers.get("Content-Length")
                digest, received = hashlib.sha256(), 0
                with _local_write(partial):
                    file = open(partial, "wb")
                with file:
                    for chunk in iter(lambda: response.read(CHUNK_BYTES), b""):
                        with _local_write(partial):
                            file.write(chunk)
                        digest.update(chunk)
                        received += len(chunk)
                    with _local_write(partial):
                        file.flush()  # a full disk may only show here; closing then has nothing left to write
        except urllib.error.HTTPError as error:
            error.close()
            if error.code in MISSING_STATUSES:
                raise _Missing(url) from None
            if error.code in RETRY_STATUSES or error.code >= 500:
                raise _Retryable(f"HTTP {error.code}", retry_after_seconds(error.headers.get("Retry-After"))) from None
            raise GutenbergError(f"{url} answered HTTP {error.code} {error.reason}; "
                                 f"set data.mirror or {MIRROR_ENV} to use another server") from None
        except urllib.error.URLError as error:
            reason = error.reason
            # A name that does not resolve will not resolve on retry either: no network, or a typo in the URL.
            if isinstance(reason, socket.gaierror):
                raise GutenbergError(unreachable_message(self.base_url, self.origin, str(reason))) from None
            raise _Retryable(f"connection failed ({reason})", unreachable=True) from None
        except (http.client.HTTPException, OSError) as error:  # timeouts, resets, a connection closed early
            raise _Retryable(f"{type(error).__name__}: {error}") from None
        if expected is not None and expected.isdigit() and received != int(expected):
            raise _Retryable(f"truncated body: {received} of {expected} bytes")
        return digest.hexdigest()


@contextlib.contextmanager
def _local_write(partial: Path) -> Iterator[None]:
    """Turn an OSError of the block (opening or writing the download's temp file) into a GutenbergError, so
    the network handler around it does not take a full disk for a connection problem."""
    try:
        yield
    except OSError as error:
        raise GutenbergError(f"cannot write {partial}: {write_failure(error, partial.parent)}") from None


# --------------------------------------------------------------------------------------------- sources


def mirror_setting(cfg: DataConfig) -> tuple[str, str]:
    """The base URL or directory to fetch from, and where that choice came from (for error messages)."""
    if cfg.mirror:
        return cfg.mirror, "data.mirror"
    if os.environ.get(MIRROR_ENV):
        return os.environ[MIRROR_ENV], f"env {MIRROR_ENV}"
    return DEFAULT_BASE_URL, "the default; set data.mirror or " + MIRROR_ENV + " to change it"


def mirror_directory(mirror: str, origin: str) -> Path | None:
    """The local directory a mirror names (a path or file:// URL), None for http(s) URLs."""
    parsed = urllib.parse.urlparse(mirror)
    if parsed.scheme in ("http", "https"):
        return None
    path = Path(urllib.request.url2pathname(parsed.path)) if parsed.scheme == "file" else Path(mirror)
    path = path.expanduser()
    if not path.is_dir():
        raise GutenbergError(f"{origin}={mirror!r} is neither an http(s) URL nor an existing directory")
    return path


def find_in_directory(directory: Path, book_id: int) -> Path | None:
    """Book `book_id` in a mirror directory: gutenberg.org layout first, then flat names."""
    candidates = [directory / form.format(id=book_id) for form in URL_FORMS]
    candidates += [directory / f"pg{book_id}.txt", directory / f"{book_id}-0.txt", directory / f"{book_id}.txt"]
    return next((path for path in candidates if path.is_file()), None)


def copy_from_directory(directory: Path, book_id: int, raw_dir: Path, manifest: Manifest) -> Book | None:
    """Copy one book from a mirror directory into raw_dir (temp file + rename), unless already there."""
    path = raw_dir / f"pg{book_id}.txt"
    finished = manifest.finished(book_id, path)
    if finished:
        return finished
    source = find_in_directory(directory, book_id)
    if source is None:
        return None
    with replaced_on_success(path, path.with_name(path.name + ".part")) as partial:
        shutil.copyfile(source, partial)
    book = describe_file(book_id, path)
    manifest.record(book, source.resolve().as_uri())
    return book


def printable(text: str) -> str:
    """`text` with the bytes of a file name that is not UTF-8 (surrogate-escaped by Python) shown as \\xNN
    escapes: a surrogate-escaped str crashes a UTF-8 console and is not valid Unicode in JSON."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def display_name(path: Path, root: Path) -> str:
    """`path` under `root` as text that prints and goes into JSON (printable)."""
    return printable(path.relative_to(root).as_posix())


@dataclass(frozen=True)
class SourceScan:
    """What a walk of data.source finds, hidden paths (.git, .ipynb_checkpoints) left out: the corpus files that
    make the corpus, the other files (skipped), and symbolic links that point nowhere (skipped)."""

    texts: list[Path]
    others: list[Path]
    dangling: list[Path]


def _unlistable(error: OSError) -> None:
    raise GutenbergError(f"cannot list {error.filename} under data.source: {error.strerror}") from error


def scan_source(root: Path) -> SourceScan:
    """Every file under `root`, following symlinked folders; a folder reached twice (a link back up the tree,
    or two links to one folder) is walked once, so a loop ends and no file is read twice through links."""
    texts: list[Path] = []
    others: list[Path] = []
    dangling: list[Path] = []
    walked: set[str] = set()
    for folder, subfolders, names in os.walk(root, onerror=_unlistable, followlinks=True):
        real = os.path.realpath(folder)
        if real in walked:
            subfolders.clear()
            continue
        walked.add(real)
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        for name in sorted(name for name in names if not name.startswith(".")):
            path = Path(folder, name)
            if path.is_file():
                (texts if is_corpus_file(path) else others).append(path)
            elif path.is_symlink() and not path.exists():
                dangling.append(path)
    return SourceScan(texts, others, dangling)


def source_root(cfg: DataConfig) -> Path:
    """The directory file names are given relative to: data.source, or the folder of a single file (input.txt)."""
    source = Path(cfg.source).expanduser()
    if source.is_file():
        return source.parent
    if not source.is_dir():
        raise GutenbergError(f"data.source={cfg.source!r} is neither 'gutenberg' nor an existing directory of .txt "
                             "or .jsonl files or such a file")
    return source


def is_corpus_file(path: Path) -> bool:
    """A file a directory's corpus reads: .txt (as before JSON Lines, exactly that suffix) or JSON Lines."""
    return path.suffix == ".txt" or is_jsonl(path)


def not_a_corpus_file(path: Path) -> str | None:
    """Why a file named on its own is no text to read (JSON, compressed, an archive), what to do, and what tml
    reads; else None."""
    why = None if is_jsonl(path) else NOT_A_CORPUS_FILE.get(path.suffix.lower())
    return why and f"{why}; tml reads text files and JSON Lines (.jsonl, .ndjson, either as .gz)"


def scan_local_source(cfg: DataConfig) -> SourceScan:
    """scan_source of data.source; a single file named as the source (nanoGPT's input.txt) is the whole corpus,
    read as text whatever its name unless it is JSON Lines, or refused when it is JSON or compressed."""
    source = Path(cfg.source).expanduser()
    if not source.is_file():
        return scan_source(source_root(cfg))
    if (why := not_a_corpus_file(source)) is not None:
        raise GutenbergError(f"data.source={cfg.source!r} is {why}")
    return SourceScan([source], [], [])


def ebook_number(name: str) -> int | None:
    """The Gutenberg ebook id a file name carries (pg11.txt, 11-0.txt, 11.txt); None when it carries none or a
    number in the path-based id range (it could collide with one)."""
    match = LOCAL_NAME.match(name)
    return int(match.group(1)) if match and int(match.group(1)) < LOCAL_ID_BASE else None


def path_id(path: Path, root: Path) -> int:
    """A stable id from the file's path under root (its bytes, so any name works), above every ebook id."""
    digest = hashlib.sha256(os.fsencode(path.relative_to(root).as_posix())).digest()
    return LOCAL_ID_BASE + (int.from_bytes(digest[:8], "big") >> (64 - LOCAL_ID_BITS))


def local_book_ids(paths: Iterable[Path], root: Path) -> dict[int, Path]:
    """Each file's id: the ebook number in its name when no other file carries that number (so a mirror's
    pg{id}.txt files keep their ids, which index.json and the val choice use), otherwise a path_id. Every file
    gets its own id: two that still share one raise, naming both, rather than one being dropped."""
    paths = sorted(paths)
    numbers = {path: ebook_number(path.name) for path in paths}
    carriers = Counter(numbers.values())
    by_id: dict[int, Path] = {}
    for path in paths:
        number = numbers[path]
        book_id = number if number is not None and carriers[number] == 1 else path_id(path, root)
        if (first := by_id.setdefault(book_id, path)) != path:
            raise GutenbergError(f"{display_name(first, root)} and {display_name(path, root)} in data.source={str(root)!r} "
                                 f"get the same id {book_id}: rename one of them")
    return by_id


def local_book_paths(cfg: DataConfig) -> dict[int, Path]:
    """The .txt and JSON Lines files under data.source (recursively) that make the corpus, by id, lowest ids first
    and at most data.max_books of them. Only names and paths are read."""
    root = source_root(cfg)
    by_id = local_book_ids(scan_local_source(cfg).texts, root)
    return {book_id: by_id[book_id] for book_id in sorted(by_id)[: cfg.max_books]}


def skipped_files(cfg: DataConfig) -> list[Path]:
    """Files under data.source that are neither .txt nor JSON Lines and so are not read (hidden ones, like .git, not
    counted), sorted by name as the notice lists them."""
    return sorted(scan_local_source(cfg).others, key=lambda path: (path.name, path))


def dangling_links(cfg: DataConfig) -> list[Path]:
    """Symbolic links under data.source that point nowhere: skipped, and worth naming (a moved corpus?)."""
    return scan_local_source(cfg).dangling


def local_corpus(cfg: DataConfig) -> dict[int, Path]:
    """local_book_paths, refused (GutenbergError) when there are none: a corpus to build shards from."""
    paths = local_book_paths(cfg)
    if not paths:
        raise GutenbergError(f"data.source={cfg.source!r} holds no .txt or .jsonl files")
    return paths


def books_from_directory(cfg: DataConfig) -> list[Book]:
    """Every file of local_book_paths, titled by its Gutenberg header, else (and every .jsonl file) by its path
    under data.source."""
    paths = local_corpus(cfg)
    root = source_root(cfg)
    books = []
    for book_id, path in paths.items():
        book = describe_file(book_id, path)
        books.append(book if book.title else replace(book, title=display_name(path, root)))
    return books


# --------------------------------------------------------------------------------------------- entry point


def _check_settings(cfg: DataConfig) -> None:
    if cfg.download_concurrency < 1:
        raise GutenbergError(f"data.download_concurrency must be >= 1, got {cfg.download_concurrency}")
    if cfg.max_retries < 0:
        raise GutenbergError(f"data.max_retries must be >= 0, got {cfg.max_retries}")
    if cfg.requests_per_second < 0:
        raise GutenbergError(f"data.requests_per_second must be >= 0 (0 = unlimited), got {cfg.requests_per_second}")
    if cfg.request_timeout <= 0:
        raise GutenbergError(f"data.request_timeout must be > 0 seconds, got {cfg.request_timeout}")


def _run_all(fetch: Callable[[int], Book | None], book_ids: list[int], threads: int,
             progress: Progress | None, stop: threading.Event) -> list[Book | None]:
    """fetch(id) for every id on `threads` threads, results in id order; the first failure stops the rest."""
    # Bytes, so the caller's download/speed columns read true; the book count rides in the description.
    task = progress.add_task(f"download 0/{len(book_ids)}", total=None) if progress else None
    counter = threading.Lock()
    finished = [0, 0]  # books, bytes

    def run(book_id: int) -> Book | None:
        book = fetch(book_id)
        if progress is not None:
            with counter:
                finished[0] += 1
                finished[1] += book.bytes if book else 0
                progress.update(task, completed=finished[1], description=f"download {finished[0]}/{len(book_ids)}")
        return book

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="gutenberg") as pool:
        futures = [pool.submit(run, book_id) for book_id in book_ids]
        try:
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        except BaseException:  # Ctrl-C: stop the workers instead of finishing every queued book
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        if any(future.exception() is not None for future in done):
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            failures = [future.exception() for future in futures if not future.cancelled() and future.exception()]
            # Report the failure that stopped the run, not the "stopped" echoes it caused in other threads.
            raise next((error for error in failures if not isinstance(error, _Stopped)), failures[0])
        if progress is not None:
            progress.update(task, total=finished[1])
        return [future.result() for future in futures]


def _warn_missing(missing: Iterable[int], where: str) -> None:
    missing = list(missing)
    if missing:
        warnings.warn(f"{len(missing)} book(s) not found at {where}, skipped: {', '.join(map(str, missing))}",
                      MissingBookWarning, stacklevel=3)


def gather_books(cfg: DataConfig, progress: Progress | None = None) -> list[Book]:
    """Raw (unstripped) books for `cfg`: downloaded or copied into cfg.raw_dir when cfg.source is
    "gutenberg" (cfg.book_ids[:cfg.max_books], from cfg.mirror / TML_GUTENBERG_MIRROR / gutenberg.org),
    otherwise every .txt and .jsonl file in the directory cfg.source. Books missing upstream are skipped with a
    MissingBookWarning; anything the user must fix raises GutenbergError."""
    _check_settings(cfg)
    if cfg.source != "gutenberg":
        return books_from_directory(cfg)
    book_ids = list(dict.fromkeys(int(book_id) for book_id in cfg.book_ids))[: cfg.max_books]
    if not book_ids:
        raise GutenbergError("no books selected: data.book_ids is empty")
    mirror, origin = mirror_setting(cfg)
    directory = mirror_directory(mirror, origin)
    raw_dir = Path(cfg.raw_dir)
    try:
        make_directory(raw_dir)
    except OSError as error:
        raise GutenbergError(f"data.raw_dir={cfg.raw_dir}: {error.strerror or error}") from error
    manifest = Manifest(raw_dir)
    if directory is not None:
        results = _run_all(lambda book_id: copy_from_directory(directory, book_id, raw_dir, manifest),
                           book_ids, 1, progress, threading.Event())
        where = f"mirror directory {directory} ({origin})"
    else:
        downloader = Downloader(mirror, origin, cfg, manifest)
        results = _run_all(downloader.fetch_book, book_ids, cfg.download_concurrency, progress, downloader.stop)
        where = f"{mirror} ({origin})"
    books = [book for book in results if book is not None]
    _warn_missing((book_id for book_id, book in zip(book_ids, results, strict=True) if book is None), where)
    if not books:
        raise GutenbergError(f"none of the {len(book_ids)} requested books exist at {where}; check data.book_ids")
    return books
