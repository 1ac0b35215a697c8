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
    Final,
    Generic,
    Iterator,
    List,
    Optional,
    Protocol,
    Set,
    Tuple,
    TypeVar,
)

from ..errors import EndpointClosed
from ..limits import CALLBACK_BACKLOG, check_maxsize
from ..state import SubscriptionBuffer

logger: Final = logging.getLogger("socketengine")

Task = Tuple[Callable[..., Any], Tuple[Any, ...]]
_T = TypeVar("_T")


class Pausable(Protocol):
    """What the delivery objects need of a connection (``Connection`` has both; a
    structural type, so that no connection class inherits from two bases)."""

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class Dispatcher:
    """Runs callbacks off the I/O thread, serially per key (connection).

    :param name: thread name prefix.
    :param workers: most worker threads (created lazily, kept until :meth:`stop`).
    :param pause_at: pending callbacks for one key at which its connection stops
        being read; reading resumes when half of them have run.

    An idle worker sleeps on a raw lock of its own, which :meth:`submit` releases to
    wake exactly that worker (the most recently idle one: its cache is warm).  A
    ``threading.Condition`` makes a lock and a list entry per wait and notifies through
    Python code on every submit.  Measured against it (docs/benchmarks.md): a request
    answered by a callback 1-3 us faster, one-way callbacks 3-8 % more per second.
    """

    def __init__(self, name: str, workers: int = 4, pause_at: int = CALLBACK_BACKLOG) -> None:
        self.name = name
        self.max_workers = workers
        self.pause_at = pause_at
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)  # a key ran dry (for drain())
        self._draining = 0  # threads waiting in drain()
        self._queues: Dict[Any, Deque[Task]] = {}
        self._ready: Deque[Any] = deque()  # keys with work and no worker on them
        self._running: Set[Any] = set()  # keys queued in _ready or being run
        self._paused: Set[Any] = set()
        self._threads: List[threading.Thread] = []
        self._parked: List[Any] = []  # idle workers' wake locks (held: released to wake)
        self._stopping = False

    def submit(self, key: Pausable, fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``fn(*args)`` behind everything already queued for ``key``."""
        with self._lock:
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
                if self._parked:
                    self._parked.pop().release()
                elif len(self._threads) < self.max_workers:
                    t = threading.Thread(
                        target=self._work,
                        name=f"{self.name}-callbacks-{len(self._threads) + 1}",
                        daemon=True,
                    )
                    self._threads.append(t)
                    t.start()

    def _work(self) -> None:
        lock = self._lock
        wake = threading.Lock()
        wake.acquire()
        while True:
            with lock:
                while not self._ready:
                    if self._stopping:
                        return
                    # Parked: submit() or stop() takes this lock off the list and
                    # releases it, once; until then nobody else can release it.
                    self._parked.append(wake)
                    lock.release()
                    try:
                        wake.acquire()
                    finally:
                        lock.acquire()
                key = self._ready.popleft()
                queue = self._queues[key]
                batch = [queue.popleft() for _ in range(min(len(queue), 64))]
            for fn, args in batch:
                try:
                    fn(*args)
                except Exception:
                    logger.exception("%s: a callback raised (ignored)", self.name)
            with lock:
                if key in self._paused and len(queue) <= self.pause_at // 2:
                    self._paused.discard(key)
                    key.resume_reading()
                if queue:
                    self._ready.append(key)
                else:
                    # stop() clears the queues when a callback outlives its timeout
                    self._queues.pop(key, None)
                    self._running.discard(key)
                    if self._draining:
                        self._done.notify_all()

    def drain(self, timeout: float) -> bool:
        """Wait until every queued callback has run (or ``timeout`` s passed)."""
        deadline = time.monotonic() + timeout
        me = threading.current_thread()
        with self._lock:
            if me in self._threads:
                return not self._queues
            self._draining += 1
            try:
                while self._running:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._done.wait(left)
            finally:
                self._draining -= 1
        return True

    def stop(self, timeout: float = 2.0) -> None:
        """Run what is queued (up to ``timeout`` s), then end the worker threads."""
        self.drain(timeout)
        with self._lock:
            self._stopping = True
            self._queues.clear()
            self._ready.clear()
            parked, self._parked = self._parked, []
            for wake in parked:
                wake.release()
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
        wait: Optional[Callable[[Flag, Optional[float]], bool]] = None,
        wake: Optional[Callable[[], None]] = None,
    ) -> None:
        check_maxsize(maxsize)
        self.channel = channel
        self.maxsize = maxsize
        self._buffer: SubscriptionBuffer[Any] = SubscriptionBuffer(maxsize, maxbytes)
        self._lock = threading.Lock()
        # Threads blocked in get(), each on a Flag of its own that put() sets (one) or
        # the end sets (all): leaner than a Condition, as in Dispatcher (a subscription
        # read in a loop took 12-20 % more values per second).
        self._waiters: Deque[Flag] = deque()
        # How a blocked get() waits for its Flag: on a client, by reading the
        # connection itself, as wait() does (Connection.read_until).
        self._wait = wait or Flag.wait
        self._wake = wake  # and how the end reaches a reader blocked there
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
        with self._lock:
            if self._buffer.put(item, source, nbytes):
                source.pause_reading()
            if self._waiters:
                self._waiters.popleft().set()

    def get(self, timeout: Optional[float] = None) -> _T:
        """The next item; raises ``TimeoutError`` after ``timeout`` s, or
        :class:`~socketengine.EndpointClosed` (or the lost connection's
        :class:`~socketengine.ConnectionClosed`) once closed and empty."""
        buffer = self._buffer
        lock = self._lock
        with lock:
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
                    self._sleep(lock, left)
            item, released = buffer.take()
        for source in released:
            source.resume_reading()
        return item if self._convert is None else self._convert(item)

    def _sleep(self, lock: Any, timeout: Optional[float]) -> None:
        """Wait (``lock`` held, released meanwhile) until put() or the end wakes this
        thread, or ``timeout`` s pass.  A wake-up that comes with the timeout is not
        lost: the caller finds the item under the lock either way."""
        waiter = Flag()
        self._waiters.append(waiter)
        woken = False
        lock.release()
        try:
            woken = self._wait(waiter, timeout)
        finally:
            lock.acquire()
            if not woken:
                try:
                    self._waiters.remove(waiter)
                except ValueError:  # released just as the wait gave up
                    pass

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
        with self._lock:
            if self._buffer.closed:
                return
            released = self._buffer.close()
            self._error = error
            waiters, self._waiters = self._waiters, deque()
            for waiter in waiters:
                waiter.set()
        if waiters and self._wake is not None:
            self._wake()
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
