"""The compiled build: the same source, compiled to C extensions by mypyc.

``pip install .`` (from source, not editable) compiles the modules named in
:data:`MODULES` -- the sans-I/O core (framing, the connection engine, the send queue,
requests, sessions, fan-out runs) and the threaded layer's connection, loop, delivery
objects and client ``write`` -- with mypyc, when the machine has a C compiler and the
Python headers; without them it installs them interpreted.  ``SOCKETENGINE_COMPILE=1``
requires the compiled build (the install fails if it cannot compile), ``0`` never
builds it; an editable install is interpreted unless the variable is 1.  Nothing else
changes: the compiled modules are built from these very files, so every protocol rule
is still written once, and an interpreted install runs the same code.  What it gains
is measured in docs/benchmarks.md ("The compiled build").

:func:`modules` says which of them this process runs compiled, :func:`build` names the
build (``socketengine --version`` prints it).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Callable, Tuple, TypeVar

__all__ = ["MODULES", "build", "modules", "mypyc_attr"]

#: The modules the compiled build compiles (paths under ``src/``, in ``setup.py``).
MODULES: Tuple[str, ...] = (
    "socketengine.codec",
    "socketengine.engine",
    "socketengine.fanout",
    "socketengine.frames",
    "socketengine.peer",
    "socketengine.protocol",
    "socketengine.requests",
    "socketengine.sendqueue",
    "socketengine.session",
    "socketengine.sync.connection",
    "socketengine.sync.delivery",
    "socketengine.sync.loop",
    "socketengine.sync.writer",
)

_C = TypeVar("_C")

if TYPE_CHECKING:
    from mypy_extensions import mypyc_attr as mypyc_attr
else:

    def mypyc_attr(*args: Any, **kwargs: Any) -> Callable[[_C], _C]:
        """mypyc's class options (``mypy_extensions.mypyc_attr``), which mypyc reads
        at compile time; interpreted, they change nothing."""

        def keep(cls: _C) -> _C:
            return cls

        return keep


def modules() -> Tuple[str, ...]:
    """The modules of :data:`MODULES` this process runs compiled (empty for an
    interpreted install), e.g. ``("socketengine.codec", ...)``."""
    done = []
    for name in MODULES:
        module = importlib.import_module(name)
        path = getattr(module, "__file__", None) or ""
        if not path.endswith(".py"):
            done.append(name)
    return tuple(done)


def build() -> str:
    """``"compiled"`` when every module of :data:`MODULES` runs compiled,
    ``"interpreted"`` when none does (``socketengine --version`` says which)."""
    done = modules()
    if done == MODULES:
        return "compiled"
    return "interpreted" if not done else f"partly compiled ({len(done)}/{len(MODULES)})"
