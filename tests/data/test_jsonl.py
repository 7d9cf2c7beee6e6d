"""A JSON Lines corpus: every record's text field is a document of its own, read beside .txt files."""

from __future__ import annotations

import gzip
import io
import json

import numpy as np
import pytest

from tests.data.test_prepare import OWN_TEXT, config, document_tokens, output_of, own_corpus, quiet
from tml.data import prepare
from tml.data.config import DataConfig, DataConfigError
from tml.data.gutenberg import GutenbergError, local_book_paths, skipped_files
from tml.data.jsonl import JsonlError, jsonl_texts
from tml.data.prepare import (
    PrepareError,
    data_is_ready,
    data_settings,
    prepare_data,
    source_content_fingerprint,
    split_tail,
)
from tml.data.shards import ShardIndex
from tml.data.tokenizer import EOT_TOKEN_ID, get_tokenizer

RECORDS = [f"Record {n}: a short document about the sea, number {n} of many. " * (3 + n % 4) for n in range(30)]


def jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def test_records_are_read_in_order_and_blank_lines_skipped():
    text = '\ufeff{"text": "first", "id": 1}\r\n\n   \n{"text": "line\u2028separator kept"}\n{"text": ""}'
    assert list(jsonl_texts(io.BytesIO(text.encode()), "text", [])) == ["first", "line\u2028separator kept", ""]


@pytest.mark.parametrize("line, why", [
    ("not json", r"line 2 is not JSON \(Expecting value at column 1\): fix or remove that line"),
    ("[1, 2]", "line 2 is an array, not an object with a 'text' field: fix or remove that line"),
    ('{"body": "x", "id": 3}', "line 2 has no 'text' field \\(its fields: 'body', 'id'\\): name the field that holds "
                               "the text with --data.text_field, or fix that record"),
    ('{"text": null}', "line 2: its 'text' is null, not a string: fix or remove that record"),
    ('{"text": ["a"]}', "line 2: its 'text' is an array, not a string"),
])
def test_a_line_without_text_is_refused_by_its_number(line, why):
    with pytest.raises(JsonlError, match=why):
        list(jsonl_texts(io.BytesIO(('{"text": "fine"}\n' + line + "\n").encode()), "text", []))


def test_a_line_that_is_not_utf8_is_refused_saying_so():
    with pytest.raises(JsonlError, match=r"line 1 is not UTF-8 \(.*\), as JSON Lines must be: convert the file"):
        list(jsonl_texts(['{"text": "café"}\n'.encode("latin-1")], "text", []))


def test_each_record_is_a_document_ended_by_endoftext_beside_a_txt_file(tmp_path):
    source = own_corpus(tmp_path, {"a.txt": OWN_TEXT})
    (source / "docs.jsonl").write_text(jsonl([{"id": n, "text": text} for n, text in enumerate(RECORDS)]),
                                       encoding="utf-8")
    cfg = config(tmp_path, source, val_frac=0.1)
    output = output_of(cfg)
    assert "30 records from 1 JSON Lines file, each record a document" in output
    assert "1 of 1 text file had no Project Gutenberg header: kept whole (a.txt)" in output
    assert "val split tail: the last 10% of every file's tokens (2 files)" in output
    index = ShardIndex.load(cfg.shard_dir, verify=True)
    # The train part ends in a separator of its own where the tail was cut
    tokens = document_tokens(index, "train")["docs.jsonl"][:-1] + document_tokens(index, "val")["docs.jsonl"]
    encoding = get_tokenizer()
    assert tokens == [token for text in RECORDS for token in [*encoding.encode_ordinary(text), EOT_TOKEN_ID]]
    assert index.settings["text_field"] == "text"


def test_another_text_field_is_read_and_a_change_of_it_rebuilds(tmp_path):
    source = own_corpus(tmp_path, {})
    source.mkdir()
    (source / "docs.jsonl").write_text(jsonl([{"text": "the wrong field", "content": text} for text in RECORDS]))
    cfg = config(tmp_path, source, text_field="content")
    prepare_data(cfg, console=quiet())
    index = ShardIndex.load(cfg.shard_dir)
    read = get_tokenizer().decode([token for split in ("train", "val")
                                   for token in document_tokens(index, split)["docs.jsonl"]])
    assert "Record 0:" in read and "the wrong field" not in read
    other = config(tmp_path, source, text_field="text")
    assert data_is_ready(cfg) and not data_is_ready(other)
    assert source_content_fingerprint(other) != index.content_fingerprint  # a resume must not count other windows
    prepare_data(other, console=quiet())
    assert "the wrong field" in get_tokenizer().decode(document_tokens(ShardIndex.load(cfg.shard_dir), "train")
                                                       ["docs.jsonl"])


