"""The threaded Client: connects to a host, keeps the latest value of every channel."""

from __future__ import annotations

import errno
import logging
import selectors
import socket
import ssl
import threading
import time
from types import FunctionType
from typing import TYPE_CHECKING, Any, Iterable, List, Optional, Tuple, TypeVar, Union

from ..compat import ClientSeedNames
from ..endpoint import WriteItems
from ..engine import ConnState
from ..errors import (
    ConnectionClosed,
    ConnectTimeout,
    EndpointClosed,
    HandshakeError,
    HostBusy,
    SocketEngineConnectionError,
    WriteTimeout,
)
from ..frames import INTEREST, value_frame
from ..limits import (
    DEFAULT_CLIENT_MAX_CHANNELS,
    DEFAULT_COMPRESS_THRESHOLD,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_HEARTBEAT,
    DEFAULT_MAX_BUFFER,
    DEFAULT_MAX_MESSAGE,
    DEFAULT_RECONNECT_MAX,
    DEFAULT_SHM_THRESHOLD,
    check_interest,
    check_name,
    check_seconds,
)
from ..net import connect, peer_address, set_nodelay, unix_path
from ..patterns import Pattern
from ..protocol import Protocol, Role, encode_will
from ..sendqueue import SendQueue
from ..session import Session
from ..state import Backoff, log_lost_link
from .connection import Connection, ReaderWake
from .delivery import Flag
from .endpoint import Endpoint
from .loop import Loop, TimerHandle
from .writer import ClientWriter

if TYPE_CHECKING:  # pragma: no cover
    from ..transport.nats.gateway import ClientGateway

logger = logging.getLogger("socketengine")

_K = TypeVar("_K", bound="Client")

# Errors that mean "the host is not (yet) there": keep trying.
_RETRYABLE = (ConnectionRefusedError, ConnectionResetError, ConnectionAbortedError, TimeoutError)
# open() retries a refused connection with this backoff cap (seconds): a host that is
# starting up is found quickly.
_OPEN_RETRY_MAX = 0.5
#: Looked up once: an enum member read through its class is slow on the write path.
_OPEN = ConnState.OPEN
#: sync/writer.py runs interpreted (calling an instance would then cost a slot lookup).
_WRITER_INTERPRETED = isinstance(ClientWriter.__call__, FunctionType)


