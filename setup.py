"""Packaging is declared in pyproject.toml; this file adds only the compiled build: the
modules listed in src/socketengine/compiled.py, compiled by mypyc when the backend in
build_backend/ says a compiled build may be made (``SOCKETENGINE_COMPILE``: see its
docstring).  Unset, a wheel is compiled when this machine can, and is the interpreted
build when it cannot; ``1`` requires the compiled build; ``0`` never builds it."""

from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
import sys
import sysconfig
from typing import Any, List, Optional

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
# The backend's own rules for "which build was asked for" and "are requirements being
# listed" (pip puts build_backend/ on the path; a test importing this file may not).
sys.path.insert(0, os.path.join(HERE, "build_backend"))
from socketengine_build import (  # noqa: E402
    BUILDING_WHEEL,
    LISTING,
    ON,
    compile_mode,
    may_compile,
)


def _compiled_modules() -> Any:
    """src/socketengine/compiled.py, loaded on its own (the package's other imports
    need its dependencies, which a build environment does not have)."""
    path = os.path.join(HERE, "src", "socketengine", "compiled.py")
    spec = importlib.util.spec_from_file_location("_socketengine_compiled", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MODULES


def fall_back(why: str) -> None:
    """Says, in the build's output, that this install is the interpreted build."""
    sys.stderr.write(
        f"socket.engine: {why}\nsocket.engine: installing the interpreted build (the same "
        "behaviour, fewer messages per second). For the compiled one, install a C compiler "
        "and the Python headers (e.g. gcc and python3-dev); to skip trying, set "
        "SOCKETENGINE_COMPILE=0.\n"
    )


def cannot_compile() -> Optional[str]:
    """Why this machine cannot compile an extension (no C compiler, no ``Python.h``),
    or None.  Where the compiler is not known (Windows) it is not probed: a failing
    compile falls back (:class:`FallbackBuildExt`), only later."""
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC")
    if not cc:
        return None
    include = sysconfig.get_paths()["include"]
    command = [*shlex.split(cc), "-E", "-I", include, "-x", "c", "-"]
    try:
        done = subprocess.run(
            command,
            input=b"#include <Python.h>\n",
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=120,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"no usable C compiler ({cc}: {exc})"
    if done.returncode != 0:
        detail = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        return f"{cc} cannot compile against Python.h here ({detail[0]})"
    return None


class FallbackBuildExt(build_ext):
    """``build_ext`` for a wheel that may be the interpreted build: if compiling fails,
    every compiled module already built is removed (none is left half compiled: they
    import one shared library) and the wheel keeps the ``.py`` files only."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # CompileError, LinkError, OSError, ...
            for path in self.get_outputs():
                if os.path.exists(path):
                    os.remove(path)
            fall_back(f"compiling failed: {exc}")


def _mypycify() -> List[Any]:
    from mypyc.build import mypycify

    paths = [os.path.join("src", *name.split(".")) + ".py" for name in _compiled_modules()]
    version = "{}.{}".format(*sys.version_info[:2])
    # The running Python's version, not the type-check config's: the extension is built
    # for this interpreter.
    # Only the compiled modules must type-check here: the build environment lacks the
    # optional dependencies (numpy, nats-py) that the rest of the package imports.
    flags = ["--python-version", version, "--follow-imports=silent", "--no-warn-unused-ignores"]
    return list(mypycify([*flags, *paths], opt_level="3"))


def ext_modules() -> List[Any]:
    if os.environ.get(LISTING):
        return []  # the backend is listing build requirements: mypy comes after this
    if compile_mode() == ON:
        return _mypycify()  # required: any failure fails the install
    if not (os.environ.get(BUILDING_WHEEL) and may_compile(wheel=True)):
        return []  # never, or an editable install / an sdist / another Python
    problem = cannot_compile()
    if problem is not None:
        fall_back(problem)
        return []
    try:
        return _mypycify()
    except (Exception, SystemExit) as exc:  # mypy missing, or refusing this Python
        fall_back(f"mypyc could not compile it ({type(exc).__name__}: {exc})")
        return []


def cmdclass() -> Any:
    """The fallback ``build_ext`` unless the compiled build is required."""
    return {} if compile_mode() == ON else {"build_ext": FallbackBuildExt}


if __name__ == "__main__":  # as setuptools runs it; tests import this file
    setup(ext_modules=ext_modules(), cmdclass=cmdclass())
