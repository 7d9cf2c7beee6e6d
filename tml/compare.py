"""`tml compare`: the final numbers of many runs in one table, showing only the settings that differ.

TensorBoard draws each run's curves; this answers "which shape won, and at what cost" across a sweep. It reads
each run directory's config.yaml, summary.json (written when a run ends) and checkpoint names. A run that cannot
be read becomes a row saying why, never a failed command.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from tml.config import PLACEMENT_KEYS, Config, check_config_mapping
from tml.model.config import MHA_ONLY, MLA_ONLY, ModelConfig
from tml.run_dir import CHECKPOINTS, CONFIG_FILE, SUMMARY_FILE, saved_steps
from tml.train.run_lock import training_in_progress

# A directory holding any of these is a run (a killed run whose config.yaml was deleted still gets its row).
RUN_MARKERS = (CONFIG_FILE, SUMMARY_FILE, CHECKPOINTS)
# How deep below a named directory runs are looked for: its runs, and a sweep's runs in a subdirectory of it.
SEARCH_LEVELS = 2
# The comment the loop writes on top of config.yaml (tml/train/loggers.py describe_model) starts with the count.
PARAMS_HEADER = re.compile(r"#\s*model:\s*([\d,]+) parameters \(([\d,]+) non-embedding\)")
# ... and says what the KV cache costs in the precision the run really used (16-mixed runs as bf16 on a CPU).
CACHE_HEADER = re.compile(r"KV cache [\d,]+ numbers/token/layer, ([\d,]+) B/token in (\w+)")
# Settings a local corpus never reads: a run on your own text shows no Gutenberg book list.
GUTENBERG_ONLY = ("data.book_ids", "data.max_books")
# ... and settings only DeepSpeed reads: a DDP or one-process run shows no ZeRO stage.
DEEPSPEED_ONLY = ("train.zero_stage", "train.zero_offload")

# MLA_ONLY settings show none in an MHA row rather than defaults that shaped nothing, and MHA_ONLY none in an MLA row.
# attention_kind (MLA, MHA, GQA or MQA) is ModelConfig's name for the attention and n_kv_head together.
SHAPE = ("attention", "attention_kind", "norm", "norm_type", "mlp", "n_layer", "n_embd", "n_head", *MHA_ONLY,
         *MLA_ONLY, "block_size")
NUMBERS_FROM_SUMMARY = ("final_step", "max_steps", "best_val_loss", "best_val_perplexity", "val_loss",
                        "val_perplexity", "tokens_seen", "wall_s", "train_tokens_per_s", "params",
                        "params_non_embedding")
# Every row's fields, in table order; `--json` gives all of them (and `settings`) and `--sort` takes any.
FIELDS = ("run", *SHAPE, "params", "params_non_embedding", "kv_cache_bytes_per_token", "kv_cache_dtype",
          "final_step", "max_steps", "best_val_loss", "best_val_perplexity", "val_loss", "val_perplexity",
          "tokens_seen", "wall_s", "tokens_per_s", "train_tokens_per_s", "branched_from", "status")
DEFAULT_SORT = "best_val_perplexity"
# Settings that are not part of what a run computes, besides where its files go (PLACEMENT_KEYS): the data's
# cache directory, how often it logs and saves, and the loggers. A sweep that differs only in these shows no
# column for them.
NOT_COMPARED = frozenset({"data.shard_dir", "train.log_interval", "train.ckpt_interval", "train.keep_checkpoints"})
NOT_COMPARED_SECTIONS = ("log.",)
UNLIMITED_WIDTH = 100_000  # characters: room to measure how wide the table is when nothing is squeezed
NO_VALUE = "-"
SETTING_WIDTH = 24  # characters of a setting's value in the table: a book list or a path is told apart by its start


class CompareError(ValueError):
    """A path that is neither a run directory nor a directory of runs."""


# ------------------------------------------------------------------------------------------------ finding runs


def is_run(directory: Path) -> bool:
    return any((directory / marker).exists() for marker in RUN_MARKERS)


def runs_under(path: Path, levels: int = SEARCH_LEVELS) -> list[tuple[str, Path]]:
    """The runs among path's subdirectories, and theirs down to `levels` below it (a sweep's runs in runs/sweep)."""
    found = []
    for child in sorted(path.iterdir()):
        if child.is_dir():
            if is_run(child):
                found.append((str(child), child))
            elif levels > 1:
                try:
                    found += runs_under(child, levels - 1)
                except PermissionError:  # a folder beside the runs this user cannot read (lost+found): none there
                    continue
    return found


def find_runs(paths: Sequence[str]) -> list[tuple[str, Path]]:
    """(name, directory) of every run: each path is a run directory or a directory of runs, or of sweeps' run
    directories. The name is the path as given (joined with the subdirectories' names); a run named twice is
    listed once."""
    if not paths:
        raise CompareError("no runs given: name run directories or a directory of runs")
    runs: dict[Path, str] = {}
    for given in paths:
        path = Path(given)
        if not path.exists():
            raise CompareError(f"{given}: no such directory")
        if not path.is_dir():
            raise CompareError(f"{given}: not a directory (name a run directory or a directory of runs)")
        if is_run(path):
            found = [(given, path)]
        else:
            found = runs_under(path)
            if not found:
                raise CompareError(f"{given}: not a run directory (none of {', '.join(RUN_MARKERS)}) and no run "
                                   f"directory is within {SEARCH_LEVELS} levels below it")
        for name, directory in found:
            runs.setdefault(directory.resolve(), name)
    return [(name, directory) for directory, name in runs.items()]


# ------------------------------------------------------------------------------------------------ reading a run


def one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def parse_config(text: str) -> Config:
    """config.yaml's text as a Config. Parsed as Config.from_dict, which checkpoints are rebuilt with: unknown keys
    refused by name and each section's own validation, at a tenth of jsonargparse's cost per file (50 runs in well
    under a second); types are not checked, as tml wrote the file."""
    values = yaml.safe_load(text)
    check_config_mapping(values, CONFIG_FILE)
    return Config.from_dict(values)


def read_summary(directory: Path) -> dict[str, Any]:
    """summary.json with every number it should hold checked: None where missing or not finite."""
    summary = json.loads((directory / SUMMARY_FILE).read_text())
    if not isinstance(summary, dict):
        raise ValueError(f"holds a {type(summary).__name__}, not an object")
    for key in NUMBERS_FROM_SUMMARY:
        value = summary.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{key} is {value!r}, not a number")
        summary[key] = value if value is None or math.isfinite(value) else None
    return summary


def branch_origin(summary: dict[str, Any]) -> str | None:
    """`long@800` for a branch of the run in directory `long` from its step 800: its tokens and wall time count the
    long run's first 800 steps too. None for a run that is no branch (or a summary from before branches)."""
    checkpoint, step = summary.get("branched_from"), summary.get("branched_at_step")
    if not isinstance(checkpoint, str) or not isinstance(step, int):
        return None
    return f"{Path(checkpoint).parent.parent.name}@{step}"  # RUN/checkpoints/step-N -> RUN


def summary_status(summary: dict[str, Any]) -> str:
    if summary.get("diverged"):
        return "diverged"
    if summary.get("preempted"):  # summaries written since stop_reason existed say how: "Ctrl-C", "SIGUSR1", ...
        reason = summary.get("stop_reason")
        return "stopped (Ctrl-C)" if reason == "Ctrl-C" else f"preempted ({reason})" if reason else "preempted"
    if summary.get("stopped_early"):
        return "early stop"
    return "finished"


def flat_settings(config: Config) -> dict[str, Any]:
    """`section.key` -> value of every setting."""
    return {f"{section}.{key}": value for section, values in config.to_dict().items() for key, value in values.items()}


def compared_settings(config: Config) -> dict[str, Any]:
    """`section.key` -> value of every setting that shapes what a run computes (lists as lists)."""
    flat = flat_settings(config)
    unread = (*(GUTENBERG_ONLY if config.data.source != "gutenberg" else ()),
              *(DEEPSPEED_ONLY if config.train.strategy != "deepspeed" else ()))
    return {key: value for key, value in flat.items() if key not in PLACEMENT_KEYS and key not in NOT_COMPARED
            and key not in unread and not key.startswith(NOT_COMPARED_SECTIONS)}


def kv_cache_cost(model: ModelConfig, precision: str) -> tuple[int, str]:
    """KV-cache bytes per token and the cache's dtype, as the run's model line gives them (tml/train/loggers.py).
    Imported here, not at the top: torch takes a second to import, and `tml --help` should not wait for it."""
    from tml.model.kv_cache import PRECISION_CACHE_DTYPE, kv_cache_bytes_per_token

    dtype = PRECISION_CACHE_DTYPE[precision]
    return kv_cache_bytes_per_token(model, dtype), str(dtype).removeprefix("torch.")


def counted_params(model: ModelConfig) -> tuple[int, int]:
    """(all, non-embedding) parameters. Built on the meta device: shapes only, no memory and no initialisation."""
    import torch

    from tml.model import Transformer

    with torch.device("meta"):
        built = Transformer(model)
    return built.num_params(non_embedding=False), built.num_params(non_embedding=True)


def read_run(name: str, directory: Path) -> dict[str, Any]:
    """One row: every field of FIELDS, None where unknown. A file that cannot be read is named in the status."""
    row: dict[str, Any] = {**dict.fromkeys(FIELDS), "settings": {}}
    row["run"] = name
    problems = []
    config = text = None
    try:
        text = (directory / CONFIG_FILE).read_text()
        config = parse_config(text)
    except FileNotFoundError:
        problems.append(f"no {CONFIG_FILE}")
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ValueError, TypeError) as error:
        reason = one_line(error)  # ConfigError is a ValueError: an old or unknown key, a section that is no mapping
        problems.append(reason if reason.startswith(CONFIG_FILE) else f"{CONFIG_FILE}: {reason}")
    summary = None
    if (directory / SUMMARY_FILE).exists():
        try:
            summary = read_summary(directory)
        except (OSError, UnicodeDecodeError, ValueError) as error:  # JSONDecodeError is a ValueError
            problems.append(f"{SUMMARY_FILE}: {one_line(error)}")
    newest = max(saved_steps(directory), default=None)
    ended_at = summary["final_step"] if summary is not None else None
    if ended_at is not None and newest is not None and newest > ended_at:
        summary = None  # resumed since that summary was written: it describes an earlier end, not this run

    running = training_in_progress(directory)
    if running is not None:
        summary = None  # whatever an earlier end wrote, the run is going on now
    if config is not None:
        row["settings"] = compared_settings(config)
        model = config.model
        unread = model.unread_fields  # left None: no default pretending otherwise
        row.update({key: getattr(model, key) for key in SHAPE if key not in unread})
        if model.attention != "mla":
            row["n_kv_head"] = model.kv_heads  # 0 in the config means one per query head
        if text and (match := CACHE_HEADER.search(text.split("\n", 1)[0])):  # as the run computed it
            row["kv_cache_bytes_per_token"], row["kv_cache_dtype"] = int(match[1].replace(",", "")), match[2]
        else:
            row["kv_cache_bytes_per_token"], row["kv_cache_dtype"] = kv_cache_cost(model, config.train.precision)
        row["max_steps"] = config.train.max_steps
    if summary is not None:
        # read_summary set every key (None where missing or not a finite number)
        row.update({key: summary[key] for key in NUMBERS_FROM_SUMMARY if summary[key] is not None})
        if row["tokens_seen"] is not None and row["wall_s"]:
            row["tokens_per_s"] = row["tokens_seen"] / row["wall_s"]
        status = summary_status(summary)
        row["branched_from"] = branch_origin(summary)
    elif running is not None:
        row["final_step"] = newest
        status = f"running ({running})"
    else:
        row["final_step"] = newest
        status = "no summary" if newest is not None else "no summary, no checkpoint"
    # What shape alone decides: from config.yaml's header line as the run counted it, else counted again.
    counts = ("params", "params_non_embedding")
    if None in (row[key] for key in counts) and text and (match := PARAMS_HEADER.match(text)):
        row.update({key: int(found.replace(",", "")) for key, found in zip(counts, match.groups(), strict=True)})
    if None in (row[key] for key in counts) and config is not None:
        row.update(zip(counts, counted_params(config.model), strict=True))
    row["status"] = f"unreadable: {'; '.join(problems)}" if problems else status
    return row


