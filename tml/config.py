"""One experiment = one `Config`: the model, data, train and log sections of a YAML file.

The dataclasses are the single source of truth; jsonargparse turns them into the YAML schema and the
`--section.key value` command-line overrides, rejecting unknown keys and wrong types by name.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from tml.data.config import DataConfig
from tml.model.config import ModelConfig
from tml.train.budget import budget_key, steps_for_budget
from tml.train.config import LogConfig, TrainConfig
from tml.train.ranks import is_first_local_process

SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "log": LogConfig}
# Settings that only say where a run's files go or how the raw books are fetched: they never change what a run
# computes, so a resume does not list them as changes and `tml compare` does not compare them.
PLACEMENT_KEYS = frozenset({
    "train.resume", "train.out_dir", "data.mirror", "data.raw_dir", "data.encode_threads", "data.num_workers",
    "data.download_concurrency", "data.requests_per_second", "data.request_timeout", "data.max_retries",
})

# Settings that name a file or directory: tml slurm (launch/slurm.py) makes them absolute, so `data/shards` and
# `/home/me/run/data/shards` are the same setting. The saved run's working directory is not recorded; relative
# values are taken from this one's, where a resumed run is normally started too.
PATH_KEYS = frozenset({"data.source", "data.raw_dir", "data.shard_dir", "train.out_dir", "train.init_from"})
GUTENBERG_SOURCE = "gutenberg"  # data.source's one value that is not a directory


def same_setting(key: str, saved: Any, current: Any) -> bool:
    """Equal values, or (PATH_KEYS) two spellings of the same path: a resumed run's, or a sweep's run's, settings."""
    if saved == current:
        return True
    if key not in PATH_KEYS or not isinstance(saved, str) or not isinstance(current, str):
        return False
    if key == "data.source" and GUTENBERG_SOURCE in (saved, current):
        return False
    return Path(saved).expanduser().resolve() == Path(current).expanduser().resolve()


