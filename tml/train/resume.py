"""Whether a checkpoint can continue under this run's config, data and strategy: the checks a resume passes.

Resuming compares the run's config with the checkpoint's before anything is written (check_resume_config): a
changed model, optimizer or data stream is refused, and so is a DeepSpeed checkpoint under another strategy or rank
count (check_resume_layout), and so is a corpus whose files changed since (check_resume_data); other changes are
listed for a notice. The checkpoint supplies the schedule's step count, not its shape, so a new max_steps or lr takes
effect. Which checkpoint `train.resume` names is tml/train/checkpoint.py's resolve_resume; loading it is the
Checkpointer's. resume_checkpoint puts the three together for the launchers and the training loop.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from tml.config import GUTENBERG_SOURCE, PLACEMENT_KEYS, SECTIONS, Config, same_setting
from tml.data.config import VAL_SPLITS, DataConfig
from tml.data.gutenberg import GutenbergError, books_from_directory
from tml.data.jsonl import is_jsonl
from tml.data.prepare import (
    built_from,
    changed_files,
    indexed_jsonl,
    is_local,
    resolved_val_split,
    shards_stand_alone,
    shown,
    source_content_fingerprint,
    source_files,
    source_listing,
)
from tml.data.shards import ShardIndex
from tml.train.checkpoint import (
    DATA_CONTENT,
    CheckpointError,
    branches_another_run,
    describe_saved_run,
    older_checkpoint_advice,
    resolve_resume,
    verify_checkpoint,
)

# The saved data position counts windows of one token stream, in one seed's shuffle. These decide which tokens
# form the train split (source, books, split) and how it is cut (stride), so under new values the position
# points at other text, and BatchStream only notices when the window count happens to differ. shard_dir and
# shard_tokens are only a notice: train_main rebuilds shards that do not match these settings, so a moved
# shard_dir holds the same tokens, and windows are stitched across shard files whatever their size.
DATA_POSITION_KEYS = frozenset({
    "data.source", "data.book_ids", "data.max_books", "data.val_frac", "data.val_split", "data.split_seed",
    "data.stride", "train.seed", "data.text_field",
})
# The only model setting that leaves the weights' names, shapes and meaning alone: dropout acts in training only.
MODEL_NOTICE_KEYS = frozenset({"model.dropout"})
# Where a run's weights started: set at its first start and kept by every resume (tml/train/loop.py
# settle_init_from), so never a change a resume lists.
HISTORY_KEYS = frozenset({"train.init_from"})
# Settings whose change leaves the saved optimizer state meaningless: AdamW's moments are no Muon momentum.
OPTIMIZER_STATE_KEYS = frozenset({"train.optimizer"})


def changed_settings(saved: dict[str, Any], current: Config) -> list[tuple[str, Any, Any]]:
    """(section.key, saved value, current value) for every setting that differs, in config order.

    A field added since the checkpoint was saved defaults to what the code did before it existed (model.mlp gelu,
    train.warmup_steps null), so in the model, train and log sections the saved run had that default, and another
    value is a change (refused for the model, listed for the rest). In the data section such a key is skipped: what
    data a run read is judged by its shards' content, not by settings it could not have had.
    """
    changes = []
    for section, values in current.to_dict().items():
        saved_section = saved.get(section, {})
        if section != "data" and saved_section:
            saved_section = asdict(SECTIONS[section]()) | saved_section
        for key, value in values.items():
            name = f"{section}.{key}"
            if key in saved_section and name not in HISTORY_KEYS and not same_setting(name, saved_section[key], value):
                changes.append((name, saved_section[key], value))
    return changes


def _shown(value: Any) -> str:
    """A value as it is written on the command line (`mla`, `0.003`, `[11, 12]`, `null`, `3e+18`)."""
    if isinstance(value, float) and abs(value) >= 1e6 and float(f"{value:g}") == value:  # 3e+18, not 3000...0.0
        return f"{value:g}"
    return value if isinstance(value, str) else json.dumps(value)


def check_resume_config(resume_dir: Path, saved: dict[str, Any], current: Config, resume: str,
                        source_moved: bool = False, source_differences: str | None = None) -> list[str]:
    """Refuse a config the checkpoint cannot continue under; return the other changes as `key old -> new`.

    `saved` is the checkpoint's config (meta.json). A different model cannot take the saved weights, another
    optimizer cannot take the saved optimizer state, and the DATA_POSITION_KEYS above make the saved data position
    meaningless: all raise CheckpointError naming each key
    with both values. Everything else (max_steps, lr, dropout, devices, ...) may change on resume and is returned
    for a notice, and so is data.source when `source_moved` (moved_source); otherwise a
    refused data.source names `source_differences` (`1 changed (a.txt)`) when known. Called before anything is
    written, so a refused resume leaves the run directory as it was.
    """
    changes = [c for c in changed_settings(saved, current) if c[0] not in PLACEMENT_KEYS]
    refused = [c for c in changes if _changes_weights(c[0]) or c[0] in OPTIMIZER_STATE_KEYS or (
        c[0] in DATA_POSITION_KEYS and not _same_val_split(c, current.data) and not _text_field_unread(c, current.data)
        and not (c[0] == "data.source" and source_moved))]
    if refused:
        reasons = []
        if any(_changes_weights(key) for key, _, _ in refused):
            reasons.append("its weights are for the saved model")
        if any(key in DATA_POSITION_KEYS for key, _, _ in refused):
            reasons.append("its data position counts windows of the saved data and seed")
        if any(key in OPTIMIZER_STATE_KEYS for key, _, _ in refused):
            reasons.append("its optimizer state is the saved optimizer's; --train.init_from starts a new run from its "
                           "weights with a fresh optimizer")
        listed = ", ".join(f"{key} {_shown(old)} -> {_shown(new)}" + (
            f" (other text: {source_differences} against the checkpoint's)"
            if key == "data.source" and source_differences else "") for key, old, new in refused)
        old_values = " ".join(f"--{key} {shlex.quote(_shown(old))}" for key, old, _ in refused)
        if resume == "auto":
            fresh = "another --train.out_dir"
        else:  # resume none over an out_dir that holds a run is refused (resolve_resume)
            fresh = "--train.resume none" + (" and another --train.out_dir" if describe_saved_run(
                current.train.out_dir) else "")
        raise CheckpointError(
            f"cannot resume {resume_dir} with changed {listed} ({'; '.join(reasons)}): start a new run with "
            f"{fresh}, or continue this one with {old_values}"
        )
    return [f"{key} {_shown(old)} -> {_shown(new)}" for key, old, new in changes]


def moved_source(meta: dict[str, Any], data: DataConfig) -> tuple[bool, str | None]:
    """For a local data.source at another path than the checkpoint's: (True, None) when it holds the very text its
    shards were built from (the same files by name and bytes: a corpus moved or copied to another machine, whose
    windows the saved data position still counts), else (False, how it differs, when the shards still tell:
    `1 changed (a.txt)`). (False, None) when data.source did not move. Hashes the files only when it moved."""
    saved_source = meta.get("config", {}).get("data", {}).get("source")
    saved_text = meta.get(DATA_CONTENT)
    if (not saved_text or not is_local(data) or saved_source in (None, GUTENBERG_SOURCE)
            or same_setting("data.source", saved_source, data.source)):
        return False, None
    if source_content_fingerprint(data) == saved_text:
        return True, None
    return False, source_changes_since(data, saved_text)


def _same_val_split(change: tuple[str, Any, Any], data: DataConfig) -> bool:
    """True for a data.val_split change that cuts this corpus the same way (auto that meant books -> books)."""
    key, old, _ = change
    if key != "data.val_split" or old not in VAL_SPLITS:
        return False
    documents = len(source_listing(data))
    return resolved_val_split(replace(data, val_split=old), documents) == resolved_val_split(data, documents)


def _text_field_unread(change: tuple[str, Any, Any], data: DataConfig) -> bool:
    """True for a data.text_field change over a corpus without a .jsonl file (here, or when its shards were built):
    no record's field was read, so the text is the same."""
    if change[0] != "data.text_field":
        return False
    index = ShardIndex.load_or_none(data.shard_dir)
    return not any(is_jsonl(entry["path"]) for entry in source_listing(data)) and not (index and indexed_jsonl(index))