def sort_value(row: dict[str, Any], key: str) -> Any:
    """A row's value for --sort: one of FIELDS, or one of its settings (`train.lr`)."""
    return row[key] if key in FIELDS else row["settings"].get(key)


def sort_rows(rows: list[dict[str, Any]], sort: str) -> list[dict[str, Any]]:
    """By `sort` (a field or a setting; `-key` for descending), rows without a value last; ties in name order."""
    key, descending = sort.removeprefix("-"), sort.startswith("-")
    known = set(FIELDS) | {name for row in rows for name in row["settings"]}
    if key not in known:
        raise CompareError(f"--sort {sort}: not a field or setting; choose one of {', '.join(FIELDS)}, or a "
                           "setting such as train.lr (prefix - for descending)")
    by_name = sorted(rows, key=lambda row: row["run"])
    present = [row for row in by_name if sort_value(row, key) is not None]
    missing = [row for row in by_name if sort_value(row, key) is None]
    return sorted(present, key=lambda row: sort_value(row, key), reverse=descending) + missing


def compare_runs(paths: Sequence[str], sort: str = DEFAULT_SORT) -> list[dict[str, Any]]:
    """Every run under `paths` as a row of FIELDS (and its `settings`), sorted by `sort`."""
    return sort_rows([read_run(name, directory) for name, directory in find_runs(paths)], sort)


