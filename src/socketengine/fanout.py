"""A burst of broadcasts (sans-I/O): small values for many peers, queued once per run.

``write_all`` of a small value to K clients used to append it to K send queues, one
Python call each (0.3 us per client, 6 us per ``write_all`` to 20: the writer was the
bottleneck of a fan-out).  In a burst, a host instead appends the value once to a
*run*, and hands the whole run to every recipient's send queue in one step
(:meth:`SendQueue.offer_items`): per value and client, a list slot copied in C.

Both hosts do this (the threaded one and the asyncio one), by these rules:

* **Who gets a run.**  The connections of one audience (``Host._wanting``'s cached list
  for a channel: same list, same audience) that are open when the run starts.  A value
  for another audience (another channel's subscribers, a connection came or went) ends
  the run first, so a client that becomes ready mid-burst gets only what is written
  after, as without runs.
* **Size.**  At most :data:`FAN_MAX` values: then the writer hands the run over itself.
  Otherwise the I/O layer does, on its next step (the threaded host's I/O thread, the
  asyncio host's event loop: a coroutine that never yields gets runs of ``FAN_MAX``).
  So at most ``FAN_MAX`` values (each at most ``frames.ITEM_MAX`` bytes) wait outside
  the send queues, whose ``max_buffer`` and slow-consumer rules then apply as to any
  broadcast.
* **Order.**  Anything else sent to one of its recipients (a direct write, a reply, a
  broadcast that is not deferred, a close) hands the run over first, so nothing
  overtakes it.  A connection whose link is lost before the hand-over gets the run
  into the queue its session keeps for a resume; one that is closing otherwise (a
  goodbye from either side, a protocol error, a slow-consumer drop: no session is
  kept for those) does not get it.
"""

from __future__ import annotations

from typing import Callable, Final, Generic, List, Optional, Sequence, TypeVar

from .sendqueue import ITEM_OVERHEAD

__all__ = ["FanOut", "FAN_MAX", "BROADCAST_GAP"]

#: Values a run holds at most before the writer hands it over itself.
FAN_MAX: Final = 256
#: Seconds: a broadcast that begins closer than this to the end of the previous one is
#: part of a burst.  Counted from the *end*: sending one to 20 clients at once takes 20
#: syscalls (and on the threaded layer as many GIL hand-overs), which must not make
#: the next one look isolated (measured: fan-out to 20 then fell into a mode of 5x
#: fewer deliveries/s, the writer flushing every frame itself).
BROADCAST_GAP: Final = 1e-3

_C = TypeVar("_C")


class FanOut(Generic[_C]):
    """The current run of deferred broadcast values (one per host).  Not thread-safe:
    the threaded host calls it under its ``_held_lock``, the asyncio host on its event
    loop."""

    __slots__ = ("items", "nbytes", "recipients", "last", "_audience")

    def __init__(self) -> None:
        #: The run's values (BATCH items), in order; empty: no run.
        self.items: List[bytes] = []
        #: What they count against each recipient's ``max_buffer`` (bytes plus
        #: ``ITEM_OVERHEAD`` each, as :meth:`SendQueue.push_item` counts one).
        self.nbytes = 0
        #: The connections the run is for (open when it started).
        self.recipients: List[_C] = []
        #: When the previous broadcast ended (the host's clock), for :meth:`in_burst`.
        self.last = 0.0
        self._audience: Optional[Sequence[_C]] = None

    def __bool__(self) -> bool:
        return bool(self.items)

    def in_burst(self, clients: int, now: float) -> bool:
        """A broadcast to ``clients`` connections beginning at ``now`` is part of a
        burst: more than one client, within :data:`BROADCAST_GAP` of the end of the
        previous broadcast (:attr:`last`, which the host sets when one ends)."""
        return clients > 1 and now - self.last < BROADCAST_GAP

    def defer(
        self, item: bytes, audience: Sequence[_C], now: float, is_open: Callable[[_C], bool]
    ) -> int:
        """A small broadcast (a BATCH item) to ``audience`` (the host's cached list of
        the connections that want it) at ``now``.  In a burst it joins the run, which
        starts for the open connections of ``audience`` if there is none for it; returns
        how many connections the run is for.  Returns -1 for a broadcast that is not
        part of a burst: the host sends it at once.  Then :attr:`full` says whether the
        host must hand the run over now.  A run for another audience must have been
        handed over first (``RuntimeError``)."""
        if not self.join(item, audience, now):
            if not self.in_burst(len(audience), now):
                return -1
            self.start(audience, [c for c in audience if is_open(c)])
            self.add(item)
            self.last = now
        return len(self.recipients)

    def join(self, item: bytes, audience: Sequence[_C], now: float) -> bool:
        """The common step of a burst: a small broadcast to ``audience`` at ``now``
        joins the current run if that run is for the same audience (:meth:`joins`).
        False, and nothing done, if not: then :meth:`defer` decides.  After a join,
        :attr:`full` says whether the host must hand the run over now."""
        if audience is not self._audience or not self.items:
            return False
        self.add(item)
        self.last = now
        return True

    @property
    def full(self) -> bool:
        """The run holds :data:`FAN_MAX` values: the writer hands it over now."""
        return len(self.items) >= FAN_MAX

    def joins(self, audience: Sequence[_C]) -> bool:
        """A value for ``audience`` may join the current run (there is one, for the
        same audience)."""
        return audience is self._audience and bool(self.items)

    def start(self, audience: Sequence[_C], recipients: List[_C]) -> None:
        """Begin a run for ``audience`` (the current one must be empty: handed over)."""
        if self.items:
            raise RuntimeError("FanOut.start: the current run was not handed over")
        self._audience = audience
        self.recipients = recipients

    def add(self, item: bytes) -> bool:
        """Append a value to the run; True when the run is full (:data:`FAN_MAX`) and
        must be handed over now."""
        items = self.items
        items.append(item)
        self.nbytes += len(item) + ITEM_OVERHEAD
        return len(items) >= FAN_MAX

    def clear(self) -> None:
        """The run was handed to every recipient: start afresh."""
        self.items = []
        self.nbytes = 0
        self.recipients = []
        self._audience = None
