"""The build backend: setuptools', plus mypy as a build requirement when the compiled
build may be made (see src/socketengine/compiled.py and setup.py).

``SOCKETENGINE_COMPILE`` chooses:

- unset (or ``auto``): a wheel -- what ``pip install .`` builds -- is compiled on
  CPython when it can be, and is the interpreted build when it cannot (no C compiler or
  Python headers, mypyc refusing this Python): same behaviour, slower.  An editable
  install (``pip install -e``) and an sdist are never compiled: a compiled module would
  shadow edits to its ``.py`` file.
- ``1`` / ``true`` / ``yes``: compiled, editable installs too; a build that cannot
  compile fails instead of quietly installing the interpreted one.
- ``0`` / ``false`` / ``no``: never compiled, and mypy is not downloaded.

setuptools' documented way to make a build requirement depend on the environment:
every hook is setuptools' own, and the ones that list requirements add mypy (which
brings mypyc) only when a compiled build may follow.
"""

from __future__ import annotations

import os
import platform
from typing import Any, Dict, List, Optional

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403 - every other hook unchanged

#: mypyc as the compiled build needs it (``mypy_extensions.mypyc_attr``, Python 3.9+).
MYPYC_REQUIREMENT = "mypy>=1.11"

#: The environment variable that chooses the build (see the module docstring).
VARIABLE = "SOCKETENGINE_COMPILE"
ON, OFF, AUTO = "on", "off", "auto"

#: Set while setuptools runs setup.py only to list requirements: mypy is not installed
#: yet then, so setup.py declares no extension modules (it does when building).
LISTING = "_SOCKETENGINE_LISTING_REQUIREMENTS"
#: Set while a wheel is built (not an editable install, not an sdist): in ``auto``
#: mode only a wheel is compiled.
BUILDING_WHEEL = "_SOCKETENGINE_BUILDING_WHEEL"


def compile_mode() -> str:
    """``SOCKETENGINE_COMPILE`` as :data:`ON`, :data:`OFF` or :data:`AUTO`; raises
    ``ValueError`` naming the accepted values for anything else."""
    value = os.environ.get(VARIABLE, "").strip().lower()
    if value in ("1", "true", "yes"):
        return ON
    if value in ("0", "false", "no"):
        return OFF
    if value in ("", AUTO):
        return AUTO
    raise ValueError(
        f"{VARIABLE}={os.environ[VARIABLE]!r}: use 1 (compile, or fail), 0 (never "
        "compile) or leave it unset (compile a wheel when this machine can)"
    )


def may_compile(wheel: bool) -> bool:
    """A build of this kind (a wheel, or else an editable install or sdist) may be
    compiled here, so mypy is among its build requirements."""
    mode = compile_mode()
    if mode == AUTO:
        return wheel and platform.python_implementation() == "CPython"
    return mode == ON


def _requires(hook: Any, config_settings: Optional[Dict[str, Any]], wheel: bool) -> List[str]:
    os.environ[LISTING] = "1"
    try:
        found = list(hook(config_settings))
    finally:
        del os.environ[LISTING]
    return found + ([MYPYC_REQUIREMENT] if may_compile(wheel) else [])


def get_requires_for_build_wheel(
    config_settings: Optional[Dict[str, Any]] = None,
) -> List[str]:
    return _requires(_setuptools.get_requires_for_build_wheel, config_settings, wheel=True)


def get_requires_for_build_editable(
    config_settings: Optional[Dict[str, Any]] = None,
) -> List[str]:
    return _requires(_setuptools.get_requires_for_build_editable, config_settings, wheel=False)


def build_wheel(
    wheel_directory: str,
    config_settings: Optional[Dict[str, Any]] = None,
    metadata_directory: Optional[str] = None,
) -> str:
    os.environ[BUILDING_WHEEL] = "1"
    try:
        return str(_setuptools.build_wheel(wheel_directory, config_settings, metadata_directory))
    finally:
        del os.environ[BUILDING_WHEEL]
