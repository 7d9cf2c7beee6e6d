"""strip_gutenberg: every header/footer form real Gutenberg files use, and all 135 shared books."""

from __future__ import annotations

import re
import warnings
from contextlib import contextmanager

import pytest

from tests.conftest import GUTENBERG_DIR
from tml.data.clean import GutenbergStripWarning, has_gutenberg_header, normalize_text, strip_gutenberg

# Longer than two EDGE_CHARS windows, so the marker rules are tested, not the edge-note cleanup.
BODY = (
    "CHAPTER I\n\nIt was a bright cold day in April, and the clocks were striking thirteen.\n"
    "The end of the street was quiet; this was the END OF CHAPTER ONE in all but name.\n\n"
    + "".join(f"Paragraph {n}: the people of the town went about their business as usual.\n\n" for n in range(60))
    + "CHAPTER II\n\nThe last line of the book.\n"
)
HEADER = (
    "The Project Gutenberg EBook of A Test Book, by Anon\n\n"
    "This eBook is for the use of anyone anywhere at no cost and with\nalmost no restrictions whatsoever.\n\n"
    "Title: A Test Book\n\nAuthor: Anon\n\nLanguage: English\n\n"
)
LICENCE = (
    "Updated editions will replace the previous one--the old editions\nwill be renamed.\n\n"
    "*** START: FULL LICENSE ***\n\nTHE FULL PROJECT GUTENBERG LICENSE\n"
    "Most people start at our Web site which has the main PG search facility:\n\n     www.gutenberg.org\n"
)


