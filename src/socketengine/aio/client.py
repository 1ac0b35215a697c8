"""The asyncio Client: connects to a host, keeps the latest value of every channel."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Dict, Optional, Union

from .. import frames
from ..errors import ConnectionClosed, ConnectTimeout, EndpointClosed
from ..protocol import Protocol, Role
from .connection import READ_SIZE, Connection
from .endpoint import DEFAULT_SUBSCRIPTION_SIZE, Endpoint
from .subscription import Subscription

__all__ = ["Client"]

logger = logging.getLogger("socketengine")

# Errors that mean "the host is not (yet) there": keep trying.
_RETRYABLE = (
    ConnectionRefusedError,
    ConnectionResetError,
    ConnectionAbortedError,
    TimeoutError,
    asyncio.TimeoutError,
)
_RETRY_FIRST = 0.02
_RETRY_MAX = 0.5


def _retryable(exc: OSError) -> bool:
    if isinstance(exc, _RETRYABLE):
        return True
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
    :param timeout: seconds each connection attempt may take, and the bound of the
        flush in :meth:`close` and of running callbacks at close.
    :param max_message: largest frame accepted from the host, bytes.
    :param handshake_timeout: seconds the host has to complete the handshake.

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
        max_message: int = frames.DEFAULT_MAX_MESSAGE,
        handshake_timeout: float = 10.0,
    ) -> None:
        super().__init__(
            addr,
            port,
            timeout=timeout,
            token=token,
            max_message=max_message,
            handshake_timeout=handshake_timeout,
        )
        if name is not None and (not isinstance(name, str) or len(name) > 256):
            raise TypeError("name must be a str of at most 256 characters")
        self.name = name
        self.connect_timeout = connect_timeout
        self._conn: Optional[Connection] = None
        self._values: Dict[str, Any] = {}

    @property
    def connected(self) -> bool:
        """True while the connection to the host is open."""
        conn = self._conn
        return conn is not None and conn.is_open

    @property
    def connection(self) -> Optional[Connection]:
        """The :class:`~socketengine.aio.Connection` to the host (once started)."""
        return self._conn

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> Client:
        """Connect and complete the handshake; return the client.

        Retries while the host refuses (it may not be up yet), for at most
        ``connect_timeout`` s in all.  Raises :class:`~socketengine.ConnectTimeout`,
        :class:`~socketengine.HandshakeError` or
        :class:`~socketengine.AuthenticationError`.  Calling it again is harmless.
        """
        return await super().start()

    async def _open(self) -> None:
        conn = await self._connect()
        self._conn = conn
        try:
            await conn._wait_ready(self.handshake_timeout)
            if self.stopped:
                raise EndpointClosed(f"{self!r} was closed while it was connecting")
        except BaseException:
            conn._abort()
            raise

    async def _connect(self) -> Connection:
        loop = asyncio.get_running_loop()
        deadline = None if self.connect_timeout is None else loop.time() + self.connect_timeout
        delay = _RETRY_FIRST
        attempts = 0
        while True:
            attempt: Optional[float] = self.timeout if self.timeout > 0 else None
            if deadline is not None:
                left = deadline - loop.time()
                attempt = left if attempt is None else min(attempt, left)
            if attempt is None or attempt > 0:
                try:
                    _, conn = await asyncio.wait_for(
                        loop.create_connection(self._new_connection, self.addr, self._port),
                        attempt,
                    )
                    return conn
                except OSError as exc:
                    if not _retryable(exc):
                        raise
                    attempts += 1
                    if attempts == 1:
                        logger.info("%r: %s; retrying until the host accepts", self, exc)
                except asyncio.TimeoutError:
                    attempts += 1
            if deadline is not None and loop.time() + delay >= deadline:
                raise ConnectTimeout(
                    f"could not connect to {self.addr}:{self._port} within "
                    f"{self.connect_timeout} s ({attempts} attempts): is the host running?"
                )
            await asyncio.sleep(delay)  # backoff between attempts, not synchronisation
            delay = min(delay * 2, _RETRY_MAX)

    def _new_connection(self) -> Connection:
        protocol = Protocol(
            Role.CLIENT,
            name=self.name,
            token=self._token,
            max_message=self.max_message,
            read_size=READ_SIZE,
        )
        return Connection(self, protocol)

    async def close(self) -> None:
        """Flush what was written (bounded by ``timeout`` s), send BYE, half-close and
        wait for the host to close; end waiters and subscriptions; let running
        callbacks finish (up to ``timeout`` s, then cancel them).  Idempotent."""
        if self.stopped:
            return
        self.stopped = True
        self.opened = False
        self._end_delivery(EndpointClosed(f"{self!r} was closed"), None)
        conn = self._conn
        if conn is not None:
            await conn.close(self.timeout)
        await self._stop_tasks(self.timeout)
        logger.info("%r: closed", self)

    # -- reading --------------------------------------------------------------------------

    def get(self, channel: str, default: Any = None) -> Any:
        """The most recent value received on ``channel``, or ``default`` (``None``)."""
        return self._values.get(channel, default)

    async def wait(self, channel: str, timeout: Optional[float] = None) -> Any:
        """The value of the next message on ``channel`` arriving after the call.

        Raises ``TimeoutError`` after ``timeout`` s (``None``: no bound),
        :class:`~socketengine.ConnectionClosed` if the connection is lost,
        :class:`~socketengine.EndpointClosed` if the client is closed.
        """
        return await self._wait(channel, timeout)

    def subscribe(
        self, channel: str, maxsize: int = DEFAULT_SUBSCRIPTION_SIZE
    ) -> Subscription[Any]:
        """Every message on ``channel`` from now on, in order:
        ``async for data in c.subscribe("ch")``.  May be called before :meth:`start`
        (to see retained values).  See :class:`~socketengine.aio.Subscription`."""
        return self._subscribe(channel, maxsize)

    def _check_receiving(self) -> None:
        self._check_not_closed()
        conn = self._conn
        if conn is not None and conn.closed:
            raise self._lost_error(conn)

    # -- writing --------------------------------------------------------------------------

    async def write(self, channel: str, data: Any) -> None:
        """Send ``data`` on ``channel`` to the host.

        Raises ``TypeError`` naming the type if ``data`` cannot be sent (nothing is
        sent), :class:`~socketengine.EndpointClosed` if the client is closed or not
        started, :class:`~socketengine.ConnectionClosed` if the host is gone.  Waits
        while the host does not keep up.
        """
        parts = frames.encode_value_frame(frames.DATA, channel, data)
        await self._live()._send_frame(parts)

    async def write_image(self, img: Any, channel: str = "image") -> None:
        """Send a numpy image (H, W) or (H, W, C) on ``channel`` (default ``"image"``).

        The pixels travel raw: do not modify ``img`` in place until the write returns.
        """
        self._check_image(img)
        parts = frames.encode_value_frame(frames.DATA, channel, img, flags=frames.FLAG_IMAGE)
        await self._live()._send_frame(parts)

    async def request(self, channel: str, data: Any, timeout: Optional[float] = 5.0) -> Any:
        """Send a request on ``channel``; return the host's reply.

        Raises :class:`~socketengine.RemoteError` (the host's handler raised, or it has
        none), ``TimeoutError``, :class:`~socketengine.ConnectionClosed`.
        """
        return await self._live().request(channel, data, timeout)

    def _live(self) -> Connection:
        conn = self._conn
        if conn is None or not self.opened:
            self._check_open()
            raise EndpointClosed(f"{self!r} is not connected")  # pragma: no cover
        if conn.closed or not conn.is_open:
            raise self._lost_error(conn)
        return conn

    # -- connection events ----------------------------------------------------------------

    def _store(self, channel: str, value: Any) -> None:
        self._values[channel] = value

    def _connection_closed(self, conn: Connection) -> None:
        if conn is not self._conn or not conn._ready or self.stopped:
            return
        logger.info("%r: connection to the host ended: %s", self, conn.error or "closed")
        error: ConnectionClosed = self._lost_error(conn)
        self._end_delivery(error, error)

    def __repr__(self) -> str:
        state = "closed" if self.stopped else ("connected" if self.connected else "not connected")
        name = f" name={self.name!r}" if self.name else ""
        return f"<aio.Client {self.addr}:{self._port}{name} {state}>"
