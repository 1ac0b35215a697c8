"""The build backend: setuptools', plus mypy as a build requirement when the compiled
build is asked for (``SOCKETENGINE_COMPILE=1``; see src/socketengine/compiled.py).

setuptools' documented way to make a build requirement depend on the environment:
every hook is setuptools' own, and the two that list requirements add mypy (which
brings mypyc) only then, so an ordinary install downloads nothing more.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403 - every other hook unchanged

#: mypyc as the compiled build needs it (``mypy_extensions.mypyc_attr``, Python 3.9+).
MYPYC_REQUIREMENT = "mypy>=1.11"


def compile_requested() -> bool:
    """``SOCKETENGINE_COMPILE`` is set to 1 / true / yes."""
    return os.environ.get("SOCKETENGINE_COMPILE", "").strip().lower() in ("1", "true", "yes")


#: Set while setuptools runs setup.py only to list requirements: mypy is not installed
#: yet then, so setup.py declares no extension modules (it does when building).
LISTING = "_SOCKETENGINE_LISTING_REQUIREMENTS"


def _requires(hook: Any, config_settings: Optional[Dict[str, Any]]) -> List[str]:
    os.environ[LISTING] = "1"
    try:
        found = list(hook(config_settings))
    finally:
        del os.environ[LISTING]
    return found + ([MYPYC_REQUIREMENT] if compile_requested() else [])


def get_requires_for_build_wheel(
    config_settings: Optional[Dict[str, Any]] = None,
) -> List[str]:
    return _requires(_setuptools.get_requires_for_build_wheel, config_settings)


def get_requires_for_build_editable(
    config_settings: Optional[Dict[str, Any]] = None,
) -> List[str]:
    return _requires(_setuptools.get_requires_for_build_editable, config_settings)
