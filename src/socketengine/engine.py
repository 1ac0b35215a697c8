"""One connection's rules, sans-I/O: states, closing, heartbeats, requests, send queue.

:class:`ConnectionEngine` is what both I/O layers drive.  It never touches a socket, a
thread, a clock or an event loop: the layer passes ``now`` in, feeds received frames,
and asks what to send and what to do.  The threaded layer (``sync/``) and the asyncio
layer (``aio/``) only move bytes and wait.

States (checked on every transition, like h11's and python-websockets')::

    HANDSHAKE --open--> OPEN --send_bye / receive_bye--> CLOSING --finish--> CLOSED
        |                 \\------------------- finish (lost, failed) -------/^
        \\---- send_bye (nothing to say yet) --> CLOSING;   finish ---------/

Rules owned here, once:

* nothing is sent after our BYE -- not a PONG, not a PING (:meth:`control_bytes`);
* user writes are accepted only while OPEN (:attr:`writable`);
* a BYE from the peer ends its sending: frames after it are ignored, and we close
  once what we still owe it is flushed (:meth:`receive_bye`);
* an EOF is graceful after a BYE (either way) and a loss otherwise
  (:meth:`receive_eof`);
* heartbeats (:meth:`tick`): PING when nothing was received -- or nothing sent -- for
  H seconds; a peer that sent nothing for 3·H is dead, unless we stopped reading it;
* the handshake deadline and the linger after our BYE are deadlines of :meth:`tick`;
* requests: ids, replies and failures (:class:`~socketengine.requests.RequestTable`);
* the send queue: order, image conflation, ``max_buffer`` and slow-consumer verdicts
  (:class:`~socketengine.sendqueue.SendQueue`);
* resume (protocol 1.2, :attr:`session`): counting the peer's sequenced frames,
  acknowledging them (RACK: every ``ACK_EVERY`` frames or ``ACK_BYTES`` bytes, after a
  read holding a data section, and on every :meth:`tick`), applying its
  acknowledgements, keeping the
  queue when the link is lost rather than closed (:meth:`finish`; writes for the peer
  are held in it meanwhile, :meth:`Session.hold`) and replaying it on the next link
  (:meth:`adopt`).
"""

from __future__ import annotations

import enum
import logging
from typing import Any, Callable, ClassVar, Final, List, Optional, Tuple

from . import frames
from .errors import ConnectionClosed, HandshakeError, NotSupported, ProtocolError
from .frames import Frame
from .limits import PRE_HANDSHAKE_MAX
from .patterns import Interest
from .protocol import Protocol
from .requests import ReplySink, RequestTable
from .sendqueue import BATCH_MAX, SEQ_ALL, SEQ_VALUES, ImageHook, SendQueue, rack_frame
from .session import ACK_BYTES, ACK_EVERY, Session

__all__ = ["ConnState", "Tick", "ConnectionEngine", "BYE_FRAME"]

logger: Final = logging.getLogger("socketengine")
_DATA: Final = frames.DATA
_BATCH: Final = frames.BATCH
#: Seconds protocol bytes owed to the peer after a read (a RACK, a PONG) may wait for
#: the next write on that connection to take them along (both layers): sent on their
#: own, in the middle of a round trip, they cost the peer an extra wake-up.
CONTROL_DELAY: Final = 1e-3
_RACK: Final = frames.RACK
_HEADER_SIZE: Final = frames.HEADER_SIZE
_SKIP: Final = frames.SKIP

BYE_FRAME: Final = b"".join(frames.encode_frame(frames.BYE))
_pack_header: Final = frames.HEADER.pack
_PING_FRAME: Final = b"".join(frames.encode_frame(frames.PING))
#: Bytes of answers (PONG, ACK: 16 bytes each) a peer may have us queue while more than
#: ``max_buffer`` bytes wait unsent to it: a peer that keeps sending PINGs or SYNCs and
#: does not read the answers is closed past this, rather than grow our memory.
OWED_MAX: Final = 64 * 1024


