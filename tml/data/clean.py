"""Cut the Project Gutenberg header and footer off a book, leaving only the author's text.

Thirty years of Gutenberg files use many boilerplate forms; each rule below is one form seen in real files
(the 135 books in ../shared/data/gutenberg exercise all of them). The body starts after the START marker
(or the old `*END*THE SMALL PRINT!` line) and ends at the earliest footer line after it. When no rule
matches the whole text is kept with a warning: a model trained on a licence is better than a book lost.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator

# `*** START OF THIS PROJECT GUTENBERG EBOOK X ***`, `***START OF THE PROJECT GUTENBERG EBOOK X***`,
# `ETEXT OF`, `EBOOK, X`; the title and/or the closing *** may wrap onto the next line.
START_MARKER = re.compile(
    r"^[ \t]*\*{3}[ \t]*START OF (?:THIS |THE )?PROJECT GUTENBERG (?:E-?BOOK|E-?TEXT)\b", re.IGNORECASE | re.MULTILINE
)
# END markers are sometimes indented by spaces.
END_MARKER = re.compile(
    r"^[ \t]*\*{3}[ \t]*END OF (?:THIS |THE )?PROJECT GUTENBERG (?:E-?BOOK|E-?TEXT)\b", re.IGNORECASE | re.MULTILINE
)
# Pre-2000 files carry their licence between these two lines, before or after the text.
SMALL_PRINT_START = re.compile(r"^[ \t]*\*+START\*+[ \t]*THE SMALL PRINT!", re.IGNORECASE | re.MULTILINE)
SMALL_PRINT_END = re.compile(r"^[ \t]*\*END\*?[ \t]*THE SMALL PRINT!.*$", re.IGNORECASE | re.MULTILINE)
# Any of these lines opens the footer: the END marker (sometimes indented), the old licence, `End of the
# Project Gutenberg EBook of X` (before the END marker, or alone in old files), the `**The Legal Small Print**`
# banner. One alternation, so one scan finds the earliest.
_FOOTER_LINES = (
    END_MARKER.pattern,
    SMALL_PRINT_START.pattern,
    r"^[ \t]*\**[ \t]*End of (?:the |this )?Project Gutenberg",
    r"^[ \t]*\**[ \t]*The Legal Small Print\b",
)
FOOTER = re.compile("|".join(f"(?:{line})" for line in _FOOTER_LINES), re.IGNORECASE | re.MULTILINE)
# The file's title line repeated after the text opens a footer too, but only once a header has been passed,
# since it is also the first line of every old header.
_REPEATED_TITLE_LINE = r"^[ \t]*\**[ \t]*The Project Gutenberg (?:E-?book|E-?text) of\b"
FOOTER_AFTER_HEADER = re.compile(f"{FOOTER.pattern}|(?:{_REPEATED_TITLE_LINE})", re.IGNORECASE | re.MULTILINE)
# Near the edges of the body, paragraphs that are Gutenberg's bookkeeping rather than the author's text:
# production credits ("Produced by ...", "This etext was prepared by ...") and editors' notes naming the project.
CREDIT_PARAGRAPH = re.compile(
    r"[ \t\[]*(?:(?:Produced|Prepared|Scanned|Transcribed|Proof-?read)\b[\w ,-]*?\b(?:by|from)\b"
    r"|E-?text (?:prepared|transcribed|produced|created)\b"
    r"|This (?:e-?text|e-?book|electronic book|file) (?:was|is|has been)\b"
    r"|Note from the original file\b)",
    re.IGNORECASE,
)
MENTIONS_GUTENBERG = re.compile(r"Project\s+Gutenberg|Gutenberg\s+Project|gutenberg\.(?:org|net)|pglaf\.org", re.IGNORECASE)
# Such notes sit on the title page or after the last line; further in, a paragraph is the book's own.
EDGE_CHARS = 1500
PARAGRAPH = re.compile(r"(?:^[ \t]*\S.*(?:\n|\Z))+", re.MULTILINE)
# Footers run to ~30 KB (licence + donation notes); this much of the tail surely holds the footer's first line.
FOOTER_SEARCH_CHARS = 100_000
# A header that leaves less than this share of the file as body is a misparse, not a book.
MIN_BODY_FRACTION = 0.05
# A wrapped marker's second line holds the end of a title, never a paragraph of text.
MAX_WRAPPED_MARKER_CHARS = 120
# Every Gutenberg file names the project within its first few lines (the 135 shared books by char 270).
HEADER_PROBE_CHARS = 1000


class GutenbergStripWarning(UserWarning):
    """No header/footer rule matched, so the text was kept (partly) unstripped."""


def normalize_text(text: str) -> str:
    """Drop byte-order marks and turn CRLF / lone CR into LF, so every rule can work line by line."""
    return text.replace("\ufeff", "").replace("\r\n", "\n").replace("\r", "\n")


def has_gutenberg_header(text: str) -> bool:
    """Whether `text` opens like a Project Gutenberg file, so its header and footer rules apply at all.

    Your own text never meets the footer rules: a last line such as "End of the Project Gutenberg discussion"
    in a file that does not start as a Gutenberg file is the author's, not a footer.
    """
    return MENTIONS_GUTENBERG.search(text, 0, HEADER_PROBE_CHARS) is not None


def _line_end(text: str, position: int) -> int:
    """Offset just past the line holding `position` (its newline included)."""
    newline = text.find("\n", position)
    return len(text) if newline < 0 else newline + 1


def _end_of_marker(text: str, start: int) -> int:
    """Offset just past a `***`-opened marker at `start`, taking the next line too when the closing `***`
    wrapped onto it (`... EBOOK THE THREE MUSKETEERS, BY` / `ALEXANDRE DUMAS, PERE ***`)."""
    first_end = _line_end(text, start)
    if text[start:first_end].strip()[3:].endswith("***"):
        return first_end
    second_end = _line_end(text, first_end)
    second = text[first_end:second_end].strip()
    return second_end if second.endswith("***") and len(second) <= MAX_WRAPPED_MARKER_CHARS else first_end


def _find_header_end(text: str) -> int | None:
    """Offset where the book begins, or None when no header rule matches."""
    start = START_MARKER.search(text)
    if start:
        return _end_of_marker(text, start.start())
    small_print = SMALL_PRINT_START.search(text)
    small_print_end = small_print and SMALL_PRINT_END.search(text, small_print.end())
    # A licence with more text after it than before it is a header; otherwise it was appended after the book.
    if small_print_end and len(text) - small_print_end.end() > small_print.start():
        return _line_end(text, small_print_end.start())
    return None


def _find_footer_start(text: str, header_end: int | None) -> int | None:
    """Offset of the earliest footer line after the header, or None when there is none.

    The tail is searched first: footers are short, regexes scan at only ~100 MB/s, and a footer-like line
    quoted deep inside a book should not cut it short. Only a file with no footer in its tail is searched whole.
    """
    body_start = header_end or 0
    footer = FOOTER_AFTER_HEADER if header_end is not None else FOOTER
    tail_start = max(body_start, _line_start(text, len(text) - FOOTER_SEARCH_CHARS))
    match = footer.search(text, tail_start) or (footer.search(text, body_start) if tail_start > body_start else None)
    return match.start() if match else None


def _line_start(text: str, position: int) -> int:
    return 0 if position <= 0 else text.rfind("\n", 0, position) + 1


def _edge_paragraphs(body: str) -> Iterator[re.Match]:
    """Paragraphs that start in the first EDGE_CHARS or reach into the last EDGE_CHARS of the body."""
    head_end = 0
    for paragraph in PARAGRAPH.finditer(body):
        if paragraph.start() >= EDGE_CHARS:
            break
        head_end = paragraph.end()
        yield paragraph
    # Resume at a paragraph boundary: the blank line before the paragraph that crosses into the tail.
    separator = body.rfind("\n\n", 0, max(0, len(body) - EDGE_CHARS))
    yield from PARAGRAPH.finditer(body, max(head_end, separator + 1))


def _drop_edge_notes(body: str) -> str:
    """Remove production-credit and editor's-note paragraphs from the edges of the body."""
    kept, last = [], 0
    for paragraph in _edge_paragraphs(body):
        if CREDIT_PARAGRAPH.match(paragraph.group()) or MENTIONS_GUTENBERG.search(paragraph.group()):
            kept.append(body[last : paragraph.start()])
            last = paragraph.end()
    kept.append(body[last:])
    return "".join(kept)


