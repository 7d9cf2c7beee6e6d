import json
import shutil
from dataclasses import replace

import pytest
import torch

from tests.conftest import debug_model_config
from tests.train.conftest import tiny_run_config, write_synthetic_shards
from tml.cli import main
from tml.compare import FIELDS, CompareError, compare_runs, compared_settings
from tml.config import Config
from tml.model.kv_cache import kv_cache_bytes_per_token
from tml.run_dir import CHECKPOINTS, CONFIG_FILE, SUMMARY_FILE, checkpoints_dir, step_name
from tml.train.loop import train
from tml.train.run_lock import hold_run_lock

MAX_STEPS = 4


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Two real, finished runs of the debug model in one parent directory: MLA and MHA, same everything else."""
    shards = write_synthetic_shards(tmp_path_factory.mktemp("shards"))
    parent = tmp_path_factory.mktemp("sweep")
    mla = tiny_run_config(shards, parent / "mla", max_steps=MAX_STEPS, val_interval=2, ckpt_interval=2)
    mha = replace(tiny_run_config(shards, parent / "mha", max_steps=MAX_STEPS, val_interval=2, ckpt_interval=2),
                  model=debug_model_config(attention="mha"))
    for config in (mla, mha):
        train(config)
    return parent


def compare_json(capsys, *args: str) -> list[dict]:
    assert main(["compare", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def compare_table(capsys, monkeypatch, *args: str) -> str:
    monkeypatch.setenv("COLUMNS", "300")  # rich wraps to 80 columns off a terminal
    assert main(["compare", *map(str, args)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    return out


def copy_run(source, target, summary: dict | str | None = None, steps=(), config_text: str | None = None):
    """A hand-made run directory: the source run's config.yaml (or `config_text`), an optional summary.json (a dict,
    or raw text) and empty step directories."""
    target.mkdir(parents=True)
    (target / CONFIG_FILE).write_text(config_text if config_text is not None else (source / CONFIG_FILE).read_text())
    if summary is not None:
        (target / SUMMARY_FILE).write_text(summary if isinstance(summary, str) else json.dumps(summary))
    for step in steps:
        (checkpoints_dir(target) / step_name(step)).mkdir(parents=True)
    return target


def test_json_rows_carry_summary_json_numbers_and_the_shape_of_each_real_run(sweep, capsys):
    rows = {row["run"]: row for row in compare_json(capsys, sweep)}
    assert set(rows) == {str(sweep / "mla"), str(sweep / "mha")}
    for name, attention in (("mla", "mla"), ("mha", "mha")):
        row, summary = rows[str(sweep / name)], json.loads((sweep / name / SUMMARY_FILE).read_text())
        assert list(row) == [*FIELDS, "settings"]
        assert row["settings"]["train.lr"] == 3e-3 and "train.out_dir" not in row["settings"]  # placement: not compared
        for key in ("final_step", "max_steps", "best_val_loss", "best_val_perplexity", "val_loss", "val_perplexity",
                    "tokens_seen", "wall_s", "train_tokens_per_s", "params", "params_non_embedding"):
            assert row[key] == summary[key], key
        # the steps' own speed: start-up, validation and saves count in the wall figure only
        assert row["train_tokens_per_s"] > row["tokens_per_s"]
        assert row["status"] == "finished" and row["final_step"] == MAX_STEPS
        assert row["tokens_per_s"] == pytest.approx(summary["tokens_seen"] / summary["wall_s"])
        model = debug_model_config(attention=attention)
        assert row["attention"] == attention and row["n_layer"] == model.n_layer
        assert row["attention_kind"] == attention.upper()
        assert row["kv_cache_dtype"] == "float32"  # the tiny runs train in 32-true
        assert row["kv_cache_bytes_per_token"] == kv_cache_bytes_per_token(model, torch.float32)
    assert rows[str(sweep / "mla")]["kv_lora_rank"] == debug_model_config().kv_lora_rank
    assert rows[str(sweep / "mha")]["kv_lora_rank"] is None  # MHA never reads it: no default pretending otherwise
    assert rows[str(sweep / "mha")]["n_kv_head"] == 4  # n_kv_head 0 means one per query head: the count is shown
    assert rows[str(sweep / "mla")]["n_kv_head"] is None


def test_settings_equal_in_every_run_are_said_once_above_a_table_of_what_differs(sweep, capsys, monkeypatch):
    out = compare_table(capsys, monkeypatch, sweep)
    same_line, *table = out.splitlines()
    assert same_line.startswith("same in all runs: ")
    assert "norm post" in same_line and "layers 2" in same_line and "KV dtype float32" in same_line
    assert "steps 4/4" in same_line and "status finished" in same_line
    assert "kv rank" not in same_line and "kv heads" not in same_line  # one kind has them, the other has none
    table_text = "\n".join(table)
    assert "attn" in table_text and "KV B/tok" in table_text and "best ppl" in table_text
    assert "layers" not in table_text and "status" not in table_text
    assert "MLA" in table_text and "MHA" in table_text
    header = [cell.strip() for cell in table[0].split("┃")]
    cells = {row[0]: row for line in table[2:] if (row := [cell.strip() for cell in line.split("│")])}
    kv_heads, kv_rank = header.index("kv heads"), header.index("kv rank")
    assert (cells[str(sweep / "mla")][kv_heads], cells[str(sweep / "mla")][kv_rank]) == ("-", "32")
    assert (cells[str(sweep / "mha")][kv_heads], cells[str(sweep / "mha")][kv_rank]) == ("4", "-")


def test_one_run_puts_everything_in_the_table_named_as_given(sweep, capsys, monkeypatch):
    monkeypatch.chdir(sweep)
    out = compare_table(capsys, monkeypatch, "mla")
    assert "same in all runs" not in out
    lines = out.splitlines()  # one `name value` line each: readable in any terminal width
    assert lines[0].split() == ["run", "mla"] and ["layers", "2"] == lines[5].split()
    assert ["norm", "type", "layernorm"] == lines[3].split() and ["mlp", "gelu"] == lines[4].split()
    assert "status         finished" in out and max(map(len, lines)) < 80


def test_rows_sort_by_best_perplexity_by_default_and_by_any_field_with_missing_values_last(sweep, tmp_path, capsys):
    copy_run(sweep / "mla", tmp_path / "killed", steps=[2])  # no summary: no perplexity
    runs = [sweep, tmp_path / "killed"]
    rows = compare_json(capsys, *runs)
    perplexities = [row["best_val_perplexity"] for row in rows]
    assert perplexities[-1] is None and perplexities[:-1] == sorted(perplexities[:-1])
    by_cache = compare_json(capsys, *runs, "--sort", "kv_cache_bytes_per_token")
    caches = [row["kv_cache_bytes_per_token"] for row in by_cache]
    assert caches == sorted(caches) and by_cache[-1]["attention"] == "mha"  # MHA caches more than MLA
    by_name = compare_json(capsys, *runs, "--sort", "run")
    assert [row["run"] for row in by_name] == sorted(row["run"] for row in rows)


def test_an_unknown_sort_key_is_refused_naming_the_choices(sweep, capsys):
    assert main(["compare", str(sweep), "--sort", "perplexity"]) == 1
    assert "--sort perplexity: not a field or setting; choose one of run, " in capsys.readouterr().err
    with pytest.raises(CompareError, match="--sort perplexity: not a field or setting"):
        compare_runs([str(sweep)], "perplexity")


def test_a_run_without_summary_takes_its_step_from_the_newest_checkpoint_and_its_size_from_config_yaml(
        sweep, tmp_path, capsys):
    real = json.loads((sweep / "mla" / SUMMARY_FILE).read_text())
    text = (sweep / "mla" / CONFIG_FILE).read_text()
    sentinel = text.replace(f"model: {real['params']:,} parameters ({real['params_non_embedding']:,} non-embedding)",
                            "model: 1,234,567 parameters (234,567 non-embedding)", 1)
    assert sentinel != text
    killed = copy_run(sweep / "mla", tmp_path / "killed", steps=[2, 6, 4], config_text=sentinel)
    (row,) = compare_json(capsys, killed)
    assert row["status"] == "no summary" and row["final_step"] == 6 and row["max_steps"] == MAX_STEPS
    assert row["best_val_perplexity"] is None and row["tokens_seen"] is None and row["tokens_per_s"] is None
    assert (row["params"], row["params_non_embedding"]) == (1_234_567, 234_567)  # the header line's, not recounted


def test_a_config_without_its_header_line_gets_its_parameters_counted(sweep, tmp_path, capsys):
    real = json.loads((sweep / "mha" / SUMMARY_FILE).read_text())
    text = (sweep / "mha" / CONFIG_FILE).read_text()
    bare = copy_run(sweep / "mha", tmp_path / "bare", config_text=text.split("\n", 1)[1])
    (row,) = compare_json(capsys, bare)
    assert row["status"] == "no summary, no checkpoint" and row["final_step"] is None
    assert (row["params"], row["params_non_embedding"]) == (real["params"], real["params_non_embedding"])


def test_a_summary_older_than_the_newest_checkpoint_is_from_before_a_resume_and_not_shown(sweep, tmp_path, capsys):
    summary = json.loads((sweep / "mla" / SUMMARY_FILE).read_text()) | {"preempted": True}
    resumed = copy_run(sweep / "mla", tmp_path / "resumed", summary=summary, steps=[MAX_STEPS, MAX_STEPS + 2])
    (row,) = compare_json(capsys, resumed)
    assert row["status"] == "no summary" and row["final_step"] == MAX_STEPS + 2 and row["val_perplexity"] is None


@pytest.mark.parametrize(("flags", "status"), [
    ({"stopped_early": True}, "early stop"),
    ({"preempted": True}, "preempted"),  # a summary from before stop_reason
    ({"preempted": True, "stop_reason": "SIGUSR1"}, "preempted (SIGUSR1)"),
    ({"preempted": True, "stop_reason": "Ctrl-C"}, "stopped (Ctrl-C)"),
    ({"diverged": True, "val_perplexity": None}, "diverged"),
    ({}, "finished"),
])
def test_status_says_how_the_run_ended(sweep, tmp_path, capsys, flags, status):
    summary = json.loads((sweep / "mla" / SUMMARY_FILE).read_text()) | flags
    (row,) = compare_json(capsys, copy_run(sweep / "mla", tmp_path / "run", summary=summary))
    assert row["status"] == status


def test_unreadable_files_become_rows_that_say_why_and_the_other_runs_still_show(sweep, tmp_path, capsys, monkeypatch):
    broken = tmp_path / "broken"
    copy_run(sweep / "mla", broken / "bad-summary", summary="{not json")
    copy_run(sweep / "mla", broken / "bad-number", summary={"final_step": "four"})
    old_key = (sweep / "mla" / CONFIG_FILE).read_text().replace("model:\n", "model:\n  old_rank: 8\n")
    copy_run(sweep / "mla", broken / "old-key", summary=json.loads((sweep / "mla" / SUMMARY_FILE).read_text()),
             config_text=old_key)
    (broken / "no-config" / CHECKPOINTS / step_name(2)).mkdir(parents=True)
    rows = {row["run"].rsplit("/", 1)[1]: row for row in compare_json(capsys, broken, sweep / "mla")}
    assert rows["bad-summary"]["status"].startswith("unreadable: summary.json: Expecting property name")
    assert rows["bad-number"]["status"] == "unreadable: summary.json: final_step is 'four', not a number"
    assert rows["old-key"]["status"].startswith("unreadable: config.yaml: unknown key model.old_rank")
    assert rows["old-key"]["best_val_perplexity"] is not None  # the summary still tells how it went
    assert rows["old-key"]["params"] is not None  # from config.yaml's header line
    assert rows["no-config"]["status"] == "unreadable: no config.yaml" and rows["no-config"]["final_step"] == 2
    assert rows["mla"]["status"] == "finished"
    out = compare_table(capsys, monkeypatch, broken)
    assert "unreadable: no config.yaml" in out and "unreadable: summary.json: Expecting property name" in out
    header = next(line for line in out.splitlines() if line.lstrip().startswith("run "))
    # A run without a readable config differs in nothing it cannot tell: the others' shared values stay shared.
    assert "layers" not in header and "model." not in header and "data." not in header and "train." not in header
    assert "layers 2" in out.splitlines()[0]


def test_a_directory_of_runs_and_sweeps_lists_the_sweeps_runs_too_but_not_deeper(sweep, tmp_path, capsys):
    copy_run(sweep / "mla", tmp_path / "runs" / "tiny", summary=json.loads((sweep / "mla" / SUMMARY_FILE).read_text()))
    shutil.copytree(sweep, tmp_path / "runs" / "kinds")  # a sweep's out_dir: its runs one level further down
    copy_run(sweep / "mha", tmp_path / "runs" / "old" / "sweep" / "mha")  # three levels down: not looked for
    (tmp_path / "runs" / "shards").mkdir()  # a directory without runs is passed over
    rows = compare_json(capsys, tmp_path / "runs")
    assert sorted(row["run"] for row in rows) == [str(tmp_path / "runs" / name) for name in ("kinds/mha", "kinds/mla",
                                                                                              "tiny")]


def test_paths_that_hold_no_run_are_refused_in_one_line_naming_them(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    for path, why in ((tmp_path / "empty", "not a run directory"), (tmp_path / "file.txt", "not a directory"),
                      (tmp_path / "missing", "no such directory")):
        assert main(["compare", str(path)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"tml compare: {path}: {why}") and err.count("\n") == 1


def test_an_unreadable_directory_and_ctrl_c_end_in_one_line_not_a_traceback(sweep, monkeypatch, capsys):
    def refuse(*args):  # what scanning a directory without read permission raises (root, as in CI, reads anything)
        raise PermissionError(13, "Permission denied", str(sweep))

    monkeypatch.setattr("tml.cli.compare_runs", refuse)
    assert main(["compare", str(sweep)]) == 1
    assert capsys.readouterr().err == f"tml compare: [Errno 13] Permission denied: '{sweep}'\n"

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr("tml.cli.compare_runs", interrupted)
    assert main(["compare", str(sweep)]) == 130
    assert capsys.readouterr().err == "tml compare: interrupted\n"


def test_a_run_named_twice_is_one_row(sweep, capsys):
    rows = compare_json(capsys, sweep / "mla", sweep)
    assert sorted(row["run"] for row in rows) == sorted([str(sweep / "mla"), str(sweep / "mha")])


def test_settings_that_differ_besides_the_shape_get_columns_and_sort_by_them(sweep, tmp_path, capsys, monkeypatch):
    text = (sweep / "mla" / CONFIG_FILE).read_text()
    summary = json.loads((sweep / "mla" / SUMMARY_FILE).read_text())
    for lr, steps in (("0.001", 4), ("0.01", 8)):
        copy_run(sweep / "mla", tmp_path / f"lr{lr}", summary=summary | {"max_steps": steps},
                 config_text=text.replace("lr: 0.003", f"lr: {lr}").replace(f"max_steps: {MAX_STEPS}",
                                                                          f"max_steps: {steps}")
                 .replace(str(sweep / "mla"), str(tmp_path)))
    out = compare_table(capsys, monkeypatch, tmp_path)
    header = next(line for line in out.splitlines() if "train.lr" in line)
    assert "train.out_dir" not in out and "train.min_lr" not in header  # placement, and what did not change
    assert "train.max_steps" not in header and f"{MAX_STEPS}/8" in out  # the steps column shows it
    # the same status in all runs: the setting goes last, not between the figures
    assert "status" not in header and header.rstrip().endswith("train.lr")
    assert "0.001" in out and "0.01" in out
    by_lr = compare_json(capsys, tmp_path, "--sort=-train.lr")  # with =: argparse reads "-x" as an option
    assert [row["settings"]["train.lr"] for row in by_lr] == [0.01, 0.001]


def test_a_block_of_another_mlp_and_norm_type_is_a_column_of_the_shape(sweep, tmp_path, capsys, monkeypatch):
    text = (sweep / "mla" / CONFIG_FILE).read_text().split("\n", 1)[1]  # without the header: parameters counted anew
    assert "norm_type: layernorm" in text and "mlp: gelu" in text
    copy_run(sweep / "mla", tmp_path / "gpt2", config_text=text)
    copy_run(sweep / "mla", tmp_path / "deepseek",
             config_text=text.replace("norm_type: layernorm", "norm_type: rmsnorm").replace("mlp: gelu", "mlp: swiglu"))
    out = compare_table(capsys, monkeypatch, tmp_path)
    same_line, *table = out.splitlines()
    assert "norm type" not in same_line and "mlp" not in same_line and "model.mlp" not in out
    header = [cell.strip() for cell in table[0].split("┃")]
    cells = {row[0]: row for line in table[2:] if (row := [cell.strip() for cell in line.split("│")])}
    norm_type, mlp = header.index("norm type"), header.index("mlp")
    assert (cells[str(tmp_path / "gpt2")][norm_type], cells[str(tmp_path / "gpt2")][mlp]) == ("layernorm", "gelu")
    assert (cells[str(tmp_path / "deepseek")][norm_type], cells[str(tmp_path / "deepseek")][mlp]) == ("rmsnorm",
                                                                                                     "swiglu")


def test_a_run_that_is_training_now_says_so_instead_of_an_earlier_end(sweep, tmp_path, capsys):
    summary = json.loads((sweep / "mla" / SUMMARY_FILE).read_text()) | {"preempted": True}
    run = copy_run(sweep / "mla", tmp_path / "resumed", summary=summary, steps=[2])
    with hold_run_lock(run, wait_s=0):  # what a resumed training holds while it runs
        (row,) = compare_json(capsys, run)
    assert row["status"].startswith("running (pid ") and row["best_val_perplexity"] is None
    (row,) = compare_json(capsys, run)
    assert row["status"] == "preempted"


def test_a_perplexity_past_float_range_shows_as_inf_not_as_missing(sweep, tmp_path, capsys, monkeypatch):
    summary = json.loads((sweep / "mla" / SUMMARY_FILE).read_text()) | {
        "best_val_loss": 9502.0, "best_val_perplexity": None, "val_loss": 9502.0, "val_perplexity": None}
    copy_run(sweep / "mla", tmp_path / "blown", summary=summary)
    copy_run(sweep / "mla", tmp_path / "fine", summary=json.loads((sweep / "mla" / SUMMARY_FILE).read_text()))
    out = compare_table(capsys, monkeypatch, tmp_path)
    blown = next(line for line in out.splitlines() if "blown" in line)
    assert blown.count(" inf ") == 2


def test_a_config_section_that_is_not_a_mapping_is_an_unreadable_row_saying_so(sweep, tmp_path, capsys):
    text = (sweep / "mla" / CONFIG_FILE).read_text()
    broken = text.split("\nmodel:\n", 1)[0] + "\nmodel: 5\n"
    (row,) = compare_json(capsys, copy_run(sweep / "mla", tmp_path / "run", config_text=broken))
    assert row["status"] == ("unreadable: config.yaml: section model holds an int; it maps model keys to values, "
                             "one per indented line below `model:` (e.g. `  vocab_size: ...`)")


def test_the_kv_cache_figures_are_those_the_run_computed_and_a_local_corpus_shows_no_book_list(sweep, tmp_path,
                                                                                               capsys):
    text = (sweep / "mla" / CONFIG_FILE).read_text()
    assert "precision: 32-true" in text and "B/token in float32" in text.splitlines()[0]
    # A 16-mixed config trained on a CPU, where it ran as bf16: the header line says what the cache really was.
    on_cpu = text.replace("precision: 32-true", "precision: 16-mixed").replace("B/token in float32",
                                                                              "B/token in bfloat16")
    (row,) = compare_json(capsys, copy_run(sweep / "mla", tmp_path / "cpu", config_text=on_cpu))
    assert row["kv_cache_dtype"] == "bfloat16"
    assert "data.book_ids" not in row["settings"] and "data.source" in row["settings"]  # the sweep's own text


def test_compare_shows_zero_settings_only_for_deepspeed_runs():
    assert "train.zero_stage" not in compared_settings(Config())
    deepspeed = Config.from_dict({"train": {"strategy": "deepspeed", "zero_stage": 3}})
    assert compared_settings(deepspeed)["train.zero_stage"] == 3


def test_a_branch_says_which_run_and_step_it_branched_from(sweep, tmp_path, capsys, monkeypatch):
    summary = json.loads((sweep / "mla" / SUMMARY_FILE).read_text())
    branch = {**summary, "branched_from": str(checkpoints_dir(tmp_path / "long") / step_name(800)),
              "branched_at_step": 800}
    copy_run(sweep / "mla", tmp_path / "runs" / "wsd-1000", summary=branch)
    copy_run(sweep / "mla", tmp_path / "runs" / "long", summary=summary)
    rows = {row["run"].rsplit("/", 1)[-1]: row for row in compare_json(capsys, tmp_path / "runs")}
    assert (rows["wsd-1000"]["branched_from"], rows["long"]["branched_from"]) == ("long@800", None)
    table = compare_table(capsys, monkeypatch, tmp_path / "runs")
    assert "branch of" in table and "long@800" in table
