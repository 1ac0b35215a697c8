"""The ``socketengine`` command line, run as a subprocess for every command, with its
error paths: exit status 0 on success, 1 on an error and 2 on a usage error, with a
one-line message and never a traceback."""

from __future__ import annotations

import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest
from certs import self_signed

from socketengine import Client, Host, RemoteError, compiled
from socketengine.render import describe

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "socketengine"]
TIMEOUT = 15.0


def run(*args: str, input: Optional[bytes] = None, timeout: float = 30) -> Any:
    """Run the CLI to completion; stdout/stderr as text."""
    env = dict(os.environ)
    env.pop("SOCKETENGINE_TOKEN", None)
    proc = subprocess.run(
        [*CLI, *args], cwd=ROOT, input=input, capture_output=True, timeout=timeout, env=env
    )
    proc.stdout = proc.stdout.decode("utf-8", "replace")
    proc.stderr = proc.stderr.decode("utf-8", "replace")
    return proc


def assert_clean_error(proc: Any, code: int, *needles: str) -> None:
    """Exit ``code``, no traceback, one line of error containing every needle (status
    lines such as "socketengine: host listening on ..." may come before it)."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    message = lines[-1] if lines else ""
    if code == 1:
        errors = [line for line in lines if not line.startswith("socketengine: ")]
        assert errors == [message] and message.startswith("socketengine "), proc.stderr
    for needle in needles:
        assert needle in message, (needle, proc.stderr)


def wait_for(condition: Callable[[], Any], timeout: float = TIMEOUT, what: str = "it") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


class Running:
    """A long-running CLI process whose output lines are collected as they come."""

    def __init__(self, *args: str, env: Optional[Dict[str, str]] = None) -> None:
        full_env = dict(os.environ)
        full_env.pop("SOCKETENGINE_TOKEN", None)
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [*CLI, *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=full_env,
        )
        self.out: List[str] = []
        self.err: List[str] = []
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for t in self._threads:
            t.start()

    @staticmethod
    def _pump(stream: Any, lines: List[str]) -> None:
        for raw in iter(stream.readline, b""):
            lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def wait_line(self, pattern: str, stream: str = "err", timeout: float = TIMEOUT) -> Any:
        """The first match of ``pattern`` in a line of stdout ("out") or stderr ("err")."""
        lines = self.out if stream == "out" else self.err
        regex = re.compile(pattern)

        def found() -> Any:
            for line in list(lines):
                m = regex.search(line)
                if m:
                    return m
            if self.proc.poll() is not None:
                time.sleep(0.05)  # let the pumps drain
                for line in list(lines):
                    m = regex.search(line)
                    if m:
                        return m
                raise AssertionError(
                    f"exited {self.proc.returncode} before {pattern!r}:\n"
                    + "\n".join(self.out + self.err)
                )
            return None

        return wait_for(found, timeout, f"{pattern!r} on std{stream}")

    def port(self) -> int:
        return int(self.wait_line(r"listening on 127\.0\.0\.1:(\d+)").group(1))

    def stop(self, sig: int = signal.SIGINT, timeout: float = TIMEOUT) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        for t in self._threads:
            t.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for t in self._threads:
            t.join(5)


@pytest.fixture
def running() -> Iterator[Callable[..., Running]]:
    started: List[Running] = []

    def start(*args: str, env: Optional[Dict[str, str]] = None) -> Running:
        r = Running(*args, env=env)
        started.append(r)
        return r

    yield start
    for r in started:
        r.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- help, version, demo ------------------------------------------------------------------------

COMMANDS = ["demo", "host", "monitor", "send", "watch", "request", "bench"]


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_for_every_command(command: str) -> None:
    proc = run(*([command] if command else []), "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: socketengine{' ' + command if command else ''}")
    if not command:
        for name in COMMANDS:
            assert name in proc.stdout


def test_version_and_missing_command() -> None:
    proc = run("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("socketengine ")
    build = "compiled" if compiled.modules() else "interpreted"
    assert f"({build} build, Python {platform.python_version()})" in proc.stdout
    proc = run()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    proc = run("frobnicate")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_console_script_is_declared() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    assert 'socketengine = "socketengine.__main__:main"' in text


def test_demo() -> None:
    proc = run("demo")
    assert proc.returncode == 0, proc.stderr
    assert "identical: True" in proc.stdout


# -- host -----------------------------------------------------------------------------------------


def test_host_prints_every_message(running: Callable[..., Running]) -> None:
    np = pytest.importorskip("numpy")
    r = running("host", "--port", "0")
    port = r.port()
    with Client(port=port, name="cli-test") as c:
        c.write("pose", {"x": 1.5, "tags": ("a", "b")})
        c.write("note", "z" * 1000)
        c.write("blob", b"\x00\x01\x02")
        c.write_image(np.zeros((48, 64, 3), np.uint8))
        for i in range(200):
            c.write("seq", i)
        r.wait_line(r"  seq  199$", "out")
        with pytest.raises(RemoteError, match="no handler"):
            c.request("lookup", {"k": [1, 2]}, timeout=TIMEOUT)
        r.wait_line(r"  lookup  request \{\"k\": \[1, 2\]\}  -> error: no handler", "out")
    r.wait_line(r"- cli-test@127\.0\.0\.1:\d+ disconnected", "out")
    assert r.stop() == 0
    out = r.out
    seq = [line for line in out if "  seq  " in line]
    assert [int(line.rsplit(" ", 1)[1]) for line in seq] == list(range(200))  # every one, in order
    assert re.search(r"^\d\d:\d\d:\d\d\.\d{3}  \+ cli-test@127\.0\.0\.1:\d+ connected$", out[0])
    assert any(
        re.search(
            r"cli-test@127\.0\.0\.1:\d+  pose  \{\"x\": 1\.5, \"tags\": \(\"a\", \"b\"\)\}", x
        )
        for x in out
    )
    (note,) = [line for line in out if "  note  " in line]
    assert note.endswith("… (1000 chars)") and len(note) < 200
    assert any(line.endswith("  blob  <3 bytes 000102>") for line in out)
    assert any(line.endswith("  image  <ndarray 48x64x3 uint8>") for line in out)
    assert "host closed" in r.err[-1]
    assert "Traceback" not in "\n".join(r.err)


def test_host_json_lines(running: Callable[..., Running]) -> None:
    np = pytest.importorskip("numpy")
    r = running("host", "--port", "0", "--json")
    port = r.port()
    with Client(port=port, name="j") as c:
        c.write("pose", {"x": 1.5, 2: (1, 2)})
        c.write("blob", b"\x00\x01")
        c.write("small", np.arange(6, dtype=np.int16).reshape(2, 3))
        c.write_image(np.zeros((48, 64, 3), np.uint8))
        c.write("nan", float("nan"))
        with pytest.raises(RemoteError):
            c.request("ask", [1], timeout=TIMEOUT)
        r.wait_line(r'"channel": "ask"', "out")
    assert r.stop(signal.SIGTERM) == 0
    docs = [json.loads(line) for line in r.out]  # every line is one JSON object
    messages = {d["channel"]: d for d in docs if d["event"] == "message"}
    assert docs[0]["event"] == "connect" and docs[0]["client"] == "j"
    assert messages["pose"]["value"] == {"x": 1.5, "2": [1, 2]}
    assert messages["pose"]["address"].startswith("127.0.0.1:")
    assert isinstance(messages["pose"]["time"], float)
    assert messages["blob"]["value"] == {"$bytes": "AAE="}
    assert messages["small"]["value"] == {
        "$ndarray": [2, 3],
        "dtype": "int16",
        "data": [[0, 1, 2], [3, 4, 5]],
    }
    assert messages["image"]["value"] == {"$ndarray": [48, 64, 3], "dtype": "uint8"}
    assert messages["image"]["summary"] == "<ndarray 48x64x3 uint8>"
    assert messages["nan"]["value"] is None
    (asked,) = [d for d in docs if d["event"] == "request"]
    assert asked["channel"] == "ask" and asked["value"] == [1] and asked["client"] == "j"
    assert asked["reply"].startswith("error: no handler")


def test_host_errors_are_one_line() -> None:
    with Host(port=0) as busy:
        proc = run("host", "--port", str(busy.port), "--duration", "5")
    assert_clean_error(proc, 1, "cannot listen on", "in use")
    proc = run("host", "--port", "0", "--tls-cert", "/nonexistent.pem", "--duration", "5")
    assert_clean_error(proc, 1, "cannot load --tls-cert /nonexistent.pem")
    proc = run("host", "--tls-key", "k.pem")
    assert_clean_error(proc, 2, "need --tls-cert")
    proc = run("host", "--port", "70000")
    assert_clean_error(proc, 2, "0-65535")


def test_host_duration_stops_it() -> None:
    proc = run("host", "--port", "0", "--duration", "0.2")
    assert proc.returncode == 0, proc.stderr
    assert "host closed" in proc.stderr


# -- send ------------------------------------------------------------------------------------------


@pytest.fixture
def host() -> Iterator[Host]:
    h = Host(port=0)
    yield h
    h.close()


@pytest.mark.parametrize(
    "args, channel, expected",
    [
        (['{"x": 1.5, "tags": ["a"]}'], "pose", {"x": 1.5, "tags": ["a"]}),
        (["--raw", "hello world"], "note", "hello world"),
        (["-5"], "n", -5),
        (['"quoted"'], "s", "quoted"),
        (["null"], "nothing", None),
    ],
    ids=["json", "raw", "negative", "string", "null"],
)
def test_send_values(host: Host, args: List[str], channel: str, expected: Any) -> None:
    proc = run("send", channel, *args, "--port", str(host.port), "--name", "sender")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""  # stdout stays clean for scripts; one status line on stderr
    port = host.port
    assert proc.stderr.splitlines() == [
        f"socketengine: sent value {describe(expected, 60)} on {channel!r} to 127.0.0.1:{port}"
    ]
    wait_for(lambda: host.get_all(channel), what="the value")
    assert host.get_all(channel) == [expected]


@pytest.mark.parametrize("where", ["before", "after"])
def test_quiet_send_prints_nothing(host: Host, where: str) -> None:
    args = ["send", "q", "7", "--port", str(host.port)]
    proc = run("-q", *args) if where == "before" else run(*args, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""
    wait_for(lambda: host.get_all("q") == [7], what="the value")


def test_global_options_go_before_or_after_the_command(host: Host) -> None:
    port = str(host.port)
    before = run("-v", "send", "x", "1", "--port", port)
    assert before.returncode == 0, before.stderr
    assert "sent value 1" in before.stderr
    assert "connected" in before.stderr.lower()  # -v: the library's INFO log
    after = run("send", "x", "2", "--port", port, "-v")
    assert after.returncode == 0 and "connected" in after.stderr.lower(), after.stderr
    both = run("-v", "send", "x", "3", "--port", port, "-v")  # counted together: debug
    assert both.returncode == 0, both.stderr
    wait_for(lambda: host.get_all("x") == [1, 2, 3], what="the three values")
    assert_clean_error(run("-v", "-q", "send", "x", "4", "--port", port), 2, "choose one")
    assert_clean_error(run("-q", "send", "x", "--port", port), 2, "give a VALUE")
    help_text = run("--help").stdout
    assert "-q, --quiet" in help_text and "-v, --verbose" in help_text


def test_send_files(host: Host, tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    image_mod = pytest.importorskip("PIL.Image")
    data = bytes(range(256)) * 4
    (tmp_path / "data.bin").write_bytes(data)
    img = np.random.default_rng(3).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    image_mod.fromarray(img).save(tmp_path / "frame.png")
    gray = np.arange(20 * 10, dtype=np.uint8).reshape(20, 10)
    image_mod.fromarray(gray).save(tmp_path / "gray.png")
    port = str(host.port)

    assert run("send", "blob", "--file", str(tmp_path / "data.bin"), "--port", port).returncode == 0
    assert run("send", "cam", "--file", str(tmp_path / "frame.png"), "--port", port).returncode == 0
    assert run("send", "g", "--file", str(tmp_path / "gray.png"), "--port", port).returncode == 0
    png = (tmp_path / "frame.png").read_bytes()
    proc = run("send", "png", "--file", str(tmp_path / "frame.png"), "--bytes", "--port", port)
    assert proc.returncode == 0, proc.stderr
    proc = run("send", "stdin", "--file", "-", "--port", port, input=b"from stdin")
    assert proc.returncode == 0, proc.stderr
    wait_for(lambda: host.get("stdin") is not None, what="all five values")
    assert host.get("blob") == data
    assert host.get("png") == png
    assert host.get("stdin") == b"from stdin"
    assert np.array_equal(host.get("cam"), img)
    assert np.array_equal(host.get("g"), gray)


def test_send_errors_are_one_line(host: Host, tmp_path: Path) -> None:
    port = str(host.port)
    assert_clean_error(run("send", "ch", "{bad", "--port", port), 2, "not valid JSON", "--raw")
    assert_clean_error(run("send", "ch", "hello", "--port", port), 2, "not valid JSON")
    assert_clean_error(run("send", "ch", "--port", port), 2, "give a VALUE")
    assert_clean_error(run("send", "ch", "1", "--file", "x", "--port", port), 2, "not both")
    proc = run("send", "ch", "--file", str(tmp_path / "missing"), "--port", port)
    assert_clean_error(proc, 1, "cannot read --file")
    refused = run("send", "ch", "1", "--port", str(free_port()), "--timeout", "0.5")
    assert_clean_error(refused, 1, "could not connect to 127.0.0.1:")
    assert host.get_all("ch") == []


def test_send_with_a_token(running: Callable[..., Running]) -> None:
    with Host(port=0, token="s3cret") as h:
        port = str(h.port)
        proc = run("send", "x", "1", "--port", port, "--token", "wrong", "--timeout", "2")
        assert_clean_error(proc, 1)
        assert "token" in proc.stderr.lower()
        assert_clean_error(run("send", "x", "1", "--port", port, "--timeout", "2"), 1)
        assert run("send", "x", "2", "--port", port, "--token", "s3cret").returncode == 0
        env_proc = subprocess.run(
            [*CLI, "send", "x", "3", "--port", port],
            cwd=ROOT,
            capture_output=True,
            timeout=30,
            env={**os.environ, "SOCKETENGINE_TOKEN": "s3cret"},
        )
        assert env_proc.returncode == 0, env_proc.stderr
        wait_for(lambda: h.get_all("x") == [2, 3], what="both values")


def test_tls_host_and_client(running: Callable[..., Running], tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    r = running("host", "--port", "0", "--tls-cert", str(cert), "--tls-key", str(key))
    port = str(r.port())
    assert "(TLS)" in r.wait_line("listening").string
    proc = run("send", "secure", '"yes"', "--port", port, "--tls-ca", str(cert), "--name", "t")
    assert proc.returncode == 0, proc.stderr
    r.wait_line(r't@127\.0\.0\.1:\d+  secure  "yes"', "out")
    # --tls alone trusts only the system's CAs: a self-signed host is refused.
    proc = run("send", "secure", "1", "--port", port, "--tls", "--timeout", "3")
    assert_clean_error(proc, 1, "TLS handshake", "certificate")
    plain = run("send", "secure", "1", "--port", port, "--timeout", "3")
    assert_clean_error(plain, 1)
    assert_clean_error(run("send", "x", "1", "--tls-ca", str(tmp_path / "nope.pem")), 1, "--tls-ca")
    assert r.stop() == 0


# -- watch ----------------------------------------------------------------------------------------


def test_watch_prints_each_new_value(host: Host, running: Callable[..., Running]) -> None:
    host.write_all("config", {"fps": 30}, retain=True)  # replayed right after the handshake
    r = running(
        "watch", "cmd", "config", "--count", "3", "--name", "watcher", "--port", str(host.port)
    )
    r.wait_line("watching cmd, config on 127.0.0.1:")
    conn = wait_for(lambda: host.get_client("watcher"), what="the watcher")
    conn.write("other", "not watched")
    conn.write("cmd", "go")
    conn.write("cmd", [1, 2])
    assert r.proc.wait(TIMEOUT) == 0, r.err
    r.stop()
    lines = [line.split("  ", 1)[1] for line in r.out]
    assert lines == ['config  {"fps": 30}', 'cmd  "go"', "cmd  [1, 2]"]


def test_watch_every_channel_as_json(host: Host, running: Callable[..., Running]) -> None:
    if not hasattr(Client, "on_message"):
        pytest.skip("this socketengine has no on_message() hook")
    r = running("watch", "--json", "--count", "2", "--name", "w", "--port", str(host.port))
    r.wait_line("watching every channel")
    conn = wait_for(lambda: host.get_client("w"), what="the watcher")
    conn.write("a", {"k": [1, 2]})
    conn.write("b", b"\xff")
    assert r.proc.wait(TIMEOUT) == 0, r.err
    r.stop()
    docs = [json.loads(line) for line in r.out]
    assert [(d["channel"], d["value"]) for d in docs] == [
        ("a", {"k": [1, 2]}),
        ("b", {"$bytes": "/w=="}),
    ]


def test_watch_errors(host: Host) -> None:
    proc = run("watch", "cmd", "--count", "1", "--duration", "0.3", "--port", str(host.port))
    assert_clean_error(proc, 1, "0 of 1 values within 0.3 s")
    proc = run("watch", "cmd", "--port", str(free_port()), "--timeout", "0.5")
    assert_clean_error(proc, 1, "could not connect")
    assert_clean_error(run("watch", "cmd", "--count", "0"), 2, "at least 1")


def test_watch_exits_130_on_ctrl_c_and_0_on_sigterm(
    host: Host, running: Callable[..., Running]
) -> None:
    r = running("watch", "cmd", "--port", str(host.port))
    r.wait_line("watching cmd")
    assert r.stop(signal.SIGINT) == 130
    assert "interrupted" in r.err[-1]
    r = running("watch", "cmd", "--port", str(host.port))
    r.wait_line("watching cmd")
    assert r.stop(signal.SIGTERM) == 0


@pytest.fixture
def stalled() -> Iterator[socket.socket]:
    """A TCP listener on port 0 that accepts but never answers the handshake: a host
    too busy to finish connecting."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.settimeout(TIMEOUT)
        yield listener


