"""Every ```python block in README.md and docs/*.md runs, as written, in the test suite.

Each block runs in its own subprocess, in a fresh temporary directory, and must exit 0
within a time limit. A line ``print(...)  # -> TEXT`` claims that the program prints
``TEXT``: stdout must contain that line (the claims in source order). An HTML comment on
the line right before a fence tells the harness more about the block::

    <!-- example: name=seed-host forever expect="client is connected!" repeat=50 -->

``name=NAME``      names the block, for the keys below
``peer=NAME``      runs block NAME at the same time, in its own process (a host for a
                   client, say); both must succeed
``setup=NAME``     runs block NAME first, in the same directory (a ```sh block that makes
                   a certificate, say)
``after=NAME``     the block continues block NAME: NAME's code runs first, in the same
                   process (for a snippet that uses the ``h`` and ``c`` made there)
``forever``        the block never ends by design (the seed's loop): it is stopped once
                   its expectations are met, and it must not have ended by itself
``expect="TEXT"``  stdout must contain a line equal to TEXT (``repeat=N``: N times)
``skip="REASON"``  the block is not run (the reason is required)

Blocks fenced as anything but ``python`` (``text``, ``sh``, ``console``) are not run,
except a ``sh`` block with an ``example:`` comment (run with bash, e.g. as a ``setup``).

The examples use the seed's default port 8080 and tests must never bind a fixed port, so
each block runs under a small bootstrap that changes 8080 (and the monitor's 8000) to a
free port: a host binds port 0 and publishes the port it got in a file, and a client
(in the same process or its peer) connects to that port.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
TIMEOUT = 40.0  # seconds one example (with its peers) may take

FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w+-]*)\s*$")
ANNOTATION = re.compile(r"^\s*<!--\s*example:(?P<body>.*?)-->\s*$")
CLAIM = re.compile(r"^\s*print\(.*\)\s*#\s*->\s*(?P<text>.*?)\s*$")


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    options: Dict[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        name = self.options.get("name")
        where = f"{self.path.relative_to(ROOT)}:{self.line}"
        return f"{where}[{name}]" if name else where

    @property
    def runs(self) -> bool:
        if "skip" in self.options:
            return False
        return self.lang == "python"


def _parse_options(body: str, where: str) -> Dict[str, str]:
    options: Dict[str, str] = {}
    for word in shlex.split(body):
        key, _, value = word.partition("=")
        if key not in {"name", "peer", "setup", "after", "forever", "expect", "repeat", "skip"}:
            raise ValueError(f"{where}: unknown example option {key!r}")
        if key == "expect" and "expect" in options:
            value = options["expect"] + "\n" + value
        options[key] = value
    if "skip" in options and not options["skip"]:
        raise ValueError(f"{where}: skip= needs a reason")
    return options


def parse(path: Path) -> List[Block]:
    """The fenced code blocks of one Markdown file, with their annotations."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: List[Block] = []
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, lang = len(match["indent"]), match["lang"]
        start = i
        body: List[str] = []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][indent:])
            i += 1
        if i == len(lines):
            raise ValueError(f"{path}:{start + 1}: unclosed code fence")
        options: Dict[str, str] = {}
        if start > 0:
            note = ANNOTATION.match(lines[start - 1])
            if note:
                options = _parse_options(note["body"], f"{path}:{start}")
        blocks.append(Block(path, start + 1, lang, "\n".join(body) + "\n", options))
        i += 1
    return blocks


ALL_BLOCKS = [block for path in DOC_FILES for block in parse(path)]
BY_NAME = {b.options["name"]: b for b in ALL_BLOCKS if "name" in b.options}
RUNNABLE = [b for b in ALL_BLOCKS if b.runs]


