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
from typing import Any, Dict, Optional, Sequence

__all__ = ["StopRequests", "DEFAULT_STOP_SIGNALS"]

DEFAULT_STOP_SIGNALS = ("SIGTERM", "SIGINT")


class StopRequests:
    """A context manager that turns stop signals into a flag.

    While active, each signal in `signals` (names such as ``"SIGTERM"``) sets `requested` to
    its name. A second Ctrl-C raises KeyboardInterrupt at once, for a user who will not wait
    for the iteration to end. On exit the previous handlers come back.

    Python only lets the main thread install handlers; elsewhere (a trainer run in a thread)
    it installs nothing, says so in `active`, and `requested` stays None.
    """

    def __init__(self, signals: Sequence[str] = DEFAULT_STOP_SIGNALS) -> None:
        self.signals = []
        for name in signals:
            number = getattr(signal, str(name), None)
            if not isinstance(number, signal.Signals):
                raise ValueError(f"signals: {name!r} is not a signal name on this system "
                                 f"(expected names such as 'SIGTERM')")
            self.signals.append(number)
        self.requested: Optional[str] = None
        self.active = False
        self._previous: Dict[signal.Signals, Any] = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is not threading.main_thread():
            return self
        for number in self.signals:
            self._previous[number] = signal.signal(number, self._handle)
        self.active = True
        return self

    def __exit__(self, *exc_info) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()
        self.active = False

    def _handle(self, signum: int, frame) -> None:
        # Only set the flag here: printing from a handler can re-enter a stream's write.
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.requested is None:
            self.requested = signal.Signals(signum).name