class ConnState(enum.Enum):
    """Where a connection is in its life."""

    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


_ALLOWED: Final = {
    ConnState.HANDSHAKE: {ConnState.OPEN, ConnState.CLOSING, ConnState.CLOSED},
    ConnState.OPEN: {ConnState.CLOSING, ConnState.CLOSED},
    ConnState.CLOSING: {ConnState.CLOSED},
    ConnState.CLOSED: set(),
}


class Tick(enum.Enum):
    """What :meth:`ConnectionEngine.tick` asks the I/O layer to do."""

    NOTHING = "nothing"
    PING = "ping"  #: send :meth:`ConnectionEngine.ping` bytes
    DEAD = "dead"  #: the peer stopped answering: close now (``error`` says why)
    HANDSHAKE_TIMEOUT = "handshake timeout"  #: close now (``error`` says why)
    LINGER_OVER = "linger over"  #: our BYE got no EOF in time: close now


class ConnectionEngine:
    """The state of one connection, for either role, on any I/O layer.

    :param protocol: the handshake state machine (it also owns the frame decoder).
    :param peer: how to name the peer in messages (``"cam-1 at 127.0.0.1:5000"``).
    :param max_buffer: bytes that may wait unsent (see :class:`SendQueue`).
    :param heartbeat: H, seconds; ``None`` disables pings and the dead-peer rule.
    :param handshake_timeout: seconds from ``now`` to complete the handshake.
    :param now: the layer's monotonic clock at creation.
    :param on_image: stats hook for image frames (see :class:`SendQueue`).
    """

    #: Changes whenever any engine's ``interest`` is set (a host caches "does any client
    #: filter channels?" against it; a lost increment between threads still changes it).
    interest_epoch: ClassVar[int] = 0

    def __init__(
        self,
        protocol: Protocol,
        *,
        peer: str,
        max_buffer: int,
        heartbeat: Optional[float],
        handshake_timeout: float,
        now: float,
        on_image: Optional[ImageHook] = None,
    ) -> None:
        self.protocol = protocol
        self.peer = peer
        self.state = ConnState.HANDSHAKE
        self.queue = SendQueue(max_buffer, on_image)
        self.requests: RequestTable[ReplySink] = RequestTable()
        self.heartbeat = heartbeat
        self.handshake_deadline = now + handshake_timeout
        self.handshake_timeout = handshake_timeout
        self.linger_deadline: Optional[float] = None
        self.bye_sent = False
        self.polite = False  # our BYE came from a close() (not from failing the peer)
        self.bye_received = False
        self.eof_received = False
        self.error: Optional[BaseException] = None
        self.last_recv = self.last_send = self.last_ping = now
        self._out: List[bytes] = []  # frames the engine itself answers with (ACK)
        # ACK frames when they are sequenced ("rq"): each goes to the send queue alone.
        self._acks: List[bytes] = []
        #: The channels the peer wants from broadcasts (``None``: every channel).
        self.interest: Optional[Interest] = None
        #: The resumable session this connection carries (protocol 1.2), set when the
        #: handshake completes with both sides announcing it; ``None`` otherwise.
        self.session: Optional[Session] = None
        # Bytes of the peer's sequenced frames (without data sections) since our last
        # RACK: one is due at ACK_BYTES as well as at ACK_EVERY frames.
        self._unacked_bytes = 0
        # A RACK arrived (read and cleared by take_racked), and the RACK just queued
        # must not wait for the next write (read and cleared by take_rack_urgent).
        self._racked = False
        self._rack_urgent = False
        #: The handshake completed with a session: :meth:`adopt` makes it OPEN.
        self.opening = False
        #: Bytes waiting unsent to the peer, as the layer sees them (the asyncio layer
        #: adds its transport's buffer); :meth:`_owe` compares it with ``max_buffer``.
        self.unsent: Callable[[], int] = self._queued
        #: Answer bytes queued while the peer was not reading (see :data:`OWED_MAX`).
        self.owed = 0

    # -- state ----------------------------------------------------------------------------

    def _to(self, state: ConnState) -> None:
        if state is self.state:
            return
        if state not in _ALLOWED[self.state]:
            raise RuntimeError(
                f"connection state {self.state.value} -> {state.value} is not allowed"
            )
        self.state = state

    @property
    def opened(self) -> bool:
        """The handshake completed (the layer then calls ``_on_ready``; with a session
        the state becomes OPEN in :meth:`adopt`)."""
        return self.state is ConnState.OPEN or self.opening

    @property
    def writable(self) -> bool:
        """User frames may be queued (the handshake is done and nobody said BYE)."""
        return self.state is ConnState.OPEN

    @property
    def closed(self) -> bool:
        return self.state is ConnState.CLOSED

    @property
    def peer_done(self) -> bool:
        """The peer will send nothing more (BYE or EOF received)."""
        return self.bye_received or self.eof_received

    def check_writable(self) -> None:
        """Raise :class:`ConnectionClosed` unless user frames may be queued."""
        if self.state is ConnState.OPEN:
            return
        if self.state is ConnState.HANDSHAKE:
            raise ConnectionClosed(f"the handshake with {self.peer} has not completed")
        raise ConnectionClosed(
            f"the connection to {self.peer} is closed ({self.error or 'closed'})"
        )

    # -- receiving ------------------------------------------------------------------------

    def received(self, now: float) -> None:
        """Bytes arrived from the peer (any bytes prove it is alive)."""
        self.last_recv = now

    def events(self) -> List[Frame]:
        """Decoded application frames (DATA, REQUEST, REPLY, REPLY_ERROR, BYE).

        Finishes the handshake when its frames arrive (``state`` becomes OPEN).
        Raises :class:`HandshakeError` / :class:`AuthenticationError` /
        :class:`ProtocolError`: the layer must then :meth:`fail`.
        """
        if self.state is ConnState.CLOSED:
            return []
        protocol = self.protocol
        pongs = protocol.pongs_due
        out = protocol.events()
        if protocol.pongs_due != pongs:
            self._owe(16 * (protocol.pongs_due - pongs))
        if self.state is ConnState.HANDSHAKE and self.protocol.is_open and not self.opening:
            self._negotiate()
            self.interest = self.protocol.peer_interest
            ConnectionEngine.interest_epoch += 1
            if self.session is None:
                self._to(ConnState.OPEN)
            else:
                # OPEN (writable) only once adopt() put the replay first on the wire.
                self.opening = True
        if self.session is not None and out:
            out = self._sequenced(out)
        if out:
            self.queue.answering = True  # the burst rule: a write now answers these
        return out

    def _sequenced(self, received: List[Frame]) -> List[Frame]:
        """Count the peer's sequenced frames, apply its RACKs, drop SKIPs; queue a
        RACK when one is due."""
        session = self.session
        assert session is not None
        count = 0
        nbytes = 0
        large = False
        strip = False
        sequenced = self.queue.sequenced
        for frame in received:
            t = frame.type
            if t in sequenced:
                count += 1
                if frame.data is not None:
                    large = True
                else:  # the whole frame, as the sender's replay window counts it
                    channel = frame.channel
                    nbytes += (
                        _HEADER_SIZE
                        + len(frame.meta)
                        + (len(channel) if channel.isascii() else len(channel.encode()))
                    )
            elif t == _SKIP:
                if frame.id < 1:
                    raise ProtocolError("SKIP frame standing for no sequence number")
                count += frame.id
                strip = True
            elif t == _RACK:
                self.queue.ack(frame.id)
                self._racked = True
                strip = True
        session.recv += count
        self._unacked_bytes += nbytes
        if self._unacked_bytes >= ACK_BYTES:
            # A stream of large frames: the sender's replay window may be waiting for
            # this RACK (flow control), so it leaves now, not with the next write.
            self._ack()
            self._rack_urgent = True
        elif session.recv - session.acked_out >= ACK_EVERY or (large and count):
            self._ack()
        if strip:
            return [f for f in received if f.type != _SKIP and f.type != _RACK]
        return received

    def take_racked(self) -> bool:
        """Whether a RACK arrived since the last call.  When it did, the I/O layer
        checks, under its lock, whether the send queue held values back for want of
        room in the replay window, and flushes again (see
        :meth:`SendQueue.take_inbox`)."""
        racked = self._racked
        self._racked = False
        return racked

    def take_rack_urgent(self) -> bool:
        """Whether the RACK queued since the last call must leave now rather than wait
        for the next write (``CONTROL_DELAY``): the peer's replay window may be full
        and waiting for it."""
        urgent = self._rack_urgent
        self._rack_urgent = False
        return urgent

    def _ack(self) -> None:
        session = self.session
        if session is not None and session.recv != session.acked_out and not self.bye_sent:
            session.acked_out = session.recv
            self._unacked_bytes = 0
            self._out.append(rack_frame(session.recv))

    def adopt(self, old: Optional[SendQueue]) -> int:
        """After the handshake: continue the previous link's queue ``old`` on this
        connection, then become OPEN.  A connection that carries a session stays in
        HANDSHAKE (not writable) from the end of the handshake (:attr:`opened`) until
        this call, so no user frame can overtake the replay.

        With a resumed session, what the peer has not received is replayed first
        (:meth:`SendQueue.rewind`); without one (a new session, a peer without
        resume: a restarted host), everything unacknowledged is sent again (at least
        once, :meth:`SendQueue.restart`).  Returns the number of sequenced frames
        lost because they had left the replay window (flow control keeps them in it:
        see :meth:`SendQueue.take_inbox`); they are also logged as a WARNING and
        counted in ``session.lost``."""
        queue = self.queue
        session = self.session
        lost = 0
        resumed = False
        if old is not None and old is not queue:
            old.detach()
            if session is not None and self.protocol.resumed:
                try:
                    lost = old.rewind(self.protocol.peer_recv)
                    resumed = True
                except ProtocolError as exc:
                    logger.warning("%s: cannot resume (%s): sending again", self.peer, exc)
                    lost = old.restart()
            else:
                lost = old.restart()
            numbered, sequenced = queue.numbered, queue.sequenced
            queue.take_over(old)
            queue.numbered, queue.sequenced = numbered, sequenced
        if session is not None:
            kept = session.requests
            if kept is not None and kept is not self.requests:
                if resumed and self.protocol.peer_rq:
                    self.requests = kept  # their frames were replayed: answers come here
                else:
                    session.fail_requests(
                        ConnectionClosed(
                            f"the session with {self.peer} was lost (the peer restarted, or "
                            "it expired) before it answered"
                        )
                    )
            session.requests = self.requests
            session.queue = queue
            session.release()  # writes go to this link from now on
            if lost:
                session.lost += lost
        if self.opening and self.state is ConnState.HANDSHAKE:
            self.opening = False
            self._to(ConnState.OPEN)
        if lost:
            logger.warning(
                "%s: %d frames written before the link was lost (values; a burst of "
                "small values counts once per BATCH frame) had left the replay window "
                "(max_buffer=%d) and are lost",
                self.peer,
                lost,
                queue.max_buffer,
            )
        return lost

    @property
    def resumable(self) -> bool:
        """The session survives this connection: it carries one, and it ended without
        a BYE either way (a lost link, not a close)."""
        return self.session is not None and not (self.bye_sent or self.bye_received)

    def _negotiate(self) -> None:
        """What the handshake settled: BATCH frames only to a peer that reads them,
        never larger than its ``max_message``."""
        protocol = self.protocol
        if protocol.peer_batch:
            limit = BATCH_MAX
            if protocol.peer_max_message is not None:
                limit = min(limit, protocol.peer_max_message - frames.HEADER_SIZE)
            self.queue.batch_limit = max(limit, 0)
        session = protocol.resume_session
        if protocol.peer_resume and session is not None:
            session.sid = protocol.resume_sid
            if not protocol.resumed:
                session.recv = 0
            session.acked_out = session.recv  # the peer learnt it in the handshake
            self.session = session
            self.queue.numbered = True
            self.queue.sequenced = SEQ_ALL if protocol.peer_rq else SEQ_VALUES
        # Large data sections through shared memory (same machine, same user).
        self.queue.shm = protocol.shm_writer

    def control(self, frame: Frame) -> bool:
        """Handle a frame that is not DATA or REQUEST; True if handling must stop
        here (a BYE: the peer sends nothing after it)."""
        t = frame.type
        if t == frames.REPLY or t == frames.REPLY_ERROR:
            self.requests.resolve(frame)
            return False
        if t == frames.BYE:
            self.receive_bye()
            return True
        if t == frames.SYNC:
            # Everything the peer sent before it is stored: say so, in order.
            ack = _pack_header(frames.ACK, 0, 0, frame.id, 0, 0)
            self._owe(len(ack))
            if frames.ACK in self.queue.sequenced and self.session is not None:
                self._acks.append(ack)  # numbered: through the send queue (take_acks)
            else:
                self._out.append(ack)
            return False
        if t == frames.ACK:
            self.requests.acknowledge(frame.id)
            return False
        if t == frames.INTEREST:
            # It carries what a HELLO carries: no larger than a handshake frame, checked
            # before decoding (the keys' limits are Interest.from_wire's).
            size = len(frame.meta) + (0 if frame.data is None else len(frame.data))
            if size > PRE_HANDSHAKE_MAX:
                raise ProtocolError(
                    f"the peer sent an INTEREST frame of {size} bytes, more than the "
                    f"{PRE_HANDSHAKE_MAX} of a handshake frame (PRE_HANDSHAKE_MAX, a protocol "
                    "limit: an interest within MAX_INTEREST_KEYS and MAX_INTEREST_BYTES "
                    "always fits)"
                )
            value = frame.value()
            self.interest = None if not value else Interest.from_wire(value)
            ConnectionEngine.interest_epoch += 1
            return False
        if t == frames.BATCH:
            raise ProtocolError("BATCH frame from a peer that was not told this side reads them")
        raise ProtocolError(f"unexpected frame type 0x{t:02x} after the handshake")

    def receive_bye(self) -> None:
        """The peer said BYE: no more user writes; close once our queue is flushed."""
        self.bye_received = True
        if self.state is ConnState.OPEN or self.state is ConnState.HANDSHAKE:
            self._to(ConnState.CLOSING)

    def receive_eof(self) -> bool:
        """The peer closed its sending side.  True if that is a graceful close (a BYE
        was exchanged): flush what is queued, then :meth:`finish`.  False: the peer went
        away; ``error`` says how and the layer finishes now."""
        self.eof_received = True
        if self.bye_sent or self.bye_received:
            return True
        if self.state is ConnState.HANDSHAKE and self.error is None:
            self.error = HandshakeError(
                f"{self.peer} closed the connection during the handshake: does it expect "
                "TLS (tls=) or a token, or is it at its max_clients?"
            )
        return False

    def lost(self, exc: Optional[BaseException]) -> None:
        """The transport failed (reset, EOF without BYE): remember why."""
        if self.error is not None:
            return
        if self.state is ConnState.HANDSHAKE:
            how = f"reset the connection ({exc})" if exc is not None else "closed the connection"
            self.error = HandshakeError(
                f"{self.peer} {how} during the handshake: does it expect TLS "
                "(tls=) or a token, or is it at its max_clients?"
            )
        elif exc is not None:
            self.error = exc

    # -- sending --------------------------------------------------------------------------

    def _queued(self) -> int:
        return self.queue.queued

    def _owe(self, nbytes: int) -> None:
        """The peer asked for an answer of ``nbytes`` (a PONG, an ACK).  While more
        than ``max_buffer`` bytes wait unsent to it, the answers are counted: past
        :data:`OWED_MAX` the peer is asking without reading, and :class:`ProtocolError`
        closes the connection (a slow peer that reads is never near it: 4,096 answers
        owed while over the bound)."""
        if self.unsent() <= self.queue.max_buffer:
            self.owed = 0
            return
        self.owed += nbytes
        if self.owed > OWED_MAX:
            raise ProtocolError(
                f"the peer sent more than {OWED_MAX // 16} PING/SYNC frames while "
                f"{self.unsent()} bytes (over max_buffer={self.queue.max_buffer}) waited "
                "unsent to it: it asks for answers without reading them"
            )

    def control_bytes(self) -> bytes:
        """What the protocol itself wants sent (handshake frames, PONG).  Empty once
        our BYE is out: nothing may follow it."""
        out = self.protocol.data_to_send()
        if self._out:
            out += b"".join(self._out)
            self._out = []
        if self.bye_sent or self.state is ConnState.CLOSED:
            return b""
        return out

    def take_acks(self) -> List[bytes]:
        """ACK frames to push into the send queue, one entry each (requests are
        sequenced, ``"rq"``: they are numbered and replayed like values).  Pushed also
        when the link is down: the queue then waits for the resume."""
        acks, self._acks = self._acks, []
        return acks

    def sync_frame(self, rid: int) -> bytes:
        """A SYNC frame: the peer answers ACK ``rid`` once it has stored everything sent
        before it.  Raises :class:`NotSupported` for a peer that did not announce it."""
        if not self.protocol.peer_ack:
            raise NotSupported(
                f"{self.peer} runs protocol 1.0 and cannot acknowledge writes: upgrade it "
                "(or write without ack=True)"
            )
        self.requests.expect_ack(rid)
        return _pack_header(frames.SYNC, 0, 0, rid, 0, 0)

    def sent(self, now: float) -> None:
        """Bytes went to the peer."""
        self.last_send = now

    def ping(self, now: float) -> bytes:
        """What :attr:`Tick.PING` asks to send now: a RACK if one is due (resume), and
        a PING if the heartbeat rule wants one (empty after our BYE)."""
        if self.bye_sent or self.state is not ConnState.OPEN:
            return b""
        out = b""
        if self._ack_due():
            session = self.session
            assert session is not None
            session.acked_out = session.recv
            self._unacked_bytes = 0
            out = rack_frame(session.recv)
        interval = self.heartbeat
        if interval is None or self._ping_due(now, interval) or not out:
            self.last_ping = now
            out += _PING_FRAME
        return out

    def send_bye(self, now: float, linger: float) -> bytes:
        """Start closing: returns the BYE frame to send after everything queued (empty
        if the handshake never completed: then there is nothing to say goodbye to).
        After ``linger`` seconds without the peer's EOF, :meth:`tick` says
        :attr:`Tick.LINGER_OVER`.  Idempotent (a second call returns empty)."""
        if self.bye_sent or self.state is ConnState.CLOSED:
            return b""
        opened = self.protocol.is_open
        self.bye_sent = True
        self.polite = True
        self._to(ConnState.CLOSING)
        self.linger_deadline = now + max(linger, 0.0)
        return BYE_FRAME if opened else b""

    def refuse(self, reason: str, code: str, now: float, linger: float) -> bytes:
        """Refuse the connection during the handshake (host): the bytes to send (the
        preamble and a REFUSE frame).  Nothing may follow them; the host then
        half-closes and waits up to ``linger`` s for the client to hang up, so the
        REFUSE is not lost to a TCP reset."""
        self.protocol.refuse(reason, code)
        self.error = HandshakeError(f"refused {self.peer}: {reason}")
        out = self.protocol.data_to_send()
        self.bye_sent = True
        self._to(ConnState.CLOSING)
        self.linger_deadline = now + max(linger, 0.0)
        return out

    def fail(self, error: BaseException) -> bytes:
        """The peer broke the protocol or the handshake failed: the last bytes worth
        sending (a REFUSE explaining why, if the protocol queued one)."""
        self.error = error
        out = self.protocol.data_to_send() if not self.bye_sent else b""
        self.bye_sent = True
        if self.state is not ConnState.CLOSED:
            self._to(ConnState.CLOSING)
        return out

    def finish(self, error: Optional[BaseException] = None) -> None:
        """The connection is closed: fail outstanding requests, drop the queue."""
        if self.state is ConnState.CLOSED:
            return
        if error is not None and self.error is None:
            self.error = error
        self._to(ConnState.CLOSED)
        session = self.session
        if self.resumable:
            self.queue.detach()  # kept for the next link (adopt)
            assert session is not None
            session.suspend(self.interest)  # writes for the peer wait in it
            if session.keep_requests and self.protocol.peer_rq:
                # Sequenced: the request frames are replayed on the next link and the
                # answers arrive there (adopt); failed only if the session is lost.
                session.requests = self.requests
                self._closed_transport()
                return
        else:
            self.queue.clear()
        self._closed_transport()
        if session is not None and session.requests is self.requests:
            session.requests = None
        if len(self.requests):
            self.requests.fail_all(
                ConnectionClosed(
                    f"the connection to {self.peer} closed before it replied "
                    f"({self.error or 'closed'})"
                )
            )

    def _closed_transport(self) -> None:
        self.queue.shm = None
        self.protocol.close_shm()

    # -- time -----------------------------------------------------------------------------

    def tick(self, now: float, reading_paused: bool = False) -> Tick:
        """What is due at ``now``: a PING, or closing a dead / too slow peer.

        Call it at least every H/2 seconds while OPEN, and at the deadlines
        (:meth:`next_deadline`).  ``reading_paused``: we stopped reading this peer
        (backpressure), so its silence proves nothing.
        """
        state = self.state
        if state is ConnState.CLOSED:
            return Tick.NOTHING
        if state is ConnState.HANDSHAKE:
            if now >= self.handshake_deadline:
                if self.error is None:
                    self.error = HandshakeError(
                        f"{self.peer} did not complete the handshake within "
                        f"{self.handshake_timeout} s"
                    )
                return Tick.HANDSHAKE_TIMEOUT
            return Tick.NOTHING
        if self.linger_deadline is not None and now >= self.linger_deadline:
            return Tick.LINGER_OVER
        interval = self.heartbeat
        if interval is None:
            return Tick.NOTHING
        if reading_paused or self.peer_done:
            self.last_recv = now
        elif now - self.last_recv > 3 * interval:
            self.error = ConnectionClosed(
                f"{self.peer} sent nothing for {now - self.last_recv:.1f} s "
                f"(heartbeat {interval:g} s): declared dead"
            )
            return Tick.DEAD
        if state is ConnState.OPEN and (self._ping_due(now, interval) or self._ack_due()):
            return Tick.PING
        return Tick.NOTHING

    def _ping_due(self, now: float, interval: float) -> bool:
        return now - self.last_ping >= interval and (
            now - self.last_recv >= interval or now - self.last_send >= interval
        )

    def _ack_due(self) -> bool:
        session = self.session
        return session is not None and session.recv != session.acked_out

    def will_due(self) -> Optional[Tuple[str, bytes]]:
        """The peer's last will, if it is due: the connection was open and ended
        without the peer's BYE (a crash, a kill, a link declared dead, a protocol
        error, a slow consumer dropped) and not by our own polite close."""
        will = self.protocol.peer_will
        if will is None or self.bye_received or self.polite or not self.protocol.is_open:
            return None
        return will

    def next_deadline(self) -> Optional[float]:
        """The earliest time :meth:`tick` may close the connection (handshake or linger)."""
        if self.state is ConnState.HANDSHAKE:
            return self.handshake_deadline
        return self.linger_deadline

    def __repr__(self) -> str:
        return f"<ConnectionEngine {self.peer} {self.state.value}>"


def describe_peer(name: Optional[str], address: Any) -> str:
    """How messages name a peer: ``"cam-1 at 127.0.0.1:5000"``."""
    try:
        host, port = address[0], address[1]
    except (TypeError, IndexError):
        return f"{name or 'peer'} at {address}"
    return f"{name or 'peer'} at {host}:{port}"
