"""The stop flag: a scheduler's signal or the first Ctrl-C asks for a clean stop; the second Ctrl-C aborts."""

import os
import signal

import pytest

from tml.train.preemption import CTRL_C_NOTICE, DEFAULT_SIGNALS, INTERACTIVE_SIGNALS, PreemptionFlag


@pytest.fixture
def flag():
    flag = PreemptionFlag().install(INTERACTIVE_SIGNALS)
    yield flag
    flag.uninstall()


def test_first_ctrl_c_requests_a_stop_and_says_a_second_one_aborts(flag, capfd):
    signal.raise_signal(signal.SIGINT)
    assert flag.requested and flag.interrupted and flag.describe() == "Ctrl-C"
    assert capfd.readouterr().err == CTRL_C_NOTICE


def test_second_ctrl_c_raises_keyboard_interrupt(flag):
    signal.raise_signal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)


def test_extra_local_ranks_stop_without_repeating_the_notice(flag, capfd, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    signal.raise_signal(signal.SIGINT)
    assert flag.interrupted and capfd.readouterr().err == ""


def test_scheduler_signal_keeps_its_name_after_a_ctrl_c(flag):
    signal.raise_signal(signal.SIGUSR1)
    signal.raise_signal(signal.SIGINT)
    assert flag.signal_number == signal.SIGUSR1 and not flag.interrupted and flag.describe() == "SIGUSR1"


def test_default_signals_leave_ctrl_c_to_python():
    assert signal.SIGINT not in DEFAULT_SIGNALS
    flag = PreemptionFlag().install()
    try:
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
        assert not flag.requested
    finally:
        flag.uninstall()


def test_an_ignored_ctrl_c_stays_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as for a job a script started in the background
    try:
        flag = PreemptionFlag().install(INTERACTIVE_SIGNALS)
        signal.raise_signal(signal.SIGINT)
        assert not flag.requested and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        flag.uninstall()
    finally:
        signal.signal(signal.SIGINT, previous)


def test_uninstall_restores_the_previous_handlers(flag):
    flag.uninstall()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_forked_dataloader_workers_ignore_ctrl_c(flag):
    """Workers get the terminal's SIGINT too; one dying of KeyboardInterrupt would fail the step that saves."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: like a DataLoader worker, it inherits the handler
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)  # a second one too: the main process decides, not the worker
        os.write(write_end, b"alive" if not flag.requested else b"flagged")
        os._exit(0)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    assert os.read(read_end, 16) == b"alive" and os.waitstatus_to_exitcode(status) == 0
    assert not flag.requested  # the parent was not signalled