class Client(ClientSeedNames, Endpoint[Any]):
    """A client of a :class:`Host`.

    :param addr: the host's address (name, IPv4 or IPv6).
    :param port: the host's TCP port.
    :param timeout: seconds that blocking calls may wait: each connection attempt, a
        write while the send buffer is full, the linger of :meth:`close`.
    :param size: read-size hint in bytes (seed parameter); reads are
        ``max(size, 262144)`` bytes on a busy connection (its receive buffer starts at
        4 KiB and grows while reads fill it).
    :param open: connect now; ``False`` defers to :meth:`open`.
    :param connect_timeout: total seconds :meth:`open` keeps retrying while the host
        refuses the connection; ``None`` (default) waits forever, as the seed did.
        Then :class:`ConnectTimeout` (a ``ConnectionError``) names ``addr:port``.
    :param name: this client's name, sent in the handshake (the host's
        ``conn.name`` / ``get_client(name)``).
    :param token: the host's shared secret, if it has one.
    :param max_message: largest frame accepted from the host, bytes.
    :param max_buffer: bytes that may wait unsent before writes block (up to
        ``timeout``) and then raise :class:`WriteTimeout`.
    :param handshake_timeout: seconds the host has to complete the handshake.
    :param heartbeat: seconds between pings on an idle link; a host silent for three
        intervals is declared dead.  ``None`` disables.
    :param reconnect: when the connection is lost (not closed by us), reconnect in
        the background with exponential backoff (from 0.02 s, doubling, capped at
        ``reconnect_max`` seconds, with +-20 % jitter).  Writes made meanwhile are kept,
        up to ``max_buffer`` bytes, and sent first, in order, once reconnected.
    :param image_codec: codec of ``write_image``/``writeImg`` when none is given:
        ``"raw"`` (default, exact), ``"jpeg"`` or ``"png"``.
    :param image_quality: JPEG quality 1-100 (default 90).
    :param interest: the channels (exact names or :class:`~socketengine.Pattern` s) this
        client wants from the host's broadcasts (``write_all``, relayed writes,
        retained values): the host sends it nothing else, as pyzmq filters on the PUB
        side.  ``None`` (default): everything.  Change it with :meth:`set_interest`.
        At most 2048 keys (``MAX_INTEREST_KEYS``) of at most 32 KiB of UTF-8 names and
        pattern texts together (``MAX_INTEREST_BYTES``), protocol limits: beyond them
        ``ValueError``, before anything is sent (a host would close the connection).
    :param will: a last will ``(channel, value)``: the host publishes ``value`` on
        ``channel`` as if this client had written it (to its own callbacks, waiters and
        subscriptions, and to its other clients) if this client vanishes without
        saying goodbye -- a crash, a kill, a link declared dead.  A polite
        :meth:`close` does not trigger it.  At most 16 KiB encoded, no arrays; its
        channel name at most 1,024 UTF-8 bytes (``ValueError`` otherwise).
    :param url: connect through a NATS cluster instead of TCP: ``"nats://HOST:4222"``
        (comma-separated, or a list, for several servers); needs ``host=``.
        ``token=`` also authenticates to the servers; ``tls=`` is the
        ``ssl.SSLContext`` for them; ``connect_timeout`` bounds reaching a server
        (default 5 s).  See docs/nats.md.
    :param host: with ``url``: the name of the host to connect to (``Host(name=...)``).
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
    :param max_channels: channels whose latest value this client keeps (default
        100,000); beyond it the channel that arrived first is forgotten (WARNING).  A
        relaying host forwards what its other clients write: this bounds what they can
        make this client hold.
    :param max_stored: bytes of latest values kept, at wire size (default 1 GiB, or
        ``max_message`` if larger); beyond it, the same.  The newest value always stays.
    :param spin: seconds a thread waiting for a reply (:meth:`request`,
        ``write(ack=True)``, :meth:`sync`), or for an answer (``wait()`` or a
        subscription's ``get()`` within 1 ms of a write, before the host sent anything
        since), polls the socket without sleeping before it blocks, so a quick reply
        costs no thread wake-up (docs/reacting.md, "Waiting for a reply spins first");
        other waits sleep at once.  ``None`` (default): 100 us (``DEFAULT_SPIN``) when
        the process may use more than one CPU, else 0; 0 disables; at most 1.  A spin
        that runs out before the reply sends the next 1, 3, 7 ... 63 waits of that kind
        (replies, answers) on that connection to sleep at once.  Settable:
        ``client.spin``.
    :param tls: an ``ssl.SSLContext`` (client side, e.g.
        ``ssl.create_default_context(cafile=...)``): the connection runs over TLS and
        the host's certificate is verified against ``addr`` as the context says.
    """

    _kind = "client"

    def __init__(
        self,
        addr: str = "127.0.0.1",
        port: int = 8080,
        timeout: float = 2,
        size: int = 256,
        open: bool = True,
        *,
        connect_timeout: Optional[float] = None,
        name: Optional[str] = None,
        token: Union[str, bytes, None] = None,
        max_message: int = DEFAULT_MAX_MESSAGE,
        max_buffer: int = DEFAULT_MAX_BUFFER,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        heartbeat: Optional[float] = DEFAULT_HEARTBEAT,
        reconnect: bool = True,
        reconnect_max: float = DEFAULT_RECONNECT_MAX,
        tls: Optional[ssl.SSLContext] = None,
        image_codec: str = "raw",
        image_quality: int = 90,
        interest: Optional[Iterable[Union[str, Pattern]]] = None,
        will: Optional[Tuple[str, Any]] = None,
        compression: Optional[str] = None,
        compress_threshold: int = DEFAULT_COMPRESS_THRESHOLD,
        url: Optional[str] = None,
        host: Optional[str] = None,
        shm: bool = True,
        shm_threshold: int = DEFAULT_SHM_THRESHOLD,
        max_channels: int = DEFAULT_CLIENT_MAX_CHANNELS,
        max_stored: Optional[int] = None,
        spin: Optional[float] = None,
    ) -> None:
        gateway: Optional[ClientGateway] = None
        if url is not None:
            from ..transport.nats.gateway import nats_client

            addr, port, tls, gateway = nats_client(
                url, host, name, token, tls, connect_timeout, max_message
            )
        self._gateway = gateway
        #: The name of the host on a NATS cluster (``None``: direct TCP).
        self.host = host
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
        self._init_compression(compression, compress_threshold)
        self._init_shm(shm, shm_threshold)
        self.name = check_name(name)
        self._will = None if will is None else encode_will(*will)
        self._interest = check_interest(interest)
        self._init_budget(max_channels, max_stored)
        self.connect_timeout = check_seconds("connect_timeout", connect_timeout, allow_none=True)
        self.reconnect = bool(reconnect)
        self.reconnect_max = check_seconds("reconnect_max", reconnect_max) or 0.0
        # Holds the current link (self._conn); it is also this instance's write(), with
        # no interpreted frame when compiled (sync/writer.py), unless a subclass
        # defines write().  Interpreted, its bound __call__: one frame, as a method.
        self._writer = writer = ClientWriter(self, plain=self._codecs is None)
        if type(self).write is Client.write:
            self.__dict__["write"] = writer.__call__ if _WRITER_INTERPRETED else writer
        # Writes made while disconnected (reconnect=True), sent first on reconnect;
        # image frames in it conflate like in a connection's queue.
        self._link_lock = threading.Condition()
        self._outbox = SendQueue(self.max_buffer, self._images.queue_hook)
        # The resumable session (protocol 1.2): kept across links, so a reconnection
        # replays what the host did not receive, and gets what this client did not.
        self._session = Session(b"", self.name, None)
        # Wakes a thread reading the connection for a subscription that another
        # thread closes (Connection.read_until); a pipe made on first use.
        self._reader_wake = ReaderWake()
        # Requests in flight survive a lost link only if a reconnection may resume it.
        self._session.keep_requests = self.reconnect
        self._backoff = Backoff(self.reconnect_max)
        self._retry_timer: Optional[TimerHandle] = None  # the next reconnection attempt
        self._retry_sock: Optional[socket.socket] = None  # an attempt connecting now
        self._retry_addrs: List[Any] = []  # the addresses this attempt has yet to try
        self._attempt_timer: Optional[TimerHandle] = None  # its connect deadline
        # The attempt whose name resolution runs in a thread now (None: none).
        self._resolving: Optional[object] = None
        self._pending: Optional[Connection] = None  # a reconnection in its handshake
        self._lost_early: Optional[Connection] = None  # a link lost before open() returned
        self.reconnects = 0
        if open:
            self.open()

    @property
    def connected(self) -> bool:
        """True while the connection to the host is open."""
        conn = self._conn
        return conn is not None and conn.is_open

    # -- lifecycle ------------------------------------------------------------------

    def open(self: _K) -> _K:
        """Connect to the host and complete the handshake; start the I/O thread.

        Retries while the host refuses (it may not be up yet) or gave up on the
        handshake under a flood (:class:`~socketengine.HostBusy`), for at most
        ``connect_timeout`` seconds in all.  Raises :class:`ConnectTimeout`,
        :class:`HandshakeError` or :class:`AuthenticationError`.
        """
        self._check_not_closed()
        with self._state_lock:
            if self.opened:
                return self
            gateway = self._gateway
            if gateway is not None and gateway.link is None:
                gateway.start()  # ConnectTimeout / AuthenticationError
            try:
                conn = self._open_link()
            except BaseException:
                if gateway is not None:
                    self._gateway = gateway.renewed()
                raise
            self._conn = conn
            self._loop.call_soon(self._start_heartbeat)
            self.opened = True
            self._loop.call_soon(self._reconnect_if_lost_early, conn)
        logger.info("%r: connected", self)
        return self

    def _open_link(self) -> Connection:
        """Connect and complete the handshake; a host that gave up on the handshake
        under a flood (:class:`HostBusy`) is tried again until ``connect_timeout``."""
        deadline = None if self.connect_timeout is None else time.monotonic() + self.connect_timeout
        backoff = Backoff(_OPEN_RETRY_MAX, jitter=0.0)
        while True:
            sock = self._connect()
            try:
                self._loop.start()  # inside the try: Ctrl-C may land in start() itself
                return self._handshake(sock)
            except BaseException as exc:
                # Leave no thread behind; a later open() starts a fresh loop.
                self._loop.stop()
                self._loop = Loop(self._loop.name)
                delay = next(backoff)
                if not isinstance(exc, HostBusy) or (
                    deadline is not None and time.monotonic() + delay >= deadline
                ):
                    raise
                logger.info("%r: %s; trying again", self, exc)
            time.sleep(delay)  # backoff between attempts, not synchronisation

    def _connect(self) -> socket.socket:
        deadline = None if self.connect_timeout is None else time.monotonic() + self.connect_timeout
        backoff = Backoff(_OPEN_RETRY_MAX, jitter=0.0)
        attempts = 0
        while True:
            attempt = self.timeout if self.timeout > 0 else None
            if deadline is not None:
                left = deadline - time.monotonic()
                attempt = left if attempt is None else min(attempt, left)
            try:
                sock = connect(self.addr, self._port, attempt)
                break
            except socket.gaierror as exc:
                raise SocketEngineConnectionError(
                    f"cannot resolve the host name {self.addr!r}: {exc.strerror or exc} "
                    "(check addr=; use an IP address or a name this machine can resolve)"
                ) from exc
            except _RETRYABLE as exc:
                attempts += 1
                if attempts == 1:
                    logger.info(
                        "%r: waiting for the host at %s:%s (%s); retrying until it accepts",
                        self,
                        self.addr,
                        self._port,
                        exc,
                    )
            delay = next(backoff)
            if deadline is not None and time.monotonic() + delay >= deadline:
                raise ConnectTimeout(
                    f"could not connect to {self.addr}:{self._port} within "
                    f"{self.connect_timeout} s ({attempts} attempts): is the host running?"
                )
            time.sleep(delay)  # backoff between attempts, not synchronisation
        set_nodelay(sock)
        sock.setblocking(False)
        return sock

    def _new_connection(self, sock: socket.socket) -> Connection:
        address = peer_address(sock, self.addr)
        if self.tls is not None:
            # The TLS handshake itself runs non-blocking in the loop (Connection).
            sock = self.tls.wrap_socket(
                sock, server_hostname=self.addr or None, do_handshake_on_connect=False
            )
        protocol = Protocol(
            Role.CLIENT,
            name=self.name,
            token=self._token,
            max_message=self.max_message,
            heartbeat=self.heartbeat,
            will=self._will,
            interest=self._interest,
            read_size=self.read_size,
            resume=self._session,
            shm_threshold=self._shm_threshold,
        )
        conn = Connection(self, sock, protocol, address)
        self._keep_for(conn)
        return conn

    def _handshake(self, sock: socket.socket) -> Connection:
        conn = self._new_connection(sock)
        self._loop.call_soon(conn.attach)
        conn.settled.wait(self.handshake_timeout + 1.0)
        if conn.ready.is_set():
            return conn
        error = conn.error
        self._loop.call_soon(conn._finish)
        conn.closed.wait(1.0)
        if isinstance(error, HandshakeError):
            raise error
        raise HandshakeError(
            f"{self.addr}:{self._port} accepted the connection but did not complete the "
            f"socketengine handshake ({error or 'no answer'})"
        )

    def close(self) -> None:
        """Flush what was written (up to ``timeout`` s), close, and join the I/O thread.

        Idempotent.  Values written before ``close()`` reach the host even if the
        program exits right after.
        """
        with self._state_lock:
            if self.stopped:
                return
            self.stopped = True
            self.opened = False
        conn = self._conn
        if conn is not None:
            conn.close(self.timeout)
        self._loop.call_soon(self._cancel_retry)
        self._loop.stop()
        with self._link_lock:
            dropped = self._outbox.clear()
            if dropped:
                logger.warning(
                    "%r: %d bytes written while disconnected were never sent", self, dropped
                )
            self._link_lock.notify_all()
        if self._gateway is not None:
            self._gateway.close()
        # Requests kept across a lost link for the resume that will not come.
        self._session.fail_requests(ConnectionClosed(f"{self!r} was closed before the reply"))
        self._release_waiters()
        self._reader_wake.close()
        self._dispatcher.stop(self.timeout)
        logger.info("%r: closed", self)

    # -- reading and writing ------------------------------------------------------------

    def get(self, channel: str, default: Any = None) -> Any:
        """The most recent value received on ``channel``, or ``default`` (``None``).

        Images sent compressed are returned decoded (numpy arrays).
        """
        self._polled()
        return self._read(self._latest, channel, default)

    @property
    def _conn(self) -> Optional[Connection]:
        """The current link (``None`` before the first and while none is up); kept by
        the writer, which sends on it."""
        return self._writer.conn

    @_conn.setter
    def _conn(self, conn: Optional[Connection]) -> None:
        self._writer.conn = conn

    def write(
        self,
        channel: str,
        data: Any,
        ack: bool = False,
        timeout: Optional[float] = None,
        compress: Optional[bool] = None,
    ) -> None:
        """Send ``data`` on ``channel`` to the host.  Thread-safe.

        ``compress``: True compresses ``data`` whatever its size, False never, None as
        ``compression`` / ``compress_threshold`` say (see README "Compression").

        Raises ``TypeError`` naming the type if ``data`` cannot be sent (nothing is
        sent), :class:`ConnectionClosed` if the host is gone.  ``ack=True`` blocks
        until the host confirms it has stored the value (socket.engine 1.x's
        ``writeSync``): :class:`WriteTimeout` after ``timeout`` seconds (default: the
        client's ``timeout``), :class:`ConnectionClosed` if the connection is lost
        first (also while reconnecting: an acknowledged write needs a live link).
        """
        self._writer(channel, data, ack, timeout, compress)

    def write_many(self, items: WriteItems, compress: Optional[bool] = None) -> None:
        """Send many values to the host at once: a mapping ``{channel: value}`` or an
        iterable of ``(channel, value)`` pairs.  Each is delivered exactly as if sent
        by :meth:`write`, in order, but the batch takes one lock and one flush: in the
        interpreted build a burst of small values costs about a quarter less CPU than
        separate writes, in the compiled build no less (docs/values-and-images.md,
        "Writing many values at once").  Thread-safe.

        Every value is encoded first: ``TypeError``/``ValueError`` naming the item if
        one cannot be sent, and then nothing is sent.  The batch is queued whole once
        it fits under ``max_buffer`` (an empty queue takes any batch): the writer waits
        up to ``timeout`` s, then :class:`WriteTimeout` with nothing sent.  While the
        link is down with ``reconnect``, the values are kept one by one as separate
        writes would be.  For the host's confirmation, follow with
        ``flush(acked=True)``.
        """
        conn = self._conn
        encoded, nbytes = self._encode_many(conn, items, compress)
        if conn is not None and conn.engine.state is _OPEN:
            try:
                conn.send_values(encoded, nbytes)
                return
            except ConnectionClosed:
                pass
        for value in encoded:
            if type(value) is bytes:
                self._send(value, len(value))  # type: ignore[arg-type]
            else:
                self._send(*value)

    def set_interest(self, interest: Optional[Iterable[Union[str, Pattern]]]) -> None:
        """Replace the channels this client wants from broadcasts (``None``: all); the
        host applies it to everything it broadcasts from then on, and a reconnection
        announces it again.  ``ValueError`` beyond the limits of ``interest=``, before
        anything is sent (the interest in force stays).  Thread-safe."""
        self._interest = check_interest(interest)
        wire = [] if self._interest is None else self._interest.to_wire()
        conn = self._conn
        if conn is not None and conn.is_open:
            parts, nbytes = value_frame(INTEREST, "", wire)
            conn.send_parts(parts, nbytes)

    def sender(self, channel: str) -> Optional[str]:
        """Through a relaying host: the client that wrote the latest value on
        ``channel`` (its name, or ``"host:port"``), or ``None``."""
        conn = self._conn
        return None if conn is None else conn.senders.get(channel)

    def write_image(
        self,
        img: Any,
        channel: str = "image",
        codec: Optional[str] = None,
        quality: Optional[int] = None,
        conflate: bool = True,
    ) -> None:
        """Send a numpy image (H, W) or (H, W, C) on ``channel`` (default ``"image"``).

        ``codec``: ``"raw"`` (exact, zero-copy: do not modify ``img`` in place until
        the next write returns), ``"jpeg"`` (uint8, 1 or 3 channels; ``quality`` 1-100)
        or ``"png"`` (lossless, uint8/uint16); ``None`` uses the client's
        ``image_codec`` / ``image_quality``.  A newer frame replaces an older one that
        is still unsent.  ``TypeError``/``ValueError`` before anything is sent.

        ``conflate=False`` makes the channel lossless: every frame is queued like a
        plain value, in order, and a slow receiver slows the writer (backpressure,
        bounded by ``max_buffer``) instead of getting only the newest frame.
        """
        parts, nbytes = self._image_frame(img, channel, codec, quality, conflate)
        self._send(parts, nbytes, image=channel if conflate else None)

    def flush(self, timeout: Optional[float] = None, acked: bool = False) -> None:
        """Block until everything written so far is handed to the operating system
        (``acked=True``: until the host confirms it has stored all of it).

        Includes writes kept while reconnecting (they must reach a new connection
        first): while the client reconnects (or its link is lost during the flush), it
        waits for the next link, within ``timeout``.  Raises :class:`WriteTimeout` after
        ``timeout`` seconds (default: the client's ``timeout``),
        :class:`ConnectionClosed` if the connection is lost and ``reconnect=False``.
        """
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            with self._link_lock:
                while self.reconnect and self.opened and not self.stopped:
                    conn = self._conn
                    if conn is not None and conn.is_open and not self._outbox:
                        break
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise WriteTimeout(
                            f"not connected to {self.addr}:{self._port}: "
                            f"{self._outbox.queued} bytes still wait for the reconnection "
                            f"after {limit} s"
                        )
                    self._link_lock.wait(left)
            try:
                self._live_conn().flush(max(0.0, deadline - time.monotonic()), acked=acked)
                return
            except ConnectionClosed:
                if not self.reconnect or self.stopped:
                    raise
                # Lost during the flush: the session resumes on the next link.

    def request(self, channel: str, data: Any, timeout: Optional[float] = 5.0) -> Any:
        """Send ``data`` as a request on ``channel``; block for and return the reply.

        The host's ``on(channel)`` callback's return value is the reply.  Raises
        :class:`RemoteError` if that callback raised or there is none,
        ``TimeoutError`` after ``timeout`` s, :class:`ConnectionClosed` if the
        connection is lost first.  Never hangs.

        The calling thread reads the reply itself (as do ``wait()`` and a
        subscription's ``get()``): what arrives
        before it is handled as the I/O thread would handle it, and this client's inline
        callbacks for it run on this thread (docs/reacting.md).
        """
        return self._live_conn().request(channel, data, timeout)

    def _send(self, parts: List[Any], nbytes: int, image: Optional[str] = None) -> None:
        """Send a frame, or keep it for the reconnection when the link is down."""
        conn = self._conn
        if conn is not None and conn.engine.state is _OPEN:
            try:
                conn.send_parts(parts, nbytes, image=image)
                return
            except ConnectionClosed:
                if not self.reconnect or self.stopped:
                    raise
        if not self.reconnect or self.stopped or not self.opened:
            self._live_conn().send_parts(parts, nbytes, image=image)  # or the right error
            return
        deadline = time.monotonic() + self.timeout
        while True:
            with self._link_lock:
                while True:
                    conn = self._conn
                    if conn is not None and conn.engine.state is _OPEN:
                        break  # reconnected meanwhile: send directly, after the outbox
                    if self.stopped:
                        raise EndpointClosed(f"{self!r} was closed while writing")
                    if self._outbox.keep(parts, nbytes, image):
                        return
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise self._outbox.full_error(f"{self.addr}:{self._port}")
                    self._link_lock.wait(left)
            try:
                conn.send_parts(parts, nbytes, image=image)
                return
            except ConnectionClosed:
                if self.stopped:
                    raise
                # The new link died at once: keep the write for the next one, as if
                # the link had been down when it was made.

    _self_read = True

    def _await(
        self, flag: Flag, timeout: Optional[float], wake: Optional[ReaderWake] = None
    ) -> bool:
        conn = self._conn
        if conn is None or conn.engine.state is not _OPEN:
            return flag.wait(timeout)
        # Right after a write the peer has not answered yet, the value is most likely
        # its answer: spin first, as a request does (SendQueue.owed).
        owed = conn.owed(time.monotonic())
        return conn.read_until(flag, timeout, wake, conn.answer_spin if owed else None)

    def _await_item(self, flag: Flag, timeout: Optional[float]) -> bool:
        return self._await(flag, timeout, self._reader_wake)

    def _wake_reader(self) -> None:
        self._reader_wake.wake()

    def _live_conn(self) -> Connection:
        conn = self._conn
        if conn is None or self.stopped:
            self._check_open()
            raise EndpointClosed(f"{self!r} is not connected")  # pragma: no cover
        if conn.engine.state is not ConnState.OPEN:
            raise self._lost_error(conn)
        return conn

    def _lost_error(self, conn: Connection) -> ConnectionClosed:
        return ConnectionClosed(
            f"the connection to {self.addr}:{self._port} is closed "
            f"({conn.error or 'the host closed it'})"
        )

    def _check_receiving(self) -> None:
        self._check_not_closed()
        conn = self._conn
        if not self.reconnect and conn is not None and conn.engine.closed:
            raise self._lost_error(conn)

    # -- loop thread ----------------------------------------------------------------------

    def _on_ready(self, conn: Connection) -> None:
        with self._link_lock:
            # The previous link's unacknowledged and unsent frames go first (replayed
            # from where the host stopped receiving), then what was written meanwhile.
            conn._adopt(self._session.queue)
            self._session.queue = conn._queue
            conn._absorb(self._outbox)
            conn.mark_ready()
            if self.opened:  # a reconnection (the first connection is set by open())
                self._conn = conn
                self._pending = None
                self.reconnects += 1
                self._backoff.reset()
                logger.info("%r: reconnected", self)
            self._link_lock.notify_all()

    def _on_closed(self, conn: Connection) -> None:
        if self.stopped:
            return
        if not self.opened:
            self._lost_early = conn  # if it was the first link: open() reconnects
            return
        if conn is self._pending:  # a reconnection attempt failed in its handshake
            self._pending = None
            logger.info("%r: reconnect attempt failed: %s", self, conn.error)
            self._schedule_reconnect()
        elif conn is self._conn:
            self._link_lost(conn, early=False)

    def _reconnect_if_lost_early(self, conn: Connection) -> None:
        """The first link died after its handshake but before ``open()`` returned, when
        a loss could not start a reconnection yet: start it now (loop thread)."""
        if self._lost_early is not conn or self.stopped:
            return
        self._lost_early = None
        self._link_lost(conn, early=True)

    def _link_lost(self, conn: Connection, early: bool) -> None:
        """The live link ``conn`` is gone (loop thread): without ``reconnect`` nothing
        more will arrive (``wait()`` and subscriptions end); with it, reconnect."""
        if not self.reconnect:
            logger.info("%r: connection to the host ended: %s", self, conn.error or "closed")
            self._release_waiters(self._lost_error(conn))
            return
        if early:
            logger.warning("%r: lost the connection at once (%s); reconnecting", self, conn.error)
        else:
            log_lost_link(self, conn.error)
        self._mark_gaps()
        self._schedule_reconnect()

    def _schedule_reconnect(self) -> None:
        """Try again after the next backoff delay (loop thread)."""
        if self.stopped:
            return
        self._retry_timer = self._loop.call_later(next(self._backoff), self._try_reconnect)

    def _cancel_retry(self) -> None:
        timer, self._retry_timer = self._retry_timer, None
        if timer is not None:
            timer.cancel()
        self._retry_addrs = []
        self._resolving = None  # a resolution still running finds it was given up
        self._drop_attempt()
        pending, self._pending = self._pending, None
        if pending is not None:  # a reconnection still in its handshake: drop it
            pending._lost(None)

    def _drop_attempt(self) -> None:
        timer, self._attempt_timer = self._attempt_timer, None
        if timer is not None:
            timer.cancel()
        sock, self._retry_sock = self._retry_sock, None
        if sock is not None:
            self._loop.unregister(sock)
            sock.close()

    def _try_reconnect(self) -> None:
        """One reconnection attempt (loop thread): every address the host's name
        resolves to, in order, as ``open()`` does, each for at most ``timeout`` s.

        Any failure, at any step, closes the socket and goes on to the next address,
        then schedules the next attempt: a client with ``reconnect=True`` never stops
        trying.
        """
        self._retry_timer = None
        if self.stopped:
            return
        path = unix_path(self.addr)
        if path is not None:
            self._resolved(None, [(socket.AF_UNIX, socket.SOCK_STREAM, 0, path)])
            return
        try:  # an IP address: no lookup, nothing that can wait
            infos = socket.getaddrinfo(
                self.addr, self._port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST
            )
        except OSError:
            # A name: the lookup may wait on a DNS server for seconds, and this is the
            # I/O thread (close() waits on it): resolve in a thread of its own.
            self._resolving = attempt = object()
            threading.Thread(
                target=self._resolve, args=(attempt,), name="socketengine-resolve", daemon=True
            ).start()
            return
        self._resolved(None, infos)

    def _resolve(self, attempt: object) -> None:
        """Look the host's name up for ``attempt`` (resolver thread)."""
        try:
            result: Any = socket.getaddrinfo(self.addr, self._port, type=socket.SOCK_STREAM)
        except OSError as exc:
            result = exc
        self._loop.call_soon(self._resolved, attempt, result)

    def _resolved(self, attempt: Optional[object], result: Any) -> None:
        """The attempt's addresses (``getaddrinfo`` entries, or ``(family, type,
        proto, address)``), or the ``OSError`` of its lookup (loop thread)."""
        if attempt is not None:
            if attempt is not self._resolving:
                return  # given up meanwhile (close(), a newer attempt)
            self._resolving = None
        if self.stopped:
            return
        if isinstance(result, OSError):
            logger.debug("%r: reconnect attempt failed: %s", self, result)
            self._schedule_reconnect()
            return
        self._retry_addrs = [(entry[0], entry[1], entry[2], entry[-1]) for entry in result]
        self._try_next_address()

    def _try_next_address(self) -> None:
        """Start a non-blocking connect to the attempt's next address (loop thread);
        none left: schedule the next attempt."""
        while self._retry_addrs and not self.stopped:
            family, kind, proto, sockaddr = self._retry_addrs.pop(0)
            sock: Optional[socket.socket] = None
            try:
                sock = socket.socket(family, kind, proto)
                sock.setblocking(False)
                err = sock.connect_ex(sockaddr)
                if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
                    raise OSError(err, errno.errorcode.get(err, "connect failed"))
            except OSError as exc:
                logger.debug("%r: reconnect attempt to %s failed: %s", self, sockaddr, exc)
                if sock is not None:
                    sock.close()
                continue
            self._retry_sock = sock
            self._loop.register(sock, selectors.EVENT_WRITE, self._on_connect_event)
            if self.timeout > 0:
                self._attempt_timer = self._loop.call_later(self.timeout, self._attempt_expired)
            return
        self._schedule_reconnect()

    def _on_connect_event(self, mask: int) -> None:
        sock = self._retry_sock
        if sock is not None:
            self._connected(sock)

    def _attempt_expired(self) -> None:
        """A connect took longer than ``timeout`` (no answer: a host that is off or
        behind a firewall drops the SYNs): give it up, try the next (loop thread)."""
        self._attempt_timer = None
        logger.debug("%r: reconnect attempt timed out after %s s", self, self.timeout)
        self._drop_attempt()
        self._try_next_address()

    def _connected(self, sock: socket.socket) -> None:
        """The attempt's socket is writable: connected, or failed (loop thread)."""
        timer, self._attempt_timer = self._attempt_timer, None
        if timer is not None:
            timer.cancel()
        self._loop.unregister(sock)
        self._retry_sock = None
        if self.stopped:
            sock.close()
            return
        try:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, errno.errorcode.get(err, "connect failed"))
            set_nodelay(sock)
            # May raise too (ENOTCONN: reset between the two calls; TLS set-up).
            conn = self._new_connection(sock)
        except OSError as exc:
            logger.debug("%r: reconnect attempt failed: %s", self, exc)
            sock.close()
            self._try_next_address()
            return
        self._retry_addrs = []
        # Until it is ready, a failure of this connection schedules the next try.
        self._pending = conn
        conn.attach()

    def _connections(self) -> List[Connection]:
        return [self._conn] if self._conn is not None else []

    def __repr__(self) -> str:
        state = "closed" if self.stopped else ("connected" if self.connected else "not connected")
        name = f" name={self.name!r}" if self.name else ""
        return f"<Client {self._where()}{name} {state}>"
