"""Plain-text files: the encoding decided in one streaming pass as decode_text decides it at once, and a big file
read in parts whose tokens are exactly the whole file's, up to the shards tml-prepare writes from them."""

from __future__ import annotations

import random

import pytest

from tests.data.test_prepare import FOOTER, HEADER, config, document_tokens, output_of, own_corpus, quiet
from tml.data import prepare, text_files
from tml.data.clean import strip_gutenberg
from tml.data.prepare import PrepareError, prepare_data
from tml.data.shards import ShardIndex
from tml.data.text_files import NotText, decode_text, text_encoding, text_parts, token_safe_cut
from tml.data.tokenizer import get_tokenizer

# Pieces GPT-2's pre-tokenizer treats differently at a cut: runs of spaces and newlines, CRLF, contractions, digits
# (which it groups), punctuation runs, and non-ASCII letters.
PIECES = ["a", "word", "Word", " ", "  ", "   ", "\n", "\n\n", "\n\n\n", "\r\n", "'s", "'ll", "123", "4567", ".", "...",
          "é", "\t", "日本", "—", "!?", " \n", "\n "]


def encode(text: str) -> list[int]:
    return get_tokenizer().encode(text, disallowed_special=())


def tricky_text(seed: int, pieces: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(PIECES) for _ in range(pieces))


@pytest.fixture
def small_reads(monkeypatch):
    """Reads of 7 bytes: multi-byte characters, byte-order marks and NULs fall across read boundaries."""
    monkeypatch.setattr(text_files, "READ_BYTES", 7)


@pytest.mark.parametrize("data", [
    b"plain ASCII\n",
    "Grüße, 東京 — “quoted”\n".encode(),
    b"\xef\xbb\xbf" + "with a UTF-8 mark, é\n".encode(),
    "UTF-16 with its mark: Grüße\n".encode("utf-16"),
    "UTF-32 with its mark: 東京\n".encode("utf-32"),
    "\u201cWindows\u201d \u2013 text, caf\u00e9\n".encode("cp1252"),  # C1 bytes that cp1252 defines
    b"\x93undefined in cp1252: \x81\n",  # so Latin-1
    "Café crème, plain Latin-1\n".encode("latin-1"),
    "Grüße".encode()[:-1],  # UTF-8 cut inside its last character: not UTF-8
])
def test_the_streaming_encoding_is_the_one_reading_the_file_whole_gives(tmp_path, small_reads, data):
    path = tmp_path / "f.txt"
    path.write_bytes(data * 3)
    assert text_encoding(path) == decode_text(data * 3)[1]


@pytest.mark.parametrize("data, why", [
    (b"0123456789ab\x00cd", r"NUL bytes \(the first at offset 12\)"),  # in the second read
    (b"\xef\xbb\xbf" + b"fine, then \xff", "starts with a utf-8-sig byte-order mark but is not utf-8-sig"),
])
def test_the_streaming_pass_refuses_what_decode_text_refuses(tmp_path, small_reads, data, why):
    path = tmp_path / "f.txt"
    path.write_bytes(data)
    with pytest.raises(NotText, match=why):
        text_encoding(path)
    with pytest.raises(NotText, match=why):
        decode_text(data)


@pytest.mark.parametrize("seed", range(12))
def test_parts_join_to_the_file_and_their_tokens_are_the_whole_files(tmp_path, seed):
    text = tricky_text(seed, 4000)
    path = tmp_path / "f.txt"
    path.write_bytes(text.encode())
    parts = list(text_parts(path, "utf-8", 700, encode))
    assert len(parts) > 5
    assert "".join(part for part, _ in parts) == text
    assert sum(read for _, read in parts) == path.stat().st_size  # the progress bar's bytes add up
    assert [token for part, _ in parts for token in encode(part)] == encode(text)


def test_a_cut_is_refused_where_the_tokens_would_change():
    """Cut after the first of two newlines before a word, GPT-2 encodes "\\n\\n" as one token at the end of the
    part, but as "\\n", "\\n" in the whole text."""
    text = "word " * 100 + "end\n\nStart" + " word" * 100
    unsafe = text.index("\n\n") + 2
    assert encode(text[:unsafe]) + encode(text[unsafe:]) != encode(text)
    cut = token_safe_cut(text, unsafe, encode)
    assert cut is not None and cut != unsafe
    assert encode(text[:cut]) + encode(text[cut:]) == encode(text)


