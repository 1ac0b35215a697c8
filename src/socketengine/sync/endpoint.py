"""What Host and Client share: the loop, limits, timeouts, and frame dispatch."""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    Generic,
    List,
    Optional,
    Tuple,
    TypeVar,
    Union,
    overload,
)

from msgpack import unpackb

from .. import frames, images
from ..codec import plain_ext_hook
from ..endpoint import EndpointBase
from ..errors import ConnectionClosed, EndpointClosed, SocketEngineError
from ..fanout import FanOut
from ..frames import BATCH, DATA, FLAG_COMPRESSED, FLAG_IMAGE, FLAG_RELAYED, Frame
from ..limits import (
    DEFAULT_SUBSCRIPTION_BYTES,
    DEFAULT_SUBSCRIPTION_SIZE,
    MIN_READ_SIZE,
    check_spin,
    check_timeout,
)
from ..patterns import Pattern
from ..relay import unwrap_relayed
from ..requests import no_handler, reply_frame
from ..state import BudgetExceeded, StoredValues, value_size
from ..watch import PatternWatch, check_key, pattern_item
from .connection import Connection
from .delivery import Dispatcher, Flag, Subscription, Waiter
from .loop import Loop

logger = logging.getLogger("socketengine")


def _release_gil() -> None:
    time.sleep(0)


#: How a polling reader gives the GIL, and its CPU, to a thread ready to run (the I/O
#: thread it keeps waiting).  ``os.sched_yield`` releases the GIL and puts the caller
#: behind the runnable threads; ``time.sleep(0)`` (where there is no ``sched_yield``)
#: only releases the GIL, which the caller usually takes back before the woken thread
#: gets a CPU.  Measured (2 cores, ``python -m bench --only roundtrip,roundtrip_xproc``):
#: a polling ``get`` round trip 158 → 113 µs in one process, 167 → 123 µs in two.
_yield_gil: Callable[[], None] = getattr(os, "sched_yield", _release_gil)

_E = TypeVar("_E", bound="Endpoint[Any]")
_F = TypeVar("_F", bound=Callable[..., Any])
#: What ``wait()`` returns and a subscription yields: ``(data, conn)`` on a host, the
#: data on a client.
_I = TypeVar("_I")