def _changes_weights(key: str) -> bool:
    return key.startswith("model.") and key not in MODEL_NOTICE_KEYS


def check_resume_layout(directory: Path, meta: dict[str, Any], deepspeed: bool, world_size: int) -> None:
    """Refuse a checkpoint whose files this run's strategy cannot load, before DeepSpeed tries and fails.

    A DeepSpeed checkpoint holds ZeRO shards, one set per rank: only DeepSpeed with the same rank count reads
    them back for training. generate, eval and export read any checkpoint directory, consolidating shards first.
    """
    saved_train = meta.get("config", {}).get("train", {})
    saved_deepspeed, saved_world = meta.get("deepspeed", False), meta.get("world_size", world_size)
    readers = f"`tml generate`/`tml eval --checkpoint {directory}` read its weights as they are"
    if saved_deepspeed and (not deepspeed or saved_world != world_size):
        stage = saved_train.get("zero_stage")
        strategy = f"--train.strategy deepspeed{f' --train.zero_stage {stage}' if stage else ''}"
        if deepspeed:
            problem, way = f"holds ZeRO shards for {saved_world} ranks but this run has {world_size}", ""
        else:
            problem, way = "was saved by DeepSpeed ZeRO, which this run does not use", f" and {strategy}"
        raise CheckpointError(
            f"{directory} {problem}: resume it with {saved_world} ranks (train.devices x train.num_nodes){way}; "
            f"{readers}, and `tml export` writes them as one fp32 .pt"
        )
    if deepspeed and not saved_deepspeed:
        strategy = saved_train.get("strategy", "auto")
        raise CheckpointError(
            f"{directory} was saved without DeepSpeed (train.strategy {strategy}) and cannot be loaded into a ZeRO "
            f"engine: resume it with --train.strategy {strategy}; {readers}"
        )