def test_a_long_stretch_without_whitespace_makes_a_longer_part_not_a_wrong_one(tmp_path, monkeypatch):
    monkeypatch.setattr(text_files, "CUT_SEARCH_CHARS", 300)
    text = "x" * 3000 + "\nnow lines\n" * 200
    path = tmp_path / "f.txt"
    path.write_bytes(text.encode())
    parts = [part for part, _ in text_parts(path, "utf-8", 500, encode)]
    assert len(parts[0]) > 3000 and len(parts) > 2
    assert "".join(parts) == text
    assert [token for part in parts for token in encode(part)] == encode(text)


def big_own_text(seed: int = 0, tricky: bool = True) -> str:
    rng = random.Random(seed)
    lines = [f"Line {n}: the quick brown fox jumps over the lazy dog{'.' * rng.randint(1, 3)}" for n in range(400)]
    text = "".join(line + rng.choice(["\n", "\n\n", "\r\n", "  \n"]) for line in lines)
    return text + tricky_text(seed, 1500) if tricky else text


@pytest.mark.parametrize("val_split", ["tail", "books"])
def test_a_big_file_read_in_parts_gives_the_shards_reading_it_whole_gives(tmp_path, monkeypatch, val_split):
    files = {"big.txt": big_own_text(), "small.txt": "A small file of its own.\n" * 30, "other.txt": big_own_text(1)}
    whole = config(tmp_path, own_corpus(tmp_path, files), val_frac=0.1, val_split=val_split,
                   shard_dir=str(tmp_path / "whole"))
    prepare_data(whole, console=quiet())
    monkeypatch.setattr(prepare, "TEXT_PART_CHARS", 2000)  # big.txt and other.txt in parts, small.txt whole
    monkeypatch.setattr(prepare, "SPILL_READ_TOKENS", 333)  # the tail split reads its spill back in pieces
    monkeypatch.setattr(prepare, "ENCODE_BATCH_CHARS", 3000)  # parts encoded a few at a time
    parts = config(tmp_path, whole.source, val_frac=0.1, val_split=val_split, shard_dir=str(tmp_path / "parts"))
    output = output_of(parts)
    expected, index = ShardIndex.load(whole.shard_dir), ShardIndex.load(parts.shard_dir, verify=True)
    for split in ("train", "val"):
        assert document_tokens(index, split) == document_tokens(expected, split)
        assert index.splits[split].documents == expected.splits[split].documents  # one document a file
    assert index.fingerprint == expected.fingerprint
    assert "3 of 3 text files had no Project Gutenberg header: kept whole (big.txt, other.txt, small.txt)" in output
    assert not [path for path in (tmp_path / "parts").iterdir() if path.is_dir()]  # no spill or build left


def test_a_big_gutenberg_file_is_still_read_whole_and_stripped(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "TEXT_PART_CHARS", 2000)
    body = big_own_text()
    source = own_corpus(tmp_path, {"pg5.txt": HEADER.format(title="FIVE") + body + FOOTER.format(title="FIVE")})
    index = ShardIndex.load(prepare_data(config(tmp_path, source, val_frac=0.1), console=quiet()))
    [train], [val] = document_tokens(index, "train").values(), document_tokens(index, "val").values()
    whole = HEADER.format(title="FIVE") + body + FOOTER.format(title="FIVE")
    assert train[:-1] + val[:-1] == encode(strip_gutenberg(whole))


def test_a_big_windows_file_is_read_in_parts_as_cp1252_and_said(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "TEXT_PART_CHARS", 2000)
    text = big_own_text(tricky=False).replace("quick", "\u201cquick\u201d\u2013caf\u00e9")
    source = own_corpus(tmp_path, {})
    source.mkdir()
    (source / "windows.txt").write_bytes(text.encode("cp1252"))
    output = output_of(config(tmp_path, source, val_frac=0.1))
    index = ShardIndex.load(tmp_path / "shards")
    tokens = document_tokens(index, "train")["windows.txt"][:-1] + document_tokens(index, "val")["windows.txt"][:-1]
    assert tokens == encode(text)
    assert "not UTF-8, so read as cp1252: 1 file (windows.txt)" in output


