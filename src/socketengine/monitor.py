"""A live browser monitor for a :class:`~socketengine.Host`.

``Monitor(host, port=8000).start()`` serves one static page (``monitor_page.html``,
no build step, no external resources) and three small endpoints the page uses:

* ``GET /api/state`` -- a JSON snapshot: the host, its connected clients (name,
  address, since when, bytes and messages in/out) and every channel's latest value
  per client, rendered as short text (arrays as shape/dtype);
* ``GET /events`` -- Server-Sent Events: ``state`` (the snapshot, at most 4 times a
  second, only when it changed) and ``frames`` (the newest frame number of every
  image channel, checked 30 times a second);
* ``GET /frame?s=SESSION&c=CHANNEL`` -- the *newest* frame of an image channel,
  encoded when asked (JPEG with Pillow, PNG from the standard library otherwise).

The page fetches a frame only when a newer one exists and only after it has drawn the
previous one, so a slow browser skips frames instead of piling them up, and the host
never encodes a frame nobody asked for.

Design: the HTTP server is a small HTTP/1.1 implementation on :mod:`asyncio` running
in **one** daemon thread (``socketengine-monitor``), plus at most one encoder thread;
the number of threads does not grow with the number of browsers (connections are
capped at :data:`MAX_CONNECTIONS`).  The standard library's ``http.server`` would need
a thread per connection, and every open page holds a long-lived event stream.  It reads
the host through its public API only (``clients()``, ``Connection.values`` and the
connection counters), from its own thread.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import http
import io
import ipaddress
import json
import logging
import math
import re
import socket
import ssl
import struct
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, Union
from urllib.parse import parse_qs, urlsplit

logger = logging.getLogger("socketengine")

#: Most HTTP connections served at once; more are answered 503 and closed.
MAX_CONNECTIONS = 64
#: Largest request head (request line and headers), bytes.
MAX_HEAD = 16 * 1024
#: Largest request body (only ``POST /login`` has one), bytes.
MAX_BODY = 4096
#: Seconds an idle keep-alive connection stays open.
IDLE_TIMEOUT = 30.0
#: Seconds a response may take to drain to a browser before the connection is dropped.
WRITE_TIMEOUT = 10.0
#: Seconds between two ``state`` events (at most).
STATE_INTERVAL = 0.25
#: Seconds between two checks for new image frames.
FRAME_INTERVAL = 1.0 / 30.0
#: Seconds between keep-alive comments on an idle event stream.
KEEPALIVE_INTERVAL = 15.0
#: Clients and channels per client listed in a snapshot (the rest are counted).
MAX_CLIENTS_SHOWN = 200
MAX_CHANNELS_SHOWN = 100
#: Characters of a rendered value in a snapshot.
VALUE_TEXT_LIMIT = 160

_COOKIE = "socketengine_monitor"
_COOKIE_LABEL = b"socketengine monitor cookie v1"
_LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}

# -- rendering values -------------------------------------------------------------------


class _Full(Exception):
    """The text budget of :func:`describe` is spent."""


def _numpy() -> Any:
    # numpy arrays only exist if numpy was imported (the codec imports it to decode
    # them), so this never imports numpy itself.
    return sys.modules.get("numpy")


def _shape_text(shape: Tuple[int, ...]) -> str:
    return "x".join(str(n) for n in shape) if shape else "scalar"


def describe(value: Any, limit: int = 80) -> str:
    """A short, single-line, JSON-like rendering of ``value``, at most ``limit`` chars.

    Strings are quoted and escaped (control characters never reach a terminal), arrays
    show shape and dtype (``<ndarray 480x640x3 uint8>``), bytes their length, long
    texts are cut with ``…``.  The work done is bounded by ``limit``, whatever the
    size of the value.
    """
    limit = max(int(limit), 8)
    if isinstance(value, str) and len(value) > limit:
        tail = f"… ({len(value)} chars)"
        room = max(limit - len(tail) - 1, 2)
        head = json.dumps(value[:room], ensure_ascii=False)[:-1][:room]
        escape = head.rfind("\\", max(1, len(head) - 6))
        if escape > 0:  # never end inside an escape sequence
            head = head[:escape]
        return head + '"' + tail
    parts: List[str] = []
    size = 0

    def emit(text: str) -> None:
        nonlocal size
        parts.append(text)
        size += len(text)
        if size > limit:
            raise _Full

    try:
        _walk(value, emit, limit, 0)
    except _Full:
        return "".join(parts)[: limit - 1] + "…"
    return "".join(parts)


def _walk(value: Any, emit: Callable[[str], None], limit: int, depth: int) -> None:
    if value is None:
        emit("null")
    elif isinstance(value, bool):
        emit("true" if value else "false")
    elif isinstance(value, int):
        emit(str(value) if value.bit_length() <= 256 else f"<int of {value.bit_length()} bits>")
    elif isinstance(value, float):
        emit(repr(value) if math.isfinite(value) else str(value))
    elif isinstance(value, str):
        emit(json.dumps(value[: limit + 1], ensure_ascii=False))
    elif isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value[:8])
        more = "…" if len(value) > 8 else ""
        emit(f"<{len(value)} bytes{' ' + data.hex() + more if data else ''}>")
    elif depth > 8:
        emit("…")
    elif isinstance(value, (list, tuple)):
        emit("[" if isinstance(value, list) else "(")
        for i, item in enumerate(value):
            if i:
                emit(", ")
            _walk(item, emit, limit, depth + 1)
        emit("]" if isinstance(value, list) else ")")
    elif isinstance(value, dict):
        emit("{")
        for i, (key, item) in enumerate(value.items()):
            if i:
                emit(", ")
            _walk(key, emit, limit, depth + 1)
            emit(": ")
            _walk(item, emit, limit, depth + 1)
        emit("}")
    else:
        np = _numpy()
        encoded = _encoded(value)
        if encoded is not None:
            codec, shape, dtype = encoded
            size = getattr(value, "nbytes", "?")
            emit(f"<{codec} {_shape_text(shape)} {dtype.lstrip('|<>=')}, {size} bytes>")
        elif np is not None and isinstance(value, np.ndarray):
            text = f"<ndarray {_shape_text(value.shape)} {value.dtype}"
            if 0 < value.size <= 8 and value.dtype.kind in "biuf":
                emit(text + " ")
                _walk(value.ravel().tolist(), emit, limit, depth + 1)
                emit(">")
            else:
                emit(text + ">")
        elif np is not None and isinstance(value, np.generic):
            _walk(value.item(), emit, limit, depth + 1)
        else:
            emit(f"<{type(value).__name__}>")


def _encoded(value: Any) -> Optional[Tuple[str, Tuple[int, ...], str]]:
    """``(codec, shape, dtype)`` of a still-compressed image (``EncodedImage``), or None.

    Duck-typed, so the monitor needs nothing from the image module but its attributes.
    """
    if type(value).__name__ != "EncodedImage":
        return None
    codec = getattr(value, "codec", None)
    shape = getattr(value, "shape", None)
    if codec not in ("jpeg", "png") or not isinstance(shape, tuple) or len(shape) not in (2, 3):
        return None
    return codec, shape, str(getattr(value, "dtype", ""))


def image_shape(value: Any) -> Optional[Tuple[int, int, int]]:
    """``(height, width, channels)`` if ``value`` is an image the monitor shows, else None.

    Images are numpy ``uint8`` arrays of shape ``(H, W)`` or ``(H, W, 1|3|4)``, and
    8-bit JPEG/PNG images received still compressed (``EncodedImage``).
    """
    encoded = _encoded(value)
    if encoded is not None:
        _, shape, dtype = encoded
        if dtype not in ("|u1", "u1", "uint8"):
            return None
        return int(shape[0]), int(shape[1]), int(shape[2]) if len(shape) == 3 else 1
    np = _numpy()
    if np is None or not isinstance(value, np.ndarray) or value.dtype != np.uint8:
        return None
    if value.ndim == 2:
        h, w = value.shape
        c = 1
    elif value.ndim == 3 and value.shape[2] in (1, 3, 4):
        h, w, c = value.shape
    else:
        return None
    if h < 1 or w < 1:
        return None
    return int(h), int(w), int(c)


# -- encoding frames --------------------------------------------------------------------

_PIL: Any = None


def _pillow() -> Any:
    """Pillow's ``Image`` module, or ``False`` if it is not installed (checked once)."""
    global _PIL
    if _PIL is None:
        try:
            from PIL import Image

            _PIL = Image
        except ImportError:
            _PIL = False
    return _PIL


