"""One peer connection of the asyncio layer: an ``asyncio.BufferedProtocol`` over the core.

The sans-I/O core does all protocol work: the event loop's ``get_buffer`` /
``buffer_updated`` calls go straight to :class:`socketengine.frames.FrameDecoder`, the
handshake, authentication, pings and pongs are :class:`socketengine.protocol.Protocol`'s,
and frames are built by :mod:`socketengine.frames`.  This module adds what asyncio needs:
flow control in both directions, image conflation, heartbeats, request/reply futures and
ordered callbacks.

Flow control
    *Sending*: frames go to the transport at once.  While its buffer is above the
    high-water mark (``pause_writing``), ``await write(...)`` then waits until it drains
    below the low-water mark (``resume_writing``), as ``StreamWriter.drain`` does -- but
    for at most the endpoint's ``timeout``: a peer that takes nothing for that long is
    *stalled*, and later writes stop waiting for it until it drains.  ``max_buffer``
    bounds the memory: a write that would take the transport's buffer beyond it first
    waits (up to ``timeout``) for room, then raises :class:`~socketengine.WriteTimeout`
    without sending anything.  ``write_all`` never waits for one client: a client whose
    buffer stays above ``max_buffer`` for ``timeout`` s (or would exceed twice that) is
    disconnected as a slow consumer.
    *Images* are conflated: while the transport is paused, an image frame is parked in a
    slot per channel instead, a newer frame on the same channel replaces it (counted in
    ``images_dropped``), and the newest one is handed over when the transport resumes.
    *Receiving*: decoded frames are handled one by one, in order.  When handling a
    frame fills a :class:`~socketengine.aio.subscription.Subscription` (``maxsize``
    items) or the connection's callback backlog, handling stops, the rest waits in
    order and ``transport.pause_reading()`` is called; it resumes when the consumer
    has drained half of it.  So nothing is dropped and the peer's writes block: the
    back-pressure reaches the sender through TCP.

Heartbeats
    The endpoint calls :meth:`Connection._heartbeat` every ``heartbeat / 2`` s: an idle
    link (nothing sent for ``heartbeat`` s) gets a PING, and a peer that sent nothing
    for ``3 * heartbeat`` s is declared dead and aborted -- unless this side stopped
    reading it (back-pressure): then its silence proves nothing.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections import deque
from typing import (
    TYPE_CHECKING,
    Any,
    Awaitable,
    Callable,
    Deque,
    List,
    NamedTuple,
    Optional,
    Sequence,
    Set,
    Tuple,
    Union,
    cast,
)

from .. import frames
from ..endpoint import WriteItems
from ..engine import CONTROL_DELAY, ConnectionEngine, ConnState, Tick, describe_peer
from ..errors import (
    ConnectionClosed,
    EndpointClosed,
    HandshakeError,
    ProtocolError,
    WriteTimeout,
    malformed,
)
from ..frames import Frame
from ..limits import CALLBACK_BACKLOG, MIN_READ_SIZE
from ..peer import PeerView
from ..protocol import Protocol
from ..relay import unwrap_relayed
from ..requests import reply_frame
from ..sendqueue import Outgoing, SendQueue
from .decoding import LazyImage

if TYPE_CHECKING:  # pragma: no cover
    from .endpoint import Endpoint

__all__ = ["Connection"]

logger = logging.getLogger("socketengine")

#: Bytes offered to each receive (the decoder's minimum free space).
READ_SIZE = MIN_READ_SIZE
#: Seconds between checks of the transport's buffer while a write waits for room
#: (asyncio reports only the low-water mark, often far below ``max_buffer``).
_ROOM_POLL = 0.005
# A write within sendqueue.BURST_GAP of the previous one is part of a burst: it is sent
# by one pump on the event loop's next step, with the rest of the burst.
# ... unless this many bytes wait (or a quarter of max_buffer): a producer that never
# yields to the loop between writes still sends in chunks, and a broadcast's
# slow-consumer verdict never sees a queue that only waits for the loop.
_BURST_BYTES = 64 * 1024
_DATA = frames.DATA
#: Looked up once: an enum member read through its class is slow on the write path.
_OPEN = ConnState.OPEN
_REPLIES = frozenset((frames.REPLY, frames.REPLY_ERROR))

#: ``fn(result, exc)``: receives the first handler's outcome of a request.
ReplyFn = Callable[[Any, Optional[BaseException]], None]


class Job(NamedTuple):
    """One callback invocation of a connection's :class:`CallbackChain`."""

    handlers: Sequence[Callable[..., Any]]
    args: Tuple[Any, ...]
    #: receives the first handler's outcome (requests), or ``None``
    reply: Optional[ReplyFn]
    #: what the job is for, in log messages
    label: str
    #: index in ``args`` of a :class:`LazyImage` to decode first (-1: none)
    lazy_at: int = -1


async def wait_bounded(aw: Awaitable[Any], timeout: Optional[float], message: str) -> Any:
    """Await ``aw`` for at most ``timeout`` s (``None``: no bound).

    Raises the builtin :class:`TimeoutError` with ``message`` (on Python < 3.11
    ``asyncio.TimeoutError`` is a different class; callers get the builtin one).
    """
    if timeout is None:
        return await aw
    try:
        return await asyncio.wait_for(aw, timeout)
    except asyncio.TimeoutError:
        raise TimeoutError(message) from None


async def wait_future(
    future: asyncio.Future[Any], timeout: Optional[float], message: Callable[[], str]
) -> Any:
    """Await ``future`` for at most ``timeout`` s (``None``: no bound), then fail it with
    the builtin :class:`TimeoutError` saying ``message()``.  A timer on the future
    itself: unlike ``asyncio.wait_for`` no task and no extra steps of the event loop
    once the future is done (a round trip's reply: measured 4-9 us less per
    ``request()``).  Whoever completes ``future`` must check ``done()`` first."""
    if timeout is None:
        return await future
    timer = asyncio.get_running_loop().call_later(timeout, _time_out, future, message)
    try:
        return await future
    finally:
        timer.cancel()


