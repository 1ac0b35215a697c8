"""The send queue of one connection (sans-I/O): ordering, conflation, batching, limits.

Frames wait here, in order, until the I/O layer hands them to the socket (threaded
layer) or the transport (asyncio layer).  The queue owns the rules both layers must
apply the same way:

* **Order.**  Entries leave in the order they were pushed.
* **Two stages.**  Writers push into the *inbox*; the one flusher takes the whole
  inbox at once (:meth:`take_inbox`, O(1)) and turns it into wire buffers
  (:meth:`to_wire`) while writers go on pushing.  The threaded layer holds its lock
  only for the O(1) steps, never while batches are built or sent.  A lone frame on
  an idle queue (a request, or its reply, or a value written on a quiet link) skips
  both stages (:meth:`push_direct`, :meth:`push_item_direct`): the same wire bytes,
  numbering and counts, in one step.
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
* **Staging (threaded writers in a burst).**  While a flush is already due (scheduled,
  or waiting for a full socket to drain), a writer may append a small item to
  :attr:`staged` without the connection lock (a list append is atomic) while fewer
  than :data:`STAGE_MAX` items are staged and the queue is :data:`STAGE_HEADROOM`
  bytes below ``max_buffer`` (:attr:`stage_below`), so staged items never take the
  queue beyond it.  Every method that reads or changes the inbox first moves the
  staged items to its end, counted (:meth:`unstage`, under the lock), so the order of
  entries is the order in which they were pushed or staged.
* **max_buffer.**  :meth:`fits` says whether a frame may be queued now: an empty
  queue takes any frame; otherwise queued bytes plus the frame must stay within
  ``max_buffer``.  An item not framed yet also counts its memory beyond its bytes
  (:data:`ITEM_OVERHEAD`), so a queue of small values holds about ``max_buffer`` of
  memory, not 1.5x that.  A writer that does not fit waits (and then gives up with
  ``WriteTimeout``); the waiting itself is the I/O layer's business.
* **Resume (protocol 1.2).**  With :attr:`numbered` set, every frame that carries
  user values (DATA, BATCH) is numbered when it goes to the wire (so conflated images,
  replaced while still in the inbox, never take a number) and kept in a *replay
  buffer* until the peer acknowledges it (:meth:`ack`).  The replay buffer is bounded
  by :attr:`window` bytes (``max_buffer``, at least :data:`WINDOW_MIN`) with flow
  control: once it holds that much, :meth:`take_inbox` holds the values in the inbox
  back (:attr:`held_back`) until RACKs make room, so writers wait on ``max_buffer``
  instead of frames leaving the window unacknowledged.  It may pass the window by the
  last entry it took (one frame larger than the window goes alone).  Link-level
  frames (RACK, PING, PONG) are never held back: the peer's window may wait for this
  side's RACKs.  A resume that would need frames no longer held (none, with flow
  control; see :meth:`_bound`) reports them lost.  An image frame superseded by a
  newer one on the same channel is replaced by a placeholder: a resume replays only
  the newest frame of a conflated channel, and a SKIP frame keeps the numbering.
  After a link dies,
  :meth:`detach` drops the half-sent wire buffers; :meth:`rewind` (the peer still
  has the session) or :meth:`restart` (it does not: at least once) prepares the
  replay, and :meth:`take_over` moves it all into the next connection's queue.
* **Slow consumers.**  :meth:`slow_consumer` is the verdict for broadcasts
  (``write_all``), which never wait: a peer is tolerated up to twice ``max_buffer``
  and for ``timeout`` seconds above ``max_buffer``, then dropped.

It is not thread-safe by itself: the threaded layer calls the inbox methods under
its connection lock, and only its one flusher calls the wire methods; the asyncio
layer calls everything from the event loop.
"""

from __future__ import annotations

import threading
from bisect import bisect_right
from collections import deque
from itertools import accumulate
from typing import (
    Any,
    Callable,
    Deque,
    Dict,
    Final,
    Iterable,
    List,
    Optional,
    Sequence,
    Tuple,
    Union,
)

from . import frames
from .codec import Buffer
from .errors import ProtocolError, WriteTimeout
from .shm import ShmWriter

__all__ = [
    "SendQueue",
    "ImageHook",
    "Outgoing",
    "BATCH_MAX",
    "ITEM_OVERHEAD",
    "WIRE_CHUNK",
    "SEQ_VALUES",
    "SEQ_ALL",
    "STAGE_MAX",
    "STAGE_HEADROOM",
    "PACE_ABOVE",
    "PACE_BELOW",
    "PACE_WAIT",
]

#: ``hook(channel, nbytes)`` -- told when an image frame is handed over (``nbytes``) or
#: replaced by a newer one before that (``nbytes == -1``).
ImageHook = Callable[[str, int], None]

#: What writers hand a send queue: a BATCH item (bytes) or a frame's parts.
Outgoing = Union[bytes, Sequence[Buffer]]

