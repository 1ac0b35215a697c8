"""The ``socketengine`` command line (also ``python -m socketengine``).

Commands: ``demo``, ``host``, ``send``, ``watch``, ``request``, ``bench`` and
``monitor``; ``socketengine COMMAND --help`` describes each.  Exit status: 0 on
success, 1 on an error (refused connection, wrong token, timeout, error reply...), 2 on
a usage error (bad option, bad JSON value), 130 when interrupted; errors are one line
on standard error, never a traceback (``-vv`` shows one).

The package, one idea a module: :mod:`.parser` (the options and :func:`main`),
:mod:`.commands`, :mod:`.options` (shared options, TLS contexts), :mod:`.inputs` (the
value to send), :mod:`.output` (stdout data, stderr status), :mod:`.interrupt`
(Ctrl-C, SIGTERM, ``--duration``) and :mod:`.exits` (exit statuses).
"""

from __future__ import annotations

from ..render import describe, jsonable
from .exits import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    CommandError,
    UsageError,
)
from .parser import build_parser, main

__all__ = [
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "CommandError",
    "UsageError",
    "build_parser",
    "describe",
    "jsonable",
    "main",
]
