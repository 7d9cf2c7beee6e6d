"""A sweep: one experiment and the settings to vary, expanded into one run per combination.

`--sweep model.kv_lora_rank=64,128 --sweep model.norm=pre,post` is four runs: the experiment's config with each
combination of the values as overrides, each in its own directory under the experiment's `train.out_dir`, named
by what it varies (`kv_lora_rank=64,norm=pre`, Hydra's naming), so that `tml compare OUT_DIR` and
`tensorboard --logdir OUT_DIR` show the whole sweep. Every combination is parsed and checked as `tml train` would
check it before the first one runs or is queued: a sweep never stops half-way on a value only its last run has.

`launch/local.py` (`tml train`) runs the combinations one after the other, each as its own `tml train` process
(Fabric re-runs a process's command line for extra local ranks, which must be one run's, not the sweep's);
`tml slurm` (launch/slurm.py) submits one job per combination. Running the same command again continues the sweep:
finished runs are skipped, stopped ones resume from `last`.
"""

from __future__ import annotations

import itertools
import os
import signal
import site
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import yaml

from tml.compare import (
    NOT_COMPARED,
    NOT_COMPARED_SECTIONS,
    compared_settings,
    flat_settings,
    is_run,
    parse_config,
    read_run,
)
from tml.config import PLACEMENT_KEYS, Config, ConfigError, load_config, same_setting
from tml.data.config import SHARD_SETTINGS
from tml.files import make_directory, what_blocks_directory
from tml.run_dir import CONFIG_FILE, RESUME_WORDS, saved_steps
from tml.train.parent_death import signal_when_parent_dies
from tml.train.preemption import CTRL_C_EXIT_STATUS

SWEEP_FLAG = "--sweep"
OUT_DIR_KEY = "train.out_dir"
# Set for each run by the sweep itself (from train.out_dir and the run's values), so not sweepable.
SET_BY_THE_SWEEP = (OUT_DIR_KEY, "log.run_name", "log.wandb_group")
WANDB_GROUP_MAX_CHARS = 128  # wandb refuses longer group names
# What a rerun of a sweep may change for runs it already holds: train longer, or on other hardware. Anything else
# would make the directory's run another run than the one the sweep names by that directory.
CONTINUABLE_CHANGES = ("train.max_steps", "train.max_tokens", "train.max_flops", "train.devices", "train.num_nodes",
                       "train.accelerator", "train.compile", "train.activation_checkpointing")
# Signals a scheduler sends the sweep's process; each is passed on to the run in progress, which saves `last`.
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class SweepError(ValueError):
    """A `--sweep` that cannot be expanded; the message names the argument or the run."""


@dataclass(frozen=True)
class SweepAxis:
    key: str  # section.name, as on the command line without its dashes
    values: tuple[str, ...]  # as typed: each is parsed as `--key value` would be


@dataclass(frozen=True)
class SweepRun:
    name: str  # the run directory's name under the sweep's out_dir
    overrides: tuple[tuple[str, str], ...]  # (key, value) of this combination
    argv: list[str]  # the experiment's arguments, this run's overrides and its out_dir: one `tml train` run
    config: Config

    @property
    def out_dir(self) -> Path:
        return Path(self.config.train.out_dir)


def is_sweep(argv: Sequence[str]) -> bool:
    return any(arg == SWEEP_FLAG or arg.startswith(SWEEP_FLAG + "=") for arg in argv)


def split_values(listed: str) -> list[str]:
    """`64,128` -> [64, 128]; `[11,12],[16]` -> [[11,12], [16]]: commas inside brackets or quotes belong to a value."""
    values, current, depth, quote = [], [], 0, ""
    for char in listed:
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            values.append("".join(current))
            current = []
            continue
        current.append(char)
    return [*values, "".join(current)]


