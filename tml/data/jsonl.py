"""JSON Lines corpora: one JSON object per line, its text in one field (`data.text_field`, "text" by default).

The form most pretraining text comes in (The Pile, RedPajama, Dolma, a `datasets` export with `to_json`). Every
record is a document of its own: tml-prepare ends each with <|endoftext|>, as it ends each .txt file, so a
window that spans two records sees the boundary. Records are taken as they are, never stripped of a Gutenberg
header. A line that is not such an object is refused with its line number: a corpus with a broken record is a
corpus to fix, not to train on in part.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

JSONL_SUFFIX = ".jsonl"
# Keys a refusal lists of a record without data.text_field: enough to spot the right one.
SHOWN_KEYS = 8
JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
              bool: "true or false", type(None): "null"}


class JsonlError(ValueError):
    """A line of a JSON Lines file that holds no text to train on; the message names the line, not the file."""


def is_jsonl(path: str | Path) -> bool:
    return Path(path).suffix.lower() == JSONL_SUFFIX


def read_jsonl(path: str | Path, text_field: str, option: str = "--data.text_field") -> list[str]:
    """jsonl_documents of a file, read a line at a time."""
    with open(path, "rb") as lines:
        return jsonl_documents(lines, text_field, option)


def jsonl_documents(lines: Iterable[bytes], text_field: str, option: str = "--data.text_field") -> list[str]:
    """The text_field of every record, in file order; blank lines are skipped.

    Parsed a line of bytes at a time, never read or decoded as one whole-file string: the file's text is then held
    once, in its records (the whole file beside them took twice the memory). JSON Lines is UTF-8 (json.loads also
    takes a byte-order mark). `option` is how the caller's command line names the field, for the refusal of a
    record without it.
    """
    documents = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except UnicodeDecodeError as error:
            raise JsonlError(f"line {number} is not UTF-8 ({error}), as JSON Lines must be: convert the file (e.g. "
                             "`iconv -f latin1 -t utf-8`)") from error
        except ValueError as error:
            raise JsonlError(f"line {number} is not JSON ({error}): fix or remove that line") from error
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
        documents.append(value)
    return documents
