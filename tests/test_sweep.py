"""--sweep: expanding the combinations up front, and running them one after the other with `tml train`."""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.train.conftest import tiny_run_config, write_synthetic_shards
from tml.cli import main
from tml.compare import compare_runs
from tml.config import Config, ConfigError, dump_yaml
from tml.data.gutenberg import GutenbergError
from tml.sweep import (
    SweepError,
    check_runs,
    checkout_root,
    child_environment,
    expand_sweep,
    has_ended,
    split_sweep_arguments,
    split_values,
    taken_elsewhere,
)
from tml.train.checkpoint import checkpoints_dir, read_meta
from tml.train.loop import train
from tml.train.preemption import CTRL_C_EXIT_STATUS
from tml.train.run_lock import hold_run_lock, training_in_progress

TINY = str(REPO_ROOT / "configs" / "tiny.yaml")


def expand(argv):
    return expand_sweep(*split_sweep_arguments(argv))


def test_every_combination_is_a_run_named_by_its_values_under_the_experiments_out_dir(tmp_path):
    runs = expand(["--config", TINY, "--train.out_dir", str(tmp_path / "sweep"), "--sweep", "model.attention=mla,mha",
                   "--sweep=train.lr=1e-3,3e-4", "--train.max_steps", "7"])
    assert [run.name for run in runs] == ["attention=mla,lr=1e-3", "attention=mla,lr=3e-4", "attention=mha,lr=1e-3",
                                          "attention=mha,lr=3e-4"]  # the first axis varies slowest
    for run in runs:
        values = dict(run.overrides)
        assert run.config.model.attention == values["model.attention"]
        assert run.config.train.lr == float(values["train.lr"])
        assert run.config.train.max_steps == 7  # the experiment's own overrides hold for every run
        assert run.out_dir == tmp_path / "sweep" / run.name
        assert run.argv[:2] == ["--config", TINY] and run.config.log.run_name == run.name
        assert run.config.log.wandb_group == str(tmp_path / "sweep")  # the out_dir: wandb shows the runs together


def test_runs_that_differ_in_what_their_shards_are_built_from_get_shard_directories_of_their_own(tmp_path):
    out = ["--config", TINY, "--train.out_dir", str(tmp_path / "sweep"), "--data.shard_dir", str(tmp_path / "shards")]
    runs = expand([*out, "--sweep", "data.max_books=2,4", "--sweep", "train.lr=1e-3,3e-3"])
    assert [run.config.data.shard_dir for run in runs] == [str(tmp_path / "shards-max_books=2")] * 2 + [
        str(tmp_path / "shards-max_books=4")] * 2  # one set of shards per data, shared by the runs that read it
    runs = expand([*out, "--sweep", "train.lr=1e-3,3e-3", "--sweep", "data.stride=16,32"])  # windows, not shards
    assert {run.config.data.shard_dir for run in runs} == {str(tmp_path / "shards")}
    runs = expand(["--config", TINY, "--train.out_dir", str(tmp_path / "sweep"), "--sweep", "data.max_books=2,4",
                   "--sweep", f"data.shard_dir={tmp_path / 'a'},{tmp_path / 'b'}"])  # named by the sweep itself
    assert [run.config.data.shard_dir for run in runs] == [str(tmp_path / name) for name in "abab"]


def test_an_experiment_valid_only_with_the_swept_values_is_a_valid_sweep(tmp_path):
    runs = expand(["--config", TINY, "--train.out_dir", str(tmp_path), "--model.attention", "mha",
                   "--model.n_kv_head", "3", "--model.n_embd", "96", "--sweep", "model.n_head=3,6"])
    assert [run.config.model.attention_kind for run in runs] == ["MHA", "GQA"]


