"""One peer connection of the asyncio layer: an ``asyncio.BufferedProtocol`` over the core.

The sans-I/O core does all protocol work: the event loop's ``get_buffer`` /
``buffer_updated`` calls go straight to :class:`socketengine.frames.FrameDecoder`, the
handshake, authentication and pongs are :class:`socketengine.protocol.Protocol`'s, and
frames are built by :mod:`socketengine.frames`.  This module adds what asyncio needs:
flow control in both directions, request/reply futures, and ordered callbacks.

Flow control
    *Sending*: writes go to the transport at once; while its buffer is above the
    high-water mark (``pause_writing``), ``await write(...)`` waits until it drains
    below the low-water mark (``resume_writing``), as ``StreamWriter.drain`` does.
    *Receiving*: decoded frames are handled one by one, in order.  When handling a
    frame fills a :class:`~socketengine.aio.subscription.Subscription` (``maxsize``
    items) or the connection's callback backlog, handling stops, the rest waits in
    order and ``transport.pause_reading()`` is called; it resumes when the consumer
    has drained half of it.  So nothing is dropped and the peer's writes block: the
    back-pressure reaches the sender through TCP.
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
    Dict,
    List,
    Optional,
    Sequence,
    Set,
    Tuple,
    cast,
)

from .. import codec, frames
from ..codec import Buffer
from ..errors import (
    ConnectionClosed,
    EndpointClosed,
    HandshakeError,
    ProtocolError,
    RemoteError,
)
from ..frames import Frame
from ..protocol import Protocol

if TYPE_CHECKING:  # pragma: no cover
    from .endpoint import Endpoint

__all__ = ["Connection"]

logger = logging.getLogger("socketengine")

_BYE = b"".join(frames.encode_frame(frames.BYE))
_MAX_ID = 0xFFFFFFFF
#: Bytes offered to each receive (the decoder's minimum free space).
READ_SIZE = 64 * 1024
#: Callback invocations that may wait behind a slow async callback before the
#: connection stops reading (see "Flow control" above).
CALLBACK_BACKLOG = 10_000

#: ``fn(result, exc)``: receives the first handler's outcome of a request.
ReplyFn = Callable[[Any, Optional[BaseException]], None]
#: One callback invocation: handlers, their arguments, the reply function, a label.
Job = Tuple[Sequence[Callable[..., Any]], Tuple[Any, ...], Optional[ReplyFn], str]


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
    Once a handler returns an awaitable (a coroutine function was called), it is
    awaited in a task and every later job of this connection queues behind it.
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
        handlers, args, reply, label = job
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
                return self._finish(job, i, result)
            if i == 0 and reply is not None:
                reply(result, None)
        return None

    async def _finish(self, job: Job, index: int, awaitable: Awaitable[Any]) -> None:
        handlers, _, reply, label = job
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


class Connection(asyncio.BufferedProtocol):
    """A connection to one peer (asyncio).

    On an :class:`~socketengine.aio.Host` these are the objects ``clients()`` returns
    and callbacks receive.  Attributes:

    * ``address`` -- the peer's ``(host, port)``;
    * ``name`` -- the name the client gave (``Client(name=...)``), or ``None``;
    * ``values`` -- the latest value received on each channel from this peer;
    * ``connected_at`` / ``closed_at`` -- ``time.time()`` of accept / close;
    * ``error`` -- why the connection ended, if it ended badly;
    * ``bytes_in``, ``bytes_out``, ``messages_in``, ``messages_out`` -- counters.

    It is also the ``asyncio.BufferedProtocol`` of its transport; the protocol
    methods (``get_buffer``, ``buffer_updated``, ...) are called by the event loop.
    """

    def __init__(self, endpoint: Endpoint, protocol: Protocol) -> None:
        self._endpoint = endpoint
        self._loop = asyncio.get_running_loop()
        self.protocol = protocol
        self.transport: Optional[asyncio.Transport] = None
        self.address: Tuple[Any, ...] = ("", 0)
        self.values: Dict[str, Any] = {}
        self.connected_at = time.time()
        self.closed_at: Optional[float] = None
        self.error: Optional[BaseException] = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.messages_in = 0
        self.messages_out = 0
        self._ready = False  # handshake completed
        self._closing = False  # no more writes (we or the peer started closing)
        self._lost = False  # the transport is gone
        self._finished = False  # the endpoint was told the connection ended
        self._pending: Deque[Frame] = deque()  # decoded frames not handled yet
        self._blockers: Set[Gate] = set()
        self._resume_scheduled = False
        self._reading_paused = False
        self._write_paused = False
        self._drain_waiters: List[asyncio.Future[None]] = []
        self._requests: Dict[int, asyncio.Future[Any]] = {}
        self._next_id = 1
        self._ready_waiter: Optional[asyncio.Future[None]] = None
        self._lost_waiter: asyncio.Future[None] = self._loop.create_future()
        self._timer: Optional[asyncio.TimerHandle] = None
        self._chain = CallbackChain(self)

    # -- public ---------------------------------------------------------------------

    @property
    def name(self) -> Optional[str]:
        """The client's name from its handshake (on a host), else ``None``."""
        return self.protocol.peer_name

    @property
    def session(self) -> int:
        """The id the host gave this connection (unique per host, in accept order)."""
        return self.protocol.session

    @property
    def is_open(self) -> bool:
        """True between the end of the handshake and the start of closing."""
        return self._ready and not self._closing and not self._lost

    @property
    def closed(self) -> bool:
        """True once the transport is closed."""
        return self._lost

    @property
    def writing_paused(self) -> bool:
        """True while the peer does not take our data: writes wait for it."""
        return self._write_paused

    @property
    def reading_paused(self) -> bool:
        """True while reading is paused because a subscription or the callback
        backlog of this connection is full."""
        return self._reading_paused

    def get(self, channel: str, default: Any = None) -> Any:
        """The latest value this peer sent on ``channel``, or ``default``."""
        return self.values.get(channel, default)

    async def write(self, channel: str, data: Any) -> None:
        """Send ``data`` on ``channel`` to this peer.

        Raises ``TypeError`` if ``data`` cannot be sent (nothing is sent),
        :class:`EndpointClosed` after the endpoint's ``close()``,
        :class:`ConnectionClosed` if the connection is gone.  Waits while the
        peer does not keep up (transport above its high-water mark).
        """
        parts = frames.encode_value_frame(frames.DATA, channel, data)
        await self._send_frame(parts)

    async def write_image(self, img: Any, channel: str = "image") -> None:
        """Send a numpy image (H, W) or (H, W, C) on ``channel`` to this peer."""
        self._endpoint._check_image(img)
        parts = frames.encode_value_frame(frames.DATA, channel, img, flags=frames.FLAG_IMAGE)
        await self._send_frame(parts)

    async def request(self, channel: str, data: Any, timeout: Optional[float] = 5.0) -> Any:
        """Send a request on ``channel`` and return the peer's reply.

        The peer's first ``on(channel)`` handler answers it.  Raises
        :class:`RemoteError` if the handler raised (or the peer has none),
        ``TimeoutError`` after ``timeout`` s (``None``: no bound),
        :class:`ConnectionClosed` if the connection is lost meanwhile.
        """
        meta, buffers, data_len = codec.encode(data)
        fid = self._new_id()
        parts = frames.encode_frame(frames.REQUEST, channel, meta, buffers, data_len, fid=fid)
        self._check_writable()
        future: asyncio.Future[Any] = self._loop.create_future()
        self._requests[fid] = future
        try:
            self._send(parts)
            self.messages_out += 1
            return await wait_bounded(
                self._await_reply(future),
                timeout,
                f"no reply from {self._peer()} to the request on channel {channel!r} "
                f"within {timeout} s",
            )
        finally:
            self._requests.pop(fid, None)

    async def close(self, timeout: Optional[float] = None) -> None:
        """Close gracefully: flush, say BYE, half-close, wait for the peer to close.

        Bounded by ``timeout`` s (default: the endpoint's ``timeout``); then the
        connection is aborted.  Idempotent.
        """
        linger = self._endpoint.timeout if timeout is None else timeout
        transport = self.transport
        if transport is None or self._lost:
            return
        if not self._closing:
            self._closing = True
            if self._ready:
                transport.write(_BYE)
            if transport.can_write_eof():
                transport.write_eof()  # after the buffered data: a graceful half-close
            else:  # pragma: no cover - TCP transports can
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
        if self._lost:
            state = "closed"
        elif self._closing:
            state = "closing"
        else:
            state = "open" if self._ready else "handshake"
        name = f" name={self.name!r}" if self.name else ""
        return f"<aio.Connection {self.address[0]}:{self.address[1]}{name} {state}>"

    # -- sending --------------------------------------------------------------------------

    async def _send_frame(self, parts: List[Buffer]) -> None:
        """Send one encoded frame (``frames.encode_*`` parts); wait while paused."""
        self._check_writable()
        self._send(parts)
        self.messages_out += 1
        if self._write_paused:
            await self.drain()

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

    def _check_writable(self) -> None:
        if self._endpoint.stopped:
            raise EndpointClosed(f"cannot write: {self._endpoint!r} is closed")
        if not self.is_open:
            if not self._ready and not self._lost and not self._closing:
                raise ConnectionClosed(f"the handshake with {self._peer()} has not completed")
            raise ConnectionClosed(
                f"the connection to {self._peer()} is closed ({self.error or 'closed'})"
            )

    def _send(self, parts: Sequence[Buffer]) -> None:
        transport = cast(asyncio.Transport, self.transport)
        if len(parts) == 1:
            part = parts[0]
            transport.write(part)
            self.bytes_out += len(part) if not isinstance(part, memoryview) else part.nbytes
        else:
            transport.writelines(parts)
            self.bytes_out += frames.frame_size(parts)

    def _send_reply(
        self, channel: str, fid: int, result: Any, exc: Optional[BaseException]
    ) -> None:
        """Answer request ``fid``: REPLY with ``result``, or REPLY_ERROR naming ``exc``."""
        if not self.is_open:
            logger.debug("%r: dropping the reply to request %d: closed", self, fid)
            return
        if exc is None:
            try:
                parts = frames.encode_value_frame(frames.REPLY, channel, result, fid=fid)
            except (TypeError, ValueError) as error:
                exc = error
            else:
                self._send(parts)
                self.messages_out += 1
                return
        self._send_error(channel, fid, f"{type(exc).__name__}: {exc}")

    def _send_error(self, channel: str, fid: int, message: str) -> None:
        """Answer request ``fid`` with REPLY_ERROR ``message``."""
        if not self.is_open:
            logger.debug("%r: dropping the reply to request %d: closed", self, fid)
            return
        self._send(frames.encode_value_frame(frames.REPLY_ERROR, channel, message, fid=fid))
        self.messages_out += 1

    def _new_id(self) -> int:
        fid = self._next_id
        while fid in self._requests:
            fid = fid % _MAX_ID + 1
        self._next_id = fid % _MAX_ID + 1
        return fid

    async def _await_reply(self, future: asyncio.Future[Any]) -> Any:
        if self._write_paused:
            await self.drain()
        return await future

    # -- asyncio.BufferedProtocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Called by the event loop when the TCP connection is established."""
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if peer:
            self.address = tuple(peer)
        refusal = self._endpoint._connection_made(self)
        if refusal is not None:
            reason, code = refusal
            self.protocol.refuse(reason, code)
            self.error = HandshakeError(f"refused {self._peer()}: {reason}")
            self._closing = True
            self.transport.write(self.protocol.data_to_send())
            self.transport.close()
            return
        out = self.protocol.data_to_send()
        if out:
            self.transport.write(out)

    def get_buffer(self, sizehint: int) -> memoryview:
        """Where the event loop should receive the next bytes (the decoder's buffer)."""
        return self.protocol.decoder.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` arrived in the buffer: decode, finish the handshake, handle frames."""
        self.bytes_in += nbytes
        decoder = self.protocol.decoder
        try:
            decoder.buffer_updated(nbytes)
            if decoder.frames:
                self._process()
        except (ProtocolError, HandshakeError) as exc:
            self._fail(exc)

    def eof_received(self) -> Optional[bool]:
        """The peer half-closed: let the transport close (after flushing)."""
        return None

    def connection_lost(self, exc: Optional[Exception]) -> None:
        """The transport is closed: fail what waits on this connection."""
        if self._lost:
            return
        self._lost = True
        self._closing = True
        self.closed_at = time.time()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if exc is not None:
            self.error = self.error or exc
            logger.info("%r: connection to %s lost: %s", self._endpoint, self._peer(), exc)
        if not self._ready and self.error is None:
            self.error = HandshakeError(
                f"{self._peer()} closed the connection during the handshake (does it expect "
                "a token, or is it at its max_clients?)"
            )
        waiter = self._ready_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(self._handshake_error())
        for drain in self._drain_waiters:
            if not drain.done():
                drain.set_result(None)
        self._drain_waiters.clear()
        if self._requests:
            lost = ConnectionClosed(
                f"the connection to {self._peer()} was lost before the reply "
                f"({self.error or 'closed'})"
            )
            for future in self._requests.values():
                if not future.done():
                    future.set_exception(lost)
        if not self._lost_waiter.done():
            self._lost_waiter.set_result(None)
        if not self._pending:
            self._finish()

    def pause_writing(self) -> None:
        """The transport's buffer is above its high-water mark."""
        self._write_paused = True

    def resume_writing(self) -> None:
        """The transport's buffer drained below its low-water mark."""
        self._write_paused = False
        waiters = self._drain_waiters
        self._drain_waiters = []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # -- receiving ---------------------------------------------------------------------------

    def _process(self) -> None:
        was_ready = self._ready
        try:
            events = self.protocol.events()
        finally:
            out = self.protocol.data_to_send()
            if out and self.transport is not None and not self._lost:
                self.transport.write(out)
        if not was_ready and self.protocol.is_open:
            self._ready = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            waiter = self._ready_waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
            self._endpoint._connection_ready(self)
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
            value = frame.value()
            self.messages_in += 1
            self._endpoint._deliver(self, frame.channel, value)
        elif t == frames.REQUEST:
            value = frame.value()
            self.messages_in += 1
            self._endpoint._answer(self, frame.channel, frame.id, value)
        elif t == frames.REPLY or t == frames.REPLY_ERROR:
            future = self._requests.get(frame.id)
            value = frame.value()
            if future is None or future.done():
                logger.debug("%r: reply to unknown or expired request %d", self, frame.id)
            elif t == frames.REPLY:
                future.set_result(value)
            else:
                future.set_exception(RemoteError(str(value)))
        elif t == frames.BYE:
            self._on_bye()
        else:
            logger.debug("%r: ignoring frame type 0x%02x", self, t)

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

    def _unpause_for_close(self) -> None:
        if self._reading_paused and not self._blockers and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    # -- closing ----------------------------------------------------------------------------

    def _peer(self) -> str:
        return f"{self.name or 'peer'} at {self.address[0]}:{self.address[1]}"

    def _handshake_error(self) -> BaseException:
        error = self.error
        if isinstance(error, HandshakeError):
            return error
        return HandshakeError(
            f"{self._peer()} did not complete the socketengine handshake ({error or 'no answer'})"
        )

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
            self.error = HandshakeError(
                f"{self._peer()} did not complete the handshake within {timeout} s"
            )
            self._abort()
            raise self.error from None

    def start_handshake_timer(self, seconds: float) -> None:
        """Close the connection if the handshake has not completed in ``seconds``."""

        def expired() -> None:
            self._timer = None
            if not self._ready and not self._lost:
                self._fail(
                    HandshakeError(
                        f"{self._peer()} did not complete the handshake within {seconds} s"
                    )
                )

        self._timer = self._loop.call_later(seconds, expired)

    def _on_bye(self) -> None:
        """The peer said BYE: it sends nothing more.  Flush what is queued and close."""
        self._pending.clear()
        self._closing = True
        transport = self.transport
        if transport is not None and not self._lost:
            transport.close()  # flushes the buffer first
            self._linger()

    def _fail(self, exc: BaseException) -> None:
        """The peer broke the protocol (or the handshake failed): log, tell it, close."""
        logger.warning("%r: closing connection to %s: %s", self._endpoint, self._peer(), exc)
        self.error = exc
        self._pending.clear()
        self._closing = True
        transport = self.transport
        if transport is None or self._lost:
            return
        out = self.protocol.data_to_send()  # e.g. a REFUSE frame
        if out:
            transport.write(out)
        transport.close()
        self._linger()

    def _linger(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(self._endpoint.timeout, self._abort)

    def _abort(self) -> None:
        if self.transport is not None and not self._lost:
            self.transport.abort()

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        self._endpoint._connection_closed(self)