# ------------------------------------------------------------------------------------------------ the table


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def compact(count: float) -> str:
    """30720 -> 30.7K: counts whose size matters more than their last digits (tokens seen)."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(count) >= scale:
            return f"{count / scale:.3g}{suffix}"
    return f"{count:g}"


@dataclass(frozen=True)
class Column:
    header: str  # short: a sweep's table has many columns, and most values are a few digits wide
    value: Callable[[dict[str, Any]], Any]
    render: Callable[[Any], str] = str


def field(key: str, header: str, render: Callable[[Any], str] = str) -> Column:
    return Column(header, lambda row: row[key], render)


def steps_done(value: tuple[int | None, int | None]) -> str:
    done, total = value
    return f"{NO_VALUE if done is None else f'{done:,}'}/{NO_VALUE if total is None else f'{total:,}'}"


def perplexity_of(perplexity_key: str, loss_key: str) -> Callable[[dict[str, Any]], Any]:
    """The perplexity, or inf where only the loss is known: summary.json writes a perplexity past float range as
    null, which must not read as "never validated"."""
    def value(row: dict[str, Any]) -> Any:
        if row[perplexity_key] is None and row[loss_key] is not None:
            return math.inf
        return row[perplexity_key]
    return value


def setting_text(value: Any) -> str:
    """3e-05, true, [11, 12]: a setting as it would be typed in YAML, cut to SETTING_WIDTH (--json has it whole)."""
    text = f"{value:g}" if isinstance(value, float) else value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= SETTING_WIDTH else text[: SETTING_WIDTH - 1] + "…"


def setting(key: str) -> Column:
    """A column for one setting outside the model's shape (`train.lr`), shown when runs differ in it."""
    return Column(key, lambda row: row["settings"].get(key), setting_text)


