"""JSON Lines corpora: one JSON object per line, its text in one field (`data.text_field`, "text" by default).

The form most pretraining text comes in (The Pile, RedPajama, Dolma, a `datasets` export with `to_json`), as
`.jsonl` or `.ndjson` files, or either gzip-compressed (`.jsonl.gz`: decompressed as it is read, never on disk).
Every record is a document of its own: tml-prepare ends each with <|endoftext|>, as it ends each .txt file, so a
window that spans two records sees the boundary. Records are taken as they are, never stripped of a Gutenberg
header. A file is read a line at a time and handed on in parts (jsonl_parts), so memory grows with its largest
record, not with the file. A line that is not such an object is refused with its line number: a corpus with a
broken record is a corpus to fix, not to train on in part.
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz")
# Keys a refusal lists of a record without data.text_field: enough to spot the right one.
SHOWN_KEYS = 8
JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
              bool: "true or false", type(None): "null"}
# A JSON escape of a UTF-16 surrogate (\ud800-\udfff): json.loads joins a pair into one character, but one alone
# stays a lone surrogate, which is no Unicode text (UTF-8 cannot encode it). Web-scraped corpora hold a few.
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
LONE_SURROGATE = re.compile("[\ud800-\udfff]")
REPLACEMENT_CHARACTER = "\ufffd"
SURROGATES_REPLACED = "lone UTF-16 surrogates (no Unicode text) replaced by U+FFFD in"  # then where: file, lines


class JsonlError(ValueError):
    """A line of a JSON Lines file that holds no text to train on; the message names the line, not the file."""


@dataclass
class JsonlRecords:
    """A file's documents, and the lines whose text held lone surrogates (each replaced by U+FFFD, as tiktoken
    would have, but said)."""

    documents: list[str] = field(default_factory=list)
    repaired_lines: list[int] = field(default_factory=list)


def is_jsonl(path: str | Path) -> bool:
    return Path(path).name.lower().endswith(JSONL_SUFFIXES)


def read_jsonl(path: str | Path, text_field: str, option: str = "--data.text_field") -> JsonlRecords:
    """Every record of a file at once (tml eval's text); tml-prepare reads a file in parts (jsonl_parts)."""
    records = JsonlRecords()
    for part, _ in jsonl_parts(path, text_field, records.repaired_lines, option):
        records.documents += part
    return records


def jsonl_parts(path: str | Path, text_field: str, repaired_lines: list[int], option: str = "--data.text_field",
                part_chars: int | None = None) -> Iterator[tuple[list[str], int]]:
    """The file's records in parts of about `part_chars` characters (all in one without it), each with the bytes
    of the file read for it: a file of many GB is never held whole (a record is). Lines whose lone surrogates were
    replaced are appended to `repaired_lines`. A .gz file is decompressed as it is read."""
    compressed = Path(path).name.lower().endswith(".gz")
    try:
        with open(path, "rb") as raw, (gzip.open(raw, "rb") if compressed else nullcontext(raw)) as lines:
            part: list[str] = []
            chars = counted = 0  # characters in this part; bytes of the file handed on with earlier parts
            for text in jsonl_texts(lines, text_field, repaired_lines, option):
                part.append(text)
                chars += len(text)
                if part_chars is not None and chars >= part_chars:
                    yield part, raw.tell() - counted
                    counted = raw.tell()
                    part, chars = [], 0
            if part or not counted:  # the last part; a file without a record still gives one, empty
                yield part, raw.tell() - counted
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:  # cut short, or not gzip at all
        raise JsonlError(f"it is not a whole gzip file ({error}): compress it again, or name it without .gz") from error


def jsonl_texts(lines: Iterable[bytes], text_field: str, repaired_lines: list[int],
                option: str = "--data.text_field") -> Iterator[str]:
    """The text_field of every record, in file order; blank lines are skipped.

    Parsed a line of bytes at a time, never read or decoded as one whole-file string. JSON Lines is UTF-8
    (json.loads also takes a byte-order mark). `option` is how the caller's command line names the field, for the
    refusal of a record without it.
    """
    for number, line in enumerate(lines, start=1):
        if not line or line.isspace():  # blank (strip() would copy every line to ask)
            continue
        try:
            record = json.loads(line)
        except UnicodeDecodeError as error:
            raise JsonlError(f"line {number} is not UTF-8 ({error}), as JSON Lines must be: convert the file to "
                             "UTF-8 (e.g. `iconv -f ITS-ENCODING -t utf-8`)") from error
        except json.JSONDecodeError as error:  # its own position says "line 1": the line alone was parsed
            raise JsonlError(f"line {number} is not JSON ({error.msg} at column {error.colno}): fix or remove that "
                             "line") from error
        if not isinstance(record, dict):
            raise JsonlError(f"line {number} is {JSON_TYPES[type(record)]}, not an object with a "
                             f"{text_field!r} field: fix or remove that line")
        if text_field not in record:
            keys = sorted(record)
            listed = ", ".join(repr(key) for key in keys[:SHOWN_KEYS]) + (", ..." if len(keys) > SHOWN_KEYS else "")
            raise JsonlError(f"line {number} has no {text_field!r} field (its fields: {listed or 'none'}): name the "
                             f"field that holds the text with {option}, or fix that record")
        value = record[text_field]
        if not isinstance(value, str):
            raise JsonlError(f"line {number}: its {text_field!r} is {JSON_TYPES[type(value)]}, not a string: fix or "
                             "remove that record")
        if SURROGATE_ESCAPE.search(line) and LONE_SURROGATE.search(value):  # the search only where one can be
            value = LONE_SURROGATE.sub(REPLACEMENT_CHARACTER, value)
            repaired_lines.append(number)
        yield value


def lines_shown(numbers: list[int], shown: int = 5) -> str:
    """`line 4` or `lines 4, 9, 12, ... (7 in all)`: where repaired records are, in one short phrase."""
    listed = ", ".join(map(str, numbers[:shown])) + (f", ... ({len(numbers)} in all)" if len(numbers) > shown else "")
    return f"line{'s' if len(numbers) > 1 else ''} {listed}"
