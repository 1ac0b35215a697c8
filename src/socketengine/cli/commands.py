"""The commands: ``demo``, ``host``, ``monitor``, ``send``, ``request``, ``watch``, ``bench``.

Each ``cmd_*`` takes the parsed options and returns the exit status (or raises
:class:`~socketengine.cli.exits.UsageError` / :class:`CommandError`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Set, Tuple

from ..errors import RemoteError
from ..render import describe, format_address, jsonable, safe
from ..sync.client import Client
from ..sync.connection import Connection
from ..sync.host import Host
from .exits import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, CommandError
from .inputs import read_value
from .interrupt import Stop
from .options import host_tls, make_client, monitor_tls
from .output import Console, clock, json_line, who

__all__ = [
    "cmd_bench",
    "cmd_demo",
    "cmd_host",
    "cmd_monitor",
    "cmd_request",
    "cmd_send",
    "cmd_watch",
]

#: Messages waiting to be printed by ``host`` and ``watch`` (then the peer is held up).
PRINT_QUEUE = 10_000


def _console(args: argparse.Namespace) -> Console:
    return Console(quiet=bool(getattr(args, "quiet", False)))


# -- demo -------------------------------------------------------------------------------


def _wait(condition: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.005)
    raise CommandError("demo: timed out waiting for data (is something blocking loopback?)")


def cmd_demo(args: argparse.Namespace) -> int:
    """Host and client on 127.0.0.1 exchange values and an image."""
    try:
        import numpy as np
    except ImportError:
        raise CommandError(
            "demo: the image part needs numpy: pip install 'socket.engine[numpy]'"
        ) from None
    out = _console(args).line
    with Host(port=args.port) as h:
        out(f"host    listening on 127.0.0.1:{h.port}")
        with Client(port=h.port, name="demo-client") as c:
            out(f"client  connected as {c.name!r}")
            c.write("test", "client is connected!")
            c.write("pose", {"x": 1.5, "y": -0.25, "tags": ("arm", "left")})
            _wait(lambda: h.get_all("pose"))
            out(f"host    get_all('test') -> {h.get_all('test')!r}")
            out(f"host    get('pose')     -> {h.get('pose')!r}")

            h.write_all("command", ["move", 3])
            _wait(lambda: c.get("command"))
            out(f"client  get('command')  -> {c.get('command')!r}")

            y, x = np.mgrid[0:480, 0:640]
            image = np.dstack([x % 256, y % 256, (x + y) % 256]).astype(np.uint8)
            t0 = time.perf_counter()
            c.write_image(image)
            _wait(lambda: h.get("image") is not None)
            ms = (time.perf_counter() - t0) * 1000
            got = h.get("image")
            same = bool(np.array_equal(got, image))
            out(f"host    image {got.shape} {got.dtype} received in {ms:.1f} ms, identical: {same}")
            for conn in h.clients():
                out(f"host    client {conn.name!r} at {conn.address[0]}:{conn.address[1]}")
    out("both    closed cleanly")
    return EXIT_OK if same else EXIT_ERROR


# -- host and monitor -------------------------------------------------------------------


def _run_host(args: argparse.Namespace, show: bool, monitor_port: Optional[int]) -> int:
    """``host`` and ``monitor``: run a host until Ctrl-C/SIGTERM or ``--duration``."""
    tls = host_tls(args)
    console = _console(args)
    events: queue.Queue = queue.Queue(PRINT_QUEUE)
    stopping = threading.Event()

    def put(item: Tuple[Any, ...]) -> None:
        # Block (bounded) rather than drop: a full queue holds up the callback thread,
        # which pauses reading (backpressure to the clients), until we stop.
        while not stopping.is_set():
            try:
                events.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    # A client's "connected" line comes before its first message: whichever of the
    # on_connect callback and its first message comes first prints it.
    announced: Set[int] = set()
    announced_lock = threading.Lock()

    def announce(conn: Connection) -> None:
        with announced_lock:
            if id(conn) in announced:
                return
            announced.add(id(conn))
        put((conn.connected_at, "connect", conn, None, None, None))

    def farewell(conn: Connection) -> None:
        announce(conn)
        with announced_lock:
            announced.discard(id(conn))
        put((time.time(), "disconnect", conn, None, None, None))

    def message(channel: str, value: Any, conn: Connection) -> None:
        announce(conn)
        put((time.time(), "message", conn, channel, value, None))

    def request(
        conn: Connection, channel: str, value: Any, reply: Any, error: Optional[str]
    ) -> None:
        # The command-line host registers no handler: the library answers "no handler".
        announce(conn)
        shown = f"error: {error}" if error is not None else reply
        put((time.time(), "request", conn, channel, value, shown))

    kw: Dict[str, Any] = {"timeout": args.timeout, "token": args.token or None, "tls": tls}
    with Stop(args.duration) as stop:
        if show:
            host = Host(args.addr, args.port, open=False, **kw)
            host.on_request(request)
            host.on_message(message)
            host.on_connect(announce)
            host.on_disconnect(farewell)
        else:
            host = Host(args.addr, args.port, open=False, **kw)
        monitor = None
        try:
            host.open()
            if monitor_port is not None:
                try:
                    from ..monitor import Monitor  # needs the monitor extra (h11)
                except ImportError as exc:
                    raise CommandError(str(exc)) from None
                monitor = Monitor(
                    host,
                    port=monitor_port,
                    addr=args.monitor_addr,
                    tls=monitor_tls(args),
                    bgr=args.bgr,
                ).start()
            stop.running = True
            where = format_address((args.addr, host.port))
            console.status(
                f"host listening on {where}"
                + (" (TLS)" if tls else "")
                + (" (token)" if args.token else "")
                + "; Ctrl-C to stop"
            )
            if monitor is not None:
                note = " (enter the host's token on the page)" if args.token else ""
                console.status(f"monitor on {monitor.url}{note}")
                if not show:
                    console.line(monitor.url)
            while not stop.stopped and not console.closed:
                try:
                    item = events.get(timeout=0.1)
                except queue.Empty:
                    continue
                console.line(_host_line(item, args))
        finally:
            stopping.set()
            if monitor is not None:
                monitor.close()
            host.close()
    console.status("host closed")
    return EXIT_OK


def _host_line(item: Tuple[Any, ...], args: argparse.Namespace) -> str:
    t, kind, conn, channel, value, reply = item
    if args.json:
        obj: Dict[str, Any] = {
            "time": round(t, 6),
            "event": kind,
            "client": conn.name,
            "address": format_address(conn.address),
        }
        if kind in ("message", "request"):
            obj.update(
                channel=channel, value=jsonable(value), summary=describe(value, args.max_chars)
            )
        if kind == "request":
            obj["reply"] = reply
        return json_line(obj)
    if kind == "message":
        return f"{clock(t)}  {who(conn)}  {safe(channel)}  {describe(value, args.max_chars)}"
    if kind == "request":
        shown = describe(value, args.max_chars)
        return f"{clock(t)}  {who(conn)}  {safe(channel)}  request {shown}  -> {reply}"
    sign = "+" if kind == "connect" else "-"
    return f"{clock(t)}  {sign} {who(conn)} {kind}ed"


def cmd_host(args: argparse.Namespace) -> int:
    """Run a host and print every message and request as it arrives."""
    return _run_host(args, show=True, monitor_port=args.monitor)


def cmd_monitor(args: argparse.Namespace) -> int:
    """Run a host with the browser monitor."""
    return _run_host(args, show=args.print, monitor_port=args.monitor)


# -- send, request, watch ---------------------------------------------------------------


def cmd_hosts(args: argparse.Namespace) -> int:
    """List the hosts on a NATS cluster (one line each, or JSON lines)."""
    from .. import nats_hosts

    try:
        hosts = nats_hosts(args.url, token=args.token, connect_timeout=args.timeout)
    except ImportError as exc:
        raise CommandError(f"{exc}: pip install 'socket.engine[nats]'") from exc
    console = _console(args)
    now = time.time()
    for name in sorted(hosts):
        info = hosts[name]
        if args.json:
            console.line(json_line(jsonable(info)))
        else:
            age = now - float(info.get("t", now))
            console.line(f"{safe(name)}\tpid {info.get('pid', '?')}\t{age:.1f} s ago")
    console.status(f"{len(hosts)} host(s) on {args.url}")
    return EXIT_OK


def cmd_send(args: argparse.Namespace) -> int:
    """Connect, send one value, flush, close; say what was sent on stderr (not ``-q``)."""
    value, is_image = read_value(args)
    client = make_client(args, reconnect=False)
    try:
        if is_image:
            client.write_image(value, args.channel)
        else:
            client.write(args.channel, value)
        client.flush(args.timeout)  # WriteTimeout (exit 1) if the host did not take it
    finally:
        client.close()  # then says goodbye
    what = "image" if is_image else "value"
    _console(args).status(
        f"sent {what} {describe(value, 60)} on {safe(args.channel)!r} "
        f"to {format_address((args.addr, args.port))}"
    )
    return EXIT_OK


def cmd_request(args: argparse.Namespace) -> int:
    """Send a request and print the reply (as JSON)."""
    value, _ = read_value(args)
    client = make_client(args, reconnect=False)
    try:
        reply = client.request(args.channel, value, timeout=args.timeout)
    except RemoteError as exc:
        raise CommandError(f"the host replied with an error: {exc}") from exc
    except TimeoutError as exc:
        raise CommandError(f"no reply on {args.channel!r} within {args.timeout} s") from exc
    finally:
        client.close()
    _console(args).line(json.dumps(jsonable(reply), ensure_ascii=False))
    return EXIT_OK


def cmd_watch(args: argparse.Namespace) -> int:
    """Connect as a client and print each value the host sends on the channels.

    Ctrl-C exits 130 at once in every phase (connecting too); SIGTERM, ``--count`` and
    ``--duration`` end it normally.
    """
    console = _console(args)
    received: queue.Queue = queue.Queue(PRINT_QUEUE)
    stopping = threading.Event()

    def put(channel: str, data: Any) -> None:
        item = (time.time(), channel, data)
        # Block (bounded) rather than drop: a full queue holds up the callbacks, which
        # pauses reading (backpressure to the host), until we stop.
        while not stopping.is_set():
            try:
                received.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    count = 0
    with Stop(args.duration, sigint_interrupts=True) as stop:
        client: Any = make_client(args, reconnect=True, open=False)
        try:
            if args.channels:
                for channel in dict.fromkeys(args.channels):
                    client.on(channel, lambda data, channel=channel: put(channel, data))
            else:
                client.on_message(put)
            client.open()  # retained values arrive right after the handshake: on() is set
            stop.running = True
            names = ", ".join(safe(c) for c in args.channels) or "every channel"
            console.status(f"watching {names} on {format_address((args.addr, args.port))}")
            while not stop.stopped and not console.closed:
                if args.count is not None and count >= args.count:
                    break
                try:
                    t, channel, data = received.get(timeout=0.1)
                except queue.Empty:
                    continue
                count += 1
                if args.json:
                    obj = {
                        "time": round(t, 6),
                        "channel": channel,
                        "value": jsonable(data),
                        "summary": describe(data, args.max_chars),
                    }
                    console.line(json_line(obj))
                else:
                    console.line(f"{clock(t)}  {safe(channel)}  {describe(data, args.max_chars)}")
        finally:
            stopping.set()
            client.close()
    if args.count is not None and count < args.count and stop.timed_out():
        raise CommandError(f"{count} of {args.count} values within {args.duration} s")
    return EXIT_OK


# -- bench ------------------------------------------------------------------------------


def _bench_root(given: Optional[str]) -> Path:
    if given:
        path = Path(given).resolve()
        for candidate in (path, path.parent):
            if (candidate / "bench" / "__main__.py").is_file():
                return candidate
        raise CommandError(f"no benchmark suite (bench/__main__.py) in {given}")
    for candidate in (Path.cwd(), Path(__file__).resolve().parents[3]):
        if (candidate / "bench" / "__main__.py").is_file():
            return candidate
    raise CommandError(
        "the benchmark suite (bench/) ships with the source repository, not the installed "
        "package: run this in a clone (pip install -e .) or pass --bench-dir"
    )


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the benchmark suite with a progress bar (``bench/runner.py`` of the clone)."""
    root = _bench_root(args.bench_dir)
    path = root / "bench" / "runner.py"
    spec = importlib.util.spec_from_file_location("socketengine_bench_runner", path)
    if spec is None or spec.loader is None or not path.is_file():
        raise CommandError(f"{path} is missing: this checkout's bench/ is too old")
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    suite_args = []
    if args.quick:
        suite_args.append("--quick")
    if args.list:
        suite_args.append("--list")
    for flag, value in (
        ("--runs", args.runs),
        ("--only", args.only),
        ("--libs", args.libs),
        ("--scale", args.scale),
        ("--out", str(Path(args.out).resolve()) if args.out else None),
    ):
        if value is not None:
            suite_args += [flag, str(value)]
    sys.stdout.flush()
    code = runner.run(root, suite_args, verbose=bool(args.verbose))
    return EXIT_INTERRUPTED if code is None else int(code)
