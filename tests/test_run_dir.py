"""The run directory's layout: step names sort as numbers, and only complete step directories count."""

from tml.run_dir import checkpoints_dir, saved_steps, step_name


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