@pytest.mark.parametrize("command", ["watch", "send"])
def test_ctrl_c_while_connecting_exits_130_at_once(
    stalled: socket.socket, running: Callable[..., Running], command: str
) -> None:
    port = str(stalled.getsockname()[1])
    args = ["cmd", "--port", port, "--timeout", "120"]
    r = running(command, *args, *(["1"] if command == "send" else []))
    accepted, _ = stalled.accept()  # the CLI is connected and waits for the handshake
    try:
        # It would wait 120 s; it must exit as soon as it is interrupted: 130, or (rarely,
        # seen once on 3.13 under load) killed by the SIGINT itself, which a shell also
        # reports as 130.
        code = r.stop(signal.SIGINT, timeout=TIMEOUT)
        assert code in (130, -signal.SIGINT), r.err
    finally:
        accepted.close()
    assert "Traceback" not in "\n".join(r.err)
    if code == 130:
        assert "interrupted" in r.err[-1]


def test_ctrl_c_while_retrying_a_refused_connection(running: Callable[..., Running]) -> None:
    r = running("-v", "watch", "cmd", "--port", str(free_port()), "--timeout", "120")
    r.wait_line("retrying until")  # the library logs (-v) that it retries
    assert r.stop(signal.SIGINT, timeout=TIMEOUT) == 130


