import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT
from tml.config import (
    SECTIONS,
    Config,
    ConfigError,
    build_parser,
    dump_yaml,
    load_config,
    load_yaml_config,
    with_default_config,
)
from tml.data.config import DataConfig, DataConfigError
from tml.model.config import ModelConfigError
from tml.train.config import TrainConfig, TrainConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_yaml_values_and_cli_overrides_are_applied(tmp_path):
    path = write(tmp_path, "model:\n  n_layer: 2\ntrain:\n  lr: 1.0e-3\n")
    config = load_yaml_config(path, ["--train.lr", "2e-4", "--data.book_ids=[11,12]"])
    assert config.model.n_layer == 2
    assert config.train.lr == pytest.approx(2e-4)
    assert config.data.book_ids == [11, 12]


@pytest.mark.parametrize(("text", "message"), [
    ("model:\n  n_layers: 2\n", "unknown key model.n_layers (did you mean model.n_layer?)"),
    ("trian:\n  max_steps: 5\n", "unknown key trian.max_steps (did you mean train.max_steps?)"),  # the section
    ("max_steps: 5\n", "unknown key max_steps (did you mean train.max_steps?)"),  # no section
    ("train:\n  colour: blue\n", "unknown key train.colour"),  # nothing close: no guess
])
def test_unknown_yaml_key_is_rejected_naming_the_file_and_the_key_it_is_close_to(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_config(["--config", str(path)])
    assert str(error.value) == f"{path}: {message}"
    good = tmp_path / "good.yaml"
    good.write_text("train:\n  max_steps: 5\n")
    for files in ([good, path], [path, good]):  # of two files, the one that holds the key
        with pytest.raises(ConfigError) as error:
            load_config([part for file in files for part in ("--config", str(file))])
        assert str(error.value) == f"{path}: {message}"


@pytest.mark.parametrize(("argv", "guess"), [
    (["--train.max_step", "5"], " (did you mean --train.max_steps?)"),
    (["--trian.lr=1"], " (did you mean --train.lr?)"),  # the section misspelled
    (["--lr", "1"], " (did you mean --train.lr?)"),  # the section left out
    (["--train.max_step", "5", "--model.kv_rank", "8"], " (did you mean --train.max_steps, --model.kv_lora_rank?)"),
    (["--colour=blue"], ""),  # nothing close enough: no guess
    (["--sweeep", "train.lr=1,2"], " (did you mean --sweep?)"),  # the entry points' own flags too
    (["--dry_run"], " (did you mean --dry-run?)"),
    (["--train.n_layer", "2"], " (did you mean --model.n_layer?)"),  # the right key, in another section
])
def test_unknown_cli_key_is_rejected_by_name_with_the_keys_it_is_close_to(argv, guess):
    with pytest.raises(ConfigError) as error:
        load_config(argv)
    assert str(error.value) == f"unrecognized arguments: {' '.join(argv)}{guess}"


def test_wrong_type_is_rejected_with_the_key_named(tmp_path):
    path = write(tmp_path, "train:\n  max_steps: many\n")
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_yaml_config(path)


@pytest.mark.parametrize(("argv", "message"), [
    (["--train.lr", "abc"], "train.lr: expected a number, got 'abc'"),
    (["--model.kv_lora_rank=1.5"], "model.kv_lora_rank: expected an integer, got '1.5'"),
    (["--data.max_books", "all"], "data.max_books: expected an integer or null, got 'all'"),
    (["--model.attention", "gqa"], "model.attention: expected one of mla, mha, got 'gqa'"),
    (["--model.bias", "maybe"], "model.bias: expected true or false, got 'maybe'"),
])
def test_a_wrong_type_on_the_command_line_is_one_line_in_the_configs_own_words(argv, message):
    with pytest.raises(ConfigError) as caught:
        load_config(argv)
    assert str(caught.value) == message


def test_invalid_model_combination_names_the_field(tmp_path):
    path = write(tmp_path, "model:\n  n_head: 5\n")
    with pytest.raises((ConfigError, ModelConfigError), match="n_embd"):
        load_yaml_config(path)


def test_config_round_trips_through_a_dict():
    config = load_config(["--model.n_layer=3", "--train.seed=7"])
    assert Config.from_dict(config.to_dict()) == config


def test_from_dict_refuses_unknown_keys():
    with pytest.raises(ConfigError, match="train.bogus"):
        Config.from_dict({"train": {"bogus": 1}})


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_yaml_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(("text", "message"), [
    ("train: [1, 2\n", r" is not valid YAML at line 2, column 1: expected ',' or ']'"),
    ("- a\n- b\n", r" holds a list; a config file maps sections \(model, data, train, log\)"),
    ("", r" holds nothing; a config file maps sections"),
    ("model: 5\n", r": section model holds an int; it maps model keys to values, one per indented line below "
                    r"`model:` \(e.g. `  vocab_size: ...`\)"),
    ("train:\n", r": section train holds nothing; it maps train keys to values"),
])
def test_a_config_file_that_is_not_a_yaml_mapping_is_refused_naming_the_file(tmp_path, text, message):
    path = tmp_path / "experiment.yaml"
    path.write_text(text)
    for args in (["--config", str(path)], [f"--config={path}"]):
        with pytest.raises(ConfigError, match=re.escape(str(path)) + message):
            load_config(args)


def test_abbreviated_key_is_not_taken_for_a_longer_one():
    with pytest.raises(ConfigError, match="max_step"):
        load_config(["--train.max_step", "3"])


CONFIGS_DIR = REPO_ROOT / "configs"
MULTI_GPU_CONFIGS = ("ddp", "zero2", "zero3")  # the reference run with DDP, ZeRO-2 and ZeRO-3


@pytest.mark.parametrize("path", sorted(CONFIGS_DIR.glob("*.yaml")), ids=lambda path: path.name)
def test_every_shipped_config_loads(path):
    assert isinstance(load_yaml_config(path), Config)


def test_reference_config_is_exactly_the_reference_setup():
    config = load_yaml_config(CONFIGS_DIR / "reference.yaml")
    m, t = config.model, config.train
    assert (m.block_size, m.n_layer, m.n_head, m.n_embd, m.attention, m.norm) == (512, 12, 12, 768, "mla", "post")
    assert (t.batch_size, t.grad_accum, t.max_steps) == (20, 4, 18_370)
    assert (t.lr, t.min_lr, t.warmup_frac, t.grad_clip) == (3e-4, 3e-5, 0.1, 1.0)
    assert (t.val_interval, t.precision, t.devices, t.num_nodes, t.strategy) == (500, "16-mixed", 1, 1, "auto")
    assert t.early_stop_patience > 0 and t.ckpt_interval > 0
    assert t.compile  # speed only: the GPU check measured 1.9x eager's tokens/s
    assert config.data.source == "gutenberg" and config.log.tensorboard


@pytest.mark.parametrize("name", MULTI_GPU_CONFIGS)
def test_multi_gpu_configs_keep_the_reference_model_global_batch_and_schedule(name):
    reference = load_yaml_config(CONFIGS_DIR / "reference.yaml")
    config = load_yaml_config(CONFIGS_DIR / f"{name}.yaml")
    assert config.model == reference.model
    global_batch = config.train.batch_size * config.train.grad_accum * config.train.devices * config.train.num_nodes
    assert global_batch == reference.train.batch_size * reference.train.grad_accum == 80
    for key in ("max_steps", "lr", "min_lr", "warmup_frac", "weight_decay", "grad_clip", "val_interval",
                "val_batches", "early_stop_patience", "precision"):
        assert getattr(config.train, key) == getattr(reference.train, key), key
    assert config.train.devices > 1 and config.train.strategy != "auto"


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("--train.devices=0", "train.devices=0"),
        ("--train.devices=-1", "train.devices=-1"),
        ("--train.num_nodes=0", "train.num_nodes=0"),
        ("--train.batch_size=0", "train.batch_size=0"),
        ("--train.grad_accum=0", "train.grad_accum=0"),
        ("--train.max_steps=0", "train.max_steps=0"),
        ("--train.val_interval=0", "train.val_interval=0"),
        ("--train.val_batches=0", "train.val_batches=0"),
        ("--train.ckpt_interval=0", "train.ckpt_interval=0"),
        ("--train.log_interval=0", "train.log_interval=0"),
        ("--train.keep_checkpoints=-1", "train.keep_checkpoints=-1"),
        ("--train.early_stop_patience=-1", "train.early_stop_patience=-1"),
        ("--train.early_stop_min_delta=-0.1", "train.early_stop_min_delta=-0.1"),
        ("--train.lr=-1", "train.lr=-1.0"),
        ("--train.lr=nan", "train.lr"),
        ("--train.min_lr=-1e-5", "train.min_lr"),
        ("--train.min_lr=1e-3", "train.min_lr=0.001: must be in \\[0, lr=0.0003\\]"),
        ("--train.warmup_frac=-0.1", "train.warmup_frac"),
        ("--train.warmup_frac=1.5", "train.warmup_frac"),
        ("--train.weight_decay=-0.1", "train.weight_decay"),
        ("--train.beta1=1", "train.beta1"),
        ("--train.beta2=-0.5", "train.beta2"),
        ("--train.grad_clip=-1", "train.grad_clip"),
        ("--train.out_dir=", "train.out_dir"),
        ("--data.stride=0", "data.stride=0"),
        ("--data.shard_tokens=0", "data.shard_tokens=0"),
        ("--data.val_frac=0", "data.val_frac=0.0"),
        ("--data.val_frac=1", "data.val_frac=1.0"),
        ("--data.encode_threads=-1", "data.encode_threads"),
        ("--data.num_workers=-1", "data.num_workers"),
    ],
)
def test_bad_value_is_refused_at_load_time_naming_the_key(override, named):
    with pytest.raises(ConfigError, match=named):
        load_config([override])


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["--train.strategy=deepspeed", "--train.zero_stage=0"], "train.zero_stage=0"),
        (["--train.strategy=deepspeed", "--train.zero_stage=5"], "train.zero_stage=5"),
        (["--train.strategy=ddp", "--train.zero_offload=optimizer"], "train.zero_offload.*strategy=deepspeed"),
        (["--train.strategy=deepspeed", "--train.zero_stage=2", "--train.zero_offload=optimizer+params"],
         "train.zero_offload.*zero_stage=3"),
    ],
)
def test_impossible_combination_is_refused_at_load_time(overrides, named):
    with pytest.raises(ConfigError, match=named):
        load_config(overrides)


