"""One connection's protocol state machine (sans-I/O): handshake, authentication, pings.

Feed it received bytes through :attr:`Protocol.decoder` (``get_buffer`` /
``buffer_updated``), then call :meth:`Protocol.events` for the application frames
(``DATA``, ``REQUEST``, ``REPLY``, ``REPLY_ERROR``, ``BYE``).  Whatever the protocol
itself wants to send (preamble, handshake frames, ``PONG``) is returned by
:meth:`Protocol.data_to_send`.  It never touches a socket, a thread or a clock.

Handshake (docs/protocol.md, "Handshake")::

    client                                   host
    PREAMBLE, HELLO{v, name, nonce}  ->
                                     <-  PREAMBLE, then
                                         WELCOME{v, id}                  (no token)
                                         CHALLENGE{nonce}                (token set)
    AUTH{mac}                        ->
                                     <-  WELCOME{v, id, mac} | REFUSE{reason}
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import os
from typing import Any, Dict, Final, List, Optional, Tuple

from . import codec, compression, frames, shm
from .errors import AuthenticationError, HandshakeError, HostBusy, ProtocolError
from .frames import Frame
from .limits import MAX_NAME_BYTES, MIN_READ_SIZE, PRE_HANDSHAKE_MAX
from .patterns import Interest
from .session import SID_SIZE, Session, SessionTable

__all__ = ["Role", "State", "Protocol", "token_bytes"]

logger: Final = logging.getLogger("socketengine")

NONCE_SIZE: Final = 16
_PONG_FRAME: Final = b"".join(frames.encode_frame(frames.PONG))
_CLIENT_LABEL: Final = b"socketengine/1 client"
_HOST_LABEL: Final = b"socketengine/1 host"


class Role(enum.Enum):
    HOST = "host"
    CLIENT = "client"


class State(enum.Enum):
    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSED = "closed"


def token_bytes(token: object) -> Optional[bytes]:
    """Normalise a ``token=`` argument (str is UTF-8 encoded; bytes-like copied; None).

    Takes ``object``: it is the check of a user's argument, with its own message."""
    if token is None:
        return None
    if isinstance(token, str):
        token = token.encode("utf-8")
    if not isinstance(token, (bytes, bytearray)) or not token:
        raise TypeError("token must be a non-empty str or bytes")
    return bytes(token)


def _mac(token: bytes, label: bytes, first: bytes, second: bytes) -> bytes:
    return hmac.new(token, label + first + second, hashlib.sha256).digest()


#: A last will's encoded value may be at most this large (it rides in HELLO, before the
#: peer is authenticated, under the 64 KiB pre-handshake limit).
MAX_WILL_BYTES: Final = 16 * 1024
#: A last will's channel name may be at most this many UTF-8 bytes: with a name, an
#: interest and a will at their limits, a HELLO then still fits the 64 KiB a host reads
#: before the handshake (a longer one made the host refuse the HELLO as too large).
MAX_WILL_CHANNEL_BYTES: Final = 1024


def encode_will(channel: str, value: Any) -> Tuple[str, bytes]:
    """A client's last will, checked and encoded for its HELLO (``TypeError`` /
    ``ValueError`` now, not at the handshake)."""
    if len(frames.channel_bytes(channel)) > MAX_WILL_CHANNEL_BYTES:
        raise ValueError(
            f"a last will's channel name may be at most {MAX_WILL_CHANNEL_BYTES} UTF-8 "
            "bytes (it rides in the handshake): use a shorter channel for the will"
        )
    meta, buffers, _ = codec.encode(value)
    if buffers:
        raise TypeError("a last will cannot hold numpy arrays (send them as values instead)")
    if len(meta) > MAX_WILL_BYTES:
        raise ValueError(f"a last will must encode to at most {MAX_WILL_BYTES} bytes")
    return channel, meta


def _check_will(will: Any) -> Optional[Tuple[str, bytes]]:
    if will is None:
        return None
    if (
        type(will) is not list
        or len(will) != 2
        or type(will[0]) is not str
        or type(will[1]) is not bytes
        or len(will[1]) > MAX_WILL_BYTES
    ):
        raise ProtocolError("HELLO will is not [channel, encoded value]")
    try:
        codec.decode(will[1], None)
    except ValueError as exc:
        raise ProtocolError(f"HELLO will value is malformed: {exc}") from None
    return will[0], will[1]


def _meta(frame: Frame) -> Dict[str, Any]:
    value = frame.value()
    if type(value) is not dict:
        raise ProtocolError(f"handshake frame 0x{frame.type:02x} does not carry a map")
    return value