def parse_axis(spec: str) -> SweepAxis:
    """`model.kv_lora_rank=64,128,256` -> SweepAxis("model.kv_lora_rank", ("64", "128", "256"))."""
    key, equals, listed = spec.partition("=")
    key = key.strip().removeprefix("--")
    if not equals or not key:
        raise SweepError(f"{SWEEP_FLAG} {spec}: expected KEY=VALUE1,VALUE2,... (model.kv_lora_rank=64,128)")
    if key.count(".") != 1:
        raise SweepError(f"{SWEEP_FLAG} {spec}: {key!r} is not a config key: name it section.key (train.lr)")
    values = tuple(value.strip() for value in split_values(listed))
    if not all(values):
        raise SweepError(f"{SWEEP_FLAG} {spec}: an empty value (values are separated by commas)")
    if len(set(values)) != len(values):
        raise SweepError(f"{SWEEP_FLAG} {spec}: a value is listed twice")
    if key in SET_BY_THE_SWEEP:
        raise SweepError(f"{SWEEP_FLAG} {spec}: the sweep sets {key} for each run itself (a directory under the "
                         f"experiment's {OUT_DIR_KEY}, named by the run's values; wandb's group and run name)")
    return SweepAxis(key, values)


def split_sweep_arguments(argv: Sequence[str]) -> tuple[list[str], list[SweepAxis]]:
    """The experiment's arguments (everything but `--sweep`) and the axes, in the order given."""
    experiment: list[str] = []
    specs: list[str] = []
    arguments = iter(argv)
    for arg in arguments:
        if arg == SWEEP_FLAG:
            spec = next(arguments, None)
            if spec is None or (spec.startswith("--") and "=" not in spec):  # the next option, not a spec
                raise SweepError(f"{SWEEP_FLAG} needs KEY=VALUE1,VALUE2,... after it")
            specs.append(spec)
        elif arg.startswith(SWEEP_FLAG + "="):
            specs.append(arg.removeprefix(SWEEP_FLAG + "="))
        else:
            experiment.append(arg)
    axes = [parse_axis(spec) for spec in specs]
    keys = [axis.key for axis in axes]
    for key in keys:
        if keys.count(key) > 1:
            raise SweepError(f"{SWEEP_FLAG} {key} is given twice: list all its values in one {SWEEP_FLAG}")
        if any(arg == f"--{key}" or arg.startswith(f"--{key}=") for arg in experiment):
            raise SweepError(f"--{key} is both set and swept: drop one of them")
    return experiment, axes


def value_label(value: str) -> str:
    """A value as a directory name can hold it: a path by its last part (data.source=/corpora/poems -> poems)."""
    return Path(value.rstrip("/")).name if "/" in value else value


def labels(axes: Sequence[SweepAxis], values: Sequence[str]) -> list[str]:
    """`kv_lora_rank=64`: each key by its name within its section (no two sections share one), with its value."""
    return [f"{axis.key.split('.')[1]}={value_label(value)}" for axis, value in zip(axes, values, strict=True)]


def run_names(axes: Sequence[SweepAxis], combinations: Sequence[tuple[str, ...]]) -> list[str]:
    """`kv_lora_rank=64,norm=pre`: a run's directory name, its labels joined."""
    names = [",".join(labels(axes, values)) for values in combinations]
    for name in names:
        if names.count(name) > 1:
            raise SweepError(f"two runs of the sweep would share the directory {name!r} (values that differ only "
                             "before their last '/'): sweep values with distinct last parts")
    return names


def wandb_group(sweep_dir: Path) -> str:
    """The sweep's out_dir as given (runs/a/lr and runs/b/lr are two groups), cut to the length wandb accepts."""
    return os.path.normpath(sweep_dir)[-WANDB_GROUP_MAX_CHARS:]


def as_arguments(overrides: Sequence[tuple[str, str]]) -> list[str]:
    return [part for key, value in overrides for part in (f"--{key}", value)]


