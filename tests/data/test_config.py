"""DataConfig refuses a value it cannot prepare at load time, naming the key."""

from __future__ import annotations

import pytest

from tml.data.config import DataConfig, DataConfigError


@pytest.mark.parametrize("val_split", ["books", "tail", "auto"])
def test_each_val_split_mode_is_accepted(val_split):
    assert DataConfig(val_split=val_split).val_split == val_split


def test_an_unknown_val_split_is_refused_naming_the_choices():
    with pytest.raises(DataConfigError, match=r"data.val_split='random': must be one of books, tail, auto"):
        DataConfig(val_split="random")


def test_val_frac_outside_zero_and_one_is_refused():
    with pytest.raises(DataConfigError, match="data.val_frac=1.0: must be between 0 and 1"):
        DataConfig(val_frac=1.0)


@pytest.mark.parametrize("max_books", [0, -3])
def test_max_books_below_one_is_refused_before_it_can_empty_a_local_source(max_books):
    with pytest.raises(DataConfigError, match=rf"data.max_books={max_books}: must be at least 1, or null"):
        DataConfig(source="/some/corpus", max_books=max_books)