# -- request --------------------------------------------------------------------------------------


def test_request_prints_the_reply_or_the_error(host: Host) -> None:
    release = threading.Event()
    host.on("add", lambda numbers, conn: sum(numbers))
    host.on("echo", lambda data, conn: data)

    def fail(data: Any, conn: Any) -> None:
        raise ValueError("nope")

    host.on("fail", fail)
    host.on("slow", lambda data, conn: release.wait(10))
    port = str(host.port)
    try:
        proc = run("request", "add", "[1, 2, 3]", "--port", port)
        assert proc.returncode == 0 and proc.stdout == "6\n", proc.stderr
        proc = run("request", "echo", "--raw", "héllo", "--port", port)
        assert proc.returncode == 0 and proc.stdout == '"héllo"\n', proc.stderr
        proc = run("request", "echo", '{"a": [1, null]}', "--port", port)
        assert json.loads(proc.stdout) == {"a": [1, None]}
        assert_clean_error(run("request", "fail", "1", "--port", port), 1, "ValueError: nope")
        assert_clean_error(run("request", "none", "1", "--port", port), 1, "no handler")
        proc = run("request", "slow", "1", "--port", port, "--timeout", "0.5")
        assert_clean_error(proc, 1, "no reply on 'slow' within 0.5 s")
        assert_clean_error(run("request", "add", "[1,", "--port", port), 2, "not valid JSON")
    finally:
        release.set()


