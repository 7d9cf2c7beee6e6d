"""A flag that a signal raises and the loop reads between steps, so a stopped job saves `last` and exits cleanly.

The handler only sets a flag (and, for Ctrl-C, says what happens next); the loop all-reduces it every step, so
when any rank is signalled every rank saves together and returns `preempted=True`. SLURM sends SIGUSR1/SIGUSR2
(`--signal`) before the time limit and SIGTERM on preemption. `tml train` also turns the first Ctrl-C (SIGINT)
into the same clean stop; the second one gets Python's default back (KeyboardInterrupt), so a run that hangs
can still be killed from the keyboard.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterable
from types import FrameType

from tml.train.ranks import is_first_local_process

DEFAULT_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
# What `tml train` listens to: the scheduler's signals plus Ctrl-C (tml/cli.py adds SIGINT). SIGINT is left out of
# DEFAULT_SIGNALS so that library callers of `train()` keep Python's usual KeyboardInterrupt.
INTERACTIVE_SIGNALS: tuple[signal.Signals, ...] = (*DEFAULT_SIGNALS, signal.SIGINT)
CTRL_C_EXIT_STATUS = 130  # 128 + SIGINT: what shells report for a run ended by Ctrl-C, so `tml train && ...` stops
CTRL_C_NOTICE = "tml: Ctrl-C: stopping after this step and saving `last` (press Ctrl-C again to abort at once)\n"


class PreemptionFlag:
    def __init__(self) -> None:
        self.signal_number: int | None = None
        self._previous: dict[int, object] = {}
        self._owner_pid = os.getpid()

    @property
    def requested(self) -> bool:
        return self.signal_number is not None

    @property
    def interrupted(self) -> bool:
        """True when the stop was asked for with Ctrl-C, not by a scheduler."""
        return self.signal_number == signal.SIGINT

    def _handle(self, signal_number: int, frame: FrameType | None) -> None:
        if signal_number == signal.SIGINT:
            self._handle_ctrl_c()
        else:
            self.signal_number = signal_number

    def _handle_ctrl_c(self) -> None:
        # DataLoader workers are forked with this handler and get the terminal's SIGINT too: they ignore it, the
        # main process decides (a worker that died of KeyboardInterrupt would fail the step that should save).
        if os.getpid() != self._owner_pid:
            return
        if self.signal_number is None:  # a scheduler's signal already seen keeps its name (SLURM acts on it)
            self.signal_number = signal.SIGINT
        previous = self._previous.pop(signal.SIGINT, None)
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
        # The terminal signals every local rank; one line per machine is enough.
        if is_first_local_process():
            announce(CTRL_C_NOTICE)

    def install(self, signals: Iterable[int] = DEFAULT_SIGNALS) -> PreemptionFlag:
        """Install the handlers (main thread only: Python delivers signals there); keeps the old ones to restore.

        A SIGINT that is ignored (a job started in the background by a script) stays ignored.
        """
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in signals:
            if sig in self._previous:  # already this flag's: keep the handler it replaced, to restore
                continue
            # After one Ctrl-C the next one aborts; a SIGINT ignored from the start stays ignored.
            if sig == signal.SIGINT and (self.interrupted or signal.getsignal(sig) is signal.SIG_IGN):
                continue
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            if previous is not None:  # None: a handler not set from Python, which Python cannot put back
                signal.signal(sig, previous)  # type: ignore[arg-type]
        self._previous.clear()

    def describe(self) -> str:
        """How the stop was asked for, for messages: "Ctrl-C", "SIGTERM", ..."""
        if self.signal_number is None:
            return "a signal to another rank"
        return "Ctrl-C" if self.interrupted else signal.Signals(self.signal_number).name


def announce(line: str) -> None:
    """Print from a signal handler: through sys.stderr (so Rich keeps it above a live progress bar), or straight
    to the file descriptor when the handler interrupted a write to that same stream (Python refuses to re-enter)."""
    try:
        print(line, end="", file=sys.stderr, flush=True)
    except RuntimeError:
        try:
            os.write(sys.__stderr__.fileno(), line.encode())
        except (OSError, ValueError, AttributeError):  # no usable stderr: the stop happens all the same
            pass


def install_preemption_handler(signals: Iterable[int] = DEFAULT_SIGNALS) -> PreemptionFlag:
    return PreemptionFlag().install(signals)
