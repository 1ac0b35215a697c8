"""What the command line prints: data lines on stdout, status lines on stderr."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Dict

from ..render import format_address, safe

__all__ = ["Console", "clock", "json_line", "who"]


def clock(t: float) -> str:
    """``HH:MM:SS.mmm`` local time."""
    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t % 1 * 1000):03d}"


def who(conn: Any) -> str:
    """``name@address`` of a connection (``address`` alone if it has no name)."""
    where = format_address(conn.address)
    return f"{safe(conn.name)}@{where}" if conn.name is not None else where


def json_line(obj: Dict[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(", ", ": "))


class Console:
    """Data lines go to stdout; a closed pipe (``| head``) ends the command quietly.
    Status lines go to stderr, prefixed ``socketengine:``, unless ``quiet`` (``-q``)."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.closed = False

    def line(self, text: str) -> None:
        if self.closed:
            return
        try:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()
        except BrokenPipeError:
            self.closed = True
            try:  # no further "Exception ignored" message when Python flushes at exit
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
            except (OSError, ValueError):  # pragma: no cover
                pass

    def status(self, text: str) -> None:
        """A status line on standard error (never mixed with the data on stdout)."""
        if not self.quiet:
            print(f"socketengine: {text}", file=sys.stderr, flush=True)