COLUMNS = (
    field("run", "run"),
    field("attention_kind", "attn"),
    field("norm", "norm"),
    field("norm_type", "norm type"),
    field("mlp", "mlp"),
    field("n_layer", "layers"),
    field("n_embd", "width"),
    field("n_head", "heads"),
    field("n_kv_head", "kv heads"),
    field("kv_lora_rank", "kv rank"),
    field("q_lora_rank", "q rank", render=lambda rank: str(rank) if rank else "off"),
    field("qk_rope_head_dim", "rope"),
    field("qk_nope_head_dim", "nope"),
    field("v_head_dim", "v"),
    field("block_size", "block"),
    field("params", "params", render=lambda n: f"{n:,}"),
    # Embeddings are a lookup, and at small widths most of the count: this is what the attention kinds differ in.
    field("params_non_embedding", "non-emb params", render=lambda n: f"{n:,}"),
    field("kv_cache_bytes_per_token", "KV B/tok", render=lambda n: f"{n:,}"),
    field("kv_cache_dtype", "KV dtype"),
    Column("steps", lambda row: (row["final_step"], row["max_steps"]), steps_done),
    Column("best ppl", perplexity_of("best_val_perplexity", "best_val_loss"), lambda x: f"{x:.2f}"),
    Column("final ppl", perplexity_of("val_perplexity", "val_loss"), lambda x: f"{x:.2f}"),
    field("tokens_seen", "tokens", render=compact),
    field("wall_s", "wall", render=duration),
    field("tokens_per_s", "tok/s (wall)", render=lambda x: f"{x:,.0f}"),
    # The speed to quote: steps only (the wall figure also counts start-up, validation and saves)
    field("train_tokens_per_s", "tok/s (train)", render=lambda x: f"{x:,.0f}"),
    field("branched_from", "branch of"),
    field("status", "status"),
)
# Settings the table's own columns already show: the shape's, and max_steps (the `steps` column's N/max).
SHOWN_SETTINGS = {f"model.{key}" for key in SHAPE} | {"train.max_steps"}


