"""A flag that a signal raises and the loop reads between steps, so a preempted job saves `last` and exits cleanly.

The handler only sets a flag (nothing else is safe inside a signal handler); the loop all-reduces it every step,
so when any rank is signalled every rank saves together and returns `preempted=True`. SLURM sends SIGUSR1/SIGUSR2
(`--signal`) before the time limit and SIGTERM on preemption.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterable
from types import FrameType

DEFAULT_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)


class PreemptionFlag:
    def __init__(self) -> None:
        self.signal_number: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_number is not None

    def _handle(self, signal_number: int, frame: FrameType | None) -> None:
        self.signal_number = signal_number

    def install(self, signals: Iterable[int] = DEFAULT_SIGNALS) -> PreemptionFlag:
        """Install the handlers (main thread only: Python delivers signals there); keeps the old ones to restore."""
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)  # type: ignore[arg-type]
        self._previous.clear()


def install_preemption_handler(signals: Iterable[int] = DEFAULT_SIGNALS) -> PreemptionFlag:
    return PreemptionFlag().install(signals)
