"""A trained model measured on a text file: the text read as tml-prepare reads a corpus file, windows of any
context (shorter or longer than trained, or with YaRN), the loss and bits per byte of `tml eval`, and the windows
`tml inspect` spreads over a book. The commands' arguments and output are tml/cli.py's.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import torch
from rich.progress import Progress

from tml.data.clean import has_gutenberg_header, strip_gutenberg
from tml.data.gutenberg import not_a_corpus_file
from tml.data.jsonl import SURROGATES_REPLACED, JsonlError, is_jsonl, lines_shown, read_jsonl
from tml.data.text_files import NotText, decode_text
from tml.model import ModelConfig, ModelConfigError, Transformer
from tml.model.transformer import IGNORE_INDEX

# Tokens per forward pass in `tml eval` (8 windows at block size 512), whatever --context is: a longer window goes
# through alone. The model projects a pass's positions onto the vocabulary in chunks (NO_GRAD_LOSS_CHUNK), so no
# window is too long for memory; its attention's time grows with the square of its length.
EVAL_BATCH_TOKENS = 4096


def check_context(context: int | None) -> None:
    if context is not None and context < 2:
        raise ValueError(f"--context {context}: a window needs at least 2 tokens (one to predict from)")


def read_at_context(model: Transformer, context: int, command: str) -> None:
    """Let `model` read windows of `context` tokens, shorter or longer than it was trained on: RoPE has no learned
    positions, so the same weights apply; positions past what it reads (its block, or with YaRN the factor times the
    context it was trained at) are said to be new to it."""
    config = model.config
    if config.rope_yarn_factor > 1.0:
        reach = int(config.rope_yarn_factor * config.rope_yarn_original_block_size)
        what = f"the {reach} tokens YaRN x{config.rope_yarn_factor:g} extends its {config.rope_yarn_original_block_size} to"
    else:
        reach, what = config.block_size, f"the {config.block_size} tokens the model was trained on"
    if context > reach:
        print(f"tml {command}: --context {context} is longer than {what}: positions past that are new to it",
              file=sys.stderr)
    model.config = dataclasses.replace(config, block_size=context)


def read_with_yarn(model, factor: float):
    """The same weights reading positions with YaRN at `factor`, its cut-offs measured against the model's own
    block_size (the context it was trained at): the YaRN paper's extension without fine-tuning. A new model, since
    each attention derives its rotary frequencies and softmax scale from the config once."""
    if model.config.rope_yarn_factor > 1.0:
        raise ValueError(f"--rope-yarn-factor {factor}: the model reads with YaRN already (model.rope_yarn_factor="
                         f"{model.config.rope_yarn_factor}, trained at {model.config.rope_yarn_original_block_size})")
    try:
        config = dataclasses.replace(model.config, rope_yarn_factor=factor,
                                     rope_yarn_original_block_size=model.config.block_size)
    except ModelConfigError as error:
        raise ValueError(f"--rope-yarn-factor {factor}: {error}") from error
    weights = next(model.parameters())
    with torch.device(weights.device):
        scaled = Transformer(config)
    scaled.load_state_dict(model.state_dict())
    return scaled.to(weights.dtype).eval()


def text_loss(model: Transformer, tokens: list[int], device: torch.device, progress: Progress | None = None,
              context: int | None = None) -> tuple[float, int]:
    """Mean next-token loss over non-overlapping windows of `context` tokens (default: the model's block_size) of
    `tokens`, the tail window included.

    `progress`, when given, gets a task advanced once per batch of windows.
    """
    block = context or model.config.block_size
    windows_per_batch = max(1, EVAL_BATCH_TOKENS // block)
    data = torch.tensor(tokens, dtype=torch.long)
    starts = list(range(0, len(tokens) - 1, block))
    batch_starts = range(0, len(starts), windows_per_batch)
    task = progress.add_task("eval", total=len(batch_starts)) if progress is not None else None
    total, count = 0.0, 0
    for i in batch_starts:
        rows = [data[s : s + block + 1] for s in starts[i : i + windows_per_batch]]
        width = max(len(r) for r in rows) - 1
        x = torch.zeros(len(rows), width, dtype=torch.long)
        y = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)  # padding: not counted by the loss
        for j, row in enumerate(rows):
            x[j, : len(row) - 1], y[j, : len(row) - 1] = row[:-1], row[1:]
        with torch.no_grad():
            _, loss = model(x.to(device), y.to(device), return_logits=False)
        tokens_here = int((y != IGNORE_INDEX).sum())
        total += loss.item() * tokens_here
        count += tokens_here
        if task is not None:
            progress.advance(task)
    return total / count, count


def read_text_file(path: Path, command: str = "eval", text_field: str = "text") -> str:
    """The file's text, read as tml-prepare reads a corpus file (byte-order marks, UTF-8, else cp1252 or Latin-1,
    said on stderr; a Project Gutenberg file without its header and footer, said too), so held-out text evaluates
    as it would train. A .jsonl file's records (their `text_field`) are read as one text, a blank line between
    two; tml-prepare puts <|endoftext|> there, which is no text to measure bits per byte on. A binary file is
    refused: decoding it "with replacement" would evaluate the model on noise for minutes and report a meaningless
    perplexity."""
    if not path.exists():
        raise FileNotFoundError(f"--data {path}: no such file")
    if not path.is_file():
        raise ValueError(f"--data {path} is not a file (a text file is needed)")
    if (why := not_a_corpus_file(path)) is not None:
        raise ValueError(f"--data {path} is {why}")
    if is_jsonl(path):
        try:
            records = read_jsonl(path, text_field, "--text-field")
        except JsonlError as error:
            raise ValueError(f"--data {path}: {error}") from None
        count = len(records.documents)
        print(f"tml {command}: --data {path} is JSON Lines: the {text_field!r} field of its {count:,} "
              f"record{'' if count == 1 else 's'}, read as one text with a blank line between records", file=sys.stderr)
        if records.repaired_lines:
            print(f"tml {command}: --data {path}: {SURROGATES_REPLACED} {lines_shown(records.repaired_lines)}",
                  file=sys.stderr)
        return "\n\n".join(records.documents)
    try:
        text, encoding = decode_text(path.read_bytes())
    except NotText as error:
        raise ValueError(f"--data {path} is not a text file: {error}") from None
    if encoding not in ("utf-8", "utf-8-sig"):
        print(f"tml {command}: --data {path} is not UTF-8: read as {encoding}", file=sys.stderr)
    if has_gutenberg_header(text):  # the licence is not the book: tml-prepare trains without it too
        text = strip_gutenberg(text, name=str(path))
        print(f"tml {command}: --data {path} is a Project Gutenberg file: its header and footer are left out, as "
              "tml-prepare leaves them out", file=sys.stderr)
    return text


def predicted_bytes(text: str, first_token: int) -> int:
    """The UTF-8 bytes of the tokens a loss over `text` predicts: all but the first token's (nothing precedes it).
    UTF-8 whatever the file's encoding, so the same text scores the same from a cp1252 or a UTF-8 file."""
    from tml.data.tokenizer import get_tokenizer

    return len(text.encode("utf-8")) - len(get_tokenizer().decode_single_token_bytes(first_token))


