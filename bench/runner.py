"""Run the suite (``python -m bench``) in a child process behind a progress bar.

``socketengine bench`` loads this file from the clone and calls :func:`run`; it
imports nothing from ``bench`` itself (the command loads it by path) and nothing from
outside the standard library.  The suite reports each trial on standard error as
``[ STEP/TOTAL] WORKLOAD run R/N LIB ...``; those lines become a bar (redrawn in place
on a terminal, one line a step otherwise), and everything else passes through.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

_PROGRESS = re.compile(r"^\[\s*(\d+)/(\d+)\]\s*(.*)$")
#: Suite lines shown only with ``-v`` (the bar says the same).
_CHATTER = ("== ", "bench: quick", "bench: full")


class Progress:
    """A progress bar on standard error."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.drawn = False

    def step(self, done: int, total: int, text: str, width: int = 24) -> None:
        filled = int(width * done / total) if total else width
        bar = "#" * filled + "-" * (width - filled)
        line = f"[{bar}] {done:>{len(str(total))}}/{total}  {text}"
        if self.tty:
            columns = shutil.get_terminal_size((100, 20)).columns
            sys.stderr.write("\r" + line[: columns - 1] + "\x1b[K")
            self.drawn = True
            if done >= total:  # the suite prints its table next, on stdout
                self.finish()
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def message(self, text: str) -> None:
        self.finish()
        sys.stderr.write(text if text.endswith("\n") else text + "\n")
        sys.stderr.flush()

    def finish(self) -> None:
        if self.drawn:
            sys.stderr.write("\n")
            self.drawn = False


def run(root: Path, suite_args: List[str], verbose: bool = False) -> Optional[int]:
    """Run ``python -m bench SUITE_ARGS`` in ``root``; return its exit status, or None
    if interrupted (Ctrl-C stops the suite and its children)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(root), env.get("PYTHONPATH")) if x)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench", *suite_args],
        cwd=root,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
    )
    progress = Progress()
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            m = _PROGRESS.match(line.rstrip("\n"))
            if m:
                progress.step(int(m.group(1)), int(m.group(2)), " ".join(m.group(3).split()))
            elif verbose or not line.startswith(_CHATTER):
                progress.message(line)
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            proc.kill()
            proc.wait()
        return None
    finally:
        progress.finish()