def source_changes_since(data: DataConfig, saved_content: str) -> str | None:
    """`1 added (c.txt), 1 changed (a.txt)`: how data.source differs from the files the checkpoint's shards were
    built from. None when the index no longer lists those files (rebuilt since) or the source is not local."""
    if not is_local(data):
        return None
    index = ShardIndex.load_or_none(data.shard_dir)
    if index is None or index.content_fingerprint != saved_content:
        return None
    try:
        books = books_from_directory(data)
    except GutenbergError:
        return None
    return changed_files(index.source_files, source_files(source_listing(data), books, data))


def check_resume_data(directory: Path, meta: dict[str, Any], data: DataConfig, shards_built: bool = False) -> None:
    """Refuse a checkpoint whose shards were built from other text than the run will read.

    The settings are equal (check_resume_config), yet a file added, removed or edited moves every window, so the
    saved data position would point into other text. Before the launcher prepares data (shards_built False) that
    text is data.source's, which the launcher would rebuild the shards from; once the shards stand as the run
    reads them (train(), or a SLURM restart, which prepares nothing) it is the shards' own, so an edit to
    data.source during a long job does not stop its requeues. A `touch` changes nothing, and a checkpoint that
    predates the fingerprint resumes as before, unless val_split "auto" would now cut its corpus another way.
    """
    index = ShardIndex.load_or_none(data.shard_dir) if shards_built else None
    saved_data = meta.get("config", {}).get("data", {})
    if saved_data and "text_field" not in saved_data:  # saved before .jsonl files were read as records
        built = index or ShardIndex.load_or_none(data.shard_dir)  # the shards it trained on, unless rebuilt since
        if built is not None and built.content_fingerprint == meta.get(DATA_CONTENT) and (
                as_text := indexed_jsonl(built)):
            raise CheckpointError(
                f"cannot resume {directory}: it was trained on {shown(as_text)} read as plain text, by a tml "
                "that did not yet read JSON Lines files as records (one document each, their data.text_field), "
                "which this one does: its data position counts windows of that text. Start a new run with another "
                "--train.out_dir (the shards will be rebuilt from the records)"
            )
    if saved_data and "val_split" not in saved_data:  # saved before val_split existed, when whole books were held out
        mode = index.settings.get("val_split") if index else resolved_val_split(data, len(source_listing(data)))
        if mode not in (None, "books"):
            raise CheckpointError(
                f"cannot resume {directory}: it held out whole books for validation (it predates data.val_split), "
                f"and data.val_split {data.val_split} now means {mode} for data.source {data.source}, which moves "
                "every training window: continue it with --data.val_split books, or start a new run with another "
                "--train.out_dir"
            )
    saved = meta.get(DATA_CONTENT)
    if not saved:
        return
    if shards_built:
        if index is not None and index.content_fingerprint and index.content_fingerprint != saved:
            raise CheckpointError(
                f"cannot resume {directory}: its shards in {data.shard_dir} were rebuilt since from other text "
                f"(data.source {data.source} changed), so its data position would point into other text: restore "
                "those files as they were and run tml-prepare, or start a new run with another --train.out_dir"
            )
        return
    current = source_content_fingerprint(data)
    if current is not None and current != saved:
        index = ShardIndex.load_or_none(data.shard_dir)
        if index is not None and shards_stand_alone(data, index):  # the shards are all the text there is here
            raise CheckpointError(
                f"cannot resume {directory}: the shards in {data.shard_dir} hold other text than it was trained on "
                f"(built from {built_from(index) or 'another corpus'}; data.source {data.source} is not on this "
                "machine): copy the corpus it was trained on to data.source, or start a new run with another "
                "--train.out_dir"
            )
        changes = source_changes_since(data, saved) or "files added, removed or edited"
        raise CheckpointError(
            f"cannot resume {directory}: its shards in {data.shard_dir} were built from other text than "
            f"data.source {data.source} holds now ({changes} since), so its data position "
            "would point into other text: restore those files as they were, or start a new run on the changed "
            "corpus with another --train.out_dir"
        )