@pytest.mark.parametrize(
    "values",
    [dict(strategy="fsdp"), dict(precision="16-true"), dict(accelerator="tpu"), dict(zero_offload="nvme")],
)
def test_section_built_in_code_refuses_values_outside_its_literal(values):
    with pytest.raises(TrainConfigError, match=f"train.{next(iter(values))}"):
        TrainConfig(**values)


def test_section_refuses_a_bad_value_set_by_replace_too():
    with pytest.raises(DataConfigError, match="data.stride"):
        dataclasses.replace(DataConfig(), stride=0)


@pytest.mark.parametrize(
    "overrides",
    [
        ["--train.grad_clip=0"],  # no clipping
        ["--train.keep_checkpoints=0", "--train.early_stop_patience=0"],  # keep none / never stop early
        ["--train.warmup_frac=0"],
        ["--train.warmup_frac=1"],  # warm up for the whole run
        ["--train.min_lr=0"],
        ["--train.lr=0", "--train.min_lr=0"],  # frozen weights: the early-stopping plateau test trains like this
        ["--train.min_lr=3e-4"],  # equal to lr: a constant schedule after warm-up
        ["--train.weight_decay=0", "--train.beta1=0"],
        ["--train.strategy=ddp", "--train.zero_stage=0"],  # zero_stage only matters to DeepSpeed
        ["--data.num_workers=0", "--data.encode_threads=0"],
    ],
)
def test_edge_values_that_work_are_accepted(overrides):
    assert isinstance(load_config(overrides), Config)


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_help_explains_every_key(section):
    """The dataclass docstrings' `Attributes:` lines are the `--help` text; a new field must get one too."""
    helps = {action.dest: action.help for action in build_parser()._actions}
    undocumented = [f"{section}.{field.name}" for field in dataclasses.fields(SECTIONS[section])
                    if not helps.get(f"{section}.{field.name}")]
    assert undocumented == []


