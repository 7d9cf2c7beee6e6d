"""Scraper throughput on the shared corpus: HTTP download from a local server (1 and 4 threads), copy from a
mirror directory, the no-op resume check, and header stripping. Prints one JSON object.

    python benchmarks/bench_scraper.py [--books DIR] [--max-books N]

The HTTP server is the test suite's (tests/data/gutenberg_server.py) on 127.0.0.1, so the figures measure the
scraper's own overhead (threads, chunked reads, sha256, atomic renames, manifest), not a network.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tests.data.gutenberg_server import GutenbergServer  # noqa: E402
from tml.data.clean import strip_gutenberg  # noqa: E402
from tml.data.config import DataConfig  # noqa: E402
from tml.data.gutenberg import gather_books  # noqa: E402

DEFAULT_BOOKS = REPO_ROOT.parent / "shared" / "data" / "gutenberg"


def timed(function) -> tuple[float, object]:
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--books", type=Path, default=DEFAULT_BOOKS, help="directory with MANIFEST.tsv + pg{id}.txt")
    parser.add_argument("--max-books", type=int, default=None)
    args = parser.parse_args()
    with open(args.books / "MANIFEST.tsv", encoding="utf-8") as file:
        book_ids = [int(row["gutenberg_id"]) for row in csv.DictReader(file, delimiter="\t")][: args.max_books]
    total_bytes = sum((args.books / f"pg{book_id}.txt").stat().st_size for book_id in book_ids)
    results: dict[str, object] = {"books": len(book_ids), "megabytes": round(total_bytes / 1e6, 1)}

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        site = scratch / "site"
        for book_id in book_ids:
            target = site / f"cache/epub/{book_id}/pg{book_id}.txt"
            target.parent.mkdir(parents=True)
            shutil.copyfile(args.books / f"pg{book_id}.txt", target)

        with GutenbergServer(site) as server:
            for threads in (1, 4):
                cfg = DataConfig(mirror=server.base_url, book_ids=book_ids, raw_dir=str(scratch / f"http{threads}"),
                                 requests_per_second=0, download_concurrency=threads)
                seconds, _ = timed(lambda cfg=cfg: gather_books(cfg))
                results[f"http_{threads}_thread_mb_per_s"] = round(total_bytes / 1e6 / seconds, 1)
            # A second run finds every book finished: it re-hashes the files and makes no request.
            server.state.requests.clear()
            seconds, _ = timed(lambda: gather_books(cfg))
            results["resume_noop_seconds"] = round(seconds, 2)
            results["resume_noop_requests"] = len(server.state.requests)

        cfg = DataConfig(mirror=str(args.books), book_ids=book_ids, raw_dir=str(scratch / "copy"))
        seconds, books = timed(lambda: gather_books(cfg))
        results["mirror_directory_mb_per_s"] = round(total_bytes / 1e6 / seconds, 1)

        texts = [book.path.read_text(encoding="utf-8") for book in books]
        seconds, _ = timed(lambda: [strip_gutenberg(text) for text in texts])
        results["strip_mb_per_s"] = round(total_bytes / 1e6 / seconds, 1)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