def test_a_path_value_is_named_by_its_last_part_and_two_that_would_share_a_directory_are_refused(tmp_path):
    out = ["--config", TINY, "--train.out_dir", str(tmp_path / "sweep")]
    runs = expand([*out, "--sweep", "data.source=/corpora/poems/,/corpora/plays"])
    assert [run.name for run in runs] == ["source=poems", "source=plays"]
    assert runs[0].config.data.source == "/corpora/poems/"
    with pytest.raises(SweepError, match="would share the directory 'source=poems'"):
        expand([*out, "--sweep", "data.source=/a/poems,/b/poems"])


def test_values_split_on_commas_outside_brackets_and_quotes_and_a_key_may_keep_its_dashes(tmp_path):
    assert split_values("[11,12],[16]") == ["[11,12]", "[16]"]
    assert split_values("'a,b',c") == ["'a,b'", "c"]
    runs = expand(["--config", TINY, "--train.out_dir", str(tmp_path), "--sweep", "--data.book_ids=[11,12],[16]"])
    assert [run.config.data.book_ids for run in runs] == [[11, 12], [16]]


@pytest.mark.parametrize(("argv", "message"), [
    (["--sweep", "model.n_layer"], "--sweep model.n_layer: expected KEY=VALUE1,VALUE2"),
    (["--sweep", "n_layer=2,4"], "'n_layer' is not a config key: name it section.key"),
    (["--sweep", "model.n_layer=2,,4"], "an empty value"),
    (["--sweep", "model.n_layer=2,2"], "a value is listed twice"),
    (["--sweep", "train.out_dir=a,b"], "the sweep sets train.out_dir for each run itself"),
    (["--sweep", "log.run_name=a,b"], "the sweep sets log.run_name for each run itself"),
    (["--sweep"], "--sweep needs KEY=VALUE1,VALUE2,... after it"),
    (["--sweep", "model.n_layer=2", "--sweep", "model.n_layer=4"], "--sweep model.n_layer is given twice"),
    (["--model.n_layer", "3", "--sweep", "model.n_layer=2,4"], "--model.n_layer is both set and swept"),
])
def test_a_malformed_sweep_is_refused_naming_the_argument(argv, message):
    with pytest.raises(SweepError, match=re.escape(message)):
        split_sweep_arguments(["--config", TINY, *argv])


def test_a_value_one_run_cannot_take_is_refused_naming_that_run_before_any_runs(tmp_path):
    with pytest.raises(ConfigError, match=r"^sweep run n_head=4,n_kv_head=3: .*n_kv_head"):
        expand(["--config", TINY, "--train.out_dir", str(tmp_path), "--model.attention", "mha",
                "--sweep", "model.n_head=4", "--sweep", "model.n_kv_head=2,3"])
    assert not list(tmp_path.iterdir())


def test_combinations_that_would_train_the_same_thing_are_refused_saying_why(tmp_path):
    with pytest.raises(SweepError, match=r"runs attention=mha,kv_lora_rank=32 and attention=mha,kv_lora_rank=64 "
                                         r"would train the same thing: model.kv_lora_rank changes nothing in an MHA run"):
        expand(["--config", TINY, "--train.out_dir", str(tmp_path), "--sweep", "model.attention=mla,mha",
                "--sweep", "model.kv_lora_rank=32,64"])
    with pytest.raises(SweepError, match="would train the same thing: train.zero_stage is not read by these runs$"):
        expand(["--config", TINY, "--train.out_dir", str(tmp_path), "--sweep", "train.zero_stage=1,2"])  # no ZeRO
    # How a run runs is reason enough to sweep it (a speed study), though what it trains is the same.
    assert len(expand(["--config", TINY, "--train.out_dir", str(tmp_path), "--sweep", "data.num_workers=0,2"])) == 2
    with pytest.raises(SweepError, match="train.lr 3e-4 and 0.0003 are one value$"):
        expand(["--config", TINY, "--train.out_dir", str(tmp_path), "--sweep", "train.lr=3e-4,0.0003"])
    runs = expand(["--config", TINY, "--train.out_dir", str(tmp_path), "--sweep", "model.kv_lora_rank=32,64"])
    assert len(runs) == 2