def _time_out(future: asyncio.Future[Any], message: Callable[[], str]) -> None:
    if not future.done():
        future.set_exception(TimeoutError(message()))


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Gate:
    """Something that a connection's deliveries can fill (a subscription, a backlog).

    A connection that filled it is *held*: it stops handling frames (and reading)
    until :meth:`release` is called.
    """

    def __init__(self) -> None:
        self._held: Set[Connection] = set()

    def hold(self, conn: Connection) -> None:
        """Remember that ``conn`` waits for room here."""
        self._held.add(conn)

    def release(self) -> None:
        """Let every held connection go on."""
        held = self._held
        if held:
            self._held = set()
            for conn in held:
                conn._unblock(self)


class CallbackChain(Gate):
    """The callbacks of one connection, run strictly in arrival order.

    A job whose handlers are plain functions runs inline when nothing is queued.
    Once a handler returns an awaitable (a coroutine function was called), or a job
    carries a received JPEG/PNG image that must be decoded first (in a worker thread),
    it is awaited in a task and every later job of this connection queues behind it.
    More than :data:`CALLBACK_BACKLOG` queued jobs hold the connection.
    """

    def __init__(self, conn: Connection) -> None:
        super().__init__()
        self._conn = conn
        self._jobs: Deque[Job] = deque()
        self._task: Optional[asyncio.Task[None]] = None

    def call(self, job: Job) -> None:
        """Run ``job`` now if nothing is ahead of it, else queue it."""
        if self._task is None:
            pending = self._start(job)
            if pending is not None:
                self._task = self._conn._endpoint._spawn(self._run(pending))
        else:
            self._jobs.append(job)
            if len(self._jobs) >= CALLBACK_BACKLOG:
                self._conn._block(self)

    async def _run(self, first: Awaitable[None]) -> None:
        try:
            await first
            jobs = self._jobs
            while jobs:
                job = jobs.popleft()
                if self._held and len(jobs) <= CALLBACK_BACKLOG // 2:
                    self.release()
                pending = self._start(job)
                if pending is not None:
                    await pending
        finally:
            self._task = None
            self._jobs.clear()
            self.release()

    def _start(self, job: Job, first: int = 0) -> Optional[Awaitable[None]]:
        """Call the handlers of ``job`` from index ``first`` until one returns an
        awaitable; return a coroutine that finishes the job, or ``None`` if done."""
        handlers, args, reply, label, lazy_at = job
        if lazy_at >= 0:
            image = cast(LazyImage, args[lazy_at])
            if not image.done:
                return self._decode_then(job)
            args = (*args[:lazy_at], image.decode_now(), *args[lazy_at + 1 :])
        for i in range(first, len(handlers)):
            fn = handlers[i]
            try:
                result = fn(*args)
            except Exception as exc:
                self._failed(fn, label, exc, reply is not None)
                if i == 0 and reply is not None:
                    reply(None, exc)
                continue
            if inspect.isawaitable(result):
                return self._finish(Job(handlers, args, reply, label), i, result)
            if i == 0 and reply is not None:
                reply(result, None)
        return None

    async def _decode_then(self, job: Job) -> None:
        """Decode the job's image in a worker thread, then run the job."""
        handlers, args, reply, label, lazy_at = job
        try:
            await cast(LazyImage, args[lazy_at]).decoded()
        except Exception as exc:
            logger.error(
                "%r: the image for %s could not be decoded (%s: %s); its callbacks were not called",
                self._conn._endpoint,
                label,
                type(exc).__name__,
                exc,
            )
            return
        rest = self._start(job)
        if rest is not None:
            await rest

    async def _finish(self, job: Job, index: int, awaitable: Awaitable[Any]) -> None:
        handlers, _, reply, label, _ = job
        try:
            result = await awaitable
        except Exception as exc:
            self._failed(handlers[index], label, exc, reply is not None)
            if index == 0 and reply is not None:
                reply(None, exc)
        else:
            if index == 0 and reply is not None:
                reply(result, None)
        rest = self._start(job, index + 1)
        if rest is not None:
            await rest

    def _failed(
        self, fn: Callable[..., Any], label: str, exc: BaseException, request: bool
    ) -> None:
        name = getattr(fn, "__qualname__", repr(fn))
        what = "request handler" if request else "callback"
        logger.error(
            "%r: %s %s for %s raised %s: %s",
            self._conn._endpoint,
            what,
            name,
            label,
            type(exc).__name__,
            exc,
            exc_info=exc,
        )