def cell(column: Column, row: dict[str, Any]) -> str:
    value = column.value(row)
    return NO_VALUE if value is None else column.render(value)


def counted(column: Column, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows whose value of `column` says something: every row whose config was read (its None means "not
    applicable"), and a row without a readable config only where it has a value (its status says why)."""
    return [row for row in rows if row["settings"] or column.value(row) is not None]


def same_in_all(column: Column, rows: list[dict[str, Any]]) -> bool:
    """One value in every counted row, or none in any: an MLA run's kv rank beside an MHA run's "-" (it has none)
    is a difference the table shows, not a value all runs share."""
    values = [column.value(row) for row in counted(column, rows)]
    return all(value == values[0] for value in values)


def differing_settings(rows: list[dict[str, Any]]) -> list[Column]:
    """A column per setting (besides the shape's) whose value is not the same in every run: lr, warm-up, data..."""
    keys = sorted({key for row in rows for key in row["settings"]} - SHOWN_SETTINGS)
    columns = [setting(key) for key in keys]
    return [column for column in columns if not same_in_all(column, rows)]


def print_table(rows: list[dict[str, Any]], console: Console) -> None:
    """`same in all runs: ...` above a table of the columns that differ, in the rows' order; one run is listed as
    `name value` lines, which fit any terminal."""
    if len(rows) == 1:
        (row,) = rows
        for column in COLUMNS:
            console.print(f"{column.header:<14} {cell(column, row)}", soft_wrap=True, highlight=False)
        return
    same = [column for column in COLUMNS[1:] if same_in_all(column, rows)]
    shared = [f"{column.header} {cell(column, having[0])}" for column in same
              if (having := counted(column, rows)) and column.value(having[0]) is not None]
    if shared:
        console.print("same in all runs: " + ", ".join(shared), highlight=False, soft_wrap=True)
    shown = [column for column in COLUMNS if column not in same]
    # What the runs were told to do differently: after the figures, before status (the last column, when shown).
    at = len(shown) - 1 if shown[-1] is COLUMNS[-1] else len(shown)  # COLUMNS ends with status
    shown[at:at] = differing_settings(rows)
    table = Table(show_edge=False, header_style="bold")
    for column in shown:
        table.add_column(column.header, justify="left" if column.render is str else "right", no_wrap=True)
    for row in rows:
        table.add_row(*(cell(column, row) for column in shown))
    # As wide as its cells: a table squeezed into the terminal folds every number over lines and clips run names,
    # while a long line can still be read (or paged with `less -S`).
    natural = Measurement.get(console, console.options.update_width(UNLIMITED_WIDTH), table).maximum
    width = console.width
    console.width = max(width, natural)
    try:
        console.print(table)
    finally:
        console.width = width