def test_an_out_dir_that_holds_a_run_itself_is_refused(tmp_path):
    (tmp_path / "config.yaml").write_text("model: {}\n")
    with pytest.raises(SweepError, match="holds a run itself.*give the sweep a directory of its own"):
        expand(["--config", TINY, "--train.out_dir", str(tmp_path), "--sweep", "train.lr=1e-3,3e-4"])


def test_tml_train_refuses_a_bad_sweep_in_one_line_with_status_2(tmp_path, capsys):
    assert main(["train", "--config", TINY, "--sweep", "model.n_layer=2,2"]) == 2
    assert capsys.readouterr().err == "tml: --sweep model.n_layer=2,2: a value is listed twice\n"


def test_a_run_has_ended_when_its_summary_says_so_at_the_steps_it_is_now_given(tmp_path):
    run = expand(["--config", TINY, "--train.out_dir", str(tmp_path), "--sweep", "train.max_steps=5"])[0]
    assert not has_ended(run.config)  # nothing there yet
    run.out_dir.mkdir()
    (run.out_dir / "config.yaml").write_text(dump_yaml(run.config))
    summary = {"final_step": 3, "stopped_early": False, "preempted": False, "diverged": False}
    (run.out_dir / "summary.json").write_text(json.dumps(summary))
    assert not has_ended(run.config)  # finished at 3 of an earlier max_steps: 5 now, so it resumes
    (run.out_dir / "summary.json").write_text(json.dumps({**summary, "final_step": 5}))
    assert has_ended(run.config)
    (run.out_dir / "summary.json").write_text(json.dumps({**summary, "preempted": True}))
    assert not has_ended(run.config)
    (run.out_dir / "summary.json").write_text(json.dumps({**summary, "stopped_early": True}))
    assert has_ended(run.config)


def test_a_directory_that_holds_another_run_under_the_same_name_is_refused_but_one_to_train_longer_is_not(tmp_path):
    runs = expand(["--config", TINY, "--train.out_dir", str(tmp_path), "--sweep", "train.lr=1e-3,3e-3"])
    runs[0].out_dir.mkdir()
    other = Config.from_dict(runs[0].config.to_dict())
    other.model.attention = "mha"  # another sweep's run that took the same name
    (runs[0].out_dir / "config.yaml").write_text(dump_yaml(other))
    with pytest.raises(SweepError, match=r"^sweep run lr=1e-3: .* holds a run with other settings \(model.attention "
                                         r"'mha' there, 'mla' here\): give this sweep its own --train.out_dir"):
        check_runs(runs)
    shorter = Config.from_dict(runs[0].config.to_dict())
    shorter.train.max_steps, shorter.train.devices = 100, 2  # the same run, to be trained longer, on more devices
    (runs[0].out_dir / "config.yaml").write_text(dump_yaml(shorter))
    check_runs(runs)