def expand_sweep(experiment: Sequence[str], axes: Sequence[SweepAxis],
                 load: Callable[[list[str]], Config] = load_config) -> list[SweepRun]:
    """One SweepRun per combination, first axis slowest, each config loaded and checked (ConfigError names the run).

    `load` is the entry point's config loader, so each run is parsed exactly as that entry point parses one. Runs
    that differ in what their token shards are built from (SHARD_SETTINGS) get shard directories of their own,
    beside the experiment's, so that no run reads shards rebuilt for another.
    """
    if not axes:
        raise SweepError(f"no {SWEEP_FLAG} KEY=VALUE1,VALUE2,... given")
    keys = [axis.key for axis in axes]
    combinations = list(itertools.product(*(axis.values for axis in axes)))
    names = run_names(axes, combinations)
    try:  # with the first run's values: an experiment may be valid only with the swept settings (n_head=6)
        base = load([*experiment, *as_arguments(zip(keys, combinations[0], strict=True))])
    except ConfigError as error:
        raise ConfigError(f"sweep run {names[0]}: {error}") from error
    sweep_dir = Path(base.train.out_dir)
    if is_run(sweep_dir):
        raise SweepError(f"{OUT_DIR_KEY}={sweep_dir} holds a run itself; a sweep puts one run per combination under "
                         f"its {OUT_DIR_KEY}: give the sweep a directory of its own (--{OUT_DIR_KEY} runs/my-sweep)")
    shard_axes = [position for position, key in enumerate(keys) if "data.shard_dir" not in keys
                  and key.startswith("data.") and key.removeprefix("data.") in SHARD_SETTINGS]
    runs = []
    for name, values in zip(names, combinations, strict=True):
        overrides = tuple(zip(keys, values, strict=True))
        placement = [f"--{OUT_DIR_KEY}", str(sweep_dir / name),
                     # in wandb: the sweep's runs in one group (its out_dir as given), each named by its values
                     "--log.run_name", f"{base.log.run_name}/{name}" if base.log.run_name else name,
                     "--log.wandb_group", base.log.wandb_group or wandb_group(sweep_dir)]
        if base.train.resume not in RESUME_WORDS and saved_steps(sweep_dir / name):
            # A branch of another run (train.resume names its checkpoint) that this sweep started: continued from
            # its own checkpoints, not branched again over them (which resolve_resume refuses).
            placement += ["--train.resume", "auto"]
        if shard_axes:
            own = ",".join(label for position, label in enumerate(labels(axes, values)) if position in shard_axes)
            placement += ["--data.shard_dir", f"{os.path.normpath(base.data.shard_dir)}-{own}"]
        argv = [*experiment, *as_arguments(overrides), *placement]
        try:
            config = load(argv)
        except ConfigError as error:
            raise ConfigError(f"sweep run {name}: {error}") from error
        runs.append(SweepRun(name, overrides, argv, config))
    refuse_duplicates(runs)
    return runs


def what_it_computes(config: Config) -> dict:
    """The settings that shape a run's numbers, less the model fields its attention does not read."""
    unread = config.model.unread_fields
    return {key: value for key, value in compared_settings(config).items()
            if key.removeprefix("model.") not in unread}


def refuse_duplicates(runs: Sequence[SweepRun]) -> None:
    """Two combinations that would train the same thing are refused, saying why: an MLA rank crossed with MHA,
    which has none; 3e-4 and 0.0003. Runs that differ only in how they run (data.num_workers, for a speed study)
    are not duplicates."""
    seen: dict[str, SweepRun] = {}
    for run in runs:
        key = repr(sorted(what_it_computes(run.config).items()))
        if (twin := seen.setdefault(key, run)) is not run and (reasons := why_the_same(twin, run)):
            advice = (". Sweep these settings separately (two sweeps may share one out_dir)"
                      if any(" changes nothing in " in reason for reason in reasons) else "")
            raise SweepError(f"runs {twin.name} and {run.name} would train the same thing: {'; '.join(reasons)}"
                             + advice)


