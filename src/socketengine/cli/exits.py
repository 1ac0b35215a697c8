"""Exit statuses of the ``socketengine`` command and the two errors that choose them."""

from __future__ import annotations

__all__ = [
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "CommandError",
    "UsageError",
    "one_line",
]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """The command line is wrong (exit status 2)."""


class CommandError(Exception):
    """The command failed (exit status 1); the message says why."""


def one_line(exc: BaseException) -> str:
    """An exception as one line of text (no ``[Errno 98]``, no line breaks)."""
    text = str(exc)
    if isinstance(exc, OSError) and exc.strerror and len(exc.args) == 2:
        text = exc.strerror + (f": {exc.filename}" if exc.filename else "")
    text = " ".join(text.split())
    return text or type(exc).__name__
