"""NATS under the endpoint logic: each host-client connection is a stream of frames
carried by NATS, and the endpoints see an ordinary local socket.

Why this boundary: every protocol rule (handshake and token, heartbeats, BYE, SYNC/ACK,
requests, interest, retained replay, wills, the send queue) lives in the sans-I/O
engine, which both I/O layers drive over a socket.  A gateway gives the endpoint a
private Unix socket and moves the stream's units between it and NATS, one unit per
NATS message (:class:`~socketengine.transport.nats.wire.StreamSplitter`: the 8-byte
preamble, then whole frames), so the engine, ``Host``, ``Client`` and both layers run
unchanged and no rule is written twice.

* :class:`HostGateway` (one per NATS host): subscribes ``P.h.H.in.*``; the first unit
  of a new session (a preamble) opens a connection to the host's private socket.  It
  also publishes broadcasts once (``P.h.H.b.K``, the server fans out), keeps retained
  values in JetStream KV and announces the host in the hosts bucket.
* :class:`ClientGateway` (one per NATS client): listens on a private socket; each
  connection the client makes is a new session ``<name>~<random>`` talking to the
  host's gateway on ``P.h.H.in.<session>`` / ``P.h.H.c.<session>``, and gets the
  host's broadcasts once its handshake is through.

A session lives as long as the NATS connection it started on.  Whatever may have lost
a unit -- the link disconnected (a node died, a slow consumer cut by the server), a
chunked frame lost, a subscription over its pending limit -- ends the session: the
endpoint sees a dropped connection, exactly as after a TCP reset, and a client
reconnects (a new session, retained values replayed).  So a gap is never hidden inside
a live connection.  An empty NATS message is the end of a session's stream (EOF).

Threads: the link's thread (NATS callbacks only enqueue) and one selector thread per
gateway that owns the local sockets.  Frames to a slow local reader wait in a bounded
queue where image frames conflate (newest frame wins, as in the engine's send queue).
"""

from __future__ import annotations

import collections
import logging
import os
import secrets
import selectors
import shutil
import socket
import ssl
import tempfile
import threading
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple, Union

from ... import frames
from ...errors import ProtocolError
from .link import NatsLink, Subscription
from .subjects import DEFAULT_PREFIX, Subjects
from .wire import StreamSplitter

__all__ = [
    "HostGateway",
    "ClientGateway",
    "parse_url",
    "NatsSettings",
    "nats_host",
    "nats_client",
    "nats_hosts",
]

log = logging.getLogger("socketengine")

_READ_SIZE = 256 * 1024
#: Bytes that may wait for a slow local reader before its session is ended.
DEFAULT_LOCAL_BUFFER = 256 * 1024 * 1024
_PREAMBLE_MAGIC = frames.MAGIC
_HEADER = frames.HEADER
_HEADER_SIZE = frames.HEADER_SIZE


def parse_url(url: Union[str, Sequence[str]]) -> List[str]:
    """``"nats://a:4222,nats://b:4222"`` (or a list) -> the server URLs."""
    if isinstance(url, str):
        urls = [u.strip() for u in url.split(",") if u.strip()]
    else:
        urls = [str(u).strip() for u in url]
    if not urls:
        raise ValueError("url= is empty: give nats://HOST:PORT (comma-separated for a cluster)")
    for u in urls:
        if not (u.startswith("nats://") or u.startswith("tls://")):
            raise ValueError(f"url={u!r}: a NATS server URL starts with nats:// or tls://")
    return urls


