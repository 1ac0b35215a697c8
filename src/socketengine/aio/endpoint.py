"""What the asyncio Host and Client share: limits, callbacks, waiters, subscriptions,
images and heartbeats."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import (
    Any,
    Callable,
    Coroutine,
    Dict,
    List,
    Optional,
    Sequence,
    Set,
    Tuple,
    TypeVar,
    Union,
    overload,
)

from .. import frames, images
from ..codec import Buffer
from ..endpoint import EndpointBase
from ..errors import ConnectionClosed, EndpointClosed
from ..fanout import FanOut
from ..limits import DEFAULT_SUBSCRIPTION_SIZE
from ..patterns import Pattern
from ..requests import no_handler
from ..state import BudgetExceeded, StoredValues, value_size
from ..watch import PatternWatch, check_key, pattern_item
from .connection import Connection, Job, wait_future
from .decoding import LazyImage, resolve
from .subscription import Subscription

__all__ = ["Endpoint", "DEFAULT_SUBSCRIPTION_SIZE"]

logger = logging.getLogger("socketengine")
_now = time.time

_E = TypeVar("_E", bound="Endpoint")
_F = TypeVar("_F", bound=Callable[..., Any])


class Endpoint(EndpointBase):
    """Base of :class:`~socketengine.aio.Host` and :class:`~socketengine.aio.Client`."""

    #: The host's run of deferred broadcasts (:class:`~socketengine.fanout.FanOut`);
    #: a client has none.
    _fan: Optional[FanOut[Connection]] = None

    def _fan_flush(self) -> bool:
        """Hand the run of deferred broadcasts over (the host does; see fanout.py)."""
        return False

    def __init__(
        self,
        addr: str,
        port: int,
        *,
        timeout: float,
        token: Union[str, bytes, None],
        max_message: int,
        handshake_timeout: float,
        max_buffer: int,
        heartbeat: Optional[float],
        tls: Optional[ssl.SSLContext],
        image_codec: str,
        image_quality: int,
    ) -> None:
        self._init_endpoint(
            addr,
            port=port,
            timeout=timeout,
            token=token,
            max_message=max_message,
            max_buffer=max_buffer,
            handshake_timeout=handshake_timeout,
            heartbeat=heartbeat,
            tls=tls,
            image_codec=image_codec,
            image_quality=image_quality,
        )
        self._start_lock: Optional[asyncio.Lock] = None
        # Tuples, replaced on change: a queued callback job keeps the handlers it saw.
        self._handlers: Dict[str, Tuple[Callable[..., Any], ...]] = {}
        # Those registered with inline=True: first in _handlers, as on the threaded layer.
        self._inline_handlers: Dict[str, Tuple[Callable[..., Any], ...]] = {}
        self._any: Tuple[Callable[..., Any], ...] = ()  # on_message() hooks
        self._patterns: PatternWatch[asyncio.Future[Any], Subscription[Any]] = PatternWatch()
        self._subs: Dict[str, Tuple[Subscription[Any], ...]] = {}
        self._waiters: Dict[str, List[asyncio.Future[Any]]] = {}
        self._tasks: Set[asyncio.Task[Any]] = set()
        self._heartbeat_timer: Optional[asyncio.TimerHandle] = None
        # Per connection whose values are budgeted (a host's clients): what they cost.
        self._stored: Dict[Connection, StoredValues] = {}

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self: _E) -> _E:
        """Open the endpoint (once; concurrent and repeated calls are harmless);
        return it."""
        self._check_not_closed()
        if self.opened:
            return self
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            self._check_not_closed()
            if not self.opened:
                await self._open()
                self.opened = True
                logger.info("%r: started", self)
        return self

    async def _open(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    async def close(self) -> None:  # pragma: no cover - overridden
        """Close the endpoint."""
        raise NotImplementedError

    async def __aenter__(self: _E) -> _E:
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    def _check_open(self) -> None:
        if self.stopped:
            raise EndpointClosed(f"cannot write: {self!r} is closed; create a new {self._kind}")
        if not self.opened:
            raise EndpointClosed(f"cannot write: {self!r} is not started; await start() first")

    # -- callbacks ------------------------------------------------------------------------

    @overload
    def on(self, channel: Union[str, Pattern], *, inline: bool = False) -> Callable[[_F], _F]: ...

    @overload
    def on(self, channel: Union[str, Pattern], fn: _F, *, inline: bool = False) -> _F: ...

    def on(
        self, channel: Union[str, Pattern], fn: Optional[_F] = None, *, inline: bool = False
    ) -> Any:
        """Call ``fn`` for every message on ``channel``; use as ``@ep.on("name")``.

        ``fn`` may be a plain or an ``async`` function.  A client calls ``fn(data)``,
        a host ``fn(data, conn)``; with a :class:`~socketengine.Pattern`,
        ``fn(channel, data)`` / ``fn(channel, data, conn)`` for every matching
        channel.  Requests on ``channel`` are answered with the return value (awaited
        if it is awaitable) of the first handler registered (pattern handlers answer
        none); every handler of the channel runs.  Exceptions are logged on the
        ``socketengine`` logger and change nothing else.  Images sent as JPEG/PNG
        arrive decoded (decoded in a worker thread first).  Returns ``fn``.

        ``inline=True`` orders as on the threaded layer: a channel's inline handlers
        run before its other handlers, and the first inline one answers requests.
        Here every plain callback runs on the event loop anyway (none may block it).
        """
        check_key(channel)  # TypeError/ValueError for a bad name, now

        def register(fn: _F) -> _F:
            if not callable(fn):
                raise TypeError(f"on({channel!r}) needs a callable, not {fn!r}")
            if isinstance(channel, Pattern):
                if inline:
                    raise ValueError("inline=True takes an exact channel name, not a Pattern")
                self._patterns.on(channel, fn)
                return fn
            handlers = self._handlers.get(channel, ())
            if inline:
                first = self._inline_handlers.get(channel, ())
                self._inline_handlers[channel] = first + (fn,)
                at = len(first)
                self._handlers[channel] = handlers[:at] + (fn,) + handlers[at:]
            else:
                self._handlers[channel] = handlers + (fn,)
            return fn

        if fn is None:
            return register
        return register(fn)

    def off(self, channel: Union[str, Pattern], fn: Optional[Callable[..., Any]] = None) -> None:
        """Remove ``fn`` (or, without ``fn``, every callback) registered with
        :meth:`on` for ``channel`` (an exact name or the same pattern); no error if it
        was not registered."""
        if isinstance(channel, Pattern):
            self._patterns.off(channel, fn)
            return
        for table in (self._handlers, self._inline_handlers):
            # ``!=``, not ``is not``: ``obj.method`` is a new bound method at every access
            kept = tuple(h for h in table.get(channel, ()) if fn is not None and h != fn)
            if kept:
                table[channel] = kept
            else:
                table.pop(channel, None)

    def on_message(self, fn: _F) -> _F:
        """Call ``fn`` for every message on **every** channel (usable as a decorator).

        Host: ``fn(channel, data, conn)``; client: ``fn(channel, data)``.  Plain or
        ``async``; scheduled like :meth:`on` callbacks, after them, in arrival order
        per connection.  Meant for loggers, recorders and monitors.  Returns ``fn``.
        """
        if not callable(fn):
            raise TypeError(f"on_message() needs a callable, not {fn!r}")
        self._any += (fn,)
        return fn

    # -- waiting and subscribing ----------------------------------------------------------

    def _check_receiving(self) -> None:
        """Raise if nothing more can arrive (closed endpoint, lost connection)."""
        self._check_not_closed()

    async def _wait(self, channel: Union[str, Pattern], timeout: Optional[float]) -> Any:
        check_key(channel)
        self._check_receiving()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if isinstance(channel, Pattern):
            self._patterns.wait(channel, future)
            try:
                item = await wait_future(
                    future, timeout, lambda: f"no message matching {channel} within {timeout} s"
                )
            finally:
                self._patterns.unwait(channel, future)
            return await resolve(item)
        self._waiters.setdefault(channel, []).append(future)
        try:
            item = await wait_future(
                future, timeout, lambda: f"no message on channel {channel!r} within {timeout} s"
            )
        finally:
            waiters = self._waiters.get(channel)
            if waiters is not None and future in waiters:
                waiters.remove(future)
                if not waiters:
                    del self._waiters[channel]
        return await resolve(item)

    def _subscribe(
        self, channel: Union[str, Pattern], maxsize: int, maxbytes: Optional[int] = None
    ) -> Subscription[Any]:
        check_key(channel)
        self._check_receiving()
        if isinstance(channel, Pattern):
            pattern = channel
            psub: Subscription[Any] = Subscription(
                str(pattern), maxsize, lambda s: self._patterns.unsubscribe(pattern, s), maxbytes
            )
            self._patterns.subscribe(pattern, psub)
            return psub
        sub: Subscription[Any] = Subscription(channel, maxsize, self._unsubscribe, maxbytes)
        self._subs[channel] = self._subs.get(channel, ()) + (sub,)
        return sub

    def _unsubscribe(self, sub: Subscription[Any]) -> None:
        subs = tuple(s for s in self._subs.get(sub.channel, ()) if s is not sub)
        if subs:
            self._subs[sub.channel] = subs
        else:
            self._subs.pop(sub.channel, None)

    def _mark_gaps(self) -> None:
        """A link was lost: every open subscription records a gap."""
        for sub in [s for ss in self._subs.values() for s in ss] + self._patterns.all_subs():
            sub._buffer.gap()

    def _end_delivery(self, error: BaseException, sub_error: Optional[BaseException]) -> None:
        """Nothing more will arrive: fail waiters with ``error``; end subscriptions
        (raising ``sub_error`` after their items, if given)."""
        waiters, self._waiters = self._waiters, {}
        for future in [f for fs in waiters.values() for f in fs] + self._patterns.all_waiters():
            if not future.done():
                future.set_exception(error)
        for sub in [s for ss in self._subs.values() for s in ss] + self._patterns.all_subs():
            sub._end(sub_error)

    # -- images ---------------------------------------------------------------------------

    async def _image_frame(
        self,
        img: Any,
        channel: str,
        codec: Optional[str],
        quality: Optional[int],
        conflate: bool = True,
    ) -> Tuple[Sequence[Buffer], int]:
        """Validate, encode (JPEG/PNG in a worker thread) and frame an image, once.

        ``TypeError`` / ``ValueError`` name the problem before anything is encoded.
        """
        name, level = self._image_settings(img, codec, quality)
        frames.channel_bytes(channel)
        if name == "raw":
            value: Any = img
        else:
            loop = asyncio.get_running_loop()
            value = await loop.run_in_executor(None, images.prepare, img, name, level)
        parts, nbytes = frames.value_frame(frames.DATA, channel, value, frames.FLAG_IMAGE)
        self._images.written(channel, name)
        if not conflate:
            # Never replaced: handed over in order like a plain value (stats count it now).
            self._images.transmitted(channel, nbytes)
        return parts, nbytes

    # -- heartbeats -----------------------------------------------------------------------

    def _connections(self) -> List[Connection]:
        """Every connection the heartbeat should look after."""
        return []

    def _start_heartbeat(self) -> None:
        """Check every connection each ``heartbeat / 2`` s (no-op if disabled)."""
        interval = self.heartbeat
        if interval is None or self._heartbeat_timer is not None:
            return
        loop = asyncio.get_running_loop()

        def tick() -> None:
            now = loop.time()
            for conn in self._connections():
                conn._heartbeat(now)
            self._heartbeat_timer = loop.call_later(interval / 2, tick)

        self._heartbeat_timer = loop.call_later(interval / 2, tick)

    def _stop_heartbeat(self) -> None:
        timer, self._heartbeat_timer = self._heartbeat_timer, None
        if timer is not None:
            timer.cancel()

    # -- tasks ----------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``coro`` as a task that :meth:`close` waits for (bounded) or cancels."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _stop_tasks(self, timeout: float) -> None:
        """Let running callbacks finish for up to ``timeout`` s, then cancel them."""
        tasks = set(self._tasks)
        tasks.discard(asyncio.current_task())  # type: ignore[arg-type,unused-ignore]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            logger.info("%r: cancelled %d callback(s) still running at close", self, len(pending))
            await asyncio.gather(*pending, return_exceptions=True)

    # -- connection events (event loop) ---------------------------------------------------

    def _connection_made(self, conn: Connection) -> Optional[Tuple[str, str]]:
        """A transport connected; return ``(reason, code)`` to refuse it."""
        return None

    def _connection_ready(self, conn: Connection) -> None:
        """The handshake of ``conn`` completed."""

    def _connection_lost(self, conn: Connection) -> None:
        """The transport of ``conn`` is gone (frames it received may still wait)."""

    def _connection_closed(self, conn: Connection) -> None:
        """``conn`` is closed and every frame it received has been handled."""

    def _budget(self, conn: Connection, channel: str, meta: Any, data: Any) -> None:
        """Account a DATA value (msgpack ``meta``, data section ``data``) before it is
        decoded (hosts; :meth:`StoredValues.store_frame`); raises ``ProtocolError`` (the
        connection is closed) beyond a storage budget."""
        stored = self._stored.get(conn)
        if stored is not None:
            stored.store_frame(channel, meta, data)

    def _deliver_batch(self, conn: Connection, frame: frames.Frame) -> None:
        """A BATCH frame arrived: each of its items as a DATA frame would be, accounted
        as the threaded host does (:meth:`StoredValues.store_items`).  Beyond a storage
        budget, the items before the offending one are delivered, then
        ``BudgetExceeded`` is raised (the connection is closed)."""
        per_channel = self._waiters or self._subs or self._handlers
        watched = per_channel or self._any or self._patterns
        stored = self._stored.get(conn)
        got = self._batch_last(
            frame, stored, (self._waiters, self._subs, self._handlers) if per_channel else ()
        )
        if got is not None:  # only the last values mattered
            self._store_unwatched(conn, [], got[1], _now())
            conn.messages_in += got[0]
            if stored is not None:
                stored.settle()
            return
        items = self._batch_items(conn, frame)
        overflow: Optional[BudgetExceeded] = None
        last = None
        if stored is not None:
            try:
                last = stored.store_items(items)  # the last values, or None
            except BudgetExceeded as exc:
                overflow = exc
                items = items[: exc.accepted]
        if watched:
            deliver = self._deliver
            for i in range(0, len(items), 2):
                deliver(conn, items[i], items[i + 1], counted=True, settle=False)
        else:  # nobody waits on anything: stored in bulk
            self._store_unwatched(conn, items, last, _now())
        relay = self._relay
        if relay is not None:
            for i in range(0, len(items), 2):
                if relay.allows(items[i], conn.name):
                    self._relay_value(conn, items[i], items[i + 1])
        conn.messages_in += len(items) // 2
        if stored is not None:
            stored.settle()  # a client forgets its oldest channels beyond its budget
        if overflow is not None:
            raise overflow

    def _deliver(
        self,
        conn: Connection,
        channel: str,
        value: Any,
        image: int = 0,
        counted: bool = False,
        settle: bool = True,
    ) -> None:
        """A DATA value arrived: store it, then waiters, subscriptions, callbacks,
        ``on_message`` hooks.  ``image``: the frame has the IMAGE flag; ``counted``:
        already accounted against the storage budgets (:meth:`_budget`: the wire size,
        or for large metadata the decoded size; or a BATCH item); otherwise it is, at
        :func:`value_size`'s estimate.
        ``settle``: a client's budget forgets its oldest channels once this value is
        stored (a BATCH settles once, after its last item).

        Raises ``ProtocolError`` (the connection is closed) beyond a storage budget."""
        stored = self._stored.get(conn)
        if not counted and stored is not None:
            stored.store(channel, value_size(value))
        conn.values[channel] = value
        self._latest[channel] = value
        conn.received_at[channel] = _now()
        if image:
            self._image_arrived(conn, channel, value)
        elif self._images_kept(conn):
            self._not_an_image(conn, channel)
        if settle and stored is not None:
            stored.settle()
        waiters = self._waiters.pop(channel, None)
        subs = self._subs.get(channel)
        handlers = self._handlers.get(channel)
        hooks = self._any
        fired = self._patterns.take(channel) if self._patterns else None
        if waiters is None and subs is None and handlers is None and not hooks and not fired:
            return
        if channel in self._images.unread:
            self._images.read(channel)  # an image handed to the application is delivered
        user = value
        lazy_at = -1
        if type(value) is images.EncodedImage:
            # Decoded later, off the event loop, once for every consumer.
            user = LazyImage(value, ((conn.values, channel), (self._latest, channel)))
            lazy_at = 0
        item = (user, conn) if self._with_conn else user
        if waiters is not None:
            for future in waiters:
                if not future.done():
                    future.set_result(item)
        if subs is not None:
            size = value_size(value)
            for sub in subs:
                sub._put(item, conn, size)
        if handlers is not None:
            args: Tuple[Any, ...] = (user, conn) if self._with_conn else (user,)
            conn._chain.call(Job(handlers, args, None, f"channel {channel!r}", lazy_at))
        if fired is not None:
            pitem = pattern_item(channel, user, conn, self._with_conn)
            for future in fired.waiters:
                if not future.done():
                    future.set_result(pitem)
            psize = value_size(value) if fired.subs else 0
            for psub in fired.subs:
                psub._put(pitem, conn, psize)
            if fired.callbacks:
                lazy = 1 if lazy_at == 0 else -1
                conn._chain.call(Job(fired.callbacks, pitem, None, "a channel pattern", lazy))
        if hooks:
            args = (channel, user, conn) if self._with_conn else (channel, user)
            conn._chain.call(Job(hooks, args, None, "on_message", 1 if lazy_at == 0 else -1))

    def _relay_out(self, conn: Connection, channel: str, meta: Any, data: Any) -> None:
        """A relaying host forwards a client's write (hosts only)."""

    def _relay_value(self, conn: Connection, channel: str, value: Any) -> None:
        """A relaying host forwards a client's BATCH item (hosts only)."""

    def _answer(self, conn: Connection, channel: str, fid: int, value: Any) -> None:
        """A REQUEST arrived: run the channel's handlers; the first one's result replies."""
        handlers = self._handlers.get(channel)
        if handlers is None:
            text = conn._send_reply(channel, fid, None, no_handler(channel))
            self._requested(conn, channel, value, None, text)
            return

        def reply(result: Any, exc: Optional[BaseException]) -> None:
            text = conn._send_reply(channel, fid, result, exc)
            self._requested(conn, channel, value, None if text is not None else result, text)

        args = (value, conn) if self._with_conn else (value,)
        conn._chain.call(Job(handlers, args, reply, f"requests on channel {channel!r}"))

    def _lost_error(self, conn: Connection) -> ConnectionClosed:
        return ConnectionClosed(
            f"the connection to {conn._peer()} is closed ({conn.error or 'closed by the peer'})"
        )
