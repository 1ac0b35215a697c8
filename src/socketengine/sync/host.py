"""The threaded Host: listens, accepts clients, keeps their latest values."""

from __future__ import annotations

import logging
import os
import selectors
import socket
import ssl
import threading
import time
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    List,
    Optional,
    Tuple,
    TypeVar,
    Union,
    overload,
)

from .. import codec, frames, images
from ..compat import HostSeedNames
from ..engine import ConnState
from ..errors import SocketEngineError
from ..fanout import FanOut
from ..limits import (
    DEFAULT_COMPRESS_THRESHOLD,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_HEARTBEAT,
    DEFAULT_KEEP_DEPARTED,
    DEFAULT_KEEP_DEPARTED_BYTES,
    DEFAULT_MAX_BUFFER,
    DEFAULT_MAX_CHANNELS,
    DEFAULT_MAX_CLIENTS,
    DEFAULT_MAX_MESSAGE,
    DEFAULT_MAX_PENDING,
    DEFAULT_RESUME_SESSIONS,
    DEFAULT_RESUME_WINDOW,
    DEFAULT_RETAIN_RELAYED_BYTES,
    DEFAULT_SHM_THRESHOLD,
    check_host_limits,
)
from ..net import forget_listener, listen, listening_port, unix_path
from ..patterns import Pattern
from ..protocol import Protocol, Role
from ..relay import RelaySpec, WritersSpec, relayed_frame, relayed_value
from ..sendqueue import Outgoing
from ..state import Admission, StoredValues
from ..watch import matching_channels
from .connection import Connection
from .endpoint import Endpoint

if TYPE_CHECKING:  # pragma: no cover
    from ..transport.nats.gateway import HostGateway

logger = logging.getLogger("socketengine")

_H = TypeVar("_H", bound="Host")
#: An ``on_connect`` / ``on_disconnect`` callback: ``fn(conn)``.
_C = TypeVar("_C", bound=Callable[[Connection], Any])

_ACCEPTS_PER_EVENT = 64
#: Looked up once: an enum member read through its class is slow on the write path.
_OPEN = ConnState.OPEN
_monotonic = time.monotonic


def _is_open(conn: Connection) -> bool:
    return conn.engine.state is _OPEN


