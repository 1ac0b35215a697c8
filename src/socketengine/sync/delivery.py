"""Delivery to the user in the threaded layer: callbacks, waiters, subscriptions.

The loop thread never runs user code.  It hands callbacks to a :class:`Dispatcher`:
a few worker threads (created on first use) that run each connection's callbacks
serially, in arrival order, while different connections' callbacks may run in
parallel -- so a slow callback delays only its own connection's later callbacks.

Backpressure instead of loss: when a connection has ``pause_at`` callbacks waiting, or
a :class:`Subscription` is full, the loop stops reading that connection until the
backlog drains; TCP then slows the sender down.  Nothing is dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import (
    Any,
    Callable,
    Deque,
    Dict,
    Generic,
    Iterator,
    List,
    Optional,
    Set,
    Tuple,
    TypeVar,
)

from ..errors import EndpointClosed
from ..limits import CALLBACK_BACKLOG, check_maxsize
from ..state import SubscriptionBuffer

logger = logging.getLogger("socketengine")

Task = Tuple[Callable[..., Any], Tuple[Any, ...]]
_T = TypeVar("_T")


class Pausable:
    """What the delivery objects need of a connection (implemented by Connection)."""

    def pause_reading(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def resume_reading(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class Dispatcher:
    """Runs callbacks off the I/O thread, serially per key (connection).

    :param name: thread name prefix.
    :param workers: most worker threads (created lazily, kept until :meth:`stop`).
    :param pause_at: pending callbacks for one key at which its connection stops
        being read; reading resumes when half of them have run.
    """

    def __init__(self, name: str, workers: int = 4, pause_at: int = CALLBACK_BACKLOG) -> None:
        self.name = name
        self.max_workers = workers
        self.pause_at = pause_at
        self._cond = threading.Condition()
        self._queues: Dict[Any, Deque[Task]] = {}
        self._ready: Deque[Any] = deque()  # keys with work and no worker on them
        self._running: Set[Any] = set()  # keys queued in _ready or being run
        self._paused: Set[Any] = set()
        self._threads: List[threading.Thread] = []
        self._idle = 0
        self._stopping = False

    def submit(self, key: Pausable, fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``fn(*args)`` behind everything already queued for ``key``."""
        with self._cond:
            if self._stopping:
                return
            queue = self._queues.get(key)
            if queue is None:
                queue = self._queues[key] = deque()
            queue.append((fn, args))
            if len(queue) >= self.pause_at and key not in self._paused:
                self._paused.add(key)
                key.pause_reading()
            if key not in self._running:
                self._running.add(key)
                self._ready.append(key)
                if self._idle:
                    self._cond.notify()
                elif len(self._threads) < self.max_workers:
                    t = threading.Thread(
                        target=self._work,
                        name=f"{self.name}-callbacks-{len(self._threads) + 1}",
                        daemon=True,
                    )
                    self._threads.append(t)
                    t.start()

    def _work(self) -> None:
        cond = self._cond
        while True:
            with cond:
                while not self._ready:
                    if self._stopping:
                        return
                    self._idle += 1
                    cond.wait()
                    self._idle -= 1
                key = self._ready.popleft()
                queue = self._queues[key]
                batch = [queue.popleft() for _ in range(min(len(queue), 64))]
            for fn, args in batch:
                try:
                    fn(*args)
                except Exception:
                    logger.exception("%s: a callback raised (ignored)", self.name)
            with cond:
                if key in self._paused and len(queue) <= self.pause_at // 2:
                    self._paused.discard(key)
                    key.resume_reading()
                if queue:
                    self._ready.append(key)
                else:
                    # stop() clears the queues when a callback outlives its timeout
                    self._queues.pop(key, None)
                    self._running.discard(key)
                    cond.notify_all()  # for drain()

    def drain(self, timeout: float) -> bool:
        """Wait until every queued callback has run (or ``timeout`` s passed)."""
        deadline = time.monotonic() + timeout
        me = threading.current_thread()
        with self._cond:
            if me in self._threads:
                return not self._queues
            while self._running:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def stop(self, timeout: float = 2.0) -> None:
        """Run what is queued (up to ``timeout`` s), then end the worker threads."""
        self.drain(timeout)
        with self._cond:
            self._stopping = True
            self._queues.clear()
            self._ready.clear()
            self._cond.notify_all()
        me = threading.current_thread()
        for t in self._threads:
            if t is not me:
                t.join(timeout)