BUDGET_EXPERIMENT = """\
model: {block_size: 32, n_layer: 2, n_head: 4, n_embd: 64, kv_lora_rank: 32, qk_nope_head_dim: 16,
        qk_rope_head_dim: 8, v_head_dim: 16, vocab_size: 256}
train: {batch_size: 4, grad_accum: 2, max_steps: 5, max_tokens: 10000}
"""  # 4 x 2 x 32 = 256 tokens a step


def test_a_budget_in_the_file_or_on_the_command_line_decides_max_steps(tmp_path):
    path = write(tmp_path, BUDGET_EXPERIMENT)
    assert load_yaml_config(path).train.max_steps == 10000 // 256  # the file's max_steps: 5 is not used
    assert load_yaml_config(path, ["--train.devices=2"]).train.max_steps == 10000 // 512
    by_flops = load_yaml_config(path, ["--train.max_tokens=null", "--train.max_flops=1e12"])
    mha = load_yaml_config(path, ["--train.max_tokens=null", "--train.max_flops=1e12", "--model.attention=mha"])
    assert (by_flops.train.max_steps, mha.train.max_steps) == (5155, 5287)  # tests/train/test_budget.py's figures


@pytest.mark.parametrize(("overrides", "message"), [
    (["--train.max_flops=1e12"], r"train\.max_tokens=10000 and train\.max_flops=1e\+12 are both set"),
    (["--train.max_tokens=100"], r"train\.max_tokens=100 is less than one optimizer step, which costs 256 tokens"),
    (["--train.max_tokens=0"], r"train\.max_tokens=0: must be a number > 0"),
    (["--train.max_tokens=null", "--train.max_flops=-1"], r"train\.max_flops=-1\.0: must be a number > 0"),
])
def test_a_budget_no_run_can_use_is_refused_at_load_time_naming_the_key(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_yaml_config(write(tmp_path, BUDGET_EXPERIMENT), overrides)


def test_a_saved_config_with_a_budget_rebuilds_with_the_same_max_steps(tmp_path):
    for overrides in ([], ["--train.max_tokens=null", "--train.max_flops=3e11"]):
        config = load_yaml_config(write(tmp_path, BUDGET_EXPERIMENT), overrides)
        saved = config.to_dict()
        assert Config.from_dict(saved) == config
        (tmp_path / "config.yaml").write_text(dump_yaml(config))  # what a run directory holds
        assert load_config(["--config", str(tmp_path / "config.yaml")]) == config
        saved["train"]["max_steps"] = 1  # a stale max_steps beside the budget: the budget still decides
        assert Config.from_dict(saved).train.max_steps == config.train.max_steps


@pytest.mark.parametrize("value", ["tiny", "tiny.yaml", "configs/tiny.yaml"])
def test_a_shipped_config_is_found_by_name_from_any_directory(tmp_path, monkeypatch, value):
    """Installed from a wheel there is no configs/ beside the user: the package carries the shipped ones."""
    monkeypatch.chdir(tmp_path)
    assert load_config(["--config", value]) == load_config(["--config", str(REPO_ROOT / "configs" / "tiny.yaml")])
    assert load_config([f"--config={value}", "--train.lr", "0.01"]).train.lr == 0.01


def test_a_file_here_wins_over_the_shipped_config_of_its_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny.yaml").write_text("train:\n  max_steps: 3\n")
    assert load_config(["--config", "configs/tiny.yaml"]).train.max_steps == 3


def test_a_config_that_is_neither_a_file_nor_shipped_names_the_shipped_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^--config tinyy: no such file; tml ships books, ddp, reference, small, "
                                          r"tiny, zero2, zero3 \(e\.g\. --config tiny\)$"):
        load_config(["--config", "tinyy"])