BOOTSTRAP = textwrap.dedent(
    '''
    """Runs one documentation example with the default port 8080 redirected."""
    import functools
    import inspect
    import os
    import runpy
    import sys
    import time

    import socketengine
    from socketengine import aio

    SEED_PORT, SEED_MONITOR = 8080, 8000
    PORT_FILE = os.environ["DOCS_PORT_FILE"]
    published = []


    def host_port():
        """The port the example's host got (from this process, or from the peer's file)."""
        if published:
            return published[0]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with open(PORT_FILE) as f:
                    text = f.read()
            except FileNotFoundError:
                text = ""
            if text.endswith("\\n"):
                return int(text)
            time.sleep(0.005)
        raise RuntimeError("the example's host never published its port")


    def publish(port):
        if not published:
            published.append(port)
            with open(PORT_FILE + ".tmp", "w") as f:
                f.write(f"{port}\\n")
            os.replace(PORT_FILE + ".tmp", PORT_FILE)


    def redirect(cls, is_host):
        init = cls.__init__
        signature = inspect.signature(init)

        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            if bound.arguments.get("port") == SEED_PORT:
                bound.arguments["port"] = 0 if is_host else host_port()
                self._docs_publish = is_host
            if bound.arguments.get("monitor") == SEED_MONITOR:
                bound.arguments["monitor"] = 0
            init(*bound.args, **bound.kwargs)

        cls.__init__ = __init__


    redirect(socketengine.Host, True)
    redirect(socketengine.Client, False)
    redirect(aio.Host, True)
    redirect(aio.Client, False)

    _open = socketengine.Host.open


    def _open_and_publish(self, *args, **kwargs):
        result = _open(self, *args, **kwargs)
        if getattr(self, "_docs_publish", False):
            publish(self.port)
        return result


    socketengine.Host.open = _open_and_publish
    _start = aio.Host.start


    async def _start_and_publish(self, *args, **kwargs):
        result = await _start(self, *args, **kwargs)
        if getattr(self, "_docs_publish", False):
            publish(self.port)
        return result


    aio.Host.start = _start_and_publish
    sys.argv = [sys.argv[1]]
    runpy.run_path(sys.argv[0], run_name="__main__")
    '''
)