def test_a_corpus_without_jsonl_files_keeps_its_shards_whatever_the_text_field(tmp_path):
    source = own_corpus(tmp_path, {"a.txt": OWN_TEXT, "b.txt": OWN_TEXT[:2000]})
    cfg = config(tmp_path, source)
    assert "text_field" not in data_settings(cfg)  # shards built before .jsonl files were read stay up to date
    prepare_data(cfg, console=quiet())
    assert data_is_ready(config(tmp_path, source, text_field="body"))


def test_a_broken_record_stops_preparation_naming_file_and_line_and_keeps_the_shards(tmp_path):
    source = own_corpus(tmp_path, {"a.txt": OWN_TEXT})
    (source / "docs.jsonl").write_text(jsonl([{"text": text} for text in RECORDS[:3]]))
    cfg = config(tmp_path, source)
    prepare_data(cfg, console=quiet())
    before = ShardIndex.load(cfg.shard_dir).fingerprint
    (source / "docs.jsonl").write_text(jsonl([{"text": text} for text in RECORDS[:3]]) + '{"text": 7}\n')
    with pytest.raises(PrepareError, match=f"{source / 'docs.jsonl'}: line 4: its 'text' is a number, not a string: "
                                           "fix or remove that record \\(or move the file out of data.source\\)"):
        prepare_data(cfg, console=quiet())
    assert ShardIndex.load(cfg.shard_dir, verify=True).fingerprint == before


def test_a_jsonl_file_named_as_the_source_is_the_corpus_and_one_without_records_only_a_separator(tmp_path):
    source = own_corpus(tmp_path, {"train.jsonl": jsonl([{"text": text} for text in RECORDS])})
    cfg = config(tmp_path, str(source / "train.jsonl"))
    assert "30 records from 1 JSON Lines file" in output_of(cfg)
    (source / "empty.jsonl").write_text("\n")
    (source / "a.txt").write_text(OWN_TEXT)
    output = output_of(config(tmp_path, source, shard_dir=str(tmp_path / "other")))
    assert "no text, so only a document separator: 1 file (empty.jsonl)" in output


def test_an_empty_text_field_is_refused_by_the_config():
    with pytest.raises(DataConfigError, match="data.text_field=''"):
        DataConfig(text_field="")


def test_lone_surrogates_are_replaced_and_said_and_a_pair_is_one_character():
    lines = [b'{"text": "smile \\ud83d\\ude00"}\n', b'{"text": "half \\ud800 of one"}\n', b'{"text": "plain"}\n']
    repaired: list[int] = []
    assert list(jsonl_texts(lines, "text", repaired)) == ["smile \U0001f600", "half \ufffd of one", "plain"]
    assert repaired == [2]


def test_surrogates_are_said_by_file_and_line_in_the_preparation_summary(tmp_path):
    source = own_corpus(tmp_path, {"a.jsonl": '{"text": "one"}\n{"text": "two \\udc80"}\n', "b.txt": OWN_TEXT})
    output = output_of(config(tmp_path, source))
    assert "lone UTF-16 surrogates (no Unicode text) replaced by U+FFFD in a.jsonl line 2" in output


def test_a_directory_reads_txt_and_json_lines_files_and_skips_the_rest_as_before(tmp_path):
    names = ["a.txt", "B.TXT", "c.JSONL", "d.ndjson", "e.json", "f.txt.gz", "g.jsonl.zst"]
    source = own_corpus(tmp_path, {name: '{"text": "x"}\n' for name in names})
    cfg = config(tmp_path, source)
    assert sorted(path.name for path in local_book_paths(cfg).values()) == ["a.txt", "c.JSONL", "d.ndjson"]
    assert sorted(path.name for path in skipped_files(cfg)) == ["B.TXT", "e.json", "f.txt.gz", "g.jsonl.zst"]


@pytest.mark.parametrize("name, why", [("records.json", "one JSON document: write its records one per line"),
                                       ("corpus.txt.gz", "compressed: decompress it first")])
