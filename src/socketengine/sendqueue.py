"""The send queue of one connection (sans-I/O): ordering, conflation, batching, limits.

Frames wait here, in order, until the I/O layer hands them to the socket (threaded
layer) or the transport (asyncio layer).  The queue owns the rules both layers must
apply the same way:

* **Order.**  Entries leave in the order they were pushed.
* **Two stages.**  Writers push into the *inbox*; the one flusher takes the whole
  inbox at once (:meth:`take_inbox`, O(1)) and turns it into wire buffers
  (:meth:`to_wire`) while writers go on pushing.  The threaded layer holds its lock
  only for the O(1) steps, never while batches are built or sent.
* **Conflation.**  An image frame waits in a *slot* for its channel.  While it is
  still in the inbox, a newer image frame on the same channel replaces it (latest
  frame wins) and keeps its place in the order.  Once taken by the flusher it is
  being sent and can no longer be replaced.  The flusher takes the inbox only when
  everything before it has gone to the socket, so under backpressure images keep
  conflating.
* **Batching (protocol 1.1).**  Small values without arrays are pushed as *items*
  (``msgpack(channel) + msgpack(value)``).  A run of two or more items becomes one
  BATCH frame when the peer announced it can read them (:attr:`batch_limit`);
  otherwise every item becomes an ordinary DATA frame.
* **max_buffer.**  :meth:`fits` says whether a frame may be queued now: an empty
  queue takes any frame; otherwise queued bytes plus the frame must stay within
  ``max_buffer``.  A writer that does not fit waits (and then gives up with
  ``WriteTimeout``); the waiting itself is the I/O layer's business.
* **Slow consumers.**  :meth:`slow_consumer` is the verdict for broadcasts
  (``write_all``), which never wait: a peer is tolerated up to twice ``max_buffer``
  and for ``timeout`` seconds above ``max_buffer``, then dropped.

It is not thread-safe by itself: the threaded layer calls the inbox methods under
its connection lock, and only its one flusher calls the wire methods; the asyncio
layer calls everything from the event loop.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Deque, Dict, List, Optional, Sequence, Union

from . import frames
from .codec import Buffer
from .shm import ShmWriter

__all__ = ["SendQueue", "ImageHook", "Outgoing", "BATCH_MAX"]

#: ``hook(channel, nbytes)`` -- told when an image frame is handed over (``nbytes``) or
#: replaced by a newer one before that (``nbytes == -1``).
ImageHook = Callable[[str, int], None]

#: What writers hand a send queue: a BATCH item (bytes) or a frame's parts.
Outgoing = Union[bytes, Sequence[Buffer]]

#: Largest BATCH body, bytes (a receiver's ``max_message`` lowers it further).
BATCH_MAX = 64 * 1024

_pack_header = frames.HEADER.pack
_unpack_header = frames.HEADER.unpack_from
_FLAG_SHM = frames.FLAG_SHM
_NOT_SHM = frames.FLAG_COMPRESSED | frames.FLAG_SHM
_BATCH = frames.BATCH
_DATA = frames.DATA


class _Slot:
    """A queued image frame that a newer frame on the same channel may replace."""

    __slots__ = ("channel", "parts", "nbytes")

    def __init__(self, channel: str, parts: List[Buffer], nbytes: int) -> None:
        self.channel = channel
        self.parts = parts
        self.nbytes = nbytes


# An inbox entry: an item (bytes), a frame's parts (list) or an image slot.
_Entry = Union[bytes, List[Buffer], _Slot]


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
        "batch_limit",
        "_inbox",
        "_wire",
        "_slots",
        "_full_since",
        "_on_image",
        "shm",
    )

    def __init__(self, max_buffer: int, on_image: Optional[ImageHook] = None) -> None:
        self.max_buffer = max_buffer
        #: Bytes waiting, in both stages (image slots count their current frame).
        self.queued = 0
        #: Image frames accepted (a replaced frame is counted in ``images_dropped``).
        self.images_sent = 0
        #: Image frames replaced by a newer one before they were sent.
        self.images_dropped = 0
        #: Largest BATCH body the peer reads; 0: it reads none (a 1.0 peer).
        self.batch_limit = 0
        self._inbox: List[_Entry] = []
        self._wire: Deque[Buffer] = deque()
        self._slots: Dict[str, _Slot] = {}
        self._full_since: Optional[float] = None
        self._on_image = on_image
        #: Set when the handshake negotiated shared memory: large DATA frames leave
        #: as descriptors (see :meth:`to_wire`).
        self.shm: Optional[ShmWriter] = None

    def __bool__(self) -> bool:
        return bool(self._inbox) or bool(self._wire)

    # -- writers (the inbox) ----------------------------------------------------------

    def fits(self, nbytes: int, extra: int = 0) -> bool:
        """May a frame of ``nbytes`` be queued now?  ``extra``: bytes the I/O layer
        holds beyond this queue (the asyncio transport's buffer)."""
        total = self.queued + extra
        return not total or total + nbytes <= self.max_buffer

    def waiting_image(self, channel: str) -> bool:
        """An image frame of ``channel`` waits, replaceable: a new one takes its place
        (and needs no room of its own beyond the size difference)."""
        return channel in self._slots

    def push_item(self, item: bytes) -> None:
        """Queue a small DATA value as a BATCH item (see :func:`frames.value_item`)."""
        self._inbox.append(item)
        self.queued += len(item)

    def push(self, parts: List[Buffer], nbytes: int, image: Optional[str] = None) -> bool:
        """Queue a frame's parts; an image frame (``image`` = its channel) replaces a
        waiting one on the same channel.  Returns False if it replaced one."""
        if image is None:
            self._inbox.append(parts)
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
        self._inbox.append(slot)
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

    @property
    def wire_pending(self) -> bool:
        """Wire buffers are waiting to be sent (the flusher owns them)."""
        return bool(self._wire)

    def take_inbox(self) -> List[_Entry]:
        """Everything pushed so far, in order; from now on it is being sent (image
        slots can no longer be replaced).  O(1)."""
        inbox = self._inbox
        if not inbox:
            return inbox
        self._inbox = []
        slots = self._slots
        if slots:
            self._slots = {}
            hook = self._on_image
            if hook is not None:
                for slot in slots.values():
                    hook(slot.channel, slot.nbytes)
        return inbox

    def to_wire(self, entries: List[_Entry]) -> None:
        """Turn taken entries into wire buffers, in order: a run of items becomes one
        BATCH frame (or, for a peer that reads none, one DATA frame each)."""
        wire = self._wire
        limit = self.batch_limit
        run: List[bytes] = []
        size = 0
        for entry in entries:
            kind = type(entry)
            if kind is bytes:
                n = len(entry)  # type: ignore[arg-type]
                if run and size + n > limit:
                    self._flush_run(run, size)
                    run, size = [], 0
                run.append(entry)  # type: ignore[arg-type]
                size += n
                continue
            if run:
                self._flush_run(run, size)
                run, size = [], 0
            parts = entry if kind is list else entry.parts  # type: ignore[union-attr]
            if self.shm is not None and len(parts) > 1:  # type: ignore[arg-type]
                parts = self._through_shm(parts)  # type: ignore[arg-type]
            wire.extend(parts)  # type: ignore[arg-type]
        if run:
            self._flush_run(run, size)

    def _through_shm(self, parts: List[Buffer]) -> List[Buffer]:
        """A DATA frame's parts, its data section moved into shared memory when it is
        large enough and a slot is free (else unchanged: it goes through the socket).
        Done here, as the frame leaves, so that a conflated image never takes a slot."""
        writer = self.shm
        head = parts[0]
        ftype, flags, clen, fid, mlen, dlen = _unpack_header(head)
        if (
            ftype != _DATA
            or flags & _NOT_SHM
            or dlen < writer.threshold  # type: ignore[union-attr]
            or len(head) != frames.HEADER_SIZE + clen + mlen
        ):
            return parts
        desc = writer.put(parts[1:], dlen)  # type: ignore[union-attr]
        if desc is None:
            return parts
        self.queued -= dlen - len(desc)
        new = _pack_header(_DATA, flags | _FLAG_SHM, clen, fid, mlen, len(desc))
        return [new + memoryview(head)[frames.HEADER_SIZE :] + desc]

    def _flush_run(self, run: List[bytes], size: int) -> None:
        """Frame a run of items: BATCH when the peer reads them and there are two or
        more, else one DATA frame per item."""
        wire = self._wire
        if len(run) > 1 and self.batch_limit:
            # The header is counted as queued bytes too: they leave with the frame.
            self.queued += frames.HEADER_SIZE
            wire.append(_pack_header(_BATCH, 0, 0, 0, size, 0) + b"".join(run))
            return
        for item in run:
            frame = frames.item_frame(item)
            self.queued += len(frame) - len(item)
            wire.append(frame)

    def wire_batch(self, max_parts: int) -> List[Buffer]:
        """The next wire buffers to send, at most ``max_parts``, in order."""
        wire = self._wire
        if len(wire) <= max_parts:
            return list(wire)
        return [wire[i] for i in range(max_parts)]

    def consumed(self, sent: int) -> None:
        """``sent`` bytes from the head of the wire went to the socket."""
        self.queued -= sent
        wire = self._wire
        while sent:
            head = wire[0]
            size = len(head)
            if sent >= size:
                wire.popleft()
                sent -= size
            else:
                wire[0] = memoryview(head).cast("B")[sent:]
                sent = 0

    def take_all(self) -> List[Buffer]:
        """Every waiting buffer, in order, the queue emptied (the asyncio layer hands
        it all to its transport)."""
        self.to_wire(self.take_inbox())
        out = list(self._wire)
        self._wire.clear()
        self.queued = 0
        return out

    def absorb(self, other: SendQueue) -> None:
        """Move everything waiting in ``other`` to the end of this queue's inbox,
        image slots still replaceable (a reconnecting client's outbox into its new
        connection).  ``other`` has no wire buffers: it is never flushed."""
        for entry in other._inbox:
            if type(entry) is _Slot:
                old = self._slots.get(entry.channel)
                if old is not None:  # a frame of that channel already waits here
                    self.queued -= old.nbytes
                    old.parts, old.nbytes = entry.parts, entry.nbytes
                    continue
                self._slots[entry.channel] = entry
            self._inbox.append(entry)
        self.queued += other.queued
        other.clear()

    def clear(self) -> int:
        """Forget everything waiting; return how many bytes that was."""
        dropped = self.queued
        self._inbox = []
        self._wire.clear()
        self._slots.clear()
        self.queued = 0
        self._full_since = None
        return dropped