class ConfigError(ValueError):
    """A configuration file or override that tml cannot use."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        # A budget (train.max_tokens or max_flops) decides max_steps here, where every config is built: the CLI's,
        # a sweep's runs, the SLURM layout's dataclasses.replace (its devices and nodes) and from_dict of a saved one.
        if (steps := steps_for_budget(self)) is not None and steps != self.train.max_steps:
            self.train = dataclasses.replace(self.train, max_steps=steps)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        """Rebuild a config saved in a checkpoint; unknown keys are refused by name."""
        sections = {}
        for name, section_cls in SECTIONS.items():
            given = dict(values.get(name, {}))
            known = {f.name for f in dataclasses.fields(section_cls)}
            unknown = sorted(set(given) - known)
            if unknown:
                raise ConfigError(f"unknown key {name}.{unknown[0]} (known: {', '.join(sorted(known))})")
            sections[name] = section_cls(**given)
        extra = sorted(set(values) - set(SECTIONS))
        if extra:
            raise ConfigError(f"unknown section {extra[0]!r} (known: {', '.join(SECTIONS)})")
        return cls(**sections)


def build_parser(prog: str | None = None, description: str | None = None,
                 sections: Sequence[str] | None = None, epilog: str | None = None) -> ArgumentParser:
    """The parser behind every entry point: `--config FILE` then `--section.key value` overrides. With fewer
    `sections` than all (None) it is for --help only (tml-prepare shows the data section it reads)."""
    parser = ArgumentParser(prog=prog, description=description, epilog=epilog, exit_on_error=False,
                            allow_abbrev=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML experiment file (configs/*.yaml)")
    for name in sections or SECTIONS:
        parser.add_class_arguments(SECTIONS[name], name, help=f"{name} section")
    return parser


def config_from_namespace(parser: ArgumentParser, namespace: Namespace) -> Config:
    """Turn parsed arguments into dataclasses, so __post_init__ validation runs on the final values."""
    try:
        # `instantiate` since jsonargparse 4.49; `instantiate_classes`, its name before, goes in 5.0.
        instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
        init = instantiate(namespace)
        return Config(**{name: init[name] for name in SECTIONS})
    except (TypeError, ValueError) as error:
        raise ConfigError(str(error)) from error


def load_config(args: Sequence[str] | None = None, parser: ArgumentParser | None = None) -> Config:
    """Parse `--config FILE --section.key value ...` into a validated Config (FILE may name a shipped config)."""
    parser = parser or build_parser()
    args = with_shipped_configs(list(args) if args is not None else sys.argv[1:])
    for path in config_file_arguments(args):
        check_config_file(path)
    # --print_config prints the config the run would use (a budget's max_steps included), not jsonargparse's view.
    print_config = [arg for arg in args if arg == "--print_config" or arg.startswith("--print_config=")]
    args = [arg for arg in args if arg not in print_config]
    try:
        namespace = parser.parse_args(args)
    except Exception as error:  # jsonargparse raises ArgumentError with the key named, over several lines
        message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        raise ConfigError(plain_parse_error(message, args)) from error
    config = config_from_namespace(parser, namespace)
    refuse_steps_beside_a_budget(args, config)
    if print_config:
        print(dump_yaml(config), end="")
        raise SystemExit(0)
    return config


def refuse_steps_beside_a_budget(args: Sequence[str], config: Config) -> None:
    """A --train.max_steps typed while a budget decides the steps (from a config file: a run's config.yaml holds both)
    would be silently unused: refused, saying how to train that many steps."""
    budget = budget_key(config.train)
    if budget and flag_values(args, "--train.max_steps"):
        amount = getattr(config.train, budget)
        raise ConfigError(f"--train.max_steps is not used while train.{budget}={amount:g} decides "
                          f"the steps (max_steps {config.train.max_steps:,}): change --train.{budget}, or give "
                          f"--train.{budget} null to train for --train.max_steps")


# Flags the entry points take beside the config's keys (tml train's --sweep and --dry-run, tml-prepare's --force):
# offered when a mistyped one is close.
ENTRY_FLAGS = ("config", "print_config", "sweep", "dry-run", "force")
# jsonargparse's names of the types config values have, as a user would write them.
TYPE_WORDS = {"<class 'int'>": "an integer", "<class 'float'>": "a number", "<class 'bool'>": "true or false",
              "<class 'str'>": "text", "<class 'list'>": "a list ([11, 12])", "<class 'NoneType'>": "null"}


def plain_type_error(message: str) -> str:
    """`model.kv_lora_rank: expected an integer, got 'abc'` for jsonargparse's `Parser key "model.kv_lora_rank":
    Expected a <class 'int'>. Got value: abc` (and its longer form for `int | None`); other messages as they are."""
    key = re.match(r'Parser key "([\w.]+)": ', message)
    given = re.search(r"(?:Got value|Given value): (.*?)$", message)
    expected = re.findall(r"Expected a (typing\.Literal\[.*?\]|<class '\w+'>)", message)
    if not (key and given and expected):
        return message
    words = []
    for name in expected:
        if name.startswith("typing.Literal["):
            words.append("one of " + ", ".join(re.findall(r"'([^']*)'", name)))
        elif name in TYPE_WORDS:
            words.append(TYPE_WORDS[name])
        else:
            return message
    return f"{key[1]}: expected {' or '.join(dict.fromkeys(words))}, got {given[1]!r}"


def config_keys() -> list[str]:
    """Every `section.key` a config has."""
    return [f"{name}.{field.name}" for name, section in SECTIONS.items() for field in dataclasses.fields(section)]


def plain_parse_error(message: str, args: Sequence[str]) -> str:
    """jsonargparse's error in the config's words, with the key a mistyped one is close to: `cfg.yaml: unknown key
    trian.lr (did you mean train.lr?)`, `unrecognized arguments: --train.max_step 5 (did you mean
    --train.max_steps?)`, `model.n_layer: expected an integer, got 'abc'`."""
    if (file_key := unknown_file_key(message)) is not None:  # jsonargparse does not say which file holds it
        holders = files_holding(file_key, config_file_arguments(args))
        where = f"{holders[0]}: " if holders else ""
        return f"{where}unknown key {file_key}{did_you_mean([file_key])}"
    if message.startswith("unrecognized arguments"):
        known = (*config_keys(), *SECTIONS, *ENTRY_FLAGS)
        options = [arg.partition("=")[0].removeprefix("--") for arg in args if arg.startswith("--")]
        return message + did_you_mean([option for option in options if option not in known], prefix="--")
    return plain_type_error(message)


def files_holding(key: str, paths: Sequence[str]) -> list[str]:
    """The config files (of `paths`) that set `key`: `train.max_step` under `train:`, or `max_steps` at the top."""
    section, _, name = key.rpartition(".")
    holders = []
    for path in paths:
        try:
            values = yaml.safe_load(Path(path).read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        keys = values.get(section) if section and isinstance(values, dict) else values
        if isinstance(keys, dict) and name in keys:
            holders.append(path)
    return holders


def unknown_file_key(message: str) -> str | None:
    """The key jsonargparse says a config file may not hold: `train.max_step`, `trian.max_steps`, `max_steps`."""
    if match := re.search(r"Group '(\w+)' does not accept option '(\w+)'", message):
        return f"{match[1]}.{match[2]}"
    match = re.search(r"Option '([\w.]+)' is not accepted", message)
    return match[1] if match else None


def did_you_mean(unknown: Sequence[str], prefix: str = "") -> str:
    """` (did you mean --train.max_steps?)` naming the key or flag each unknown one is close to; '' for none. A key
    in the wrong section names the right one (train.n_layer: model.n_layer); one of a real section is matched
    within that section (train.colour is not train.lr), one of a mistyped section as a whole key (trian.lr), and a
    bare name by the keys' own names (lr, sweeep)."""
    keys = config_keys()
    by_name = {key.split(".")[-1]: key for key in (*keys, *ENTRY_FLAGS)}
    guesses = []
    for key in unknown:
        section, _, name = key.rpartition(".")
        if section and name in by_name and by_name[name] in keys:  # the right key in another section: train.n_layer
            close = [by_name[name]]
        elif section in SECTIONS:
            fields = [field.name for field in dataclasses.fields(SECTIONS[section])]
            close = [f"{section}.{match}" for match in difflib.get_close_matches(name, fields, n=1)]
        elif section:
            close = difflib.get_close_matches(key, keys, n=1)
        else:
            close = [by_name[match] for match in difflib.get_close_matches(name, by_name, n=1)]
        guesses += [prefix + guess for guess in close]
    return f" (did you mean {', '.join(dict.fromkeys(guesses))}?)" if guesses else ""


def flag_values(args: Sequence[str], flag: str) -> list[tuple[int, str, str]]:
    """Each `FLAG VALUE` / `FLAG=VALUE` in args: (the value's position, the value, what precedes it there)."""
    found = []
    for position, arg in enumerate(args):
        if arg == flag and position + 1 < len(args):
            found.append((position + 1, args[position + 1], ""))
        elif arg.startswith(f"{flag}="):
            found.append((position, arg.removeprefix(f"{flag}="), f"{flag}="))
    return found


def config_file_arguments(args: Sequence[str]) -> list[str]:
    """The FILE of every `--config FILE` / `--config=FILE` in args."""
    return [value for _, value, _ in flag_values(args, "--config")]


# The shipped experiments, installed with the package (tml/configs, a link to the checkout's configs/ there).
SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"


HELP_FLAGS = ("-h", "--help")
DEFAULT_CONFIG = "reference"  # the shipped config tml train and tml slurm run without --config
_SAID_SHIPPED: set[str] = set()  # --config paths told to be shipped configs (a sweep loads each run's config)


def shipped_config(name: str) -> Path | None:
    """The shipped config that a `--config` value which is no file here means: `tiny`, `tiny.yaml` or
    `configs/tiny.yaml` (the README's spelling, followed outside a checkout, where tml was installed from a wheel)."""
    path = Path(name)
    if path.exists() or path.parent not in (Path("."), Path("configs")) or path.suffix not in ("", ".yaml"):
        return None
    shipped = SHIPPED_CONFIGS / f"{path.stem}.yaml"
    return shipped if shipped.is_file() else None


def shipped_config_names() -> list[str]:
    return sorted(path.stem for path in SHIPPED_CONFIGS.glob("*.yaml"))


def with_default_config(argv: Sequence[str]) -> list[str]:
    """Without `--config` (and help not asked for), the reference setup: the run this toolkit exists to reproduce,
    with its early stopping, resume and loggers (the dataclasses' defaults hold its model and schedule only)."""
    if any(arg == "--config" or arg.startswith("--config=") or arg in HELP_FLAGS for arg in argv):
        return list(argv)
    if is_first_local_process():  # Fabric re-runs the command, with these arguments, for each extra rank
        print(f"tml: no --config given: using tml's configs/{DEFAULT_CONFIG}.yaml (the reference setup)",
              file=sys.stderr)
    return ["--config", str(SHIPPED_CONFIGS / f"{DEFAULT_CONFIG}.yaml"), *argv]


def with_shipped_configs(args: list[str]) -> list[str]:
    """args with each `--config` value that names a shipped config (shipped_config) replaced by its path; a value that
    is neither a file nor a shipped name is refused naming the shipped ones (ConfigError)."""
    resolved = list(args)
    for where, value, prefix in flag_values(args, "--config"):
        if (shipped := shipped_config(value)) is not None:
            resolved[where] = prefix + str(shipped)
            if value in _SAID_SHIPPED or not is_first_local_process():  # said once, by one process
                continue
            _SAID_SHIPPED.add(value)
            if Path(value).suffix:  # a path the user typed, which is not here
                print(f"tml: {value} is not here: using the one tml ships ({shipped})", file=sys.stderr)
            elif Path(f"{value}.yaml").exists():
                print(f"tml: --config {value} is tml's {value}.yaml, not ./{value}.yaml (--config {value}.yaml reads "
                      "that)", file=sys.stderr)
        elif not Path(value).exists() and not any(mark in value for mark in "{:\n"):  # not inline YAML either
            raise ConfigError(f"--config {value}: no such file; tml ships {', '.join(shipped_config_names())} "
                              "(e.g. --config tiny)")
    return resolved


def check_config_file(path: str) -> None:
    """A config file must be YAML holding a mapping of sections; said with the file's name, which jsonargparse
    leaves out ("<unicode string>"). A missing file is left to the parser, whose message already names it."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError):
        return
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{path} is not valid YAML{line}: {problem}") from error
    check_config_mapping(values, path)


def check_config_mapping(values: object, path: str | Path) -> None:
    """Loaded YAML that is a config: a mapping of sections, each a mapping of keys (ConfigError naming `path`)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{path} holds {described(values)}; a config file maps sections ({', '.join(SECTIONS)}) "
                          "to their keys")
    for section, keys in values.items():
        if section in SECTIONS and not isinstance(keys, dict):
            first_key = dataclasses.fields(SECTIONS[section])[0].name
            raise ConfigError(f"{path}: section {section} holds {described(keys)}; it maps {section} keys to values, "
                              f"one per indented line below `{section}:` (e.g. `  {first_key}: ...`)")


def described(value: object) -> str:
    """`nothing`, `a list`, `a str`: what a YAML value turned out to be, for a message."""
    if value is None:
        return "nothing"
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def load_yaml_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Convenience for tests and notebooks: `load_yaml_config("configs/tiny.yaml", ["--train.lr=1e-3"])`."""
    if not Path(path).is_file():
        raise ConfigError(f"config file not found: {path}")
    return load_config(["--config", str(path), *overrides])


def dump_yaml(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
