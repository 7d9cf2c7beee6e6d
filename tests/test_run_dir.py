"""The run directory's layout: step names sort as numbers, and only complete step directories count."""

from tml.run_dir import checkpoints_dir, newest_checkpoint, saved_steps, step_name


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