class Host(HostSeedNames, Endpoint[Tuple[Any, Connection]]):
    """A host that clients connect to.

    :param addr: address to listen on.  ``'127.0.0.1'`` (default) accepts only this
        machine; ``'0.0.0.0'`` (or ``'::'``) every interface -- do that only with
        ``token=`` (and ``tls=`` on untrusted networks).
    :param port: TCP port; ``0`` picks a free one, readable afterwards as :attr:`port`.
    :param timeout: seconds that blocking calls may wait: a write to a client whose
        send buffer is full, and the linger of :meth:`close`.
    :param size: read-size hint in bytes (seed parameter); reads are
        ``max(size, 262144)`` bytes on a busy connection, so small values never cripple
        throughput (its receive buffer starts at 4 KiB and grows while reads fill it).
    :param open: bind and listen now (and start the I/O thread); ``False`` defers to
        :meth:`open`.
    :param max_clients: clients (connections that completed the handshake) served at
        once; more are refused with a REFUSE frame.
    :param max_pending: handshakes in progress at once; one more evicts the oldest
        pending handshake of the address with the most of them (see SECURITY.md).
    :param max_channels: distinct channels one client may write on; one more closes
        its connection (logged).
    :param max_stored: bytes of latest values kept for one client (wire size, or for a
        value with more than 256 bytes of metadata its size once decoded if more); a
        value beyond it closes the connection (logged).  Default 256 MiB, or
        ``max_message`` if larger.
    :param max_message: largest frame accepted from a client, bytes (default 64 MiB).
    :param max_buffer: bytes that may wait unsent for one client before writes to it
        block (up to ``timeout``) and then raise :class:`WriteTimeout`.
    :param token: shared secret clients must prove they know (HMAC challenge).
    :param handshake_timeout: seconds a new connection has to complete the handshake
        (TLS included).
    :param heartbeat: seconds between pings on an idle link; a client silent for three
        intervals is declared dead.  ``None`` disables.
    :param spin: seconds a host thread blocked in ``conn.request()`` or an
        acknowledged ``conn.write()`` polls that connection without sleeping before it
        blocks (as :class:`Client`'s ``spin``; default 100 us on more than one CPU).
    :param compression: compress large values on the wire (protocol 1.1): ``"zstd"``,
        ``"lz4"`` or ``"auto"`` (the first installed; ``pip install
        'socket.engine[compression]'``); ``None`` (default): off.  Only for a peer
        that announced the codec, only values whose encoding is at least
        ``compress_threshold`` bytes (default 4096), only when the result is smaller.
    :param shm: send large arrays and raw image frames through shared memory when the
        peer is on this machine, as this user (proven in the handshake; Linux); only a
        small descriptor then crosses the socket.  ``True`` (default) or ``False``.
    :param shm_threshold: data sections (array bytes) of at least this many bytes go
        through shared memory (default 65536); smaller ones through the socket.
    :param tls: an ``ssl.SSLContext`` (server side, with ``load_cert_chain``): every
        connection then runs over TLS, and plaintext clients are refused.
    :param image_codec: codec of ``write_image_all``/``writeImg_ALL`` when none is given:
        ``"raw"`` (default), ``"jpeg"`` or ``"png"``.
    :param image_quality: JPEG quality 1-100 (default 90).
    :param relay: relay what clients write to the other clients: ``True`` (every
        channel) or the channels / :class:`~socketengine.Pattern` s to relay (``False``:
        none, the default).  A receiving client sees who wrote it in
        ``Client.sender(channel)``.  Each client's ``interest`` applies.
    :param writers: with ``relay``: ``{client name: [channels or patterns]}`` it may
        have relayed; a client not listed has nothing relayed.  Names are chosen by
        the clients: use a ``token``.
    :param retain_relayed: with ``relay``: keep the latest relayed value of each channel
        and send it to clients that connect later (like ``write_all(retain=True)``).
    :param retain_relayed_bytes: with ``retain_relayed``: bytes of relayed values kept
        (at wire size, 256 MiB by default); beyond it the channel relayed least recently
        is forgotten (WARNING).  A value larger than this is relayed but not kept.
    :param monitor: serve the live browser monitor on this port (``0``: any free one;
        ``None``: no monitor); its address is ``host.monitor.url``.
    :param monitor_addr: the monitor's address (loopback by default).
    :param monitor_bgr: the monitor shows raw 3-channel frames as BGR (OpenCV's order)
        rather than RGB.
    :param keep_departed: how many disconnected clients' latest values
        :meth:`get_all` keeps reporting (oldest forgotten first).
    :param keep_departed_bytes: bytes of values those departed clients keep, together
        (oldest forgotten first).
    :param resume_window: seconds the host keeps the session of a client whose link
        was lost (not closed), so that when it reconnects both sides replay what the
        other missed: nothing lost, nothing duplicated, in order (protocol 1.2;
        docs/guarantees.md).  ``0`` disables resume; always off with ``url``
        (NATS).  Default 60.
    :param resume_sessions: lost sessions kept at once (oldest dropped first); each
        holds at most ``2 x max_buffer`` bytes (its replay buffer and unsent queue).
    :param url: run over a NATS cluster instead of listening on TCP:
        ``"nats://HOST:4222"`` (comma-separated, or a list, for several servers); needs
        ``name=``.  ``addr``/``port`` are then unused, ``token=`` also authenticates to
        the servers and ``tls=`` is a *client* ``ssl.SSLContext`` for them
        (docs/nats.md).
    :param name: with ``url``: the host's name on the cluster, which clients give as
        ``host=`` (any string; unique per cluster).
    :param connect_timeout: with ``url``: seconds to reach a NATS server (default 5)
        before :class:`ConnectTimeout`.
    """

    # A host thread blocked in conn.request() or an acknowledged conn.write() reads
    # that connection itself (Connection.read_until); wait() and subscriptions, which
    # hear from every client, are handed their values (a client's read it themselves).
    _self_read = True

    _kind = "host"
    _with_conn = True

    def __init__(
        self,
        addr: str = "127.0.0.1",
        port: int = 8080,
        timeout: float = 2,
        size: int = 256,
        open: bool = True,
        *,
        max_clients: int = DEFAULT_MAX_CLIENTS,
        max_message: int = DEFAULT_MAX_MESSAGE,
        max_buffer: int = DEFAULT_MAX_BUFFER,
        token: Union[str, bytes, None] = None,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        keep_departed: int = DEFAULT_KEEP_DEPARTED,
        backlog: int = 128,
        heartbeat: Optional[float] = DEFAULT_HEARTBEAT,
        tls: Optional[ssl.SSLContext] = None,
        image_codec: str = "raw",
        image_quality: int = 90,
        relay: RelaySpec = False,
        writers: WritersSpec = None,
        retain_relayed: bool = False,
        retain_relayed_bytes: int = DEFAULT_RETAIN_RELAYED_BYTES,
        monitor: Optional[int] = None,
        monitor_addr: str = "127.0.0.1",
        monitor_bgr: bool = False,
        max_pending: int = DEFAULT_MAX_PENDING,
        max_channels: int = DEFAULT_MAX_CHANNELS,
        max_stored: Optional[int] = None,
        keep_departed_bytes: int = DEFAULT_KEEP_DEPARTED_BYTES,
        compression: Optional[str] = None,
        compress_threshold: int = DEFAULT_COMPRESS_THRESHOLD,
        resume_window: float = DEFAULT_RESUME_WINDOW,
        resume_sessions: int = DEFAULT_RESUME_SESSIONS,
        url: Optional[str] = None,
        name: Optional[str] = None,
        connect_timeout: Optional[float] = None,
        shm: bool = True,
        shm_threshold: int = DEFAULT_SHM_THRESHOLD,
        spin: Optional[float] = None,
    ) -> None:
        gateway: Optional[HostGateway] = None
        if url is not None:
            from ..transport.nats.gateway import nats_host

            addr, port, tls, gateway = nats_host(
                url, name, token, tls, connect_timeout, max_message
            )
        #: The host's name on a NATS cluster (``None``: a direct TCP host).
        self.name = name
        self._gateway = gateway
        super().__init__(
            addr,
            port,
            timeout,
            size,
            token=token,
            max_message=max_message,
            max_buffer=max_buffer,
            handshake_timeout=handshake_timeout,
            heartbeat=heartbeat,
            tls=tls,
            image_codec=image_codec,
            image_quality=image_quality,
            spin=spin,
        )
        self._init_host(
            check_host_limits(
                max_clients,
                keep_departed,
                backlog,
                max_pending=max_pending,
                keep_departed_bytes=keep_departed_bytes,
                max_channels=max_channels,
                max_stored=max_stored,
                max_message=self.max_message,
                resume_window=resume_window,
                resume_sessions=resume_sessions,
                retain_relayed_bytes=retain_relayed_bytes,
            ),
            monitor=(monitor, monitor_addr, monitor_bgr),
            relay=(relay, writers, retain_relayed),
        )
        self._init_compression(compression, compress_threshold)
        self._init_shm(shm, shm_threshold)
        self._listener: Optional[socket.socket] = None
        # Every accepted connection, in accept order, until it departs.
        self._conns: Dict[int, Connection] = {}
        self._retain_lock = threading.Lock()
        self._fan: FanOut[Connection] = FanOut()
        self._fan_due = False  # a _fan_tick is scheduled on the loop thread
        self._on_connect: List[Callable[[Connection], Any]] = []
        self._on_disconnect: List[Callable[[Connection], Any]] = []
        if open:
            self.open()

    # -- lifecycle ------------------------------------------------------------------

    def open(self: _H) -> _H:
        """Bind and listen on ``addr:port`` and start the I/O thread.

        Raises ``OSError`` naming ``addr:port`` if it cannot bind (e.g. in use).
        """
        self._check_not_closed()
        with self._state_lock:
            if self.opened:
                return self
            gateway = self._gateway
            if gateway is not None:
                try:
                    gateway.connect()  # ConnectTimeout / AuthenticationError
                    for channel, frame in gateway.retained_items().items():
                        self._retained.retain(channel, [frame])
                except BaseException:
                    gateway.abandon()  # nothing started, nothing left behind
                    raise
            self._listener = listen(self.addr, self._port, self.backlog)
            self._port = listening_port(self._listener)
            self._loop.register(self._listener, selectors.EVENT_READ, self._on_accept)
            self._loop.call_soon(self._start_heartbeat)
            self._loop.start()
            self.opened = True
        logger.info("%r: listening", self)
        try:
            if gateway is not None:
                gateway.serve({"pid": os.getpid()})
            self._start_monitor()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Close every client connection gracefully (flush, BYE; up to ``timeout`` s),
        stop listening and join the I/O thread.  Idempotent."""
        self._fan_flush()  # deferred broadcasts go before the BYEs
        with self._state_lock:
            if self.stopped:
                return
            self.stopped = True
            was_open = self.opened
            self.opened = False
        self._stop_monitor()
        if not was_open:
            self._loop.stop()
            self._release_waiters()
            if self._gateway is not None:
                self._gateway.close()
            return
        done = threading.Event()

        def shut() -> None:
            if self._listener is not None:
                self._loop.unregister(self._listener)
                self._listener.close()
                forget_listener(self.addr)
            for conn in list(self._conns.values()):
                conn.begin_close(self.timeout)
            done.set()

        self._loop.call_soon(shut)
        done.wait(self.timeout + 1.0)
        deadline = time.monotonic() + self.timeout + 1.0
        for conn in list(self._conns.values()):
            conn.closed.wait(max(0.0, deadline - time.monotonic()))
        self._loop.stop()
        if self._gateway is not None:
            self._gateway.close()
        self._release_waiters()
        self._dispatcher.stop(self.timeout)
        logger.info("%r: closed", self)

    # -- reading ------------------------------------------------------------------------

    def clients(self) -> List[Connection]:
        """The connected clients (handshake done, not closed), in connection order."""
        return [c for c in list(self._conns.values()) if c.is_open]

    def get_client(self, name: str) -> Optional[Connection]:
        """The connected client that gave ``name`` (the newest one), or ``None``."""
        found = None
        for conn in list(self._conns.values()):
            if conn.name == name and conn.is_open:
                found = conn
        return found

    def get(self, channel: str, default: Any = None) -> Any:
        """The most recent value received on ``channel`` from any client, or ``default``.

        Images sent compressed are returned decoded (numpy arrays).
        """
        self._polled()
        departed = [c for _, c in self._departed.items()]
        return self._read_host(channel, default, [*list(self._conns.values()), *departed])

    @overload
    def get_all(self, channel: str) -> List[Any]: ...

    @overload
    def get_all(self, channel: Pattern) -> Dict[str, List[Any]]: ...

    def get_all(self, channel: Union[str, Pattern]) -> Any:
        """The latest value on ``channel`` from each client, in connection order.

        Includes clients that have disconnected, up to ``keep_departed`` of them
        (the most recently departed), so a client that writes and closes at once is
        still seen.  ``[]`` when no client sent on ``channel``.  With a
        :class:`~socketengine.Pattern`: ``{channel: [values]}`` for every matching
        channel any of them sent on.
        """
        self._polled()
        sessions = list(self._conns.items()) + self._departed.items()
        sessions.sort(key=lambda item: item[0])
        if isinstance(channel, Pattern):
            names = matching_channels(channel, (c.values for _, c in sessions))
            return {name: _latest_of_each(sessions, name) for name in names}
        return _latest_of_each(sessions, channel)

    # -- writing ------------------------------------------------------------------------

    def write_all(
        self, channel: str, data: Any, retain: bool = False, compress: Optional[bool] = None
    ) -> int:
        """Send ``data`` on ``channel`` to every connected client; return how many.

        The value is encoded once (``TypeError`` before anything is sent).  A client
        whose link is down and may resume gets it on resume (held in its session, up
        to ``max_buffer`` bytes; counted).  With ``retain=True`` the host also keeps it
        and sends it to every client that connects later, right after its handshake
        (like MQTT's retained messages; for configuration and state).  Thread-safe.
        """
        self._check_open()
        gateway = self._gateway
        if gateway is not None:
            fanned = self._nats_broadcast(channel, data, retain, compress, self.clients)
            if fanned is not None:
                return fanned
        if not retain and (self._codecs is not None or compress):
            sent = 0
            with self._held_lock:
                audience = [c for c in self.clients() if c.wants(channel)]
                for encoded, conns in self._encode_groups(channel, data, compress, audience):
                    if type(encoded) is bytes:
                        sent += self._send_all(encoded, len(encoded), clients=conns)
                    else:
                        sent += self._send_all(encoded[0], encoded[1], clients=conns)
                sent += self._hold_value(channel, data)
            return sent
        if not retain:
            encoded = frames.value_item(channel, data)
            if isinstance(encoded, bytes):
                return self._broadcast_item(encoded, channel)
            frame_parts, size = encoded
            return self._send_all(frame_parts, size, channel=channel)
        parts, nbytes = frames.value_frame(frames.DATA, channel, data)
        with self._retain_lock:  # see _on_ready: no client misses or reorders it
            self._retained.retain(channel, parts)
            # Not held for a client whose link is down: a resume replays retained values.
            sent = self._send_all(parts, nbytes, channel=channel, hold=False)
        if gateway is not None:
            gateway.retain(channel, self._retained.frame(channel))
        return sent

    def clear_retained(self, channel: Optional[str] = None) -> None:
        """Forget the retained value of ``channel`` (``None``: of every channel)."""
        with self._retain_lock:
            self._retained.clear(channel)
        if self._gateway is not None:
            self._gateway.unretain(channel)

    def write_image_all(
        self,
        img: Any,
        channel: str = "image",
        codec: Optional[str] = None,
        quality: Optional[int] = None,
        conflate: bool = True,
    ) -> int:
        """Send a numpy image to every connected client on ``channel`` (default "image").

        ``codec``/``quality`` as for :meth:`Client.write_image` (default: the host's
        ``image_codec``/``image_quality``).  The image is encoded once, whatever the
        number of clients; a slow client gets the newest frame, never a backlog.

        ``conflate=False`` makes the channel lossless: every frame is queued like a
        plain value, in order, and a slow receiver slows the writer (backpressure,
        bounded by ``max_buffer``) instead of getting only the newest frame.
        """
        self._check_open()
        parts, nbytes = self._image_frame(img, channel, codec, quality, conflate)
        return self._send_all(parts, nbytes, image=channel if conflate else None, channel=channel)

    def _send_all(
        self,
        parts: Outgoing,
        nbytes: int,
        image: Optional[str] = None,
        channel: Optional[str] = None,
        exclude: Optional[Connection] = None,
        clients: Optional[List[Connection]] = None,
        hold: bool = True,
    ) -> int:
        """Queue one encoded frame for every client (that wants ``channel``, but
        ``exclude``; or exactly ``clients``); a slow client never blocks this.  With
        ``channel`` (and ``hold``), also for every client whose link is down and may
        resume (held sessions).  Returns for how many clients it was queued."""
        held = 0
        with self._held_lock:  # every client is either live or held meanwhile
            fan = self._fan
            if clients is None and channel is not None:
                # Cached; may hold some not open (yet or any more): _fan_out skips them.
                clients = self._wanting(channel, self._conns)
                if fan and not fan.joins(clients):
                    self._fan_flush()  # before the held sessions get this one
                if hold:
                    held = self._hold_all(parts, nbytes, image, channel, exclude)
                if type(parts) is bytes and exclude is None:
                    return held + self._fan_item(parts, clients)
            if fan:
                self._fan_flush()
            if clients is None:
                clients = self.clients()
            return held + self._fan_out(parts, nbytes, image, clients, exclude)

    def _broadcast_item(self, item: bytes, channel: str) -> int:
        """``write_all`` of a small value (a BATCH item): :meth:`_send_all`, with the
        common step of a burst (:meth:`_join_run`) first, in fewer calls."""
        with self._held_lock:
            fan = self._fan
            if self._join_run(fan, item, channel, self._conns, _monotonic()):
                count = len(fan.recipients)
                self._fan_next()
                return count
            return self._send_all(item, len(item), channel=channel)

    def _fan_item(self, item: bytes, clients: List[Connection]) -> int:
        """A small value for every open connection of ``clients`` (``_wanting``'s
        cached audience; ``_held_lock`` held).  In a burst it joins the run of
        deferred broadcasts (fanout.py): queued once, handed to every recipient on the
        loop thread's next step (or here, once the run is full).  An isolated one
        goes out at once."""
        fan = self._fan
        count = fan.defer(item, clients, _monotonic(), _is_open)
        if count < 0:  # isolated
            return self._fan_out(item, len(item), None, clients)
        self._fan_next()
        return count

    def _fan_next(self) -> None:
        """A value joined the run: hand the run over now if it is full, else make
        sure the loop thread's next step does (``_held_lock`` held)."""
        if self._fan.full:
            self._fan_flush()
        elif not self._fan_due:
            self._fan_due = True
            self._loop.call_soon(self._fan_tick)

    def _fan_tick(self) -> None:
        """The loop thread's step after a run of deferred broadcasts began."""
        self._fan_due = False
        self._fan_flush()

    def _fan_flush(self) -> None:
        """Hand the run of deferred broadcasts to each of its recipients, in order
        (any thread; no connection lock held: ``_held_lock`` comes first)."""
        with self._held_lock:
            fan = self._fan
            if not fan:
                return
            # The run stays visible (fan.items) until every recipient has it: a thread
            # writing to one of them meanwhile waits here (Connection.send_*), so
            # nothing overtakes it.
            items, nbytes = fan.items, fan.nbytes
            for conn in fan.recipients:
                try:
                    conn._send_run(items, nbytes)
                except (ConnectionError, SocketEngineError) as exc:
                    logger.info("%r: not sent to %r: %s", self, conn, exc)
            fan.clear()

    def _fan_out(
        self,
        parts: Outgoing,
        nbytes: int,
        image: Optional[str],
        clients: List[Connection],
        exclude: Optional[Connection] = None,
    ) -> int:
        sent = 0
        # An isolated broadcast goes out at once; in a burst of them (FanOut.in_burst)
        # the loop thread flushes each connection once for many frames instead of a
        # syscall per frame.
        fan = self._fan
        defer = fan.in_burst(len(clients), time.monotonic())
        item = type(parts) is bytes
        for conn in clients:
            if conn.engine.state is not _OPEN or conn is exclude:
                continue  # handshaking or closing: not a client now (held: _hold_all)
            try:
                if item:
                    conn.send_item(parts, False, defer)  # type: ignore[arg-type]
                else:
                    conn.send_parts(parts, nbytes, image=image, block=False, defer=defer)
                conn.messages_out += 1
                sent += 1
            except (ConnectionError, SocketEngineError) as exc:
                logger.info("%r: not sent to %r: %s", self, conn, exc)
        fan.last = time.monotonic()  # the end of this broadcast
        return sent

    # -- callbacks ----------------------------------------------------------------------

    def on_connect(self, fn: _C) -> _C:
        """Call ``fn(conn)`` when a client completes its handshake (usable as a decorator).

        Runs on a callback thread, before any callback for that client's messages
        that runs there; an ``inline=True`` callback (on the I/O thread) may see the
        client's first messages before it.  Returns ``fn``.
        """
        self._on_connect = [*self._on_connect, fn]
        return fn

    def on_disconnect(self, fn: _C) -> _C:
        """Call ``fn(conn)`` when a client's connection closes (usable as a decorator).

        Runs on a callback thread, after the callbacks for that client's messages.
        Returns ``fn``.
        """
        self._on_disconnect = [*self._on_disconnect, fn]
        return fn

    def _item(self, value: Any, conn: Connection) -> Any:
        return (value, conn)

    def _call_handler(self, fn: Callable[..., Any], value: Any, conn: Connection) -> Any:
        return fn(value, conn)

    def _call_any(self, fn: Callable[..., Any], channel: str, value: Any, conn: Connection) -> Any:
        return fn(channel, value, conn)

    def _notify(self, hooks: List[Callable[[Connection], Any]], conn: Connection) -> None:
        for fn in hooks:
            try:
                fn(conn)
            except Exception:
                logger.exception("%r: connection callback %r raised (ignored)", self, fn)

    # -- loop thread ----------------------------------------------------------------------

    def _on_accept(self, mask: int) -> None:
        listener = self._listener
        if listener is None:
            return
        for _ in range(_ACCEPTS_PER_EVENT):
            try:
                sock, address = listener.accept()
                if not isinstance(address, tuple):  # a Unix socket: named by its file
                    address = (unix_path(self.addr) or "unix", 0)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. EMFILE: too many open files
                logger.error("%r: accept failed: %s", self, exc)
                return
            sock.setblocking(False)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # pragma: no cover
                pass
            if self.tls is not None:
                try:
                    sock = self.tls.wrap_socket(
                        sock, server_side=True, do_handshake_on_connect=False
                    )
                except (ssl.SSLError, OSError) as exc:
                    logger.warning("%r: TLS setup for %s failed: %s", self, address, exc)
                    sock.close()
                    continue
            self._expire_sessions()
            protocol = Protocol(
                Role.HOST,
                token=self._token,
                max_message=self.max_message,
                heartbeat=self.heartbeat,
                read_size=self.read_size,
                shm_threshold=self._shm_threshold,
                session=next(self._sessions),
                sessions=self._resume if self.resume_window else None,
            )
            conn = Connection(self, sock, protocol, address)
            refusal, evicted = self._admission.arrive(
                protocol.session,
                address[0],
                time.monotonic(),
                self._said_hello,
                resumable=self.resume_window > 0,
            )
            if refusal is not None:
                conn.refuse(*refusal, linger=min(self.timeout, 2.0))
                continue
            for key in evicted:
                victim = self._conns.get(key)
                if victim is not None:
                    self._evict(victim)
            self._conns[protocol.session] = conn
            self._audience_changed()
            conn.attach()
            if self.tls is None:
                # A client's HELLO is often here already: read it now, so that this
                # handshake counts as progressing before the next accepts evict one.
                conn.on_event(selectors.EVENT_READ)
        warning = self._admission.warning(time.monotonic())
        if warning is not None:
            logger.warning("%r: %s", self, warning)

    def _said_hello(self, key: int) -> bool:
        """The pending connection ``key`` sent a complete HELLO."""
        conn = self._conns.get(key)
        return conn is not None and bool(conn.engine.protocol._peer_nonce)

    def _evict(self, conn: Connection) -> None:
        """Give up on a pending handshake (loop thread): REFUSE ``busy``, close."""
        reason, code = Admission.busy(self.max_pending)
        logger.debug("%r: evicting %s: %s", self, conn._peer(), reason)
        out = conn.engine.refuse(reason, code, time.monotonic(), 0.0)
        with conn._lock:
            conn._queue.push([out], len(out))
            if not conn._want_write:
                conn._flush_locked()  # best effort: tell the peer why
        conn._finish()

    def stats(self) -> Dict[str, Any]:
        """Image counters (see :meth:`Endpoint.stats`) plus ``"clients"``: each connected
        client's ``conn.stats()``, keyed by ``name`` or ``"host:port"``."""
        out = super().stats()
        out["clients"] = {
            c.name or f"{c.address[0]}:{c.address[1]}": c.stats() for c in self.clients()
        }
        return out

    def _connections(self) -> List[Connection]:
        return list(self._conns.values())

    def _on_ready(self, conn: Connection) -> None:
        # Bounded like any client, also while a turned-away one is being closed.
        self._stored[conn] = StoredValues(self.max_channels, self.max_stored)
        self._resumed(conn)
        refusal = self._admission.opened(conn.session)
        if refusal is not None:
            # Every seat was taken while this handshake ran: close it at once.
            logger.warning("%r: closing %s after its handshake: %s", self, conn._peer(), refusal[0])
            conn.begin_close(min(self.timeout, 2.0))
            return
        # Retained values go first, and the connection becomes visible to write_all()
        # under the same lock write_all(retain=True) holds: a value retained meanwhile is
        # either in this replay or written to the (now visible) connection after it.
        with self._retain_lock:
            for frame in self._retained.replay(conn.wants):
                conn._queue_parts([frame])
                conn.messages_out += 1
            conn.mark_ready()
        self._audience_changed()
        logger.info("%r: client %r connected", self, conn)
        if self._on_connect:
            self._dispatcher.submit(conn, self._notify, self._on_connect, conn)
        self._forget(self._departed.forget_named(conn.name))  # a named client that reconnects

    def _supersede(self, old: Connection) -> None:
        """Close a link whose session a new one resumed, at once (loop thread)."""
        old.engine.lost(ConnectionResetError("the client resumed on a new link"))
        old._finish()

    def _on_closed(self, conn: Connection) -> None:
        self._audience_changed()
        self._keep_session(conn)
        self._conns.pop(conn.session, None)
        stored = self._stored.pop(conn, None)
        if not self._admission.left(conn.session):
            # Never completed the handshake, or turned away after it: nothing to remember.
            self._forget_latest(conn)
            return
        logger.info("%r: client %r disconnected", self, conn)
        self._gap_from(conn)
        will = conn.engine.will_due()
        if will is not None and not self.stopped:
            self._publish_will(conn, *will)
        if self._on_disconnect:
            self._dispatcher.submit(conn, self._notify, self._on_disconnect, conn)
        if conn.values:
            size = 0 if stored is None else stored.nbytes
            self._forget(self._departed.add(conn.session, conn, size))

    def _forget(self, conns: List[Connection]) -> None:
        """These clients' values are forgotten: by get() too (loop thread)."""
        for conn in conns:
            self._forget_latest(conn)

    def _publish_will(self, conn: Connection, channel: str, meta: bytes) -> None:
        """A client vanished: its last will arrives as if it had written it, here and
        at every other client (loop thread)."""
        logger.info("%r: publishing the last will of %r on %r", self, conn, channel)
        value = codec.decode(meta, None)
        conn.values[channel] = value
        self._latest[channel] = value
        conn.received_at[channel] = time.time()
        if self._images_kept(conn):
            self._not_an_image(conn, channel)
        self._deliver(conn, channel, value)
        parts, nbytes = frames.value_frame(frames.DATA, channel, value)
        self._send_all(parts, nbytes, channel=channel, exclude=conn)

    def _relay_out(self, conn: Connection, channel: str, meta: Any, data: Any) -> None:
        """A client wrote a value this host relays: to the other clients (loop thread)."""
        parts, nbytes = relayed_frame(channel, conn._origin(), meta, data)
        self._relay_send(conn, channel, parts, nbytes)

    def _relay_value(self, conn: Connection, channel: str, value: Any) -> None:
        parts, nbytes = relayed_value(channel, conn._origin(), value)
        self._relay_send(conn, channel, parts, nbytes)

    def _relay_send(self, conn: Connection, channel: str, parts: List[Any], nbytes: int) -> None:
        if self._retain_relayed:
            with self._retain_lock:
                self._retained.retain(channel, parts, relayed=True)
                self._send_all(parts, nbytes, channel=channel, exclude=conn)
            return
        self._send_all(parts, nbytes, channel=channel, exclude=conn)

    def __repr__(self) -> str:
        state = "closed" if self.stopped else ("open" if self.opened else "not open")
        return f"<Host {self._where()} {state} clients={len(self._conns)}>"


def _latest_of_each(sessions: List[Tuple[int, Connection]], channel: str) -> List[Any]:
    """The latest value on ``channel`` of each session that sent one, in order."""
    out = []
    for _, conn in sessions:
        values = conn.values
        if channel in values:
            if type(values[channel]) is images.EncodedImage:
                out.append(conn.get(channel))
                continue
            out.append(values[channel])
    return out