#: Largest BATCH body, bytes (a receiver's ``max_message`` lowers it further).
BATCH_MAX: Final = 64 * 1024
#: Seconds: a write within this long of the connection's previous one is part of a
#: burst, sent with the rest of the burst by one flush rather than by a send of its own;
#: a write after a longer gap, on an idle queue, is sent at once, and so is a write that
#: answers the peer (it sent application frames since: a reply, an echo, a ping-pong;
#: on a machine where a round trip takes less than the gap, each answer would otherwise
#: wait for a flush on the I/O thread).  Both layers follow it through
#: :meth:`SendQueue.quiet` and :meth:`SendQueue.opens_burst` (measured: a coroutine
#: writing small values in a loop reached 50-58k values/s with a send per value).
BURST_GAP: Final = 50e-6
#: A thread that blocks for a value (``wait()``, a subscription's ``get()``) within this
#: many seconds of its side's last write, with no application frame from the peer
#: since, most likely waits for the answer to that write (:meth:`SendQueue.owed`): the
#: threaded layer then polls the socket for up to ``Endpoint.spin`` before it sleeps,
#: as a request does.  Longer after a write, a value is not taken to be an answer.
ANSWER_WINDOW: Final = 1e-3
#: Item bytes framed at a time (a few BATCH frames): the flusher frames the next ones
#: only once these went to the socket, so a full queue of small items is never copied
#: into frames all at once (measured: a million writes to a slow peer peaked at 2.5x
#: ``max_buffer`` of RSS when the whole inbox was framed in one go).
WIRE_CHUNK: Final = 256 * 1024
#: The replay window (resume) is never smaller than this.  A peer owes a RACK once 32
#: sequenced frames, or 256 KiB of them (``session.ACK_EVERY``, ``ACK_BYTES``; a
#: Python peer counts headers, channel names and meta, one that follows the older text
#: of protocol.md meta only), or a frame with a data section arrived since its last
#: one.  So a window this full (counting whole frames) always gets one, and flow
#: control on it never waits for ever.  Twice 256 KiB: the sender goes on while that
#: RACK travels (measured, 1 KB values, ``max_buffer`` 64 KiB: 285 MB/s, as without
#: flow control; 239-265 MB/s with a 256.5 KiB window).
WINDOW_MIN: Final = 2 * 256 * 1024 + 32 * frames.HEADER_SIZE
#: Memory an item takes beyond its bytes until it is framed: the bytes object's header
#: and allocator rounding (CPython: 33 + up to 15) and its slot in the inbox list.
ITEM_OVERHEAD: Final = 56
#: Items a burst of writes may stage without the lock before a writer takes it.
STAGE_MAX: Final = 64
#: Staging needs the queue this far below ``max_buffer``: room for STAGE_MAX of the
#: largest items, so staged items never take it beyond ``max_buffer``.
STAGE_HEADROOM: Final = STAGE_MAX * (frames.ITEM_MAX + ITEM_OVERHEAD)
#: Pacing (threaded layer; docs/guarantees.md, "Limits"): a thread that writes a value
#: while more than PACE_ABOVE bytes wait unsent in the connection's queue first waits,
#: up to PACE_WAIT seconds, for the flush to take the queue down to PACE_BELOW.  A
#: writer far ahead of its I/O thread sends nothing sooner, and its queue's memory is
#: always fresh pages, which every thread sharing the interpreter lock pays for
#: (measured, a million small writes in one process, compiled build: 0.06 page faults
#: per message and 300 MB RSS unpaced, 1.6M msgs/s; paced at 4 MiB 2.2M msgs/s).  Not
#: lower: the queue of a writer that merely outruns its I/O thread between two switches
#: of the interpreter lock (5 ms) reaches 1-5 MiB, and pacing that writer costs it
#: (2 processes, interpreted: -11 % paced at 2 MiB, none at 4 MiB).  A wait during which
#: no byte left marks the peer stalled: no pacing until bytes leave again, so a writer
#: to a peer that stopped reading queues up to ``max_buffer`` as before.
PACE_ABOVE: Final = 4 * 1024 * 1024
PACE_BELOW: Final = 2 * 1024 * 1024
PACE_WAIT: Final = 0.01


def values_size(encoded: frames.EncodedValues) -> int:
    """What a ``write_many``'s values count against ``max_buffer``: each BATCH item
    its bytes plus :data:`ITEM_OVERHEAD`, each DATA frame its size."""
    if not encoded.frames:
        return sum(map(len, encoded)) + ITEM_OVERHEAD * len(encoded)  # items only: in C
    total = 0
    for value in encoded:
        total += len(value) + ITEM_OVERHEAD if type(value) is bytes else value[1]
    return total