def encode_png(img: Any) -> bytes:
    """A PNG of a ``uint8`` image ``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)`` (stdlib only)."""
    np = _numpy()
    h, w = img.shape[:2]
    channels = 1 if img.ndim == 2 else img.shape[2]
    color = {1: 0, 3: 2, 4: 6}[channels]
    raw = np.zeros((h, w * channels + 1), dtype=np.uint8)  # filter byte 0 on each row
    raw[:, 1:] = img.reshape(h, w * channels)

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw.tobytes(), 1))
        + chunk(b"IEND", b"")
    )


def encode_image(
    img: Any,
    max_width: Optional[int] = 1280,
    bgr: bool = False,
    image_format: str = "auto",
    quality: int = 80,
) -> Tuple[bytes, str]:
    """Encode an image (see :func:`image_shape`) for the browser; return (bytes, type).

    Wider than ``max_width`` pixels, it is reduced by an integer step first.  ``bgr``
    swaps OpenCV's channel order.  ``image_format``: ``"jpeg"`` (needs Pillow),
    ``"png"``, or ``"auto"`` = JPEG when Pillow is installed, PNG otherwise.  An image
    received still compressed (``EncodedImage``) is served as the sender's file.
    """
    encoded = _encoded(img)
    if encoded is not None:
        return img.tobytes(), "image/jpeg" if encoded[0] == "jpeg" else "image/png"
    np = _numpy()
    a = img
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if max_width and a.shape[1] > max_width:
        step = -(-a.shape[1] // max_width)
        a = a[::step, ::step]
    if bgr and a.ndim == 3:
        a = a[:, :, [2, 1, 0, 3][: a.shape[2]]]
    a = np.ascontiguousarray(a)
    pil = _pillow()
    if image_format == "png" or (image_format == "auto" and not pil):
        return encode_png(a), "image/png"
    if not pil:
        raise RuntimeError("JPEG frames need Pillow: pip install 'socket.engine[monitor]'")
    picture = pil.fromarray(a)
    if picture.mode == "RGBA":
        picture = picture.convert("RGB")
    buf = io.BytesIO()
    picture.save(buf, "JPEG", quality=quality)
    return buf.getvalue(), "image/jpeg"


# -- the page -----------------------------------------------------------------------------


def _load_page() -> Tuple[bytes, str]:
    """The static page and a Content-Security-Policy allowing exactly its inline code."""
    page = resources.files(__package__).joinpath("monitor_page.html").read_text("utf-8")

    def hashes(tag: str) -> str:
        found = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.S)
        return " ".join(
            "'sha256-" + base64.b64encode(hashlib.sha256(s.encode()).digest()).decode() + "'"
            for s in found
        )

    csp = (
        "default-src 'none'; "
        f"script-src {hashes('script')}; style-src {hashes('style')}; "
        "img-src 'self' blob: data:; connect-src 'self'; form-action 'self'; "
        "base-uri 'none'; frame-ancestors 'none'"
    )
    return page.encode("utf-8"), csp


