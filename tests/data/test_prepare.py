"""prepare_data turns a directory of Gutenberg books into shards once, and again only when an input changes."""

from __future__ import annotations

import io

import numpy as np
import pytest
from rich.console import Console

from tml.data import prepare
from tml.data.clean import strip_gutenberg
from tml.data.config import DataConfig
from tml.data.packed import PackedDataset
from tml.data.prepare import data_is_ready, main, prepare_data
from tml.data.shards import INDEX_FILE, ShardIndex, shard_starts
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
    cfg = config(tmp_path, books)
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
    cfg = config(tmp_path, shared_gutenberg, max_books=3, val_frac=0.34, shard_tokens=100_000)
    index = ShardIndex.load(prepare_data(cfg, console=quiet()), verify=True)
    assert sum(len(split.documents) for split in index.splits.values()) == 3
    text = get_tokenizer().decode(split_tokens(index, "train").tolist())
    assert "Project Gutenberg" not in text.split("<|endoftext|>")[0][:2000]
    assert text.endswith("<|endoftext|>")
