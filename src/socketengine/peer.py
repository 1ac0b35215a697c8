"""What every connection has, whichever its I/O layer: the peer's latest values,
its names, counters and the state its engine is in.

Both ``socketengine.Connection`` (threaded) and ``socketengine.aio.Connection`` build
on :class:`PeerView`; they add only how bytes move and how callers wait.
"""

from __future__ import annotations

import time
from typing import Any, Dict, Optional, Tuple

from .compiled import mypyc_attr
from .engine import ConnectionEngine, ConnState, describe_peer
from .images import EncodedImage, read_latest
from .patterns import Interest
from .protocol import Protocol

__all__ = ["PeerView"]


# The asyncio layer's connection is an interpreted subclass (compiled build).
@mypyc_attr(allow_interpreted_subclasses=True)
class PeerView:
    """The layer-independent half of a connection.

    Attributes: ``address`` (the peer's ``(host, port)``), ``values`` (the latest value
    received on each channel from this peer), ``connected_at`` / ``closed_at``
    (``time.time()`` of accept and close), and the counters ``bytes_in``,
    ``bytes_out``, ``messages_in``, ``messages_out`` and ``writes_paced`` (writes that
    waited for the flush to catch up: threaded layer, ``sendqueue.PACE_ABOVE``).
    """

    engine: ConnectionEngine
    address: Tuple[Any, ...]
    _latest: Dict[str, Any]

    def _init_peer(self, engine: ConnectionEngine, latest: Dict[str, Any]) -> None:
        self.engine = engine
        self._queue = engine.queue
        self._latest = latest  # the endpoint's latest value per channel (any peer)
        self.values: Dict[str, Any] = {}
        self.connected_at = time.time()
        self.closed_at: Optional[float] = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.messages_in = 0
        self.messages_out = 0
        self.writes_paced = 0
        self._encoded: Dict[str, EncodedImage] = {}  # newest JPEG/PNG file per channel
        #: ``time.time()`` when the latest value on each channel arrived (the monitor's
        #: "updated"; a value re-sent unchanged still updates it).
        self.received_at: Dict[str, float] = {}
        #: Through a relaying host: the name of the client that wrote the latest value
        #: on each channel (``"host:port"`` for an unnamed one).
        self.senders: Dict[str, str] = {}

    @property
    def protocol(self) -> Protocol:
        """The handshake state machine (the peer's name, session id, heartbeat)."""
        return self.engine.protocol

    @property
    def name(self) -> Optional[str]:
        """The name the client gave in its handshake (``Client(name=...)``), or ``None``."""
        return self.engine.protocol.peer_name

    @property
    def session(self) -> int:
        """The id the host gave this connection (unique per host, in accept order)."""
        return self.engine.protocol.session

    @property
    def error(self) -> Optional[BaseException]:
        """Why the connection ended, if it ended badly (``None`` otherwise)."""
        return self.engine.error

    @property
    def state(self) -> ConnState:
        """``HANDSHAKE``, ``OPEN``, ``CLOSING`` or ``CLOSED``."""
        return self.engine.state

    @property
    def interest(self) -> Optional[Interest]:
        """The channels this peer wants from broadcasts (``None``: all of them)."""
        return self.engine.interest

    def wants(self, channel: str) -> bool:
        """Whether a broadcast (``write_all``, a relayed write) on ``channel`` goes to
        this peer: its declared interest, if any, matches it."""
        interest = self.engine.interest
        return interest is None or interest.wants(channel)

    @property
    def images_sent(self) -> int:
        """Image frames accepted for sending (a replaced one counts in ``images_dropped``)."""
        return self._queue.images_sent

    @property
    def resume_lost(self) -> int:
        """Frames this side had written in this connection's session (protocol 1.2)
        that were lost at a resume: writes for a client whose link was down beyond
        what its held session keeps (``max_buffer``), and frames that had left the
        replay window (none since the window has flow control; kept for peers of
        older versions and as a safety net).  Each such resume also logs a WARNING.
        0 without a session.
        A frame is one value, except that small values written in a burst travel as
        one BATCH frame, counted once here."""
        session = self.engine.session
        return 0 if session is None else session.lost

    @property
    def images_dropped(self) -> int:
        """Image frames replaced by a newer one before they were sent (conflation)."""
        return self._queue.images_dropped

    @property
    def reading_paused(self) -> bool:  # pragma: no cover - defined by each layer
        """True while backpressure stops this connection from being read."""
        raise NotImplementedError

    def _queued_bytes(self) -> int:
        """Bytes written to this peer and not taken yet."""
        return self._queue.queued

    def get(self, channel: str, default: Any = None) -> Any:
        """The latest value this peer sent on ``channel``, or ``default``.

        An image sent compressed is returned decoded (a numpy array; decoded once, for
        this connection and the endpoint's latest value alike).
        """
        return read_latest(channel, default, self.values, self._latest)

    def get_jpeg(self, channel: str = "image") -> Optional[bytes]:
        """The newest JPEG/PNG file this peer sent on ``channel``, still encoded."""
        enc = self._encoded.get(channel)
        return None if enc is None else enc.tobytes()

    def stats(self) -> Dict[str, Any]:
        """Counters of this connection (bytes and messages each way, images, queue)."""
        return {
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "messages_in": self.messages_in,
            "messages_out": self.messages_out,
            "images_sent": self.images_sent,
            "images_dropped": self.images_dropped,
            "queued_bytes": self._queued_bytes(),
            "reading_paused": self.reading_paused,
            "resume_lost": self.resume_lost,
            "writes_paced": self.writes_paced,
        }

    def _origin(self) -> str:
        """How relayed frames name this peer: its name, or ``"host:port"``."""
        name = self.name
        if name is not None:
            return name
        try:
            return f"{self.address[0]}:{self.address[1]}"
        except (TypeError, IndexError):
            return str(self.address)

    def _peer(self) -> str:
        return describe_peer(self.name, self.address)