def resume_checkpoint(config: Config, shards_built: bool = False) -> tuple[Path | None, dict[str, Any], list[str]]:
    """The checkpoint this run resumes from (None for a fresh run), its meta.json, and the settings changed since.

    Raises CheckpointError for what cannot resume (resolve_resume, check_resume_config, check_resume_layout,
    check_resume_data) without writing anything, so a launcher can call it before building data for the run;
    train() calls it again with shards_built, once the shards stand as the run will read them.
    """
    train = config.train
    resume_dir = resolve_resume(train.resume, train.out_dir)
    if resume_dir is None:
        return None, {}, []
    try:
        meta = verify_checkpoint(resume_dir, hash_files=False)  # every file at its size; loading hashes them too
    except CheckpointError as error:
        raise CheckpointError(f"{error}; {older_checkpoint_advice(resume_dir)}") from error
    if branches_another_run(resume_dir, train.out_dir) and int(meta["step"]) >= train.max_steps:
        raise CheckpointError(f"{resume_dir} is at step {meta['step']:,}: a branch of it trains on to train.max_steps, "
                              f"which must be above that (it is {train.max_steps:,})")
    source_moved, differences = moved_source(meta, config.data)
    changed = check_resume_config(resume_dir, meta["config"], config, train.resume, source_moved, differences)
    check_resume_layout(resume_dir, meta, train.strategy == "deepspeed", train.devices * train.num_nodes)
    check_resume_data(resume_dir, meta, config.data, shards_built)
    return resume_dir, meta, changed