class Connection(PeerView, asyncio.BufferedProtocol):
    """A connection to one peer (asyncio).

    On an :class:`~socketengine.aio.Host` these are the objects ``clients()`` returns
    and callbacks receive.  Attributes:

    * ``address`` -- the peer's ``(host, port)``;
    * ``name`` -- the name the client gave (``Client(name=...)``), or ``None``;
    * ``values`` -- the latest value received on each channel from this peer;
    * ``connected_at`` / ``closed_at`` -- ``time.time()`` of accept / close;
    * ``error`` -- why the connection ended, if it ended badly;
    * ``bytes_in``, ``bytes_out``, ``messages_in``, ``messages_out`` -- counters;
    * ``images_sent``, ``images_dropped`` -- image frames handed over (or waiting in a
      slot) and replaced by a newer frame first (conflation).

    It is also the ``asyncio.BufferedProtocol`` of its transport; the protocol
    methods (``get_buffer``, ``buffer_updated``, ...) are called by the event loop.
    """

    def __init__(self, endpoint: Endpoint, protocol: Protocol) -> None:
        self._endpoint = endpoint
        self._loop = asyncio.get_running_loop()
        self.transport: Optional[asyncio.Transport] = None
        self.address: Tuple[Any, ...] = ("", 0)
        # Created when the TCP connection is accepted/connected, before any TLS
        # handshake: the handshake deadline counts from here.
        engine = ConnectionEngine(
            protocol,
            peer=describe_peer(None, self.address),
            max_buffer=endpoint.max_buffer,
            heartbeat=endpoint.heartbeat,
            handshake_timeout=endpoint.handshake_timeout,
            now=self._loop.time(),
            on_image=endpoint._images.queue_hook,
        )
        engine.unsent = self._unsent
        self._init_peer(engine, endpoint._latest)
        self._tls = False
        self._lost = False  # the transport is gone
        self._finished = False  # the endpoint was told the connection ended
        self._pending: Deque[Frame] = deque()  # decoded frames not handled yet
        self._blockers: Set[Gate] = set()
        self._resume_scheduled = False
        self._reading_paused = False
        self._write_paused = False
        self._stalled = False  # paused for longer than `timeout`: writes stop waiting
        self._pump_scheduled = False
        self._fan = endpoint._fan  # the host's run of deferred broadcasts (fanout.py)
        self._drain_waiters: List[asyncio.Future[None]] = []
        self._ready_waiter: Optional[asyncio.Future[None]] = None
        self._lost_waiter: asyncio.Future[None] = self._loop.create_future()
        self._timer: Optional[asyncio.TimerHandle] = None
        self._control_timer: Optional[asyncio.TimerHandle] = None
        self._chain = CallbackChain(self)

    # -- public ---------------------------------------------------------------------

    @property
    def _ready(self) -> bool:
        """The handshake completed (the connection is or was open)."""
        return self.engine.state is not ConnState.HANDSHAKE and self.engine.protocol.is_open

    @property
    def is_open(self) -> bool:
        """True between the end of the handshake and the start of closing."""
        return self.engine.state is ConnState.OPEN and not self._lost

    @property
    def closed(self) -> bool:
        """True once the transport is closed."""
        return self._lost

    @property
    def tls(self) -> bool:
        """True if the connection runs over TLS."""
        return self._tls

    @property
    def writing_paused(self) -> bool:
        """True while the peer does not take our data: writes wait for it."""
        return self._write_paused

    @property
    def reading_paused(self) -> bool:
        """True while reading is paused because a subscription or the callback
        backlog of this connection is full."""
        return self._reading_paused

    @property
    def queued_bytes(self) -> int:
        """Bytes written and not yet taken by the peer: the transport's buffer plus
        the frames waiting in the send queue."""
        return self._buffered() + self._queue.queued

    def _queued_bytes(self) -> int:
        return self.queued_bytes

    async def write(
        self,
        channel: str,
        data: Any,
        ack: bool = False,
        timeout: Optional[float] = None,
        compress: Optional[bool] = None,
    ) -> None:
        """Send ``data`` on ``channel`` to this peer.

        ``compress``: True compresses ``data`` whatever its size, False never, None as
        the endpoint's ``compression`` / ``compress_threshold`` say (only for a peer
        that announced the codec, and only when the result is smaller).

        Raises ``TypeError`` if ``data`` cannot be sent (nothing is sent),
        :class:`EndpointClosed` after the endpoint's ``close()``,
        :class:`ConnectionClosed` if the connection is gone, and
        :class:`~socketengine.WriteTimeout` if the peer's buffer stayed above
        ``max_buffer`` for ``timeout`` s (nothing is sent).  Waits (at most
        ``timeout`` s) while the peer does not keep up.  ``ack=True`` also waits until
        the peer confirms it has stored the value (see :meth:`sync`).
        """
        if self._endpoint._codecs is None and not compress:
            encoded = frames.value_item(channel, data)
        else:
            encoded = self._endpoint._encode_for(self, channel, data, compress)
        if type(encoded) is bytes:
            await self._send_item(encoded)
        else:
            await self._send_frame(*encoded)
        if ack:
            await self.sync(timeout)

    async def write_many(self, items: WriteItems, compress: Optional[bool] = None) -> None:
        """Send many values to this peer at once: a mapping ``{channel: value}`` or an
        iterable of ``(channel, value)`` pairs.  Each is delivered exactly as if
        written by :meth:`write`, in order; small values travel several to a BATCH
        frame.  Every value is encoded first (``TypeError``/``ValueError`` naming the
        item, nothing sent); the batch is queued whole once it fits under
        ``max_buffer`` (an empty buffer takes any batch): waits up to ``timeout`` s,
        then :class:`~socketengine.WriteTimeout` with nothing sent."""
        encoded, nbytes = self._endpoint._encode_many(self, items, compress)
        await self._send_values(encoded, nbytes)

    async def sync(self, timeout: Optional[float] = None) -> None:
        """Wait until the peer confirms it has stored everything written to it so far
        (SYNC answered by ACK, protocol 1.1).  Raises :class:`~socketengine.WriteTimeout`
        after ``timeout`` s (default: the endpoint's ``timeout``),
        :class:`ConnectionClosed` if the connection is lost first, and
        :class:`~socketengine.NotSupported` for a protocol 1.0 peer."""
        limit = self._endpoint.timeout if timeout is None else timeout
        self._check_writable()
        future: asyncio.Future[Any] = self._loop.create_future()
        requests = self.engine.requests
        rid = requests.open(future)
        try:
            frame = self.engine.sync_frame(rid)
            self._enqueue((frame,), len(frame))
            try:
                await asyncio.wait_for(asyncio.shield(future), limit)
            except asyncio.TimeoutError:
                raise WriteTimeout(
                    f"{self._peer()} did not acknowledge the writes within {limit} s"
                ) from None
        finally:
            requests.cancel(rid)

    async def flush(self, timeout: Optional[float] = None, acked: bool = False) -> None:
        """Wait until everything written so far is handed to the operating system
        (``acked=True``: until the peer confirms it has stored all of it).  Raises
        :class:`~socketengine.WriteTimeout` after ``timeout`` s and
        :class:`ConnectionClosed` if the connection is lost first."""
        limit = self._endpoint.timeout if timeout is None else timeout
        fan = self._fan
        if fan is not None and fan.items:
            self._endpoint._fan_flush()
        if acked:
            await self.sync(limit)
            return
        deadline = self._loop.time() + limit
        while self._queue or self._buffered():
            if self._lost:
                raise ConnectionClosed(f"the connection to {self._peer()} closed before flushing")
            left = deadline - self._loop.time()
            if left <= 0:
                raise WriteTimeout(
                    f"{self._peer()} did not take {self.queued_bytes} queued bytes within {limit} s"
                )
            await self._progress(min(left, _ROOM_POLL))

    async def write_image(
        self,
        img: Any,
        channel: str = "image",
        codec: Optional[str] = None,
        quality: Optional[int] = None,
        conflate: bool = True,
    ) -> None:
        """Send a numpy image (H, W) or (H, W, C) on ``channel`` to this peer only.

        ``codec`` (``"raw"``, ``"jpeg"``, ``"png"``) and ``quality`` (JPEG, 1-100)
        default to the endpoint's ``image_codec`` / ``image_quality``; JPEG/PNG encoding
        runs in a worker thread.  If an earlier image on ``channel`` still waits unsent,
        this one replaces it (latest frame wins); an image write never waits for the
        peer.  ``TypeError`` / ``ValueError`` before anything is sent.

        ``conflate=False`` makes the channel lossless: every frame is queued like a
        plain value, in order, and a slow receiver slows the writer (backpressure,
        bounded by ``max_buffer``) instead of getting only the newest frame.
        """
        parts, nbytes = await self._endpoint._image_frame(img, channel, codec, quality, conflate)
        await self._send_frame(parts, nbytes, image=channel if conflate else None)

    async def request(self, channel: str, data: Any, timeout: Optional[float] = 5.0) -> Any:
        """Send a request on ``channel`` and return the peer's reply.

        The peer's first ``on(channel)`` handler answers it.  Raises
        :class:`RemoteError` if the handler raised (or the peer has none),
        ``TimeoutError`` after ``timeout`` s (``None``: no bound),
        :class:`ConnectionClosed` if the connection is lost meanwhile.
        """
        self._check_writable()
        future: asyncio.Future[Any] = self._loop.create_future()
        requests = self.engine.requests
        fid = requests.open(future)
        try:
            parts, nbytes = frames.value_frame(frames.REQUEST, channel, data, fid=fid)
            if not self._queue.fits(nbytes, self._buffered()):  # (no coroutine when it fits)
                await self._make_room(nbytes)
            self._enqueue(parts, nbytes)
            self.messages_out += 1
            if self._write_paused and not self._stalled:
                return await wait_bounded(
                    self._await_reply(future), timeout, self._no_reply(channel, timeout)
                )
            return await wait_future(future, timeout, lambda: self._no_reply(channel, timeout))
        finally:
            requests.cancel(fid)

    def _no_reply(self, channel: str, timeout: Optional[float]) -> str:
        return (
            f"no reply from {self._peer()} to the request on channel {channel!r} within {timeout} s"
        )

    async def close(self, timeout: Optional[float] = None) -> None:
        """Close gracefully: flush, say BYE, half-close, wait for the peer to close.

        Over TLS there is no half-close (it would end the TLS session): BYE alone
        announces the end, and the peer closes.  Bounded by ``timeout`` s (default:
        the endpoint's ``timeout``); then the connection is aborted.  Idempotent.
        """
        linger = self._endpoint.timeout if timeout is None else timeout
        transport = self.transport
        if transport is None or self._lost:
            return
        fan = self._fan
        if fan is not None and fan.items:
            self._endpoint._fan_flush()  # the run goes before the BYE
        engine = self.engine
        if not engine.bye_sent:
            opened = self._ready
            bye = engine.send_bye(self._loop.time(), linger)
            if opened and bye:
                self._pump(force=True)  # everything queued, the newest images too
                transport.write(bye)
                if not self._tls:
                    try:
                        transport.write_eof()  # after the buffered data: a graceful half-close
                    except OSError as exc:  # e.g. the peer reset it while we did not read
                        engine.lost(exc)
                        transport.abort()
            else:
                transport.close()
        # Keep reading (and storing) until the peer closes: the protocol's step 4.
        self._unpause_for_close()
        try:
            await asyncio.wait_for(asyncio.shield(self._lost_waiter), max(linger, 0.0))
        except asyncio.TimeoutError:
            logger.info("%r: %s did not close within %s s; aborting", self._endpoint, self, linger)
            transport.abort()
            await self._lost_waiter

    def __repr__(self) -> str:
        state = "closed" if self._lost else self.engine.state.value
        name = f" name={self.name!r}" if self.name else ""
        return f"<aio.Connection {self.address[0]}:{self.address[1]}{name} {state}>"

    # -- sending --------------------------------------------------------------------------

    async def _send_frame(self, parts: Outgoing, nbytes: int, image: Optional[str] = None) -> None:
        """Send one encoded frame of ``nbytes`` bytes; wait while the peer lags.

        :param image: the channel of an image frame: it is conflated (it replaces an
            earlier frame of that channel still waiting in the send queue) and never
            waits.
        """
        if type(parts) is bytes:
            await self._send_item(parts)
            return
        if self.engine.state is not _OPEN and parts[0][0] == _DATA:  # type: ignore[index]
            if self._held(parts, nbytes, image):
                return
        self._check_writable()
        if image is not None:
            self._enqueue(parts, nbytes, image)
            self.messages_out += 1
            await asyncio.sleep(0)  # let the loop flush: a tight loop must not starve it
            return
        if not self._queue.fits(nbytes, self._buffered()):  # (no coroutine when it fits)
            await self._make_room(nbytes)
        self._enqueue(parts, nbytes)
        self.messages_out += 1
        if self._write_paused and not self._stalled:
            await self._drain_for(self._endpoint.timeout)

    async def _send_item(self, item: bytes) -> None:
        """Send a small value encoded as a BATCH item; wait while the peer lags."""
        if self.engine.state is not _OPEN or self._lost or self._endpoint.stopped:
            if self.engine.state is not _OPEN and self._held(item, len(item), None):
                return
            self._check_writable()  # raises the right error
        queue = self._queue
        if not queue.fits(len(item), self._buffered()):  # (no coroutine when it fits)
            await self._make_room(len(item))
        fan = self._fan
        if fan is not None and fan.items:
            self._endpoint._fan_flush()  # nothing overtakes a run of broadcasts
        self._queue_item(item)
        if not self._write_paused:
            self._push_out()
        self.messages_out += 1
        if self._write_paused and not self._stalled:
            await self._drain_for(self._endpoint.timeout)

    async def _send_values(self, encoded: frames.EncodedValues, nbytes: int) -> None:
        """Queue a ``write_many``'s values whole (see
        :meth:`EndpointBase._encode_many`); wait while the peer lags."""
        if not encoded:
            return
        if self.engine.state is not _OPEN:
            for value in encoded:  # held for a resume one by one, or the right error
                if type(value) is bytes:
                    await self._send_item(value)
                else:
                    await self._send_frame(*value)
            return
        self._check_writable()
        await self._make_room(nbytes)
        self._check_writable()
        fan = self._fan
        if fan is not None and fan.items:
            self._endpoint._fan_flush()  # nothing overtakes a run of broadcasts
        self._queue.push_values(encoded, nbytes)
        self.messages_out += len(encoded)
        if not self._write_paused:
            self._push_out()
        if self._write_paused and not self._stalled:
            await self._drain_for(self._endpoint.timeout)

    def _held(self, parts: Outgoing, nbytes: int, image: Optional[str]) -> bool:
        """The link is down: queue the write into the held session if there is one
        (:meth:`EndpointBase._hold`)."""
        if not self._endpoint._hold(self, parts, nbytes, image):
            return False
        self.messages_out += 1
        return True

    async def _make_room(self, nbytes: int) -> None:
        """Wait until ``nbytes`` more fit under ``max_buffer`` (an empty buffer takes
        any frame); :class:`WriteTimeout` after ``timeout`` s, nothing sent."""
        queue = self._queue
        if queue.fits(nbytes, self._buffered()):
            return
        deadline = self._loop.time() + self._endpoint.timeout
        while True:
            if self._lost or not self.is_open:
                raise ConnectionClosed(f"the connection to {self._peer()} closed while writing")
            buffered = self._buffered()
            if queue.fits(nbytes, buffered):
                return
            left = deadline - self._loop.time()
            if left <= 0:
                raise WriteTimeout(
                    f"{self._peer()} is not reading: {buffered + queue.queued} bytes are "
                    f"already buffered (max_buffer={queue.max_buffer}); the write was not sent"
                )
            await self._progress(min(left, _ROOM_POLL))

    async def _drain_for(self, timeout: float) -> None:
        """Wait until the transport resumes, for at most ``timeout`` s; then mark the
        peer stalled (later writes do not wait until it drains)."""
        deadline = self._loop.time() + timeout
        while self._write_paused and not self._lost:
            left = deadline - self._loop.time()
            if left <= 0:
                self._stalled = True
                logger.debug("%r: %s has taken nothing for %s s", self._endpoint, self, timeout)
                return
            await self._progress(left)

    async def _progress(self, seconds: float) -> None:
        """Sleep until the transport resumes writing, the connection is lost, or
        ``seconds`` pass, whichever comes first."""
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._drain_waiters.append(waiter)
        timer = self._loop.call_later(seconds, _wake, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            if waiter in self._drain_waiters:
                self._drain_waiters.remove(waiter)

    async def drain(self) -> None:
        """Wait until the transport's buffer is below its low-water mark.

        Raises :class:`ConnectionClosed` if the connection is lost meanwhile.
        """
        while self._write_paused:
            if self._lost:
                raise ConnectionClosed(f"the connection to {self._peer()} was lost while writing")
            waiter: asyncio.Future[None] = self._loop.create_future()
            self._drain_waiters.append(waiter)
            await waiter

    def _offer(
        self, parts: Outgoing, nbytes: int, image: Optional[str], burst: bool = False
    ) -> bool:
        """Hand a broadcast frame over without ever waiting (``write_all``); ``burst``:
        one of many broadcasts in a row, sent by one pump per connection.

        A peer whose buffer is above ``max_buffer`` still gets it, up to twice that and
        for ``timeout`` s; past either bound it is disconnected as a slow consumer
        (the send queue's verdict).  Returns False if the frame was not sent.
        """
        if not self.is_open:
            return False
        if not (image is not None and self._queue.waiting_image(image)):
            if self._dropped_as_slow(nbytes):
                return False
        self._enqueue(parts, nbytes, image, burst)
        self.messages_out += 1
        return True

    def _send_run(self, items: List[bytes], nbytes: int) -> None:
        """A host's run of broadcast values (:class:`~socketengine.fanout.FanOut`,
        ``nbytes`` as it counts them), queued at once, in order, and sent on the loop's
        next step: like :meth:`_offer` of each, with one slow-consumer verdict.

        A connection that is no longer open gets them only if its session survives it
        (into the queue that a resume continues); one closing with a BYE, a protocol
        error or a slow-consumer drop does not."""
        engine = self.engine
        queue = self._queue
        if engine.state is not _OPEN:
            if engine.resumable and not engine.closed and queue.offer_items(items, nbytes):
                self.messages_out += len(items)
            return
        if self._dropped_as_slow(nbytes):
            return
        queue.push_items(items, nbytes)
        self.messages_out += len(items)
        if not self._write_paused:
            self._push_out(True)

    def _dropped_as_slow(self, nbytes: int) -> bool:
        """The send queue's slow-consumer verdict on a broadcast of ``nbytes`` more;
        True if this peer was disconnected for it (logged), nothing queued."""
        queue = self._queue
        now = self._loop.time()
        if not queue.slow_consumer(nbytes, now, self._endpoint.timeout, self._buffered()):
            return False
        logger.warning(
            "%r: disconnecting slow consumer %s (%d bytes unsent for %.1f s, max_buffer=%d)",
            self._endpoint,
            self._peer(),
            self._buffered() + queue.queued,
            now - queue.full_for,
            queue.max_buffer,
        )
        self.engine.fail(WriteTimeout(f"{self._peer()} was disconnected as a slow consumer"))
        self._abort()
        return True

    def _enqueue(
        self, parts: Outgoing, nbytes: int, image: Optional[str] = None, burst: bool = False
    ) -> None:
        """Queue a frame (in order; an image replaces its channel's waiting frame) or
        a BATCH item (``bytes``), and hand what the transport takes over to it."""
        fan = self._fan
        if fan is not None and fan.items:
            self._endpoint._fan_flush()  # nothing overtakes a run of broadcasts
        if isinstance(parts, bytes):
            self._queue_item(parts, burst)
        else:
            queue = self._queue
            frame = list(parts)
            if image is not None or not queue.push_direct(frame, nbytes):
                queue.push(frame, nbytes, image)  # else: idle, straight to the wire
        if not self._write_paused:
            self._push_out(burst)

    def _queue_item(self, item: bytes, burst: bool = False) -> None:
        """Queue a BATCH item: on a quiet link (writing not paused, no pump due, the
        last write older than ``BURST_GAP``; :meth:`_push_out` then sends at once) an
        idle queue takes it straight to the wire; otherwise it waits in the inbox to be
        batched."""
        queue = self._queue
        if (
            burst
            or self._write_paused
            or self._pump_scheduled
            or not queue.quiet(self._loop.time())
            or not queue.push_item_direct(item)
        ):
            queue.push_item(item)

    def _push_out(self, burst: bool = False) -> None:
        """A write was queued: hand it to the transport now if the link was idle;
        in a burst (``burst``: the host's broadcasts are one), leave it to one pump on
        the loop's next step (a send for many values), or pump now once
        ``_BURST_BYTES`` (or a quarter of ``max_buffer``) wait."""
        queue = self._queue
        if self._pump_scheduled:
            if queue.queued >= min(_BURST_BYTES, queue.max_buffer >> 2):
                self._pump()
            return
        if queue.opens_burst(self._loop.time()) and not burst:
            self._pump()
        else:
            self._pump_scheduled = True
            self._loop.call_soon(self._pump)

    def _pump(self, force: bool = False) -> None:
        """Hand queued frames to the transport until it pauses (``force``: all of them,
        when closing)."""
        self._pump_scheduled = False
        transport = self.transport
        queue = self._queue
        if transport is None or self._lost:
            if self.engine.resumable:
                queue.detach()  # the rest is kept for the next link (resume)
            else:
                queue.clear()
            return
        while queue and (force or not self._write_paused):
            if not queue.wire_pending:
                if queue.unframed:
                    queue.to_wire([])
                    continue
                entries = queue.take_inbox()
                if not entries:
                    break  # held back: the replay window is full until a RACK (_window_moved)
                queue.to_wire(entries)
                continue
            if transport.is_closing():
                # Lost, and connection_lost() not called yet: what is left waits for it
                # (kept for a resume).  Writing now would be dropped by write(), and
                # raises in writelines() on CPython 3.13.0 (TypeError from a closed
                # transport's cleared _write_ready).
                break
            batch = queue.wire_batch(1 << 30)
            size = sum(memoryview(part).nbytes for part in batch)
            queue.consumed(size)
            if len(batch) == 1:
                transport.write(batch[0])
            else:
                transport.writelines(batch)
                if not self._write_paused:
                    # CPython 3.12.0-3.12.8 and 3.13.0-3.13.1 (gh-127655): the selector
                    # transport's writelines() never pauses the protocol at its
                    # high-water mark.  set_write_buffer_limits() (public) runs that
                    # check again, and calls pause_writing() when it is due.
                    low, high = transport.get_write_buffer_limits()
                    if transport.get_write_buffer_size() > high:
                        transport.set_write_buffer_limits(high, low)
            self.bytes_out += size
            now = self._loop.time()
            self.engine.sent(now)
            queue.last_write = now  # a write soon after this send is part of the burst

    def _unsent(self) -> int:
        """Bytes waiting unsent to the peer: the queue's and the transport's."""
        return self.engine.queue.queued + self._buffered()

    def _buffered(self) -> int:
        transport = self.transport
        if transport is None or self._lost:
            return 0
        return transport.get_write_buffer_size()

    def _check_writable(self) -> None:
        if self._endpoint.stopped:
            raise EndpointClosed(f"cannot write: {self._endpoint!r} is closed")
        if self._lost and self.engine.state is not ConnState.CLOSED:
            raise ConnectionClosed(
                f"the connection to {self._peer()} is closed ({self.error or 'closed'})"
            )
        self.engine.check_writable()

    def _adopt(self, old: Optional[SendQueue]) -> None:
        """Continue the previous link's queue on this one (after the handshake, before
        anything else is queued): the engine replays what the peer lacks (resume)."""
        self.engine.adopt(old)

    def _send_protocol_bytes(self) -> None:
        """Send what the core wants sent (handshake frames, PONG): never after BYE."""
        out = self.engine.control_bytes()
        if out and self.transport is not None and not self._lost:
            self._write_control(out)

    def _write_control(self, out: bytes) -> None:
        """Protocol bytes out now, yet never ahead of protocol bytes queued earlier
        (:meth:`_defer_protocol_bytes`): a RACK's count must not go backwards (the peer
        would read the older count as one beyond what it sent), so while the queue
        holds anything they join its end, as on the threaded layer."""
        if self._queue:
            self._queue.push([out], len(out))
            if not self._write_paused:
                self._pump()
            return
        self.transport.write(out)  # type: ignore[union-attr]
        self.bytes_out += len(out)
        self.engine.sent(self._loop.time())

    def _defer_protocol_bytes(self) -> None:
        """Queue what the core wants sent, to leave with the next write or within
        CONTROL_DELAY."""
        out = self.engine.control_bytes()
        if not out or self.transport is None or self._lost:
            return
        self._queue.push([out], len(out))
        if self._control_timer is None:
            self._control_timer = self._loop.call_later(CONTROL_DELAY, self._flush_control)

    def _flush_control(self) -> None:
        self._control_timer = None
        if self._queue and not self._write_paused and not self._lost:
            self._pump()

    def _send_reply(
        self, channel: str, fid: int, result: Any, exc: Union[BaseException, str, None]
    ) -> Optional[str]:
        """Answer request ``fid``: REPLY with ``result``, or REPLY_ERROR naming ``exc``
        (an exception, or the text itself); return the error text (``None``: a REPLY)."""
        parts, nbytes, text = reply_frame(channel, fid, result, exc)
        if self.is_open:
            # Never waits, and bounded like a broadcast: a peer that does not read its
            # replies is disconnected as a slow consumer (logged) rather than queue them.
            self._offer(parts, nbytes, None)
            return text
        try:
            if self.engine.state is not _OPEN and self._held(parts, nbytes, None):
                return text  # the link is down: sent on resume
        except WriteTimeout:
            pass
        logger.debug("%r: dropping the reply to request %d: closed", self, fid)
        return text

    async def _await_reply(self, future: asyncio.Future[Any]) -> Any:
        if self._write_paused and not self._stalled:
            await self._drain_for(self._endpoint.timeout)
        return await future

    # -- heartbeats -----------------------------------------------------------------------

    def _heartbeat(self, now: float) -> None:
        """The endpoint's periodic tick (event loop)."""
        if self._lost:
            return
        self._act(self.engine.tick(now, self._reading_paused))

    def _act(self, verdict: Tick) -> None:
        if verdict is Tick.NOTHING:
            return
        if verdict is Tick.PING:
            ping = self.engine.ping(self._loop.time())
            if ping and self.transport is not None:
                self._write_control(ping)
        elif verdict is Tick.DEAD:
            logger.warning("%r: %s", self._endpoint, self.engine.error)
            # A lost link, not a failed peer: its session may be resumed (no fail()).
            self._abort()
        elif verdict is Tick.HANDSHAKE_TIMEOUT:
            self._fail(self.engine.error or HandshakeError("handshake timeout"))
        else:  # LINGER_OVER
            self._abort()

    # -- asyncio.BufferedProtocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Called by the event loop when the connection is established (over TLS:
        once the TLS handshake completed)."""
        self.transport = cast(asyncio.Transport, transport)
        self._tls = transport.get_extra_info("ssl_object") is not None
        engine = self.engine
        engine.received(self._loop.time())
        engine.sent(self._loop.time())
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.address = tuple(peer)
        else:  # a Unix socket: name it by its file
            path = transport.get_extra_info("sockname") or peer
            self.address = (str(path or "unix"), 0)
        engine.peer = self._peer()
        refusal = self._endpoint._connection_made(self)
        if refusal is not None:
            reason, code = refusal
            logger.warning("%r: refused %s: %s", self._endpoint, self._peer(), reason)
            linger = min(self._endpoint.timeout, 2.0)
            out = engine.refuse(reason, code, self._loop.time(), linger)
            self.transport.write(out)
            if self._tls:
                self.transport.close()
                return
            # Half-close and read until the client hangs up, so that the REFUSE is not
            # lost to a TCP reset (bounded by the linger).
            try:
                self.transport.write_eof()
            except OSError as exc:  # the peer already reset it: nobody is left to tell
                engine.lost(exc)
                self.transport.abort()
                return
            self._arm_deadline()
            return
        self._send_protocol_bytes()
        self._arm_deadline()

    def _arm_deadline(self) -> None:
        """Check the engine at its next deadline (handshake, linger)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.engine.next_deadline()
        if deadline is not None and not self._lost:
            self._timer = self._loop.call_at(deadline, self._on_deadline)

    def _on_deadline(self) -> None:
        self._timer = None
        if self._lost:
            return
        self._act(self.engine.tick(self._loop.time(), self._reading_paused))
        if not self._lost:
            self._arm_deadline()

    def get_buffer(self, sizehint: int) -> memoryview:
        """Where the event loop should receive the next bytes (the decoder's buffer)."""
        return self.engine.protocol.decoder.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` arrived in the buffer: decode, finish the handshake, handle frames."""
        self.bytes_in += nbytes
        self.engine.received(self._loop.time())
        decoder = self.engine.protocol.decoder
        try:
            decoder.buffer_updated(nbytes)
            # More than once when shared-memory frames were handed over one at a time
            # (Protocol.events); nothing after the peer's BYE is handled.
            engine = self.engine
            while decoder.frames and not engine.closed and not engine.bye_received:
                self._process()
            if engine.take_racked():
                self._window_moved()
        except (ProtocolError, HandshakeError) as exc:
            self._fail(exc)
        except Exception as exc:  # a malformed frame a decoder let through
            self._fail(malformed(exc))

    def _window_moved(self) -> None:
        """A RACK arrived: send what the send queue held back for want of room in
        the replay window, and let writers waiting for room look again."""
        if self._queue.held_back and not self._write_paused and not self._lost:
            self._pump()
            for waiter in self._drain_waiters:
                _wake(waiter)

    def eof_received(self) -> Optional[bool]:
        """The peer half-closed: let the transport close (after flushing)."""
        if not self.engine.receive_eof():
            self.engine.lost(None)
        return None

    def connection_lost(self, exc: Optional[Exception]) -> None:
        """The transport is closed: fail what waits on this connection."""
        if self._lost:
            return
        fan = self._fan
        if fan is not None and fan.items:
            self._endpoint._fan_flush()  # into the queue its session may keep
        self._lost = True
        self.closed_at = time.time()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        engine = self.engine
        was_open = self._ready
        engine.lost(exc)
        if exc is not None and was_open:
            logger.info("%r: connection to %s lost: %s", self._endpoint, self._peer(), exc)
        engine.finish()  # fails outstanding requests, drops the queue
        waiter = self._ready_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(self._handshake_error())
        for drain in self._drain_waiters:
            _wake(drain)
        self._drain_waiters.clear()
        if not self._lost_waiter.done():
            self._lost_waiter.set_result(None)
        self._endpoint._connection_lost(self)
        if not self._pending:
            self._finish()

    def pause_writing(self) -> None:
        """The transport's buffer is above its high-water mark."""
        self._write_paused = True

    def resume_writing(self) -> None:
        """The transport's buffer drained below its low-water mark."""
        self._write_paused = False
        self._stalled = False
        waiters = self._drain_waiters
        self._drain_waiters = []
        for waiter in waiters:
            _wake(waiter)
        if self._queue and not self._pump_scheduled:
            # Not from inside the transport's own write path: on the next loop step.
            self._pump_scheduled = True
            self._loop.call_soon(self._pump)

    # -- receiving ---------------------------------------------------------------------------

    def _process(self) -> None:
        engine = self.engine
        was_open = engine.opened or engine.state is not ConnState.HANDSHAKE
        try:
            events = engine.events()
        except BaseException:
            self._send_protocol_bytes()
            raise
        urgent = engine.take_rack_urgent()
        if was_open and events and not urgent:
            # A RACK or PONG owed now leaves with what handling these frames writes (a
            # reply), or within CONTROL_DELAY (see the threaded layer's _process).
            self._defer_protocol_bytes()
        else:
            self._send_protocol_bytes()
        if not was_open and engine.opened:
            engine.peer = self._peer()
            self._endpoint._connection_ready(self)  # a session: adopted there (resume)
            if engine.opening:  # nobody continued a session here: start afresh
                self._adopt(None)
            self._arm_deadline()  # the handshake deadline no longer applies
            waiter = self._ready_waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
            if self._queue and not self._write_paused:
                self._pump()
        if events:
            if self._pending or self._blockers:
                self._pending.extend(events)
            else:
                self._pending = deque(events)
            self._run_pending()

    def _run_pending(self) -> None:
        """Handle decoded frames in order until done or a gate is full."""
        pending = self._pending
        handle = self._handle
        blockers = self._blockers
        while pending and not blockers:
            handle(pending.popleft())
        transport = self.transport
        if blockers:
            if not self._reading_paused and transport is not None and not self._lost:
                transport.pause_reading()
                self._reading_paused = True
        else:
            if self._reading_paused:
                self._reading_paused = False
                if transport is not None and not self._lost:
                    transport.resume_reading()
            if self._lost and not pending:
                self._finish()

    def _handle(self, frame: Frame) -> None:
        t = frame.type
        if t == frames.DATA:
            if frame.flags & frames.FLAG_COMPRESSED:  # relayed and budgeted as the original
                frame = frames.decompressed(frame, self._endpoint.max_message)
            if frame.flags & frames.FLAG_RELAYED:  # kept and relayed as its sender wrote it
                self.senders[frame.channel], frame = unwrap_relayed(frame)
            meta = frame.meta
            data = frame.data
            endpoint = self._endpoint
            # Budgeted before it is decoded, as the threaded host does.
            endpoint._budget(self, frame.channel, meta, data)
            value = frame.value()
            endpoint._deliver(
                self, frame.channel, value, frame.flags & frames.FLAG_IMAGE, counted=True
            )
            self.messages_in += 1
            relay = endpoint._relay
            if relay is not None and relay.allows(frame.channel, self.name):
                endpoint._relay_out(self, frame.channel, meta, frame.data)
        elif t == frames.BATCH:
            endpoint = self._endpoint
            endpoint._deliver_batch(self, frame)
        elif t == frames.REQUEST:
            value = frame.value()
            self.messages_in += 1
            self._endpoint._answer(self, frame.channel, frame.id, value)
        elif self.engine.control(frame):
            self._on_bye()
        elif t == frames.SYNC:
            self._send_protocol_bytes()  # the ACK, after everything already queued
            for ack in self.engine.take_acks():  # a sequenced ACK: numbered, queued
                self._enqueue((ack,), len(ack))

    def _block(self, gate: Gate) -> None:
        """``gate`` is full: stop handling frames until it releases this connection."""
        self._blockers.add(gate)
        gate.hold(self)

    def _unblock(self, gate: Gate) -> None:
        self._blockers.discard(gate)
        if not self._blockers and not self._resume_scheduled:
            self._resume_scheduled = True
            self._loop.call_soon(self._resume)

    def _resume(self) -> None:
        self._resume_scheduled = False
        if self._blockers:
            return
        try:
            self._run_pending()
        except (ProtocolError, HandshakeError) as exc:
            self._fail(exc)
        except Exception as exc:  # a malformed frame a decoder let through
            self._fail(malformed(exc))

    def _unpause_for_close(self) -> None:
        if self._reading_paused and not self._blockers and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    # -- closing ----------------------------------------------------------------------------

    def _handshake_error(self) -> BaseException:
        error = self.error
        if isinstance(error, HandshakeError):
            return error
        return HandshakeError(
            f"{self._peer()} did not complete the socketengine handshake ({error or 'no answer'})"
        )

    def _handshake_left(self) -> float:
        """What is left of the handshake deadline, counted from the TCP connection
        (so a TLS handshake counts against it)."""
        return max(0.0, self.engine.handshake_deadline - self._loop.time())

    async def _wait_ready(self, timeout: float) -> None:
        """Wait for the handshake (client side); raise :class:`HandshakeError`."""
        if self._ready:
            return
        if self._lost:
            raise self._handshake_error()
        self._ready_waiter = self._loop.create_future()
        try:
            # Not shielded: on timeout the waiter is cancelled, so connection_lost()
            # leaves it alone (no exception that nobody retrieves).
            await asyncio.wait_for(self._ready_waiter, timeout)
        except asyncio.TimeoutError:
            self._act(self.engine.tick(self.engine.handshake_deadline, self._reading_paused))
            raise self._handshake_error() from None

    def _on_bye(self) -> None:
        """The peer said BYE: it sends nothing more.  Flush what is queued and close."""
        self._pending.clear()
        transport = self.transport
        if transport is not None and not self._lost:
            self._pump(force=True)
            transport.close()  # flushes the buffer first
            self._linger()

    def _fail(self, exc: BaseException) -> None:
        """The peer broke the protocol (or the handshake failed): log, tell it, close."""
        logger.warning("%r: closing connection to %s: %s", self._endpoint, self._peer(), exc)
        last = self.engine.fail(exc)
        self._pending.clear()
        transport = self.transport
        if transport is None or self._lost:
            return
        if last:
            transport.write(last)  # e.g. a REFUSE frame
        transport.close()
        self._linger()

    def _linger(self, seconds: Optional[float] = None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        linger = self._endpoint.timeout if seconds is None else seconds
        self._timer = self._loop.call_later(linger, self._abort)

    def _abort(self) -> None:
        if self.transport is not None and not self._lost:
            self.transport.abort()

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        self._endpoint._connection_closed(self)
