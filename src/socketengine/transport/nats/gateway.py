"""NATS under the endpoint logic: each host-client connection is a stream of frames
carried by NATS, and the endpoints see an ordinary local socket.

Why this boundary: every protocol rule (handshake and token, heartbeats, BYE, SYNC/ACK,
requests, interest, retained replay, wills, the send queue) lives in the sans-I/O
engine, which both I/O layers drive over a socket.  A gateway gives the endpoint a
private Unix socket and moves the stream's units between it and NATS, one unit per
NATS message (:class:`~socketengine.transport.nats.wire.StreamSplitter`: the 8-byte
preamble, then whole frames), so the engine, ``Host``, ``Client`` and both layers run
unchanged and no rule is written twice.

* :class:`Hub` (one per process and NATS connection settings, reference-counted): the
  NATS connection (:class:`NatsLink`, one thread), one selector thread that owns every
  local socket of every NATS endpoint of the process, and the session table keyed by
  the subject a session's units arrive on.  It closes with the last endpoint using it.
  A thousand clients in one process thus cost one NATS connection and two threads
  besides their own, and a broadcast reaches the process once (one subscription per
  host, passed to each client's sessions by the selector thread).
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
a live connection.  The link is shared, so such an event ends every session of every
endpoint of the process on that link.  An empty NATS message is the end of a session's
stream (EOF).

Threads: the link's thread (NATS callbacks only enqueue) and the hub's selector thread.
Frames to a slow local reader wait in a bounded queue where image frames conflate
(newest frame wins, as in the engine's send queue).

Private sockets live in ``se-nats-<pid>-*`` directories (mode 0700) under the temporary
directory; a process killed before removing its own leaves them behind, so the first
gateway of a process removes those of this user whose process is gone
(:func:`remove_stale_dirs`).
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import secrets
import selectors
import shutil
import socket
import ssl
import tempfile
import threading
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple, TypeVar, Union

from ... import frames
from ...errors import ProtocolError
from .link import NatsLink, Subscription
from .subjects import DEFAULT_PREFIX, Subjects
from .wire import StreamSplitter

__all__ = [
    "Hub",
    "HostGateway",
    "ClientGateway",
    "parse_url",
    "NatsSettings",
    "nats_host",
    "nats_client",
    "nats_hosts",
    "remove_stale_dirs",
]

log = logging.getLogger("socketengine")

T = TypeVar("T")

_READ_SIZE = 256 * 1024
#: Bytes that may wait for a slow local reader before its session is ended.
DEFAULT_LOCAL_BUFFER = 256 * 1024 * 1024
_PREAMBLE_MAGIC = frames.MAGIC
_HEADER = frames.HEADER
_HEADER_SIZE = frames.HEADER_SIZE
_DIR_PREFIX = "se-nats-"
#: Calls from other threads run per turn of the selector thread before it looks at its
#: sockets again.
_CALLS_PER_TURN = 64


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

    @property
    def link_key(self) -> Tuple[Any, ...]:
        """Endpoints whose keys are equal share one :class:`Hub` (one NATS connection):
        the same servers in the same order, credentials, TLS context and frame limit."""
        return (tuple(self.servers), self.token, self.tls, self.max_message)

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


# -- private socket directories ----------------------------------------------------------------

_stale_checked = False
_stale_lock = threading.Lock()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def remove_stale_dirs(tmp: Optional[str] = None) -> List[str]:
    """Remove this user's ``se-nats-<pid>-*`` socket directories whose process is gone
    (it was killed before it could remove them); returns the paths removed.

    A directory is removed only if it belongs to this user and no process with its pid
    exists (in this pid namespace).  Directories of live processes are never touched.
    """
    tmp = tmp or tempfile.gettempdir()
    removed: List[str] = []
    uid = os.getuid()
    try:
        names = os.listdir(tmp)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(_DIR_PREFIX):
            continue
        pid_text = name[len(_DIR_PREFIX) :].split("-", 1)[0]
        if not pid_text.isdigit():
            continue  # not ours (or made before pids were in the name)
        path = os.path.join(tmp, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if st.st_uid != uid or not os.path.isdir(path) or os.path.islink(path):
            continue
        if _pid_alive(int(pid_text)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.exists(path):
            removed.append(path)
    if removed:
        log.info("NATS: removed %d stale socket director(ies) of dead processes", len(removed))
    return removed


def private_socket_dir() -> str:
    """A new directory only this user can enter, for a gateway's Unix socket; the first
    call of a process removes stale ones (:func:`remove_stale_dirs`)."""
    global _stale_checked
    with _stale_lock:
        if not _stale_checked:
            _stale_checked = True
            try:
                remove_stale_dirs()
            except Exception as exc:  # noqa: BLE001 (housekeeping only)
                log.debug("NATS: stale directory check failed: %s", exc)
    return tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{os.getpid()}-")


# -- sessions ------------------------------------------------------------------------------------


class _Session:
    """One stream between a local socket and NATS."""

    __slots__ = (
        "key",
        "name",
        "owner",
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

    def __init__(
        self,
        key: str,
        name: str,
        owner: _Gateway,
        sock: socket.socket,
        out_subject: str,
        max_message: int,
    ):
        self.key = key  # the subject this session's units arrive on (unique per process)
        self.name = name
        self.owner = owner
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


# -- the hub: one per process and link settings ----------------------------------------------------

_hubs: Dict[Tuple[Any, ...], Hub] = {}
_hubs_lock = threading.Lock()


class Hub:
    """One NATS connection and one selector thread serving every NATS endpoint of the
    process that uses the same :attr:`NatsSettings.link_key`.

    Get one with :meth:`acquire` (connects on first use) and give it back with
    :meth:`release`; the last release closes the link and stops the thread.  Sessions
    are keyed by the subject their units arrive on; each belongs to one gateway
    (``owner``).  Everything about a session runs on the selector thread.
    """

    def __init__(self, settings: NatsSettings, local_buffer: int = DEFAULT_LOCAL_BUFFER):
        self.settings = settings
        self.key = settings.link_key
        self.pid = os.getpid()
        self.local_buffer = local_buffer
        self.link: Optional[NatsLink] = None
        self.refs = 0
        self.closed = False
        self._connect_lock = threading.Lock()
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._calls: Deque[Tuple[Callable[..., None], Tuple[Any, ...]]] = collections.deque()
        self.sessions: Dict[str, _Session] = {}
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        # Broadcast subscriptions: subject -> (subscription, client gateways listening).
        self._bsubs: Dict[str, Tuple[Subscription, List[ClientGateway]]] = {}
        self._bsub_lock = threading.Lock()
        #: Sessions ended because a unit may have been lost (reconnects, losses).
        self.sessions_cut = 0
        #: Units lost for good (chunk losses and slow-consumer drops seen by the link).
        self.losses = 0
        self.images_dropped = 0

    # -- sharing -----------------------------------------------------------------------------

    @classmethod
    def acquire(cls, settings: NatsSettings) -> Hub:
        """The process's hub for ``settings`` (made and connected on first use; blocking:
        ``ConnectTimeout``, ``AuthenticationError``, ``HandshakeError``)."""
        key = settings.link_key
        with _hubs_lock:
            hub = _hubs.get(key)
            if hub is None or hub.closed or hub.pid != os.getpid():  # new, or forked
                hub = cls(settings)
                _hubs[key] = hub
            hub.refs += 1
        try:
            hub._connect()
        except BaseException:
            hub.release()
            raise
        return hub

    def release(self) -> None:
        """Give back one :meth:`acquire`; the last one closes the hub."""
        with _hubs_lock:
            self.refs -= 1
            if self.refs > 0:
                return
            self.closed = True
            if _hubs.get(self.key) is self:
                del _hubs[self.key]
        self._close()

    def _connect(self) -> None:
        with self._connect_lock:
            if self.link is not None:
                return
            link = self.settings.connect(f"socketengine pid {os.getpid()}")
            link.aio.on_state = self._on_state
            link.aio.on_loss = self._on_loss
            self.link = link
            self._thread = threading.Thread(
                target=self._run, name="socketengine-nats-gateway", daemon=True
            )
            self._thread.start()

    # -- the selector thread ---------------------------------------------------------------

    def call(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on the selector thread (from any thread)."""
        with self._lock:
            self._calls.append((fn, args))
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # a wake is already pending (or we are closing)

    def run(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        """Run ``fn()`` on the selector thread and return its result (blocking)."""
        if threading.current_thread() is self._thread or self._thread is None:
            return fn()
        done = threading.Event()
        out: List[Any] = []

        def wrapped() -> None:
            try:
                out.append((True, fn()))
            except BaseException as exc:  # noqa: BLE001 (raised in the caller)
                out.append((False, exc))
            done.set()

        self.call(wrapped)
        if not done.wait(timeout):
            raise TimeoutError(f"the NATS gateway thread did not answer within {timeout} s")
        ok, value = out[0]
        if not ok:
            raise value
        return value

    def _run(self) -> None:
        timeout: Optional[float] = None
        while not self._stopping:
            for key, mask in self._sel.select(timeout):
                if key.data is None:
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except (BlockingIOError, OSError):
                        pass
                    continue
                key.data(mask)
            # At most _CALLS_PER_TURN calls, then the sockets again: units from NATS
            # arriving without pause must not starve what the local endpoints send
            # (their heartbeats among it).
            for _ in range(_CALLS_PER_TURN):
                with self._lock:
                    if not self._calls:
                        break
                    fn, args = self._calls.popleft()
                try:
                    fn(*args)
                except Exception:
                    log.exception("NATS gateway: %r failed", fn)
            timeout = 0 if self._calls else None
        for s in list(self.sessions.values()):
            self.drop(s, publish_eof=False)
        self._sel.close()

    def register(self, sock: socket.socket, events: int, handler: Callable[[int], None]) -> None:
        """Select ``sock`` on the selector thread (``handler(mask)`` runs there)."""
        self.run(lambda: self._sel.register(sock, events, handler))

    def unregister(self, sock: socket.socket) -> None:
        def unreg() -> None:
            try:
                self._sel.unregister(sock)
            except (KeyError, ValueError):
                pass

        self.run(unreg)

    def add(self, s: _Session, reading: bool = True) -> None:
        """Start serving ``s`` (selector thread)."""
        s.sock.setblocking(False)
        s.reading = reading
        self.sessions[s.key] = s
        s.owner.sessions[s.key] = s
        self.watch(s, False)

    def watch(self, s: _Session, write: bool) -> None:
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
        if mask & selectors.EVENT_READ and self.sessions.get(s.key) is s:
            self._on_readable(s)

    def _on_readable(self, s: _Session) -> None:
        role = s.owner.role
        try:
            data = s.sock.recv(_READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.info("NATS %s: session %s: local socket failed: %s", role, s.name, exc)
            self.drop(s)
            return
        if not data:
            self.drop(s)
            return
        try:
            units = s.splitter.feed(data)
        except ProtocolError as exc:
            log.warning("NATS %s: session %s: %s; ending it", role, s.name, exc)
            self.drop(s)
            return
        link = self.link
        assert link is not None
        for unit in units:
            link.publish_nowait(s.out_subject, unit)

    def drop(self, s: _Session, publish_eof: bool = True) -> None:
        """End a session: close the local socket, tell the other side (empty body)."""
        if self.sessions.get(s.key) is not s:
            return
        del self.sessions[s.key]
        s.owner.sessions.pop(s.key, None)
        if s.registered:
            self._sel.unregister(s.sock)
            s.registered = False
        s.sock.close()
        s.outq.clear()
        if s.sub is not None:
            sub, s.sub = s.sub, None
            self.unsubscribe_soon(sub)
        if publish_eof and self.link is not None:
            try:
                self.link.publish_nowait(s.out_subject, b"")
            except Exception as exc:  # noqa: BLE001 (closing: the other side times out)
                log.debug("NATS %s: EOF of %s not sent: %s", s.owner.role, s.name, exc)

    def unsubscribe_soon(self, sub: Subscription) -> None:
        """End ``sub`` without blocking the calling thread (the link finishes it)."""
        link = self.link
        loop = None if link is None else link._loop
        if link is None or loop is None or loop.is_closed():
            return  # the link is closing: its subscriptions end with it
        loop.call_soon_threadsafe(lambda: link._spawn(sub._unsubscribe()))

    # -- units from NATS (link thread -> selector thread) ----------------------------------

    def deliver(self, s: _Session, body: Any) -> None:
        """Queue ``body`` for the local socket (selector thread)."""
        if self.sessions.get(s.key) is not s:
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
                s.owner.role,
                s.name,
                s.out_bytes,
            )
            self.sessions_cut += 1
            self.drop(s)
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
                log.info("NATS %s: session %s: local socket failed: %s", s.owner.role, s.name, exc)
                self.drop(s)
                return
            s.out_bytes -= n
            if n < len(item[1]):
                item[1] = item[1][n:]
                item[0] = None  # started: no longer replaceable
                self.watch(s, True)
                return
            s.outq.popleft()
        self.watch(s, False)
        if s.eof_in:
            self._shut_wr(s)

    @staticmethod
    def _shut_wr(s: _Session) -> None:
        try:
            s.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    # -- broadcasts: one subscription per host and process ---------------------------------

    def listen_broadcasts(self, gateway: ClientGateway) -> None:
        """Pass the broadcasts of ``gateway``'s host to its open sessions (blocking)."""
        subject = gateway.subjects.broadcast_all(gateway.host)
        with self._bsub_lock:
            entry = self._bsubs.get(subject)
            if entry is None:
                assert self.link is not None
                sub = self.link.subscribe(
                    subject, lambda subj, body: self.call(self._broadcast_in, subject, body)
                )
                self._bsubs[subject] = (sub, [gateway])
            else:
                # A new list: the selector thread may be iterating the old one.
                self._bsubs[subject] = (entry[0], entry[1] + [gateway])

    def forget_broadcasts(self, gateway: ClientGateway) -> None:
        subject = gateway.subjects.broadcast_all(gateway.host)
        with self._bsub_lock:
            entry = self._bsubs.get(subject)
            if entry is None or gateway not in entry[1]:
                return
            rest = [g for g in entry[1] if g is not gateway]
            if rest:
                self._bsubs[subject] = (entry[0], rest)
                return
            del self._bsubs[subject]
        self.unsubscribe_soon(entry[0])

    def _broadcast_in(self, subject: str, body: Any) -> None:
        entry = self._bsubs.get(subject)
        if entry is None:
            return
        for gateway in entry[1]:
            for s in list(gateway.sessions.values()):
                if s.open:
                    self.deliver(s, body)

    # -- link events -------------------------------------------------------------------------

    def _on_state(self, state: str) -> None:
        if state == "disconnected":
            # Units published to us meanwhile are lost: end every session (see module doc).
            self.call(self._cut_all, "the NATS link lost its server")

    def _on_loss(self, loss: Any) -> None:
        self.losses += 1
        self.call(self._cut_all, f"a NATS message was lost ({loss})")

    def _cut_all(self, why: str) -> None:
        if self.sessions:
            log.warning(
                "NATS gateway: %s: ending %d session(s); clients reconnect",
                why,
                len(self.sessions),
            )
        for s in list(self.sessions.values()):
            self.sessions_cut += 1
            self.drop(s)

    def _close(self) -> None:
        """Stop the thread and close the link (the last endpoint released the hub)."""
        self._stopping = True
        self.call(lambda: None)
        if self._thread is not None:
            self._thread.join(5.0)
        else:
            self._sel.close()
        link, self.link = self.link, None
        if link is not None:
            try:
                link.close(2.0)
            except Exception as exc:  # noqa: BLE001 (closing anyway)
                log.debug("NATS gateway: link close: %s", exc)
        self._wake_r.close()
        self._wake_w.close()

    def stats(self) -> Dict[str, Any]:
        link = self.link
        return {
            "sessions": len(self.sessions),
            "sessions_cut": self.sessions_cut,
            "losses": self.losses,
            "images_dropped": self.images_dropped,
            "server": None if link is None else link.connected_url,
            "endpoints": self.refs,
        }


# -- the gateways: one per endpoint -------------------------------------------------------------


class _Gateway:
    """What both gateways share: the hub they use and their own sessions."""

    role = "gateway"

    def __init__(self, settings: NatsSettings):
        self.settings = settings
        self.subjects = settings.subjects
        self.host = settings.host
        self.hub: Optional[Hub] = None
        #: This endpoint's sessions, by key (changed on the selector thread only).
        self.sessions: Dict[str, _Session] = {}
        self._closed = False

    @property
    def link(self) -> Optional[NatsLink]:
        """The (shared) NATS link, ``None`` before the gateway connected or after close."""
        hub = self.hub
        return None if hub is None else hub.link

    def _acquire(self) -> Hub:
        self.hub = Hub.acquire(self.settings)
        return self.hub

    def _release(self) -> None:
        hub, self.hub = self.hub, None
        if hub is not None:
            hub.release()

    def close(self) -> None:
        """End this endpoint's sessions, stop what it added, give the hub back.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        hub = self.hub
        if hub is not None:

            def shut() -> None:
                for s in list(self.sessions.values()):
                    hub.drop(s)

            try:
                hub.run(shut, 5.0)
            except TimeoutError as exc:
                log.warning("NATS %s: %s", self.role, exc)
        self._close_extras()
        self._release()

    def _close_extras(self) -> None:
        """Stop what the role added (hook)."""

    def stats(self) -> Dict[str, Any]:
        hub = self.hub
        out = {} if hub is None else hub.stats()
        out["sessions"] = len(self.sessions)
        return out


class HostGateway(_Gateway):
    """The NATS side of one host: sessions to the host's private socket ``local_path``."""

    role = "host"

    def __init__(self, settings: NatsSettings) -> None:
        super().__init__(settings)
        self._dir = private_socket_dir()
        self.local_path = os.path.join(self._dir, "h.sock")
        self._announcer: Any = None
        self._store: Any = None
        self._inbox: Optional[Subscription] = None
        self._opener: Optional[Subscription] = None

    @property
    def addr(self) -> str:
        """The address the host listens on (``unix://...``, this user only)."""
        return "unix://" + self.local_path

    def connect(self) -> HostGateway:
        """Connect the link (blocking; ``ConnectTimeout``, ``AuthenticationError``)."""
        os.makedirs(self._dir, mode=0o700, exist_ok=True)  # removed by a failed open
        self._closed = False
        self._acquire()
        return self

    def abandon(self) -> None:
        """A failed ``open()``: give the link back, remove the socket directory; a later
        ``open()`` may :meth:`connect` again."""
        self._unsubscribe()
        self._store = None
        self._release()
        shutil.rmtree(self._dir, ignore_errors=True)

    def serve(self, info: Optional[Dict[str, Any]] = None) -> HostGateway:
        """Start taking sessions (the host listens by now) and announce the host."""
        from .presence import HostAnnouncer

        link = self.link
        assert link is not None
        hub = self.hub
        assert hub is not None
        try:
            self._inbox = link.subscribe(
                self.subjects.host_inbox_all(self.host),
                lambda subject, body: hub.call(self._arrived, subject, body),
            )
            # Served after the inbox subscription: an answer to a client proves both reach it.
            self._opener = link.serve(self.subjects.host_open(self.host), lambda body: b"ok")
            self._announcer = HostAnnouncer(
                link,
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

            link = self.link
            assert link is not None
            self._store = RetainedStore(link, self.host, prefix=self.settings.prefix)
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
        link = self.link
        assert link is not None
        link.publish_nowait(self.subjects.broadcast(self.host, channel), frame)

    # Sessions ------------------------------------------------------------------------------

    def _arrived(self, subject: str, body: Any) -> None:  # selector thread
        hub = self.hub
        if hub is None or self._closed:
            return
        s = hub.sessions.get(subject)
        if s is None:
            name = self.subjects.parse(subject).name
            if len(body) >= 4 and bytes(body[:4]) == _PREAMBLE_MAGIC:
                s = self._open_session(hub, subject, name)
                if s is None:
                    return
            elif len(body) and hub.link is not None:
                # A session this host does not know (it restarted, or ended it): say so.
                hub.link.publish_nowait(self.subjects.client_inbox(self.host, name), b"")
                return
            else:
                return
        hub.deliver(s, body)

    def _open_session(self, hub: Hub, key: str, name: str) -> Optional[_Session]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.local_path)
        except OSError as exc:
            sock.close()
            log.warning("NATS host: cannot reach the host's socket for %s: %s", name, exc)
            return None
        s = _Session(
            key,
            name,
            self,
            sock,
            self.subjects.client_inbox(self.host, name),
            self.settings.max_message,
        )
        hub.add(s)
        return s

    def _unsubscribe(self) -> None:
        hub = self.hub
        for attr in ("_inbox", "_opener"):
            sub = getattr(self, attr)
            setattr(self, attr, None)
            if sub is not None and hub is not None:
                hub.unsubscribe_soon(sub)

    def _close_extras(self) -> None:
        self._unsubscribe()
        shutil.rmtree(self._dir, ignore_errors=True)
        announcer, self._announcer = self._announcer, None
        if announcer is not None:
            try:
                announcer.stop()
            except Exception as exc:  # noqa: BLE001 (its entry expires anyway)
                log.debug("NATS host: announcer stop: %s", exc)


class ClientGateway(_Gateway):
    """The NATS side of one client: a private socket the client connects to."""

    role = "client"

    def __init__(
        self,
        settings: NatsSettings,
        name: Optional[str],
        local_dir: Optional[str] = None,
    ) -> None:
        super().__init__(settings)
        self.client_name_given = name
        self.client_name = name or "client"
        # A renewed gateway (after a failed open) gets its directory back in start().
        self._dir = local_dir or private_socket_dir()
        self.local_path = os.path.join(self._dir, "c.sock")
        self._listener: Optional[socket.socket] = None
        self._broadcasts = False

    @property
    def addr(self) -> str:
        """The address the endpoint connects to (``unix://...``)."""
        return "unix://" + self.local_path

    def start(self) -> ClientGateway:
        os.makedirs(self._dir, mode=0o700, exist_ok=True)
        try:
            hub = self._acquire()
        except BaseException:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise
        try:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._listener = listener
            listener.bind(self.local_path)
            listener.listen(8)
            listener.setblocking(False)
            hub.listen_broadcasts(self)
            self._broadcasts = True
            hub.register(listener, selectors.EVENT_READ, self._on_accept)
        except BaseException:
            self.close()
            raise
        return self

    def renewed(self) -> ClientGateway:
        """Close this gateway and return an unstarted one with the same settings (a
        failed ``open()`` leaves nothing running; the same address is served again)."""
        self.close()
        return ClientGateway(self.settings, self.client_name_given, local_dir=self._dir)

    def _on_accept(self, mask: int) -> None:  # selector thread
        hub = self.hub
        if self._listener is None or hub is None or hub.link is None:
            return
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                log.warning("NATS client: cannot accept the local connection: %s", exc)
            return
        name = f"{self.client_name}~{secrets.token_hex(6)}"
        host_in = self.subjects.client_inbox(self.host, name)
        s = _Session(
            host_in,
            name,
            self,
            sock,
            self.subjects.host_inbox(self.host, name),
            self.settings.max_message,
        )
        hub.add(s, reading=False)
        link = hub.link

        def on_message(subject: str, body: Any) -> None:  # link thread
            hub.call(hub.deliver, s, body)

        async def subscribe() -> None:
            try:
                s.sub = await link.aio.subscribe(host_in, on_message)
                reached = await self._host_reachable(link)
            except Exception as exc:  # noqa: BLE001
                log.warning("NATS client: cannot subscribe %s: %s", host_in, exc)
                hub.call(hub.drop, s)
                return
            if hub.sessions.get(s.key) is not s:
                sub, s.sub = s.sub, None
                if sub is not None:
                    await sub._unsubscribe()
                return
            if not reached:
                log.warning(
                    "NATS client: no host named %r answered on the cluster within %s s",
                    self.host,
                    self.settings.open_timeout,
                )
                hub.call(hub.drop, s)
                return
            # Only now may the endpoint's units go out: replies need the subscription,
            # and the host's subscriptions must have reached this client's server.
            hub.call(self._register_reading, s)

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
        hub = self.hub
        if hub is not None and hub.sessions.get(s.key) is s:
            s.reading = True
            hub.watch(s, bool(s.outq))

    def _close_extras(self) -> None:
        hub = self.hub
        listener, self._listener = self._listener, None
        if listener is not None:
            if hub is not None:
                try:
                    hub.unregister(listener)
                except TimeoutError as exc:
                    log.debug("NATS client: %s", exc)
            listener.close()
        if self._broadcasts and hub is not None:
            self._broadcasts = False
            hub.forget_broadcasts(self)
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