_pack_header: Final = frames.HEADER.pack
_unpack_header: Final = frames.HEADER.unpack_from
_FLAG_SHM: Final = frames.FLAG_SHM
_NOT_SHM: Final = frames.FLAG_COMPRESSED | frames.FLAG_SHM
_BATCH: Final = frames.BATCH
_DATA: Final = frames.DATA
#: The frame types a session numbers: values only, or (``"rq"``) requests, replies,
#: SYNC and ACK too.
SEQ_VALUES: Final = frozenset((frames.DATA, frames.BATCH))
SEQ_ALL: Final = SEQ_VALUES | {
    frames.REQUEST,
    frames.REPLY,
    frames.REPLY_ERROR,
    frames.SYNC,
    frames.ACK,
}
_U32: Final = 0xFFFFFFFF
#: Entries framed per step: a window of items only is sized, split and joined in C.
_WINDOW: Final = 512


def _nones(n: int) -> List[None]:
    return [None] * n


#: Frames that only make sense on the link they were made for (see take_over).
_LINK_ONLY: Final = frozenset((frames.RACK, frames.PING, frames.PONG))


def _link_only(data: Buffer) -> bool:
    """``data`` (one queued buffer) holds link-level frames: RACK, PING or PONG."""
    return len(data) >= frames.HEADER_SIZE and data[0] in _LINK_ONLY


def _link_only_entry(entry: Any) -> bool:
    """An inbox entry (a frame's parts) that holds link-level frames only."""
    return len(entry) == 1 and _link_only(entry[0])


def skip_frame(count: int) -> bytes:
    """A SKIP frame standing for ``count`` sequence numbers (1 <= count < 2**32)."""
    return _pack_header(frames.SKIP, 0, 0, count, 0, 0)


