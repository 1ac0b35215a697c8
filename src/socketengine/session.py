"""Resumable sessions (protocol 1.2, sans-I/O): what survives a lost link.

A session is the pair of sequenced streams between one client and one host: how many
sequenced frames (DATA, BATCH; docs/protocol.md 8.8) this side has received
(:attr:`Session.recv`) and the send queue whose replay buffer holds what the peer has
not acknowledged.  When a link dies while both endpoints live, the client connects
again presenting the session id and its count; the host answers with its own count;
each side replays what the other lacks (:meth:`SendQueue.rewind`).

The host keeps a dropped session for at most ``resume_window`` seconds and at most
``resume_sessions`` of them (oldest dropped first): :class:`SessionTable`.  While it is
kept (*held*: from the moment the link is found dead until a new link adopts the
session), what the host writes for that client -- ``write_all``, ``write_image_all``,
relayed values, a ``conn.write`` to the old connection -- is queued into the session
(:meth:`Session.hold`), bounded by ``max_buffer``, and delivered in order on resume.  Ids are 16
bytes from :mod:`secrets`, bound to the client's name; only a connection that passed
the handshake (and its token, if the host has one) can present one.
"""

from __future__ import annotations

import hmac
import logging
import secrets
from collections import OrderedDict
from typing import Any, Callable, Dict, Final, List, Optional, Tuple

from .patterns import Interest
from .sendqueue import Outgoing, SendQueue

__all__ = ["Session", "SessionTable", "SID_SIZE", "ACK_EVERY", "ACK_BYTES"]

logger: Final = logging.getLogger("socketengine")

#: Bytes of a session id.
SID_SIZE: Final = 16
#: A receiver sends a RACK at least every this many sequenced frames (and on its
#: heartbeat tick, and after any read that held a frame with a data section).
ACK_EVERY: Final = 32
#: ... and once the sequenced frames without a data section it has not acknowledged
#: take this many bytes, whole frames counted (header, channel name, meta), as the
#: sender's replay window counts them: a sender whose window is full
#: (``sendqueue.WINDOW_MIN`` or more) stops until it gets a RACK, and this rule makes
#: sure one comes (a BATCH frame holds up to 64 KiB: 32 of them would be 2 MiB).
ACK_BYTES: Final = 256 * 1024