def strip_gutenberg(text: str, name: str = "") -> str:
    """The book's own text: BOM/CRLF normalised, Gutenberg header, footer and production credits removed.

    `name` only labels warnings. Never returns an empty string for a non-empty input: when no rule applies
    (or the rules would leave almost nothing) the whole normalised text comes back with a warning.
    """
    text = normalize_text(text)
    label = name or "text"
    header_end = _find_header_end(text)
    footer_start = _find_footer_start(text, header_end)
    if header_end is None and footer_start is None:
        warnings.warn(f"{label}: no Project Gutenberg header or footer found; keeping the whole text",
                      GutenbergStripWarning, stacklevel=2)
        return text
    if header_end is None:
        warnings.warn(f"{label}: no Project Gutenberg header found; keeping the text up to the footer",
                      GutenbergStripWarning, stacklevel=2)
    elif footer_start is None:
        warnings.warn(f"{label}: no Project Gutenberg footer found; keeping the text after the header",
                      GutenbergStripWarning, stacklevel=2)
    body = text[header_end or 0 : footer_start if footer_start is not None else len(text)]
    body = _drop_edge_notes(body).strip()
    if len(body) < MIN_BODY_FRACTION * len(text.strip()):
        warnings.warn(f"{label}: stripping would keep only {len(body)} of {len(text)} characters; "
                      "keeping the whole text", GutenbergStripWarning, stacklevel=2)
        return text
    return body