class NatsSettings:
    """What a NATS endpoint needs besides the endpoint's own settings."""

    def __init__(
        self,
        url: Union[str, Sequence[str]],
        host: str,
        *,
        token: Optional[bytes],
        tls: Optional[ssl.SSLContext],
        connect_timeout: Optional[float],
        max_message: int,
        prefix: str = DEFAULT_PREFIX,
    ) -> None:
        if not isinstance(host, str) or not host:
            raise TypeError("a NATS endpoint needs the host's name: a non-empty str")
        self.servers = parse_url(url)
        self.host = host
        self.subjects = Subjects(prefix)
        self.subjects.host_inbox_all(host)  # ValueError now for a name it cannot map
        self.prefix = prefix
        self.token = token
        self.tls = tls
        self.connect_timeout = 5.0 if connect_timeout is None else float(connect_timeout)
        #: Seconds a new session waits for the host to answer before it is given up.
        self.open_timeout = 10.0
        # A frame is at most max_message; the preamble and headers ride along.
        self.max_message = max_message + _HEADER_SIZE + 64

    def connect(self, name: str) -> NatsLink:
        """A connected :class:`NatsLink` (``ConnectTimeout``, ``AuthenticationError``,
        ``HandshakeError`` for TLS as :meth:`AsyncNatsLink.connect` says)."""
        link = NatsLink(max_message=self.max_message)
        kwargs: Dict[str, Any] = {
            "name": name,
            "connect_timeout": self.connect_timeout,
            "reconnect_wait": 0.1,
        }
        if self.token is not None:
            kwargs["token"] = self.token.decode("utf-8", "surrogateescape")
        if self.tls is not None:
            kwargs["tls"] = self.tls
        link.connect(self.servers, **kwargs)
        return link


def private_socket_dir() -> str:
    """A new directory only this user can enter, for a gateway's Unix socket."""
    return tempfile.mkdtemp(prefix="se-nats-")


class _Session:
    """One stream between a local socket and NATS."""

    __slots__ = (
        "name",
        "sock",
        "out_subject",
        "splitter",
        "outq",
        "out_bytes",
        "open",
        "eof_in",
        "images_dropped",
        "sub",
        "reading",
        "registered",
    )

    def __init__(self, name: str, sock: socket.socket, out_subject: str, max_message: int):
        self.name = name
        self.sock = sock
        self.out_subject = out_subject
        self.splitter = StreamSplitter(max_message)
        # Units for the local socket: [image channel or None, memoryview]
        self.outq: Deque[List[Any]] = collections.deque()
        self.out_bytes = 0
        self.open = False  # the host's WELCOME went through (client gateways)
        self.eof_in = False  # NATS said the other side's stream ended
        self.images_dropped = 0
        self.sub: Optional[Subscription] = None
        self.reading = True  # the local socket is read (client: once subscribed)
        self.registered = False


def _image_channel(body: Any) -> Optional[str]:
    """The channel of an image DATA frame (conflatable), else None."""
    if len(body) < _HEADER_SIZE or body[0] != frames.DATA or not body[1] & frames.FLAG_IMAGE:
        return None
    clen = body[2] | (body[3] << 8)
    return bytes(body[_HEADER_SIZE : _HEADER_SIZE + clen]).decode("utf-8", "replace")