class Session:
    """One side's view of a resumable session.

    :param sid: the id the host gave (``b""`` until the first WELCOME, client side).
    :param name: the client's name it is bound to (host side).
    :param queue: the send queue holding this side's unacknowledged frames.
    """

    __slots__ = (
        "sid",
        "name",
        "recv",
        "acked_out",
        "queue",
        "owner",
        "expires",
        "lost",
        "held",
        "interest",
        "requests",
        "keep_requests",
        "table",
        "_warned",
    )

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
        #: Frames of this session lost to the replay window (reported once each), and
        #: writes for a held session that did not fit in ``max_buffer``.
        self.lost = 0
        #: The link died and no new link adopted the session yet: writes for the peer
        #: go into :attr:`queue` (:meth:`hold`).
        self.held = False
        #: The channels the peer wanted from broadcasts when its link died.
        self.interest: Optional[Interest] = None
        #: The requests (and SYNCs) this side sent in the session and has no answer
        #: for: they survive a lost link when requests are sequenced (``"rq"``) and
        #: :attr:`keep_requests` is set (a host; a client that reconnects).
        self.requests: Any = None
        self.keep_requests = True
        #: The host's table that keeps this session (``None``: a client's session).
        self.table: Optional[SessionTable] = None
        self._warned = False

    def suspend(self, interest: Optional[Interest]) -> None:
        """The link died (a loss, not a close): hold writes for the peer from now on."""
        self.held = True
        self.interest = interest
        if self.table is not None:
            self.table.holding[self.sid] = self

    def release(self) -> None:
        """A new link adopted the session, or it was dropped: stop holding writes."""
        self.held = False
        self._warned = False
        if self.table is not None:
            self.table.holding.pop(self.sid, None)

    def fail_requests(self, error: BaseException) -> None:
        """The session is over (expired, dropped, closed): requests waiting in it fail."""
        requests, self.requests = self.requests, None
        if requests is not None and len(requests):
            requests.fail_all(error)

    def wants(self, channel: str) -> bool:
        """A broadcast on ``channel`` goes to this held session (the peer's interest)."""
        interest = self.interest
        return interest is None or interest.wants(channel)

    def hold(self, parts: Outgoing, nbytes: int, image: Optional[str] = None) -> bool:
        """Queue a write for the peer while its link is down, to be sent on resume in
        order after the replay.  Same bound as a live link's queue: it is taken if it
        fits in ``max_buffer`` (an image frame replaces one of its channel still
        waiting: the newest wins).  Otherwise it is lost: counted in :attr:`lost`
        (``stats()["resume_lost"]``), logged as a WARNING once per outage, and False
        is returned.  Call only while :attr:`held`."""
        queue = self.queue
        assert queue is not None and self.held
        if queue.fits(nbytes) or (image is not None and queue.waiting_image(image)):
            if type(parts) is bytes:
                queue.push_item(parts)
            else:
                queue.push(list(parts), nbytes, image)  # type: ignore[arg-type]
            return True
        self.lost += 1
        if not self._warned:
            self._warned = True
            logger.warning(
                "the link of client %r is down and %d bytes already wait for it "
                "(max_buffer=%d): writes for it are lost until it resumes (counted in "
                "stats()['resume_lost'])",
                self.name,
                queue.queued,
                queue.max_buffer,
            )
        return False

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
        #: The host's seat check for a client that does not resume a session: why it
        #: is refused (``(reason, code)``), or ``None``.  A resuming client takes over
        #: the seat of its old link, so a full host still lets it back in.
        self.admit: Optional[Callable[[], Optional[Tuple[str, str]]]] = None
        #: The held sessions by id (:meth:`Session.suspend` / :meth:`Session.release`
        #: keep it; read-only for others): empty, a broadcast holds nothing anywhere.
        self.holding: Dict[bytes, Session] = {}

    def __len__(self) -> int:
        return len(self._live) + len(self._suspended)

    @property
    def suspended(self) -> List[Session]:
        return list(self._suspended.values())

    def held(self) -> List[Session]:
        """The sessions writes are held for now: those whose link died (suspended,
        or not yet handed to the table by the I/O layer) and resumed ones whose new
        link has not adopted them yet.  O(held sessions): nothing when every client
        is connected."""
        held = self.holding
        return list(held.values()) if held else []

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
        session.table = self
        self._live[session.sid] = session
        return session, False

    def suspend(self, session: Session, now: float) -> List[Session]:
        """The session's link died: keep it for ``window`` seconds.  Returns sessions
        dropped to stay within ``max_suspended`` (oldest first)."""
        self._live.pop(session.sid, None)
        session.owner = None
        if self.window <= 0 or self.max_suspended <= 0:
            session.release()
            return [session]
        session.expires = now + self.window
        self._suspended[session.sid] = session
        dropped = []
        while len(self._suspended) > self.max_suspended:
            dropped.append(self._forget(self._suspended.popitem(last=False)[1]))
        return dropped

    @staticmethod
    def _forget(session: Session) -> Session:
        session.release()
        return session

    def drop(self, session: Session) -> None:
        """The session ended (a polite close, a protocol error)."""
        self._live.pop(session.sid, None)
        self._suspended.pop(session.sid, None)
        self._forget(session)

    def expire(self, now: float) -> List[Session]:
        """Forget suspended sessions whose window is over; returns them."""
        out = []
        while self._suspended:
            sid, session = next(iter(self._suspended.items()))
            if session.expires > now:
                break
            del self._suspended[sid]
            out.append(self._forget(session))
        return out

    def clear(self) -> None:
        for session in (*self._live.values(), *self._suspended.values()):
            session.release()
        self._live.clear()
        self._suspended.clear()
        self.holding.clear()