class Run:
    """One example process, its output collected by a thread."""

    def __init__(self, block: Block, workdir: Path, env: Dict[str, str]) -> None:
        self.block = block
        self.lines: List[str] = []
        self._lock = threading.Lock()
        if block.lang == "python":
            code = block.code
            if "after" in block.options:
                code = _block(block.options["after"]).code + "\n" + code
            script = workdir / f"example_{block.line}.py"
            script.write_text(code, encoding="utf-8")
            argv = [sys.executable, str(workdir / "_docs_bootstrap.py"), str(script)]
        else:
            script = workdir / f"example_{block.line}.sh"
            script.write_text("set -euo pipefail\n" + block.code, encoding="utf-8")
            argv = ["bash", str(script)]
        self.proc = subprocess.Popen(
            argv,
            cwd=workdir,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.stderr = ""
        self._out = threading.Thread(target=self._read_stdout, daemon=True)
        self._out.start()
        self._err = threading.Thread(target=self._read_stderr, daemon=True)
        self._err.start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self.lines.append(line.rstrip("\n"))

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        self.stderr = self.proc.stderr.read()

    def output(self) -> List[str]:
        with self._lock:
            return list(self.lines)

    def finish(self, deadline: float) -> int:
        try:
            code = self.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(
                f"{self.block.id} did not finish within {TIMEOUT} s\n{self.report()}"
            ) from None
        self._out.join(5)
        self._err.join(5)
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._out.join(5)
        self._err.join(5)

    def report(self) -> str:
        out = "\n".join(self.output()[-40:])
        return f"--- stdout of {self.block.id}:\n{out}\n--- stderr:\n{self.stderr[-4000:]}"


def _block(name: str) -> Block:
    if name not in BY_NAME:
        raise AssertionError(f"no example block is named {name!r}")
    return BY_NAME[name]


def _expectations(block: Block) -> List[str]:
    claims = [m["text"] for m in map(CLAIM.match, block.code.splitlines()) if m]
    expect = block.options.get("expect")
    return claims + (expect.split("\n") if expect else [])


def _in_order(wanted: List[str], lines: List[str]) -> bool:
    position = 0
    for text in wanted:
        try:
            position = lines.index(text, position) + 1
        except ValueError:
            return False
    return True


def _met(block: Block, lines: List[str]) -> bool:
    """Whether ``lines`` holds every ``# ->`` claim in source order, and every ``expect``
    line in its order (``repeat``: each that many times)."""
    claims = [m["text"] for m in map(CLAIM.match, block.code.splitlines()) if m]
    expect = block.options.get("expect")
    repeat = int(block.options.get("repeat", "1"))
    expected = [t for t in (expect.split("\n") if expect else []) for _ in range(repeat)]
    return _in_order(claims, lines) and _in_order(expected, lines)


def _check(run: Run) -> None:
    block = run.block
    lines = run.output()
    assert _met(block, lines), (
        f"{block.id} did not print what it claims: {_expectations(block)}\n{run.report()}"
    )


@pytest.mark.timeout(90)
@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_example_runs(block: Block, tmp_path: Path) -> None:
    (tmp_path / "_docs_bootstrap.py").write_text(BOOTSTRAP, encoding="utf-8")
    env = dict(os.environ, DOCS_PORT_FILE=str(tmp_path / "port"), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
    deadline = time.monotonic() + TIMEOUT
    if "setup" in block.options:
        setup = Run(_block(block.options["setup"]), tmp_path, env)
        assert setup.finish(deadline) == 0, f"setup failed\n{setup.report()}"
    runs = []
    try:
        if "peer" in block.options:
            runs.append(Run(_block(block.options["peer"]), tmp_path, env))
        runs.append(Run(block, tmp_path, env))
        for run in runs:
            if "forever" in run.block.options:
                while not _met(run.block, run.output()):
                    assert run.proc.poll() is None, (
                        f"{run.block.id} runs forever by design, but it ended\n{run.report()}"
                    )
                    assert time.monotonic() < deadline, (
                        f"{run.block.id} did not print what it claims within {TIMEOUT} s: "
                        f"{_expectations(run.block)}\n{run.report()}"
                    )
                    time.sleep(0.01)
                assert run.proc.poll() is None, f"{run.block.id} ended\n{run.report()}"
                run.stop()
            else:
                code = run.finish(deadline)
                assert code == 0, f"{run.block.id} exited with {code}\n{run.report()}"
            _check(run)
    finally:
        for run in runs:
            run.stop()


def test_every_python_block_is_run_or_marked() -> None:
    """No ```python block escapes the harness: each runs, or says why it does not."""
    python = [b for b in ALL_BLOCKS if b.lang == "python"]
    assert len(python) >= 15, "the parser found too few examples"
    for block in python:
        assert block.runs or block.options.get("skip"), block.id
    for block in ALL_BLOCKS:
        for key in ("peer", "setup", "after"):
            if key in block.options:
                _block(block.options[key])  # every reference names a block
        if block.lang not in {"python", "sh"}:
            assert not block.options, f"{block.id}: only python and sh blocks can be run"


def test_the_harness_checks_claims() -> None:
    """The claim checker itself: a wrong claim or a missing line is caught."""
    block = Block(ROOT / "README.md", 1, "python", "print(1)  # -> 1\nprint(2)  # -> 2\n")
    assert _met(block, ["1", "2"])
    assert not _met(block, ["2", "1"])  # in order
    assert not _met(block, ["1"])
    block.options = {"expect": "x", "repeat": "3"}
    assert not _met(block, ["1", "2", "x", "x"])
    assert _met(block, ["x", "1", "x", "2", "x"])


@pytest.mark.skipif(
    sys.version_info < (3, 11),
    reason="the docs toolchain (mkdocstrings + pymdown-extensions) pip resolves on older "
    "Pythons is a broken pair; the site is built on the default Python (3.11) in CI",
)
@pytest.mark.timeout(170)
def test_reference_site_builds_strictly(tmp_path: Path) -> None:
    """mkdocs.yml builds with --strict: every page, link, anchor and docstring reference."""
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=160,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    host = (tmp_path / "reference" / "host" / "index.html").read_text(encoding="utf-8")
    assert 'id="socketengine.Host.write_all"' in host  # generated from the docstrings
    cli = (tmp_path / "cli" / "index.html").read_text(encoding="utf-8")
    assert "socketengine send" in cli  # README's section, put in by docs/hooks
