"""The ``socketengine`` command line (also ``python -m socketengine``).

Commands: ``demo``, ``host``, ``send``, ``watch``, ``request``, ``bench`` and
``monitor``; ``socketengine COMMAND --help`` describes each.  Exit status: 0 on
success, 1 on an error (refused connection, wrong token, timeout, error reply...), 2 on
a usage error (bad option, bad JSON value), 130 when interrupted; errors are one line
on standard error, never a traceback (``-vv`` shows one).
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import math
import os
import queue
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Set, Tuple

from . import __version__
from .errors import RemoteError, SocketEngineError
from .monitor import Monitor, describe
from .sync.client import Client
from .sync.connection import Connection
from .sync.host import Host

logger = logging.getLogger("socketengine")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

#: Messages waiting to be printed by ``host`` before further ones are counted as dropped.
PRINT_QUEUE = 10_000
#: Array elements included in ``--json`` output (larger arrays: shape and dtype only).
JSON_ARRAY_LIMIT = 1024

_IMAGE_MAGIC = (
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
)


class UsageError(Exception):
    """The command line is wrong (exit status 2)."""


class CommandError(Exception):
    """The command failed (exit status 1); the message says why."""


# -- output helpers -----------------------------------------------------------------------


def _safe(text: Any) -> str:
    """``text`` with control characters escaped, so a peer cannot drive the terminal."""
    s = str(text)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)


def _clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t % 1 * 1000):03d}"


def _address(address: Any) -> str:
    try:
        host, port = address[0], address[1]
    except (TypeError, IndexError):
        return str(address)
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def _who(conn: Connection) -> str:
    where = _address(conn.address)
    return f"{_safe(conn.name)}@{where}" if conn.name is not None else where


def jsonable(value: Any, depth: int = 0) -> Any:
    """``value`` as plain JSON data (see ``--json``).

    Tuples become lists, non-string keys strings, non-finite floats ``null``, bytes
    ``{"$bytes": BASE64}``, numpy arrays ``{"$ndarray": SHAPE, "dtype": DTYPE}`` plus
    ``"data"`` (nested lists) when they have at most 1024 elements; anything else its
    short description.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if depth > 32:
        return describe(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$bytes": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, depth + 1) for v in value]
    if isinstance(value, dict):
        return {
            (k if isinstance(k, str) else describe(k)): jsonable(v, depth + 1)
            for k, v in value.items()
        }
    if type(value).__name__ == "EncodedImage":  # an image still compressed
        return {
            "$image": getattr(value, "codec", None),
            "shape": list(getattr(value, "shape", ())),
            "dtype": str(getattr(value, "dtype", "")),
            "bytes": getattr(value, "nbytes", None),
        }
    np = sys.modules.get("numpy")
    if np is not None and isinstance(value, np.ndarray):
        out: Dict[str, Any] = {"$ndarray": list(value.shape), "dtype": str(value.dtype)}
        if value.size <= JSON_ARRAY_LIMIT and value.dtype.kind in "biuf":
            out["data"] = jsonable(value.tolist(), depth + 1)
        return out
    if np is not None and isinstance(value, np.generic):
        return jsonable(value.item(), depth + 1)
    return describe(value)


def _json_line(obj: Dict[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(", ", ": "))


class _Output:
    """Writes lines to stdout; a closed pipe (``| head``) ends the command quietly."""

    def __init__(self) -> None:
        self.closed = False

    def line(self, text: str) -> None:
        if self.closed:
            return
        try:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()
        except BrokenPipeError:
            self.closed = True
            try:  # no further "Exception ignored" message when Python flushes at exit
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
            except (OSError, ValueError):  # pragma: no cover
                pass


def _status(text: str) -> None:
    """A status line on standard error (never mixed with the data on stdout)."""
    print(f"socketengine: {text}", file=sys.stderr, flush=True)


class _Stop:
    """Set by Ctrl-C (SIGINT) or SIGTERM, and by a ``--duration`` deadline."""

    def __init__(self, duration: Optional[float]) -> None:
        self.event = threading.Event()
        self.deadline = None if duration is None else time.monotonic() + duration
        self._previous: Dict[int, Any] = {}

    def __enter__(self) -> _Stop:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        self.event.set()

    @property
    def stopped(self) -> bool:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return True
        return self.event.is_set()

    def timed_out(self) -> bool:
        return (
            not self.event.is_set()
            and self.deadline is not None
            and time.monotonic() >= self.deadline
        )


# -- options ----------------------------------------------------------------------------------


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0-65535, not {port}")
    return port


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"seconds must be >= 0, not {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log what the library does (-vv: debug, and tracebacks on errors)",
    )


def _add_host_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("host")
    g.add_argument(
        "--addr",
        default="127.0.0.1",
        help="address to listen on (default %(default)s: this machine only; "
        "0.0.0.0 or :: for the network, then also --token)",
    )
    g.add_argument(
        "--port", type=_port, default=8080, help="port to listen on (default 8080; 0: any)"
    )
    g.add_argument(
        "--token",
        default=os.environ.get("SOCKETENGINE_TOKEN"),
        help="shared secret clients must prove (default: $SOCKETENGINE_TOKEN)",
    )
    g.add_argument(
        "--timeout",
        type=_seconds,
        default=2.0,
        help="seconds a write to a full client and the final flush may take (default 2)",
    )
    t = p.add_argument_group("TLS (host side)")
    t.add_argument("--tls-cert", metavar="FILE", help="certificate chain (PEM): serve TLS")
    t.add_argument("--tls-key", metavar="FILE", help="its private key (if not in --tls-cert)")
    t.add_argument(
        "--tls-ca",
        metavar="FILE",
        help="also require client certificates signed by this CA (mutual TLS)",
    )


def _add_client_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("connection")
    g.add_argument("--addr", default="127.0.0.1", help="the host's address (default %(default)s)")
    g.add_argument("--port", type=_port, default=8080, help="the host's port (default 8080)")
    g.add_argument(
        "--token",
        default=os.environ.get("SOCKETENGINE_TOKEN"),
        help="the host's shared secret (default: $SOCKETENGINE_TOKEN)",
    )
    g.add_argument(
        "--name", default=None, help="this client's name, as the host sees it (default: none)"
    )
    g.add_argument(
        "--timeout",
        type=_seconds,
        default=5.0,
        help="seconds to wait for the host to accept, for a write or a reply (default 5)",
    )
    t = p.add_argument_group("TLS (client side)")
    t.add_argument(
        "--tls",
        action="store_true",
        help="connect over TLS, verifying the host against the system's CAs",
    )
    t.add_argument(
        "--tls-ca",
        metavar="FILE",
        help="connect over TLS, trusting this CA or self-signed host certificate (PEM)",
    )
    t.add_argument("--tls-cert", metavar="FILE", help="client certificate (PEM), for mutual TLS")
    t.add_argument("--tls-key", metavar="FILE", help="its private key (if not in --tls-cert)")


def _add_value_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("channel", metavar="CHANNEL", help="the channel name")
    p.add_argument(
        "value",
        metavar="VALUE",
        nargs="?",
        help='the value, as JSON: 42, 1.5, true, null, "text", [1, 2], {"x": 1}',
    )
    v = p.add_argument_group("value")
    v.add_argument("--raw", action="store_true", help="VALUE is a plain string, not JSON")
    v.add_argument(
        "--file",
        metavar="PATH",
        help="send this file instead of VALUE ('-': standard input): an image file "
        "(PNG, JPEG, GIF, BMP, TIFF; needs Pillow and numpy) as a numpy image, "
        "anything else as bytes",
    )
    v.add_argument("--bytes", action="store_true", help="with --file: always send bytes")


def _load_chain(ctx: ssl.SSLContext, cert: str, key: Optional[str]) -> None:
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        what = f"--tls-cert {cert}" + (f" / --tls-key {key}" if key else "")
        raise CommandError(f"cannot load {what}: {_one_line(exc)}") from exc


def _load_ca(ctx: ssl.SSLContext, cafile: str) -> None:
    try:
        ctx.load_verify_locations(cafile)
    except (OSError, ssl.SSLError) as exc:
        raise CommandError(f"cannot load --tls-ca {cafile}: {_one_line(exc)}") from exc


def host_tls(args: argparse.Namespace) -> Optional[ssl.SSLContext]:
    """The host's TLS context from ``--tls-cert``/``--tls-key``/``--tls-ca``, or None."""
    if not args.tls_cert:
        if args.tls_key or args.tls_ca:
            raise UsageError("--tls-key and --tls-ca need --tls-cert (the host's certificate)")
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    _load_chain(ctx, args.tls_cert, args.tls_key)
    if args.tls_ca:
        _load_ca(ctx, args.tls_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_tls(args: argparse.Namespace) -> Optional[ssl.SSLContext]:
    """The client's TLS context, or None without ``--tls``/``--tls-ca``/``--tls-cert``.

    The host's certificate is always verified (against ``--tls-ca`` if given, else the
    system's CAs) and must name ``--addr``; there is no option to skip that.
    """
    if not (args.tls or args.tls_ca or args.tls_cert):
        if args.tls_key:
            raise UsageError("--tls-key needs --tls-cert")
        return None
    ctx = ssl.create_default_context()
    if args.tls_ca:
        _load_ca(ctx, args.tls_ca)
    if args.tls_cert:
        _load_chain(ctx, args.tls_cert, args.tls_key)
    return ctx


def _client(args: argparse.Namespace, reconnect: bool, open: bool = True) -> Client:
    return Client(
        args.addr,
        args.port,
        timeout=args.timeout,
        open=open,
        connect_timeout=args.timeout,
        name=args.name,
        token=args.token or None,
        tls=client_tls(args),
        reconnect=reconnect,
    )


# -- values -----------------------------------------------------------------------------------


def _decode_image(data: bytes, path: str) -> Any:
    """A numpy array of the image file ``data``, or None if it is not an image file."""
    if not data.startswith(_IMAGE_MAGIC) and not (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
        return None
    try:
        import numpy as np
        from PIL import Image
    except ImportError:
        raise CommandError(
            f"{path} is an image; sending it as one needs Pillow and numpy "
            "(pip install 'socket.engine[monitor]'), or send its bytes with --bytes"
        ) from None
    import io

    try:
        with Image.open(io.BytesIO(data)) as opened:
            picture: Any = opened
            if picture.mode == "LA" or (picture.mode == "P" and "transparency" in picture.info):
                picture = picture.convert("RGBA")
            elif picture.mode not in ("L", "RGB", "RGBA"):
                picture = picture.convert("RGB")
            return np.ascontiguousarray(np.asarray(picture, dtype=np.uint8))
    except (OSError, ValueError, SyntaxError) as exc:
        raise CommandError(f"cannot decode the image {path}: {exc}") from exc


def read_value(args: argparse.Namespace) -> Tuple[Any, bool]:
    """The value to send from VALUE / ``--raw`` / ``--file``; and whether it is an image."""
    if args.file is not None:
        if args.value is not None:
            raise UsageError("give VALUE or --file, not both")
        if args.raw:
            raise UsageError("--raw applies to VALUE, not to --file")
        try:
            if args.file == "-":
                data = sys.stdin.buffer.read()
            else:
                data = Path(args.file).read_bytes()
        except OSError as exc:
            raise CommandError(f"cannot read --file {args.file}: {exc.strerror or exc}") from exc
        if not args.bytes:
            image = _decode_image(data, args.file)
            if image is not None:
                return image, True
        return data, False
    if args.bytes:
        raise UsageError("--bytes applies to --file")
    if args.value is None:
        raise UsageError("give a VALUE (JSON, or --raw for a plain string) or --file PATH")
    if args.raw:
        return args.value, False
    try:
        return json.loads(args.value), False
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"VALUE is not valid JSON ({exc.msg} at column {exc.colno}); "
            "quote a string as '\"text\"' or pass --raw"
        ) from None
    except RecursionError:
        raise UsageError("VALUE is nested too deeply") from None


# -- commands ---------------------------------------------------------------------------------


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
    out = print
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


def _tapped_host(
    args: argparse.Namespace,
    tls: Optional[ssl.SSLContext],
    tap: Optional[Callable[[Connection, str, Any, bool], None]],
) -> Host:
    """A host (not open yet) that calls ``tap(conn, channel, value, may_block)`` for
    every message, through ``on_message()`` on a callback thread (it may block: that
    is backpressure, nothing is dropped)."""
    kw: Dict[str, Any] = {"timeout": args.timeout, "token": args.token or None, "tls": tls}
    if tap is None:
        return Host(args.addr, args.port, open=False, **kw)
    host = Host(args.addr, args.port, open=False, **kw)
    host.on_message(lambda channel, value, conn: tap(conn, channel, value, True))
    return host


def _monitor_tls(args: argparse.Namespace) -> Optional[ssl.SSLContext]:
    if not args.tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)  # browsers show no cert
    _load_chain(ctx, args.tls_cert, args.tls_key)
    return ctx


def _run_host(args: argparse.Namespace, show: bool, monitor_port: Optional[int]) -> int:
    """``host`` and ``monitor``: run a host until Ctrl-C/SIGTERM or ``--duration``."""
    tls = host_tls(args)
    events: queue.Queue = queue.Queue(PRINT_QUEUE)
    stopping = threading.Event()
    dropped = 0

    def put(item: Tuple[Any, ...], may_block: bool = True) -> None:
        nonlocal dropped
        while not stopping.is_set():
            try:
                events.put(item, block=may_block, timeout=0.2)
                return
            except queue.Full:
                if not may_block:
                    dropped += 1
                    return

    # A client's "connected" line comes before its first message: whichever of the
    # on_connect callback and its first message comes first prints it.
    announced: Set[int] = set()
    announced_lock = threading.Lock()

    def announce(conn: Connection, may_block: bool = True) -> None:
        with announced_lock:
            if id(conn) in announced:
                return
            announced.add(id(conn))
        put((conn.connected_at, "connect", conn, None, None), may_block)

    def farewell(conn: Connection) -> None:
        announce(conn)
        with announced_lock:
            announced.discard(id(conn))
        put((time.time(), "disconnect", conn, None, None))

    def tap(conn: Connection, channel: str, value: Any, may_block: bool) -> None:
        announce(conn, may_block)
        put((time.time(), "message", conn, channel, value), may_block)

    out = _Output()
    with _Stop(args.duration) as stop:
        host = _tapped_host(args, tls, tap if show else None)
        monitor = None
        try:
            if show:
                host.on_connect(announce)
                host.on_disconnect(farewell)
            host.open()
            if monitor_port is not None:
                monitor = Monitor(
                    host,
                    port=monitor_port,
                    addr=args.monitor_addr,
                    tls=_monitor_tls(args),
                    bgr=args.bgr,
                ).start()
            where = _address((args.addr, host.port))
            _status(
                f"host listening on {where}"
                + (" (TLS)" if tls else "")
                + (" (token)" if args.token else "")
                + "; Ctrl-C to stop"
            )
            if monitor is not None:
                note = " (enter the host's token on the page)" if args.token else ""
                _status(f"monitor on {monitor.url}{note}")
                if not show:
                    out.line(monitor.url)
            reported = 0
            while not stop.stopped and not out.closed:
                try:
                    item = events.get(timeout=0.1)
                except queue.Empty:
                    item = None
                if item is not None:
                    out.line(_host_line(item, args))
                if dropped > reported:
                    _status(f"output too slow: {dropped - reported} messages not shown")
                    reported = dropped
        finally:
            stopping.set()
            if monitor is not None:
                monitor.close()
            host.close()
    _status("host closed")
    return EXIT_OK


def _host_line(item: Tuple[Any, ...], args: argparse.Namespace) -> str:
    t, kind, conn, channel, value = item
    if args.json:
        obj: Dict[str, Any] = {
            "time": round(t, 6),
            "event": kind,
            "client": conn.name,
            "address": _address(conn.address),
        }
        if kind == "message":
            obj.update(
                channel=channel, value=jsonable(value), summary=describe(value, args.max_chars)
            )
        return _json_line(obj)
    if kind == "message":
        return f"{_clock(t)}  {_who(conn)}  {_safe(channel)}  {describe(value, args.max_chars)}"
    sign = "+" if kind == "connect" else "-"
    return f"{_clock(t)}  {sign} {_who(conn)} {kind}ed"


def cmd_host(args: argparse.Namespace) -> int:
    """Run a host and print every message as it arrives."""
    return _run_host(args, show=True, monitor_port=args.monitor)


def cmd_monitor(args: argparse.Namespace) -> int:
    """Run a host with the browser monitor."""
    return _run_host(args, show=args.print, monitor_port=args.monitor)


def cmd_send(args: argparse.Namespace) -> int:
    """Connect, send one value, flush, close."""
    value, is_image = read_value(args)
    client = _client(args, reconnect=False)
    try:
        if is_image:
            client.write_image(value, args.channel)
        else:
            client.write(args.channel, value)
        client.flush(args.timeout)  # WriteTimeout (exit 1) if the host did not take it
    finally:
        client.close()  # then says goodbye
    return EXIT_OK


def cmd_request(args: argparse.Namespace) -> int:
    """Send a request and print the reply (as JSON)."""
    value, _ = read_value(args)
    client = _client(args, reconnect=False)
    try:
        reply = client.request(args.channel, value, timeout=args.timeout)
    except RemoteError as exc:
        raise CommandError(f"the host replied with an error: {exc}") from exc
    except TimeoutError as exc:
        raise CommandError(f"no reply on {args.channel!r} within {args.timeout} s") from exc
    finally:
        client.close()
    _Output().line(json.dumps(jsonable(reply), ensure_ascii=False))
    return EXIT_OK


def cmd_watch(args: argparse.Namespace) -> int:
    """Connect as a client and print each value the host sends on the channels."""
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

    client: Any = _client(args, reconnect=True, open=False)
    if args.channels:
        for channel in dict.fromkeys(args.channels):
            client.on(channel, lambda data, channel=channel: put(channel, data))
    else:
        client.on_message(put)
    out = _Output()
    count = 0
    with _Stop(args.duration) as stop:
        try:
            client.open()  # retained values arrive right after the handshake: on() is set
            names = ", ".join(_safe(c) for c in args.channels) or "every channel"
            _status(f"watching {names} on {_address((args.addr, args.port))}")
            while not stop.stopped and not out.closed:
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
                    out.line(_json_line(obj))
                else:
                    out.line(f"{_clock(t)}  {_safe(channel)}  {describe(data, args.max_chars)}")
        finally:
            stopping.set()
            client.close()
    if args.count is not None and count < args.count and stop.timed_out():
        raise CommandError(f"{count} of {args.count} values within {args.duration} s")
    return EXIT_OK


# -- bench ------------------------------------------------------------------------------------

_PROGRESS = re.compile(r"^\[\s*(\d+)/(\d+)\]\s*(.*)$")


def _bench_root(given: Optional[str]) -> Path:
    if given:
        path = Path(given).resolve()
        for candidate in (path, path.parent):
            if (candidate / "bench" / "__main__.py").is_file():
                return candidate
        raise CommandError(f"no benchmark suite (bench/__main__.py) in {given}")
    for candidate in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (candidate / "bench" / "__main__.py").is_file():
            return candidate
    raise CommandError(
        "the benchmark suite (bench/) ships with the source repository, not the installed "
        "package: run this in a clone (pip install -e .) or pass --bench-dir"
    )


class _Progress:
    """A progress bar on standard error: redrawn in place on a terminal, else one line a step."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.drawn = False

    def step(self, done: int, total: int, text: str, width: int = 24) -> None:
        filled = int(width * done / total) if total else width
        bar = "#" * filled + "-" * (width - filled)
        line = f"[{bar}] {done:>{len(str(total))}}/{total}  {text}"
        if self.tty:
            columns = shutil.get_terminal_size((100, 20)).columns
            sys.stderr.write("\r" + line[: columns - 1] + "\x1b[K")
            self.drawn = True
            if done >= total:  # the suite prints its table next, on stdout
                self.finish()
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def message(self, text: str) -> None:
        self.finish()
        sys.stderr.write(text if text.endswith("\n") else text + "\n")
        sys.stderr.flush()

    def finish(self) -> None:
        if self.drawn:
            sys.stderr.write("\n")
            self.drawn = False


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the benchmark suite (``python -m bench``) with a progress bar."""
    root = _bench_root(args.bench_dir)
    cmd = [sys.executable, "-m", "bench"]
    if args.quick:
        cmd.append("--quick")
    if args.list:
        cmd.append("--list")
    for flag, value in (
        ("--runs", args.runs),
        ("--only", args.only),
        ("--libs", args.libs),
        ("--scale", args.scale),
        ("--out", os.path.abspath(args.out) if args.out else None),
    ):
        if value is not None:
            cmd += [flag, str(value)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(root), env.get("PYTHONPATH")) if x)
    sys.stdout.flush()
    proc = subprocess.Popen(
        cmd, cwd=root, env=env, stderr=subprocess.PIPE, text=True, errors="replace"
    )
    progress = _Progress()
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            m = _PROGRESS.match(line.rstrip("\n"))
            if m:
                progress.step(int(m.group(1)), int(m.group(2)), " ".join(m.group(3).split()))
            elif args.verbose or not line.startswith(("== ", "bench: quick", "bench: full")):
                progress.message(line)
        code = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            proc.kill()
            proc.wait()
        progress.finish()
        return EXIT_INTERRUPTED
    progress.finish()
    return code