def rack_frame(count: int) -> bytes:
    """A RACK frame: "I received ``count`` sequenced frames" (sent modulo 2**32)."""
    return _pack_header(frames.RACK, 0, 0, count & _U32, 0, 0)


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
        "_taken",
        "_taken_at",
        "_slots",
        "_full_since",
        "_on_image",
        "numbered",
        "sequenced",
        "seq",
        "acked",
        "replay_bytes",
        "replay_overflow",
        "window",
        "held_back",
        "_links",
        "_replay",
        "_replay_images",
        "framing",
        "shm",
        "staged",
        "stage_below",
        "_stage_lock",
        "last_write",
        "answering",
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
        # Entries taken from the inbox, framed from ``_taken_at`` on (the flusher's).
        self._taken: List[_Entry] = []
        self._taken_at = 0
        self._slots: Dict[str, _Slot] = {}
        self._full_since: Optional[float] = None
        self._on_image = on_image
        #: Number sequenced frames and keep them for a resume (protocol 1.2).
        self.numbered = False
        #: The frame types numbered when :attr:`numbered` (a frame pushed alone).
        self.sequenced = SEQ_VALUES
        #: Sequenced frames handed to the wire so far (the last number given).
        self.seq = 0
        #: Sequenced frames the peer acknowledged (RACK), ``<= seq``.
        self.acked = 0
        #: Bytes held in the replay buffer.
        self.replay_bytes = 0
        #: Unacknowledged frames pushed out of the replay buffer (by the safety net,
        #: :meth:`_bound`; flow control keeps this at 0).
        self.replay_overflow = 0
        #: Bytes the replay buffer may hold (flow control, see "Resume" above).
        self.window = max(max_buffer, WINDOW_MIN)
        #: :meth:`take_inbox` left entries in the inbox for want of room in the
        #: window: the I/O layer flushes again once a RACK arrived.
        self.held_back = False
        # Link-level frames pushed since the inbox was last taken (so a held-back
        # inbox is searched for them only when there are some).
        self._links = 0
        # [seq, parts or None (a superseded image: a placeholder), nbytes, image channel]
        self._replay: Deque[List[Any]] = deque()
        self._replay_images: Dict[str, List[Any]] = {}
        #: Entries were taken by :meth:`take_inbox` and :meth:`to_wire` has not placed
        #: them yet (a threaded flusher frames them without the lock).
        self.framing = False
        #: Set when the handshake negotiated shared memory: large DATA frames leave
        #: as descriptors (see :meth:`to_wire`).
        self.shm: Optional[ShmWriter] = None
        #: Items appended without the lock (see "Staging" above), not counted yet.
        self.staged: List[bytes] = []
        #: A writer may stage an item while fewer than STAGE_MAX are staged and at most
        #: this many bytes are queued (read without the lock: a racing writer may stage
        #: one more, still within ``max_buffer``).  Negative: never.
        self.stage_below = max_buffer - STAGE_HEADROOM
        self._stage_lock = threading.Lock()
        #: When a write last went to the wire at once, or a burst's flush began
        #: (monotonic seconds; the burst rule, :data:`BURST_GAP`).
        self.last_write = 0.0
        #: The peer sent application frames since this side's last write went out at
        #: once or opened a burst (set by :meth:`ConnectionEngine.events`): a write now
        #: answers it, and goes at once even within :data:`BURST_GAP`.
        self.answering = False

    # -- the burst rule (both I/O layers) -----------------------------------------------

    def quiet(self, now: float) -> bool:
        """True when a write now goes to the wire at once, from the writer: nothing
        was written for longer than :data:`BURST_GAP` before ``now``, or the peer sent
        something since (:attr:`answering`: a reply, an echo, the next request of a
        ping-pong).  Otherwise it joins the burst, which one flush sends."""
        return self.answering or now - self.last_write > BURST_GAP

    def owed(self, now: float) -> bool:
        """True when the peer owes this side an answer: this side's last write (one
        sent at once, a burst's first or its flush: :attr:`last_write`) was at most
        :data:`ANSWER_WINDOW` before ``now``, and the peer sent no application frame
        since this side last wrote (:attr:`answering` is False)."""
        return not self.answering and now - self.last_write <= ANSWER_WINDOW

    def wrote(self, now: float) -> None:
        """Stamp a writer's own write at ``now``: one that went to the wire at once, or
        a ``write_many`` batch (sent at once on an idle link, else with the flush that
        is due).  Either way it answers what the peer sent; a flush on the I/O thread
        stamps :attr:`last_write` alone."""
        self.last_write = now
        self.answering = False

    def opens_burst(self, now: float) -> bool:
        """Stamp a write at ``now``: True if it is :meth:`quiet` (send it at once),
        False if it belongs to the current burst (leave it to the flush)."""
        quiet = self.quiet(now)
        self.wrote(now)
        return quiet

    def __bool__(self) -> bool:
        if self.staged:
            return True
        return bool(self._inbox) or bool(self._wire) or self._taken_at < len(self._taken)

    def unstage(self) -> None:
        """Move the staged items to the end of the inbox, counted (under the lock).
        Writers may go on appending meanwhile: exactly the items there now move."""
        staged = self.staged
        with self._stage_lock:  # against unstage_own (a closed link's writer)
            n = len(staged)
            # The first n: writers only append (to the end) meanwhile.
            items = staged[:n]
            del staged[:n]
        if n:
            self._inbox.extend(items)
            self.queued += sum(map(len, items)) + ITEM_OVERHEAD * n

    def unstage_own(self, item: bytes) -> bool:
        """A writer's staged ``item`` is taken back (its link closed meanwhile): True if
        it was still staged (now removed: the writer sends it as if never staged),
        False if a flush or :meth:`take_over` took it already.

        Safe against :meth:`unstage` from another thread (the next link taking this
        queue over) and against writers appending: the search runs on a snapshot
        (``list()`` of a list is one step), and appends never move earlier entries."""
        staged = self.staged
        with self._stage_lock:
            for i, entry in enumerate(list(staged)):
                if entry is item:
                    del staged[i]
                    return True
        return False

    # -- writers (the inbox) ----------------------------------------------------------

    def fits(self, nbytes: int, extra: int = 0) -> bool:
        """May a frame of ``nbytes`` be queued now?  ``extra``: bytes the I/O layer
        holds beyond this queue (the asyncio transport's buffer)."""
        if self.staged:
            self.unstage()
        total = self.queued + extra
        return not total or total + nbytes <= self.max_buffer

    def waiting_image(self, channel: str) -> bool:
        """An image frame of ``channel`` waits, replaceable: a new one takes its place
        (and needs no room of its own beyond the size difference)."""
        return channel in self._slots

    def keep(self, parts: Any, nbytes: int, image: Optional[str] = None) -> bool:
        """A client's outbox while it reconnects: queue a write if there is room for it
        (a BATCH item as ``bytes``, else a frame's parts), or if it is an image that
        replaces a waiting one.  False: nothing queued, the writer waits for room."""
        if not self.fits(nbytes) and not (image is not None and image in self._slots):
            return False
        if type(parts) is bytes:
            self.push_item(parts)
        else:
            self.push(list(parts), nbytes, image)
        return True

    def full_error(self, where: str) -> WriteTimeout:
        """The error of a write that found no room in the outbox within its timeout."""
        return WriteTimeout(
            f"not connected to {where} (reconnecting); {self.queued} bytes already wait "
            f"to be sent (max_buffer={self.max_buffer}): the write was not kept"
        )

    def push_values(self, encoded: frames.EncodedValues, nbytes: int) -> None:
        """Queue a ``write_many``'s values in order (BATCH items and DATA frames, as
        :func:`frames.value_item` encoded them); ``nbytes`` is their
        :func:`values_size`."""
        if self.staged:
            self.unstage()
        inbox = self._inbox
        if not encoded.frames:
            inbox.extend(encoded)  # items only (the common case): in C
        else:
            for value in encoded:
                inbox.append(value if type(value) is bytes else value[0])
        self.queued += nbytes

    def push_item(self, item: bytes) -> None:
        """Queue a small DATA value as a BATCH item (see :func:`frames.value_item`)."""
        if self.staged:
            self.unstage()
        self._inbox.append(item)
        self.queued += len(item) + ITEM_OVERHEAD

    def offer_item(self, item: bytes) -> bool:
        """:meth:`push_item` if the item :meth:`fits` now (one call on the writer's
        fast path); False, nothing queued, if it does not."""
        if self.staged:
            self.unstage()
        cost = len(item) + ITEM_OVERHEAD
        total = self.queued
        if total and total + cost > self.max_buffer:
            return False
        self._inbox.append(item)
        self.queued = total + cost
        return True

    def push_items(self, items: List[bytes], nbytes: int) -> None:
        """Queue many small DATA values as BATCH items, in order; ``nbytes``: their
        bytes plus :data:`ITEM_OVERHEAD` each (a host's run of broadcasts)."""
        if self.staged:
            self.unstage()
        self._inbox.extend(items)
        self.queued += nbytes

    def offer_items(self, items: List[bytes], nbytes: int) -> bool:
        """:meth:`push_items` if they :meth:`fits` now; False, nothing queued, if not."""
        if not self.fits(nbytes):
            return False
        self._inbox.extend(items)
        self.queued += nbytes
        return True

    def push(self, parts: List[Buffer], nbytes: int, image: Optional[str] = None) -> bool:
        """Queue a frame's parts; an image frame (``image`` = its channel) replaces a
        waiting one on the same channel.  Returns False if it replaced one."""
        if self.staged:
            self.unstage()
        if image is None:
            self._inbox.append(parts)
            self.queued += nbytes
            if _link_only_entry(parts):
                self._links += 1
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

    def _idle(self) -> bool:
        """Nothing in the inbox or staged, nothing taken and left unframed, no wire
        buffers, no framing under way: a frame pushed now would leave first."""
        return not (self._inbox or self.staged or self._wire or self._taken or self.framing)

    def push_direct(self, parts: List[Buffer], nbytes: int) -> bool:
        """A lone frame on an idle queue goes straight to the wire buffers: what
        :meth:`push`, :meth:`take_inbox` and :meth:`to_wire` would do with it, in one
        step (a request, or its reply, on a quiet link).  Not for image frames
        (conflation needs the inbox).

        Idle means nothing in the inbox or staged, nothing taken and left unframed,
        no wire buffers, no framing under way, and (numbered) room for the frame in
        the replay window.  Returns False, having done nothing, when the queue is not
        idle, or for a frame with data sections when shared memory was negotiated:
        :meth:`push` the frame then.  (Moving data into shared memory copies it and
        may wait for a free slot; the threaded flusher does that outside its lock, in
        :meth:`to_wire`, and so must this.)"""
        if not self._idle():
            return False
        if self.shm is not None and len(parts) > 1:
            return False
        if self.numbered:
            if self.replay_bytes + self.queued + nbytes > self.window:
                return False  # flow control decides: take_inbox
            self._prune()
            if parts[0][0] in self.sequenced:
                self._keep(parts, None)
                self._bound()
        self.queued += nbytes
        self._wire.extend(parts)
        return True

    def push_item_direct(self, item: bytes) -> bool:
        """:meth:`push_direct` for a BATCH item: alone, it leaves as the DATA frame
        :meth:`to_wire` makes of a run of one.  For a writer about to send at once
        (an idle link); in a burst, items wait in the inbox to be batched."""
        if not self._idle():
            return False
        frame = frames.item_frame(item)
        return self.push_direct([frame], len(frame))

    def slow_consumer(self, nbytes: int, now: float, timeout: float, extra: int = 0) -> bool:
        """Broadcast verdict: True if the peer must be dropped as a slow consumer
        rather than be given ``nbytes`` more (it stayed above ``max_buffer`` for more
        than ``timeout`` s, or would exceed twice ``max_buffer``)."""
        if self.staged:
            self.unstage()
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

    @property
    def unframed(self) -> bool:
        """Taken entries are still to be framed: :meth:`to_wire` (with no new
        entries) frames the next ones; the inbox is not taken before."""
        return self._taken_at < len(self._taken)

    def push_wire(self, data: bytes) -> None:
        """Protocol bytes (the WELCOME) straight onto the wire buffers, ahead of
        everything queued later and of a previous link's queue (:meth:`take_over`)."""
        self._wire.append(data)
        self.queued += len(data)

    def take_inbox(self) -> List[_Entry]:
        """Everything pushed so far, in order; from now on it is being sent (image
        slots can no longer be replaced).  O(1)."""
        if self.staged:
            self.unstage()
        inbox = self._inbox
        if not inbox:
            return inbox
        if self.numbered and self.replay_bytes + self.queued > self.window:
            return self._take_within_window()
        self.held_back = False
        self._links = 0
        self.framing = True
        self._inbox = []
        if self._slots:
            self._release_slots(None)
        return inbox

    def _release_slots(self, taken: Optional[List[_Entry]]) -> None:
        """The image frames of ``taken`` (``None``: every waiting one) are being sent:
        a newer frame on their channel no longer replaces them; tell the hook."""
        slots = self._slots
        released: Iterable[_Slot]
        if taken is None:
            self._slots = {}
            released = slots.values()
        else:
            released = [e for e in taken if type(e) is _Slot and slots.get(e.channel) is e]
            for slot in released:
                del slots[slot.channel]
        hook = self._on_image
        if hook is not None:
            for slot in released:
                hook(slot.channel, slot.nbytes)

    def _take_within_window(self) -> List[_Entry]:
        """:meth:`take_inbox` near a full replay window.

        While the replay buffer holds less than :attr:`window` bytes, the head of the
        inbox up to the entry that fills it (sizes as :meth:`push` counted them, at
        least what the frames will take).  Once it holds :attr:`window` bytes or more,
        no value leaves until RACKs make room; the peer owes one by then (see
        :data:`WINDOW_MIN`).  Link-level frames behind held-back values go at once,
        in order: they carry no number, and the peer's window may wait for this
        side's RACKs."""
        self._prune()
        inbox = self._inbox
        room = self.window - self.replay_bytes
        end = len(inbox)
        i = 0
        while i < end and room > 0:
            entry = inbox[i]
            kind = type(entry)
            if kind is bytes:
                room -= len(entry) + ITEM_OVERHEAD  # type: ignore[arg-type]
            elif kind is list:
                if not _link_only_entry(entry):
                    room -= sum(map(len, entry))  # type: ignore[arg-type]
            else:
                room -= entry.nbytes  # type: ignore[union-attr]
            i += 1
        rest: List[_Entry] = []
        if i == end:
            taken = inbox
        elif not self._links:
            taken, rest = inbox[:i], inbox[i:]
        else:
            taken = inbox[:i]
            for entry in inbox[i:]:
                if type(entry) is list and _link_only_entry(entry):
                    taken.append(entry)
                else:
                    rest.append(entry)
        self._links = 0
        self.held_back = bool(rest)
        self._inbox = rest
        if self._slots:
            self._release_slots(taken)
        if taken:
            self.framing = True
        return taken

    def to_wire(self, entries: List[_Entry]) -> None:
        """Turn taken entries into wire buffers, in order: a run of items becomes one
        BATCH frame (or, for a peer that reads none, one DATA frame each).

        Without numbering, frames about :data:`WIRE_CHUNK` bytes of items at a time;
        the rest waits (:attr:`unframed`) until called again, with ``entries`` empty.
        With numbering (resume), frames them all at once, each DATA / BATCH frame
        getting the next sequence number and a place in the replay buffer."""
        try:
            self._to_wire(entries)
        finally:
            self.framing = False

    def _to_wire(self, entries: List[_Entry]) -> None:
        if entries:
            if self.unframed:
                raise RuntimeError("to_wire: taken entries are still unframed (call with [])")
            self._taken = entries
            self._taken_at = 0
        entries = self._taken
        start = self._taken_at
        end = len(entries)
        numbered = self.numbered
        if numbered:
            self._prune()
        limit = self.batch_limit
        budget = WIRE_CHUNK  # numbered: no limit, a resume finds all in the replay buffer
        i = start
        while i < end:
            if type(entries[i]) is not bytes:
                # A frame or an image slot: on its own.
                i, budget = self._entries_to_wire(entries, i, i + 1, budget)
                continue
            j = i + _WINDOW if i + _WINDOW < end else end
            if limit:
                # The common case, a window of items only, in C: sizes, split, join.
                window = entries[i:j]
                try:
                    total = sum(map(len, window))  # type: ignore[arg-type]
                    if total > limit:
                        ends = list(accumulate(map(len, window)))  # type: ignore[arg-type]
                        k = bisect_right(ends, limit) or 1
                        del window[k:]
                        total = ends[k - 1]
                        j = i + k
                    body = b"".join(window)  # type: ignore[arg-type]
                except TypeError:
                    pass  # a frame or an image slot after them: entry by entry, below
                else:
                    entries[i:j] = _nones(j - i)  # type: ignore[assignment]  # framed: not kept twice
                    i = j
                    self._put_run(window, total, body)  # type: ignore[arg-type]
                    budget -= total
                    if budget <= 0 and not numbered:
                        break
                    continue
            i, budget = self._entries_to_wire(entries, i, j, budget)
            if budget <= 0 and not numbered:
                break
        if i < end:
            self._taken_at = i
        else:
            self._taken = []
            self._taken_at = 0
        if numbered:
            self._bound()

    def _entries_to_wire(
        self, entries: List[_Entry], i: int, end: int, budget: int
    ) -> Tuple[int, int]:
        """Frame ``entries[i:end]`` one by one (runs of items as BATCH frames) until
        ``budget`` item bytes are framed (unnumbered queues); return where it stopped
        and the budget left."""
        numbered = self.numbered
        wire = self._wire
        limit = self.batch_limit
        run: List[bytes] = []
        size = 0
        while i < end:
            entry = entries[i]
            entries[i] = None  # type: ignore[call-overload]  # framed: not kept twice
            i += 1
            kind = type(entry)
            if kind is bytes:
                n = len(entry)  # type: ignore[arg-type]
                if run and size + n > limit:
                    self._put_run(run, size)
                    run, size = [], 0
                run.append(entry)  # type: ignore[arg-type]
                size += n
                budget -= n
                if budget <= 0 and not numbered:
                    break
                continue
            if run:
                self._put_run(run, size)
                run, size = [], 0
            if kind is list:
                parts: List[Buffer] = entry  # type: ignore[assignment]
                if numbered and parts[0][0] in self.sequenced:
                    self._keep(parts, None)  # the original: a replay goes by the socket
            else:
                slot: _Slot = entry  # type: ignore[assignment]
                parts = slot.parts
                if numbered:
                    self._keep(parts, slot.channel)
            if self.shm is not None and len(parts) > 1:
                parts = self._through_shm(parts)
            wire.extend(parts)
        if run:
            self._put_run(run, size)
        return i, budget

    def _keep(self, parts: List[Buffer], image: Optional[str]) -> None:
        """Number a frame and keep it for a resume (``image``: its conflated channel;
        the previous frame of that channel becomes a placeholder)."""
        self.seq += 1
        nbytes = sum(map(len, parts))
        record = [self.seq, parts, nbytes, image]
        if image is not None:
            older = self._replay_images.get(image)
            if older is not None and older[1] is not None:
                self.replay_bytes -= older[2]
                older[1] = None
                older[2] = 0
            self._replay_images[image] = record
        self._replay.append(record)
        self.replay_bytes += nbytes

    def _bound(self) -> None:
        """A safety net: the oldest frames leave the replay buffer (lost if the link then
        dies) while it holds more than :attr:`window` bytes before its newest frame.
        Flow control (:meth:`take_inbox`) never lets it get there: it stops taking
        once the entry just taken reaches the window."""
        replay = self._replay
        while len(replay) > 1 and self.replay_bytes - replay[-1][2] > self.window:
            record = replay.popleft()
            self.replay_bytes -= record[2]
            self.replay_overflow += 1
            self._forget_image(record)

    def _forget_image(self, record: List[Any]) -> None:
        image = record[3]
        if image is not None and self._replay_images.get(image) is record:
            del self._replay_images[image]

    def _prune(self) -> None:
        """Drop acknowledged frames from the replay buffer."""
        replay = self._replay
        acked = self.acked
        while replay and replay[0][0] <= acked:
            record = replay.popleft()
            self.replay_bytes -= record[2]
            self._forget_image(record)

    def ack(self, wire_count: int) -> None:
        """The peer acknowledged sequenced frames up to ``wire_count`` (a RACK's id:
        the count modulo 2**32).  Only records the count (any thread may call it
        while the flusher works); acknowledged frames leave the replay buffer at the
        next :meth:`to_wire` or :meth:`rewind`.  Raises :class:`ProtocolError` for a
        count beyond what was sent."""
        acked = self.acked
        full = acked + ((wire_count - acked) & _U32)
        if full > self.seq:
            raise ProtocolError(
                f"the peer acknowledged {full} sequenced frames, only {self.seq} were sent"
            )
        self.acked = full

    def detach(self) -> None:
        """The link died: drop the wire buffers (half-sent frames are in the replay
        buffer when numbered); the inbox and the replay buffer stay."""
        wire = self._wire
        if wire:
            self.queued -= sum(map(len, wire))
            wire.clear()
        self._full_since = None

    def rewind(self, peer_recv: int) -> int:
        """Resume: the peer has received ``peer_recv`` sequenced frames; put every
        later one on the wire again, first (a SKIP frame for numbers that left the
        replay buffer, or for superseded images).  Returns how many frames are lost
        (they left the replay buffer unacknowledged).  Call after :meth:`detach`.

        Raises :class:`ProtocolError` if ``peer_recv`` is not between what the peer
        acknowledged and what was sent."""
        if not self.acked <= peer_recv <= self.seq:
            raise ProtocolError(
                f"the peer says it received {peer_recv} sequenced frames; it acknowledged "
                f"{self.acked} and {self.seq} were sent: not a session this side knows"
            )
        self.acked = peer_recv
        self._prune()
        replay = self._replay
        first = replay[0][0] if replay else self.seq + 1
        lost = first - 1 - peer_recv
        out: List[Buffer] = []
        skipped = lost
        for record in replay:
            if record[1] is None:
                skipped += 1
                continue
            if skipped:
                out.append(skip_frame(skipped))
                skipped = 0
            out.extend(record[1])
        if skipped:
            out.append(skip_frame(skipped))
        if out:
            self.queued += sum(map(len, out))
            self._wire.extend(out)
        return lost

    def restart(self) -> int:
        """The peer has no session any more (a new one starts at 0): every frame in
        the replay buffer goes back to the head of the inbox, to be sent and numbered
        again (at least once: the peer may have some of them).  Returns how many
        frames had left the replay buffer unacknowledged (lost)."""
        self._prune()
        lost = self.replay_overflow
        back: List[_Entry] = []
        for record in self._replay:
            if record[1] is not None:
                back.append(record[1])
                self.queued += record[2]
        self._replay.clear()
        self._replay_images.clear()
        self.replay_bytes = 0
        self.seq = self.acked = 0
        self.replay_overflow = 0
        if back:
            self._inbox = back + self._inbox
        return lost

    def take_over(self, old: SendQueue) -> None:
        """Move everything ``old`` holds (wire, inbox, image slots, numbering, replay
        buffer) behind what this queue already holds (the new connection's handshake
        bytes): the previous link's queue continues on this one.  ``old`` is left
        empty."""
        if old.staged:
            old.unstage()
        self._wire.extend(old._wire)
        # Entries the old queue took but had not framed yet come first.
        untaken = [e for e in old._taken[old._taken_at :] if e is not None]
        old._taken = []
        old._taken_at = 0
        # Link-level frames still waiting (a RACK, a PING or PONG) belong to the old
        # link: a RACK's count would be stale on the new one, behind the count the
        # resume handshake gave, and the peer would take it for a count beyond what it
        # sent (ProtocolError).
        moved: List[_Entry] = []
        dropped = 0
        for entry in untaken + old._inbox:
            if type(entry) is list and _link_only_entry(entry):
                dropped += len(entry[0])
            else:
                moved.append(entry)
        self._inbox = moved + self._inbox
        for channel, slot in old._slots.items():
            self._slots.setdefault(channel, slot)
        self.queued += old.queued - dropped
        self.numbered = old.numbered
        self.sequenced = old.sequenced
        self.seq, self.acked = old.seq, old.acked
        self._replay, old._replay = old._replay, deque()
        self._replay_images, old._replay_images = old._replay_images, {}
        self.replay_bytes, old.replay_bytes = old.replay_bytes, 0
        self.replay_overflow += old.replay_overflow
        self.images_sent += old.images_sent
        self.images_dropped += old.images_dropped
        old._inbox = []
        old._links = 0
        old._wire.clear()
        old._slots = {}
        old.queued = 0
        old.seq = old.acked = 0

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

    def _put_run(self, run: List[bytes], size: int, body: Optional[bytes] = None) -> None:
        """Frame a run of items (``body``: already joined): BATCH when the peer reads
        them and there are two or more, else one DATA frame per item."""
        wire = self._wire
        numbered = self.numbered
        if len(run) > 1 and self.batch_limit:
            # The header is counted as queued bytes too: they leave with the frame.
            self.queued += frames.HEADER_SIZE - ITEM_OVERHEAD * len(run)
            if body is None:
                body = b"".join(run)
            # Header and body stay two buffers (sendmsg takes both): no 64 KiB copy.
            head = _pack_header(_BATCH, 0, 0, 0, size, 0)
            if numbered:
                self._keep([head, body], None)
            wire.append(head)
            wire.append(body)
            return
        for item in run:
            frame = frames.item_frame(item)
            self.queued += len(frame) - len(item) - ITEM_OVERHEAD
            if numbered:
                self._keep([frame], None)
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
        if self._full_since is not None and self.queued <= self.max_buffer:
            # Back under the bound: a later overflow starts a new slow-consumer clock
            # (a broadcast that fits is not asked for a verdict on the threaded layer).
            self._full_since = None
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
        """Every buffer that may leave now, in order: the whole queue, but for values
        the replay window holds back (:attr:`held_back`).  A flusher in one call, for
        sans-I/O use (tests, tools)."""
        while True:
            while self.unframed:
                self.to_wire([])
            entries = self.take_inbox()
            if not entries:
                break
            self.to_wire(entries)
        out = list(self._wire)
        self._wire.clear()
        if self._inbox:  # held back: still counted
            self.queued -= sum(map(len, out))
        else:
            self.queued = 0
        return out

    def absorb(self, other: SendQueue) -> None:
        """Move everything waiting in ``other`` to the end of this queue's inbox,
        image slots still replaceable (a reconnecting client's outbox into its new
        connection).  ``other`` has no wire buffers: it is never flushed."""
        if self.staged:
            self.unstage()
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
        if self.staged:
            self.unstage()
        dropped = self.queued
        self._inbox = []
        self._links = 0
        self._wire.clear()
        self._taken = []
        self._taken_at = 0
        self._slots.clear()
        self.queued = 0
        self._full_since = None
        self._replay.clear()
        self._replay_images.clear()
        self.replay_bytes = 0
        return dropped