def bits_per_byte(mean_loss: float, tokens: int, text_bytes: int) -> float:
    """The loss per byte of UTF-8 text in bits: unlike a perplexity it does not depend on the tokenizer, so models
    with other vocabularies (a character-level one, another BPE) are compared on the same scale."""
    return mean_loss * tokens / (math.log(2) * text_bytes)


def window_starts(total: int, context: int, windows: int) -> list[int]:
    """Where `windows` windows of `context` tokens start, spread evenly from a text's first token to its last full
    window: a book's statistics come from all of it, not its opening. They overlap when the text is short."""
    last = total - context
    return [round(i * last / (windows - 1)) for i in range(windows)] if windows > 1 else [0]


def cache_description(config: ModelConfig) -> str:
    """What one layer caches per token, in words: the columns `tml inspect` measures the rank of."""
    if config.attention == "mla":
        return (f"a {config.kv_lora_rank}-wide latent (its {config.qk_rope_head_dim}-wide shared RoPE key is cached "
                "too, left out of the rank)")
    return (f"keys and values of {config.kv_heads} kv head{'s' if config.kv_heads > 1 else ''} x "
            f"{config.mha_head_dim} dims, {2 * config.kv_heads * config.mha_head_dim} wide")


def uniform_entropy(context: int) -> float:
    """The mean entropy of attention spread evenly over every key a query sees: query t has t+1, so ln(T!)/T."""
    return math.lgamma(context + 1) / context


