"""`tml train|prepare|generate|eval|export`: the user-facing commands over a trained run.

`train` and `prepare` take the experiment options (`--config FILE --section.key value`); the others work from a
checkpoint directory (or a run directory, meaning its `best`, else `last`), whose saved config rebuilds the model.
torch and Lightning are imported inside the commands that use them, so `tml prepare` and a config error in
`tml train` answer without paying the seconds their import takes.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tml.config import ConfigError

if TYPE_CHECKING:
    import torch

EVAL_BATCH_SIZE = 8  # windows per forward pass in `tml eval`: small enough for CPU memory at block size 512


def train_main(argv: Sequence[str]) -> int:
    """`tml train` / launch/local.py: load the config, prepare the shards when missing, train on this machine."""
    from tml.config import load_config
    from tml.data.gutenberg import GutenbergError
    from tml.data.prepare import PrepareError, data_is_ready, prepare_data
    from tml.data.shards import ShardError
    from tml.train.checkpoint import CheckpointError
    from tml.train.loop import TrainingDiverged, train

    try:
        config = load_config(argv)
    except ConfigError as error:
        print(f"tml: {error}", file=sys.stderr)
        return 2
    try:
        if not data_is_ready(config.data):
            prepare_data(config.data)
        result = train(config)
    except (GutenbergError, PrepareError, ShardError, TrainingDiverged, CheckpointError) as error:
        print(f"tml: {error}", file=sys.stderr)
        return 1
    if result.preempted:
        print(f"tml: preempted at step {result.final_step}; resume with --train.resume auto", file=sys.stderr)
    return 0


def load_model(checkpoint: str, device: torch.device) -> torch.nn.Module:
    from tml.model import Transformer
    from tml.train.checkpoint import load_model_weights

    state, config = load_model_weights(checkpoint)
    model = Transformer(config.model)
    model.load_state_dict(state)
    return model.to(device).eval()


def default_device() -> torch.device:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from tml.data.tokenizer import get_tokenizer

    device = default_device()
    model = load_model(args.checkpoint, device)
    tokenizer = get_tokenizer()
    prompt = tokenizer.encode(args.prompt, allowed_special="all") or [tokenizer.eot_token]
    idx = torch.tensor([prompt], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    room = model.config.block_size - idx.shape[1]
    if room < args.max_new_tokens:
        raise ValueError(f"prompt of {idx.shape[1]} tokens + --max-new-tokens {args.max_new_tokens} exceeds "
                         f"the model's block_size {model.config.block_size}")
    out = model.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, generator=generator)
    print(tokenizer.decode(out[0].tolist()))
    return 0


def text_loss(model, tokens: list[int], device: torch.device) -> tuple[float, int]:
    """Mean next-token loss over non-overlapping block_size windows of `tokens` (the tail window included)."""
    import torch

    from tml.model.transformer import IGNORE_INDEX

    block = model.config.block_size
    data = torch.tensor(tokens, dtype=torch.long)
    starts = list(range(0, len(tokens) - 1, block))
    total, count = 0.0, 0
    for i in range(0, len(starts), EVAL_BATCH_SIZE):
        rows = [data[s : s + block + 1] for s in starts[i : i + EVAL_BATCH_SIZE]]
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
    return total / count, count


def cmd_eval(args: argparse.Namespace) -> int:
    from tml.data.tokenizer import get_tokenizer
    from tml.train.evaluate import perplexity

    device = default_device()
    model = load_model(args.checkpoint, device)
    path = Path(args.data)
    if not path.is_file():
        raise FileNotFoundError(f"--data {path}: no such text file")
    tokens = get_tokenizer().encode_ordinary(path.read_text(encoding="utf-8", errors="replace"))
    if len(tokens) < 2:
        raise ValueError(f"--data {path}: needs at least two tokens of text")
    loss, count = text_loss(model, tokens, device)
    print(f"{path}: {count:,} tokens | loss {loss:.4f} | perplexity {perplexity(loss):.2f}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """One plain fp32 state dict from any checkpoint (DeepSpeed ZeRO shards are consolidated)."""
    from tml.train.checkpoint import load_model_weights
    from tml.train.zero_export import save_fp32_state_dict

    state, _ = load_model_weights(args.checkpoint)
    output = save_fp32_state_dict(state, args.output)
    print(f"wrote {output} ({len(state)} tensors)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tml", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("train", help="train: --config FILE [--section.key value ...]", add_help=False)
    commands.add_parser("prepare", help="build token shards: --config FILE [--data.key value ...]", add_help=False)

    generate = commands.add_parser("generate", help="sample text from a checkpoint (latent KV cache)")
    generate.add_argument("--checkpoint", required=True, help="checkpoint or run directory")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=100)
    generate.add_argument("--temperature", type=float, default=0.8)
    generate.add_argument("--top-k", type=int, default=None)
    generate.add_argument("--top-p", type=float, default=None)
    generate.add_argument("--seed", type=int, default=1337)

    evaluate = commands.add_parser("eval", help="perplexity of a checkpoint on a text file")
    evaluate.add_argument("--checkpoint", required=True, help="checkpoint or run directory")
    evaluate.add_argument("--data", required=True, help="a UTF-8 text file")

    export = commands.add_parser("export", help="write one fp32 state dict (consolidates DeepSpeed ZeRO shards)")
    export.add_argument("--checkpoint", required=True, help="checkpoint or run directory")
    export.add_argument("--output", required=True, help="output .pt file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        return train_main(argv[1:])
    if argv and argv[0] == "prepare":
        from tml.data.prepare import main as prepare_main

        return prepare_main(argv[1:])
    args = build_parser().parse_args(argv)
    from tml.train.checkpoint import CheckpointError

    handlers = {"generate": cmd_generate, "eval": cmd_eval, "export": cmd_export}
    try:
        return handlers[args.command](args)
    except (CheckpointError, ConfigError, ValueError, FileNotFoundError) as error:
        print(f"tml {args.command}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
