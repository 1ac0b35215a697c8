"""``python -m socketengine``: the command line (see :mod:`socketengine.cli`).

``socketengine --help`` lists the commands: ``demo``, ``host``, ``send``, ``watch``,
``request``, ``bench`` and ``monitor``.
"""

from __future__ import annotations

import sys

from .cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