# -- bench ----------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_bench_quick_run_with_progress(tmp_path: Path) -> None:
    if not (ROOT / "bench" / "__main__.py").exists():
        pytest.skip("bench/ is not in this checkout")
    pytest.importorskip("numpy")
    proc = run(
        "bench",
        "--quick",
        "--runs",
        "1",
        "--only",
        "small",
        "--libs",
        "socketengine,raw-tcp",
        "--out",
        str(tmp_path),
        timeout=110,
    )
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"\[#+\] 2/2  small\s+run 1/1", proc.stderr), proc.stderr
    assert "workload" in proc.stdout and "msgs_per_s" in proc.stdout
    assert (tmp_path / "bench-results.json").exists()


def test_bench_help_states_the_measured_duration() -> None:
    results = json.loads((ROOT / "docs" / "bench-results.json").read_text())
    minutes = round(results["duration_s"] / 60)  # the last full run, measured
    assert results["mode"] == "full" and results["runs"] == 5
    assert f"about {minutes} minutes" in " ".join(run("bench", "--help").stdout.split())
    assert f"~{minutes} min" in (ROOT / "docs" / "benchmarks.md").read_text()  # the guide page


def test_bench_errors() -> None:
    if not (ROOT / "bench" / "__main__.py").exists():
        pytest.skip("bench/ is not in this checkout")
    proc = run("bench", "--only", "nope", "--out", "/nonexistent-dir")
    assert proc.returncode == 2 and "unknown workload" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert_clean_error(run("bench", "--bench-dir", "/nonexistent"), 1, "no benchmark suite")
    assert_clean_error(run("bench", "--runs", "0"), 2, "at least 1")
    proc = run("bench", "--list")
    assert proc.returncode == 0 and "roundtrip" in proc.stdout