def _frame(ftype: int, value: Any) -> bytes:
    meta, _, _ = codec.encode(value)
    return b"".join(frames.encode_frame(ftype, "", meta))


class Protocol:
    """The state of one connection, for either role.

    :param role: :attr:`Role.HOST` or :attr:`Role.CLIENT`.
    :param name: the client's name, sent in HELLO (client role).
    :param token: shared secret; when set, both sides must prove they know it.
    :param max_message: largest accepted frame, bytes.
    :param read_size: what each receive is offered on a busy stream, bytes
        (:class:`~socketengine.frames.FrameDecoder`).
    :param session: an id the host gives the connection (host role; sent in WELCOME).
    :param heartbeat: this side's heartbeat H in seconds (``None``: none), announced in
        HELLO / WELCOME (protocol 1.1) so the peer knows how often it will be pinged
        when silent; the peer's is :attr:`peer_heartbeat` (``None`` from a 1.0 peer).
    """

    def __init__(
        self,
        role: Role,
        *,
        name: Optional[str] = None,
        token: Optional[bytes] = None,
        max_message: int = frames.DEFAULT_MAX_MESSAGE,
        read_size: int = MIN_READ_SIZE,
        session: int = 0,
        heartbeat: Optional[float] = None,
        will: Optional[Tuple[str, bytes]] = None,
        interest: Optional[Interest] = None,
        resume: Optional[Session] = None,
        sessions: Optional[SessionTable] = None,
        shm_threshold: Optional[int] = None,
    ) -> None:
        self.role = role
        #: Client role: the client's session, presented in HELLO (protocol 1.2) as its
        #: id (``b""`` before the first WELCOME) and its count of sequenced frames
        #: received; ``None``: resume is not announced.
        self.resume = resume
        #: Host role: where sessions are opened and found (``None``: no resume).
        self.sessions = sessions
        #: Both sides announced resume (protocol 1.2): sequence numbers are on.
        self.peer_resume = False
        #: The session id the host gave / found (``b""``: none).
        self.resume_sid = b""
        #: The peer's count of sequenced frames received, from HELLO / WELCOME.
        self.peer_recv = 0
        #: Both sides announced ``"rq"`` with ``"rs"``: requests, replies, SYNC and ACK
        #: frames are sequenced (numbered and replayed) too.
        self.peer_rq = False
        #: The handshake resumed an earlier session (else a new one starts at 0).
        self.resumed = False
        #: The session this connection carries (host role: opened or resumed at
        #: WELCOME; client role: ``resume``), used only if :attr:`peer_resume`.
        self.resume_session: Optional[Session] = resume
        # Shared memory ("shm", docs/protocol.md 8.9): None when this side turned it off.
        self._shm_threshold = shm_threshold if shm.available() else None
        self._shm_peer: Optional[Tuple[int, bytes]] = None
        self._hello_later: Tuple[Any, Any] = (None, None)  # HELLO's "shm", "interest"
        #: Set once the handshake proved the peer is on this machine, as this user:
        #: large data sections go to it through shared memory / come from it that way.
        self.shm_writer: Optional[shm.ShmWriter] = None
        self.shm_reader: Optional[shm.ShmReader] = None
        self.heartbeat = heartbeat
        self.peer_heartbeat: Optional[float] = None
        #: The client's last will ``(channel, encoded value)`` (host role), see
        #: :func:`encode_will`.
        self.peer_will: Optional[Tuple[str, bytes]] = None
        #: The channels the client wants from broadcasts (host role); ``None``: all.
        self.peer_interest: Optional[Interest] = None
        #: The peer reads BATCH frames (it announced ``"batch"``, protocol 1.1).
        self.peer_batch = False
        #: The peer answers SYNC with ACK (it announced ``"ack"``, protocol 1.1).
        self.peer_ack = False
        #: The peer's ``max_message`` (``"mm"``, protocol 1.1), or ``None`` (1.0 peer).
        self.peer_max_message: Optional[int] = None
        #: The compression codecs the peer can decode (``"z"``, protocol 1.1), known
        #: names only; empty: never send it a compressed frame.
        self.peer_codecs: Tuple[str, ...] = ()
        self.state = State.HANDSHAKE
        self.name = name
        self.peer_name: Optional[str] = None
        self.session = session
        self._token = token
        self._nonce = os.urandom(NONCE_SIZE)
        self._peer_nonce = b""
        self._challenged = False
        # Before the handshake completes, frames are tiny: a small limit stops a peer
        # that has not proven anything from making us allocate max_message bytes.
        self.decoder = frames.FrameDecoder(min(max_message, PRE_HANDSHAKE_MAX), read_size)
        # ... and the frames behind the one that opens the connection must be sized
        # against max_message, not that small limit (events() resumes the decoder).
        self.decoder.pause_after_handshake = True
        self._max_message = max_message
        self._out: List[bytes] = [frames.PREAMBLE]
        #: PINGs read and not answered yet (:meth:`data_to_send` adds their PONGs).
        self.pongs_due = 0
        if role is Role.CLIENT:
            self._out.append(
                _frame(
                    frames.HELLO,
                    self._announce(
                        {"name": name, "nonce": self._nonce}
                        if will is None
                        else {"name": name, "nonce": self._nonce, "will": list(will)},
                        interest,
                        None if resume is None else [resume.sid, resume.recv],
                    ),
                )
            )

    def _announce(
        self, info: Dict[str, Any], interest: Optional[Interest] = None, rs: Any = None
    ) -> Dict[str, Any]:
        """What every HELLO / WELCOME carries: the version, and this side's heartbeat."""
        out: Dict[str, Any] = {"v": 1, **info}
        if self.heartbeat is not None:
            out["hb"] = float(self.heartbeat)
        if interest is not None and not interest.everything:
            out["interest"] = interest.to_wire()
        out["batch"] = True
        out["ack"] = True
        out["mm"] = self._max_message
        z = compression.available()
        if z:
            out["z"] = z
        if rs is not None:
            out["rs"] = rs
            if self.role is Role.CLIENT or self.peer_rq:
                out["rq"] = True
        if self.role is Role.CLIENT and self._shm_threshold is not None:
            ident = shm.announce()
            if ident is not None:
                out["shm"] = ident
        return out

    def _note_peer(self, meta: Dict[str, Any]) -> None:
        hb = meta.get("hb")
        if isinstance(hb, (int, float)) and not isinstance(hb, bool) and hb > 0:
            self.peer_heartbeat = float(hb)
        self.peer_batch = meta.get("batch") is True
        self.peer_ack = meta.get("ack") is True
        mm = meta.get("mm")
        if type(mm) is int and mm > 0:
            self.peer_max_message = mm
        z = meta.get("z")
        if z is not None:
            compression.negotiate((), z)  # ProtocolError unless a list of <= 32 str
            self.peer_codecs = tuple(c for c in compression.CODECS if c in z)

    @property
    def is_open(self) -> bool:
        return self.state is State.OPEN

    def data_to_send(self) -> bytes:
        """Bytes the protocol itself wants sent (handshake, pongs); empty when none."""
        if self.pongs_due:
            self._out.append(_PONG_FRAME * self.pongs_due)
            self.pongs_due = 0
        if not self._out:
            return b""
        out = b"".join(self._out)
        self._out = []
        return out

    def send_ping(self) -> None:
        self._out.append(b"".join(frames.encode_frame(frames.PING)))

    def events(self) -> List[Frame]:
        """Application frames decoded so far; handshake frames are consumed here.

        Raises :class:`HandshakeError` / :class:`AuthenticationError` /
        :class:`ProtocolError`; the connection must then be closed.
        """
        received = self.decoder.take()
        if not received:
            return received
        if self.state is State.OPEN:
            if self.decoder.control:
                self.decoder.control = False
                return self._filter(received)
            return received
        out: List[Frame] = []
        while received:
            for i, frame in enumerate(received):
                if self.state is State.OPEN:
                    out.extend(self._filter(received[i:]))
                    break
                if self.state is State.CLOSED:
                    return out
                self._handshake(frame)
            # The decoder paused after the handshake frame; parse what follows it.
            received = self.decoder.resume()
        return out

    def _filter(self, received: List[Frame]) -> List[Frame]:
        out = []
        for i, frame in enumerate(received):
            t = frame.type
            if t == frames.PING:
                self.pongs_due += 1
            elif t == frames.PONG:
                pass
            elif t < frames.DATA:
                raise ProtocolError(f"handshake frame 0x{t:02x} after the handshake")
            elif frame.flags & frames.FLAG_SHM:
                out.append(self._from_shm(frame))
                if i + 1 < len(received):
                    # One shared-memory frame per call: its slot is copied out only
                    # once the frames before it were handled, so a burst of descriptors
                    # reuses one recycled receive buffer instead of allocating one per
                    # frame.  The rest goes back to the decoder (the layer calls again
                    # while ``decoder.frames`` is not empty).
                    self.decoder.put_back(received[i + 1 :])
                    break
            else:
                out.append(frame)
        return out

    # -- shared memory (protocol 1.1 "shm") -------------------------------------------

    def _from_shm(self, frame: Frame) -> Frame:
        """The plain DATA frame a shared memory descriptor stands for (copied out)."""
        reader = self.shm_reader
        if reader is None or frame.type != frames.DATA or frame.data is None:
            raise ProtocolError("a shared memory frame, and shared memory was not negotiated")
        data = reader.read(frame.data, self._max_message, self.decoder.body)
        flags = frame.flags & ~frames.FLAG_SHM
        return Frame(frames.DATA, flags, frame.channel, frame.id, frame.meta, data)

    def _start_shm(self, peer: Tuple[int, bytes]) -> None:
        assert self._shm_threshold is not None
        self.shm_reader = shm.ShmReader(*peer)
        try:
            self.shm_writer = shm.ShmWriter(self._shm_threshold)
        except OSError as exc:  # pragma: no cover - memfd refused right after it worked
            logger.debug("shared memory: this side sends through the socket: %s", exc)
        logger.debug("shared memory in use with %s (pid %d)", self.peer_name or "the peer", peer[0])

    def close_shm(self) -> None:
        """Release this connection's segments and mappings (idempotent)."""
        writer, reader = self.shm_writer, self.shm_reader
        self.shm_writer = self.shm_reader = None
        if writer is not None:
            writer.close()
        if reader is not None:
            reader.close()

    # -- handshake ------------------------------------------------------------------

    def _open(self) -> None:
        self.state = State.OPEN
        self.decoder.max_message = self._max_message
        self.decoder.pause_after_handshake = False

    def _handshake(self, frame: Frame) -> None:
        t = frame.type
        if t == frames.REFUSE:
            reason = str(_meta(frame).get("reason", "refused"))
            self.state = State.CLOSED
            code = _meta(frame).get("code")
            if code == "auth":
                raise AuthenticationError(f"the host refused the token: {reason}")
            if code == "busy":
                raise HostBusy(f"the peer refused the connection: {reason}")
            raise HandshakeError(f"the peer refused the connection: {reason}")
        if self.role is Role.HOST:
            self._host_handshake(frame)
        else:
            self._client_handshake(frame)

    def _host_handshake(self, frame: Frame) -> None:
        t = frame.type
        if t == frames.HELLO and not self._peer_nonce:
            meta = _meta(frame)
            nonce = meta.get("nonce")
            name = meta.get("name")
            if type(nonce) is not bytes or len(nonce) != NONCE_SIZE:
                raise ProtocolError("HELLO without a 16-byte nonce")
            if name is not None and (
                type(name) is not str or len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES
            ):
                raise ProtocolError(f"HELLO name is not a string of at most {MAX_NAME_BYTES} bytes")
            self._note_peer(meta)
            self._note_resume_hello(meta.get("rs"))
            self.peer_rq = self.peer_resume and meta.get("rq") is True
            self.peer_will = _check_will(meta.get("will"))
            # Looked at once the token (if any) is proven, in _welcome: an
            # unauthenticated peer makes this host open no file and build no pattern
            # index (interests cost many times their wire size).
            self._hello_later = (meta.get("shm"), meta.get("interest"))
            self._peer_nonce = nonce
            self.peer_name = name
            if self._token is None:
                self._welcome(None)
            else:
                self._challenged = True
                self._out.append(_frame(frames.CHALLENGE, {"nonce": self._nonce}))
        elif t == frames.AUTH and self._challenged and self._token is not None:
            mac = _meta(frame).get("mac")
            expected = _mac(self._token, _CLIENT_LABEL, self._nonce, self._peer_nonce)
            if type(mac) is not bytes or not hmac.compare_digest(mac, expected):
                self._out.append(
                    _frame(frames.REFUSE, {"code": "auth", "reason": "wrong or missing token"})
                )
                self.state = State.CLOSED
                raise AuthenticationError(
                    f"client {self.peer_name or ''} sent a wrong token; connection refused"
                )
            self._welcome(_mac(self._token, _HOST_LABEL, self._peer_nonce, self._nonce))
        else:
            raise ProtocolError(f"unexpected frame 0x{t:02x} during the handshake")

    def _note_resume_hello(self, rs: Any) -> None:
        """HELLO's ``"rs"``: ``[session id (bin 16, or empty), received (int >= 0)]``."""
        if rs is None:
            return
        if (
            type(rs) is not list
            or len(rs) != 2
            or type(rs[0]) is not bytes
            or len(rs[0]) not in (0, SID_SIZE)
            or type(rs[1]) is not int
            or rs[1] < 0
        ):
            raise ProtocolError("HELLO rs is not [session id, received count]")
        self.resume_sid = rs[0]
        self.peer_recv = rs[1]
        self.peer_resume = self.sessions is not None

    def _welcome(self, mac: Optional[bytes]) -> None:
        announced_shm, interest = self._hello_later
        self._hello_later = (None, None)
        if interest is not None:
            self.peer_interest = Interest.from_wire(interest)
        if self._shm_threshold is not None and announced_shm is not None:
            self._shm_peer = shm.check_peer(announced_shm)
        rs = None
        sessions = self.sessions
        session = None
        if self.peer_resume and sessions is not None:
            session, self.resumed = sessions.open(self.resume_sid, self.peer_name)
            if not self.resumed:
                self.peer_recv = 0  # a new session: nothing of it was received yet
            self.resume_session = session
            self.resume_sid = session.sid
            rs = [session.sid, session.recv if self.resumed else 0, self.resumed]
        if not self.resumed and sessions is not None and sessions.admit is not None:
            refusal = sessions.admit()  # a full host: only a resuming client gets in
            if refusal is not None:
                if session is not None:
                    sessions.drop(session)
                self.refuse(*refusal)
                raise HandshakeError(f"refused {self.peer_name or 'a client'}: {refusal[0]}")
        info: Dict[str, Any] = self._announce({"id": self.session}, None, rs)
        if mac is not None:
            info["mac"] = mac
        if self._shm_peer is not None:
            ident = shm.announce()
            if ident is not None:
                # Only after the token (if any) was proven: never to another user.
                info["shm"] = ident
                info["shm_ok"] = True
                self._start_shm(self._shm_peer)
        self._out.append(_frame(frames.WELCOME, info))
        self._open()

    def refuse(self, reason: str, code: str = "refused") -> None:
        """Queue a REFUSE frame (host role, e.g. too many clients) and close."""
        self._out.append(_frame(frames.REFUSE, {"code": code, "reason": reason}))
        self.state = State.CLOSED

    def _client_handshake(self, frame: Frame) -> None:
        t = frame.type
        if t == frames.CHALLENGE and not self._challenged:
            nonce = _meta(frame).get("nonce")
            if type(nonce) is not bytes or len(nonce) != NONCE_SIZE:
                raise ProtocolError("CHALLENGE without a 16-byte nonce")
            if self._token is None:
                self.state = State.CLOSED
                raise AuthenticationError(
                    "the host requires a token: pass token= with the host's shared secret"
                )
            self._challenged = True
            self._peer_nonce = nonce
            self._out.append(
                _frame(frames.AUTH, {"mac": _mac(self._token, _CLIENT_LABEL, nonce, self._nonce)})
            )
        elif t == frames.WELCOME:
            meta = _meta(frame)
            if self._token is not None:
                mac = meta.get("mac")
                if not self._challenged or type(mac) is not bytes:
                    self.state = State.CLOSED
                    raise AuthenticationError(
                        "the host did not ask for the token: it is not the host you configured "
                        "(or it runs without token=)"
                    )
                expected = _mac(self._token, _HOST_LABEL, self._nonce, self._peer_nonce)
                if not hmac.compare_digest(mac, expected):
                    self.state = State.CLOSED
                    raise AuthenticationError("the host could not prove it knows the token")
            session = meta.get("id", 0)
            self.session = session if type(session) is int else 0
            self._note_peer(meta)
            self._note_resume_welcome(meta.get("rs"))
            self.peer_rq = self.peer_resume and meta.get("rq") is True
            if self._shm_threshold is not None and meta.get("shm_ok") is True:
                peer = shm.check_peer(meta.get("shm"))
                if peer is not None:
                    self._start_shm(peer)
            self._open()
        else:
            raise ProtocolError(f"unexpected frame 0x{t:02x} during the handshake")

    def _note_resume_welcome(self, rs: Any) -> None:
        """WELCOME's ``"rs"``: ``[session id (bin 16), received (int >= 0), resumed]``."""
        if rs is None or self.resume is None:
            return  # a host without resume: no sequence numbers
        if (
            type(rs) is not list
            or len(rs) != 3
            or type(rs[0]) is not bytes
            or len(rs[0]) != SID_SIZE
            or type(rs[1]) is not int
            or rs[1] < 0
            or type(rs[2]) is not bool
        ):
            raise ProtocolError("WELCOME rs is not [session id, received count, resumed]")
        if rs[2] and rs[0] != self.resume.sid:
            raise ProtocolError("WELCOME resumes a session this client did not present")
        if not rs[2] and rs[1]:
            raise ProtocolError("WELCOME starts a new session with a non-zero count")
        self.peer_resume = True
        self.resume_sid = rs[0]
        self.peer_recv = rs[1]
        self.resumed = rs[2]
