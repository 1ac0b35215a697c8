"""Endpoint state shared by both I/O layers (sans-I/O): retained values, departed
clients, admission, subscriptions' watermarks and the reconnect backoff.

Nothing here waits or touches a socket; the threaded and the asyncio layer keep
their own locks or run on one event loop, and call these for the rules.
"""

from __future__ import annotations

import logging
import random
from collections import OrderedDict, deque
from typing import Any, Deque, Dict, Generic, Iterator, List, Optional, Set, Tuple, TypeVar

from . import frames
from .codec import Buffer
from .limits import RECONNECT_FIRST

__all__ = [
    "RetainedValues",
    "Departed",
    "Admission",
    "SubscriptionBuffer",
    "Backoff",
]

logger = logging.getLogger("socketengine")

T = TypeVar("T")
K = TypeVar("K")


class RetainedValues:
    """The values a host retains (``write_all(..., retain=True)``), one per channel.

    Each is stored as the complete encoded DATA frame (flag RETAINED), as bytes: an
    array changed by the application afterwards does not change what late joiners
    get.  Replayed to every client right after its handshake, in the order the
    channels were first retained.
    """

    def __init__(self) -> None:
        self._frames: Dict[str, bytes] = {}

    def retain(self, channel: str, parts: List[Buffer]) -> None:
        """Keep a snapshot of the DATA frame ``parts`` for ``channel``."""
        head = bytes(parts[0])
        frame = bytearray(head[:1])
        frame.append(head[1] | frames.FLAG_RETAINED)
        frame += head[2:]
        for part in parts[1:]:
            frame += part
        self._frames[channel] = bytes(frame)

    def clear(self, channel: Optional[str] = None) -> None:
        if channel is None:
            self._frames.clear()
        else:
            self._frames.pop(channel, None)

    def replay(self) -> List[bytes]:
        """The frames a new client gets, in order."""
        return list(self._frames.values())

    def __contains__(self, channel: object) -> bool:
        return channel in self._frames

    def __len__(self) -> int:
        return len(self._frames)


class Departed(Generic[K, T]):
    """Disconnected clients whose latest values ``get_all`` still reports, at most
    ``keep`` of them (the oldest forgotten first); a named client that comes back
    replaces its record."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self._items: OrderedDict[K, T] = OrderedDict()

    def add(self, key: K, item: T) -> None:
        if self.keep <= 0:
            return
        self._items[key] = item
        while len(self._items) > self.keep:
            self._items.popitem(last=False)

    def forget_named(self, name: Optional[str]) -> None:
        """A client named ``name`` reconnected: drop its departed record."""
        if name is None:
            return
        for key, old in list(self._items.items()):
            if getattr(old, "name", None) == name:
                del self._items[key]

    def items(self) -> List[Tuple[K, T]]:
        return list(self._items.items())


class Admission:
    """Which new connections a host takes (``max_clients``)."""

    def __init__(self, max_clients: int) -> None:
        self.max_clients = max_clients

    def refusal(self, connections: int) -> Optional[Tuple[str, str]]:
        """``(reason, code)`` for a REFUSE, or ``None`` to admit one more connection
        when ``connections`` are already held."""
        if connections >= self.max_clients:
            return f"the host is full (max_clients={self.max_clients})", "full"
        return None


class SubscriptionBuffer(Generic[T]):
    """The items of one subscription and its watermarks.

    Items wait in order.  When ``maxsize`` wait unread, the connection that added the
    last one is *paused* (the layer stops reading it: TCP backpressure slows the
    sender); when the reader has brought the queue down to half, every paused source
    is released.  After :meth:`close`, no item is added, and the items already
    queued can still be read: a reader finishes what it got.
    """

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self.items: Deque[T] = deque()
        self.closed = False
        self._paused: Set[Any] = set()

    def __len__(self) -> int:
        return len(self.items)

    def put(self, item: T, source: Any) -> bool:
        """Add ``item`` from ``source``; True if ``source`` must now be paused."""
        if self.closed:
            return False
        self.items.append(item)
        if len(self.items) >= self.maxsize and source not in self._paused:
            self._paused.add(source)
            return True
        return False

    def take(self) -> Tuple[T, List[Any]]:
        """The next item, and the sources to release now."""
        item = self.items.popleft()
        if self._paused and len(self.items) <= self.maxsize // 2:
            released = list(self._paused)
            self._paused.clear()
            return item, released
        return item, []

    def close(self) -> List[Any]:
        """Stop adding; return the sources to release."""
        self.closed = True
        released = list(self._paused)
        self._paused.clear()
        return released

    @property
    def exhausted(self) -> bool:
        """Closed and nothing left to read: iteration ends."""
        return self.closed and not self.items


def log_lost_link(endpoint: Any, error: Optional[BaseException]) -> None:
    """Log that a reconnecting client lost its host: a host that closed politely
    (restart, shutdown) is routine (INFO); anything else is a WARNING."""
    level = logging.INFO if error is None else logging.WARNING
    logger.log(
        level, "%r: lost the connection (%s); reconnecting", endpoint, error or "closed by the host"
    )


class Backoff:
    """Delays between reconnection attempts: from ``first`` s, doubling, capped at
    ``cap`` s, each with +-``jitter`` (fraction) so clients of a restarted host do
    not come back in lockstep."""

    def __init__(self, cap: float, first: float = RECONNECT_FIRST, jitter: float = 0.2) -> None:
        self.first = first
        self.cap = cap
        self.jitter = jitter
        self._next = first

    def __iter__(self) -> Iterator[float]:
        return self

    def __next__(self) -> float:
        delay = self._next * random.uniform(1 - self.jitter, 1 + self.jitter)
        self._next = min(self._next * 2, self.cap)
        return delay

    def reset(self) -> None:
        """The connection is back: the next loss starts from ``first`` again."""
        self._next = self.first