def why_the_same(first: SweepRun, second: SweepRun) -> list[str]:
    """Why each swept setting the two runs set differently changes nothing; empty when one of them changes how
    the run runs, which is reason enough for a sweep."""
    values = flat_settings(first.config), flat_settings(second.config)
    reasons = []
    for (key, one), (_, other) in zip(first.overrides, second.overrides, strict=True):
        if one == other:
            continue
        if values[0][key] == values[1][key]:
            reasons.append(f"{key} {one} and {other} are one value")
        elif key in PLACEMENT_KEYS or key in NOT_COMPARED or key.startswith(NOT_COMPARED_SECTIONS):
            return []
        elif key.startswith("model."):
            reasons.append(f"{key} changes nothing in an {first.config.model.attention_kind} run")
        else:  # a Gutenberg setting of a local corpus, a ZeRO setting without DeepSpeed
            reasons.append(f"{key} is not read by these runs")
    return reasons


def refuse_another_run_in_its_place(name: str, config: Config) -> None:
    """A directory of the sweep that holds a run with other settings (another sweep's, under the same name) is
    refused: skipping it as ended, or resuming it, would pass another run off as this one."""
    out_dir = Path(config.train.out_dir)
    try:
        saved = parse_config((out_dir / CONFIG_FILE).read_text())
    except (OSError, ValueError, TypeError, yaml.YAMLError):
        return  # nothing there yet, or unreadable: the run's own resume check speaks for that
    mine, theirs = what_it_computes(config), what_it_computes(saved)
    # Keys of both only: another attention kind differs in model.attention, not in each field only one kind reads.
    differing = [f"{key} {theirs[key]!r} there, {mine[key]!r} here" for key in sorted(set(mine) & set(theirs))
                 if key not in CONTINUABLE_CHANGES and not same_setting(key, theirs[key], mine[key])]
    if differing:
        raise SweepError(f"sweep run {name}: {out_dir} holds a run with other settings "
                         f"({'; '.join(differing)}): give this sweep its own --{OUT_DIR_KEY}, or sweep those settings "
                         f"too so the runs' names differ (a sweep continues its own runs with a new train.max_steps "
                         "or budget, or on other devices, only)")


def check_runs(runs: Sequence[SweepRun]) -> None:
    """Before the first run starts: the sweep's out_dir can be made (NotADirectoryError), every directory the sweep
    names holds this run or none, and every run that is neither ended nor being trained by another process could
    start (its resume, its init_from, its local data.source). SweepError, CheckpointError or GutenbergError, naming
    the run."""
    from tml.data.gutenberg import GutenbergError
    from tml.train.checkpoint import CheckpointError
    from tml.train.preflight import check_run_can_start

    check_sweep_dir(runs)
    for run in runs:
        if taken_elsewhere(run.name, run.config) is not None:
            continue
        try:
            check_run_can_start(run.config)
        except (CheckpointError, GutenbergError) as error:
            raise type(error)(f"sweep run {run.name}: {error}") from error


def check_sweep_dir(runs: Sequence[SweepRun]) -> None:
    """NotADirectoryError, saying what stands in the way, when the sweep's out_dir cannot be made."""
    sweep_dir = runs[0].out_dir.parent
    if (reason := what_blocks_directory(sweep_dir)) is not None:
        raise NotADirectoryError(f"cannot make the sweep's {OUT_DIR_KEY} {sweep_dir}: {reason}")


def runs_counted(runs: Sequence[SweepRun]) -> str:
    return f"{len(runs)} run" + ("" if len(runs) == 1 else "s")