class Flag:
    """A one-shot ``threading.Event`` on one raw lock: set once, waited for by its owner.

    ``threading.Event`` builds a Condition with a lock of its own and one more lock per
    wait; this takes a single lock that ``set`` releases.  Measured here: 1.4 us instead
    of 8.5 us to make, set and check one, and a thread hand-over (set in one thread, a
    waiter woken in another) 33-38 us instead of 41-47 us; a request or ``wait()`` makes
    one.
    """

    __slots__ = ("_lock", "_set")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self._set = False

    def set(self) -> None:
        if not self._set:
            self._set = True
            try:
                self._lock.release()
            except RuntimeError:  # two threads set it at once: released already
                pass

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: Optional[float] = None) -> bool:
        """True once set; False if ``timeout`` seconds (``None``: no limit) pass first."""
        if self._set:
            return True
        lock = self._lock
        if lock.acquire(True, -1 if timeout is None else max(timeout, 0.0)):
            try:
                lock.release()  # stays open: later waits return at once
            except RuntimeError:
                pass
            return True
        return self._set


class Waiter:
    """One blocked ``wait()`` call: filled by the loop thread with the next value."""

    __slots__ = ("event", "item")

    def __init__(self) -> None:
        self.event = Flag()
        self.item: Any = None

    def set(self, item: Any) -> None:
        self.item = item
        self.event.set()


class Subscription(Generic[_T]):
    """Every message on one channel, in order, from the moment it was made.

    Iterate it (``for data in sub:``) or call :meth:`get`; :meth:`close` ends it.  On a
    host the items are ``(data, conn)`` (``Subscription[Tuple[Any, Connection]]``), on a
    client the values (``Subscription[Any]``).  When ``maxsize`` items are waiting, the
    connections that keep sending are no longer read until the subscriber catches up
    (TCP backpressure): nothing is dropped, and at most one read's worth of messages
    beyond ``maxsize`` is held.

    Iteration ends after :meth:`close`, or when the endpoint closes (after the items
    already received).  On a client without ``reconnect`` whose connection is lost, it
    raises :class:`~socketengine.ConnectionClosed` once the items received are read; a
    reconnecting client's subscriptions go on across reconnections.
    """

    def __init__(
        self,
        channel: str,
        maxsize: int,
        on_close: Callable[[Subscription[_T]], None],
        convert: Optional[Callable[[Any], Any]] = None,
        maxbytes: Optional[int] = None,
    ) -> None:
        check_maxsize(maxsize)
        self.channel = channel
        self.maxsize = maxsize
        self._buffer: SubscriptionBuffer[Any] = SubscriptionBuffer(maxsize, maxbytes)
        self._cond = threading.Condition()
        self._on_close = on_close
        self._convert = convert  # applied in the reader's thread (e.g. image decoding)
        self._error: Optional[BaseException] = None  # raised once closed and read

    @property
    def gaps(self) -> int:
        """How many times a connection was lost while this subscription was open:
        values sent meanwhile may be missing (a client reconnects by itself; compare
        ``gaps`` before and after reading to know whether the stream is whole).  On a
        host: a client's connection lost without a goodbye and not kept for a resume."""
        return self._buffer.gaps

    @property
    def closed(self) -> bool:
        """True once no more items will be added."""
        return self._buffer.closed

    def __len__(self) -> int:
        """Items received and not read yet."""
        return len(self._buffer)

    def put(self, item: Any, source: Pausable, nbytes: int = 0) -> None:
        """Add an item (``nbytes`` on the wire; loop thread); pause ``source`` if this
        makes the queue full (``maxsize`` items or ``maxbytes`` bytes)."""
        with self._cond:
            if self._buffer.put(item, source, nbytes):
                source.pause_reading()
            self._cond.notify()

    def get(self, timeout: Optional[float] = None) -> _T:
        """The next item; raises ``TimeoutError`` after ``timeout`` s, or
        :class:`~socketengine.EndpointClosed` (or the lost connection's
        :class:`~socketengine.ConnectionClosed`) once closed and empty."""
        buffer = self._buffer
        with self._cond:
            if not buffer.items:
                deadline = None if timeout is None else time.monotonic() + timeout
                while not buffer.items:
                    if buffer.closed:
                        if self._error is not None:
                            raise self._error
                        raise EndpointClosed(f"subscription to {self.channel!r} is closed")
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise TimeoutError(f"no message on {self.channel!r} within {timeout} s")
                    self._cond.wait(left)
            item, released = buffer.take()
        for source in released:
            source.resume_reading()
        return item if self._convert is None else self._convert(item)

    def __iter__(self) -> Iterator[_T]:
        while True:
            try:
                yield self.get()
            except EndpointClosed:
                return

    def close(self) -> None:
        """Stop receiving; iteration ends once the items already queued are read."""
        self._end(None)

    def _end(self, error: Optional[BaseException]) -> None:
        """No more items; iteration ends (or raises ``error``) once the rest is read."""
        with self._cond:
            if self._buffer.closed:
                return
            released = self._buffer.close()
            self._error = error
            self._cond.notify_all()
        for source in released:
            source.resume_reading()
        self._on_close(self)

    def __enter__(self) -> Subscription[_T]:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<Subscription {self.channel!r} {state} queued={len(self)}>"
