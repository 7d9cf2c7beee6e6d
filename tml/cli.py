"""`tml train|prepare|slurm|generate|eval|inspect|export|compare`: train runs, then use and compare them.

`train`, `prepare` and `slurm` take the experiment options (`--config FILE --section.key value`); generate, eval,
inspect and export work from a checkpoint directory (or a run directory, meaning its `best`, else `last`), whose saved
config rebuilds the model; `compare` tabulates the final numbers of run directories (tml/compare.py).
torch and Lightning are imported inside the commands that use them, so `tml prepare` and a config error in
`tml train` answer without paying the seconds their import takes.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import math
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from tml.compare import DEFAULT_SORT, FIELDS, CompareError, compare_runs, print_table, read_summary
from tml.config import ConfigError, with_default_config
from tml.run_dir import another_runs_config
from tml.sweep import is_sweep
from tml.train.preemption import CTRL_C_EXIT_STATUS, DEFAULT_SIGNALS, INTERACTIVE_SIGNALS, PreemptionFlag
from tml.train.ranks import is_first_local_process

if TYPE_CHECKING:
    from jsonargparse import ArgumentParser


# Windows `tml inspect` reads by default: 8 x 512 tokens give each layer's cache 4,096 rows, more than the widest cache
# of the reference shapes has columns (MHA's 1,536), so the rank measured is not capped by the number of tokens.
INSPECT_WINDOWS = 8
# The share of the block new tokens may claim from a long prompt: enough to generate, while keeping most context.
GENERATE_ROOM_FRACTION = 0.5
TRAIN_DESCRIPTION = (
    "Train on this machine: --config FILE, then --section.key value overrides. A sweep: --sweep KEY=V1,V2,... "
    "(repeatable) trains one run per combination of the values, one after the other, each in its own directory "
    "under train.out_dir; the same command again continues it. --dry-run checks the run (each run of a sweep) and "
    "says what a start would do, training nothing."
)
DRY_RUN_FLAG = "--dry-run"
TRAIN_FLAGS = (
    "Read before the config, on the command line only: --sweep KEY=V1,V2,... (repeatable) one run per combination "
    "of the values, each in its own directory under train.out_dir; --dry-run checks the run (each run of a sweep) "
    "and says what a start would do, training nothing."
)
SEED_RANGE = (-(2**63), 2**64)  # what torch.Generator.manual_seed accepts


def train_main(argv: Sequence[str], prog: str | None = None) -> int:
    """`tml train` / launch/local.py: load the config, prepare the shards when missing, train on this machine.

    Exit status: 0 when training ends or is stopped by a scheduler's signal (`last` saved; SLURM requeues),
    130 (the shell's "ended by Ctrl-C") when Ctrl-C stopped it, cleanly or not, 1 on an error, 2 on a bad config.
    """
    argv = with_default_config(argv)
    dry_run = DRY_RUN_FLAG in argv
    argv = [arg for arg in argv if arg != DRY_RUN_FLAG]
    if is_sweep(argv):
        return sweep_main(argv, prog, dry_run)
    if dry_run:
        return dry_run_main(argv, prog)
    # From the first line on, a scheduler's signal is a stop request, never death by its default action; so is
    # Ctrl-C in a rank Fabric started (one dying of it would take the others down): every rank stops at the first
    # step together. Rank 0's Ctrl-C interrupts until training starts: nothing is begun that needs saving.
    stop = PreemptionFlag().install(DEFAULT_SIGNALS if is_first_local_process() else INTERACTIVE_SIGNALS)
    try:
        return start_and_train(argv, prog, stop)
    except KeyboardInterrupt:  # rank 0, while reading its config or importing torch and Lightning
        print("tml: interrupted while starting; nothing was trained or written", file=sys.stderr)
        return CTRL_C_EXIT_STATUS
    finally:
        stop.uninstall()  # the loop does it too, but not when it fails before its first step


def start_and_train(argv: Sequence[str], prog: str | None, stop: PreemptionFlag) -> int:
    """train_main's work once `stop` listens: config, run lock, data, training, and the exit status."""
    from contextlib import ExitStack

    from tml.config import load_config
    from tml.train.parent_death import die_with_local_rank0
    from tml.train.run_lock import RunLockError, hold_run_lock, is_lock_holder

    die_with_local_rank0()  # the extra local ranks Fabric starts end with this process, even under kill -9
    try:
        config = load_config(argv, train_parser(prog))
    except ConfigError as error:
        print(f"tml: {error}", file=sys.stderr)
        return 2
    if (notice := another_runs_config(argv, config.train.out_dir)) and is_first_local_process():
        print(f"tml: {notice}", file=sys.stderr)
    with ExitStack() as run_lock:  # held until training ends; before the imports, so a refusal comes at once
        if is_lock_holder():
            if not Path(config.train.out_dir).exists():  # a start that fails before training leaves no empty run dir
                run_lock.callback(remove_if_only_lock, Path(config.train.out_dir))
            try:
                run_lock.enter_context(hold_run_lock(config.train.out_dir))
            except RunLockError as error:
                print(f"tml: {error}", file=sys.stderr)
                return 1
        # Imported after the config is known to be good: torch and Lightning take seconds to import.
        from tml.data.gutenberg import GutenbergError
        from tml.data.prepare import PrepareError, data_is_ready, prepare_data, shards_without_source
        from tml.data.shards import ShardError
        from tml.train.checkpoint import CheckpointError
        from tml.train.loop import TrainingDiverged, train
        from tml.train.preflight import check_run_can_start

        try:
            check_run_can_start(config)  # a refused resume must not first rebuild the shards the run was trained on
            if not data_is_ready(config.data):
                try:
                    prepare_data(config.data)
                except KeyboardInterrupt:  # before training: one process, and nothing of the run to speak of
                    print(f"tml: interrupted while preparing {config.data.shard_dir}; the next run starts the "
                          "unfinished preparation again", file=sys.stderr)
                    return CTRL_C_EXIT_STATUS
            elif (standing_alone := shards_without_source(config.data)) and is_first_local_process():
                print(f"tml: {standing_alone}", file=sys.stderr)
            # A signal that came while starting stops the run at its first step, where every rank agrees.
            result = train(config, stop.install([signal.SIGINT]))
        # Every rank of the machine raises the same error together (the loop agrees on its decisions): one prints it.
        except ConfigError as error:  # a setting this machine cannot run (train.accelerator=cuda without CUDA)
            if is_first_local_process():
                print(f"tml: {error}", file=sys.stderr)
            return 2
        # OSError: a disk that is full or read-only where the run writes (config.yaml, checkpoints, summary.json).
        except (GutenbergError, PrepareError, ShardError, TrainingDiverged, CheckpointError, OSError) as error:
            if is_first_local_process():
                print(f"tml: {error}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:  # the second Ctrl-C, or rank 0's first before training
            if is_first_local_process():
                print(f"tml: aborted; checkpoints in {config.train.out_dir}, if any, are as last saved",
                      file=sys.stderr)
            return CTRL_C_EXIT_STATUS
    if not result.preempted:
        if stop.interrupted:  # pressed while the last step's validation or save ran: nothing was cut short
            if is_first_local_process():
                print(f"tml: Ctrl-C came as the run finished: it is complete at step {result.final_step}",
                      file=sys.stderr)
            return CTRL_C_EXIT_STATUS if is_first_local_process() else 0
        return 0
    if stop.interrupted:
        if is_first_local_process():
            print(f"tml: stopped at step {result.final_step} (Ctrl-C); last checkpoint saved, "
                  "resume with --train.resume auto", file=sys.stderr)
        # Only the first process: Fabric's launcher kills every rank as soon as one of its children exits non-zero.
        return CTRL_C_EXIT_STATUS if is_first_local_process() else 0
    if is_first_local_process():
        print(f"tml: preempted by {stop.describe()} at step {result.final_step}; resume with --train.resume auto",
              file=sys.stderr)
    return 0


def train_parser(prog: str | None) -> ArgumentParser:
    """The config parser with what --help should say of training (prog: `tml train` or launch/local.py)."""
    from tml.config import build_parser

    # --sweep and --dry-run are read before the config (train_main), so they are no parser arguments (a config
    # file could set those): the epilog lists them beside the options.
    return build_parser(prog=prog, description=TRAIN_DESCRIPTION, epilog=TRAIN_FLAGS)


def dry_run_main(argv: Sequence[str], prog: str | None) -> int:
    """`tml train ... --dry-run`: the run's checks and what a start would do (fresh, resumed at step N, ...), in a
    line; nothing is trained, prepared or written. A start that would be refused is, with `tml train`'s exit
    status for it."""
    from tml.config import load_config
    from tml.data.gutenberg import GutenbergError
    from tml.data.prepare import PrepareError
    from tml.data.shards import ShardError
    from tml.train.checkpoint import CheckpointError
    from tml.train.preflight import describe_start
    from tml.train.run_lock import RunLockError

    try:
        config = load_config(argv, train_parser(prog))
        if notice := another_runs_config(argv, config.train.out_dir):
            print(f"tml: {notice}", file=sys.stderr)
        print(f"tml: {config.train.out_dir}: {describe_start(config)}")
    except ConfigError as error:
        print(f"tml: {error}", file=sys.stderr)
        return 2
    except (CheckpointError, GutenbergError, PrepareError, RunLockError, ShardError, OSError) as error:
        print(f"tml: {error}", file=sys.stderr)
        return 1
    print(f"tml: nothing trained ({DRY_RUN_FLAG})", file=sys.stderr)
    return 0


def sweep_main(argv: Sequence[str], prog: str | None, dry_run: bool = False) -> int:
    """`... --sweep KEY=V1,V2`: every combination is checked first, then each is trained in turn (tml/sweep.py).
    With --dry-run, each run's line of what its start would do instead."""
    from tml.config import load_config
    from tml.data.gutenberg import GutenbergError
    from tml.sweep import SweepError, check_runs, describe_sweep, expand_sweep, run_sweep_here, split_sweep_arguments
    from tml.train.checkpoint import CheckpointError

    try:
        experiment, axes = split_sweep_arguments(argv)
        runs = expand_sweep(experiment, axes, lambda args: load_config(args, train_parser(prog)))
        if dry_run:
            lines, status = describe_sweep(runs)
            print("\n".join(lines))
            print(f"tml: nothing trained ({DRY_RUN_FLAG})", file=sys.stderr)
            return status
        check_runs(runs)
        return run_sweep_here(runs)
    except (SweepError, ConfigError) as error:
        print(f"tml: {error}", file=sys.stderr)
        return 2
    except (CheckpointError, GutenbergError, OSError) as error:  # a run that cannot start; an out_dir not made
        print(f"tml: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # while checking, or between two runs: no training is under way
        print("tml: sweep interrupted", file=sys.stderr)
        return CTRL_C_EXIT_STATUS


def remove_if_only_lock(out_dir: Path) -> None:
    """Remove a run directory this start created and left holding nothing but its lock file (called after the lock
    is released; a directory with anything else in it stays)."""
    from tml.train.run_lock import LOCK_FILE

    try:
        if [path.name for path in out_dir.iterdir()] == [LOCK_FILE]:
            (out_dir / LOCK_FILE).unlink()
            out_dir.rmdir()
    except OSError:  # gone already, or not ours to remove: nothing to tidy
        pass


def chosen_checkpoint(command: str, path: str) -> str:
    """`path`, after saying which checkpoint a run directory means (its `best`, else `last`), since the user did not
    name one. The path itself is passed on, not the step directory: loading follows a `last` or `best` again when a
    training still running prunes its step mid-read (checkpoint.read_weights)."""
    from tml.run_dir import checkpoints_dir

    if Path(path).is_file():  # weights written by tml export
        return path
    directory = Path(weights_named(path))
    if directory != Path(path).resolve():
        best = checkpoints_dir(path) / "best"
        which = "best" if best.exists() and best.resolve() == directory else "last"
        diverged = " from before the run diverged" if run_diverged(Path(path)) else ""
        print(f"tml {command}: using {directory} (the run's {which}{diverged}; name a checkpoint directory to use "
              "another)", file=sys.stderr)
    return path


def weights_named(path: str) -> str:
    """What loading `path` reads now: an exported file as named, else its checkpoint directory (a run's best, else
    last)."""
    from tml.train.checkpoint import find_checkpoint

    return path if Path(path).is_file() else str(find_checkpoint(path))


def run_diverged(run_dir: Path) -> bool:
    """What the run's summary.json says; False when there is none or it cannot be read."""
    try:
        return bool(read_summary(run_dir).get("diverged"))
    except (OSError, ValueError):  # read_summary refuses what is not a summary with a ValueError
        return False


def n_tokens(count: int) -> str:
    return f"{count:,} token" + ("" if count == 1 else "s")


def sampling_options(args: argparse.Namespace) -> dict:
    """The CLI's sampling flags as `Transformer.generate` takes them: --top-k 0 and --top-p 1 mean "off" (None)."""
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} must be >= 0")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ValueError(f"--temperature {args.temperature} must be a number >= 0 (0 = greedy)")
    if args.top_k < 0:
        raise ValueError(f"--top-k {args.top_k} must be >= 1, or 0 for off")
    if not 0.0 < args.top_p <= 1.0:
        raise ValueError(f"--top-p {args.top_p} must be in (0, 1]; 1 is off")
    if args.num_samples < 1:
        raise ValueError(f"--num-samples {args.num_samples} must be >= 1")
    if not SEED_RANGE[0] <= args.seed < SEED_RANGE[1]:
        raise ValueError(f"--seed {args.seed} must be in [-2**63, 2**64), the range torch's generator takes")
    return {"temperature": args.temperature, "top_k": args.top_k or None,
            "top_p": args.top_p if args.top_p < 1.0 else None}


def prompt_tokens_kept(prompt_tokens: int, max_new_tokens: int, block_size: int) -> int:
    """How many of the prompt's last tokens fit: new tokens are guaranteed min(max_new_tokens, half the block)
    positions (at least one), and the prompt keeps the rest of the block. Prompt plus new tokens must fit in the
    block: RoPE positions past it were never trained."""
    reserved = max(1, min(max_new_tokens, int(block_size * GENERATE_ROOM_FRACTION)))
    return min(prompt_tokens, block_size - reserved)


def check_token_ids(tokens: Sequence[int], vocab_size: int, what: str) -> None:
    """Every GPT-2 token id must have a row in the model's embedding (a model trained with a smaller vocabulary
    than GPT-2's cannot read this text); refused in one line, not an IndexError from inside the embedding."""
    if tokens and (highest := max(tokens)) >= vocab_size:
        raise ValueError(f"{what} holds GPT-2 token id {highest:,}, beyond this model's vocab_size {vocab_size:,}: "
                         "the model cannot read it")


def cmd_generate(args: argparse.Namespace) -> int:
    """Sample from a checkpoint; a prompt too long for the block keeps its last tokens (prompt_tokens_kept), and
    when prompt + --max-new-tokens still overflows the block, generate what fits. Both are said on stderr."""
    import torch

    from tml.data.tokenizer import get_tokenizer
    from tml.pretrained import default_device, load
    from tml.text_eval import check_context, read_at_context

    options = sampling_options(args)
    check_context(args.context)
    device = default_device()
    model = load(chosen_checkpoint("generate", args.checkpoint), device, args.dtype)
    if args.context is not None:
        read_at_context(model, args.context, "generate")
    tokenizer = get_tokenizer()
    prompt = tokenizer.encode(args.prompt, allowed_special="all")
    if not prompt:  # an empty prompt: continue from a document boundary, as at the start of a book in training
        print("tml generate: empty prompt: generating from <|endoftext|>, the start of a document", file=sys.stderr)
    skip = 0 if prompt else 1  # the <|endoftext|> the user never typed is not printed
    prompt = prompt or [tokenizer.eot_token]
    check_token_ids(prompt, model.config.vocab_size, "--prompt")
    block = model.config.block_size
    limit = f"--context {block}" if args.context is not None else f"the model's block_size {block}"
    kept = prompt_tokens_kept(len(prompt), args.max_new_tokens, block)
    if kept < len(prompt):
        print(f"tml generate: dropped the first {n_tokens(len(prompt) - kept)} of the prompt's {len(prompt):,}, "
              f"keeping its last {kept:,} so that {block - kept} new fit in {limit}", file=sys.stderr)
        prompt = prompt[-kept:]
    room = block - len(prompt)
    new_tokens = min(args.max_new_tokens, room)
    if new_tokens < args.max_new_tokens:
        print(f"tml generate: generating {n_tokens(new_tokens)}, not {args.max_new_tokens}: a prompt of "
              f"{n_tokens(len(prompt))} leaves {room} of {limit}", file=sys.stderr)
    print(cache_line(model, len(prompt) + new_tokens, args.num_samples), file=sys.stderr)
    idx = torch.tensor([prompt] * args.num_samples, dtype=torch.long, device=device)  # one batch, one cache
    generator = torch.Generator(device=device).manual_seed(args.seed)
    out = model.generate(idx, new_tokens, generator=generator, vocab_limit=tokenizer.n_vocab, **options)
    for number, sample in enumerate(out, start=1):
        if args.num_samples > 1:
            print(f"--- sample {number} of {args.num_samples} ---")
        print(tokenizer.decode(sample[skip:].tolist()))
    return 0


def cache_line(model, positions: int, samples: int) -> str:
    """What the KV cache of this generation holds: MLA's point, in bytes."""
    from tml.model.kv_cache import cache_numbers_per_token

    dtype = next(model.parameters()).dtype
    per_token = model.kv_cache_bytes_per_token(dtype)
    total = per_token * positions * samples
    size = f"{total / 2**20:,.1f} MiB" if total >= 2**20 else f"{total / 2**10:,.1f} KiB"
    return (f"tml generate: KV cache {cache_numbers_per_token(model.config)} numbers/token/layer in "
            f"{str(dtype).removeprefix('torch.')}: {per_token:,} B/token, {size} for {positions:,} positions x "
            f"{samples} sample{'s' if samples > 1 else ''}")


def eval_progress() -> Progress:
    """A transient bar on stderr, shown only on a terminal: stdout keeps just the result line."""
    console = Console(stderr=True)
    return Progress(TextColumn("[bold]eval"), BarColumn(), MofNCompleteColumn(), TextColumn("batches"),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True,
                    disable=not console.is_terminal)


def cmd_eval(args: argparse.Namespace) -> int:
    from tml.data.tokenizer import get_tokenizer
    from tml.pretrained import default_device, load
    from tml.text_eval import (
        bits_per_byte,
        check_context,
        predicted_bytes,
        read_at_context,
        read_text_file,
        read_with_yarn,
        text_loss,
    )
    from tml.train.evaluate import format_perplexity, perplexity

    path = Path(args.data)
    check_context(args.context)
    text = read_text_file(path, "eval", args.text_field)  # before the model loads: a wrong file is refused at once
    device = default_device()
    # The directory chosen_checkpoint names on stderr (a training pruning it in between would make load read the
    # run's newer one: checkpoint.read_weights follows `best`/`last` again).
    used = weights_named(args.checkpoint)
    model = load(chosen_checkpoint("eval", args.checkpoint), device, args.dtype)
    tokens = get_tokenizer().encode_ordinary(text)
    check_token_ids(tokens, model.config.vocab_size, f"--data {path}")
    if len(tokens) < 2:
        raise ValueError(f"--data {path}: needs at least two tokens of text")
    trained = model.config.block_size
    if args.rope_yarn_factor is not None:
        model = read_with_yarn(model, args.rope_yarn_factor)
    context = min(args.context or trained, len(tokens) - 1)  # the window really read: a short file is one
    read_at_context(model, context, "eval")
    with eval_progress() as progress:
        loss, count = text_loss(model, tokens, device, progress, context)
    text_bytes = predicted_bytes(text, tokens[0])
    bpb = bits_per_byte(loss, count, text_bytes)
    if args.json:
        # "checkpoint" as given; "weights": the checkpoint directory (a run's best, else last) or export read
        print(json.dumps({"data": str(path), "checkpoint": args.checkpoint, "weights": used, "tokens": count,
                          "context": context, "trained_context": trained, "rope_yarn_factor": model.config.rope_yarn_factor,
                          "dtype": args.dtype, "loss": loss, "perplexity": perplexity(loss), "bytes": text_bytes,
                          "bits_per_byte": bpb}))
    else:
        windows = f" | context {context} (trained at {trained})" if context != trained else ""
        if model.config.rope_yarn_factor > 1.0:
            windows += f" | YaRN x{model.config.rope_yarn_factor:g}"
        print(f"{path}: {n_tokens(count)}{windows} | loss {loss:.4f} | perplexity "
              f"{format_perplexity(perplexity(loss))} | {bpb:.4f} bits per byte")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """Per layer: the effective rank of the KV cache, the largest attention logit and the attention entropy, on
    windows of a text file (tml/model/diagnostics.py)."""
    import torch

    from tml.data.tokenizer import get_tokenizer
    from tml.model.diagnostics import WINDOWS_PER_PASS, attention_statistics_over
    from tml.pretrained import default_device, load
    from tml.text_eval import (
        cache_description,
        check_context,
        read_at_context,
        read_text_file,
        uniform_entropy,
        window_starts,
    )

    path = Path(args.data)
    check_context(args.context)
    if args.windows < 1:
        raise ValueError(f"--windows {args.windows} must be >= 1")
    text = read_text_file(path, "inspect", args.text_field)  # before the model loads: a wrong file is refused at once
    device = default_device()
    used = weights_named(args.checkpoint)
    model = load(chosen_checkpoint("inspect", args.checkpoint), device, args.dtype)
    tokens = get_tokenizer().encode_ordinary(text)
    check_token_ids(tokens, model.config.vocab_size, f"--data {path}")
    trained = model.config.block_size
    context = args.context or trained
    if len(tokens) < context:
        raise ValueError(f"--data {path}: {n_tokens(len(tokens))}, shorter than one window of {context} (a longer "
                         "text, or a shorter --context)")
    read_at_context(model, context, "inspect")
    windows = min(args.windows, len(tokens) - context + 1)
    if windows < args.windows:
        print(f"tml inspect: --data {path} holds {windows:,} different windows of {context} tokens: reading those, "
              f"not {args.windows:,}", file=sys.stderr)
    data = torch.tensor(tokens, dtype=torch.long)
    starts = window_starts(len(tokens), context, windows)
    batches = (torch.stack([data[start : start + context] for start in starts[first : first + WINDOWS_PER_PASS]])
               .to(device) for first in range(0, len(starts), WINDOWS_PER_PASS))  # built as read: memory stays flat
    layers = attention_statistics_over(model, batches)
    kind, cache = model.config.attention_kind, cache_description(model.config)
    if args.json:
        print(json.dumps({"data": str(path), "checkpoint": args.checkpoint, "weights": used, "attention": kind,
                          "cache": cache, "windows": windows, "context": context, "trained_context": trained,
                          "dtype": args.dtype, "uniform_entropy": uniform_entropy(context),
                          "layers": [dataclasses.asdict(layer) | {"cache_rank_fraction": layer.cache_rank_fraction}
                                     for layer in layers]}))
        return 0
    console = Console(highlight=False)
    console.print(f"{used}: {kind}, caching per token and layer {cache}; {windows} window"
                  f"{'s' if windows > 1 else ''} of {context} tokens of {path} (uniform attention: entropy "
                  f"{uniform_entropy(context):.2f} nats)", soft_wrap=True)
    table = Table(show_edge=False, header_style="bold")
    for header in ("layer", "cache rank used", "of width", "%", "max logit", "entropy (nats)"):
        table.add_column(header, justify="right", no_wrap=True)
    for layer in layers:
        table.add_row(str(layer.layer), f"{layer.cache_effective_rank:.1f}", str(layer.cache_width),
                      f"{100 * layer.cache_rank_fraction:.0f}%", f"{layer.max_logit:.2f}", f"{layer.mean_entropy:.2f}")
    console.print(table)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """One plain fp32 state dict from any checkpoint (DeepSpeed ZeRO shards are consolidated), and beside it the
    JSON that describes its model (tml/pretrained.py)."""
    from tml.pretrained import check_export_path, export

    output = Path(args.output)
    check_export_path(output)  # before the notice of which checkpoint a run directory means: refused at once
    weights, description, tensors = export(chosen_checkpoint("export", args.checkpoint), output)
    print(f"wrote {weights} ({tensors} tensors) and {description} (its model)")
    print(f"load it in Python: import tml; model = tml.load({str(weights.resolve())!r})")
    return 0


def installed_version() -> str:
    """The version pip installed (pyproject.toml's), for `tml --version` and bug reports."""
    try:
        return importlib.metadata.version("tml")
    except importlib.metadata.PackageNotFoundError:  # a checkout on sys.path, never installed
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tml", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"tml {installed_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("train", help="train: --config FILE [--section.key value ...]", add_help=False)
    commands.add_parser("prepare", help="build token shards: --config FILE [--data.key value ...]", add_help=False)
    commands.add_parser("slurm", help="submit training to SLURM: --config FILE --nodes N [SLURM options] [--section.key "
                        "value ...]", add_help=False)

    generate = commands.add_parser("generate", help="sample text from a checkpoint (latent KV cache)")
    generate.add_argument("--checkpoint", required=True, help="checkpoint or run directory, or a file tml export wrote")
    generate.add_argument("--prompt", required=True, help="text to continue; when too long for the model's "
                          "block_size only its end is kept (see --max-new-tokens)")
    generate.add_argument("--max-new-tokens", type=int, default=100,
                          help="at most this many; fewer when the prompt leaves less of the model's block_size. "
                               "A prompt that leaves less than min(N, block_size/2) positions keeps only its last "
                               "tokens, and a notice says how many were dropped (default: %(default)s)")
    generate.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: %(default)s)")
    generate.add_argument("--top-k", type=int, default=0, help="sample from the K most likely tokens; 0 = off "
                          "(default)")
    generate.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]; 1 = off "
                          "(default)")
    generate.add_argument("--seed", type=int, default=1337, help="seed of the sampling: the same seed, prompt and "
                          "checkpoint give the same text (default: %(default)s)")
    generate.add_argument("--num-samples", type=int, default=1, help="continuations of the prompt, sampled together "
                          "in one batch and printed one after another (default: %(default)s)")
    generate.add_argument("--context", type=int, metavar="N",
                          help="prompt + new tokens may fill N positions instead of the model's block_size; longer "
                               "than it was trained on shows how its positions extrapolate (the latent cache holds N)")
    generate.add_argument("--dtype", default="float32", metavar="{float32,bfloat16,float16}",
                          help="weights and KV cache in this dtype: bfloat16 halves the cache (what the training "
                               "start quotes for a bf16 run) and its reads (default: %(default)s)")

    evaluate = commands.add_parser("eval", help="perplexity of a checkpoint on a text file")
    evaluate.add_argument("--checkpoint", required=True, help="checkpoint or run directory, or a file tml export wrote")
    evaluate.add_argument("--data", required=True, help="a UTF-8 text file (or a .jsonl file: its records' text)")
    evaluate.add_argument("--text-field", default="text", metavar="NAME",
                          help="the field of a .jsonl record that holds its text (default: %(default)s)")
    evaluate.add_argument("--context", type=int, metavar="N",
                          help="tokens per window (default: the model's block_size); longer than it was trained on "
                               "measures how its positions extrapolate")
    evaluate.add_argument("--rope-yarn-factor", type=float, metavar="S",
                          help="read with YaRN's RoPE scaling for S times the model's block_size, without fine-tuning "
                               "(model.rope_yarn_*; use with --context); default: as trained")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object (data, checkpoint, weights, "
                          "tokens, context, trained_context, rope_yarn_factor, dtype, loss, perplexity, bytes, "
                          "bits_per_byte) instead of "
                          "the line")
    evaluate.add_argument("--dtype", default="float32", metavar="{float32,bfloat16,float16}",
                          help="weights in this dtype; the loss is taken over fp32 logits (default: %(default)s)")

    inspect = commands.add_parser("inspect", help="per layer: how much of its KV cache a checkpoint uses (effective "
                                  "rank), its largest attention logit and its attention entropy, on a text file")
    inspect.add_argument("--checkpoint", required=True, help="checkpoint or run directory, or a file tml export wrote")
    inspect.add_argument("--data", required=True, help="a UTF-8 text file (or a .jsonl file: its records' text), at "
                         "least one window long")
    inspect.add_argument("--text-field", default="text", metavar="NAME",
                         help="the field of a .jsonl record that holds its text (default: %(default)s)")
    inspect.add_argument("--windows", type=int, default=INSPECT_WINDOWS, metavar="N",
                         help="windows read, spread evenly over the text (default: %(default)s)")
    inspect.add_argument("--context", type=int, metavar="T", help="tokens per window (default: the model's block_size)")
    inspect.add_argument("--json", action="store_true", help="print one JSON object (the header's fields and a list "
                         "of layers) instead of the table")
    inspect.add_argument("--dtype", default="float32", metavar="{float32,bfloat16,float16}",
                         help="weights in this dtype; scores are taken in fp32, spectra in fp64 (default: "
                              "%(default)s)")

    export = commands.add_parser("export", help="write one fp32 state dict (consolidates DeepSpeed ZeRO shards) and "
                                 "the JSON describing its model")
    export.add_argument("--checkpoint", required=True, help="checkpoint or run directory, or a file tml export wrote")
    export.add_argument("--output", required=True, help="output .pt file (not a directory); its model's description "
                        "is written beside it as .json")

    compare = commands.add_parser("compare", help="one table of runs: their shapes, costs and final perplexities")
    compare.add_argument("runs", nargs="+", metavar="RUN_OR_PARENT",
                         help="a run directory (train.out_dir), or a directory of runs or of sweeps (runs/ finds "
                         "runs/tiny and runs/lr/lr=1e-3)")
    compare.add_argument("--json", action="store_true", help="print a JSON list of every run's fields instead")
    compare.add_argument("--sort", default=DEFAULT_SORT, metavar="KEY",
                         help=f"ascending by this field or setting (train.lr); --sort=-KEY for descending; runs "
                              f"without it last (default: %(default)s; fields: {', '.join(FIELDS)})")
    return parser


