"""Plain-text corpus files: which encoding tml reads one in, and a big one read in parts.

decode_text decides on a file's bytes at once. A file over a few megabytes (one corpus.txt of your own, not a
Gutenberg book) is not read whole: text_encoding makes the same decision in one streaming pass, and text_parts
then decodes it a piece at a time and cuts it into parts of about `part_chars` characters. Each cut falls where
GPT-2's pre-tokenizer splits the text the same way with or without the cut (checked by encoding the text around
it both ways), so the parts' tokens, concatenated, are exactly the whole file's, and memory stays flat however
big the file is.
"""

from __future__ import annotations

import codecs
import itertools
import re
from collections.abc import Callable, Iterator
from pathlib import Path

LATIN_1 = "latin-1"
# Windows text: Latin-1 plus curly quotes, dashes and the euro sign where Latin-1 has C1 control characters.
CP1252 = "cp1252"
C1_CONTROLS = re.compile(rb"[\x80-\x9f]")  # bytes Latin-1 turns into U+0080-U+009F, which real text never holds
# Byte-order marks, longest first: UTF-32's little-endian mark begins with UTF-16's.
BOMS = ((b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"), (b"\xef\xbb\xbf", "utf-8-sig"),
        (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))
READ_BYTES = 1 << 22  # 4 MiB a read: a part is a few of them
# Characters each side of a cut that must encode to the same tokens cut and uncut. GPT-2's pre-tokenizer looks
# one character ahead, so this is ample unless a single word or run of spaces is longer.
CUT_CONTEXT = 256
# How far from the wanted length a cut is looked for, and how many places are tried (after a newline first).
CUT_SEARCH_CHARS = 4096
CUT_TRIES = 200
WHITESPACE = re.compile(r"\s")


class NotText(ValueError):
    """Bytes that no encoding tml reads turns into text; the message says why, without naming a file."""


def decode_text(data: bytes) -> tuple[str, str]:
    """The text and the encoding it was read with: a byte-order mark's, else UTF-8, else cp1252 or Latin-1.

    Gutenberg files are UTF-8 since the 2000s and the older ones Latin-1, which decodes any bytes; so bytes with
    NUL in them (binary, or UTF-16/32 without a BOM) are refused rather than turned into garbage tokens. Bytes
    0x80-0x9F are control characters in Latin-1 but curly quotes and dashes in Windows text, so text holding
    them is read as cp1252 (Latin-1 still when cp1252 leaves one of them undefined).
    """
    if encoding := marked_encoding(data):
        try:
            return data.decode(encoding), encoding
        except UnicodeDecodeError as error:
            raise NotText(bad_bom(encoding, error)) from error
    if (nul := data.find(b"\x00")) >= 0:
        raise NotText(holds_nul(nul))
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    if C1_CONTROLS.search(data):
        try:
            return data.decode(CP1252), CP1252
        except UnicodeDecodeError:
            pass
    return data.decode(LATIN_1), LATIN_1


def marked_encoding(head: bytes) -> str | None:
    """The encoding a byte-order mark at the start of `head` names, if any."""
    return next((encoding for bom, encoding in BOMS if head.startswith(bom)), None)


def bad_bom(encoding: str, error: UnicodeDecodeError | str) -> str:
    return f"it starts with a {encoding} byte-order mark but is not {encoding} ({error})"


def at_offset(error: UnicodeDecodeError, start: int) -> str:
    """A streaming decoder's error with its positions in the file, not in the read that raised it."""
    bad = error.object[error.start:error.end]
    where = (f"byte 0x{bad[0]:02x} in position {start + error.start}" if len(bad) == 1 else
             f"bytes in position {start + error.start}-{start + error.end - 1}")
    return f"'{error.encoding}' codec can't decode {where}: {error.reason}"


def holds_nul(offset: int) -> str:
    return (f"it holds NUL bytes (the first at offset {offset:,}): it is binary, or UTF-16/UTF-32 without a "
            "byte-order mark")


def chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as file:
        while chunk := file.read(READ_BYTES):
            yield chunk


def text_encoding(path: Path) -> str:
    """decode_text's encoding for the file at `path`, decided in one pass of READ_BYTES reads (NotText likewise)."""
    with open(path, "rb") as file:
        encoding = marked_encoding(file.read(4))
    if encoding:
        decoder, fed = codecs.getincrementaldecoder(encoding)(), 0
        for chunk in itertools.chain(chunks(path), [b""]):  # b"": the end, where a cut-short character shows
            start = fed - len(decoder.getstate()[0])  # the file offset of what this call decodes
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as error:
                raise NotText(bad_bom(encoding, at_offset(error, start))) from error
            fed += len(chunk)
        return encoding
    utf8, is_utf8, has_c1, is_cp1252, offset = codecs.getincrementaldecoder("utf-8")(), True, False, True, 0
    for chunk in chunks(path):
        if (nul := chunk.find(b"\x00")) >= 0:
            raise NotText(holds_nul(offset + nul))
        if is_utf8:
            try:
                utf8.decode(chunk)
            except UnicodeDecodeError:
                is_utf8 = False
        has_c1 = has_c1 or C1_CONTROLS.search(chunk) is not None
        if is_cp1252:  # cp1252 maps byte to character: each read decodes alone
            try:
                chunk.decode(CP1252)
            except UnicodeDecodeError:
                is_cp1252 = False
        offset += len(chunk)
    if is_utf8:
        try:
            utf8.decode(b"", final=True)  # a file cut inside its last character
            return "utf-8"
        except UnicodeDecodeError:
            pass
    return CP1252 if has_c1 and is_cp1252 else LATIN_1


def token_safe_cut(text: str, target: int, encode: Callable[[str], list[int]]) -> int | None:
    """An offset within CUT_SEARCH_CHARS of `target`, next to a whitespace character, where `text` encodes to the
    same tokens cut as uncut, judged on CUT_CONTEXT characters each side; None when none of the CUT_TRIES places
    nearest it is. A lone newline between two other characters is tried first (a line break almost always is a
    safe cut), then the place before a space that starts a word ("word| next": GPT-2 gives the space to the word),
    then after other whitespace. Never between a space and its word, and never where a side of the window is all
    whitespace: GPT-2 merges runs of newlines and spaces in pairs and fours, so whether a cut inside a run is safe
    depends on where the run starts, which such a window cannot see."""
    low, high = max(CUT_CONTEXT, target - CUT_SEARCH_CHARS), min(len(text) - CUT_CONTEXT, target + CUT_SEARCH_CHARS)
    places = set()
    for match in WHITESPACE.finditer(text, low - 1, high + 1):
        places.update((match.start(), match.end()))

    def preference(offset: int) -> tuple[int, int]:
        before, after = text[offset - 1], text[offset]
        if before == "\n" and not text[offset - 2].isspace() and not after.isspace():
            rank = 0  # a lone newline
        elif after == " " and not before.isspace():
            rank = 1  # before a space that starts a word
        else:
            rank = 2
        return rank, abs(offset - target)

    candidates = sorted((offset for offset in places if low <= offset <= high
                         and not (text[offset - 1] == " " and not text[offset].isspace())), key=preference)
    for offset in candidates[:CUT_TRIES]:
        before, after = text[offset - CUT_CONTEXT:offset], text[offset:offset + CUT_CONTEXT]
        if before.isspace() or after.isspace():
            continue
        if encode(before) + encode(after) == encode(before + after):
            return offset
    return None


def text_parts(path: Path, encoding: str, part_chars: int,
               encode: Callable[[str], list[int]]) -> Iterator[tuple[str, int]]:
    """(text, bytes read for it) of the file in parts of about part_chars characters whose tokens follow on
    exactly (token_safe_cut); the last part is the rest, possibly empty. A stretch with no safe cut (no whitespace
    for CUT_SEARCH_CHARS characters) makes its part longer, never wrong."""
    decoder = codecs.getincrementaldecoder(encoding)()
    pending, read, target = "", 0, part_chars
    for chunk in chunks(path):
        read += len(chunk)
        pending += decoder.decode(chunk)
        while len(pending) >= target + CUT_CONTEXT:
            cut = token_safe_cut(pending, target, encode)
            if cut is not None:
                yield pending[:cut], read
                pending, read, target = pending[cut:], 0, part_chars
            elif len(pending) >= target + CUT_SEARCH_CHARS + CUT_CONTEXT:
                target += 2 * CUT_SEARCH_CHARS  # nothing anywhere near: look on past the stretch searched
            else:
                break  # search this stretch again with more of the text read
    yield pending + decoder.decode(b"", final=True), read
