"""Subscriptions: every message of a channel, in order, with back-pressure."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Callable, List, Optional, TypeVar

from ..errors import EndpointClosed
from ..limits import check_maxsize
from ..state import SubscriptionBuffer
from .connection import Connection, Gate
from .decoding import pending, resolve_now

__all__ = ["Subscription"]

_T = TypeVar("_T")


class Subscription(Gate, AsyncIterator[_T]):
    """Every message that arrives on one channel from the moment of subscribing.

    Iterate with ``async for`` (or ``await sub.get()``).  Items are the values (on a
    client) or ``(value, connection)`` pairs (on a host), in arrival order.

    Nothing is dropped: when ``maxsize`` items wait unread, the connection that
    delivered the last one stops reading (``transport.pause_reading()``) until half
    of them are read, so the sender's writes block through TCP back-pressure.

    Images sent as JPEG/PNG are decoded when they are read, in a worker thread (the
    event loop is not blocked); a corrupt file raises ``ValueError`` from that read.

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
        maxbytes: Optional[int] = None,
    ) -> None:
        check_maxsize(maxsize)
        super().__init__()
        self.channel = channel
        self.maxsize = maxsize
        self._buffer: SubscriptionBuffer[_T] = SubscriptionBuffer(maxsize, maxbytes)
        self._items = self._buffer.items
        self._getters: List[asyncio.Future[None]] = []
        self._error: Optional[BaseException] = None
        self._on_close = on_close

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
        return len(self._items)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<Subscription {self.channel!r} {len(self._items)}/{self.maxsize} {state}>"

    def __aiter__(self) -> Subscription[_T]:
        return self

    async def __anext__(self) -> _T:
        while True:
            if not self._items:
                if self.closed and self._error is None:
                    raise StopAsyncIteration
                await self._wait()
                if not self._items:
                    if self._error is not None:
                        raise self._error
                    raise StopAsyncIteration
            if await self._decoded_head():
                return self._take()

    async def get(self) -> _T:
        """The next item; waits for it.

        Raises :class:`~socketengine.EndpointClosed` (or the connection's error) when
        the subscription is closed and empty.
        """
        while True:
            if not self._items:
                await self._wait()
                if not self._items:
                    if self._error is not None:
                        raise self._error
                    raise EndpointClosed(f"subscription to {self.channel!r} is closed")
            if await self._decoded_head():
                return self._take()

    def get_nowait(self) -> _T:
        """The next item if one is waiting; else raise ``IndexError``.

        A JPEG/PNG image is decoded here, blocking the event loop for that time.
        """
        if not self._items:
            raise IndexError(f"no message waiting on {self.channel!r}")
        return self._take()

    def close(self) -> None:
        """Stop receiving; iteration ends once the items already queued are read (as
        in the threaded layer).  Idempotent."""
        self._error = None
        self._end(None)

    # -- endpoint side ------------------------------------------------------------------

    def _put(self, item: _T, source: Connection, nbytes: int = 0) -> None:
        """Add an item (endpoint side); a full subscription holds ``source`` (it stops
        handling frames, and reading) until the reader has taken half of them."""
        if self._buffer.put(item, source, nbytes):
            source._block(self)
        if self._getters:
            self._wake()

    def hold(self, conn: Connection) -> None:
        """The buffer's watermarks already track who waits for room here."""

    def _let_go(self, sources: List[Connection]) -> None:
        for conn in sources:
            conn._unblock(self)

    def _end(self, error: Optional[BaseException]) -> None:
        """No more items; iteration ends (or raises ``error``) once the rest is read."""
        if self._buffer.closed:
            return
        released = self._buffer.close()
        self._error = error
        self._on_close(self)
        self._wake()
        self._let_go(released)

    # -- internals ------------------------------------------------------------------------

    def _take(self) -> _T:
        item, released = self._buffer.take()
        self._let_go(released)
        return resolve_now(item)

    async def _decoded_head(self) -> bool:
        """Decode the first item's image, if any, in a worker thread while it stays
        queued (a reader cancelled meanwhile loses nothing); False if another reader
        took it first.  A corrupt image is consumed and its ``ValueError`` raised."""
        image = pending(self._items[0])
        if image is None:
            return True
        head = self._items[0]
        try:
            await image.decoded()
        except Exception:
            if self._items and self._items[0] is head:
                _, released = self._buffer.take()
                self._let_go(released)
            raise
        return bool(self._items) and self._items[0] is head

    async def _wait(self) -> None:
        """Wait until an item arrives or the subscription closes."""
        loop = asyncio.get_running_loop()
        while not self._items and not self.closed:
            waiter: asyncio.Future[None] = loop.create_future()
            self._getters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._getters:
                    self._getters.remove(waiter)

    def _wake(self) -> None:
        getters = self._getters
        self._getters = []
        for waiter in getters:
            if not waiter.done():
                waiter.set_result(None)