class Endpoint(EndpointBase, Generic[_I]):
    """Base of :class:`Host` and :class:`Client` (not used directly).

    Generic over the item type of :meth:`wait` and :meth:`subscribe`: ``Host`` is an
    ``Endpoint[Tuple[Any, Connection]]``, ``Client`` an ``Endpoint[Any]``.
    """

    #: A thread waiting for one reply, ACK or value reads its connection itself
    #: (:meth:`Connection.read_until`): set by Client and Host.
    _self_read = False
    #: A host's run of deferred broadcasts (see :mod:`socketengine.fanout`).
    _fan: Optional[FanOut[Connection]] = None

    def __init__(
        self,
        addr: str,
        port: int,
        timeout: float,
        size: int,
        *,
        token: Union[str, bytes, None],
        max_message: int,
        max_buffer: int,
        handshake_timeout: float,
        heartbeat: Optional[float],
        tls: Optional[ssl.SSLContext],
        image_codec: str,
        image_quality: int,
        spin: Optional[float] = None,
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
        self.size = int(size)
        #: Seconds a thread reading its own reply polls without sleeping first (the
        #: ``spin`` parameter; settable).
        self.spin = check_spin(spin)
        self._loop = Loop(f"socketengine-{self._kind}")
        self._dispatcher = Dispatcher(f"socketengine-{self._kind}")
        # Registrations are replaced, never mutated, so the loop thread reads them
        # without a lock; _watch_lock serialises writers (and the waiter lists).
        self._watch_lock = threading.Lock()
        self._callbacks: Dict[str, List[Callable[..., Any]]] = {}
        # on(..., inline=True): run on the I/O thread itself (no callback-thread hop).
        self._inline: Dict[str, List[Callable[..., Any]]] = {}
        self._subs: Dict[str, List[Subscription[_I]]] = {}
        self._waiters: Dict[str, List[Waiter]] = {}
        self._any: List[Callable[..., Any]] = []  # on_message() hooks
        # Busy readers: how many batches the I/O thread has stored, and what each
        # polling thread saw last (see _polled).
        self._version = 0
        self._pollers = threading.local()
        self._patterns: PatternWatch[Waiter, Subscription[Any]] = PatternWatch()
        self._state_lock = threading.Lock()
        # Per connection whose values are budgeted (a host's clients): what they cost.
        self._stored: Dict[Connection, StoredValues] = {}

    # -- seed-compatible lifecycle --------------------------------------------------------

    @property
    def read_size(self) -> int:
        """Bytes offered to each receive call on a busy connection: ``max(size, 256 KiB)``
        (an idle one starts at 4 KiB)."""
        return max(self.size, MIN_READ_SIZE)

    def set_timeout(self, time: float) -> None:
        """Set the timeout in seconds for blocking calls (connect attempts, full send
        buffers, the linger of ``close()``)."""
        self.timeout = check_timeout(time)

    if TYPE_CHECKING:  # defined by Host and Client

        def open(self: _E) -> _E: ...

        def close(self) -> None: ...

    def start(self: _E) -> _E:
        """Open the endpoint if it is not open yet; return it (so calls can chain).

        The I/O thread already runs from ``open()``: data is received and stored
        from then on.  Calling ``start()`` again is harmless.
        """
        self._check_not_closed()
        if not self.opened:
            self.open()
        return self

    def __enter__(self: _E) -> _E:
        if not self.opened:
            self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _fan_flush(self) -> None:
        """Hand the run of deferred broadcasts to its recipients (a host's)."""

    def _check_open(self) -> None:
        if self.stopped:
            raise EndpointClosed(f"cannot write: {self!r} is closed; create a new {self._kind}")
        if not self.opened:
            raise EndpointClosed(f"cannot write: {self!r} is not open yet; call open() or start()")

    # -- images ---------------------------------------------------------------------------

    def _image_frame(
        self,
        img: Any,
        channel: str,
        codec: Optional[str],
        quality: Optional[int],
        conflate: bool = True,
    ) -> Tuple[List[Any], int]:
        """Validate, encode (in the caller's thread) and frame an image, once."""
        name, level = self._image_settings(img, codec, quality)
        value = images.prepare(img, name, level)
        parts, nbytes = frames.value_frame(frames.DATA, channel, value, frames.FLAG_IMAGE)
        self._images.written(channel, name)
        if not conflate:
            # Never replaced: handed over in order like a plain value (stats count it now).
            self._images.transmitted(channel, nbytes)
        return parts, nbytes

    # -- delivery: callbacks, wait, subscribe -------------------------------------------

    def _item(self, value: Any, conn: Connection) -> Any:
        """What waiters and subscriptions get: the value (client) or (value, conn) (host)."""
        return value

    def _call_handler(self, fn: Callable[..., Any], value: Any, conn: Connection) -> Any:
        """Call a user callback with the role's signature: fn(data) or fn(data, conn)."""
        return fn(value)

    @overload
    def on(self, channel: Union[str, Pattern], *, inline: bool = False) -> Callable[[_F], _F]: ...

    @overload
    def on(self, channel: Union[str, Pattern], fn: _F, *, inline: bool = False) -> _F: ...

    def on(
        self, channel: Union[str, Pattern], fn: Optional[_F] = None, *, inline: bool = False
    ) -> Any:
        """Call ``fn`` for every message on ``channel``; usable as ``@endpoint.on(ch)``.

        A client calls ``fn(data)``, a host ``fn(data, conn)``.  With a
        :class:`~socketengine.Pattern` (``on(Pattern("sensors/+"), fn)``) it is called
        for every matching channel with the concrete name first: ``fn(channel, data)``,
        on a host ``fn(channel, data, conn)``.  Returns ``fn`` (as a decorator: the
        function itself, with its signature).

        Callbacks run on a callback thread (never the I/O thread), in arrival order for
        each connection.  An exception in a callback is logged and changes nothing
        else.  For a request on ``channel``, the first callback's return value is the
        reply (see :meth:`request`; pattern callbacks answer no requests).

        ``inline=True`` runs ``fn`` on the thread that reads the message, as soon as it
        is decoded: the I/O thread, or a thread blocked in ``request()``, an
        acknowledged write or (on a client) ``wait()`` or a subscription's ``get()``
        that reads its own reply (docs/reacting.md).  No hand-over to a
        callback thread, so a request answered inline, or a reply written from an inline
        callback, saves one thread hop (about 10-30 µs) per round trip.  Such a callback
        **must not block** (no ``wait()``, no ``request()``, no sleeping, no blocking
        write): while it runs, no connection of this endpoint is read or written.
        Inline callbacks of a channel run before its other callbacks, and the first
        inline one answers requests on it.
        """
        check_key(channel)

        def register(func: _F) -> _F:
            if not callable(func):
                raise TypeError(f"on() needs a callable, not {type(func).__qualname__}")
            if isinstance(channel, Pattern):
                if inline:
                    raise ValueError("inline=True takes an exact channel name, not a Pattern")
                self._patterns.on(channel, func)
                return func
            table = self._inline if inline else self._callbacks
            with self._watch_lock:
                table[channel] = [*table.get(channel, ()), func]
            return func

        return register if fn is None else register(fn)

    def on_message(self, fn: _F) -> _F:
        """Call ``fn`` for every message on **every** channel (usable as a decorator).

        Host: ``fn(channel, data, conn)``; client: ``fn(channel, data)``.  Runs on the
        callback threads like :meth:`on` callbacks, after them, in arrival order per
        connection.  Meant for loggers, recorders and monitors.  Returns ``fn``.
        """
        if not callable(fn):
            raise TypeError(f"on_message() needs a callable, not {type(fn).__qualname__}")
        with self._watch_lock:
            self._any = [*self._any, fn]
        return fn

    def _run_any(
        self, hooks: List[Callable[..., Any]], channel: str, value: Any, conn: Connection
    ) -> None:
        value = _user_value(value)
        for fn in hooks:
            try:
                self._call_any(fn, channel, value, conn)
            except Exception:
                logger.exception("%r: on_message callback %r raised (ignored)", self, fn)

    def _call_any(self, fn: Callable[..., Any], channel: str, value: Any, conn: Connection) -> Any:
        return fn(channel, value)

    def off(self, channel: Union[str, Pattern], fn: Optional[Callable[..., Any]] = None) -> None:
        """Remove ``fn`` (or every callback) registered with :meth:`on` for ``channel``
        (an exact name or the same :class:`~socketengine.Pattern`)."""
        if isinstance(channel, Pattern):
            self._patterns.off(channel, fn)
            return
        with self._watch_lock:
            for table in (self._callbacks, self._inline):
                kept = [f for f in table.get(channel, ()) if fn is not None and f != fn]
                if kept:
                    table[channel] = kept
                else:
                    table.pop(channel, None)

    @overload
    def wait(self, channel: str, timeout: Optional[float] = None) -> _I: ...

    @overload
    def wait(self, channel: Pattern, timeout: Optional[float] = None) -> Tuple[Any, ...]: ...

    def wait(self, channel: Union[str, Pattern], timeout: Optional[float] = None) -> Any:
        """Block until the next value arrives on ``channel`` after this call; return it.

        Only values that arrive **after** the call are seen (``get()`` has the latest
        one); to see every message, :meth:`subscribe`.  On a host the result is
        ``(data, conn)``.  With a :class:`~socketengine.Pattern` the result starts with
        the concrete channel: ``(channel, data)``, on a host ``(channel, data, conn)``.
        Raises ``TimeoutError`` after ``timeout`` seconds (``None``: wait forever),
        :class:`EndpointClosed` if the endpoint closes first, and on a client without
        ``reconnect`` :class:`ConnectionClosed` once its connection is lost.
        """
        check_key(channel)
        self._check_receiving()
        if isinstance(channel, Pattern):
            return self._wait_pattern(channel, timeout)
        waiter = Waiter()
        with self._watch_lock:
            self._waiters.setdefault(channel, []).append(waiter)
        ended = self._ended()  # delivery ended just before the registration was seen
        if ended is not None and not waiter.event.is_set():
            self._unwait(channel, waiter)
            raise ended
        if not self._await(waiter.event, timeout):
            self._unwait(channel, waiter)
            if not waiter.event.is_set():
                raise TimeoutError(f"no message on {channel!r} within {timeout} s")
        item = waiter.item
        if item is _CLOSED:
            raise EndpointClosed(f"{self!r} closed while waiting on {channel!r}")
        if type(item) is _Lost:
            raise item.error
        return _user_item(item)

    def _await(self, flag: Flag, timeout: Optional[float]) -> bool:
        """Wait for ``flag`` (a ``wait()``): True once set, False after ``timeout``."""
        return flag.wait(timeout)

    def _await_item(self, flag: Flag, timeout: Optional[float]) -> bool:
        """Wait for ``flag`` (a subscription's next item, or its end, which another
        thread may bring: :meth:`_wake_reader`)."""
        return flag.wait(timeout)

    def _wake_reader(self) -> None:
        """A subscription ended: wake a thread reading its connection for it (a client)."""

    def _unwait(self, channel: str, waiter: Waiter) -> None:
        """Take back a wait() that is ending without a value (timeout, delivery ended)."""
        with self._watch_lock:
            waiting = self._waiters.get(channel, [])
            if waiter in waiting:
                waiting.remove(waiter)
                if not waiting:
                    del self._waiters[channel]

    def _wait_pattern(self, pattern: Pattern, timeout: Optional[float]) -> Tuple[Any, ...]:
        waiter = Waiter()
        self._patterns.wait(pattern, waiter)
        ended = self._ended()
        if ended is not None and not waiter.event.is_set():
            self._patterns.unwait(pattern, waiter)
            raise ended
        if not self._await(waiter.event, timeout):
            self._patterns.unwait(pattern, waiter)
            if not waiter.event.is_set():
                raise TimeoutError(f"no message matching {pattern} within {timeout} s")
        item = waiter.item
        if item is _CLOSED:
            raise EndpointClosed(f"{self!r} closed while waiting on {pattern}")
        if type(item) is _Lost:
            raise item.error
        return _user_pattern_item(item)

    def _check_receiving(self) -> None:
        """Raise if nothing more can arrive: the endpoint is closed (a client without
        ``reconnect``: or its connection is lost)."""
        self._check_not_closed()

    def _ended(self) -> Optional[SocketEngineError]:
        """None while values may still arrive, else what :meth:`_check_receiving`
        raises.  Asked again once a wait or subscription is registered: delivery may
        have ended between the first check and the registration (it would then never
        be woken)."""
        try:
            self._check_receiving()
        except (EndpointClosed, ConnectionClosed) as exc:
            return exc
        return None

    @overload
    def subscribe(
        self,
        channel: str,
        maxsize: int = DEFAULT_SUBSCRIPTION_SIZE,
        maxbytes: Optional[int] = DEFAULT_SUBSCRIPTION_BYTES,
    ) -> Subscription[_I]: ...

    @overload
    def subscribe(
        self,
        channel: Pattern,
        maxsize: int = DEFAULT_SUBSCRIPTION_SIZE,
        maxbytes: Optional[int] = DEFAULT_SUBSCRIPTION_BYTES,
    ) -> Subscription[Tuple[Any, ...]]: ...

    def subscribe(
        self,
        channel: Union[str, Pattern],
        maxsize: int = DEFAULT_SUBSCRIPTION_SIZE,
        maxbytes: Optional[int] = DEFAULT_SUBSCRIPTION_BYTES,
    ) -> Any:
        """Receive **every** message on ``channel``, in order, from now on.

        Returns a :class:`Subscription`: iterate it or call ``get(timeout)``; on a host
        items are ``(data, conn)``.  With a :class:`~socketengine.Pattern` items start
        with the concrete channel: ``(channel, data)``, on a host ``(channel, data,
        conn)``.  When ``maxsize`` messages wait unread, reading the sending connection
        pauses (TCP backpressure slows the sender): nothing is dropped and memory stays
        bounded.  Iteration ends after ``close()`` or when the endpoint closes (after the
        items already received); on a client without ``reconnect`` whose connection is
        lost it raises :class:`ConnectionClosed` once the items received are read.
        """
        check_key(channel)
        self._check_receiving()
        if isinstance(channel, Pattern):
            pattern = channel
            psub: Subscription[Tuple[Any, ...]] = Subscription(
                str(pattern),
                maxsize,
                lambda s: self._patterns.unsubscribe(pattern, s),
                convert=_user_pattern_item,
                maxbytes=maxbytes,
                wait=self._await_item,
                wake=self._wake_reader,
            )
            self._patterns.subscribe(pattern, psub)
            self._end_if_ended(psub)
            return psub
        sub: Subscription[_I] = Subscription(
            channel,
            maxsize,
            self._unsubscribe,
            convert=_user_item,
            maxbytes=maxbytes,
            wait=self._await_item,
            wake=self._wake_reader,
        )
        with self._watch_lock:
            self._subs[channel] = [*self._subs.get(channel, ()), sub]
        self._end_if_ended(sub)
        return sub

    def _end_if_ended(self, sub: Subscription[Any]) -> None:
        """End a new subscription if delivery ended before it was registered."""
        ended = self._ended()
        if ended is not None:
            sub._end(ended if isinstance(ended, ConnectionClosed) else None)

    def _unsubscribe(self, sub: Subscription[_I]) -> None:
        with self._watch_lock:
            kept = [s for s in self._subs.get(sub.channel, ()) if s is not sub]
            if kept:
                self._subs[sub.channel] = kept
            else:
                self._subs.pop(sub.channel, None)

    def _deliver(self, conn: Connection, channel: str, value: Any) -> None:
        """Hand a received value to waiters, subscriptions and callbacks (loop thread)."""
        if channel in self._images.unread and (
            channel in self._waiters
            or channel in self._subs
            or channel in self._callbacks
            or channel in self._inline
            or self._any
        ):
            self._images.read(channel)  # an image handed to the application is delivered
        if channel in self._waiters:
            with self._watch_lock:
                waiting = self._waiters.pop(channel, ())
            item = self._item(value, conn)
            for waiter in waiting:
                waiter.set(item)
        subs = self._subs.get(channel)
        if subs:
            item = self._item(value, conn)
            size = value_size(value)
            for sub in subs:
                sub.put(item, conn, size)
        inline = self._inline.get(channel)
        if inline:
            self._run_callbacks(inline, value, conn)  # here, on the I/O thread
        callbacks = self._callbacks.get(channel)
        if callbacks:
            self._dispatcher.submit(conn, self._run_callbacks, callbacks, value, conn)
        if self._patterns:
            fired = self._patterns.take(channel)
            if fired is not None:
                self._images.read(channel)
                item = pattern_item(channel, value, conn, self._with_conn)
                for waiter in fired.waiters:
                    waiter.set(item)
                size = value_size(value) if fired.subs else 0
                for sub in fired.subs:
                    sub.put(item, conn, size)
                if fired.callbacks:
                    self._dispatcher.submit(
                        conn, self._run_any, fired.callbacks, channel, value, conn
                    )
        if self._any:
            self._dispatcher.submit(conn, self._run_any, self._any, channel, value, conn)

    def _polled(self) -> None:
        """A reader looked at the latest values (``get``/``get_all``).  If nothing
        arrived since this thread's previous look, it is polling in a loop (the seed's
        ``while True: h.get_ALL(...)``): give the GIL and the CPU to the I/O thread now
        (:data:`_yield_gil`), or it would wait for them after every receive (measured:
        a no-sleep poll loop cut 1080p throughput to 0.14x a raw socket)."""
        poller = self._pollers
        version = self._version
        if getattr(poller, "seen", -1) == version:
            _yield_gil()
        else:
            poller.seen = version

    def _special_value(self, conn: Connection, frame: Frame) -> Any:
        """The value of a DATA frame with flags (image, retained; relayed: unwrapped)."""
        value = frame.value()
        if frame.flags & FLAG_IMAGE:
            self._image_arrived(conn, frame.channel, value)
        return value

    def _relay_out(self, conn: Connection, channel: str, meta: Any, data: Any) -> None:
        """A relaying host forwards a client's write (hosts only)."""

    def _relay_value(self, conn: Connection, channel: str, value: Any) -> None:
        """A relaying host forwards a client's BATCH item (hosts only)."""

    def _run_callbacks(
        self, callbacks: List[Callable[..., Any]], value: Any, conn: Connection
    ) -> None:
        value = _user_value(value)  # decoding an image happens here, off the I/O thread
        for fn in callbacks:
            try:
                self._call_handler(fn, value, conn)
            except Exception:
                logger.exception("%r: callback %r raised (ignored)", self, fn)

    def _answer(self, conn: Connection, channel: str, rid: int, value: Any) -> None:
        """Run the request handler (on a callback thread, or inline) and send its reply."""
        inline = self._inline.get(channel)
        callbacks = inline or self._callbacks.get(channel)
        result: Any = None
        error: Union[BaseException, str, None] = None
        if not callbacks:
            error = no_handler(channel)
        else:
            try:
                result = self._call_handler(callbacks[0], value, conn)
            except Exception as exc:
                error = exc
            for fn in callbacks[1:]:
                try:
                    self._call_handler(fn, value, conn)
                except Exception:
                    logger.exception("%r: callback %r raised (ignored)", self, fn)
        parts, size, text = reply_frame(channel, rid, result, error)
        try:
            # Never waits, and bounded like a broadcast: a peer that does not read its
            # replies is disconnected as a slow consumer (logged) rather than queue them.
            conn.send_parts(parts, size, block=False)
            conn.messages_out += 1
        except (ConnectionError, SocketEngineError) as exc:
            logger.info("%r: reply to %r not sent: %s", self, conn, exc)
        self._requested(conn, channel, value, None if text is not None else result, text)
        if inline:  # answered inline: the other callbacks still run, on their thread
            others = self._callbacks.get(channel)
            if others:
                self._dispatcher.submit(conn, self._run_callbacks, others, value, conn)

    def _mark_gaps(self) -> None:
        """The connection was lost: every open subscription records a gap."""
        with self._watch_lock:
            subs: List[Subscription[Any]] = [s for ss in self._subs.values() for s in ss]
        for sub in subs + self._patterns.all_subs():
            sub._buffer.gap()

    def _release_waiters(self, error: Optional[ConnectionClosed] = None) -> None:
        """Wake every wait() and end every subscription: the endpoint is closing, or
        (``error``) a client's connection without ``reconnect`` is lost, and they
        raise ``error`` (subscriptions after the items they hold)."""
        with self._watch_lock:
            waiting = [w for ws in self._waiters.values() for w in ws]
            self._waiters.clear()
            subs: List[Subscription[Any]] = [s for ss in self._subs.values() for s in ss]
        waiting += self._patterns.all_waiters()
        subs += self._patterns.all_subs()
        mark: Any = _CLOSED if error is None else _Lost(error)
        for waiter in waiting:
            waiter.set(mark)
        for sub in subs:
            sub._end(error)

    # -- loop-thread callbacks from connections -----------------------------------------

    def _connections(self) -> List[Connection]:
        """Every live connection of this endpoint (loop thread)."""
        return []

    def _start_heartbeat(self) -> None:
        """Begin the periodic heartbeat check (loop thread; once per endpoint)."""
        interval = self.heartbeat
        if interval is None:
            return

        def tick() -> None:
            now = time.monotonic()
            for conn in self._connections():
                conn.heartbeat(now)
            self._loop.call_later(interval / 2, tick)

        self._loop.call_later(interval / 2, tick)

    def _on_ready(self, conn: Connection) -> None:
        """Handshake completed (loop thread); must set ``conn.ready``."""
        conn.mark_ready()

    def _on_closed(self, conn: Connection) -> None:
        """Connection closed (loop thread)."""

    def _dispatch(self, conn: Connection, events: List[Frame]) -> None:
        """Handle application frames from ``conn`` (loop thread).

        A malformed value raises ``ProtocolError``, which closes ``conn`` only.
        """
        # The hot path of every received message: kept flat on purpose.
        watched = (
            self._callbacks
            or self._inline
            or self._subs
            or self._waiters
            or self._any
            or self._patterns
        )
        latest = self._latest
        values = conn.values
        stored = self._stored.get(conn)
        stamps = conn.received_at
        now = time.time()
        count = 0
        relay = self._relay
        ledger = self._images
        kept, unread, conn_kept = ledger.encoded, ledger.unread, conn._encoded  # images
        self._version += 1  # only this thread writes it
        try:
            for frame in events:
                t, flags, channel, _, meta, data = frame
                if t == DATA:
                    if flags & FLAG_COMPRESSED:  # relayed and budgeted as the original
                        frame = frames.decompressed(frame, self.max_message)
                        flags, meta, data = frame.flags, frame.meta, frame.data
                    if flags & FLAG_RELAYED:  # stored, budgeted and relayed as its sender wrote it
                        conn.senders[channel], frame = unwrap_relayed(frame)
                        flags, meta = frame.flags, frame.meta
                    if stored is not None:  # raises ProtocolError beyond a budget
                        stored.store_frame(channel, meta, data)
                    if flags:
                        value = self._special_value(conn, frame)
                    elif data is None:
                        try:
                            value = unpackb(
                                meta, ext_hook=plain_ext_hook, raw=False, strict_map_key=False
                            )
                        except Exception:
                            value = frame.value()  # raises ProtocolError with the reason
                    else:
                        value = frame.value()
                    count += 1
                    values[channel] = value
                    latest[channel] = value
                    stamps[channel] = now
                    if (kept or unread or conn_kept) and not flags & FLAG_IMAGE:
                        self._not_an_image(conn, channel)
                    if watched:
                        self._deliver(conn, channel, value)
                    if relay is not None and relay.allows(channel, conn.name):
                        self._relay_out(conn, channel, meta, data)
                    continue
                if t == BATCH:
                    got = self._batch_last(
                        frame,
                        stored,
                        (self._callbacks, self._inline, self._subs, self._waiters)
                        if watched
                        else (),
                    )
                    if got is not None:  # only the last values mattered
                        count += got[0]
                        self._store_unwatched(conn, [], got[1], now)
                        continue
                    items = self._batch_items(conn, frame)
                    overflow = None
                    pairs = None
                    if stored is not None:
                        try:
                            pairs = stored.store_items(items)  # the last values, or None
                        except BudgetExceeded as exc:  # keep what came before, then close
                            overflow = exc
                            items = items[: exc.accepted]
                    count += len(items) // 2
                    if relay is not None:
                        for i in range(0, len(items), 2):
                            if relay.allows(items[i], conn.name):
                                self._relay_value(conn, items[i], items[i + 1])
                    if watched:
                        for i in range(0, len(items), 2):
                            channel = items[i]
                            value = items[i + 1]
                            values[channel] = value
                            latest[channel] = value
                            stamps[channel] = now
                            self._deliver(conn, channel, value)
                        self._not_images(conn, items[0::2])
                    else:  # nobody waits on anything: stored in bulk
                        self._store_unwatched(conn, items, pairs, now)
                    if overflow is not None:
                        raise overflow
                    continue
                conn.messages_in += count
                count = 0
                if t == frames.REQUEST:
                    value = frame.value()
                    conn.messages_in += 1
                    if frame.channel in self._inline:
                        self._answer(conn, frame.channel, frame.id, value)  # on the I/O thread
                    else:
                        self._dispatcher.submit(
                            conn, self._answer, conn, frame.channel, frame.id, value
                        )
                elif conn._on_control(frame):
                    return  # BYE: the peer sends nothing after it
        finally:
            conn.messages_in += count  # what was handled, even when a later frame fails
            if stored is not None:
                stored.settle()  # a client forgets its oldest channels beyond its budget


def _user_value(value: Any) -> Any:
    """What the application sees of a received value: encoded images are decoded."""
    if type(value) is images.EncodedImage:
        return value.decode()
    return value


def _user_pattern_item(item: Any) -> Any:
    """A pattern item ``(channel, value[, conn])`` for the user: images decoded."""
    if type(item[1]) is images.EncodedImage:
        return (item[0], item[1].decode(), *item[2:])
    return item


def _user_item(item: Any) -> Any:
    """:func:`_user_value` for subscription/waiter items: a value or ``(value, conn)``."""
    if type(item) is tuple and len(item) == 2 and type(item[0]) is images.EncodedImage:
        return (item[0].decode(), item[1])
    return _user_value(item)


class _Closed:
    """Marker handed to waiters when the endpoint closes."""


_CLOSED = _Closed()


class _Lost:
    """Handed to waiters when a client's connection without reconnect is lost."""

    __slots__ = ("error",)

    def __init__(self, error: ConnectionClosed) -> None:
        self.error = error