class _Gateway:
    """The selector thread and the session table both gateways share."""

    _role = "gateway"

    def __init__(self, settings: NatsSettings, local_buffer: int = DEFAULT_LOCAL_BUFFER):
        self.settings = settings
        self.subjects = settings.subjects
        self.host = settings.host
        self.local_buffer = local_buffer
        self.link: Optional[NatsLink] = None
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._calls: Deque[Tuple[Callable[..., None], Tuple[Any, ...]]] = collections.deque()
        self._sessions: Dict[str, _Session] = {}
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        #: Sessions ended because a unit may have been lost (reconnects, losses).
        self.sessions_cut = 0
        #: Units lost for good (chunk losses and slow-consumer drops seen by the link).
        self.losses = 0
        self.images_dropped = 0

    # -- the selector thread ---------------------------------------------------------------

    def _start_thread(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name=f"socketengine-nats-{self._role}", daemon=True
        )
        self._thread.start()

    def call(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on the selector thread (from any thread)."""
        with self._lock:
            self._calls.append((fn, args))
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # a wake is already pending (or we are closing)

    def _run(self) -> None:
        while not self._stopping:
            for key, mask in self._sel.select():
                if key.data is None:
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except (BlockingIOError, OSError):
                        pass
                    continue
                key.data(mask)
            while True:
                with self._lock:
                    if not self._calls:
                        break
                    fn, args = self._calls.popleft()
                try:
                    fn(*args)
                except Exception:
                    log.exception("NATS %s: %r failed", self._role, fn)
        for s in list(self._sessions.values()):
            self._drop(s, publish_eof=False)
        self._sel.close()

    def _add(self, s: _Session, reading: bool = True) -> None:
        s.sock.setblocking(False)
        s.reading = reading
        self._sessions[s.name] = s
        self._watch(s, False)

    def _watch(self, s: _Session, write: bool) -> None:
        """Select ``s``'s socket for reading (if it is read) and, if ``write``, writing."""
        events = (selectors.EVENT_READ if s.reading else 0) | (
            selectors.EVENT_WRITE if write else 0
        )
        if not events:
            if s.registered:
                self._sel.unregister(s.sock)
                s.registered = False
        elif s.registered:
            self._sel.modify(s.sock, events, lambda mask: self._on_event(s, mask))
        else:
            self._sel.register(s.sock, events, lambda mask: self._on_event(s, mask))
            s.registered = True

    def _on_event(self, s: _Session, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush(s)
        if mask & selectors.EVENT_READ and s.name in self._sessions:
            self._on_readable(s)

    def _on_readable(self, s: _Session) -> None:
        try:
            data = s.sock.recv(_READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.info("NATS %s: session %s: local socket failed: %s", self._role, s.name, exc)
            self._drop(s)
            return
        if not data:
            self._drop(s)
            return
        try:
            units = s.splitter.feed(data)
        except ProtocolError as exc:
            log.warning("NATS %s: session %s: %s; ending it", self._role, s.name, exc)
            self._drop(s)
            return
        link = self.link
        assert link is not None
        for unit in units:
            self._sent_unit(s, unit)
            link.publish_nowait(s.out_subject, unit)

    def _sent_unit(self, s: _Session, unit: bytes) -> None:
        """A unit from the local endpoint is about to go out (hook)."""

    def _drop(self, s: _Session, publish_eof: bool = True) -> None:
        """End a session: close the local socket, tell the other side (empty body)."""
        if self._sessions.get(s.name) is not s:
            return
        del self._sessions[s.name]
        if s.registered:
            self._sel.unregister(s.sock)
            s.registered = False
        s.sock.close()
        s.outq.clear()
        if s.sub is not None:
            sub, s.sub = s.sub, None
            self._unsubscribe(sub)
        if publish_eof and self.link is not None:
            try:
                self.link.publish_nowait(s.out_subject, b"")
            except Exception as exc:  # noqa: BLE001 (closing: the other side times out)
                log.debug("NATS %s: EOF of %s not sent: %s", self._role, s.name, exc)
        self._ended(s)

    def _ended(self, s: _Session) -> None:
        """A session ended (hook)."""

    def _unsubscribe(self, sub: Subscription) -> None:
        link = self.link
        loop = None if link is None else link._loop
        if link is None or loop is None or loop.is_closed():
            return  # the link is closing: its subscriptions end with it
        # Never block the selector thread on the link: the link finishes it.
        loop.call_soon_threadsafe(lambda: link._spawn(sub._unsubscribe()))

    # -- units from NATS (link thread -> selector thread) ----------------------------------

    def _deliver(self, s: _Session, body: Any) -> None:
        """Queue ``body`` for the local socket (selector thread)."""
        if self._sessions.get(s.name) is not s:
            return
        if not len(body):
            s.eof_in = True
            if not s.outq:
                self._shut_wr(s)
            return
        if body[0] == frames.WELCOME:
            s.open = True
        channel = _image_channel(body)
        if channel is not None and s.outq:
            # Newest frame wins: an older image of the channel not yet started is dropped.
            for i in range(1, len(s.outq)):
                item = s.outq[i]
                if item[0] == channel:
                    s.out_bytes -= len(item[1])
                    del s.outq[i]
                    s.images_dropped += 1
                    self.images_dropped += 1
                    break
        view = memoryview(body).cast("B")
        s.outq.append([channel, view])
        s.out_bytes += view.nbytes
        if s.out_bytes > self.local_buffer:
            log.warning(
                "NATS %s: session %s: the local endpoint did not read %d bytes; ending it",
                self._role,
                s.name,
                s.out_bytes,
            )
            self.sessions_cut += 1
            self._drop(s)
            return
        self._flush(s)

    def _flush(self, s: _Session) -> None:
        while s.outq:
            item = s.outq[0]
            try:
                n = s.sock.send(item[1])
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as exc:
                log.info("NATS %s: session %s: local socket failed: %s", self._role, s.name, exc)
                self._drop(s)
                return
            s.out_bytes -= n
            if n < len(item[1]):
                item[1] = item[1][n:]
                item[0] = None  # started: no longer replaceable
                self._watch(s, True)
                return
            s.outq.popleft()
        self._watch(s, False)
        if s.eof_in:
            self._shut_wr(s)

    def _shut_wr(self, s: _Session) -> None:
        try:
            s.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    # -- link events -------------------------------------------------------------------------

    def _on_state(self, state: str) -> None:
        if state == "disconnected":
            # Units published to us meanwhile are lost: end every session (see module doc).
            self.call(self._cut_all, "the NATS link lost its server")

    def _on_loss(self, loss: Any) -> None:
        self.losses += 1
        self.call(self._cut_all, f"a NATS message was lost ({loss})")

    def _cut_all(self, why: str) -> None:
        if self._sessions:
            log.warning(
                "NATS %s: %s: ending %d session(s); clients reconnect",
                self._role,
                why,
                len(self._sessions),
            )
        for s in list(self._sessions.values()):
            self.sessions_cut += 1
            self._drop(s)

    def _connect_link(self, name: str) -> NatsLink:
        link = self.settings.connect(name)
        link.aio.on_state = self._on_state
        link.aio.on_loss = self._on_loss
        return link

    def close(self) -> None:
        """End every session, close the link and stop the thread.  Idempotent."""
        if self._stopping:
            return
        done = threading.Event()

        def shut() -> None:
            for s in list(self._sessions.values()):
                self._drop(s)
            done.set()

        if self._thread is not None and self._thread.is_alive():
            self.call(shut)
            done.wait(5.0)
        self._stopping = True
        self.call(lambda: None)
        if self._thread is not None:
            self._thread.join(5.0)
        else:
            self._sel.close()
        self._close_extras()
        link, self.link = self.link, None
        if link is not None:
            try:
                link.close(2.0)
            except Exception as exc:  # noqa: BLE001 (closing anyway)
                log.debug("NATS %s: link close: %s", self._role, exc)
        self._wake_r.close()
        self._wake_w.close()

    def _close_extras(self) -> None:
        """Stop what the role added (hook)."""

    def stats(self) -> Dict[str, Any]:
        link = self.link
        return {
            "sessions": len(self._sessions),
            "sessions_cut": self.sessions_cut,
            "losses": self.losses,
            "images_dropped": self.images_dropped,
            "server": None if link is None else link.connected_url,
        }


class HostGateway(_Gateway):
    """The NATS side of one host: sessions to the host's private socket ``local_path``."""

    _role = "host"

    def __init__(self, settings: NatsSettings, **kw: Any) -> None:
        super().__init__(settings, **kw)
        self._dir = private_socket_dir()
        self.local_path = os.path.join(self._dir, "h.sock")
        self._announcer: Any = None
        self._store: Any = None

    @property
    def addr(self) -> str:
        """The address the host listens on (``unix://...``, this user only)."""
        return "unix://" + self.local_path

    def connect(self) -> HostGateway:
        """Connect the link (blocking; ``ConnectTimeout``, ``AuthenticationError``)."""
        os.makedirs(self._dir, mode=0o700, exist_ok=True)  # removed by a failed open
        self.link = self._connect_link(f"socketengine host {self.host}")
        return self

    def abandon(self) -> None:
        """A failed ``open()``: close the link, remove the socket directory; a later
        ``open()`` may :meth:`connect` again."""
        link, self.link = self.link, None
        if link is not None:
            try:
                link.close(2.0)
            except Exception as exc:  # noqa: BLE001 (failing anyway)
                log.debug("NATS host: link close: %s", exc)
        shutil.rmtree(self._dir, ignore_errors=True)

    def serve(self, info: Optional[Dict[str, Any]] = None) -> HostGateway:
        """Start taking sessions (the host listens by now) and announce the host."""
        from .presence import HostAnnouncer

        assert self.link is not None
        try:
            self._start_thread()
            self.link.subscribe(self.subjects.host_inbox_all(self.host), self._on_message)
            # Served after the inbox subscription: an answer to a client proves both reach it.
            self.link.serve(self.subjects.host_open(self.host), lambda body: b"ok")
            self._announcer = HostAnnouncer(
                self.link,
                self.host,
                dict(info or {}),
                strict=False,  # a listing may lag; serving clients must not wait for it
                prefix=self.settings.prefix,
            )
        except BaseException:
            self.close()
            raise
        return self

    # Retained values (JetStream KV, replicated) ------------------------------------------

    def _retained(self) -> Any:
        if self._store is None:
            from .retained import RetainedStore

            assert self.link is not None
            self._store = RetainedStore(self.link, self.host, prefix=self.settings.prefix)
        return self._store

    def retained_items(self) -> Dict[str, bytes]:
        """The retained frames stored for this host (a host restarted anywhere gets them)."""
        return self._retained().items()

    def retain(self, channel: str, frame: bytes) -> None:
        self._retained().put(channel, frame)

    def unretain(self, channel: Optional[str]) -> None:
        store = self._retained()
        for ch in [channel] if channel is not None else store.channels():
            store.delete(ch)

    def unretain_soon(self, channel: Optional[str]) -> None:
        """:meth:`unretain` without waiting (for an event loop; failures are logged)."""

        def run() -> None:
            try:
                self.unretain(channel)
            except Exception as exc:  # noqa: BLE001 (logged: the stored copy stays)
                log.warning("NATS host %r: retained %r not deleted: %s", self.host, channel, exc)

        threading.Thread(target=run, name="socketengine-nats-unretain", daemon=True).start()

    def broadcast(self, channel: str, frame: bytes) -> None:
        """One publish for every client (the server fans out)."""
        assert self.link is not None
        self.link.publish_nowait(self.subjects.broadcast(self.host, channel), frame)

    # Sessions ------------------------------------------------------------------------------

    def _on_message(self, subject: str, body: Any) -> None:  # link thread
        name = self.subjects.parse(subject).name
        self.call(self._arrived, name, body)

    def _arrived(self, name: str, body: Any) -> None:
        s = self._sessions.get(name)
        if s is None:
            if len(body) >= 4 and bytes(body[:4]) == _PREAMBLE_MAGIC:
                s = self._open_session(name)
                if s is None:
                    return
            elif len(body) and self.link is not None:
                # A session this host does not know (it restarted, or ended it): say so.
                self.link.publish_nowait(self.subjects.client_inbox(self.host, name), b"")
                return
            else:
                return
        self._deliver(s, body)

    def _open_session(self, name: str) -> Optional[_Session]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.local_path)
        except OSError as exc:
            sock.close()
            log.warning("NATS host: cannot reach the host's socket for %s: %s", name, exc)
            return None
        s = _Session(
            name, sock, self.subjects.client_inbox(self.host, name), self.settings.max_message
        )
        self._add(s)
        return s

    def _close_extras(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)
        announcer, self._announcer = self._announcer, None
        if announcer is not None:
            try:
                announcer.stop()
            except Exception as exc:  # noqa: BLE001 (its entry expires anyway)
                log.debug("NATS host: announcer stop: %s", exc)


class ClientGateway(_Gateway):
    """The NATS side of one client: a private socket the client connects to."""

    _role = "client"

    def __init__(
        self,
        settings: NatsSettings,
        name: Optional[str],
        local_dir: Optional[str] = None,
        **kw: Any,
    ) -> None:
        super().__init__(settings, **kw)
        self.client_name_given = name
        self.client_name = name or "client"
        # A renewed gateway (after a failed open) gets its directory back in start().
        self._dir = local_dir or private_socket_dir()
        self.local_path = os.path.join(self._dir, "c.sock")
        self._listener: Optional[socket.socket] = None
        self._bsub: Optional[Subscription] = None

    @property
    def addr(self) -> str:
        """The address the endpoint connects to (``unix://...``)."""
        return "unix://" + self.local_path

    def start(self) -> ClientGateway:
        os.makedirs(self._dir, mode=0o700, exist_ok=True)
        try:
            self.link = self._connect_link(f"socketengine client {self.client_name}")
        except BaseException:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise
        try:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(self.local_path)
            listener.listen(8)
            listener.setblocking(False)
            self._listener = listener
            self._sel.register(listener, selectors.EVENT_READ, self._on_accept)
            self._bsub = self.link.subscribe(
                self.subjects.broadcast_all(self.host), self._on_broadcast
            )
            self._start_thread()
        except BaseException:
            self.close()
            raise
        return self

    def renewed(self) -> ClientGateway:
        """Close this gateway and return an unstarted one with the same settings (a
        failed ``open()`` leaves nothing running; the same address is served again)."""
        self.close()
        return ClientGateway(self.settings, self.client_name_given, local_dir=self._dir)

    def _on_accept(self, mask: int) -> None:
        assert self._listener is not None and self.link is not None
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        name = f"{self.client_name}~{secrets.token_hex(6)}"
        s = _Session(
            name, sock, self.subjects.host_inbox(self.host, name), self.settings.max_message
        )
        self._add(s, reading=False)
        link = self.link
        host_in = self.subjects.client_inbox(self.host, name)

        def on_message(subject: str, body: Any) -> None:  # link thread
            self.call(self._deliver, s, body)

        async def subscribe() -> None:
            try:
                s.sub = await link.aio.subscribe(host_in, on_message)
                reached = await self._host_reachable(link)
            except Exception as exc:  # noqa: BLE001
                log.warning("NATS client: cannot subscribe %s: %s", host_in, exc)
                self.call(self._drop, s)
                return
            if self._sessions.get(s.name) is not s:
                await s.sub._unsubscribe()
                return
            if not reached:
                log.warning(
                    "NATS client: no host named %r answered on the cluster within %s s",
                    self.host,
                    self.settings.open_timeout,
                )
                self.call(self._drop, s)
                return
            # Only now may the endpoint's units go out: replies need the subscription,
            # and the host's subscriptions must have reached this client's server.
            self.call(self._register_reading, s)

        # Reading the local socket starts once the reply subscription exists.
        assert link._loop is not None
        link._loop.call_soon_threadsafe(lambda: link._spawn(subscribe()))

    async def _host_reachable(self, link: NatsLink) -> bool:
        """Ask the host until it answers (``open_timeout`` s at most).  Right after a
        host started, its subscriptions may not have reached every server of the
        cluster yet, and a message published there would be dropped (NATS keeps no
        message without a subscriber): this waits for them instead of losing the
        session's first units."""
        import asyncio
        import time

        from .link import NoResponders

        subject = self.subjects.host_open(self.host)
        deadline = time.monotonic() + self.settings.open_timeout
        delay = 0.02
        while True:
            try:
                await link.aio.request(subject, b"", timeout=min(1.0, self.settings.open_timeout))
                return True
            except (NoResponders, TimeoutError):
                pass
            if time.monotonic() + delay > deadline:
                return False
            await asyncio.sleep(delay)  # backoff while the host (or its interest) is missing
            delay = min(delay * 2, 0.5)

    def _register_reading(self, s: _Session) -> None:
        if self._sessions.get(s.name) is s:
            s.reading = True
            self._watch(s, bool(s.outq))

    def _on_broadcast(self, subject: str, body: Any) -> None:  # link thread
        self.call(self._broadcast_in, body)

    def _broadcast_in(self, body: Any) -> None:
        for s in list(self._sessions.values()):
            if s.open:
                self._deliver(s, body)

    def _close_extras(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        shutil.rmtree(self._dir, ignore_errors=True)


def _settings(
    url: Union[str, Sequence[str]],
    host: Optional[str],
    token: Union[str, bytes, None],
    connect_timeout: Optional[float],
    tls: Optional[ssl.SSLContext],
    max_message: int,
) -> NatsSettings:
    if host is None:
        raise TypeError("a NATS endpoint needs the host's name: Host(url=..., name='robot-1')")
    if tls is not None and not isinstance(tls, ssl.SSLContext):
        raise TypeError("tls must be an ssl.SSLContext")
    return NatsSettings(
        url,
        host,
        token=_token(token),
        tls=tls,
        connect_timeout=connect_timeout,
        max_message=max_message,
    )


def nats_host(
    url: Union[str, Sequence[str]],
    name: Optional[str],
    token: Union[str, bytes, None],
    tls: Optional[ssl.SSLContext],
    connect_timeout: Optional[float],
    max_message: int,
) -> Tuple[str, int, None, HostGateway]:
    """For ``Host(url=...)`` of either layer: ``(addr, port, tls, gateway)`` -- the host
    listens on the gateway's private socket, without TLS (NATS carries ``tls=``)."""
    gateway = HostGateway(_settings(url, name, token, connect_timeout, tls, max_message))
    return gateway.addr, 0, None, gateway


def nats_client(
    url: Union[str, Sequence[str]],
    host: Optional[str],
    name: Optional[str],
    token: Union[str, bytes, None],
    tls: Optional[ssl.SSLContext],
    connect_timeout: Optional[float],
    max_message: int,
) -> Tuple[str, int, None, ClientGateway]:
    """For ``Client(url=..., host=...)`` of either layer: ``(addr, port, tls, gateway)``."""
    gateway = ClientGateway(_settings(url, host, token, connect_timeout, tls, max_message), name)
    return gateway.addr, 0, None, gateway


def nats_hosts(
    url: Union[str, Sequence[str]],
    *,
    token: Union[str, bytes, None] = None,
    tls: Optional[ssl.SSLContext] = None,
    connect_timeout: float = 5.0,
    prefix: str = DEFAULT_PREFIX,
) -> Dict[str, Dict[str, Any]]:
    """The hosts running on a NATS cluster: ``{name: {"name", "pid", "t", ...}}``.

    ``t`` is ``time.time()`` of the host's last announcement (every ~3 s); a host that
    died without closing stays listed up to 10 s.  The listing is read from any replica,
    so a host announced a moment ago may be missing from one call.  Raises ``ConnectTimeout`` /
    ``AuthenticationError`` like ``Client(url=...)``.
    """
    from .presence import list_hosts

    settings = NatsSettings(
        url,
        "-",
        token=_token(token),
        tls=tls,
        connect_timeout=connect_timeout,
        max_message=1024 * 1024,
        prefix=prefix,
    )
    link = settings.connect("socketengine hosts")
    try:
        return list_hosts(link, prefix=prefix)
    finally:
        link.close(2.0)


def _token(token: Union[str, bytes, None]) -> Optional[bytes]:
    from ...protocol import token_bytes

    return token_bytes(token)
