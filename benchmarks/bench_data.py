"""Data pipeline benchmark: tokenizer throughput against raw tiktoken, prepare time and peak memory, window reads.

    python benchmarks/bench_data.py [--corpus ../shared/data/gutenberg] [--repeats 3]

Prints one JSON object. Tokenization is timed on the corpus's stripped text, held in memory, so both sides do
exactly the same work: raw = one `encode_ordinary_batch` call over every book; pipeline = what `tml-prepare`
runs after cleaning (bounded encode batches, <|endoftext|> separators, uint16 shards with sha256 on disk).
Raw and pipeline runs alternate so drifting load on a shared machine hits both alike. Peak RSS comes from
whole `tml-prepare` processes on half, all and twice the corpus (the double corpus repeats every book under a
second id), to show memory does not grow with the corpus.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tml.data.config import DataConfig  # noqa: E402
from tml.data.gutenberg import gather_books  # noqa: E402
from tml.data.packed import PackedDataset  # noqa: E402
from tml.data.prepare import ReadNotes, book_documents, tokenized_books  # noqa: E402
from tml.data.sampler import BatchStream  # noqa: E402
from tml.data.shards import choose_val_books, write_shards  # noqa: E402
from tml.data.tokenizer import get_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = REPO.parent / "shared" / "data" / "gutenberg"
PIPELINE_SHARD_TOKENS = 1_000_000  # small shards, so the timed pipeline also pays for opening and renaming files
DOUBLE_ID_OFFSET = 10_000_000  # ids of the repeated books in the doubled corpus


def tokenization(pairs, threads: int, repeats: int, work_dir: Path) -> dict:
    texts = [text for _, documents in pairs for text in documents]
    megabytes = sum(len(text.encode("utf-8")) for text in texts) / 1e6
    encoding = get_tokenizer()
    val_ids = choose_val_books([book.id for book, _ in pairs], 0.1, 1337)
    raw, pipeline, raw_cpu, pipeline_cpu = [], [], [], []
    for _ in range(repeats):
        started, started_cpu = time.perf_counter(), time.process_time()
        tokens = encoding.encode_ordinary_batch(texts, num_threads=threads)
        raw.append(time.perf_counter() - started)
        raw_cpu.append(time.process_time() - started_cpu)
        raw_count = sum(map(len, tokens))
        del tokens
        started, started_cpu = time.perf_counter(), time.process_time()
        index = write_shards(
            work_dir, tokenized_books(pairs, "books", val_ids, 0.1, threads), tokenizer="gpt2",
            vocab_size=encoding.n_vocab, shard_tokens=PIPELINE_SHARD_TOKENS, fingerprint="benchmark", settings={},
        )
        pipeline.append(time.perf_counter() - started)
        pipeline_cpu.append(time.process_time() - started_cpu)
    written = sum(split.tokens for split in index.splits.values())
    assert written == raw_count + len(texts), "pipeline must write every raw token plus one separator a document"
    return {
        "threads": threads,
        "text_mb": round(megabytes, 1),
        "tokens": raw_count,
        # wall-clock throughput of the fastest run: the least disturbed by other load on a shared machine
        "raw_tiktoken_mb_per_s": round(megabytes / min(raw), 2),
        "pipeline_mb_per_s": round(megabytes / min(pipeline), 2),
        "pipeline_over_raw": round(min(raw) / min(pipeline), 3),
        # CPU seconds (all threads) barely move with other load: the cost of the pipeline's extra work
        "pipeline_over_raw_cpu": round(statistics.median(raw_cpu) / statistics.median(pipeline_cpu), 3),
        "raw_s": [round(s, 2) for s in raw],
        "pipeline_s": [round(s, 2) for s in pipeline],
        "raw_cpu_s": [round(s, 2) for s in raw_cpu],
        "pipeline_cpu_s": [round(s, 2) for s in pipeline_cpu],
    }


# Runs tml-prepare's main in a fresh interpreter and prints the process's own peak RSS. VmHWM belongs to the
# process's address space, which exec replaces, so this parent's memory does not leak into the figure (the
# rusage of a child does count what it inherited at fork).
PEAK_RSS_SNIPPET = """
import sys
rc = 0
if sys.argv[1:]:
    from tml.data.prepare import main
    rc = main(sys.argv[1:])
else:
    import tml.data.prepare