def describe_sweep(runs: Sequence[SweepRun]) -> tuple[list[str], int]:
    """`--dry-run`: a line per run saying what the sweep would do with it (skip it as ended or trained elsewhere,
    start, resume at step N), or why it would fail at its start, or why the sweep would be refused before its first
    run (check_runs); and the exit status the sweep would end with. Nothing is written."""
    from tml.data.gutenberg import GutenbergError
    from tml.data.prepare import PrepareError
    from tml.data.shards import ShardError
    from tml.train.checkpoint import CheckpointError
    from tml.train.preflight import describe_start
    from tml.train.run_lock import RunLockError

    lines = [f"tml: sweep of {runs_counted(runs)} under {runs[0].out_dir.parent}"]
    try:
        check_sweep_dir(runs)
    except NotADirectoryError as error:
        return [*lines, f"tml: the sweep would be refused before its first run: {error}"], 1
    refusal = failure = 0
    for position, run in enumerate(runs, 1):
        try:
            outcome = taken_elsewhere(run.name, run.config)
            plan = f"{outcome}, would be skipped" if outcome is not None else describe_start(run.config)
        except (SweepError, CheckpointError, GutenbergError) as error:  # check_runs refuses the whole sweep
            plan = f"refused: {str(error).removeprefix(f'sweep run {run.name}: ')}"
            refusal = refusal or (2 if isinstance(error, SweepError) else 1)
        except (ConfigError, PrepareError, RunLockError, ShardError, OSError) as error:
            plan, failure = f"would fail at its start: {error}", 1  # that run alone: the others still run
        lines.append(f"  {position}/{len(runs)} {run.name}: {plan}")
    if refusal:
        lines.append("tml: the sweep would be refused before its first run: no run starts")
    return lines, refusal or failure


def taken_elsewhere(name: str, config: Config) -> str | None:
    """"ended earlier" or "training elsewhere" for a run the sweep leaves alone, else None; SweepError for another
    run in its directory. Asked before the first run, at each run's turn and after a failed start: another sweep
    may have got there first."""
    from tml.train.run_lock import training_in_progress

    refuse_another_run_in_its_place(name, config)
    # The lock first: a training writes its summary before it lets go of its lock, so a run found free here has its
    # summary if it ended. Asked the other way round, a run that ended in between was neither (its summary read while
    # it still held the lock, which it let go just before the second look), and the sweep called it failed.
    if training_in_progress(config.train.out_dir) is not None:
        return "training elsewhere"
    return "ended earlier" if has_ended(config) else None


def has_ended(config: Config) -> bool:
    """True when the run's directory says it ended: stopped early, or finished at or past the max_steps it has now."""
    out_dir = Path(config.train.out_dir)
    if not is_run(out_dir):
        return False
    row = read_run(out_dir.name, out_dir)
    return row["status"] == "early stop" or (
        row["status"] == "finished" and (row["final_step"] or 0) >= config.train.max_steps)


# ------------------------------------------------------------------------------------------------ running here


def train_command() -> list[str]:
    """`tml train` in a fresh interpreter that imports this very tml, installed or not."""
    return [sys.executable, "-m", "tml.cli", "train"]


def checkout_root() -> str | None:
    """The directory to put on PYTHONPATH so a new interpreter imports this tml: a checkout's root; None when tml is
    installed in one of the interpreter's own site directories (putting all of site-packages on PYTHONPATH would
    place it before the standard library)."""
    root = str(Path(__file__).resolve().parents[1])
    site_dirs = {str(Path(path).resolve()) for path in [*site.getsitepackages(), site.getusersitepackages()]}
    return None if root in site_dirs else root


def child_environment() -> dict[str, str]:
    """This tml first on the search path, and (Python 3.11+) not the working directory, which `python -m` would put
    before it: a tml/ folder where the sweep runs (a checkout, beside an installed tml) is not what the runs import."""
    environment = {**os.environ, "PYTHONSAFEPATH": "1"}
    if (root := checkout_root()) is not None:
        search_path = os.environ.get("PYTHONPATH")
        environment["PYTHONPATH"] = root + (os.pathsep + search_path if search_path else "")
    return environment


def stop_with(sweep_pid: int) -> Callable[[], None] | None:
    """What the training runs before it starts: SIGTERM (save `last`, exit) when the sweep's process dies, even
    by SIGKILL, so no training goes on alone to collide with the sweep's next start. Linux only."""
    if not sys.platform.startswith("linux"):
        return None

    def arm() -> None:
        if not signal_when_parent_dies(signal.SIGTERM, sweep_pid):  # the sweep died before the request was armed
            os._exit(1)

    return arm