def test_a_big_file_with_nul_bytes_is_refused_by_name_before_any_part(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "TEXT_PART_CHARS", 2000)
    source = own_corpus(tmp_path, {})
    source.mkdir()
    (source / "wide.txt").write_bytes(big_own_text().encode("utf-16-le"))
    with pytest.raises(PrepareError, match=r"wide\.txt is not text tml can read: it holds NUL bytes"):
        prepare_data(config(tmp_path, source), console=quiet())


@pytest.mark.parametrize("run", ["\n", "\u00a0", " "])
def test_a_cut_never_falls_inside_a_whitespace_run_longer_than_its_window(tmp_path, run):
    """GPT-2 merges newlines in pairs and no-break spaces in fours: whether a cut inside a run is safe depends on where
    the run starts, which 256 characters of it either side cannot show."""
    text = "x" + run * 30001 + " end\n" + "word " * 2000  # no other place to cut within 4,096 of 1,000
    path = tmp_path / "f.txt"
    path.write_bytes(text.encode())
    parts = [part for part, _ in text_parts(path, "utf-8", 1000, encode)]
    assert "".join(parts) == text
    assert [token for part in parts for token in encode(part)] == encode(text)


def test_a_one_line_file_of_single_spaces_is_cut_before_a_word_at_the_first_try(tmp_path, monkeypatch):
    """text8's form: after a space is never a safe cut (GPT-2 gives the space to the next word), before it is."""
    text = " ".join(f"word{n % 97}" for n in range(3000))
    path = tmp_path / "f.txt"
    path.write_bytes(text.encode())
    calls = []
    parts = [part for part, _ in text_parts(path, "utf-8", 2000, lambda piece: calls.append(piece) or encode(piece))]
    assert len(parts) > 5 and all(part[-1] != " " and parts[i + 1][0] == " " for i, part in enumerate(parts[:-1]))
    assert len(calls) == 3 * (len(parts) - 1)  # one check of three encodes per cut
    assert [token for part in parts for token in encode(part)] == encode(text)


def test_a_bad_character_deep_in_a_marked_file_is_placed_by_its_file_offset(tmp_path, small_reads):
    data = "fine text\n".encode("utf-16") + "more".encode("utf-16-le") + b"\x00\xd8x\x00"  # a lone surrogate
    path = tmp_path / "f.txt"
    path.write_bytes(data)
    with pytest.raises(NotText, match=r"'utf-16-le' codec can't decode bytes in position 30-31: illegal UTF-16 "
                                      r"surrogate") as streamed:
        text_encoding(path)
    with pytest.raises(NotText) as whole:
        decode_text(data)
    assert str(streamed.value) == str(whole.value)


def test_a_big_utf32_gutenberg_file_is_recognised_past_its_byte_order_mark(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "TEXT_PART_CHARS", 2000)
    head = "x" * (1000 - len("Project Gutenberg")) + "Project Gutenberg"  # the mention ends at character 1,000
    text = head + HEADER.format(title="FIVE") + big_own_text(tricky=False) + FOOTER.format(title="FIVE")
    source = own_corpus(tmp_path, {})
    source.mkdir()
    (source / "pg5.txt").write_bytes(text.encode("utf-32"))
    index = ShardIndex.load(prepare_data(config(tmp_path, source, val_frac=0.1), console=quiet()))
    [train], [val] = document_tokens(index, "train").values(), document_tokens(index, "val").values()
    assert train[:-1] + val[:-1] == encode(strip_gutenberg(text))


def test_a_file_written_to_while_it_is_read_is_refused_by_name(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "TEXT_PART_CHARS", 2000)
    source = own_corpus(tmp_path, {"grows.txt": big_own_text(tricky=False)})
    decided = prepare.file_encoding

    def then_written_to(path):  # as a download still in progress would
        encoding = decided(path)
        with open(path, "ab") as file:
            file.write(b"\xff")
        return encoding

    monkeypatch.setattr(prepare, "file_encoding", then_written_to)
    with pytest.raises(PrepareError, match=r"grows\.txt changed while tml-prepare read it \(.*\); run tml-prepare "
                                           "again once nothing writes to it"):
        prepare_data(config(tmp_path, source), console=quiet())