def test_an_attention_sweep_under_one_flops_budget_gives_each_run_its_own_steps_and_dry_run_says_them(tmp_path, capsys):
    argv = ["--config", TINY, "--train.out_dir", str(tmp_path / "sweep"), "--data.shard_dir", str(tmp_path / "shards"),
            "--train.max_flops", "1e14", "--sweep", "model.attention=mla,mha"]
    mla, mha = expand(argv)
    assert mla.config.train.max_steps != mha.config.train.max_steps  # other FLOPs per token, one budget
    assert main(["train", *argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    for position, run in enumerate((mla, mha), 1):
        assert (f"{position}/2 {run.name}: starts fresh; max_steps {run.config.train.max_steps:,} from "
                "train.max_flops=1e+14 (flops_per_token ") in out

    # A rerun with a bigger budget continues the sweep's own runs, as one with a bigger max_steps does.
    mla.out_dir.mkdir(parents=True)
    smaller = Config.from_dict({**mla.config.to_dict(), "train": {**mla.config.to_dict()["train"], "max_flops": 5e13}})
    (mla.out_dir / "config.yaml").write_text(dump_yaml(smaller))
    check_runs([mla, mha])


def test_a_run_whose_local_source_is_missing_or_empty_refuses_the_sweep_before_any_run(tmp_path, capsys):
    (tmp_path / "poems").mkdir()
    (tmp_path / "poems" / "a.txt").write_text("A poem.\n")
    (tmp_path / "empty").mkdir()
    out = ["--config", TINY, "--train.out_dir", str(tmp_path / "sweep"), "--data.shard_dir", str(tmp_path / "shards")]
    for other, why in (("plays", "is neither 'gutenberg' nor an existing directory"), ("empty", "holds no .txt or .jsonl files")):
        argv = [*out, "--sweep", f"data.source={tmp_path / 'poems'},{tmp_path / other}"]
        with pytest.raises(GutenbergError, match=f"^sweep run source={other}: data.source=.*{why}"):
            check_runs(expand(argv))
        assert main(["train", *argv]) == 1 and f"tml: sweep run source={other}: " in capsys.readouterr().err
        assert main(["train", *argv, "--dry-run"]) == 1  # as the sweep: refused as a whole
        assert capsys.readouterr().out.endswith("no run starts\n")
    assert not (tmp_path / "sweep").exists() and not list(tmp_path.glob("shards*"))


def test_an_out_dir_that_cannot_be_made_and_ctrl_c_before_any_run_each_end_in_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("x")
    argv = ["train", "--config", TINY, "--train.out_dir", str(tmp_path / "file" / "sweep"), "--sweep",
            "train.lr=1e-3,3e-3"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err == f"tml: cannot make the sweep's train.out_dir {tmp_path / 'file' / 'sweep'}: {tmp_path / 'file'} " \
                  "is a file, not a directory\n"
    assert main([*argv, "--dry-run"]) == 1
    assert capsys.readouterr().out.endswith(f"refused before its first run: {err.removeprefix('tml: ')}")

    def interrupted(runs):
        raise KeyboardInterrupt

    monkeypatch.setattr("tml.sweep.check_runs", interrupted)
    assert main(["train", "--config", TINY, "--train.out_dir", str(tmp_path / "sweep"), "--sweep",
                 "train.lr=1e-3,3e-3"]) == CTRL_C_EXIT_STATUS
    assert capsys.readouterr().err == "tml: sweep interrupted\n"


# ------------------------------------------------------------------------------------------------ end to end


def write_experiment(tmp_path: Path, **train) -> Path:
    shards = write_synthetic_shards(tmp_path / "shards")
    config = tiny_run_config(shards, tmp_path / "sweep", resume="auto", **train)
    config_file = tmp_path / "experiment.yaml"
    config_file.write_text(dump_yaml(config))
    return config_file


def start_sweep(*argv: str, sigint_ignored: bool = False) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "launch" / "local.py"), *argv], cwd=REPO_ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,  # its own process group, which the test signals as a terminal's Ctrl-C would
        preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None,
    )


def lines_until_step(process: subprocess.Popen, step: int) -> list[str]:
    """The sweep's output up to its first run's console line for `step`."""
    seen = []
    for line in process.stdout:
        seen.append(line)
        if re.match(rf"^step\s+{step} \| loss", line):
            break
    return seen