def test_a_json_or_compressed_file_named_as_the_source_is_refused_not_read_as_text(tmp_path, name, why):
    source = own_corpus(tmp_path, {name: '[{"text": "x"}]'})
    with pytest.raises(GutenbergError, match=why):
        prepare_data(config(tmp_path, source / name), console=quiet())


def test_a_gzipped_jsonl_file_gives_the_tokens_of_the_file_itself_and_a_cut_short_one_is_refused(tmp_path):
    text = jsonl([{"text": text} for text in RECORDS])
    plain = own_corpus(tmp_path / "plain", {"docs.jsonl": text})
    packed = own_corpus(tmp_path / "packed", {})
    packed.mkdir(parents=True)
    (packed / "docs.jsonl.gz").write_bytes(gzip.compress(text.encode()))
    tokens = []
    for source, shards in ((plain, "plain-shards"), (packed, "packed-shards")):
        cfg = config(tmp_path, source, shard_dir=str(tmp_path / shards))
        assert "30 records from 1 JSON Lines file" in output_of(cfg)
        index = ShardIndex.load(cfg.shard_dir, verify=True)
        tokens.append([document_tokens(index, split)[name] for split in ("train", "val")
                       for name in document_tokens(index, split)])
    assert tokens[0] == tokens[1]
    whole = (packed / "docs.jsonl.gz").read_bytes()
    (packed / "docs.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(PrepareError, match=r"docs\.jsonl\.gz: it is not a whole gzip file \(.*\): compress it again"):
        prepare_data(config(tmp_path, packed, shard_dir=str(tmp_path / "packed-shards")), console=quiet())


def test_a_big_file_is_tokenized_in_parts_that_stay_one_document_and_each_gives_its_tail(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "JSONL_PART_CHARS", 1500)  # parts of a few records, as 8M characters are of many
    source = own_corpus(tmp_path, {"docs.jsonl": jsonl([{"text": text} for text in RECORDS])})
    cfg = config(tmp_path, source, val_frac=0.1)
    prepare_data(cfg, console=quiet())
    index = ShardIndex.load(cfg.shard_dir, verify=True)
    assert [len(index.splits[split].documents) for split in ("train", "val")] == [1, 1]
    encoding, parts, part, chars = get_tokenizer(), [], [], 0
    for text in RECORDS:  # the parts as the reader cuts them
        part.append(text)
        chars += len(text)
        if chars >= 1500:
            parts.append(part)
            part, chars = [], 0
    parts += [part] if part else []
    assert len(parts) > 3
    heads, tails = zip(*(split_tail(np.array([token for text in part for token in
                                              [*encoding.encode_ordinary(text), EOT_TOKEN_ID]]), 0.1)
                         for part in parts), strict=True)
    assert document_tokens(index, "train")["docs.jsonl"] == np.concatenate(heads).tolist()
    assert document_tokens(index, "val")["docs.jsonl"] == np.concatenate(tails).tolist()


def test_a_bad_line_in_a_later_part_leaves_the_shards_there_as_they_were(tmp_path, monkeypatch):
    """Earlier parts are already in the build directory when a later line is refused: none of it replaces the
    shards of the last good build."""
    monkeypatch.setattr(prepare, "JSONL_PART_CHARS", 1500)
    monkeypatch.setattr(prepare, "ENCODE_BATCH_CHARS", 1500)  # each part encoded and written before the next
    source = own_corpus(tmp_path, {"docs.jsonl": jsonl([{"text": text} for text in RECORDS])})
    cfg = config(tmp_path, source)
    prepare_data(cfg, console=quiet())
    before = {path.name: path.read_bytes() for path in (tmp_path / "shards").iterdir() if path.is_file()}
    (source / "docs.jsonl").write_text(jsonl([{"text": text} for text in RECORDS]) + '{"text": "cut off\n')
    with pytest.raises(PrepareError, match=f"docs.jsonl: line {len(RECORDS) + 1} is not JSON"):
        prepare_data(cfg, console=quiet())
    after = {path.name: path.read_bytes() for path in (tmp_path / "shards").iterdir() if path.is_file()}
    assert after == before  # and no build directory is left beside them
    assert not [path for path in (tmp_path / "shards").iterdir() if path.is_dir()]
