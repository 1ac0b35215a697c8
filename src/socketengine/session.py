"""Resumable sessions (protocol 1.2, sans-I/O): what survives a lost link.

A session is the pair of sequenced streams between one client and one host: how many
sequenced frames (DATA, BATCH; docs/protocol.md 8.8) this side has received
(:attr:`Session.recv`) and the send queue whose replay buffer holds what the peer has
not acknowledged.  When a link dies while both endpoints live, the client connects
again presenting the session id and its count; the host answers with its own count;
each side replays what the other lacks (:meth:`SendQueue.rewind`).

The host keeps a dropped session for at most ``resume_window`` seconds and at most
``resume_sessions`` of them (oldest dropped first): :class:`SessionTable`.  Ids are 16
bytes from :mod:`secrets`, bound to the client's name; only a connection that passed
the handshake (and its token, if the host has one) can present one.
"""

from __future__ import annotations

import hmac
import logging
import secrets
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple

from .sendqueue import SendQueue

__all__ = ["Session", "SessionTable", "SID_SIZE", "ACK_EVERY"]

logger = logging.getLogger("socketengine")

#: Bytes of a session id.
SID_SIZE = 16
#: A receiver sends a RACK at least every this many sequenced frames (and on its
#: heartbeat tick, and after any read that held a frame with a data section).
ACK_EVERY = 32


class Session:
    """One side's view of a resumable session.

    :param sid: the id the host gave (``b""`` until the first WELCOME, client side).
    :param name: the client's name it is bound to (host side).
    :param queue: the send queue holding this side's unacknowledged frames.
    """

    __slots__ = ("sid", "name", "recv", "acked_out", "queue", "owner", "expires", "lost")

    def __init__(self, sid: bytes, name: Optional[str], queue: Optional[SendQueue]) -> None:
        self.sid = sid
        self.name = name
        #: Sequenced frames received from the peer in this session.
        self.recv = 0
        #: The count this side last acknowledged (RACK) or presented.
        self.acked_out = 0
        self.queue = queue
        #: The connection that carries the session now (host side; ``None``: suspended).
        self.owner: Any = None
        #: When a suspended session is forgotten (host side, monotonic seconds).
        self.expires = 0.0
        #: Frames of this session lost to the replay window (reported once each).
        self.lost = 0

    def __repr__(self) -> str:
        return f"<Session {self.sid.hex()[:8]} recv={self.recv}>"


class SessionTable:
    """The host's sessions: live ones (bounded by ``max_clients``) and suspended ones
    (at most ``max_suspended``, each for at most ``window`` seconds).

    Worst-case memory of the suspended ones: ``max_suspended`` x 2 x ``max_buffer``
    (each keeps its replay buffer and its unsent queue, both bounded by
    ``max_buffer``)."""

    def __init__(self, window: float, max_suspended: int) -> None:
        self.window = window
        self.max_suspended = max_suspended
        self._live: Dict[bytes, Session] = {}
        self._suspended: OrderedDict[bytes, Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._live) + len(self._suspended)

    @property
    def suspended(self) -> List[Session]:
        return list(self._suspended.values())

    def open(self, sid: Any, name: Optional[str]) -> Tuple[Session, bool]:
        """A client finished its handshake presenting ``sid`` (``b""``: none): its
        session, and whether it resumes one (same id, same name, not expired)."""
        if type(sid) is bytes and len(sid) == SID_SIZE:
            for table in (self._suspended, self._live):
                found = table.get(sid)
                if found is not None and hmac.compare_digest(found.sid, sid):
                    if found.name == name:
                        del table[sid]
                        self._live[sid] = found
                        return found, True
                    logger.warning(
                        "a client named %r presented the session of %r: a new session "
                        "is started instead",
                        name,
                        found.name,
                    )
                    break
        session = Session(secrets.token_bytes(SID_SIZE), name, None)
        self._live[session.sid] = session
        return session, False

    def suspend(self, session: Session, now: float) -> List[Session]:
        """The session's link died: keep it for ``window`` seconds.  Returns sessions
        dropped to stay within ``max_suspended`` (oldest first)."""
        self._live.pop(session.sid, None)
        session.owner = None
        if self.window <= 0 or self.max_suspended <= 0:
            return [session]
        session.expires = now + self.window
        self._suspended[session.sid] = session
        dropped = []
        while len(self._suspended) > self.max_suspended:
            dropped.append(self._suspended.popitem(last=False)[1])
        return dropped

    def drop(self, session: Session) -> None:
        """The session ended (a polite close, a protocol error)."""
        self._live.pop(session.sid, None)
        self._suspended.pop(session.sid, None)

    def expire(self, now: float) -> List[Session]:
        """Forget suspended sessions whose window is over; returns them."""
        out = []
        while self._suspended:
            sid, session = next(iter(self._suspended.items()))
            if session.expires > now:
                break
            del self._suspended[sid]
            out.append(session)
        return out

    def clear(self) -> None:
        self._live.clear()
        self._suspended.clear()
