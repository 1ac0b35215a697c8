"""The asyncio Host: listens, accepts clients, keeps their latest values."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, TypeVar, Union, overload

from .. import codec, frames, images
from ..errors import EndpointClosed
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
    DEFAULT_SUBSCRIPTION_BYTES,
    DEFAULT_SUBSCRIPTION_SIZE,
    check_host_limits,
    check_name,
)
from ..net import forget_listener, listen, listening_port
from ..patterns import Pattern
from ..protocol import Protocol, Role
from ..relay import RelaySpec, WritersSpec, relayed_frame, relayed_value
from ..sendqueue import Outgoing
from ..state import Admission, StoredValues
from ..watch import matching_channels
from .connection import READ_SIZE, Connection, Job
from .endpoint import Endpoint
from .subscription import Subscription

__all__ = ["Host"]

logger = logging.getLogger("socketengine")

_H = TypeVar("_H", bound="Host")
T = TypeVar("T")
#: An ``on_connect`` / ``on_disconnect`` callback: ``fn(conn)``, plain or ``async``.
_C = TypeVar("_C", bound=Callable[[Connection], Any])


def _stop_accepting(server: asyncio.AbstractServer) -> None:
    """Stop watching ``server``'s listening sockets for new connections (selector event
    loops; with other loops nothing happens here and ``server.close()`` does it)."""
    loop = asyncio.get_running_loop()
    for sock in getattr(server, "sockets", ()):
        try:
            loop.remove_reader(sock.fileno())
        except (NotImplementedError, RuntimeError, ValueError, OSError):  # pragma: no cover
            pass


def _is_open(conn: Connection) -> bool:
    return conn.is_open


class Host(Endpoint):
    """An asyncio host that clients (asyncio or threaded) connect to.

    :param addr: address to listen on; ``'127.0.0.1'`` (default) accepts only this
        machine, ``'0.0.0.0'`` / ``'::'`` every interface (then use ``token=``).
    :param port: TCP port; ``0`` picks a free one, readable as :attr:`port` after
        :meth:`start`.
    :param token: shared secret clients must prove they know (HMAC challenge).
    :param max_clients: clients (connections that completed the handshake) served at
        once; more are refused with a REFUSE frame.
    :param max_pending: handshakes in progress at once; one more evicts the oldest
        pending handshake of the address with the most of them (see SECURITY.md).  A
        TLS handshake counts from when it completes (asyncio runs it before).
    :param max_channels: distinct channels one client may write on; one more closes
        its connection (logged).
    :param max_stored: bytes of latest values kept for one client (wire size, or for a
        value with more than 256 bytes of metadata its size once decoded if more); a
        value beyond it closes the connection (logged).  Default 256 MiB, or
        ``max_message`` if larger.
    :param max_message: largest frame accepted from a client, bytes (default 64 MiB).
    :param max_buffer: bytes one client's transport buffer may hold (default 256 MiB):
        beyond it ``await conn.write`` waits up to ``timeout`` s, then raises
        :class:`~socketengine.WriteTimeout` without sending; ``write_all`` disconnects
        a client that stays beyond it for ``timeout`` s (or reaches twice it) as a slow
        consumer.
    :param handshake_timeout: seconds a new connection has to complete the handshake
        (TLS included).
    :param heartbeat: seconds (default 5): a link idle that long gets a PING; a client
        that sends nothing for ``3 * heartbeat`` s is declared dead and disconnected.
        ``None`` disables.
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
    :param image_codec: codec of :meth:`write_image_all` / ``conn.write_image`` when
        none is given: ``"raw"`` (default), ``"jpeg"`` or ``"png"``.
    :param image_quality: JPEG quality 1-100 (default 90).
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
    :param name: a label for logs and ``repr`` (not sent to clients); with ``url``
        the host's name on the NATS cluster, which clients give as ``host=``.
    :param url: run over a NATS cluster instead of listening on TCP:
        ``"nats://HOST:4222"`` (comma-separated, or a list, for several servers); needs
        ``name=``.  ``token=`` also authenticates to the servers and ``tls=`` is a
        *client* ``ssl.SSLContext`` for them (docs/nats.md).
    :param connect_timeout: with ``url``: seconds to reach a NATS server (default 5).
    :param timeout: seconds a write may wait for a client that does not keep up, and
        that :meth:`close` waits for clients to take what was written and for running
        callbacks to finish.
    :param backlog: the listening socket's backlog.
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
        ``None``: no monitor), in its own thread; its address is ``host.monitor.url``.
    :param monitor_addr: the monitor's address (loopback by default).
    :param monitor_bgr: the monitor shows raw 3-channel frames as BGR (OpenCV's order).

    Use ``async with Host(port=0) as h:`` or ``await h.start()`` / ``await h.close()``.
    """

    _kind = "host"
    _with_conn = True

    def __init__(
        self,
        addr: str = "127.0.0.1",
        port: int = 8080,
        *,
        token: Union[str, bytes, None] = None,
        max_clients: int = DEFAULT_MAX_CLIENTS,
        max_message: int = DEFAULT_MAX_MESSAGE,
        max_buffer: int = DEFAULT_MAX_BUFFER,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        heartbeat: Optional[float] = DEFAULT_HEARTBEAT,
        tls: Optional[ssl.SSLContext] = None,
        image_codec: str = "raw",
        image_quality: int = 90,
        keep_departed: int = DEFAULT_KEEP_DEPARTED,
        name: Optional[str] = None,
        timeout: float = 2.0,
        backlog: int = 128,
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
        connect_timeout: Optional[float] = None,
        shm: bool = True,
        shm_threshold: int = DEFAULT_SHM_THRESHOLD,
    ) -> None:
        if url is not None:
            from ..transport.nats.gateway import nats_host

            addr, port, tls, self._gateway = nats_host(
                url, name, token, tls, connect_timeout, max_message
            )
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
        self._server: Optional[asyncio.AbstractServer] = None
        # Every accepted connection, in accept order, until it departs.
        self._conns: Dict[int, Connection] = {}
        # Refused at arrival (full, closing, ...): lingering until the peer hangs up.
        self._refused: Set[Connection] = set()
        self._fan: FanOut[Connection] = FanOut()  # a burst's small values (fanout.py)
        self._fan_due = False  # a _fan_tick is scheduled
        self._connect_handlers: Tuple[Callable[..., Any], ...] = ()
        self._disconnect_handlers: Tuple[Callable[..., Any], ...] = ()

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self: _H) -> _H:
        """Bind and listen on ``addr:port``; return the host.  Calling it again is
        harmless.  Raises ``OSError`` naming ``addr:port`` if it cannot bind."""
        return await super().start()

    async def _open(self) -> None:
        gateway = self._gateway
        if gateway is not None:
            # The link's calls block (it runs its own loop thread): off this loop.
            try:
                await _in_thread(gateway.connect)
                for channel, frame in (await _in_thread(gateway.retained_items)).items():
                    self._retained.retain(channel, [frame])
            except BaseException:
                await _in_thread(gateway.abandon)  # nothing started, nothing left behind
                raise
        sock = listen(self.addr, self._port, self.backlog)
        loop = asyncio.get_running_loop()
        # asyncio accepts up to `backlog` connections per event before it reads any: a
        # smaller batch lets the HELLOs of new clients be read before the next accepts
        # could evict them (max_pending); the kernel's backlog is restored below.
        batch = max(1, min(self.backlog, self.max_pending // 4))
        try:
            if self.tls is None:
                self._server = await loop.create_server(
                    self._new_connection, sock=sock, backlog=batch
                )
            else:
                # The TLS handshake runs before connection_made(); its time counts
                # against handshake_timeout (see _connection_made).
                self._server = await loop.create_server(
                    self._new_connection,
                    sock=sock,
                    ssl=self.tls,
                    ssl_handshake_timeout=self.handshake_timeout,
                    backlog=batch,
                )
            sock.listen(self.backlog)
        except BaseException:
            sock.close()
            raise
        self._port = listening_port(sock)
        self._start_heartbeat()
        try:
            if gateway is not None:
                await _in_thread(gateway.serve, {"pid": os.getpid()})
            self._start_monitor()
        except BaseException:
            self._server.close()
            raise

    async def close(self) -> None:
        """Stop listening, close every client gracefully (flush, BYE; each bounded by
        ``timeout`` s), end waiters and subscriptions, and let running callbacks finish
        (up to ``timeout`` s, then they are cancelled).  Idempotent."""
        if self.stopped:
            return
        self.stopped = True
        self.opened = False
        self._stop_heartbeat()
        if self.monitor is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._stop_monitor)
        server = self._server
        if server is not None:
            # Links accepted just before this are still being set up by asyncio (a task
            # each, one loop step away).  Once the server is closed, their transports
            # could no longer be made (asyncio asserts) and their sockets would leak
            # unclosed.  So: stop accepting, let those steps run, then close; their
            # connections are refused ("closing") and aborted below.
            _stop_accepting(server)
            await asyncio.sleep(0)
            server.close()
            forget_listener(self.addr)
            await asyncio.sleep(0)  # their connection_made: refused, in self._refused
        self._fan_flush()  # deferred broadcasts go before the BYEs
        conns = list(self._conns.values())
        if conns:
            await asyncio.gather(*(c.close(self.timeout) for c in conns), return_exceptions=True)
        # Their REFUSE is sent: not left to their linger, which server.wait_closed()
        # below would wait for (it waits for every accepted link).
        self._abort_refused()
        # After the linger: what the clients sent before their BYE is delivered first.
        self._end_delivery(EndpointClosed(f"{self!r} was closed"), None)
        if server is not None:
            try:
                await asyncio.wait_for(server.wait_closed(), self.timeout)
            except asyncio.TimeoutError:  # pragma: no cover - only if a transport hangs
                logger.warning("%r: server did not close within %s s", self, self.timeout)
        await self._stop_tasks(self.timeout)
        self._abort_refused()  # any refused meanwhile (accepts queued when it closed)
        if self._gateway is not None:
            await _in_thread(self._gateway.close)
        logger.info("%r: closed", self)

    def _abort_refused(self) -> None:
        """Close the links refused at arrival that still linger (their REFUSE was
        written; a peer that never hangs up would keep one until its linger ends, past
        an event loop stopped after ``close()``)."""
        for conn in list(self._refused):
            conn._abort()
        self._refused.clear()

    # -- reading --------------------------------------------------------------------------

    def clients(self) -> List[Connection]:
        """The connected clients (handshake done, not closing), in connection order."""
        # A copy first: the monitor calls this from its own thread.
        return [c for c in list(self._conns.values()) if c.is_open]

    def get_client(self, name: str) -> Optional[Connection]:
        """The connected client that gave ``name`` (the newest one), or ``None``."""
        found = None
        for conn in self._conns.values():
            if conn.name == name and conn.is_open:
                found = conn
        return found

    def get(self, channel: str, default: Any = None) -> Any:
        """The most recent value received on ``channel`` from any client, or ``default``.

        Images sent compressed are returned decoded (numpy arrays; decoded here, once).
        """
        departed = [c for _, c in self._departed.items()]
        return self._read_host(channel, default, [*self._conns.values(), *departed])

    @overload
    def get_all(self, channel: str) -> List[Any]: ...

    @overload
    def get_all(self, channel: Pattern) -> Dict[str, List[Any]]: ...

    def get_all(self, channel: Union[str, Pattern]) -> Any:
        """The latest value on ``channel`` from each client, in connection order.

        Includes clients that have disconnected, up to ``keep_departed`` of them, so a
        client that writes and closes at once is still seen.  ``[]`` if none sent.  With a
        :class:`~socketengine.Pattern`: ``{channel: [values]}`` for every matching
        channel any of them sent on.
        """
        sessions = list(self._conns.items()) + self._departed.items()
        if isinstance(channel, Pattern):
            names = matching_channels(channel, (c.values for _, c in sessions))
            return {name: self.get_all(name) for name in names}
        sessions.sort(key=lambda item: item[0])
        out = []
        for _, conn in sessions:
            values = conn.values
            if channel in values:
                value = values[channel]
                out.append(conn.get(channel) if type(value) is images.EncodedImage else value)
        return out

    def stats(self) -> Dict[str, Any]:
        """Image counters (see :meth:`Endpoint.stats`) plus ``"clients"``: each connected
        client's ``conn.stats()``, keyed by ``name`` or ``"host:port"``."""
        out = super().stats()
        out["clients"] = {
            c.name or f"{c.address[0]}:{c.address[1]}": c.stats() for c in self.clients()
        }
        return out

    @overload
    async def wait(
        self, channel: str, timeout: Optional[float] = None
    ) -> Tuple[Any, Connection]: ...

    @overload
    async def wait(
        self, channel: Pattern, timeout: Optional[float] = None
    ) -> Tuple[str, Any, Connection]: ...

    async def wait(self, channel: Union[str, Pattern], timeout: Optional[float] = None) -> Any:
        """Wait for the next message on ``channel`` (from any client) arriving after the
        call; return ``(data, conn)`` (with a :class:`~socketengine.Pattern`:
        ``(channel, data, conn)``).  Raises ``TimeoutError`` after ``timeout`` s,
        :class:`~socketengine.EndpointClosed` if the host closes meanwhile."""
        return await self._wait(channel, timeout)

    @overload
    def subscribe(
        self,
        channel: str,
        maxsize: int = DEFAULT_SUBSCRIPTION_SIZE,
        maxbytes: Optional[int] = DEFAULT_SUBSCRIPTION_BYTES,
    ) -> Subscription[Tuple[Any, Connection]]: ...

    @overload
    def subscribe(
        self,
        channel: Pattern,
        maxsize: int = DEFAULT_SUBSCRIPTION_SIZE,
        maxbytes: Optional[int] = DEFAULT_SUBSCRIPTION_BYTES,
    ) -> Subscription[Tuple[str, Any, Connection]]: ...

    def subscribe(
        self,
        channel: Union[str, Pattern],
        maxsize: int = DEFAULT_SUBSCRIPTION_SIZE,
        maxbytes: Optional[int] = DEFAULT_SUBSCRIPTION_BYTES,
    ) -> Any:
        """Every message on ``channel`` from now on, as ``(data, conn)`` pairs, in order
        per client: ``async for data, conn in h.subscribe("ch")``; with a
        :class:`~socketengine.Pattern`, ``(channel, data, conn)``.  See
        :class:`~socketengine.aio.Subscription` for ``maxsize`` and back-pressure."""
        return self._subscribe(channel, maxsize, maxbytes)

    def on_connect(self, fn: _C) -> _C:
        """Call ``fn(conn)`` (plain or async) when a client completes its handshake,
        before any of its messages' callbacks.  Usable as a decorator; returns ``fn``."""
        self._connect_handlers += (fn,)
        return fn

    def on_disconnect(self, fn: _C) -> _C:
        """Call ``fn(conn)`` (plain or async) when a client's connection has ended,
        after its messages' callbacks.  Usable as a decorator; returns ``fn``."""
        self._disconnect_handlers += (fn,)
        return fn

    # -- writing --------------------------------------------------------------------------

    async def write_all(
        self, channel: str, data: Any, retain: bool = False, compress: Optional[bool] = None
    ) -> int:
        """Send ``data`` on ``channel`` to every connected client; return how many.

        The value is encoded once (``TypeError`` before anything is sent).  A client
        whose link is down and may resume gets it on resume (held in its session, up
        to ``max_buffer`` bytes; counted).  With
        ``retain=True`` the host also keeps it and sends it, flagged RETAINED, to every
        client that connects later, right after its handshake (a later retained write
        on the channel replaces it).  Never waits for one slow client: a client whose
        buffer stays above ``max_buffer`` for ``timeout`` s (or would exceed twice it)
        is disconnected as a slow consumer (logged, ``on_disconnect``) and the others
        go on receiving.
        """
        self._check_open()
        gateway = self._gateway
        if gateway is not None:
            fanned = self._nats_broadcast(channel, data, retain, compress, self.clients)
            if fanned is not None:
                return fanned
        if retain:
            parts, nbytes = frames.value_frame(frames.DATA, channel, data)
            self._retained.retain(channel, parts)
            # Not held for a client whose link is down: a resume replays retained values.
            sent = await self._broadcast(parts, nbytes, channel=channel, hold=False)
            if gateway is not None:
                await _in_thread(gateway.retain, channel, self._retained.frame(channel))
            return sent
        if self._codecs is not None or compress:
            sent = 0
            audience = self._audience(channel)
            for encoded, conns in self._encode_groups(channel, data, compress, audience):
                if type(encoded) is bytes:
                    sent += await self._broadcast(encoded, len(encoded), clients=conns)
                else:
                    sent += await self._broadcast(encoded[0], encoded[1], clients=conns)
            sent += self._hold_value(channel, data)
            return sent
        encoded = frames.value_item(channel, data)
        if isinstance(encoded, bytes):
            # The common step of a burst (Endpoint._join_run), in fewer calls than
            # _broadcast.
            fan = self._fan
            loop = asyncio.get_running_loop()
            if self._join_run(fan, encoded, channel, self._conns, loop.time()):
                count = len(fan.recipients)
                if self._fan_next(loop):
                    await asyncio.sleep(0)  # let the loop flush the transports
                return count
            return await self._broadcast(encoded, len(encoded), channel=channel)
        frame_parts, size = encoded
        return await self._broadcast(frame_parts, size, channel=channel)

    def clear_retained(self, channel: Optional[str] = None) -> None:
        """Forget the retained value of ``channel`` (``None``: of every channel).
        Over NATS the stored copy is deleted in the background."""
        self._retained.clear(channel)
        if self._gateway is not None:
            self._gateway.unretain_soon(channel)

    async def write_image_all(
        self,
        img: Any,
        channel: str = "image",
        codec: Optional[str] = None,
        quality: Optional[int] = None,
        conflate: bool = True,
    ) -> int:
        """Send a numpy image to every connected client on ``channel``; return how many.

        ``codec`` (``"raw"``, ``"jpeg"``, ``"png"``) and ``quality`` default to the
        host's ``image_codec`` / ``image_quality``.  The image is encoded once (in a
        worker thread), whatever the number of clients; a client that does not keep up
        gets the newest frame, never a backlog (conflation).

        ``conflate=False`` makes the channel lossless: every frame is queued like a
        plain value, in order, and a slow receiver slows the writer (backpressure,
        bounded by ``max_buffer``) instead of getting only the newest frame.
        """
        self._check_open()
        parts, nbytes = await self._image_frame(img, channel, codec, quality, conflate)
        self._check_open()
        return await self._broadcast(
            parts, nbytes, image=channel if conflate else None, channel=channel
        )

    async def _broadcast(
        self,
        parts: Outgoing,
        nbytes: int,
        image: Optional[str] = None,
        channel: str = "",
        clients: Optional[List[Connection]] = None,
        hold: bool = True,
    ) -> int:
        """Hand one encoded frame to every client (that wants ``channel``; or exactly
        ``clients``) without waiting for any of them.  Without ``clients`` (and with
        ``hold``), also to every client whose link is down and may resume (held
        sessions).  Returns for how many clients it was queued."""
        sent = 0
        fan = self._fan
        if clients is None and type(parts) is bytes:  # a small value: may join a run
            wanting = self._wanting(channel, self._conns)
            if fan and not fan.joins(wanting):
                self._fan_flush()  # before the held sessions get this one
            if hold:
                sent = self._hold_all(parts, nbytes, image, channel)
            return sent + await self._fan_item(parts, wanting)
        if fan:
            self._fan_flush()  # nothing overtakes a run
        if clients is None:
            clients = self._audience(channel)
            if hold:
                sent = self._hold_all(parts, nbytes, image, channel)
        return sent + await self._offer_all(parts, nbytes, image, clients)

    async def _offer_all(
        self, parts: Outgoing, nbytes: int, image: Optional[str], clients: List[Connection]
    ) -> int:
        sent = 0
        paused = False
        # In a burst of broadcasts (FanOut.in_burst) each connection sends once for
        # many of them, on the loop's next step.
        loop_time = asyncio.get_running_loop().time
        fan = self._fan
        burst = fan.in_burst(len(clients), loop_time())
        for conn in clients:
            if conn._offer(parts, nbytes, image, burst):
                sent += 1
            paused = paused or conn.writing_paused
        fan.last = loop_time()  # the end of this broadcast
        if paused:
            # Let the event loop flush the transports: a producer that calls this in a
            # tight loop must not starve them (without waiting for any client).
            await asyncio.sleep(0)
        return sent

    async def _fan_item(self, item: bytes, wanting: List[Connection]) -> int:
        """A small value for every open connection of ``wanting`` (``_wanting``'s
        cached audience).  In a burst it joins the run of deferred broadcasts
        (fanout.py): queued once, handed to every recipient on the loop's next step
        (or here, once the run is full).  An isolated one goes out at once."""
        fan = self._fan
        loop = asyncio.get_running_loop()
        count = fan.defer(item, wanting, loop.time(), _is_open)
        if count < 0:  # isolated
            return await self._offer_all(item, len(item), None, [c for c in wanting if c.is_open])
        if self._fan_next(loop):
            await asyncio.sleep(0)  # let the loop flush the transports (see above)
        return count

    def _fan_next(self, loop: asyncio.AbstractEventLoop) -> bool:
        """A value joined the run: hand the run over now if it is full (True: a
        recipient's transport is paused, the writer should let the loop run), else make
        sure the loop's next step does."""
        if self._fan.full:
            return self._fan_flush()
        if not self._fan_due:
            self._fan_due = True
            loop.call_soon(self._fan_tick)
        return False

    def _fan_tick(self) -> None:
        """The loop's step after a run of deferred broadcasts began."""
        self._fan_due = False
        self._fan_flush()

    def _fan_flush(self) -> bool:
        """Hand the run of deferred broadcasts to each of its recipients, in order;
        True if a recipient's transport is paused (its buffer is full)."""
        fan = self._fan
        if not fan:
            return False
        items, nbytes, recipients = fan.items, fan.nbytes, fan.recipients
        fan.clear()  # first: a recipient's hand-over never sees the run again
        paused = False
        for conn in recipients:
            conn._send_run(items, nbytes)
            paused = paused or conn.writing_paused
        return paused

    # -- connection events ----------------------------------------------------------------

    def _new_connection(self) -> Connection:
        # Called at accept time, before a TLS handshake.
        self._expire_sessions()
        protocol = Protocol(
            Role.HOST,
            token=self._token,
            max_message=self.max_message,
            heartbeat=self.heartbeat,
            read_size=READ_SIZE,
            shm_threshold=self._shm_threshold,
            session=next(self._sessions),
            sessions=self._resume if self.resume_window else None,
        )
        return Connection(self, protocol)

    def _connection_made(self, conn: Connection) -> Optional[Tuple[str, str]]:
        refusal = self._admit(conn)
        if refusal is not None:
            self._refused.add(conn)
        return refusal

    def _admit(self, conn: Connection) -> Optional[Tuple[str, str]]:
        if self.stopped:
            return ("the host is closing", "closing")
        refusal, evicted = self._admission.arrive(
            conn.session,
            conn.address[0],
            asyncio.get_running_loop().time(),
            self._said_hello,
            resumable=self.resume_window > 0,
        )
        if refusal is not None:
            return refusal
        for key in evicted:
            victim = self._conns.get(key)
            if victim is not None:
                self._evict(victim)
        warning = self._admission.warning(asyncio.get_running_loop().time())
        if warning is not None:
            logger.warning("%r: %s", self, warning)
        self._conns[conn.session] = conn
        self._audience_changed()
        return None

    def _said_hello(self, key: int) -> bool:
        """The pending connection ``key`` sent a complete HELLO."""
        conn = self._conns.get(key)
        return conn is not None and bool(conn.engine.protocol._peer_nonce)

    def _evict(self, conn: Connection) -> None:
        """Give up on a pending handshake: REFUSE ``busy``, close."""
        reason, code = Admission.busy(self.max_pending)
        logger.debug("%r: evicting %s: %s", self, conn._peer(), reason)
        transport = conn.transport
        out = conn.engine.refuse(reason, code, conn._loop.time(), 0.0)
        if transport is None or conn.closed:
            return
        transport.write(out)
        transport.close()  # after the REFUSE; aborted if the peer does not take it
        conn._linger(min(self.timeout, 1.0))

    def _supersede(self, old: Connection) -> None:
        """Close a link whose session a new one resumed, at once."""
        transport = old.transport
        old.connection_lost(ConnectionResetError("the client resumed on a new link"))
        if transport is not None:
            transport.abort()  # its own connection_lost() later is a no-op

    def _connection_ready(self, conn: Connection) -> None:
        # Bounded like any client, also while a turned-away one is being closed.
        self._stored[conn] = StoredValues(self.max_channels, self.max_stored)
        self._resumed(conn)
        refusal = self._admission.opened(conn.session)
        if refusal is not None:
            # Every seat was taken while this handshake ran: close it at once.
            logger.warning("%r: closing %s after its handshake: %s", self, conn._peer(), refusal[0])
            self._spawn(conn.close(min(self.timeout, 2.0)))
            return
        self._audience_changed()
        logger.info("%r: client %r connected", self, conn)
        self._forget(self._departed.forget_named(conn.name))  # a named client that reconnects
        for frame in self._retained.replay(conn.wants):
            conn._enqueue((frame,), len(frame))
            conn.messages_out += 1
        if self._connect_handlers:
            conn._chain.call(Job(self._connect_handlers, (conn,), None, "on_connect"))

    def _connection_closed(self, conn: Connection) -> None:
        self._refused.discard(conn)
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
        if conn.values:
            size = 0 if stored is None else stored.nbytes
            self._forget(self._departed.add(conn.session, conn, size))
        if self._disconnect_handlers:
            conn._chain.call(Job(self._disconnect_handlers, (conn,), None, "on_disconnect"))

    def _audience(self, channel: str, exclude: Optional[Connection] = None) -> List[Connection]:
        """The clients a broadcast on ``channel`` goes to (their interest)."""
        return [c for c in self._wanting(channel, self._conns) if c.is_open and c is not exclude]

    def _relay_out(self, conn: Connection, channel: str, meta: Any, data: Any) -> None:
        """A client wrote a value this host relays: to the other clients."""
        self._relay_send(conn, channel, *relayed_frame(channel, conn._origin(), meta, data))

    def _relay_value(self, conn: Connection, channel: str, value: Any) -> None:
        self._relay_send(conn, channel, *relayed_value(channel, conn._origin(), value))

    def _relay_send(self, conn: Connection, channel: str, parts: List[Any], nbytes: int) -> None:
        if self._retain_relayed:
            self._retained.retain(channel, parts, relayed=True)
        for other in self._audience(channel, exclude=conn):
            other._offer(parts, nbytes, None)
        self._hold_all(parts, nbytes, None, channel, exclude=conn)

    def _publish_will(self, conn: Connection, channel: str, meta: bytes) -> None:
        """A client vanished: its last will arrives as if it had written it, here and
        at every other client."""
        logger.info("%r: publishing the last will of %r on %r", self, conn, channel)
        value = codec.decode(meta, None)
        self._deliver(conn, channel, value)
        parts, nbytes = frames.value_frame(frames.DATA, channel, value)
        for other in self._audience(channel, exclude=conn):
            other._offer(parts, nbytes, None)
        self._hold_all(parts, nbytes, None, channel, exclude=conn)

    def _forget(self, conns: List[Connection]) -> None:
        """These clients' values are forgotten: by get() too."""
        for conn in conns:
            self._forget_latest(conn)

    def _connections(self) -> List[Connection]:
        return list(self._conns.values())

    def __repr__(self) -> str:
        state = "closed" if self.stopped else ("open" if self.opened else "not started")
        label = f" {self.name!r}" if self.name else ""
        return f"<aio.Host{label} {self._where()} {state} clients={len(self._conns)}>"


async def _in_thread(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in the default executor (a blocking NATS link call)."""
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
