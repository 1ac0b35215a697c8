"""Stopping a long-running command: Ctrl-C (SIGINT), SIGTERM, or ``--duration``."""

from __future__ import annotations

import signal
import threading
import time
from typing import Any, Dict, Optional

__all__ = ["Stop"]


class Stop:
    """Set by SIGINT/SIGTERM and by a ``--duration`` deadline; a context manager that
    installs the signal handlers (main thread only) and restores them.

    SIGTERM always just stops the command (exit 0).  SIGINT (Ctrl-C) raises
    ``KeyboardInterrupt`` (exit 130) while the command is starting -- connecting,
    binding -- wherever it blocks, so it is never ignored; once :attr:`running`, it
    stops the command like SIGTERM unless ``sigint_interrupts``, then it interrupts in
    every phase.
    """

    def __init__(self, duration: Optional[float], sigint_interrupts: bool = False) -> None:
        self.event = threading.Event()
        self.deadline = None if duration is None else time.monotonic() + duration
        self.sigint_interrupts = sigint_interrupts
        #: Set once the command is up: Ctrl-C then stops it instead of interrupting.
        self.running = False
        self.signum: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def __enter__(self) -> Stop:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        self.event.set()
        if signum == signal.SIGINT and (self.sigint_interrupts or not self.running):
            raise KeyboardInterrupt

    @property
    def stopped(self) -> bool:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return True
        return self.event.is_set()

    def timed_out(self) -> bool:
        return (
            not self.event.is_set()
            and self.deadline is not None
            and time.monotonic() >= self.deadline
        )