@contextmanager
def no_strip_warnings():
    """Fail the test if strip_gutenberg had to fall back to keeping unstripped text."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    messages = [str(w.message) for w in caught if issubclass(w.category, GutenbergStripWarning)]
    assert not messages, messages


def strip_quietly(text: str) -> str:
    with no_strip_warnings():
        return strip_gutenberg(text)


def book(start: str, end: str, body: str = BODY, before_end: str = "") -> str:
    return f"{HEADER}{start}\n\n\n\n{body}\n\n\n{before_end}{end}\n\n{LICENCE}"


@pytest.mark.parametrize(
    "start, end",
    [
        ("*** START OF THIS PROJECT GUTENBERG EBOOK A TEST BOOK ***", "*** END OF THIS PROJECT GUTENBERG EBOOK A TEST BOOK ***"),
        ("*** START OF THE PROJECT GUTENBERG EBOOK A TEST BOOK ***", "*** END OF THE PROJECT GUTENBERG EBOOK A TEST BOOK ***"),
        ("***START OF THE PROJECT GUTENBERG EBOOK A TEST BOOK***", "***END OF THE PROJECT GUTENBERG EBOOK A TEST BOOK***"),
        ("*** START OF THE PROJECT GUTENBERG ETEXT OF A TEST BOOK ***", "*** END OF THE PROJECT GUTENBERG ETEXT OF A TEST BOOK ***"),
        ("*** START OF THE PROJECT GUTENBERG EBOOK, A TEST BOOK ***", "*** END OF THE PROJECT GUTENBERG EBOOK, A TEST BOOK ***"),
        ("*** START OF THIS PROJECT GUTENBERG EBOOK A TEST BOOK ***", "            *** END OF THE PROJECT GUTENBERG EBOOK A TEST BOOK ***"),
        ("*** START OF THIS PROJECT GUTENBERG EBOOK A TEST BOOK, BY\nANON ***", "*** END OF THIS PROJECT GUTENBERG EBOOK A TEST BOOK, BY\nANON ***"),
        ("*** START OF THIS PROJECT GUTENBERG EBOOK A TEST BOOK\n***", "*** END OF THIS PROJECT GUTENBERG EBOOK A TEST BOOK\n***"),
        ("*** Start of this Project Gutenberg eBook A Test Book ***", "*** End of this Project Gutenberg eBook A Test Book ***"),
    ],
    ids=["this", "the", "no-spaces", "etext-of", "comma", "indented-end", "wrapped-title", "wrapped-stars", "mixed-case"],
)
def test_marker_forms_leave_exactly_the_body(start, end):
    assert strip_quietly(book(start, end)) == BODY.strip()


def test_end_of_ebook_line_before_the_end_marker_is_removed():
    before_end = "End of the Project Gutenberg EBook of A Test Book, by Anon\nand a wrapped second line\n\n"
    text = book("*** START OF THIS PROJECT GUTENBERG EBOOK X ***", "*** END OF THIS PROJECT GUTENBERG EBOOK X ***",
                before_end=before_end)
    assert strip_quietly(text) == BODY.strip()


@pytest.mark.parametrize("end_line", [
    "End of Project Gutenberg's A Test Book, by Anon",
    "End of Project Gutenberg’s A Test Book, by Anon",
    "End of The Project Gutenberg Etext of A Test Book",
])
def test_end_of_line_variants_end_the_body(end_line):
    text = book("*** START OF THIS PROJECT GUTENBERG EBOOK X ***", "*** END OF THIS PROJECT GUTENBERG EBOOK X ***",
                before_end=end_line + "\n\n")
    assert strip_quietly(text) == BODY.strip()


SMALL_PRINT = (
    "**The Legal Small Print**\n\n\n(Three Pages)\n\n"
    "***START**THE SMALL PRINT!**FOR PUBLIC DOMAIN ETEXTS**START***\n"
    "Why is this \"Small Print!\" statement here?  You know: lawyers.\nThey tell us you might sue us.\n\n"
    "{end}\n"
)
OLD_HEADER = (
    "*The Project Gutenberg Etext of A Test Book, by Anon*\n#3 in our series by Anon\n\n"
    "Copyright laws are changing all over the world, be sure to check\nthe laws for your country.\n\n"
    "**Welcome To The World of Free Plain Vanilla Electronic Texts**\n\n"
)


@pytest.mark.parametrize("end", [
    "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*",
    "*END THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.07.00*END*",
])
def test_old_file_with_small_print_header_and_no_markers(end):
    text = (OLD_HEADER + SMALL_PRINT.format(end=end) + "\n\n\n\nThis etext was prepared by Someone, Somewhere\n\n\n\n"
            + BODY + "\n\n\nEnd of The Project Gutenberg Etext of A Test Book, by Anon\n")
    assert strip_quietly(text) == BODY.strip()


def test_small_print_after_the_text_is_footer():
    footer = ("The Project Gutenberg Etext of A Test Book\n******This file should be named test10.txt******\n\n"
              "More information about this book is at the top of this file.\n\n"
              + SMALL_PRINT.format(end="*END THE SMALL PRINT! FOR PUBLIC DOMAIN EBOOKS*Ver.02/11/02*END*")
              + "\n\nEnd of The Project Gutenberg Etext of A Test Book\n")
    text = OLD_HEADER + "*** START OF THE PROJECT GUTENBERG ETEXT OF A TEST BOOK ***\n\n" + BODY + footer
    assert strip_quietly(text) == BODY.strip()


def test_small_print_after_the_text_without_a_header_keeps_the_top_with_a_warning():
    text = BODY * 20 + "\n" + SMALL_PRINT.format(end="*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*END*")
    with pytest.warns(GutenbergStripWarning, match="no Project Gutenberg header"):
        body = strip_gutenberg(text)
    assert body == (BODY * 20).strip()


def test_bom_crlf_and_lone_cr_are_normalised():
    text = "\ufeff" + book("*** START OF THE PROJECT GUTENBERG EBOOK X ***", "*** END OF THE PROJECT GUTENBERG EBOOK X ***")
    assert strip_quietly(text.replace("\n", "\r\n")) == BODY.strip()
    assert strip_quietly(text.replace("\n", "\r")) == BODY.strip()
    assert normalize_text("\ufeffa\r\nb\rc\n") == "a\nb\nc\n"


def test_production_credits_and_editor_notes_at_the_edges_are_dropped():
    body = ("Produced by Judith Boss.  HTML version by Al Haines.\n\n\n"
            "[Project Gutenberg Editor's Note: another edition exists as etext #150]\n\n" + BODY)
    text = book("*** START OF THIS PROJECT GUTENBERG EBOOK X ***", "*** END OF THIS PROJECT GUTENBERG EBOOK X ***",
                body=body)
    assert strip_quietly(text) == BODY.strip()


def test_a_paragraph_naming_gutenberg_deep_inside_the_book_is_kept():
    middle = "The clerk said Project Gutenberg was a printer of great fame.\n\n"
    body = BODY * 40 + middle + BODY * 40
    text = book("*** START OF THIS PROJECT GUTENBERG EBOOK X ***", "*** END OF THIS PROJECT GUTENBERG EBOOK X ***",
                body=body)
    assert strip_quietly(text) == body.strip()


def test_text_without_any_rule_is_kept_whole_with_a_warning():
    text = "\ufeffJust some words.\r\nNo header here.\r\n"
    with pytest.warns(GutenbergStripWarning, match="mystery.txt: no Project Gutenberg header or footer"):
        assert strip_gutenberg(text, name="mystery.txt") == "Just some words.\nNo header here.\n"


def test_markers_around_nothing_never_empty_the_text():
    text = HEADER + "*** START OF THE PROJECT GUTENBERG EBOOK X ***\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\n"
    with pytest.warns(GutenbergStripWarning, match="keeping the whole text"):
        assert strip_gutenberg(text) == text


def test_missing_footer_keeps_the_rest_with_a_warning():
    text = HEADER + "*** START OF THE PROJECT GUTENBERG EBOOK X ***\n\n" + BODY
    with pytest.warns(GutenbergStripWarning, match="no Project Gutenberg footer"):
        assert strip_gutenberg(text) == BODY.strip()


# ------------------------------------------------------------------------------------- the real books

SHARED_BOOKS = sorted(path.name for path in GUTENBERG_DIR.glob("pg*.txt"))
# What licence and header text looks like; none of it may sit at either end of a stripped book.
BOILERPLATE = re.compile(
    r"project\s+gutenberg|gutenberg\.(?:org|net)|small\s+print|start of th(?:e|is) project|end of th(?:e|is) project"
    r"|\*\*\*\s*(?:start|end)\b|\blicen[cs]e\b|produced by",
    re.IGNORECASE,
)
EDGE = 300  # characters checked at each end of the body
# Short books carry a licence as long as themselves (A Modest Proposal: 49% body), so the floor is low.
MIN_BODY_SHARE = 0.4


@pytest.mark.shared
@pytest.mark.parametrize("file_name", SHARED_BOOKS)
def test_real_book_keeps_only_book_text(shared_gutenberg, file_name):
    raw = (shared_gutenberg / file_name).read_text(encoding="utf-8")
    with no_strip_warnings():
        body = strip_gutenberg(raw, name=file_name)
    head, tail = body[:EDGE], body[-EDGE:]
    assert not BOILERPLATE.search(head), f"{file_name} starts with boilerplate: {head!r}"
    assert not BOILERPLATE.search(tail), f"{file_name} ends with boilerplate: {tail!r}"
    assert len(body) >= MIN_BODY_SHARE * len(normalize_text(raw)), f"{file_name}: only {len(body)} characters kept"
    assert "\r" not in body and "\ufeff" not in body
    # The licence is gone from the whole body, not only from its ends.
    assert not re.search(r"small print!|gutenberg-tm|\*\*\* ?(?:start|end) of th", body, re.IGNORECASE)


def test_own_text_has_no_gutenberg_header_even_when_it_names_the_project_further_on():
    assert has_gutenberg_header(HEADER + BODY)
    assert has_gutenberg_header("\ufeff*** START OF THE PROJECT GUTENBERG EBOOK X ***\n" + BODY)
    assert not has_gutenberg_header(BODY + "\nEnd of the Project Gutenberg discussion, now our results.\n")


@pytest.mark.shared
def test_every_real_book_opens_with_a_gutenberg_header(shared_gutenberg):
    missing = [path.name for path in sorted(shared_gutenberg.glob("*.txt"))
               if not has_gutenberg_header(path.read_text(encoding="utf-8", errors="replace"))]
    assert missing == []
