from tml.train.early_stopping import EarlyStopping


def test_stops_after_patience_validations_without_improvement():
    stopper = EarlyStopping(patience=2, min_delta=0.01)
    assert [stopper.update(v) for v in (3.0, 2.5, 2.495, 2.6)] == [False, False, False, True]
    assert stopper.best == 2.5


def test_improvement_resets_the_count():
    stopper = EarlyStopping(patience=2)
    assert [stopper.update(v) for v in (3.0, 3.1, 2.9, 3.0, 3.0)] == [False, False, False, False, True]


def test_zero_patience_never_stops():
    stopper = EarlyStopping(patience=0)
    assert not any(stopper.update(5.0) for _ in range(10))


def test_state_round_trips():
    stopper = EarlyStopping(patience=3)
    stopper.update(2.0), stopper.update(2.1)
    restored = EarlyStopping(patience=3)
    restored.load_state_dict(stopper.state_dict())
    assert (restored.best, restored.bad_validations) == (2.0, 1)


def test_improved_says_whether_the_latest_validation_set_a_new_best():
    stopper = EarlyStopping(patience=3, min_delta=0.1)
    assert not stopper.improved  # nothing validated yet
    stopper.update(2.0)
    assert stopper.improved
    stopper.update(1.95)  # within min_delta: not an improvement
    assert not stopper.improved
    stopper.update(1.5)
    assert stopper.improved