# -- monitor --------------------------------------------------------------------------------------


def _http(url: str, headers: Optional[Dict[str, str]] = None) -> Tuple[int, bytes]:
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=headers or {}), timeout=10
        ) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_monitor_command(running: Callable[..., Running]) -> None:
    r = running("monitor", "--port", "0", "--monitor", "0")
    url = r.wait_line(r"^(http://127\.0\.0\.1:\d+/)$", "out").group(1)
    port = r.port()
    status, body = _http(url)
    assert status == 200 and b"socketengine monitor" in body
    with Client(port=port, name="seen-in-browser") as c:
        c.write("status", "ok")

        def listed() -> bool:
            doc = json.loads(_http(url + "api/state")[1])
            return any(x["name"] == "seen-in-browser" and x["channels"] for x in doc["clients"])

        wait_for(listed, what="the client in the monitor's state")
    assert r.stop() == 0
    assert r.out == [url]  # without --print, only the address


def test_monitor_command_bgr_shows_true_colours(running: Callable[..., Running]) -> None:
    np = pytest.importorskip("numpy")
    image_mod = pytest.importorskip("PIL.Image")
    import io

    r = running("monitor", "--port", "0", "--monitor", "0", "--bgr")
    url = r.wait_line(r"^(http://127\.0\.0\.1:\d+/)$", "out").group(1)
    frame = np.zeros((32, 32, 3), np.uint8)
    frame[..., 0] = 240  # blue, in OpenCV's BGR order
    with Client(port=r.port(), name="cv") as c:
        c.write_image(frame)
        doc = wait_for(
            lambda: (d := json.loads(_http(url + "api/state")[1]))["images"] and d,
            what="the image",
        )
        session = doc["images"][0]["session"]
        status, body = _http(f"{url}frame?s={session}&c=image")
    assert status == 200
    red, green, blue = np.asarray(image_mod.open(io.BytesIO(body)).convert("RGB"))[16, 16]
    assert blue > 200 and red < 40 and green < 40  # shown blue, not red
    assert r.stop() == 0


