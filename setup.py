"""Packaging is declared in pyproject.toml; this file adds only the optional compiled
build: with ``SOCKETENGINE_COMPILE=1`` the modules listed in
src/socketengine/compiled.py are compiled by mypyc (the backend in build_backend/
then asks for mypy).  Without it, no extension module is built."""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any, List

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
# The backend's own rules for "was the compiled build asked for" and "are requirements
# being listed" (pip puts build_backend/ on the path; a test importing this file may not).
sys.path.insert(0, os.path.join(HERE, "build_backend"))
from socketengine_build import LISTING, compile_requested  # noqa: E402


def _compiled_modules() -> Any:
    """src/socketengine/compiled.py, loaded on its own (the package's other imports
    need its dependencies, which a build environment does not have)."""
    path = os.path.join(HERE, "src", "socketengine", "compiled.py")
    spec = importlib.util.spec_from_file_location("_socketengine_compiled", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MODULES


def ext_modules() -> List[Any]:
    if not compile_requested():
        return []
    if os.environ.get(LISTING):
        return []  # the backend is listing build requirements: mypy comes after this
    from mypyc.build import mypycify

    paths = [os.path.join("src", *name.split(".")) + ".py" for name in _compiled_modules()]
    version = "{}.{}".format(*sys.version_info[:2])
    # The running Python's version, not the type-check config's: the extension is built
    # for this interpreter.
    # Only the compiled modules must type-check here: the build environment lacks the
    # optional dependencies (numpy, nats-py) that the rest of the package imports.
    flags = ["--python-version", version, "--follow-imports=silent", "--no-warn-unused-ignores"]
    return list(mypycify([*flags, *paths], opt_level="3"))


if __name__ == "__main__":  # as setuptools runs it; tests import this file
    setup(ext_modules=ext_modules())
