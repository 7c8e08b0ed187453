"""Stop requests by signal, so that training saves where it is instead of losing the epoch.

Cluster schedulers end a job with SIGTERM (SLURM at its time limit or on preemption, then
SIGKILL some 30 s later), torchrun forwards SIGTERM to its workers, and users press Ctrl-C.
By default each of these kills Python between two meta-iterations and loses everything since
the last epoch checkpoint (minutes on a GPU, up to ten on a CPU). While `StopRequests` is
active they only set a flag; the trainer looks at it after each meta-iteration, writes
``train_model_latest`` with the epoch's progress and returns.
"""

from __future__ import annotations

import signal
import threading
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["StopRequests", "DEFAULT_STOP_SIGNALS"]

DEFAULT_STOP_SIGNALS = ("SIGTERM", "SIGINT")


def _catchable(name: Any) -> signal.Signals:
    number = getattr(signal, str(name), None)
    if (not isinstance(number, signal.Signals) or number not in signal.valid_signals()
            or number in (getattr(signal, "SIGKILL", None), getattr(signal, "SIGSTOP", None))):
        raise ValueError(f"signals: {name!r} is not a signal that can be caught on this system "
                         f"(expected names such as 'SIGTERM'; SIGKILL and SIGSTOP cannot be caught)")
    return number


class StopRequests:
    """A context manager that turns stop signals into a flag.

    While active, each signal in `signals` (names such as ``"SIGTERM"``) sets `requested` to
    its name. A second Ctrl-C raises KeyboardInterrupt at once, for a user who will not wait
    for the iteration to end. On exit the previous handlers come back.

    A signal that the process ignores (SIG_IGN, e.g. SIGINT of a job started in the background)
    or whose handler was installed outside Python stays as it is. Python only lets the main
    thread install handlers; elsewhere (a trainer run in a thread) it installs nothing, says
    so in `active`, and `requested` stays None.
    """

    def __init__(self, signals: Sequence[str] = DEFAULT_STOP_SIGNALS) -> None:
        self.signals: List[signal.Signals] = [_catchable(name) for name in signals]
        self.requested: Optional[str] = None
        self.active = False
        self._previous: Dict[signal.Signals, Any] = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is not threading.main_thread():
            return self
        try:
            for number in self.signals:
                current = signal.getsignal(number)
                if current is signal.SIG_IGN or current is None:
                    continue
                self._previous[number] = signal.signal(number, self._handle)
        except BaseException:
            self._restore()
            raise
        self.active = True
        return self

    def __exit__(self, *exc_info) -> None:
        self._restore()
        self.active = False

    def _restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        # Only set the flag here: printing from a handler can re-enter a stream's write.
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.requested is None:
            self.requested = signal.Signals(signum).name
