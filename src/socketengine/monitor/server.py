"""The :class:`Monitor`: one asyncio thread serving the page, the state and the frames."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Set, Tuple, Union

from .auth import COOKIE_MAX_AGE, Gate
from .encode import encode_image, have_pillow
from .http import MAX_HEAD, HTTPConnection, HTTPError, Request
from .page import load_page
from .state import View

logger = logging.getLogger("socketengine")

__all__ = ["MAX_CONNECTIONS", "Monitor"]

#: Most HTTP connections served at once; more are answered 503 and closed.
MAX_CONNECTIONS = 64
#: Seconds an idle keep-alive connection stays open.
IDLE_TIMEOUT = 30.0
#: Seconds between two ``state`` events (at most).
STATE_INTERVAL = 0.25
#: Seconds between two checks for new image frames.
FRAME_INTERVAL = 1.0 / 30.0
#: Seconds between keep-alive comments on an idle event stream.
KEEPALIVE_INTERVAL = 15.0
#: Seconds a wrong token is answered late (per connection; slows guessing).
WRONG_TOKEN_DELAY = 0.25

_HOST_TOKEN: Any = object()


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


class Monitor:
    """Serve a live page showing ``host``'s clients, values and images.

    :param host: the host to show: a :class:`~socketengine.Host`, or anything with the
        small interface :mod:`socketengine.monitor.state` documents (``clients()``...).
    :param port: TCP port; ``0`` picks a free one (the real one is :attr:`port`).
    :param addr: address to listen on; ``127.0.0.1`` (default) serves this machine only.
    :param token: the secret a browser must present; by default the host's ``token=``
        (none if the host has none).  A browser presents it once (``?token=`` or the
        page's form) and then holds a cookie derived from it (``HttpOnly``,
        ``SameSite=Strict``, ``Secure`` over TLS) for ``cookie_max_age`` seconds;
        scripts may send ``Authorization: Bearer TOKEN``.
    :param tls: an ``ssl.SSLContext`` (server side) to serve HTTPS.
    :param max_width: frames wider than this are reduced (integer step) before encoding.
    :param bgr: raw image arrays are in OpenCV's BGR order: swap to RGB for display.
        (Frames sent compressed, ``codec="jpeg"``/``"png"``, are already RGB.)
    :param image_format: ``"auto"`` (JPEG with Pillow, else PNG), ``"jpeg"`` or ``"png"``.
    :param cookie_max_age: seconds a login cookie is valid (default 12 hours).
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
        cookie_max_age: int = COOKIE_MAX_AGE,
    ) -> None:
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port must be an int from 0 to 65535, not {port!r}")
        if image_format not in ("auto", "jpeg", "png"):
            raise ValueError(f"image_format must be 'auto', 'jpeg' or 'png', not {image_format!r}")
        if image_format == "jpeg" and not have_pillow():
            raise RuntimeError("JPEG frames need Pillow: pip install 'socket.engine[monitor]'")
        if not isinstance(cookie_max_age, int) or cookie_max_age < 1:
            raise ValueError(f"cookie_max_age must be a positive int, not {cookie_max_age!r}")
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
        self.bgr = bool(bgr)
        self.image_format = image_format
        self._gate = Gate(token, addr, secure=tls is not None, max_age=cookie_max_age)
        self._page, self._csp = load_page()
        self._lock = threading.Lock()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._server: Optional[asyncio.AbstractServer] = None
        self._executor: Optional[ThreadPoolExecutor] = None
        self._closed = False
        # Loop-thread state.
        self._view = View(host)
        self._tasks: Set[asyncio.Task] = set()
        self._encoded: Dict[Tuple[int, str], Tuple[int, asyncio.Future]] = {}
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
        if self._gate.token is None and not self._gate.loopback_only:
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
            doc, gone = self._view.snapshot()
            for key in gone:
                self._encoded.pop(key, None)
            state = json.dumps(doc, separators=(",", ":"))
            if state != self._state_json:
                self._state_json = state
                self._state_version += 1
                changed = True
        frames = json.dumps(self._view.frames(), separators=(",", ":"))
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

    def _stamped_state(self) -> bytes:
        """The current snapshot with the server's clock (for ages, whatever the skew)."""
        return b'{"now":%.3f,' % time.time() + self._state_json[1:].encode()

    # -- HTTP (loop thread) ------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if len(self._tasks) >= MAX_CONNECTIONS or task is None:
            await self._busy(reader, writer)
            return
        self._tasks.add(task)
        self._writers.add(writer)
        http = HTTPConnection(reader, writer)
        try:
            transport = writer.transport
            if hasattr(transport, "set_write_buffer_limits"):
                transport.set_write_buffer_limits(high=64 * 1024)
            while not self._stopping:
                try:
                    request = await asyncio.wait_for(http.read_request(), IDLE_TIMEOUT)
                except HTTPError as exc:
                    logger.debug("monitor: refused a request: %s %s", exc.status, exc)
                    await http.refuse(exc)
                    return
                if request is None:
                    return
                try:
                    keep = await self._handle(request, http)
                except HTTPError as exc:  # raised while answering (e.g. a bad form)
                    logger.debug("monitor: refused a request: %s %s", exc.status, exc)
                    await http.refuse(exc)
                    return
                if not keep:
                    return
        except (asyncio.TimeoutError, ConnectionError, OSError, asyncio.IncompleteReadError):
            return
        except asyncio.CancelledError:
            # Shutting down.  Ending normally also spares Python 3.11's stream callback,
            # which logs cancelled handlers as errors.
            return
        except Exception:  # a bug: say so once, answer 500, keep serving the others
            logger.exception("monitor: answering a request failed")
            try:
                await http.refuse(HTTPError(500, "the monitor failed; see its log"))
            except Exception:  # noqa: BLE001 - the connection is closed next anyway
                pass
        finally:
            self._tasks.discard(task)
            self._writers.discard(writer)
            writer.close()

    async def _busy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer 503 beyond :data:`MAX_CONNECTIONS`.  Read the request first (briefly):
        closing with unread data would reset the connection before the browser reads."""
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2.0)
            writer.write(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                b"Retry-After: 1\r\nConnection: close\r\n\r\n"
            )
            await asyncio.wait_for(writer.drain(), 2.0)
        except (asyncio.TimeoutError, asyncio.CancelledError, OSError, ValueError, EOFError):
            pass
        finally:
            writer.close()

    async def _handle(self, request: Request, http: HTTPConnection) -> bool:
        """Answer one request; return whether the connection may serve another."""
        head_only = request.method == "HEAD"
        path = request.path
        gate = self._gate
        logger.debug("monitor: %s %s", request.method, path)
        if not gate.host_allowed(request):
            return await http.respond(403, b"unexpected Host header\n", close=True)
        if request.method == "POST" and path == "/login":
            given = request.form().get("token", [""])[0]
            if gate.token is None or gate.check_token(given):
                headers = {"Set-Cookie": gate.cookie_header()} if gate.token else {}
                return await http.respond(204, headers=headers)
            await asyncio.sleep(WRONG_TOKEN_DELAY)
            return await http.respond(401, b"wrong token\n")
        if request.method not in ("GET", "HEAD"):
            return await http.respond(
                405, b"method not allowed\n", headers={"Allow": "GET, HEAD, POST"}
            )
        if path in ("/", "/index.html"):
            in_url = request.arg("token")
            if gate.token is not None and in_url is not None and gate.check_token(in_url):
                # Trade the token in the address for a cookie, and drop it from the URL.
                headers = {"Location": "./", "Set-Cookie": gate.cookie_header()}
                return await http.respond(303, headers=headers)
            return await http.respond(
                200,
                self._page,
                "text/html; charset=utf-8",
                {"Content-Security-Policy": self._csp},
                head_only,
            )
        if path == "/favicon.ico":
            return await http.respond(204)
        if path not in ("/api/state", "/events", "/frame"):
            return await http.respond(404, b"not found\n")
        if not gate.authorized(request):
            return await http.respond(
                401,
                b"this monitor needs the host's token\n",
                headers={"WWW-Authenticate": 'Bearer realm="socketengine monitor"'},
            )
        if path == "/api/state":
            self._refresh(True)
            body = self._stamped_state()
            return await http.respond(200, body, "application/json", None, head_only)
        if path == "/frame":
            return await self._frame(request, http, head_only)
        await self._events(http, head_only)
        return False

    async def _frame(self, request: Request, http: HTTPConnection, head_only: bool) -> bool:
        channel = request.arg("c")
        try:
            session = int(request.arg("s") or "")
        except ValueError:
            session = -1
        value, entry = (None, None) if channel is None else self._view.find_image(session, channel)
        if channel is None or entry is None:
            return await http.respond(404, b"no such image\n")
        key = (session, channel)
        seq = entry.seq
        cached = self._encoded.get(key)
        if cached is None or cached[0] != seq:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="socketengine-monitor")
            future = asyncio.get_running_loop().run_in_executor(
                self._executor, encode_image, value, self.max_width, self.bgr, self.image_format
            )
            cached = (seq, future)
            self._encoded[key] = cached
        try:
            body, content_type = await asyncio.shield(cached[1])
        except Exception as exc:
            logger.warning("monitor: cannot encode %r of client %s: %s", channel, session, exc)
            self._encoded.pop(key, None)
            return await http.respond(500, f"{exc}\n".encode())
        h, w, c = entry.image or (0, 0, 0)
        headers = {"X-Frame-Seq": str(seq), "X-Frame-Shape": f"{h}x{w}x{c}"}
        return await http.respond(200, body, content_type, headers, head_only)

    async def _events(self, http: HTTPConnection, head_only: bool) -> None:
        """A Server-Sent Events stream; each event is the newest state, sent once the
        previous one has drained (a slow page skips states, never queues them)."""
        content_type = "text/event-stream; charset=utf-8"
        if head_only:
            await http.respond(200, b"", content_type, head_only=True, close=True)
            return
        http.start_stream({"Content-Type": content_type, "X-Accel-Buffering": "no"})
        self._subscribers += 1
        try:
            if self._ticker is None or self._ticker.done():
                self._refresh(True)
                self._ticker = asyncio.get_running_loop().create_task(self._tick())
            http.stream(b"retry: 1000\n\n")
            sent_state = sent_frames = -1
            while not self._stopping:
                changed = self._changed
                parts = []
                if sent_state != self._state_version:
                    sent_state = self._state_version
                    parts.append(b"event: state\ndata: " + self._stamped_state() + b"\n\n")
                if sent_frames != self._frames_version:
                    sent_frames = self._frames_version
                    parts.append(b"event: frames\ndata: " + self._frames_json.encode() + b"\n\n")
                # A keep-alive comment when idle also detects a browser that left.
                http.stream(b"".join(parts) or b": keep-alive\n\n")
                await http.drain()
                if changed is None:  # pragma: no cover
                    return
                await changed.wait()  # the ticker sets it on a change, at least every 15 s
        finally:
            self._subscribers -= 1
            if self._stopping:
                http.end_stream()  # a clean end (the last chunk), not a cut
