"""benchmarks/bench_data.py still runs against the pipeline's own functions (a renamed one once broke it unseen)."""

import importlib.util
import json
import sys

import pytest

from tests.conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "bench_data.py"


@pytest.mark.shared
def test_tokenizing_two_books_writes_every_raw_token_plus_a_separator_each(shared_gutenberg, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("bench_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--corpus", str(shared_gutenberg), "--max-books", "2",
                                      "--skip-prepare", "--repeats", "1", "--threads", "1"])
    module.main()  # asserts itself that the pipeline wrote every raw token plus one separator a book
    report = json.loads(capsys.readouterr().out)
    assert report["corpus"]["books"] == 2
    [tokenize] = report["tokenize"]
    assert tokenize["threads"] == 1 and tokenize["tokens"] > 10_000 and tokenize["raw_tiktoken_mb_per_s"] > 0
    assert report["window_reads_small_shards"]