def ctrl_c_at_step(process: subprocess.Popen, step: int) -> str:
    """Ctrl-C to the whole process group, as a terminal sends it, once the first run logged `step`; all output."""
    seen = lines_until_step(process, step)
    os.killpg(process.pid, signal.SIGINT)
    rest, _ = process.communicate(timeout=120)
    return "".join(seen) + rest


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_sweep_goes_on_past_a_failed_run_leaves_one_in_training_elsewhere_and_a_rerun_skips_ended_runs(tmp_path,
                                                                                                         capsys):
    experiment = write_experiment(tmp_path, max_steps=3, val_interval=3, ckpt_interval=3)
    # A vocabulary smaller than the shards' passes every check but the run's own start: a failure at run time.
    argv = ["--config", str(experiment), "--sweep", "model.vocab_size=128,256", "--sweep", "model.attention=mla,mha"]
    with hold_run_lock(tmp_path / "sweep" / "vocab_size=256,attention=mla"):  # a second sweep is training it
        first = start_sweep(*argv)
        output, _ = first.communicate(timeout=240)
    assert first.returncode == 1, output
    assert ("tml: sweep: vocab_size=128,attention=mla: failed (exit status 2); vocab_size=128,attention=mha: failed "
            "(exit status 2); vocab_size=256,attention=mla: training elsewhere; vocab_size=256,attention=mha: done"
            ) in output
    assert "model.vocab_size=128 is smaller than the vocabulary of the shards" in output
    rows = {Path(row["run"]).name: row for row in compare_runs([str(tmp_path / "sweep")])}
    assert list(rows) == ["vocab_size=256,attention=mha"]
    assert rows["vocab_size=256,attention=mha"]["status"] == "finished"
    assert rows["vocab_size=256,attention=mha"]["attention"] == "mha"

    second = start_sweep(*argv)  # the other training is gone: its run is trained now, the ended one skipped
    output, _ = second.communicate(timeout=240)
    assert second.returncode == 1, output
    assert output.count(": ended earlier, skipped") == 1
    assert "vocab_size=256,attention=mla: done; vocab_size=256,attention=mha: ended earlier" in output
    assert read_meta(checkpoints_dir(tmp_path / "sweep" / "vocab_size=256,attention=mla") / "last")["step"] == 3
    assert main(["train", *argv, "--dry-run"]) == 1  # as the sweep itself: its failing runs fail again
    out = capsys.readouterr().out
    assert "1/4 vocab_size=128,attention=mla: would fail at its start: model.vocab_size=128 is smaller" in out
    assert "4/4 vocab_size=256,attention=mha: ended earlier, would be skipped" in out and "no run starts" not in out


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_ctrl_c_stops_the_sweep_after_the_run_in_progress_saves_and_the_same_command_resumes_it(tmp_path, capsys):
    experiment = write_experiment(tmp_path, max_steps=10_000, val_interval=10_000, ckpt_interval=10_000)
    process = start_sweep("--config", str(experiment), "--sweep", "train.lr=1e-3,3e-3")
    output = ctrl_c_at_step(process, 3)
    assert process.returncode == CTRL_C_EXIT_STATUS, output
    assert "tml: sweep: lr=1e-3: stopped; 1 not started" in output and "Traceback" not in output
    stopped_at = read_meta(checkpoints_dir(tmp_path / "sweep" / "lr=1e-3") / "last")["step"]
    assert stopped_at >= 3 and not (tmp_path / "sweep" / "lr=3e-3").exists()

    # Every run is checked before the first starts: a resume refused to one is refused to the sweep, at once.
    refused = start_sweep("--config", str(experiment), "--train.resume", "none", "--sweep", "train.lr=1e-3,3e-3")
    output, _ = refused.communicate(timeout=120)
    assert refused.returncode == 1 and "tml: sweep run lr=1e-3: " in output and "train.resume is 'none'" in output
    assert "sweep run 1/2" not in output and not (tmp_path / "sweep" / "lr=3e-3").exists()

    end = str(stopped_at + 2)  # the same sweep, told to end soon: the stopped run resumes, the other one starts
    sweep = ["--config", str(experiment), "--train.max_steps", end, "--sweep", "train.lr=1e-3,3e-3"]
    assert main(["train", *sweep, "--dry-run"]) == 0  # says so first, and changes nothing
    out = capsys.readouterr().out
    assert f"1/2 lr=1e-3: resumes {checkpoints_dir(tmp_path / 'sweep' / 'lr=1e-3')}" in out
    assert f"at step {stopped_at} of {end} (changed since: train.max_steps 10000 -> {end})" in out
    assert f"2/2 lr=3e-3: starts fresh, {end} steps; its shards are ready" in out
    assert not (tmp_path / "sweep" / "lr=3e-3").exists()
    assert main(["train", *sweep, "--train.resume", "none", "--dry-run"]) == 1
    assert "1/2 lr=1e-3: refused: " in (out := capsys.readouterr().out) and "2/2 lr=3e-3: starts fresh" in out
    assert out.endswith("tml: the sweep would be refused before its first run: no run starts\n")
    again = start_sweep(*sweep)
    output, _ = again.communicate(timeout=120)
    assert again.returncode == 0, output
    assert f"at step {stopped_at}" in output  # "resumed from ... at step N"
    for name in ("lr=1e-3", "lr=3e-3"):
        assert json.loads((tmp_path / "sweep" / name / "summary.json").read_text())["final_step"] == int(end)


