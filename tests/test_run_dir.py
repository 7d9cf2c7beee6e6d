"""The run directory's layout: step names sort as numbers, and only complete step directories count."""

from tml.run_dir import another_runs_config, checkpoints_dir, newest_checkpoint, saved_steps, step_name


def test_step_names_are_zero_padded_so_they_sort_in_step_order():
    names = [step_name(step) for step in (9, 10, 1_000_000)]
    assert names == sorted(names) == ["step-0000009", "step-0000010", "step-1000000"]


def test_saved_steps_are_the_complete_step_directories_only(tmp_path):
    root = checkpoints_dir(tmp_path)
    for name in (step_name(20), step_name(3), ".tmp-" + step_name(40), ".stale-" + step_name(3), "step-x"):
        (root / name).mkdir(parents=True)
    (root / step_name(50)).write_text("a file, not a checkpoint")
    (root / "last").symlink_to(step_name(20))
    assert saved_steps(tmp_path) == [3, 20]
    assert saved_steps(tmp_path / "never-trained") == []


def test_the_newest_checkpoint_is_the_highest_complete_step_below_a_bound_when_given(tmp_path):
    for step in (3, 20, 7):
        (checkpoints_dir(tmp_path) / step_name(step)).mkdir(parents=True)
    assert newest_checkpoint(tmp_path) == checkpoints_dir(tmp_path) / "step-0000020"
    assert newest_checkpoint(tmp_path, before=20) == checkpoints_dir(tmp_path) / "step-0000007"
    assert newest_checkpoint(tmp_path, before=3) is None and newest_checkpoint(tmp_path / "none") is None


def test_a_copied_runs_own_config_says_where_the_run_will_go_and_how_to_continue_the_copy(tmp_path):
    run = tmp_path / "renamed"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("train:\n  out_dir: runs/a\n")
    config_file = str(run / "config.yaml")
    assert another_runs_config(["--config", config_file], "runs/a") == (
        f"--config {config_file} is the config of the run in {run}, whose train.out_dir says runs/a: this run goes "
        f"there; --train.out_dir {run} continues the run in {run}")
    assert another_runs_config([f"--config={config_file}", "--train.lr", "1e-3"], "runs/a") is not None
    assert another_runs_config(["--config", config_file, "--train.out_dir", "runs/b"], "runs/b") is None
    assert another_runs_config(["--config", config_file], str(run)) is None  # the run's own place
    (run / "experiment.yaml").write_text("")
    assert another_runs_config(["--config", str(run / "experiment.yaml")], "runs/a") is None  # not a run's config
