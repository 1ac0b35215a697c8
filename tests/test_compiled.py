"""The optional compiled build (socketengine/compiled.py, setup.py, build_backend/).

The whole suite runs against it in CI (.ci/run: ``SOCKETENGINE_COMPILE=1 pip install``,
with ``SOCKETENGINE_EXPECT_COMPILED=1`` so that this file fails if the build silently
fell back to interpreted modules).  Here: the module list, the no-op decorator, and the
backend asking for mypy only when the compiled build is requested.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, List, Optional, Tuple

import pytest

from socketengine import compiled

ROOT = Path(__file__).resolve().parents[1]


def test_every_listed_module_exists_in_the_source_tree() -> None:
    for name in compiled.MODULES:
        path = ROOT / "src" / Path(*name.split(".")).with_suffix(".py")
        assert path.is_file(), name
        importlib.import_module(name)


def test_the_list_has_no_duplicates_and_only_sans_io_or_threaded_modules() -> None:
    assert len(set(compiled.MODULES)) == len(compiled.MODULES)
    # The asyncio layer and the public Client/Host classes stay interpreted: users
    # subclass them, and the seed's camelCase aliases are mixins.
    for name in compiled.MODULES:
        assert not name.startswith("socketengine.aio"), name
        assert name not in ("socketengine.sync.client", "socketengine.sync.host"), name


def test_modules_reports_what_this_install_runs() -> None:
    done = compiled.modules()
    assert set(done) <= set(compiled.MODULES)
    for name in compiled.MODULES:
        file = getattr(sys.modules[name], "__file__", "") or ""
        assert (name in done) == (not file.endswith(".py")), (name, file)


#: Module-level names the tests change at run time (``monkeypatch.setattr``): a compiled
#: function reads a ``Final`` name as a C constant and would never see the change.
_TUNABLE = {
    ("socketengine.sync.connection", "_SELF_READ_SLICE"),
    ("socketengine.sync.loop", "poller"),
}
#: Annotations that make a type alias or a type variable, not a value.
_ALIAS_CALLS = {"TypeVar"}


def _module_constants(name: str) -> List[Tuple[str, bool, int]]:
    """``(name, annotated Final, line)`` of every name a module binds once, at module
    level, to a value (not a type alias, not ``__all__``)."""
    path = ROOT / "src" / Path(*name.split(".")).with_suffix(".py")
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: List[Tuple[str, bool, int]] = []
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            ann = ast.unparse(node.annotation)
            if node.value is None or ann.startswith("TypeAlias"):
                continue
            out.append((node.target.id, ann.startswith("Final"), node.lineno))
        elif isinstance(node, ast.Assign):
            value = node.value
            if isinstance(value, ast.Subscript):  # Union[...], Tuple[...]: type aliases
                continue
            if isinstance(value, ast.Call) and ast.unparse(value.func) in _ALIAS_CALLS:
                continue
            for target in node.targets:
                if isinstance(target, ast.Name) and target.id != "__all__":
                    out.append((target.id, False, node.lineno))
    return out


@pytest.mark.parametrize("name", compiled.MODULES)
def test_module_constants_of_compiled_modules_are_final(name: str) -> None:
    # mypyc reads a module-level name that is not Final from the module's dict at each
    # use (a hash lookup); a Final one is a C constant or static.  Declaring every
    # constant Final measured +17 % small-message throughput (docs/benchmarks.md, "The
    # compiled build"); this keeps a new constant from quietly costing a lookup again.
    missing = [
        f"{name}:{line} {const}"
        for const, final, line in _module_constants(name)
        if not final and (name, const) not in _TUNABLE
    ]
    assert not missing, "annotate these module constants Final: " + ", ".join(missing)


@pytest.mark.skipif(
    not os.environ.get("SOCKETENGINE_EXPECT_COMPILED"),
    reason="set SOCKETENGINE_EXPECT_COMPILED=1 where the compiled build is installed",
)
def test_the_compiled_build_is_in_use() -> None:
    assert compiled.modules() == compiled.MODULES


def test_mypyc_attr_changes_nothing_when_interpreted() -> None:
    if compiled.modules():
        pytest.skip("the compiled build is installed")

    class Plain:
        pass

    assert compiled.mypyc_attr(native_class=False)(Plain) is Plain


def _backend(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.syspath_prepend(str(ROOT / "build_backend"))
    return importlib.import_module("socketengine_build")


@pytest.mark.parametrize(
    ("value", "mypy"),
    [
        (None, False),
        ("", False),
        ("0", False),
        ("no", False),
        ("1", True),
        ("true", True),
        ("YES", True),
    ],
)
def test_the_backend_asks_for_mypy_only_for_the_compiled_build(
    monkeypatch: pytest.MonkeyPatch, value: Optional[str], mypy: bool
) -> None:
    backend = _backend(monkeypatch)
    if value is None:
        monkeypatch.delenv("SOCKETENGINE_COMPILE", raising=False)
    else:
        monkeypatch.setenv("SOCKETENGINE_COMPILE", value)
    seen = []

    def setuptools_hook(config_settings: Any) -> List[str]:
        # setup.py runs inside this hook: it must see that requirements are being
        # listed (mypy is not installed yet), and so declare no extension modules.
        seen.append(os.environ.get(backend.LISTING))
        return ["wheel-from-setuptools"]

    found = backend._requires(setuptools_hook, None)
    assert seen == ["1"]
    assert backend.LISTING not in os.environ
    assert found == ["wheel-from-setuptools"] + (["mypy>=1.11"] if mypy else [])


def test_setup_py_declares_no_extension_while_requirements_are_listed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without mypyc importable, setup.py must not fail while the backend lists what it
    needs (that is how pip learns to install mypy first)."""
    monkeypatch.setenv("SOCKETENGINE_COMPILE", "1")
    monkeypatch.setenv("_SOCKETENGINE_LISTING_REQUIREMENTS", "1")
    spec = importlib.util.spec_from_file_location("_se_setup", ROOT / "setup.py")
    assert spec is not None and spec.loader is not None
    setup_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup_py)  # not as __main__: setup() is not called
    assert setup_py.ext_modules() == []
    monkeypatch.delenv("SOCKETENGINE_COMPILE")
    monkeypatch.delenv("_SOCKETENGINE_LISTING_REQUIREMENTS")
    assert setup_py.ext_modules() == []
    assert tuple(setup_py._compiled_modules()) == compiled.MODULES
