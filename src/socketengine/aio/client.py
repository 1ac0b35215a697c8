"""The asyncio Client: connects to a host, keeps the latest value of every channel,
and reconnects by itself when the connection is lost."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from typing import Any, Iterable, List, Optional, Tuple, TypeVar, Union

from .. import frames
from ..endpoint import WriteItems
from ..errors import (
    ConnectionClosed,
    ConnectTimeout,
    EndpointClosed,
    HandshakeError,
    HostBusy,
    SocketEngineConnectionError,
    WriteTimeout,
)
from ..limits import (
    DEFAULT_CLIENT_MAX_CHANNELS,
    DEFAULT_COMPRESS_THRESHOLD,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_HEARTBEAT,
    DEFAULT_MAX_BUFFER,
    DEFAULT_MAX_MESSAGE,
    DEFAULT_RECONNECT_MAX,
    DEFAULT_SHM_THRESHOLD,
    DEFAULT_SUBSCRIPTION_BYTES,
    DEFAULT_SUBSCRIPTION_SIZE,
    check_interest,
    check_name,
    check_seconds,
)
from ..net import unix_path
from ..patterns import Pattern
from ..protocol import Protocol, Role, encode_will
from ..sendqueue import Outgoing, SendQueue
from ..session import Session
from ..state import Backoff, log_lost_link
from .connection import READ_SIZE, Connection
from .endpoint import Endpoint
from .subscription import Subscription

__all__ = ["Client"]

logger = logging.getLogger("socketengine")

_K = TypeVar("_K", bound="Client")

# Errors that mean "the host is not (yet) there": keep trying.
_RETRYABLE = (
    ConnectionRefusedError,
    ConnectionResetError,
    ConnectionAbortedError,
    TimeoutError,
    asyncio.TimeoutError,
)
# start() retries a refused connection with this backoff cap (seconds).
_OPEN_RETRY_MAX = 0.5


def _retryable(exc: OSError) -> bool:
    if isinstance(exc, _RETRYABLE) or isinstance(exc, FileNotFoundError):
        return True  # FileNotFoundError: the host has not made its unix socket yet
    # create_connection() to a name with several addresses (localhost: ::1 and
    # 127.0.0.1) raises a plain OSError listing every failed attempt.
    text = str(exc)
    return text.startswith("Multiple exceptions") and "Connect call failed" in text


class Client(Endpoint):
    """An asyncio client of a :class:`~socketengine.aio.Host` or a threaded
    :class:`~socketengine.Host` (same wire protocol).

    :param addr: the host's address (name, IPv4 or IPv6).
    :param port: the host's TCP port.
    :param name: this client's name, sent in the handshake (the host's ``conn.name``).
    :param token: the host's shared secret, if it has one.
    :param connect_timeout: total seconds :meth:`start` keeps retrying while the host
        refuses the connection; ``None`` (default) retries forever.  Then
        :class:`~socketengine.ConnectTimeout` names ``addr:port``.
    :param timeout: seconds each connection attempt may take, that a write may wait for
        a host that does not keep up (or for room in the reconnection buffer), and the
        bound of the flush in :meth:`close` and of running callbacks at close.
    :param max_message: largest frame accepted from the host, bytes.
    :param max_buffer: bytes (default 256 MiB) the transport's buffer may hold before
        ``await write`` waits (up to ``timeout`` s, then
        :class:`~socketengine.WriteTimeout`); also the bound of what is kept for the
        reconnection while disconnected.
    :param handshake_timeout: seconds the host has to complete the handshake (TLS
        included).
    :param heartbeat: seconds (default 5): a link idle that long gets a PING; a host
        that sends nothing for ``3 * heartbeat`` s is declared dead (and, with
        ``reconnect``, reconnected to).  ``None`` disables.
    :param reconnect: when the connection is lost (not closed by us), reconnect in a
        background task with exponential backoff (from 0.02 s, doubling, capped at
        ``reconnect_max`` s, +-20 % jitter).  Writes made meanwhile are kept, in order,
        up to ``max_buffer`` bytes, and sent first once reconnected.  ``False``: a lost
        connection is final (writes raise :class:`~socketengine.ConnectionClosed`).
    :param reconnect_max: the largest delay between reconnection attempts, seconds.
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
    :param tls: an ``ssl.SSLContext`` (client side, e.g.
        ``ssl.create_default_context(cafile=...)``): the connection runs over TLS and
        the host's certificate is verified against ``addr``.
    :param image_codec: codec of :meth:`write_image` when none is given: ``"raw"``
        (default), ``"jpeg"`` or ``"png"``.
    :param image_quality: JPEG quality 1-100 (default 90).

    Use ``async with Client(port=...) as c:`` or ``await c.start()`` /
    ``await c.close()``.
    """

    _kind = "client"

    def __init__(
        self,
        addr: str = "127.0.0.1",
        port: int = 8080,
        *,
        name: Optional[str] = None,
        token: Union[str, bytes, None] = None,
        connect_timeout: Optional[float] = None,
        timeout: float = 2.0,
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
    ) -> None:
        if url is not None:
            from ..transport.nats.gateway import nats_client

            addr, port, tls, self._gateway = nats_client(
                url, host, name, token, tls, connect_timeout, max_message
            )
        #: The name of the host on a NATS cluster (``None``: direct TCP).
        self.host = host
        super().__init__(
            addr,
            port,
            timeout=timeout,
            token=token,
            max_message=max_message,
            handshake_timeout=handshake_timeout,
            max_buffer=max_buffer,
            heartbeat=heartbeat,
            tls=tls,
            image_codec=image_codec,
            image_quality=image_quality,
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
        #: How many times the client reconnected after losing the connection.
        self.reconnects = 0
        self._conn: Optional[Connection] = None
        self._pending: Optional[Connection] = None  # a reconnection in its handshake
        self._reconnector: Optional[asyncio.Task[None]] = None
        # Writes made while disconnected (reconnect=True), sent first on reconnect;
        # image frames in it conflate like in a connection's queue.
        self._outbox = SendQueue(self.max_buffer, self._images.queue_hook)
        self._outbox_waiters: List[asyncio.Future[None]] = []
        # The resumable session (protocol 1.2): kept across links, so a reconnection
        # replays what the host did not receive, and gets what this client did not.
        self._session = Session(b"", self.name, None)
        # Requests in flight survive a lost link only if a reconnection may resume it.
        self._session.keep_requests = self.reconnect

    @property
    def connected(self) -> bool:
        """True while the connection to the host is open."""
        conn = self._conn
        return conn is not None and conn.is_open

    @property
    def connection(self) -> Optional[Connection]:
        """The current :class:`~socketengine.aio.Connection` to the host (once started)."""
        return self._conn

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self: _K) -> _K:
        """Connect and complete the handshake; return the client.

        Retries while the host refuses (it may not be up yet) or gave up on the
        handshake under a flood (:class:`~socketengine.HostBusy`), for at most
        ``connect_timeout`` s in all.  Raises :class:`~socketengine.ConnectTimeout`,
        :class:`~socketengine.HandshakeError` (also for a TLS failure, e.g. a host
        certificate the context does not trust) or
        :class:`~socketengine.AuthenticationError`.  Calling it again is harmless.
        """
        return await super().start()

    async def _open(self) -> None:
        gateway = self._gateway
        loop = asyncio.get_running_loop()
        if gateway is not None and gateway.link is None:
            # ConnectTimeout / AuthenticationError; the link's calls block: off this loop.
            await loop.run_in_executor(None, gateway.start)
        try:
            await self._open_connection()
        except BaseException:
            if gateway is not None:
                self._gateway = await loop.run_in_executor(None, gateway.renewed)
            raise

    async def _open_connection(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = None if self.connect_timeout is None else loop.time() + self.connect_timeout
        delays = Backoff(_OPEN_RETRY_MAX, jitter=0.0)
        while True:
            conn = await self._connect()
            self._conn = conn
            try:
                await conn._wait_ready(conn._handshake_left())
                if self.stopped:
                    raise EndpointClosed(f"{self!r} was closed while it was connecting")
                break
            except BaseException as exc:
                conn._abort()
                # A host that gave up on the handshake under a flood: try again.
                delay = next(delays)
                if not isinstance(exc, HostBusy) or (
                    deadline is not None and loop.time() + delay >= deadline
                ):
                    raise
                logger.info("%r: %s; trying again", self, exc)
            await asyncio.sleep(delay)  # backoff between attempts, not synchronisation
        self._start_heartbeat()
        if conn.closed and self.reconnect:
            # Lost between its handshake and now, before a loss could start this.
            logger.warning("%r: lost the connection at once (%s); reconnecting", self, conn.error)
            self._reconnector = asyncio.get_running_loop().create_task(self._reconnect())

    async def _connect(self) -> Connection:
        loop = asyncio.get_running_loop()
        deadline = None if self.connect_timeout is None else loop.time() + self.connect_timeout
        delays = Backoff(_OPEN_RETRY_MAX, jitter=0.0)
        attempts = 0
        while True:
            attempt: Optional[float] = self.timeout if self.timeout > 0 else None
            if deadline is not None:
                left = deadline - loop.time()
                attempt = left if attempt is None else min(attempt, left)
            if attempt is None or attempt > 0:
                try:
                    return await self._attempt(attempt)
                except socket.gaierror as exc:
                    raise SocketEngineConnectionError(
                        f"cannot resolve the host name {self.addr!r}: {exc.strerror or exc} "
                        "(check addr=; use an IP address or a name this machine can resolve)"
                    ) from exc
                except OSError as exc:
                    if not _retryable(exc):
                        raise
                    attempts += 1
                    if attempts == 1:
                        logger.info(
                            "%r: waiting for the host at %s:%s (%s); retrying until it accepts",
                            self,
                            self.addr,
                            self._port,
                            exc,
                        )
                except asyncio.TimeoutError:
                    attempts += 1
            delay = next(delays)
            if deadline is not None and loop.time() + delay >= deadline:
                raise ConnectTimeout(
                    f"could not connect to {self.addr}:{self._port} within "
                    f"{self.connect_timeout} s ({attempts} attempts): is the host running?"
                )
            await asyncio.sleep(delay)  # backoff between attempts, not synchronisation

    async def _attempt(self, timeout: Optional[float], reconnecting: bool = False) -> Connection:
        """One connection attempt (TCP, then TLS if configured), bounded by ``timeout``
        s for TCP plus ``handshake_timeout`` for TLS.  A TLS failure raises
        :class:`HandshakeError`; "not there (yet)" errors are ``OSError``."""
        loop = asyncio.get_running_loop()
        made: List[Connection] = []

        def factory() -> Connection:  # called once TCP is connected
            conn = self._new_connection()
            made.append(conn)
            if reconnecting:
                self._pending = conn  # its handshake may complete before we resume
            return conn

        path = unix_path(self.addr)
        if path is not None:
            coro = loop.create_unix_connection(
                factory,
                path,
                ssl=self.tls,
                server_hostname=None if self.tls is None else "localhost",
                ssl_handshake_timeout=None if self.tls is None else self.handshake_timeout,
            )
        elif self.tls is None:
            coro = loop.create_connection(factory, self.addr, self._port)
        else:
            coro = loop.create_connection(
                factory,
                self.addr,
                self._port,
                ssl=self.tls,
                server_hostname=self.addr or None,
                ssl_handshake_timeout=self.handshake_timeout,
            )
            if timeout is not None:
                timeout += self.handshake_timeout
        try:
            _, conn = await asyncio.wait_for(coro, timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            if self.tls is not None and made:
                raise self._tls_error(exc) from exc
            raise
        return conn

    def _tls_error(self, exc: BaseException) -> HandshakeError:
        if isinstance(exc, ssl.SSLError):
            reason = str(exc)
        elif isinstance(exc, asyncio.TimeoutError):
            reason = f"no answer within {self.handshake_timeout} s"
        else:
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return HandshakeError(
            f"TLS handshake with {self.addr}:{self._port} failed: {reason} "
            "(does the host use tls=, with a certificate this context trusts?)"
        )

    def _new_connection(self) -> Connection:
        protocol = Protocol(
            Role.CLIENT,
            name=self.name,
            token=self._token,
            max_message=self.max_message,
            heartbeat=self.heartbeat,
            will=self._will,
            interest=self._interest,
            read_size=READ_SIZE,
            resume=self._session,
            shm_threshold=self._shm_threshold,
        )
        conn = Connection(self, protocol)
        self._keep_for(conn)
        return conn

    async def close(self) -> None:
        """Flush what was written (bounded by ``timeout`` s), send BYE, half-close and
        wait for the host to close; stop reconnecting; end waiters and subscriptions;
        let running callbacks finish (up to ``timeout`` s, then cancel them).  Writes
        still kept for a reconnection are dropped (logged).  Idempotent."""
        if self.stopped:
            return
        self.stopped = True
        self.opened = False
        self._stop_heartbeat()
        reconnector, self._reconnector = self._reconnector, None
        if reconnector is not None and not reconnector.done():
            reconnector.cancel()
            await asyncio.gather(reconnector, return_exceptions=True)
        pending, self._pending = self._pending, None
        if pending is not None:
            pending._abort()
        if self._outbox:
            logger.warning(
                "%r: %d bytes written while disconnected were never sent", self, self._outbox.queued
            )
        self._drop_outbox()
        conn = self._conn
        if conn is not None:
            await conn.close(self.timeout)
        # After the linger: what the host sent before its BYE is delivered first.
        self._end_delivery(EndpointClosed(f"{self!r} was closed"), None)
        # Requests kept across a lost link for the resume that will not come.
        self._session.fail_requests(ConnectionClosed(f"{self!r} was closed before the reply"))
        await self._stop_tasks(self.timeout)
        if self._gateway is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._gateway.close)
        logger.info("%r: closed", self)

    # -- reading --------------------------------------------------------------------------

    def get(self, channel: str, default: Any = None) -> Any:
        """The most recent value received on ``channel``, or ``default`` (``None``).

        Images sent compressed are returned decoded (numpy arrays; decoded here, once).
        """
        return self._read(self._latest, channel, default)

    async def wait(self, channel: Union[str, Pattern], timeout: Optional[float] = None) -> Any:
        """The value of the next message on ``channel`` arriving after the call (with a
        :class:`~socketengine.Pattern`: ``(channel, value)``).

        Raises ``TimeoutError`` after ``timeout`` s (``None``: no bound),
        :class:`~socketengine.EndpointClosed` if the client is closed and, without
        ``reconnect``, :class:`~socketengine.ConnectionClosed` if the connection is
        lost.  A reconnecting client keeps waiting across reconnections.
        """
        return await self._wait(channel, timeout)

    def subscribe(
        self,
        channel: Union[str, Pattern],
        maxsize: int = DEFAULT_SUBSCRIPTION_SIZE,
        maxbytes: Optional[int] = DEFAULT_SUBSCRIPTION_BYTES,
    ) -> Subscription[Any]:
        """Every message on ``channel`` from now on, in order:
        ``async for data in c.subscribe("ch")`` (with a :class:`~socketengine.Pattern`,
        items are ``(channel, data)``).  May be called before :meth:`start`
        (to see retained values).  See :class:`~socketengine.aio.Subscription`."""
        return self._subscribe(channel, maxsize, maxbytes)

    def _check_receiving(self) -> None:
        self._check_not_closed()
        conn = self._conn
        if not self.reconnect and conn is not None and conn.closed:
            raise self._lost_error(conn)

    # -- writing --------------------------------------------------------------------------

    async def write(
        self,
        channel: str,
        data: Any,
        ack: bool = False,
        timeout: Optional[float] = None,
        compress: Optional[bool] = None,
    ) -> None:
        """Send ``data`` on ``channel`` to the host (``ack=True``: and wait until the
        host confirms it has stored it; :class:`~socketengine.WriteTimeout` after
        ``timeout`` s, :class:`~socketengine.ConnectionClosed` without a live link).
        ``compress``: True compresses ``data`` whatever its size, False never, None as
        ``compression`` / ``compress_threshold`` say (see README "Compression").

        Raises ``TypeError`` naming the type if ``data`` cannot be sent (nothing is
        sent), :class:`~socketengine.EndpointClosed` if the client is closed or not
        started.  Waits (at most ``timeout`` s) while the host does not keep up, and
        raises :class:`~socketengine.WriteTimeout` (nothing sent) if ``max_buffer``
        bytes stay unsent that long.  While disconnected with ``reconnect``, the value
        is kept and sent first once reconnected (the same bound applies); without
        ``reconnect``, :class:`~socketengine.ConnectionClosed`.
        """
        if ack:
            await self._live().write(channel, data, ack=True, timeout=timeout, compress=compress)
            return
        if self._codecs is None and not compress:
            encoded = frames.value_item(channel, data)
        else:
            encoded = self._encode_for(self._conn, channel, data, compress)
        if type(encoded) is bytes:
            await self._send(encoded, len(encoded))
        else:
            await self._send(*encoded)

    async def write_many(self, items: WriteItems, compress: Optional[bool] = None) -> None:
        """Send many values to the host at once: a mapping ``{channel: value}`` or an
        iterable of ``(channel, value)`` pairs.  Each is delivered exactly as if sent
        by :meth:`write`, in order, at a fraction of the cost of separate writes
        (docs/values-and-images.md, "Writing many values at once").

        Every value is encoded first: ``TypeError``/``ValueError`` naming the item if
        one cannot be sent, and then nothing is sent.  The batch is queued whole once
        it fits under ``max_buffer`` (an empty buffer takes any batch): waits up to
        ``timeout`` s, then :class:`~socketengine.WriteTimeout` with nothing sent.
        While the link is down with ``reconnect``, the values are kept one by one as
        separate writes would be.  For the host's confirmation, follow with
        ``await flush(acked=True)``."""
        conn = self._conn
        encoded, nbytes = self._encode_many(conn, items, compress)
        if conn is not None and conn.is_open and self.opened:
            try:
                await conn._send_values(encoded, nbytes)
                return
            except ConnectionClosed:
                if not self.reconnect or self.stopped:
                    raise
        for value in encoded:
            if type(value) is bytes:
                await self._send(value, len(value))
            else:
                await self._send(*value)

    async def flush(self, timeout: Optional[float] = None, acked: bool = False) -> None:
        """Wait until everything written so far is handed to the operating system
        (``acked=True``: until the host confirms it has stored all of it).  While the
        client reconnects (or its link is lost during the flush), waits for the next
        link, within ``timeout``.  Raises :class:`~socketengine.WriteTimeout` after
        ``timeout`` s (default: the client's ``timeout``) and
        :class:`~socketengine.ConnectionClosed` without a live link and
        ``reconnect=False``."""
        limit = self.timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while True:
            conn = self._conn
            live = conn is not None and conn.is_open and not conn.closed
            if live or not self.reconnect or self.stopped or not self.opened:
                try:
                    await self._live().flush(max(0.0, deadline - loop.time()), acked)
                    return
                except ConnectionClosed:
                    if not self.reconnect or self.stopped:
                        raise
                    # Lost during the flush: the session resumes on the next link.
            left = deadline - loop.time()
            if left <= 0:
                raise WriteTimeout(
                    f"not connected to {self.addr}:{self._port} (reconnecting): the flush "
                    f"gave up after {limit} s"
                )
            await self._wait_outbox(left)  # woken by the reconnection

    async def set_interest(self, interest: Optional[Iterable[Union[str, Pattern]]]) -> None:
        """Replace the channels this client wants from broadcasts (``None``: all); the
        host applies it to everything it broadcasts from then on, and a reconnection
        announces it again.  ``ValueError`` beyond the limits of ``interest=``, before
        anything is sent (the interest in force stays)."""
        self._interest = check_interest(interest)
        wire = [] if self._interest is None else self._interest.to_wire()
        conn = self._conn
        if conn is not None and conn.is_open:
            parts, nbytes = frames.value_frame(frames.INTEREST, "", wire)
            await conn._send_frame(parts, nbytes)

    def sender(self, channel: str) -> Optional[str]:
        """Through a relaying host: the client that wrote the latest value on
        ``channel`` (its name, or ``"host:port"``), or ``None``."""
        conn = self._conn
        return None if conn is None else conn.senders.get(channel)

    async def write_image(
        self,
        img: Any,
        channel: str = "image",
        codec: Optional[str] = None,
        quality: Optional[int] = None,
        conflate: bool = True,
    ) -> None:
        """Send a numpy image (H, W) or (H, W, C) on ``channel`` (default ``"image"``).

        ``codec``: ``"raw"`` (exact, zero-copy: do not modify ``img`` in place until a
        later write returned), ``"jpeg"`` (uint8, 1 or 3 channels; ``quality`` 1-100) or
        ``"png"`` (lossless, uint8/uint16); ``None`` uses the client's ``image_codec`` /
        ``image_quality``.  JPEG/PNG encoding runs in a worker thread.  A newer frame
        replaces an older one on the same channel that is still unsent (also while
        disconnected).  ``TypeError``/``ValueError`` before anything is sent.

        ``conflate=False`` makes the channel lossless: every frame is queued like a
        plain value, in order, and a slow receiver slows the writer (backpressure,
        bounded by ``max_buffer``) instead of getting only the newest frame.
        """
        parts, nbytes = await self._image_frame(img, channel, codec, quality, conflate)
        await self._send(parts, nbytes, image=channel if conflate else None)

    async def request(self, channel: str, data: Any, timeout: Optional[float] = 5.0) -> Any:
        """Send a request on ``channel``; return the host's reply.

        Raises :class:`~socketengine.RemoteError` (the host's handler raised, or it has
        none), ``TimeoutError``, :class:`~socketengine.ConnectionClosed` (also at once
        while disconnected: a request is never kept for a reconnection).
        """
        return await self._live().request(channel, data, timeout)

    async def _send(self, parts: Outgoing, nbytes: int, image: Optional[str] = None) -> None:
        """Send a frame, or keep it for the reconnection while the link is down."""
        conn = self._conn
        if conn is not None and conn.is_open and self.opened:
            try:
                if type(parts) is bytes:  # a small value: one coroutine fewer
                    await conn._send_item(parts)
                else:
                    await conn._send_frame(parts, nbytes, image)
                return
            except ConnectionClosed:
                if not self.reconnect or self.stopped:
                    raise
                # Lost before the frame was handed over: keep it for the reconnection.
        if self.stopped or not self.opened:
            self._check_open()
        if not self.reconnect:
            raise self._lost_error(self._live_or_last())
        await self._keep(parts, nbytes, image)

    async def _keep(self, parts: Outgoing, nbytes: int, image: Optional[str]) -> None:
        """Keep a frame for the reconnection, waiting (up to ``timeout`` s) for room."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while True:
            if self.stopped:
                raise EndpointClosed(f"{self!r} was closed while writing")
            conn = self._conn
            if conn is not None and conn.is_open:
                # Reconnected meanwhile (the kept frames went first): send directly.
                try:
                    await conn._send_frame(parts, nbytes, image)
                    return
                except ConnectionClosed:
                    continue  # lost again before it was handed over: keep it
            if self._outbox.keep(parts, nbytes, image):
                return
            left = deadline - loop.time()
            if left <= 0:
                raise self._outbox.full_error(f"{self.addr}:{self._port}")
            await self._wait_outbox(left)

    async def _wait_outbox(self, left: float) -> None:
        """Wait up to ``left`` s until the reconnection or a drained outbox wakes the
        outbox's waiters (returns on either; the caller checks again)."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._outbox_waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, left)
        except asyncio.TimeoutError:
            pass
        finally:
            if waiter in self._outbox_waiters:
                self._outbox_waiters.remove(waiter)

    def _drop_outbox(self) -> None:
        self._outbox.clear()
        waiters, self._outbox_waiters = self._outbox_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _live(self) -> Connection:
        conn = self._conn
        if conn is None or not self.opened:
            self._check_open()
            raise EndpointClosed(f"{self!r} is not connected")  # pragma: no cover
        if conn.closed or not conn.is_open:
            raise self._lost_error(conn)
        return conn

    def _live_or_last(self) -> Connection:
        conn = self._conn
        if conn is None:  # pragma: no cover - opened implies a connection
            raise EndpointClosed(f"{self!r} is not connected")
        return conn

    def _lost_error(self, conn: Connection) -> ConnectionClosed:
        again = " (reconnecting)" if self.reconnect and not self.stopped else ""
        return ConnectionClosed(
            f"the connection to {self.addr}:{self._port} is closed"
            f"{again} ({conn.error or 'closed by the host'})"
        )

    # -- reconnecting ---------------------------------------------------------------------

    async def _reconnect(self) -> None:
        """Reconnect with capped, jittered exponential backoff until connected or
        closed (a background task)."""
        delays = Backoff(self.reconnect_max)
        attempt: Optional[float] = self.timeout if self.timeout > 0 else None
        while not self.stopped:
            await asyncio.sleep(next(delays))  # backoff between attempts, not sync
            try:
                conn = await self._attempt(attempt, reconnecting=True)
            except (OSError, HandshakeError, asyncio.TimeoutError) as exc:
                logger.debug("%r: reconnect attempt failed: %s", self, exc)
                continue
            try:
                await conn._wait_ready(conn._handshake_left())
            except HandshakeError as exc:
                logger.info("%r: reconnect attempt failed: %s", self, exc)
                continue
            except BaseException:
                conn._abort()  # cancelled by close()
                raise
            finally:
                if self._pending is conn:
                    self._pending = None
            if conn is self._conn and not conn.closed:
                return  # _connection_ready switched to it
            # Lost again at once (its loss found this task still running): go on.

    # -- connection events ----------------------------------------------------------------

    def _connections(self) -> List[Connection]:
        return [self._conn] if self._conn is not None else []

    def _connection_ready(self, conn: Connection) -> None:
        # The previous link's unacknowledged and unsent frames go first (replayed from
        # where the host stopped receiving), then what was written meanwhile.
        conn._adopt(self._session.queue)
        self._session.queue = conn._queue
        if not self.opened or self.stopped or conn is self._conn:
            return  # the first connection: start() takes it
        # A reconnection: what was written meanwhile goes first, before any later write.
        conn._queue.absorb(self._outbox)
        conn._pump()
        self._drop_outbox()
        self._conn = conn
        self.reconnects += 1
        logger.info("%r: reconnected", self)

    def _connection_lost(self, conn: Connection) -> None:
        if conn is not self._conn or not conn._ready or self.stopped or not self.opened:
            return
        if not self.reconnect:
            return
        log_lost_link(self, conn.error)
        self._mark_gaps()
        if self._reconnector is None or self._reconnector.done():
            self._reconnector = asyncio.get_running_loop().create_task(self._reconnect())

    def _connection_closed(self, conn: Connection) -> None:
        if conn is not self._conn or not conn._ready or self.stopped or self.reconnect:
            return
        logger.info("%r: connection to the host ended: %s", self, conn.error or "closed")
        error: ConnectionClosed = self._lost_error(conn)
        self._end_delivery(error, error)

    def __repr__(self) -> str:
        state = "closed" if self.stopped else ("connected" if self.connected else "not connected")
        name = f" name={self.name!r}" if self.name else ""
        return f"<aio.Client {self._where()}{name} {state}>"
