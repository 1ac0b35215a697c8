"""Outstanding requests of one connection (sans-I/O): ids, replies, errors.

A request waits on a *sink*: anything with ``done()``, ``set_result(value)`` and
``set_exception(exc)`` -- an ``asyncio.Future`` in the asyncio layer, a small
event-backed object in the threaded layer.  The table allocates ids, resolves
REPLY / REPLY_ERROR frames and fails every outstanding request when the connection
closes; how a requester waits (and gives up after its timeout, with :meth:`cancel`)
is the I/O layer's business.

Request ids (docs/protocol.md, "Requests") run from 1 to 2**32 - 1 and wrap; 0 is
never used, and an id still outstanding is skipped.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any, Dict, Final, Generic, List, Optional, Protocol, Set, Tuple, TypeVar, Union

from . import frames
from .codec import Buffer
from .errors import RemoteError
from .frames import REPLY, Frame

__all__ = ["ReplySink", "RequestTable", "MAX_REQUEST_ID", "no_handler", "reply_frame"]

logger: Final = logging.getLogger("socketengine")

MAX_REQUEST_ID: Final = 0xFFFFFFFF


class ReplySink(Protocol):
    """What a request waits on."""

    def done(self) -> bool: ...

    def set_result(self, result: Any) -> None: ...

    def set_exception(self, exception: BaseException) -> None: ...


S = TypeVar("S", bound=ReplySink)


class RequestTable(Generic[S]):
    """The requests a connection sent and has no reply for yet."""

    def __init__(self) -> None:
        self._open: Dict[int, S] = {}
        self._acks: Set[int] = set()  # the ids of SYNC frames: answered by ACK only
        # itertools.count is atomic in CPython: writer threads never share an id.
        self._ids = itertools.count(1)

    def __len__(self) -> int:
        return len(self._open)

    def open(self, sink: S) -> int:
        """Register ``sink`` and return the id to send with it: a REQUEST's, answered
        by REPLY / REPLY_ERROR, or a SYNC's (see :meth:`expect_ack`)."""
        while True:
            rid = next(self._ids) & MAX_REQUEST_ID
            if rid and rid not in self._open:
                self._open[rid] = sink
                return rid

    def expect_ack(self, rid: int) -> None:
        """``rid`` goes out in a SYNC frame: only an ACK answers it (a REPLY naming it
        is ignored), and an ACK answers nothing else."""
        if rid in self._open:
            self._acks.add(rid)

    def cancel(self, rid: int) -> None:
        """Forget request ``rid`` (its requester gave up); a late reply is ignored."""
        self._open.pop(rid, None)
        self._acks.discard(rid)

    def resolve(self, frame: Frame) -> bool:
        """Hand a REPLY / REPLY_ERROR frame to its request; False if none waits.

        Raises :class:`~socketengine.ProtocolError` if the frame's value is malformed.
        """
        value = frame.value()
        if frame.id in self._acks:
            logger.debug("reply to SYNC id %d ignored: a SYNC is answered by ACK", frame.id)
            return False
        sink: Optional[S] = self._open.pop(frame.id, None)
        if sink is None or sink.done():
            logger.debug("reply to an unknown or expired request id %d ignored", frame.id)
            return False
        if frame.type == REPLY:
            sink.set_result(value)
        else:
            sink.set_exception(RemoteError(str(value)))
        return True

    def acknowledge(self, rid: int) -> bool:
        """An ACK arrived for SYNC ``rid``: its waiter learns everything before it is
        stored.  False if nobody waits for it (it gave up), or ``rid`` is a request's."""
        if rid not in self._acks:
            logger.debug("ACK for id %d ignored: not a SYNC's", rid)
            return False
        self._acks.discard(rid)
        sink: Optional[S] = self._open.pop(rid, None)
        if sink is None or sink.done():
            logger.debug("ACK for an unknown or expired id %d ignored", rid)
            return False
        sink.set_result(True)
        return True

    def fail_all(self, error: BaseException) -> None:
        """The connection closed: every outstanding request fails with ``error``."""
        pending, self._open = self._open, {}
        self._acks.clear()
        for sink in pending.values():
            if not sink.done():
                sink.set_exception(error)


def no_handler(channel: str) -> str:
    """The REPLY_ERROR text for a request on a channel nobody handles."""
    return f"no handler for requests on channel {channel!r}"


def reply_frame(
    channel: str, rid: int, result: Any, error: Union[BaseException, str, None]
) -> Tuple[List[Buffer], int, Optional[str]]:
    """The frame answering request ``rid``: ``(parts, size, error_text)``.

    A REPLY carrying ``result`` when ``error`` is ``None`` (and the result can be
    encoded), else a REPLY_ERROR whose text is ``error`` (a str, verbatim), the
    exception's ``"Type: message"``, or why the result could not be sent;
    ``error_text`` is ``None`` for a REPLY.
    """
    if error is None:
        try:
            parts, size = frames.value_frame(frames.REPLY, channel, result, fid=rid)
            return parts, size, None
        except (TypeError, ValueError) as exc:
            text = f"the reply could not be sent: {exc}"
    elif isinstance(error, str):
        text = error
    else:
        text = f"{type(error).__name__}: {error}"
    parts, size = frames.value_frame(frames.REPLY_ERROR, channel, text, fid=rid)
    return parts, size, text