def cmd_compare(args: argparse.Namespace) -> int:
    """Reads files only (tml/compare.py), so main dispatches it before anything imports torch."""
    rows = compare_runs(args.runs, args.sort)
    try:
        if args.json:
            print(json.dumps(rows, indent=2), flush=True)
        else:
            print_table(rows, Console(highlight=False))
    except BrokenPipeError:  # `tml compare runs/ --json | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush does not fail again
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        return train_main(argv[1:], prog="tml train")
    if argv and argv[0] == "prepare":
        from tml.data.prepare import main as prepare_main

        return prepare_main(argv[1:], prog="tml prepare")
    if argv and argv[0] == "slurm":  # Submitit is imported only by this command
        from tml.slurm_submit import main as slurm_main

        return slurm_main(argv[1:], prog="tml slurm")
    args = build_parser().parse_args(argv)
    if args.command == "compare":  # before the checkpoint import below, which costs torch and Lightning
        return run_reporting_errors(cmd_compare, args, (CompareError, OSError))
    from tml.train.checkpoint import CheckpointError

    handlers = {"generate": cmd_generate, "eval": cmd_eval, "inspect": cmd_inspect, "export": cmd_export}
    return run_reporting_errors(handlers[args.command], args, (CheckpointError, ConfigError, ValueError, OSError))


def run_reporting_errors(
    handler: Callable[[argparse.Namespace], int], args: argparse.Namespace, user_errors: tuple[type[Exception], ...]
) -> int:
    """A mistake a user can make (a missing file, a bad value) ends in one line and status 1, Ctrl-C in 130: never a
    traceback. The errors are passed in so that compare need not import torch to name the checkpoint's."""
    try:
        return handler(args)
    except user_errors as error:
        print(f"tml {args.command}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"tml {args.command}: interrupted", file=sys.stderr)
        return CTRL_C_EXIT_STATUS


if __name__ == "__main__":
    sys.exit(main())
