"""A user's view of the types: ``mypy --strict`` over scripts that use the public API.

``tests/typing/user_script.py`` (both layers, seed and PEP 8 names, decorators, wait,
request, subscribe, context managers) must pass ``mypy --strict`` untouched;
``tests/typing/bad_script.py`` marks each line that must draw an error with a comment
``E:`` followed by part of the message, and no other line may draw one.

mypy runs as a user's would: from a directory without a mypy configuration, on the
installed package (``pip install -e .`` counts), which must ship ``py.typed``.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

import socketengine

TYPING = Path(__file__).resolve().parent / "typing"
USER_SCRIPT = TYPING / "user_script.py"
BAD_SCRIPT = TYPING / "bad_script.py"
ERROR = re.compile(r"^(?P<path>.+?):(?P<line>\d+): error: (?P<message>.*)$")
MARK = re.compile(r"\S.*  # E: (?P<text>.+?)\s*$")


#: The type checks need mypy 2 (as ``tests/test_quality.py``), which needs Python 3.10;
#: the older mypy that installs on 3.9 reads these scripts differently.
needs_mypy_2 = pytest.mark.skipif(
    sys.version_info < (3, 10), reason="mypy 2 needs Python >= 3.10; checked on the other versions"
)


@pytest.fixture(scope="module")
def mypy_errors(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, List[Tuple[int, str]]]:
    """One ``mypy --strict`` run over both scripts: errors per file name, as
    ``(line, message)``."""
    cwd = tmp_path_factory.mktemp("mypy")  # no config file here: mypy's defaults
    command = [
        sys.executable,
        "-m",
        "mypy",
        "--strict",
        "--cache-dir",
        str(cwd / "cache"),
        "--no-error-summary",
        str(USER_SCRIPT),
        str(BAD_SCRIPT),
    ]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode in (0, 1), result.stdout + result.stderr  # 2: mypy crashed
    errors: Dict[str, List[Tuple[int, str]]] = {}
    for line in result.stdout.splitlines():
        match = ERROR.match(line)
        if match:
            name = Path(match["path"]).name
            errors.setdefault(name, []).append((int(match["line"]), match["message"]))
    unexpected = set(errors) - {USER_SCRIPT.name, BAD_SCRIPT.name}
    assert not unexpected, result.stdout  # e.g. socketengine itself not found
    return errors


def test_package_ships_py_typed() -> None:
    assert (Path(socketengine.__file__).parent / "py.typed").is_file()
    pyproject = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert re.search(r'socketengine = \[[^\]]*"py\.typed"', pyproject)


@needs_mypy_2
@pytest.mark.timeout(320)
def test_user_script_passes_mypy_strict(mypy_errors: Dict[str, List[Tuple[int, str]]]) -> None:
    errors = mypy_errors.get(USER_SCRIPT.name, [])
    assert errors == [], "\n".join(f"{USER_SCRIPT.name}:{n}: {m}" for n, m in errors)


@needs_mypy_2
@pytest.mark.timeout(320)
def test_bad_script_draws_each_expected_error(
    mypy_errors: Dict[str, List[Tuple[int, str]]],
) -> None:
    expected: Dict[int, str] = {}
    for number, text in enumerate(BAD_SCRIPT.read_text().splitlines(), start=1):
        mark = MARK.search(text)
        if mark:
            expected[number] = mark["text"]
    assert len(expected) >= 15  # the markers themselves were found
    found = mypy_errors.get(BAD_SCRIPT.name, [])
    report = "\n".join(f"{BAD_SCRIPT.name}:{n}: {m}" for n, m in found)
    for number, text in expected.items():
        messages = [m for n, m in found if n == number]
        assert any(text in m for m in messages), f"line {number}: no {text!r} in\n{report}"
    stray = [(n, m) for n, m in found if n not in expected]
    assert stray == [], report