status = open("/proc/self/status").read()
print("VmHWM", next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
sys.exit(rc)
"""


def run_measured(args: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of tml-prepare with these arguments (none: just the imports)."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PEAK_RSS_SNIPPET, *args], capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"tml-prepare {' '.join(args)} failed: {done.stderr[-2000:]}")
    peak_kb = int(done.stdout.rsplit("VmHWM", 1)[1].split()[0])
    return seconds, peak_kb / 1024


def doubled_corpus(corpus: Path, target: Path) -> Path:
    """Every book twice (links under a second id): twice the text, same book sizes."""
    target.mkdir()
    for path in sorted(corpus.glob("*.txt")):
        book_id = int(path.stem.removeprefix("pg"))
        (target / path.name).symlink_to(path)
        (target / f"pg{book_id + DOUBLE_ID_OFFSET}.txt").symlink_to(path)
    return target


def prepare_runs(corpus: Path, book_count: int, work_dir: Path) -> dict:
    _, import_rss = run_measured([])
    runs = {}
    for name, source, max_books in [
        ("half", corpus, book_count // 2),
        ("all", corpus, None),
        ("double", doubled_corpus(corpus, work_dir / "double"), None),
    ]:
        shard_dir = work_dir / f"prepare-{name}"
        options = ["--data.source", str(source), "--data.shard_dir", str(shard_dir)]
        if max_books is not None:
            options += ["--data.max_books", str(max_books)]
        seconds, rss = run_measured(["--force", *options])
        text_mb = sum(path.stat().st_size for path in Path(source).glob("*.txt")) / 1e6
        if max_books is not None:
            ids = sorted(int(path.stem.removeprefix("pg")) for path in Path(source).glob("*.txt"))[:max_books]
            text_mb = sum((Path(source) / f"pg{i}.txt").stat().st_size for i in ids) / 1e6
        runs[name] = {"raw_mb": round(text_mb, 1), "wall_s": round(seconds, 1), "peak_rss_mb": round(rss)}
    return {"import_only_rss_mb": round(import_rss), **runs,
            "peak_rss_double_over_half": round(runs["double"]["peak_rss_mb"] / runs["half"]["peak_rss_mb"], 3)}


def window_reads(shard_dir: Path, block_size: int, stride: int, reads: int) -> dict:
    dataset = PackedDataset(shard_dir, "train", block_size=block_size, stride=stride)
    order = np.random.default_rng(0).integers(0, len(dataset), size=reads).tolist()
    dataset[0]
    started = time.perf_counter()
    for i in order:
        dataset[i]
    seconds = time.perf_counter() - started
    stream = BatchStream(dataset, batch_size=16, rank=0, world_size=1, seed=0)
    next(stream)
    batches = max(1, reads // 16)
    started = time.perf_counter()
    for _ in range(batches):
        next(stream)
    batch_seconds = time.perf_counter() - started
    return {
        "shards": len(dataset.paths),
        "windows": len(dataset),
        "block_size": block_size,
        "random_reads_per_s": round(reads / seconds),
        "batches_of_16_per_s": round(batches / batch_seconds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--max-books", type=int, default=None, help="tokenize only the first N books (smoke runs)")
    parser.add_argument("--skip-prepare", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)

    source = DataConfig(source=str(args.corpus), max_books=args.max_books)
    books = gather_books(source)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), Python {platform.python_version()}",
        "corpus": {"dir": str(args.corpus), "books": len(books), "raw_mb": round(sum(b.bytes for b in books) / 1e6, 1)},
    }
    with tempfile.TemporaryDirectory(prefix="bench-data-") as work:
        work_dir = Path(work)
        if not args.skip_prepare:  # first, while this process is still small
            result["prepare"] = prepare_runs(args.corpus, len(books), work_dir)
            result["window_reads_one_shard"] = window_reads(work_dir / "prepare-all", 1024, 256, 20_000)
        pairs = list(book_documents(books, source, ReadNotes()))  # as tml-prepare reads them: Gutenberg's text stripped
        result["tokenize"] = [tokenization(pairs, t, args.repeats, work_dir / f"pipeline-{t}") for t in args.threads]
        del pairs
        result["window_reads_small_shards"] = window_reads(work_dir / f"pipeline-{args.threads[-1]}", 1024, 256, 20_000)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