def test_monitor_command_honours_the_token(running: Callable[..., Running]) -> None:
    r = running("monitor", "--port", "0", "--monitor", "0", "--token", "s3cret")
    url = r.wait_line(r"^(http://\S+)$", "out").group(1)
    assert "enter the host's token" in r.wait_line("monitor on").string
    assert _http(url + "api/state")[0] == 401
    assert _http(url + "api/state", {"Authorization": "Bearer s3cret"})[0] == 200
    assert r.stop(signal.SIGTERM) == 0


def test_host_with_monitor_and_monitor_errors(running: Callable[..., Running]) -> None:
    r = running("host", "--port", "0", "--monitor", "0")
    url = r.wait_line(r"monitor on (http://127\.0\.0\.1:\d+/)").group(1)
    assert _http(url)[0] == 200
    busy_port = int(url.rsplit(":", 1)[1].strip("/"))
    proc = run("monitor", "--port", "0", "--monitor", str(busy_port), "--duration", "5")
    assert_clean_error(proc, 1, "cannot serve the monitor on 127.0.0.1:")
    assert r.stop() == 0


def test_run_in_process_has_no_side_effects(host: Host, capsys: Any) -> None:
    """main() can be called from Python; it restores the logger it configured."""
    import logging

    from socketengine.cli import main

    logger = logging.getLogger("socketengine")
    before = (logger.level, logger.propagate, list(logger.handlers))
    assert main(["send", "inproc", "[1]", "--port", str(host.port)]) == 0
    assert main(["send", "inproc", "{", "--port", str(host.port)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert (logger.level, logger.propagate, list(logger.handlers)) == before
    wait_for(lambda: host.get("inproc") == [1], what="the value")