def test_ctrl_c_as_a_run_finishes_calls_the_run_done_and_still_stops_the_sweep(tmp_path, capsys, monkeypatch):
    import tml.sweep as sweep
    from tml.train.loop import train

    runs = expand(["--config", str(write_experiment(tmp_path, max_steps=2, val_interval=2, ckpt_interval=2)),
                   "--sweep", "train.lr=1e-3,3e-3"])

    def finished_as_ctrl_c_came(command):  # stands in for the child: it trains to the end, and says 130 (tml train's
        train(runs[0].config)  # status when Ctrl-C came during the last validation), the sweep having seen SIGINT too
        return CTRL_C_EXIT_STATUS, signal.SIGINT

    monkeypatch.setattr(sweep, "run_one", finished_as_ctrl_c_came)
    assert sweep.run_sweep_here(runs) == CTRL_C_EXIT_STATUS
    assert "tml: sweep: lr=1e-3: done; 1 not started" in capsys.readouterr().out
    assert not (tmp_path / "sweep" / "lr=3e-3").exists()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_sweep_killed_outright_stops_its_training_which_saves_last_instead_of_going_on_alone(tmp_path):
    experiment = write_experiment(tmp_path, max_steps=10_000, val_interval=10_000, ckpt_interval=10_000)
    process = start_sweep("--config", str(experiment), "--sweep", "train.lr=1e-3,3e-3")
    lines_until_step(process, 3)
    run_dir = tmp_path / "sweep" / "lr=1e-3"
    assert training_in_progress(run_dir) is not None
    process.kill()  # SIGKILL to the sweep alone: its training must notice by itself
    process.wait()
    deadline = time.monotonic() + 120
    while training_in_progress(run_dir) is not None:
        assert time.monotonic() < deadline, "the training went on after its sweep was killed"
        time.sleep(0.2)
    assert read_meta(checkpoints_dir(run_dir) / "last")["step"] >= 3  # saved on the SIGTERM it was sent
    assert json.loads((run_dir / "summary.json").read_text())["stop_reason"] == "SIGTERM"
    assert not (tmp_path / "sweep" / "lr=3e-3").exists()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_ctrl_c_ignored_when_the_sweep_started_stays_ignored_by_the_sweep_and_its_runs(tmp_path):
    experiment = write_experiment(tmp_path, max_steps=8, val_interval=8, ckpt_interval=8, log_interval=1)
    # Ignored as under `nohup`, or `cmd &` in a script:
    process = start_sweep("--config", str(experiment), "--sweep", "train.lr=1e-3,3e-3", sigint_ignored=True)
    output = ctrl_c_at_step(process, 3)
    assert process.returncode == 0, output
    assert "tml: sweep: lr=1e-3: done; lr=3e-3: done" in output


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_sweeps_started_together_over_one_out_dir_share_the_runs_and_train_each_once(tmp_path):
    experiment = write_experiment(tmp_path, max_steps=3, val_interval=3, ckpt_interval=3)
    argv = ["--config", str(experiment), "--sweep", "train.lr=1e-3,2e-3,3e-3"]
    workers = [start_sweep(*argv), start_sweep(*argv)]  # one per GPU, on a machine with two
    outputs = [worker.communicate(timeout=200)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs
    assert sum(output.count(": done") for output in outputs) == 3  # each run trained by one of them
    for name in ("lr=1e-3", "lr=2e-3", "lr=3e-3"):
        summary = json.loads((tmp_path / "sweep" / name / "summary.json").read_text())
        assert summary["final_step"] == 3 and summary["tokens_seen"] == 3 * 4 * 32  # trained once, not resumed


@pytest.mark.skipif(sys.version_info < (3, 11), reason="PYTHONSAFEPATH is Python 3.11's")
def test_a_sweeps_runs_import_this_tml_not_a_tml_folder_where_the_sweep_runs(tmp_path):
    (tmp_path / "tml").mkdir()
    (tmp_path / "tml" / "__init__.py").write_text("raise ImportError('the tml folder in the working directory')\n")
    done = subprocess.run([sys.executable, "-m", "tml.cli", "--version"], cwd=tmp_path, env=child_environment(),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("tml ")


def test_a_sweep_of_branches_run_again_continues_the_branches_it_started(tmp_path, capsys):
    """`--train.resume STEP --sweep train.max_steps=...`: one branch per length. Run again, a branch with checkpoints
    of its own continues them (branching it again over them is refused); one not started yet still branches."""
    experiment = write_experiment(tmp_path, max_steps=4, val_interval=100, ckpt_interval=2, keep_checkpoints=9)
    train(tiny_run_config(tmp_path / "shards", tmp_path / "long", max_steps=4, ckpt_interval=2, keep_checkpoints=9))
    step_2 = str(checkpoints_dir(tmp_path / "long") / "step-0000002")
    argv = ["--config", str(experiment), "--train.resume", step_2, "--sweep", "train.max_steps=4,6"]
    first, _ = expand(argv)
    train(dataclasses.replace(first.config, train=dataclasses.replace(first.config.train, max_steps=3)))  # stopped
    runs = expand(argv)
    assert [run.config.train.resume for run in runs] == ["auto", step_2]
    check_runs(runs)
    assert main(["train", *argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "1/2 max_steps=4: resumes" in out and "at step 3 of 4" in out
    assert f"2/2 max_steps=6: resumes {step_2} at step 2 of 6" in out


def test_an_installed_tml_is_not_put_on_pythonpath_a_checkout_is(monkeypatch):
    """Installed, its directory is all of site-packages: on PYTHONPATH it would come before the standard library."""
    monkeypatch.delenv("PYTHONPATH", raising=False)
    assert child_environment()["PYTHONPATH"] == str(REPO_ROOT) and checkout_root() == str(REPO_ROOT)
    monkeypatch.setattr("site.getsitepackages", lambda: [str(REPO_ROOT)])
    assert checkout_root() is None
    assert "PYTHONPATH" not in child_environment() and child_environment()["PYTHONSAFEPATH"] == "1"


def test_a_run_the_other_sweep_finishes_while_this_one_looks_is_ended_not_failed(tmp_path, monkeypatch):
    """The other sweep's training writes its summary, then lets go of its lock: whichever moment this sweep looks
    at, the run is training elsewhere or ended, never free and unfinished (which made it retrain or call it failed)."""
    config = tiny_run_config(write_synthetic_shards(tmp_path / "shards"), tmp_path / "sweep" / "lr=1e-3", max_steps=2,
                             val_interval=2, ckpt_interval=2)
    train(config)
    looks = iter(["pid 7 on gpu-node"])  # held at the first look, let go right after

    def lock_let_go_after_one_look(out_dir):
        return next(looks, None)

    monkeypatch.setattr("tml.train.run_lock.training_in_progress", lock_let_go_after_one_look)
    monkeypatch.setattr("tml.compare.training_in_progress", lock_let_go_after_one_look)
    assert taken_elsewhere("lr=1e-3", config) == "training elsewhere"
    assert taken_elsewhere("lr=1e-3", config) == "ended earlier"
