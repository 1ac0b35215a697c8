"""Endpoint state shared by both I/O layers (sans-I/O): retained values, departed
clients, admission, subscriptions' watermarks and the reconnect backoff.

Nothing here waits or touches a socket; the threaded and the asyncio layer keep
their own locks or run on one event loop, and call these for the rules.
"""

from __future__ import annotations

import logging
import random
from collections import OrderedDict, deque
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

from . import frames
from .codec import Buffer, decoded_size, encode
from .errors import ProtocolError
from .limits import BATCH_READ_ABOVE, DEFAULT_MAX_PENDING, RECONNECT_FIRST, SMALL_META

__all__ = [
    "RetainedValues",
    "Departed",
    "Admission",
    "StoredValues",
    "BudgetExceeded",
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

    Values retained for the clients (``retain_relayed``, :meth:`retain` with
    ``relayed=True``) are bounded: at most ``relayed_limit`` bytes of frames together,
    the channel relayed least recently forgotten first (logged).  The application's
    own retained values are not counted.
    """

    def __init__(self, relayed_limit: Optional[int] = None) -> None:
        self._frames: Dict[str, bytes] = {}
        self.relayed_limit = relayed_limit
        self._relayed: Dict[str, int] = {}  # channel -> frame size, least recent first
        self.relayed_bytes = 0
        self.forgotten = 0  # relayed channels forgotten to stay within the limit

    def retain(self, channel: str, parts: List[Buffer], relayed: bool = False) -> None:
        """Keep a snapshot of the DATA frame ``parts`` for ``channel`` (``relayed``: a
        client's value, counted against ``relayed_limit``)."""
        head = bytes(parts[0])
        frame = bytearray(head[:1])
        frame.append(head[1] | frames.FLAG_RETAINED)
        frame += head[2:]
        for part in parts[1:]:
            frame += part
        self._uncount(channel)
        limit = self.relayed_limit
        if relayed and limit is not None:
            if len(frame) > limit:
                self._frames.pop(channel, None)  # an older value would be stale
                self._forgot(channel, f"its value of {len(frame)} bytes alone exceeds it")
                return
            self._relayed[channel] = len(frame)
            self.relayed_bytes += len(frame)
            while self.relayed_bytes > limit:
                oldest = next(iter(self._relayed))
                self._uncount(oldest)
                del self._frames[oldest]
                self._forgot(oldest, "it was relayed least recently")
        self._frames[channel] = bytes(frame)

    def _uncount(self, channel: str) -> None:
        size = self._relayed.pop(channel, None)
        if size is not None:
            self.relayed_bytes -= size

    def _forgot(self, channel: str, why: str) -> None:
        self.forgotten += 1
        n = self.forgotten
        if n & (n - 1) == 0:  # the 1st, 2nd, 4th, 8th...: a steady overflow is not a flood
            logger.warning(
                "relayed values kept for late joiners reached retain_relayed_bytes=%d: "
                "channel %r is no longer kept (%s; %d forgotten so far). Raise "
                "retain_relayed_bytes= on the Host if that is expected",
                self.relayed_limit,
                channel,
                why,
                n,
            )

    def frame(self, channel: str) -> bytes:
        """The retained frame of ``channel`` (``KeyError`` if none)."""
        return self._frames[channel]

    def clear(self, channel: Optional[str] = None) -> None:
        if channel is None:
            self._frames.clear()
            self._relayed.clear()
            self.relayed_bytes = 0
        else:
            self._frames.pop(channel, None)
            self._uncount(channel)

    def replay(self, wants: Optional[Callable[[str], bool]] = None) -> List[bytes]:
        """The frames a new client gets, in order (only the channels ``wants``)."""
        if wants is None:
            return list(self._frames.values())
        return [frame for channel, frame in self._frames.items() if wants(channel)]

    def __contains__(self, channel: object) -> bool:
        return channel in self._frames

    def __len__(self) -> int:
        return len(self._frames)


class Departed(Generic[K, T]):
    """Disconnected clients whose latest values ``get_all`` still reports: at most
    ``keep`` of them and at most ``keep_bytes`` bytes of their values together (the
    oldest forgotten first); a named client that comes back replaces its record.

    :meth:`add` and :meth:`forget_named` return the items forgotten, so that the host
    can forget their values everywhere else too (``get()``).
    """

    def __init__(self, keep: int, keep_bytes: Optional[int] = None) -> None:
        self.keep = keep
        self.keep_bytes = keep_bytes
        self.nbytes = 0
        self._items: OrderedDict[K, Tuple[T, int]] = OrderedDict()

    def add(self, key: K, item: T, nbytes: int = 0) -> List[T]:
        """Remember ``item`` (its values take ``nbytes``); return the items forgotten
        to make room (``item`` itself when it alone is larger than ``keep_bytes``)."""
        if self.keep <= 0:
            return [item]
        self._items[key] = (item, nbytes)
        self.nbytes += nbytes
        forgotten = []
        while len(self._items) > self.keep or (
            self.keep_bytes is not None and self.nbytes > self.keep_bytes
        ):
            _, (old, size) = self._items.popitem(last=False)
            self.nbytes -= size
            forgotten.append(old)
        return forgotten

    def forget_named(self, name: Optional[str]) -> List[T]:
        """A client named ``name`` reconnected: drop its departed records."""
        if name is None:
            return []
        forgotten = []
        for key, (old, size) in list(self._items.items()):
            if getattr(old, "name", None) == name:
                del self._items[key]
                self.nbytes -= size
                forgotten.append(old)
        return forgotten

    def items(self) -> List[Tuple[K, T]]:
        return [(key, item) for key, (item, _) in self._items.items()]

    def __len__(self) -> int:
        return len(self._items)


def forget_latest(latest: Dict[str, Any], values: Dict[str, Any]) -> None:
    """A connection's values are forgotten: so are the endpoint's latest values that
    are still exactly those (a newer value from another peer is kept)."""
    for channel, value in values.items():
        if latest.get(channel) is value:
            del latest[channel]


def value_size(value: Any) -> int:
    """About the bytes ``value`` took on the wire, from the decoded value: for an I/O
    layer that does not hand the frame's size to the endpoint.  Exact enough for
    bytes, str and arrays (their length); 8 bytes per number and per container item."""
    total = 0
    stack = [value]
    while stack:
        item = stack.pop()
        t = type(item)
        if t is bytes or t is str or t is bytearray:
            total += len(item) + 5
        elif t is list or t is tuple:
            total += 5
            stack.extend(item)
        elif t is dict:
            total += 5
            stack.extend(item.keys())
            stack.extend(item.values())
        else:
            nbytes = getattr(item, "nbytes", None)
            total += nbytes + 32 if type(nbytes) is int else 9
    return total


class StoredValues:
    """What one connection's latest values cost the host, and its two budgets.

    Each channel's latest value is counted at its size on the wire (channel name,
    msgpack metadata and raw array bytes), except that a value whose metadata is larger
    than :data:`~socketengine.limits.SMALL_META` bytes counts at what decoding it takes
    in Python objects when that is more (:func:`~socketengine.codec.decoded_size`: an
    empty list is one byte on the wire and 72 in memory), once the peer's values take
    more than :attr:`read_above` bytes (before that, even values that take ~112 times
    their wire size in memory cannot take more than ``max_stored``).  A new value on a
    channel replaces the old one's count.  :meth:`store_frame` raises
    :class:`ProtocolError` (the connection is then closed and logged) when the peer
    would hold more than ``max_channels`` distinct channels or ``max_stored`` bytes.
    """

    __slots__ = ("max_channels", "max_stored", "read_above", "sizes", "nbytes")

    def __init__(self, max_channels: int, max_stored: int) -> None:
        self.max_channels = max_channels
        self.max_stored = max_stored
        #: Large values are read before they are decoded once the peer's values would
        #: take more than this (``max_stored / 128``).
        self.read_above = max_stored >> 7
        self.sizes: Dict[str, int] = {}
        self.nbytes = 0

    def store_frame(self, channel: str, meta: Buffer, data: Optional[Buffer]) -> None:
        """Account a DATA value on ``channel``, from its msgpack ``meta`` and its data
        section ``data``, before it is decoded (a value beyond a budget never is).

        The hot path of every received value: :meth:`store` inlined, and ``meta`` is
        read (:func:`~socketengine.codec.decoded_size`) only when it is larger than
        :data:`SMALL_META` and the peer's values take more than :attr:`read_above`."""
        size = len(meta)
        if size > SMALL_META and self.nbytes + size > self.read_above:
            size = self._decoded(channel, meta, size, data)
        if data is not None:
            size += len(data)
        sizes = self.sizes
        old = sizes.get(channel)
        size += len(channel)
        if old is None:
            if len(sizes) >= self.max_channels:
                raise self._too_many_channels()
            old = 0
        total = self.nbytes - old + size
        if total > self.max_stored:
            raise self._too_many_bytes(total)
        sizes[channel] = size
        self.nbytes = total

    def settle(self) -> None:
        """After storing (a host's budget refuses beforehand: nothing to do)."""

    def store(self, channel: str, size: int) -> None:
        """Account a value of ``size`` bytes on ``channel`` (before storing it)."""
        sizes = self.sizes
        old = sizes.get(channel)
        size += len(channel)
        if old is None:
            if len(sizes) >= self.max_channels:
                raise self._too_many_channels()
            old = 0
        total = self.nbytes - old + size
        if total > self.max_stored:
            raise self._too_many_bytes(total)
        sizes[channel] = size
        self.nbytes = total

    def _decoded(self, channel: str, meta: Buffer, size: int, data: Optional[Buffer]) -> int:
        """What a value with a large ``meta`` counts: the larger of its wire size and
        what decoding ``meta`` takes, read only as far as the budget left allows."""
        old = self.sizes.get(channel)
        if old is None and len(self.sizes) >= self.max_channels:
            return size  # refused for max_channels
        left = self.max_stored - self.nbytes + (old or 0) - len(channel)
        if data is not None:
            left -= len(data)
        decoded = decoded_size(meta, left)
        if decoded > left:
            raise ProtocolError(
                f"the peer's value on {channel!r} ({size} bytes of msgpack) would take "
                f"more than the {max(left, 0)} bytes left of max_stored={self.max_stored} "
                "once decoded (raise max_stored= on the Host if that is expected)"
            )
        return max(size, decoded)

    def _too_many_channels(self) -> ProtocolError:
        return ProtocolError(
            f"the peer wrote on more than max_channels={self.max_channels} distinct "
            "channels; the host keeps a latest value per channel and client "
            "(raise max_channels= on the Host if that is expected)"
        )

    def _too_many_bytes(self, total: int) -> ProtocolError:
        return ProtocolError(
            f"the peer's latest values would take {total} bytes, more than "
            f"max_stored={self.max_stored} (raise max_stored= on the Host if that is "
            "expected)"
        )

    def check_batch(self, body: Buffer) -> None:
        """Before a BATCH frame's ``body`` is decoded: one larger than
        :data:`~socketengine.limits.BATCH_READ_ABOVE` is read first
        (:func:`~socketengine.codec.decoded_size`, up to ``max_stored``) and refused with
        :class:`ProtocolError` if its Python objects would take more than ``max_stored``
        (tiny items take up to ~112 times their wire size; only the last value of each
        channel is kept, but a receiver that watches values decodes them all at once).
        For a host and a client alike: no budget allows that much, so the connection is
        closed."""
        size = len(body)
        if size <= BATCH_READ_ABOVE:
            return
        decoded = decoded_size(body, self.max_stored)
        if decoded > self.max_stored:
            raise ProtocolError(
                f"the peer's BATCH frame ({size} bytes of msgpack) would take more than "
                f"max_stored={self.max_stored} bytes once decoded; it is not decoded (send "
                "values this large as DATA frames, or raise max_stored=)"
            )

    def store_last(self, last: Dict[str, Any]) -> bool:
        """Account the last values of a BATCH frame's channels (``{channel: value}``),
        the only ones that stay stored, if the whole batch fits the budgets; True
        then.  False, with nothing accounted, when it does not: the caller must account
        the items one by one (:meth:`store_items`)."""
        sizes = self.sizes
        total = self.nbytes
        new = 0
        counted = []
        read_above = self.read_above
        for channel, value in last.items():
            size = value_size(value)
            if size > SMALL_META and total + size > read_above:
                size = item_size(value, size)
            size += len(channel)
            old = sizes.get(channel)
            if old is None:
                new += 1
                old = 0
            total += size - old
            counted.append(size)
        if len(sizes) + new <= self.max_channels and total <= self.max_stored:
            sizes.update(zip(last, counted))
            self.nbytes = total
            return True
        return False

    def store_items(self, items: List[Any]) -> Optional[Dict[str, Any]]:
        """Account a BATCH frame's items (flat ``[channel, value, ...]``) before storing
        them.  Only the last value of each channel stays stored, so when the whole batch
        fits only it is counted (at :func:`item_size`): the same final total as storing
        the items one by one, for one size estimate per channel instead of one per item
        (a burst on one channel is hundreds of items).  Returns those last values then,
        ``{channel: value}`` in the order the channels first appear (what storing the
        items one by one leaves: a caller with nobody watching stores them in bulk);
        ``None`` when the items were accounted one by one.

        When it does not fit, the items are accounted one by one, as separate DATA
        frames would be, and :class:`BudgetExceeded` is raised at the first item beyond
        a budget; its ``accepted`` says how many of ``items`` (flat entries) came before
        it.  The caller stores those, then closes the connection: batching is invisible
        to the writer, so what it wrote before the offending value is kept."""
        last = dict(zip(items[0::2], items[1::2]))
        if self.store_last(last):
            return last
        store = self.store
        read_above = self.read_above
        for i in range(0, len(items), 2):
            try:
                size = value_size(items[i + 1])
                if size > SMALL_META and self.nbytes + size > read_above:
                    size = item_size(items[i + 1], size)
                store(items[i], size)
            except ProtocolError as exc:
                raise BudgetExceeded(str(exc), i) from None
        return None


class KeptValues(StoredValues):
    """A client's latest values from its host, counted like a host counts a client's
    (:class:`StoredValues`: wire size, a large value at its decoded size;
    ``max_channels`` / ``max_stored``) but with another outcome.  The host is not at
    fault when its values exceed the budget (a relaying host forwards what its other
    clients write), so nothing is refused or closed (but a BATCH body that is not safe
    to decode, :meth:`StoredValues.check_batch`): :meth:`store` and
    :meth:`store_frame` only count, and :meth:`settle`, once the values are stored,
    forgets the channels that arrived first until the budget holds again (WARNING
    naming the limit at the 1st, 2nd, 4th, 8th... channel forgotten).  The newest value
    is never forgotten, even alone beyond ``max_stored``.

    ``tables`` are the dicts a forgotten channel leaves (the endpoint's latest values,
    the connection's values, stamps, senders, image files); the layer sets them for
    each new connection.
    """

    __slots__ = ("tables", "forgotten")

    def __init__(self, max_channels: int, max_stored: int) -> None:
        super().__init__(max_channels, max_stored)
        self.tables: Tuple[Dict[str, Any], ...] = ()
        self.forgotten = 0

    def store(self, channel: str, size: int) -> None:
        """Count a value of ``size`` wire bytes on ``channel``: never raises."""
        sizes = self.sizes
        size += len(channel)
        self.nbytes += size - sizes.get(channel, 0)
        sizes[channel] = size

    def store_frame(self, channel: str, meta: Buffer, data: Optional[Buffer]) -> None:
        """Count a DATA value as a host counts one (:meth:`StoredValues.store_frame`: a
        large ``meta`` at what decoding it takes, read first): never raises."""
        size = len(meta)
        if size > SMALL_META and self.nbytes + size > self.read_above:
            # Past max_stored the count is all settle() needs: stop reading there.
            size = max(size, decoded_size(meta, self.max_stored))
        if data is not None:
            size += len(data)
        self.store(channel, size)

    def settle(self) -> None:
        """After storing: forget the oldest channels while over a budget."""
        sizes = self.sizes
        while len(sizes) > 1 and (len(sizes) > self.max_channels or self.nbytes > self.max_stored):
            limit = (
                f"max_channels={self.max_channels}"
                if len(sizes) > self.max_channels
                else f"max_stored={self.max_stored}"
            )
            channel = next(iter(sizes))
            self.nbytes -= sizes.pop(channel)
            for table in self.tables:
                table.pop(channel, None)
            self.forgotten += 1
            n = self.forgotten
            if n & (n - 1) == 0:
                logger.warning(
                    "the latest values received from the host reached %s: channel %r "
                    "(the oldest) is forgotten, %d so far (raise %s= on the Client, or "
                    "declare an interest, if that is expected)",
                    limit,
                    channel,
                    n,
                    limit.split("=")[0],
                )


def item_size(value: Any, size: Optional[int] = None) -> int:
    """What a decoded BATCH item counts against ``max_stored``: :func:`value_size` (its
    wire size, about), or, when its msgpack is larger than :data:`SMALL_META` bytes,
    what decoding it takes if that is more (:func:`~socketengine.codec.decoded_size` of
    the value encoded again: about what the DATA frame carrying it counts).  ``size``:
    its :func:`value_size`, if known."""
    if size is None:
        size = value_size(value)
    if size <= SMALL_META:
        return size
    meta = encode(value)[0]
    if len(meta) <= SMALL_META:
        return size
    return max(size, decoded_size(meta))


class BudgetExceeded(ProtocolError):
    """A peer's values went beyond ``max_channels`` or ``max_stored`` in the middle of
    a BATCH frame: the first ``accepted`` flat entries (``[channel, value, ...]``) fit
    and are to be stored before the connection is closed."""

    def __init__(self, message: str, accepted: int) -> None:
        super().__init__(message)
        self.accepted = accepted


class Admission:
    """Which connections a host takes, and which handshakes it gives up on.

    Two budgets, so that connections that have proven nothing cannot take the seats of
    those that have:

    * ``max_clients`` counts only connections that **completed** the handshake.  A new
      connection is refused (REFUSE ``full``) when that many are connected -- on a host
      that resumes sessions, in the handshake, once it is known not to resume one (a
      resuming client takes over its old link's seat); a handshake that completes
      when the seats were taken meanwhile is closed right after it.
    * ``max_pending`` counts handshakes in progress (TLS included in the threaded
      layer).  When one more arrives and it is full, one pending handshake is evicted
      (the host sends REFUSE ``busy`` and closes it): among those whose peer has not
      even sent a complete HELLO, if there are any, and preferably among those of them
      older than :attr:`GRACE` (idle and trickling connections go first), the oldest
      one of the address holding the most of them (a flood from a few addresses evicts
      itself).  A client that completes its handshake before
      ``max_pending`` newer connections arrive always gets in.

    Keys are the host's session ids; ``address`` is the peer's IP address.
    """

    #: Seconds between two warnings about evicted handshakes.
    WARN_EVERY = 10.0
    #: Seconds a new connection has to send its HELLO before it is evicted in the
    #: first place (its HELLO is often already in flight when it is accepted).
    GRACE = 0.1

    def __init__(self, max_clients: int, max_pending: int = DEFAULT_MAX_PENDING) -> None:
        self.max_clients = max_clients
        self.max_pending = max_pending
        self._pending: OrderedDict[int, Tuple[Any, float]] = OrderedDict()  # (address, at)
        self._per_address: Dict[Any, int] = {}
        self._clients: Set[int] = set()
        #: Handshakes evicted so far.
        self.evicted = 0
        self._warned_at: Optional[float] = None
        self._evicted_at_warning = 0

    @property
    def pending(self) -> int:
        """Handshakes in progress."""
        return len(self._pending)

    @property
    def clients(self) -> int:
        """Connections that completed the handshake and are not closed."""
        return len(self._clients)

    def full(self) -> Tuple[str, str]:
        return f"the host is full (max_clients={self.max_clients})", "full"

    @staticmethod
    def busy(max_pending: int) -> Tuple[str, str]:
        return (
            f"the host evicted this handshake: {max_pending} newer ones arrived first "
            "(max_pending); retry",
            "busy",
        )

    def arrive(
        self,
        key: int,
        address: Any,
        now: float = 0.0,
        progressed: Optional[Callable[[int], bool]] = None,
        resumable: bool = False,
    ) -> Tuple[Optional[Tuple[str, str]], List[int]]:
        """A new connection at ``now``: ``(refusal, evicted)``.  ``refusal`` is
        ``(reason, code)`` for a REFUSE (the connection is not admitted), else ``None``;
        ``evicted`` are the keys of pending handshakes the host must close now (REFUSE
        ``busy``).  ``progressed(key)``: that pending handshake got somewhere (its peer
        sent a complete HELLO).  ``resumable``: the host resumes sessions, so a full
        host takes the connection as a pending handshake anyway: it may resume a
        session whose old link still holds a seat (the handshake refuses it
        otherwise, see :attr:`SessionTable.admit`)."""
        if len(self._clients) >= self.max_clients and not resumable:
            return self.full(), []
        evicted: List[int] = []
        while len(self._pending) >= self.max_pending:
            victim = self._victim(now, progressed)
            self._drop_pending(victim)
            evicted.append(victim)
        self.evicted += len(evicted)
        self._pending[key] = (address, now)
        self._per_address[address] = self._per_address.get(address, 0) + 1
        return None, evicted

    def _victim(self, now: float, progressed: Optional[Callable[[int], bool]]) -> int:
        """Which pending handshake to give up on: among those that made no progress
        and are older than :attr:`GRACE` s if any (else those that made no progress, if
        any; else all), the oldest one of the address with the most of them."""
        candidates = [(key, address, at) for key, (address, at) in self._pending.items()]
        if progressed is not None:
            stalled = [c for c in candidates if not progressed(c[0])]
            if stalled:
                candidates = stalled
                old = [c for c in stalled if now - c[2] >= self.GRACE]
                if old:
                    candidates = old
        counts: Dict[Any, int] = {}
        for _, address, _ in candidates:
            counts[address] = counts.get(address, 0) + 1
        most = max(counts.values())
        for key, address, _ in candidates:
            if counts[address] == most:
                return key
        raise AssertionError("no pending handshake")  # pragma: no cover

    def _drop_pending(self, key: int) -> bool:
        entry = self._pending.pop(key, None)
        if entry is None:
            return False
        address = entry[0]
        left = self._per_address[address] - 1
        if left:
            self._per_address[address] = left
        else:
            del self._per_address[address]
        return True

    def seat(self) -> Optional[Tuple[str, str]]:
        """Why a client that does not resume a session is refused now (the host is
        full), or ``None``."""
        return self.full() if len(self._clients) >= self.max_clients else None

    def opened(self, key: int) -> Optional[Tuple[str, str]]:
        """The handshake of ``key`` completed: ``None`` if it takes a seat, else why
        not (the host closes it)."""
        self._drop_pending(key)
        if len(self._clients) >= self.max_clients:
            return self.full()
        self._clients.add(key)
        return None

    def left(self, key: int) -> bool:
        """The connection ``key`` closed; True if it had a seat (it was a client)."""
        self._drop_pending(key)
        if key in self._clients:
            self._clients.discard(key)
            return True
        return False

    def warning(self, now: float) -> Optional[str]:
        """A message to log as a WARNING when handshakes were evicted since the last
        one, at most once every :attr:`WARN_EVERY` seconds; else ``None``."""
        count = self.evicted - self._evicted_at_warning
        if not count:
            return None
        if self._warned_at is not None and now - self._warned_at < self.WARN_EVERY:
            return None
        self._warned_at = now
        self._evicted_at_warning = self.evicted
        return (
            f"evicted {count} unfinished handshake(s) (max_pending={self.max_pending}): "
            "peers open connections faster than they complete the handshake"
        )


class SubscriptionBuffer(Generic[T]):
    """The items of one subscription and its watermarks.

    Items wait in order.  When ``maxsize`` items, or ``maxbytes`` bytes of them, wait
    unread, the connection that added the last one is *paused* (the layer stops
    reading it: TCP backpressure slows the sender); when the reader has brought the
    queue down to half of both, every paused source is released.  After
    :meth:`close`, no item is added, and the items already queued can still be read:
    a reader finishes what it got.
    """

    def __init__(self, maxsize: int, maxbytes: Optional[int] = None) -> None:
        self.maxsize = maxsize
        self.maxbytes = maxbytes
        self.items: Deque[T] = deque()
        self.sizes: Deque[int] = deque()
        self.nbytes = 0
        self.closed = False
        self._paused: Set[Any] = set()
        #: Connection losses this subscription lived through (values may be missing).
        self.gaps = 0

    def __len__(self) -> int:
        return len(self.items)

    def put(self, item: T, source: Any, nbytes: int = 0) -> bool:
        """Add ``item`` (``nbytes`` on the wire) from ``source``; True if ``source``
        must now be paused."""
        if self.closed:
            return False
        self.items.append(item)
        self.sizes.append(nbytes)
        self.nbytes += nbytes
        if (
            len(self.items) >= self.maxsize
            or (self.maxbytes is not None and self.nbytes >= self.maxbytes)
        ) and source not in self._paused:
            self._paused.add(source)
            return True
        return False

    def take(self) -> Tuple[T, List[Any]]:
        """The next item, and the sources to release now."""
        item = self.items.popleft()
        self.nbytes -= self.sizes.popleft() if self.sizes else 0
        if (
            self._paused
            and len(self.items) <= self.maxsize // 2
            and (self.maxbytes is None or self.nbytes <= self.maxbytes // 2)
        ):
            released = list(self._paused)
            self._paused.clear()
            return item, released
        return item, []

    def gap(self) -> None:
        """The link to the peer was lost: values sent meanwhile may never arrive."""
        if not self.closed:
            self.gaps += 1

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