def run_one(command: list[str]) -> tuple[int, int | None]:
    """Run one training to its end: (exit status, the signal that asked the sweep to stop, or None).

    Ctrl-C reaches the training from the terminal (the same process group), which saves `last` and exits with
    130; the sweep only notes it, as killing the child at once (subprocess.run's way) would lose that save. A
    scheduler's signal sent to the sweep alone is passed on to the training. A SIGINT ignored when the sweep
    started (`nohup`, `cmd &` in a script) stays ignored, by the sweep as by the training.
    """
    child = subprocess.Popen(command, env=child_environment(), preexec_fn=stop_with(os.getpid()))
    received: list[int] = []

    def note(signal_number: int, frame: FrameType | None) -> None:
        received.append(signal_number)
        if signal_number != signal.SIGINT and child.poll() is None:
            child.send_signal(signal_number)

    handled = [sig for sig in (signal.SIGINT, *FORWARDED_SIGNALS) if signal.getsignal(sig) is not signal.SIG_IGN]
    previous = {sig: signal.signal(sig, note) for sig in handled}
    try:
        status = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return status, (received[0] if received else None)


def run_sweep_here(runs: Sequence[SweepRun]) -> int:
    """Each run in turn; a run that fails does not stop the others, a stop request (Ctrl-C, SIGTERM) does. A run
    another process is training (a second sweep over the same out_dir, on another GPU) is left to it.

    Exit status: 0 when every run ended well, 1 when any failed, 130 after Ctrl-C, 128 + N after signal N.
    """
    sweep_dir = runs[0].out_dir.parent
    make_directory(sweep_dir)
    outcomes: list[tuple[str, str]] = []
    print(f"tml: sweep of {runs_counted(runs)} under {sweep_dir}", flush=True)
    stopped_by: int | None = None
    for position, run in enumerate(runs, 1):
        print(f"tml: sweep run {position}/{len(runs)}: {run.name}", flush=True)
        outcome, stopped_by = run_or_leave(run)
        outcomes.append((run.name, outcome))
        if stopped_by is not None:
            break
    left = len(runs) - len(outcomes)
    print("tml: sweep: " + "; ".join(f"{name}: {outcome}" for name, outcome in outcomes)
          + (f"; {left} not started" if left else ""), flush=True)
    print(f"tml: compare them with: tml compare {sweep_dir}", flush=True)
    if stopped_by is not None:
        if left or outcomes[-1][1] != "done":  # something to continue
            resume = " with --train.resume auto" if runs[0].config.train.resume in ("", "none") else ""
            print(f"tml: sweep stopped; the same command{resume} continues it (ended runs are skipped, the stopped "
                  "one resumes)", file=sys.stderr, flush=True)
        return CTRL_C_EXIT_STATUS if stopped_by == signal.SIGINT else 128 + stopped_by
    return 1 if any(outcome.startswith("failed") for _, outcome in outcomes) else 0


def run_or_leave(run: SweepRun) -> tuple[str, int | None]:
    """Train the run unless it ended or another process has it: (its outcome, the signal that stops the sweep)."""
    try:
        if (outcome := taken_elsewhere(run.name, run.config)) is not None:
            print(f"tml: {run.out_dir}: {outcome}, skipped", flush=True)
            return outcome, None
        status, stopped_by = run_one([*train_command(), *run.argv])
        if status == CTRL_C_EXIT_STATUS and stopped_by is None:
            stopped_by = signal.SIGINT  # Ctrl-C sent to the training alone
        if status in (0, CTRL_C_EXIT_STATUS) and has_ended(run.config):
            return "done", stopped_by  # a stop request that came as the run finished cut nothing short of it
        if stopped_by is not None or status == 0:  # 0 without ending: it saved and stopped on a signal of its own
            return "stopped", stopped_by if stopped_by is not None else signal.SIGTERM
        return taken_elsewhere(run.name, run.config) or f"failed (exit status {status})", None
    except SweepError as error:  # another sweep's run, under this run's name
        print(f"tml: {error}", file=sys.stderr, flush=True)
        return "failed (its directory holds another run)", None
