"""The send queue of one connection (sans-I/O): ordering, image conflation, limits.

Frames wait here, in order, until the I/O layer hands them to the socket (threaded
layer) or the transport (asyncio layer).  The queue owns the rules both layers must
apply the same way:

* **Order.**  Frames leave in the order they were pushed.
* **Conflation.**  An image frame waits in a *slot* for its channel.  While it is still
  waiting, a newer image frame on the same channel replaces it (latest frame wins) and
  keeps its place in the order.  Once a slot reaches the head of the queue it is being
  sent and can no longer be replaced.
* **max_buffer.**  :meth:`fits` says whether a frame may be queued now: an empty
  queue takes any frame; otherwise queued bytes plus the frame must stay within
  ``max_buffer``.  A writer that does not fit waits (and then gives up with
  ``WriteTimeout``); the waiting itself is the I/O layer's business.
* **Slow consumers.**  :meth:`slow_consumer` is the verdict for broadcasts
  (``write_all``), which never wait: a peer is tolerated up to twice ``max_buffer``
  and for ``timeout`` seconds above ``max_buffer``, then dropped.

It is not thread-safe by itself: the threaded layer calls it under its connection
lock, the asyncio layer from the event loop.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Deque, Dict, List, Optional, Union

from .codec import Buffer

__all__ = ["SendQueue", "ImageHook"]

#: ``hook(channel, nbytes)`` -- told when an image frame is handed over (``nbytes``) or
#: replaced by a newer one before that (``nbytes == -1``).
ImageHook = Callable[[str, int], None]


class _Slot:
    """A queued image frame that a newer frame on the same channel may replace."""

    __slots__ = ("channel", "parts", "nbytes")

    def __init__(self, channel: str, parts: List[Buffer], nbytes: int) -> None:
        self.channel = channel
        self.parts = parts
        self.nbytes = nbytes


class SendQueue:
    """Frames waiting to be sent to one peer.

    :param max_buffer: bytes that may wait before :meth:`fits` says no.
    :param on_image: told about image frames handed over or replaced (stats).
    """

    __slots__ = (
        "max_buffer",
        "queued",
        "images_sent",
        "images_dropped",
        "_items",
        "_slots",
        "_full_since",
        "_on_image",
    )

    def __init__(self, max_buffer: int, on_image: Optional[ImageHook] = None) -> None:
        self.max_buffer = max_buffer
        #: Bytes waiting (image slots count their current frame).
        self.queued = 0
        #: Image frames accepted (a replaced frame is counted in ``images_dropped``).
        self.images_sent = 0
        #: Image frames replaced by a newer one before they were sent.
        self.images_dropped = 0
        self._items: Deque[Union[Buffer, _Slot]] = deque()
        self._slots: Dict[str, _Slot] = {}
        self._full_since: Optional[float] = None
        self._on_image = on_image

    def __bool__(self) -> bool:
        return bool(self._items)

    def __len__(self) -> int:
        """Parts and image slots waiting."""
        return len(self._items)

    # -- writers ----------------------------------------------------------------------

    def fits(self, nbytes: int, extra: int = 0) -> bool:
        """May a frame of ``nbytes`` be queued now?  ``extra``: bytes the I/O layer
        holds beyond this queue (the asyncio transport's buffer)."""
        total = self.queued + extra
        return not total or total + nbytes <= self.max_buffer

    def waiting_image(self, channel: str) -> bool:
        """An image frame of ``channel`` waits, replaceable: a new one takes its place
        (and needs no room of its own beyond the size difference)."""
        return channel in self._slots

    def push(self, parts: List[Buffer], nbytes: int, image: Optional[str] = None) -> bool:
        """Queue a frame's parts; an image frame (``image`` = its channel) replaces a
        waiting one on the same channel.  Returns False if it replaced one."""
        if image is None:
            self._items.extend(parts)
            self.queued += nbytes
            return True
        slot = self._slots.get(image)
        if slot is not None:
            self.queued += nbytes - slot.nbytes
            slot.parts, slot.nbytes = parts, nbytes
            self.images_dropped += 1
            if self._on_image is not None:
                self._on_image(image, -1)
            return False
        slot = self._slots[image] = _Slot(image, parts, nbytes)
        self._items.append(slot)
        self.queued += nbytes
        self.images_sent += 1
        return True

    def slow_consumer(self, nbytes: int, now: float, timeout: float, extra: int = 0) -> bool:
        """Broadcast verdict: True if the peer must be dropped as a slow consumer
        rather than be given ``nbytes`` more (it stayed above ``max_buffer`` for more
        than ``timeout`` s, or would exceed twice ``max_buffer``)."""
        total = self.queued + extra
        if not total or total + nbytes <= self.max_buffer:
            self._full_since = None
            return False
        if self._full_since is None:
            self._full_since = now
        return now - self._full_since > timeout or total + nbytes > 2 * self.max_buffer

    @property
    def full_for(self) -> float:
        """When the queue was first found above ``max_buffer`` by a broadcast (or 0)."""
        return self._full_since or 0.0

    # -- the flusher ----------------------------------------------------------------------

    def batch(self, max_parts: int) -> List[Buffer]:
        """The next parts to send, at most ``max_parts``, in order.

        An image slot at the head is opened first: from then on it is being sent and
        no newer frame replaces it.  Stops before the next slot (it may still change).
        """
        items = self._items
        while items:
            head = items[0]
            if type(head) is not _Slot:
                break
            items.popleft()
            del self._slots[head.channel]
            items.extendleft(reversed(head.parts))
            if self._on_image is not None:
                self._on_image(head.channel, head.nbytes)
        out: List[Buffer] = []
        for item in items:
            if type(item) is _Slot or len(out) == max_parts:
                break
            out.append(item)  # type: ignore[arg-type]
        return out

    def take_all(self) -> List[Buffer]:
        """Every waiting part, slots opened, and the queue emptied (asyncio: all of it
        goes to the transport at once)."""
        out: List[Buffer] = []
        while self._items:
            part = self.batch(1 << 30)
            out.extend(part)
            self._drop_parts(len(part))
        self.queued = 0
        return out

    def consumed(self, sent: int) -> None:
        """``sent`` bytes from the head went to the socket."""
        self.queued -= sent
        items = self._items
        while sent:
            head = items[0]
            size = len(head)  # type: ignore[arg-type]
            if sent >= size:
                items.popleft()
                sent -= size
            else:
                items[0] = memoryview(head).cast("B")[sent:]  # type: ignore[arg-type]
                sent = 0

    def _drop_parts(self, count: int) -> None:
        items = self._items
        for _ in range(count):
            items.popleft()

    def absorb(self, other: SendQueue) -> None:
        """Move everything waiting in ``other`` to the end of this queue, image slots
        still replaceable (a reconnecting client's outbox into its new connection)."""
        for item in other._items:
            if type(item) is _Slot:
                old = self._slots.get(item.channel)
                if old is not None:  # a frame of that channel already waits here
                    self.queued += item.nbytes - old.nbytes
                    old.parts, old.nbytes = item.parts, item.nbytes
                    continue
                self._slots[item.channel] = item
                self.queued += item.nbytes
            else:
                self.queued += len(item)  # type: ignore[arg-type]
            self._items.append(item)
        other.clear()

    def clear(self) -> int:
        """Forget everything waiting; return how many bytes that was."""
        dropped = self.queued
        self._items.clear()
        self._slots.clear()
        self.queued = 0
        self._full_since = None
        return dropped