# -- parser -----------------------------------------------------------------------------------


class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``socketengine`` command."""
    parser = argparse.ArgumentParser(
        prog="socketengine",
        description="Named channels between Python processes: run a host, send, watch, "
        "request, benchmark, and watch a host live in a browser.",
        epilog="Run 'socketengine COMMAND --help' for a command's options.  Exit status: "
        "0 success, 1 error, 2 usage error, 130 interrupted.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"socketengine {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help: str, description: str, epilog: str = "") -> Any:
        p = sub.add_parser(
            name,
            help=help,
            description=description,
            epilog=epilog,
            formatter_class=_Formatter,
        )
        _add_common(p)
        p.set_defaults(parser=p)
        return p

    p = command(
        "demo",
        "run a host and a client on loopback exchanging data",
        "Run a host and a client on 127.0.0.1 that exchange values and an image.",
    )
    p.add_argument("--port", type=_port, default=0, help="port for the demo host (0 = any free)")
    p.set_defaults(func=cmd_demo)

    p = command(
        "host",
        "run a host and print every message",
        "Run a host and print every message as it arrives: time, client "
        "(name@address), channel and a short rendering of the value.  Runs until "
        "Ctrl-C or SIGTERM (exit 0).",
        "examples:\n  socketengine host --port 8080\n"
        "  socketengine host --json | jq .value\n"
        "  socketengine host --monitor 8000      # and the browser monitor",
    )
    _add_host_options(p)
    _add_output_options(p)
    p.add_argument(
        "--monitor",
        type=_port,
        metavar="PORT",
        default=None,
        help="also serve the browser monitor on this port",
    )
    _add_monitor_options(p)
    p.set_defaults(func=cmd_host)

    p = command(
        "monitor",
        "run a host with the live browser monitor",
        "Run a host and serve the live browser monitor: its clients, every channel's "
        "latest value and every image channel as live video.  Prints the page's "
        "address; runs until Ctrl-C or SIGTERM.",
        "example:\n  socketengine monitor --port 8080 --monitor 8000   # open the printed URL",
    )
    _add_host_options(p)
    p.add_argument(
        "--monitor",
        type=_port,
        metavar="PORT",
        default=8000,
        help="port of the monitor page (default 8000; 0: any)",
    )
    _add_monitor_options(p)
    p.add_argument("--print", action="store_true", help="also print messages, as 'host' does")
    _add_output_options(p)
    p.set_defaults(func=cmd_monitor)

    p = command(
        "send",
        "send one value to a host",
        "Connect to a host, send one value on CHANNEL, flush it and exit.",
        'examples:\n  socketengine send pose \'{"x": 1.5, "y": -0.2}\'\n'
        "  socketengine send note --raw 'hello world'\n"
        "  socketengine send image --file frame.png      # as a numpy image\n"
        "  socketengine send blob --file data.bin         # as bytes",
    )
    _add_value_options(p)
    _add_client_options(p)
    p.set_defaults(func=cmd_send)

    p = command(
        "watch",
        "print each value a host sends on channels",
        "Connect to a host as a client and print each new value it sends on the "
        "CHANNELs, or on every channel (what the host writes with write_all() or conn.write(), and "
        "retained values).  Runs until Ctrl-C, --count or --duration.",
        "example:\n  socketengine watch command config --name watcher",
    )
    p.add_argument(
        "channels", metavar="CHANNEL", nargs="*", help="channel names (none: every channel)"
    )
    _add_client_options(p)
    _add_output_options(p)
    p.add_argument("--count", type=_positive_int, help="exit after this many values")
    p.set_defaults(func=cmd_watch)

    p = command(
        "request",
        "send a request and print the reply",
        "Send VALUE as a request on CHANNEL and print the host's reply as JSON (the "
        "return value of its on(CHANNEL) callback).  An error reply, no handler or no "
        "reply within --timeout exits 1.",
        "example:\n  socketengine request add '[1, 2, 3]'",
    )
    _add_value_options(p)
    _add_client_options(p)
    p.set_defaults(func=cmd_request)

    p = command(
        "bench",
        "run the benchmark suite",
        "Run the benchmark suite (bench/ in the source repository) with a progress bar, "
        "then print the table.  Full suite: about 2 minutes on 2 cores, results in docs/.",
        "examples:\n  socketengine bench --quick\n"
        "  socketengine bench --only small,images --runs 3",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 runs: a smoke test")
    p.add_argument("--runs", type=_positive_int, help="runs per figure (default 5; quick 2)")
    p.add_argument("--only", metavar="LIST", help="comma-separated workloads (see --list)")
    p.add_argument("--libs", metavar="LIST", help="comma-separated libraries")
    p.add_argument("--scale", type=float, help="multiply every message count by this")
    p.add_argument("--out", metavar="DIR", help="directory for the JSON results and the chart")
    p.add_argument("--list", action="store_true", help="list the workloads and exit")
    p.add_argument(
        "--bench-dir",
        metavar="DIR",
        help="the repository holding bench/ (default: the current directory or the "
        "checkout socketengine is installed from)",
    )
    p.set_defaults(func=cmd_bench)
    return parser


def _add_output_options(p: argparse.ArgumentParser) -> None:
    o = p.add_argument_group("output")
    o.add_argument(
        "--json",
        action="store_true",
        help='one JSON object per line (bytes as {"$bytes": base64}, arrays as '
        '{"$ndarray": shape, "dtype": ..., "data": ...})',
    )
    o.add_argument(
        "--max-chars",
        type=_positive_int,
        default=120,
        metavar="N",
        help="cut renderings of values to N characters (default 120)",
    )
    o.add_argument(
        "--duration", type=_seconds, metavar="SECONDS", help="stop after this many seconds"
    )


def _add_monitor_options(p: argparse.ArgumentParser) -> None:
    m = p.add_argument_group("monitor")
    m.add_argument(
        "--monitor-addr",
        default="127.0.0.1",
        help="address the monitor listens on (default %(default)s: this machine only)",
    )
    m.add_argument(
        "--bgr", action="store_true", help="the images are BGR (OpenCV): show them as RGB"
    )


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, OSError) and exc.strerror and len(exc.args) == 2:
        text = exc.strerror + (f": {exc.filename}" if exc.filename else "")  # no "[Errno 98]"
    text = " ".join(text.split())
    return text or type(exc).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; return the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(list(argv) if argv is not None else None)
    if (
        extra
        and len(extra) == 1
        and getattr(args, "value", "") is None
        and getattr(args, "file", None) is None
        and not extra[0].startswith("-")
    ):
        # argparse fills CHANNEL [VALUE] at the first positional: 'send ch --raw text'
        # leaves VALUE empty and 'text' over; it is VALUE.
        args.value, extra = extra[0], []
    if extra:
        args.parser.error(f"unrecognized arguments: {' '.join(extra)}")
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")
    long_running = args.command in ("host", "monitor", "watch")
    level = {0: logging.WARNING if long_running else logging.ERROR, 1: logging.INFO}
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("socketengine: %(message)s"))
    saved = (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(level.get(args.verbose, logging.DEBUG))
    logger.propagate = False
    try:
        return int(args.func(args))
    except UsageError as exc:
        print(f"socketengine {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("socketengine: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (CommandError, SocketEngineError, OSError, TimeoutError, ValueError, TypeError) as exc:
        if args.verbose >= 2:
            raise
        print(f"socketengine {args.command}: {_one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
