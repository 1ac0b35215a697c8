"""The compiled build (socketengine/compiled.py, setup.py, build_backend/): what
``pip install .`` makes when it can, and the interpreted build when it cannot.

CI runs the whole suite against it on every declared Python (.ci/run: the ordinary
install, with ``SOCKETENGINE_EXPECT_COMPILED=1`` so that this file fails if the build
silently fell back to interpreted modules), and against the interpreted build (the
README's editable install) on the default Python.  Here: the module list, the no-op
decorator, the backend's choice (``SOCKETENGINE_COMPILE``: unset, 1, 0) and the
fallback when this machine cannot compile.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import zipfile
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
    assert compiled.build() == "compiled"


def test_build_names_what_runs() -> None:
    assert compiled.build() == ("compiled" if compiled.modules() else "interpreted")


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
    ("value", "wheel", "editable"),
    [
        # Unset or "auto": a wheel (pip install .) is compiled when it can be, so its
        # build asks for mypy; an editable install never is.
        (None, True, False),
        ("", True, False),
        ("auto", True, False),
        ("0", False, False),
        ("no", False, False),
        ("FALSE", False, False),
        ("1", True, True),
        ("true", True, True),
        ("YES", True, True),
    ],
)
def test_the_backend_asks_for_mypy_only_when_a_compiled_build_may_follow(
    monkeypatch: pytest.MonkeyPatch, value: Optional[str], wheel: bool, editable: bool
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

    cpython = platform.python_implementation() == "CPython"
    # Only a required build (the editable column) compiles on another Python.
    for is_wheel, expected in ((True, wheel and (cpython or editable)), (False, editable)):
        found = backend._requires(setuptools_hook, None, wheel=is_wheel)
        assert found == ["wheel-from-setuptools"] + (["mypy>=1.11"] if expected else [])
    assert seen == ["1", "1"]
    assert backend.LISTING not in os.environ


def test_the_backend_refuses_an_unknown_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = _backend(monkeypatch)
    monkeypatch.setenv("SOCKETENGINE_COMPILE", "maybe")
    with pytest.raises(ValueError, match="SOCKETENGINE_COMPILE='maybe': use 1"):
        backend.compile_mode()


def test_the_backend_marks_a_wheel_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """build_wheel (pip install .) tells setup.py that a wheel is being built, and only
    while it is: an auto build compiles a wheel, never an editable install."""
    backend = _backend(monkeypatch)
    seen = []

    def setuptools_build_wheel(directory: str, settings: Any, metadata: Any) -> str:
        seen.append(os.environ.get(backend.BUILDING_WHEEL))
        return "x.whl"

    monkeypatch.setattr(backend._setuptools, "build_wheel", setuptools_build_wheel)
    assert backend.build_wheel("dist") == "x.whl"
    assert seen == ["1"]
    assert backend.BUILDING_WHEEL not in os.environ


def _setup_py() -> Any:
    spec = importlib.util.spec_from_file_location("_se_setup", ROOT / "setup.py")
    assert spec is not None and spec.loader is not None
    setup_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup_py)  # not as __main__: setup() is not called
    return setup_py


def test_an_auto_wheel_without_a_compiler_is_the_interpreted_build(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_py = _setup_py()
    monkeypatch.delenv("SOCKETENGINE_COMPILE", raising=False)
    monkeypatch.setenv("_SOCKETENGINE_BUILDING_WHEEL", "1")
    monkeypatch.setenv("CC", "false")  # a compiler that fails whatever it is given
    assert setup_py.ext_modules() == []
    err = capsys.readouterr().err
    assert "socket.engine: false cannot compile against Python.h here" in err
    assert "installing the interpreted build" in err
    assert "SOCKETENGINE_COMPILE=0" in err
    monkeypatch.setenv("CC", str(ROOT / "no-such-compiler"))
    assert setup_py.ext_modules() == []
    assert "no usable C compiler" in capsys.readouterr().err
    # The fallback build_ext is used unless the compiled build is required.
    assert setup_py.cmdclass() == {"build_ext": setup_py.FallbackBuildExt}
    monkeypatch.setenv("SOCKETENGINE_COMPILE", "1")
    assert setup_py.cmdclass() == {}
    monkeypatch.setenv("SOCKETENGINE_COMPILE", "0")
    assert setup_py.ext_modules() == []
    assert capsys.readouterr().err == ""


@pytest.mark.skipif(
    importlib.util.find_spec("mypyc") is None or shutil.which("gcc") is None,
    reason="needs mypy (mypyc) and gcc: the test extra installs mypy on Python 3.10+",
)
def test_an_auto_wheel_whose_compile_fails_keeps_only_the_py_files(tmp_path: Path) -> None:
    """The compiler passes the probe (it preprocesses Python.h) but fails every compile:
    the wheel is still built, with no extension module in it (none half compiled)."""
    cc = tmp_path / "cc"
    cc.write_text(
        '#!/bin/sh\nfor a in "$@"; do [ "$a" = "-E" ] && exec gcc "$@"; done\n'
        'echo "test compiler: refusing" >&2\nexit 1\n'
    )
    cc.chmod(0o755)
    source = tmp_path / "src-tree"
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "build_backend", source / "build_backend", ignore=_NO_CACHE)
    shutil.copytree(ROOT / "src", source / "src", ignore=_NO_CACHE)
    env = {k: v for k, v in os.environ.items() if k != "SOCKETENGINE_COMPILE"}
    env["CC"] = str(cc)
    out = tmp_path / "wheels"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-v",
            "--no-build-isolation",
            "--no-deps",
            "--no-index",
            "-w",
            str(out),
            str(source),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "socket.engine: compiling failed" in done.stdout + done.stderr
    (wheel,) = out.glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    assert not [n for n in names if n.endswith((".so", ".pyd"))], names
    assert {
        f"socketengine/{m.split('.', 1)[1].replace('.', '/')}.py" for m in compiled.MODULES
    } <= set(names)


_NO_CACHE = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info")


def test_setup_py_declares_no_extension_while_requirements_are_listed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without mypyc importable, setup.py must not fail while the backend lists what it
    needs (that is how pip learns to install mypy first)."""
    monkeypatch.setenv("SOCKETENGINE_COMPILE", "1")
    monkeypatch.setenv("_SOCKETENGINE_LISTING_REQUIREMENTS", "1")
    setup_py = _setup_py()
    assert setup_py.ext_modules() == []
    monkeypatch.delenv("SOCKETENGINE_COMPILE")
    monkeypatch.delenv("_SOCKETENGINE_LISTING_REQUIREMENTS")
    assert setup_py.ext_modules() == []
    assert tuple(setup_py._compiled_modules()) == compiled.MODULES