# -- HTTP plumbing ------------------------------------------------------------------------


class _HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Request:
    __slots__ = ("method", "path", "query", "headers", "body", "keep_alive")

    def __init__(
        self,
        method: str,
        path: str,
        query: Dict[str, List[str]],
        headers: Dict[str, str],
        body: bytes,
        keep_alive: bool,
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive

    def arg(self, name: str) -> Optional[str]:
        values = self.query.get(name)
        return values[0] if values else None


class _Entry:
    """What the monitor knows of one (client, channel): the value it saw last."""

    __slots__ = ("value", "seq", "changed", "text", "image")

    def __init__(self) -> None:
        self.value: Any = _Entry
        self.seq = 0
        self.changed = 0.0
        self.text = ""
        self.image: Optional[Tuple[int, int, int]] = None


def _format_address(address: Any) -> str:
    try:
        host, port = address[0], address[1]
    except (TypeError, IndexError):
        return str(address)
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def _is_loopback(addr: str) -> bool:
    if addr in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


def _bind(addr: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(
            addr or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, kind, proto, _, sockaddr = infos[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot serve the monitor on {addr}:{port}: {exc}") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(64)
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        raise OSError(exc.errno, f"cannot serve the monitor on {addr}:{port}: {reason}") from exc
    sock.setblocking(False)
    return sock


_HOST_TOKEN: Any = object()


class Monitor:
    """Serve a live page showing ``host``'s clients, values and images.

    :param host: the :class:`~socketengine.Host` to show (read through its public API).
    :param port: TCP port; ``0`` picks a free one (the real one is :attr:`port`).
    :param addr: address to listen on; ``127.0.0.1`` (default) serves this machine only.
    :param token: the secret a browser must present; by default the host's ``token=``
        (none if the host has none).  A browser presents it once (``?token=`` or the
        page's form) and then holds a cookie derived from it (``HttpOnly``,
        ``SameSite=Strict``); scripts may send ``Authorization: Bearer TOKEN``.
    :param tls: an ``ssl.SSLContext`` (server side) to serve HTTPS.
    :param max_width: frames wider than this are reduced (integer step) before encoding.
    :param bgr: the images are BGR (OpenCV): swap to RGB for display.
    :param image_format: ``"auto"`` (JPEG with Pillow, else PNG), ``"jpeg"`` or ``"png"``.
    """

    def __init__(
        self,
        host: Any,
        port: int = 8000,
        addr: str = "127.0.0.1",
        *,
        token: Union[str, bytes, None, Any] = _HOST_TOKEN,
        tls: Optional[ssl.SSLContext] = None,
        max_width: Optional[int] = 1280,
        bgr: bool = False,
        image_format: str = "auto",
    ) -> None:
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port must be an int from 0 to 65535, not {port!r}")
        if image_format not in ("auto", "jpeg", "png"):
            raise ValueError(f"image_format must be 'auto', 'jpeg' or 'png', not {image_format!r}")
        if image_format == "jpeg" and not _pillow():
            raise RuntimeError("JPEG frames need Pillow: pip install 'socket.engine[monitor]'")
        if token is _HOST_TOKEN:
            token = getattr(host, "_token", None)
        if isinstance(token, str):
            token = token.encode("utf-8")
        if token is not None and not (isinstance(token, bytes) and token):
            raise TypeError("token must be a non-empty str or bytes, or None")
        self.host = host
        self.addr = addr
        self._port = port
        self.tls = tls
        self.max_width = max_width
        self.bgr = bgr
        self.image_format = image_format
        self._token: Optional[bytes] = token
        self._cookie = hmac.new(token, _COOKIE_LABEL, hashlib.sha256).hexdigest() if token else None
        self._loopback_only = _is_loopback(addr)
        self._page, self._csp = _load_page()
        self._lock = threading.Lock()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._server: Optional[asyncio.AbstractServer] = None
        self._executor: Optional[ThreadPoolExecutor] = None
        self._closed = False
        # Loop-thread state.
        self._tasks: Set[asyncio.Task] = set()
        self._entries: Dict[Tuple[int, str], _Entry] = {}
        self._encoded: Dict[Tuple[int, str], Tuple[int, asyncio.Future]] = {}
        self._image_keys: List[Tuple[Any, int, str]] = []
        self._state_json = ""
        self._state_version = 0
        self._frames_json = ""
        self._frames_version = 0
        self._subscribers = 0
        self._ticker: Optional[asyncio.Task] = None
        self._changed: Optional[asyncio.Event] = None
        self._notified_at = 0.0
        self._writers: Set[asyncio.StreamWriter] = set()
        self._stopping = False

    # -- lifecycle ------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The TCP port (the real one once started, when constructed with ``port=0``)."""
        return self._port

    @property
    def url(self) -> str:
        """The page's address (for a wildcard address, the loopback one)."""
        host = self.addr
        if host in ("", "0.0.0.0"):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"{'https' if self.tls else 'http'}://{host}:{self._port}/"

    def start(self) -> Monitor:
        """Bind, listen and serve from a daemon thread; return ``self``.  Idempotent.

        Raises ``OSError`` naming ``addr:port`` if it cannot bind.
        """
        with self._lock:
            if self._closed:
                raise RuntimeError("this monitor is closed; create a new one")
            if self._thread is not None:
                return self
            sock = _bind(self.addr, self._port)
            self._port = int(sock.getsockname()[1])
            loop = asyncio.new_event_loop()
            started = threading.Event()
            failure: List[BaseException] = []
            thread = threading.Thread(
                target=self._run,
                args=(loop, sock, started, failure),
                name="socketengine-monitor",
                daemon=True,
            )
            thread.start()
            started.wait(10.0)
            if failure or not started.is_set():
                thread.join(5.0)
                sock.close()
                raise OSError(f"the monitor on {self.addr}:{self._port} did not start: {failure}")
            self._loop, self._thread = loop, thread
        if self._token is None and not self._loopback_only:
            logger.warning(
                "monitor on %s:%s has no token: anyone who can reach it sees every value",
                self.addr,
                self._port,
            )
        logger.info("monitor: serving %s", self.url)
        return self

    def _run(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        started: threading.Event,
        failure: List[BaseException],
    ) -> None:
        asyncio.set_event_loop(loop)
        try:
            kwargs: Dict[str, Any] = {"sock": sock, "limit": MAX_HEAD}
            if self.tls is not None:
                kwargs.update(ssl=self.tls, ssl_handshake_timeout=10.0)
            self._server = loop.run_until_complete(asyncio.start_server(self._serve, **kwargs))
            self._changed = asyncio.Event()
        except BaseException as exc:  # pragma: no cover - reported by start()
            failure.append(exc)
            started.set()
            loop.close()
            return
        started.set()
        try:
            loop.run_forever()
        finally:
            # Let cancelled handlers and closing transports finish, then close.
            loop.run_until_complete(asyncio.sleep(0.01))
            loop.close()

    def close(self, timeout: float = 5.0) -> None:
        """Stop serving, close every browser connection and join the thread.  Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout)
        except Exception as exc:  # pragma: no cover - best effort
            logger.warning("monitor: unclean shutdown: %s", exc)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        logger.info("monitor: closed %s", self.url)

    async def _shutdown(self) -> None:
        # The flag ends every loop even where Python 3.11's wait_for() swallows a
        # cancellation; whatever is still open after that is aborted.
        self._stopping = True
        self._notify()
        if self._server is not None:
            self._server.close()
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        if self._ticker is not None:
            tasks.append(self._ticker)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
        for writer in list(self._writers):
            writer.transport.abort()

    def __enter__(self) -> Monitor:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("serving" if self._thread else "not started")
        return f"<Monitor {self.url} {state}>"

    # -- host state (loop thread) ----------------------------------------------------

    def _track(self, key: Tuple[int, str], value: Any, now: float) -> _Entry:
        """The entry for ``key``, updated if ``value`` is not the object seen last."""
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry()
        if entry.value is not value:
            entry.value = value
            entry.seq += 1
            entry.changed = now
            entry.text = describe(value, VALUE_TEXT_LIMIT)
            entry.image = image_shape(value)
        return entry

    def _host_info(self) -> Dict[str, Any]:
        host = self.host
        return {
            "addr": getattr(host, "addr", None),
            "port": getattr(host, "port", None),
            "tls": getattr(host, "tls", None) is not None,
            "token": getattr(host, "_token", None) is not None,
            "open": bool(getattr(host, "opened", False)),
            "closed": bool(getattr(host, "stopped", False)),
        }

    def _snapshot(self) -> Dict[str, Any]:
        """Scan the host: clients, their values and image channels (loop thread)."""
        now = time.time()
        conns = list(self.host.clients())
        clients = []
        images = []
        image_keys = []
        seen: Set[Tuple[int, str]] = set()
        for conn in conns[:MAX_CLIENTS_SHOWN]:
            session = int(getattr(conn, "session", id(conn)))
            values = conn.values.copy()
            channels = []
            for n, (channel, value) in enumerate(values.items()):
                if n >= MAX_CHANNELS_SHOWN:
                    break
                key = (session, channel)
                seen.add(key)
                entry = self._track(key, value, now)
                item: Dict[str, Any] = {
                    "name": channel,
                    "text": entry.text,
                    "seq": entry.seq,
                    "changed": round(entry.changed, 3),
                }
                if entry.image is not None:
                    h, w, c = entry.image
                    item["image"] = [h, w, c]
                    images.append(
                        {
                            "session": session,
                            "client": conn.name,
                            "channel": channel,
                            "shape": [h, w, c],
                            "seq": entry.seq,
                        }
                    )
                    image_keys.append((conn, session, channel))
                channels.append(item)
            clients.append(
                {
                    "session": session,
                    "name": conn.name,
                    "address": _format_address(conn.address),
                    "since": round(float(conn.connected_at), 3),
                    "bytes_in": conn.bytes_in,
                    "bytes_out": conn.bytes_out,
                    "messages_in": conn.messages_in,
                    "messages_out": conn.messages_out,
                    "channels": channels,
                    "more_channels": max(0, len(values) - MAX_CHANNELS_SHOWN),
                }
            )
        for key in [k for k in self._entries if k not in seen]:
            del self._entries[key]
            self._encoded.pop(key, None)
        self._image_keys = image_keys
        return {
            "host": self._host_info(),
            "clients": clients,
            "more_clients": max(0, len(conns) - MAX_CLIENTS_SHOWN),
            "images": images,
        }

    def _frames(self) -> List[List[Any]]:
        """The newest frame number of every known image channel (loop thread)."""
        now = time.time()
        out = []
        for conn, session, channel in self._image_keys:
            value = conn.values.get(channel)
            if image_shape(value) is None:
                continue
            entry = self._track((session, channel), value, now)
            out.append([session, channel, entry.seq])
        return out

    def _notify(self) -> None:
        self._notified_at = time.monotonic()
        changed = self._changed
        self._changed = asyncio.Event()
        if changed is not None:
            changed.set()

    def _refresh(self, full: bool) -> None:
        """Recompute the snapshot (``full``) or just the frame numbers; notify on change."""
        changed = False
        if full:
            state = json.dumps(self._snapshot(), separators=(",", ":"))
            if state != self._state_json:
                self._state_json = state
                self._state_version += 1
                changed = True
        frames = json.dumps(self._frames(), separators=(",", ":"))
        if frames != self._frames_json:
            self._frames_json = frames
            self._frames_version += 1
            changed = True
        if changed:
            self._notify()

    async def _tick(self) -> None:
        """Refresh while a page listens: frames 30 times a second, the rest 4 times."""
        next_full = 0.0
        while self._subscribers > 0 and not self._stopping:
            now = time.monotonic()
            full = now >= next_full
            if full:
                next_full = now + STATE_INTERVAL
            try:
                self._refresh(full)
            except Exception:  # pragma: no cover - a bug must not stop the monitor
                logger.exception("monitor: refreshing the state failed")
            if time.monotonic() - self._notified_at >= KEEPALIVE_INTERVAL:
                self._notify()  # wakes idle streams to send a keep-alive comment
            await asyncio.sleep(FRAME_INTERVAL)

    # -- HTTP (loop thread) ------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if len(self._tasks) >= MAX_CONNECTIONS or task is None:
            # Busy.  Read the request first (briefly): closing with unread data would
            # reset the connection before the browser reads the answer.
            try:
                await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2.0)
                writer.write(self._head(503, {"Content-Length": "0"}, keep_alive=False))
                await asyncio.wait_for(writer.drain(), 2.0)
            except (asyncio.TimeoutError, asyncio.CancelledError, OSError, ValueError, EOFError):
                pass
            finally:
                writer.close()
            return
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            transport = writer.transport
            if hasattr(transport, "set_write_buffer_limits"):
                transport.set_write_buffer_limits(high=64 * 1024)
            while not self._stopping:
                try:
                    request = await asyncio.wait_for(self._read_request(reader), IDLE_TIMEOUT)
                except _HTTPError as exc:
                    await self._reply(writer, exc.status, str(exc).encode(), keep_alive=False)
                    return
                if request is None:
                    return
                if not await self._handle(request, writer):
                    return
        except (asyncio.TimeoutError, ConnectionError, OSError, asyncio.IncompleteReadError):
            return
        except asyncio.CancelledError:
            # Shutting down.  Ending normally also spares Python 3.11's stream callback,
            # which logs cancelled handlers as errors.
            return
        finally:
            self._tasks.discard(task)
            self._writers.discard(writer)
            writer.close()

    async def _read_request(self, reader: asyncio.StreamReader) -> Optional[_Request]:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial.strip():
                raise _HTTPError(400, "incomplete request") from None
            return None
        except asyncio.LimitOverrunError:
            raise _HTTPError(431, "request header too large") from None
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _HTTPError(400, "bad request line")
        method, target, version = parts
        headers: Dict[str, str] = {}
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep:
                raise _HTTPError(400, "bad header line")
            headers[name.strip().lower()] = value.strip()
        if "transfer-encoding" in headers:
            raise _HTTPError(501, "chunked requests are not supported")
        try:
            length = int(headers.get("content-length", "0") or "0")
        except ValueError:
            raise _HTTPError(400, "bad Content-Length") from None
        if length < 0 or length > MAX_BODY:
            raise _HTTPError(413, "request body too large")
        body = await reader.readexactly(length) if length else b""
        connection = headers.get("connection", "").lower()
        keep = "close" not in connection and (version == "HTTP/1.1" or "keep-alive" in connection)
        url = urlsplit(target)
        query = parse_qs(url.query, max_num_fields=16)
        return _Request(method, url.path or "/", query, headers, body, keep)

    def _head(self, status: int, headers: Dict[str, str], keep_alive: bool) -> bytes:
        lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}"]
        base = {
            "Server": "socketengine-monitor",
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "X-Frame-Options": "DENY",
            "Connection": "keep-alive" if keep_alive else "close",
        }
        base.update(headers)
        lines.extend(f"{k}: {v}" for k, v in base.items())
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _reply(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes = b"",
        content_type: str = "text/plain; charset=utf-8",
        headers: Optional[Dict[str, str]] = None,
        keep_alive: bool = True,
        head_only: bool = False,
    ) -> bool:
        extra = {"Content-Type": content_type, "Content-Length": str(len(body))}
        extra.update(headers or {})
        writer.write(self._head(status, extra, keep_alive))
        if not head_only and body:
            writer.write(body)
        await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)
        return keep_alive

    def _authorized(self, request: _Request) -> bool:
        if self._token is None:
            return True
        auth = request.headers.get("authorization", "")
        if auth[:7].lower() == "bearer " and self._check_token(auth[7:].strip()):
            return True
        for item in request.headers.get("cookie", "").split(";"):
            name, _, value = item.strip().partition("=")
            if name == _COOKIE and self._cookie is not None:
                if hmac.compare_digest(value.encode("latin-1"), self._cookie.encode()):
                    return True
        given = request.arg("token")
        return given is not None and self._check_token(given)

    def _check_token(self, given: str) -> bool:
        if self._token is None:
            return True
        try:
            candidate = given.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return hmac.compare_digest(candidate, self._token)

    def _cookie_header(self) -> Dict[str, str]:
        return {"Set-Cookie": f"{_COOKIE}={self._cookie}; Path=/; HttpOnly; SameSite=Strict"}

    def _host_allowed(self, request: _Request) -> bool:
        """Refuse foreign Host headers on a loopback monitor (DNS rebinding)."""
        if not self._loopback_only:
            return True
        value = request.headers.get("host", "")
        if value.startswith("["):
            name = value[1 : value.find("]")] if "]" in value else value
        else:
            name = value.rsplit(":", 1)[0] if value.count(":") == 1 else value
        return name.lower() in _LOOPBACK_NAMES or name == self.addr

    async def _handle(self, request: _Request, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; return whether the connection may serve another."""
        keep = request.keep_alive
        head_only = request.method == "HEAD"
        path = request.path
        logger.debug("monitor: %s %s", request.method, path)
        if not self._host_allowed(request):
            return await self._reply(writer, 403, b"unexpected Host header\n", keep_alive=False)
        if request.method == "POST" and path == "/login":
            form = parse_qs(request.body.decode("utf-8", "replace"), max_num_fields=4)
            given = form.get("token", [""])[0]
            if self._token is None or self._check_token(given):
                headers = self._cookie_header() if self._token else {}
                return await self._reply(writer, 204, headers=headers, keep_alive=keep)
            await asyncio.sleep(0.25)  # slows guessing (per connection; 64 at most)
            return await self._reply(writer, 401, b"wrong token\n", keep_alive=keep)
        if request.method not in ("GET", "HEAD"):
            return await self._reply(
                writer,
                405,
                b"method not allowed\n",
                headers={"Allow": "GET, HEAD"},
                keep_alive=keep,
            )
        if path in ("/", "/index.html"):
            if self._token is not None and request.arg("token") is not None:
                # Trade the token in the address for a cookie, and drop it from the URL.
                if self._check_token(request.arg("token") or ""):
                    headers = {"Location": "./", **self._cookie_header()}
                    return await self._reply(writer, 303, headers=headers, keep_alive=keep)
            return await self._reply(
                writer,
                200,
                self._page,
                "text/html; charset=utf-8",
                {"Content-Security-Policy": self._csp},
                keep,
                head_only,
            )
        if path == "/favicon.ico":
            return await self._reply(writer, 204, keep_alive=keep)
        if path not in ("/api/state", "/events", "/frame"):
            return await self._reply(writer, 404, b"not found\n", keep_alive=keep)
        if not self._authorized(request):
            return await self._reply(
                writer,
                401,
                b"this monitor needs the host's token\n",
                headers={"WWW-Authenticate": 'Bearer realm="socketengine monitor"'},
                keep_alive=keep,
            )
        if path == "/api/state":
            self._refresh(True)
            body = self._stamped_state()
            return await self._reply(writer, 200, body, "application/json", None, keep, head_only)
        if path == "/frame":
            return await self._frame(request, writer, keep, head_only)
        await self._events(writer, head_only)
        return False

    async def _frame(
        self, request: _Request, writer: asyncio.StreamWriter, keep: bool, head_only: bool
    ) -> bool:
        channel = request.arg("c")
        try:
            session = int(request.arg("s") or "")
        except ValueError:
            session = -1
        conn = None
        for candidate in self.host.clients():
            if int(getattr(candidate, "session", id(candidate))) == session:
                conn = candidate
                break
        value = conn.values.get(channel) if conn is not None and channel is not None else None
        if channel is None or image_shape(value) is None:
            return await self._reply(writer, 404, b"no such image\n", keep_alive=keep)
        key = (session, channel)
        entry = self._track(key, value, time.time())
        seq = entry.seq
        cached = self._encoded.get(key)
        if cached is None or cached[0] != seq:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="socketengine-monitor")
            loop = asyncio.get_running_loop()
            future = loop.run_in_executor(
                self._executor,
                encode_image,
                value,
                self.max_width,
                self.bgr,
                self.image_format,
            )
            cached = (seq, future)
            self._encoded[key] = cached
        try:
            body, content_type = await asyncio.shield(cached[1])
        except Exception as exc:
            logger.warning("monitor: cannot encode %r of %r: %s", channel, conn, exc)
            self._encoded.pop(key, None)
            return await self._reply(writer, 500, f"{exc}\n".encode(), keep_alive=keep)
        h, w, c = entry.image or (0, 0, 0)
        headers = {"X-Frame-Seq": str(seq), "X-Frame-Shape": f"{h}x{w}x{c}"}
        return await self._reply(writer, 200, body, content_type, headers, keep, head_only)

    def _stamped_state(self) -> bytes:
        """The current snapshot with the server's clock (for ages, whatever the skew)."""
        return b'{"now":%.3f,' % time.time() + self._state_json[1:].encode()

    async def _events(self, writer: asyncio.StreamWriter, head_only: bool) -> None:
        """A Server-Sent Events stream; each event is the newest state, sent once the
        previous one has drained (a slow page skips states, never queues them)."""
        headers = {"Content-Type": "text/event-stream; charset=utf-8", "X-Accel-Buffering": "no"}
        writer.write(self._head(200, headers, keep_alive=False))
        if head_only:
            await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)
            return
        self._subscribers += 1
        try:
            if self._ticker is None or self._ticker.done():
                self._refresh(True)
                self._ticker = asyncio.get_running_loop().create_task(self._tick())
            writer.write(b"retry: 1000\n\n")
            sent_state = sent_frames = -1
            while not self._stopping:
                changed = self._changed
                idle = True
                if sent_state != self._state_version:
                    sent_state = self._state_version
                    writer.write(b"event: state\ndata: " + self._stamped_state() + b"\n\n")
                    idle = False
                if sent_frames != self._frames_version:
                    sent_frames = self._frames_version
                    writer.write(b"event: frames\ndata: " + self._frames_json.encode() + b"\n\n")
                    idle = False
                if idle:
                    writer.write(b": keep-alive\n\n")  # also detects a browser that left
                await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)
                if changed is None:  # pragma: no cover
                    return
                await changed.wait()  # the ticker sets it on a change, at least every 15 s
        finally:
            self._subscribers -= 1