def test_the_package_ships_the_checkouts_configs_not_a_copy_of_them():
    """tml/configs is a link to configs/ (pyproject's package-data takes the files through it): never two copies
    that drift apart."""
    from tml.config import SHIPPED_CONFIGS

    assert SHIPPED_CONFIGS.is_symlink() and SHIPPED_CONFIGS.resolve() == (REPO_ROOT / "configs").resolve()
    assert {p.stem for p in SHIPPED_CONFIGS.glob("*.yaml")} >= {"tiny", "small", "reference", "ddp", "zero2", "zero3"}


def test_tml_train_without_a_config_runs_the_reference_setup():
    config = load_config(with_default_config(["--train.max_steps", "7"]))
    assert config == load_config(["--config", str(REPO_ROOT / "configs" / "reference.yaml"), "--train.max_steps", "7"])
    assert config.train.out_dir == "runs/reference" and config.train.early_stop_patience == 5


@pytest.mark.parametrize("argv", [["--config", "configs/tiny.yaml"], ["--config=configs/tiny.yaml"], ["--help"]])
def test_a_named_config_or_help_is_left_alone(argv):
    assert with_default_config(argv) == argv


def test_a_max_steps_typed_beside_a_budget_is_refused_not_silently_unused():
    tiny = ["--config", str(REPO_ROOT / "configs" / "tiny.yaml"), "--train.max_tokens", "1e5"]
    with pytest.raises(ConfigError, match=r"^--train.max_steps is not used while train.max_tokens=100000 decides the "
                                          r"steps \(max_steps 195\): change --train.max_tokens, or give "
                                          r"--train.max_tokens null to train for --train.max_steps$"):
        load_config([*tiny, "--train.max_steps=30"])
    assert load_config([*tiny, "--train.max_steps", "30", "--train.max_tokens", "null"]).train.max_steps == 30


def test_print_config_prints_the_config_the_run_uses(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_config(["--config", str(REPO_ROOT / "configs" / "tiny.yaml"), "--train.max_tokens", "1e5",
                     "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "  max_steps: 195\n" in printed  # the budget's steps, not the file's 400
    assert Config.from_dict(yaml.safe_load(printed)).train.max_steps == 195


def test_using_a_shipped_config_for_a_path_or_over_a_file_of_its_name_here_is_said_once(tmp_path, monkeypatch,
                                                                                         capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("tml.config._SAID_SHIPPED", set())
    load_config(["--config", "configs/small.yaml"])
    load_config(["--config", "configs/small.yaml"])  # a sweep loads each run's config: said once
    (tmp_path / "small.yaml").write_text("train:\n  max_steps: 3\n")
    assert load_config(["--config", "small"]).train.max_steps != 3  # a bare name is the shipped config
    assert capsys.readouterr().err.splitlines() == [
        f"tml: configs/small.yaml is not here: using the one tml ships ({REPO_ROOT / 'tml' / 'configs' / 'small.yaml'})",
        "tml: --config small is tml's small.yaml, not ./small.yaml (--config small.yaml reads that)"]
