"""Image statistics and the endpoints' image bookkeeping.  Sans-I/O.

:class:`ImageStats` takes a lock and may be updated from any thread; :class:`ImageLedger`
keeps one per channel and direction, and :func:`read_latest` decodes a received image
once for every table that holds it.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any, Deque, Dict, Mapping, Optional

from .encoded import EncodedImage


class ImageStats:
    """Counters of one image channel in one direction (sans-I/O).

    The same class serves both sides:

    ============  ============================  ======================================
    counter       sending side                  receiving side
    ============  ============================  ======================================
    frames        images written by the user    images received from the socket
    delivered     images written to the socket  images handed to the user (decoded)
    dropped       replaced by a newer image before being delivered (conflation)
    bytes         encoded bytes of the delivered images (pixels for raw)
    fps           delivered images per second over the last ``window`` seconds
    ============  ============================  ======================================

    Thread-safe: every method takes an internal lock, so the user's thread, the I/O
    thread and a decoding thread may update the same object.  Timestamps are
    ``time.monotonic()`` unless ``now`` is passed (tests).
    """

    __slots__ = (
        "frames",
        "delivered",
        "dropped",
        "bytes",
        "codec",
        "window",
        "_times",
        "_first",
        "_lock",
    )

    def __init__(self, window: float = 2.0, max_samples: int = 4096) -> None:
        if window <= 0:
            raise ValueError("window must be > 0 seconds")
        self.frames = 0
        self.delivered = 0
        self.dropped = 0
        self.bytes = 0
        self.codec: Optional[str] = None
        self.window = float(window)
        self._times: Deque[float] = collections.deque(maxlen=max(2, max_samples))
        self._first: Optional[float] = None
        self._lock = threading.Lock()

    def record_frame(self, codec: Optional[str] = None) -> None:
        """An image entered: written by the user, or received; ``codec`` is its codec."""
        with self._lock:
            self.frames += 1
            if codec is not None:
                self.codec = codec

    def record_delivered(self, nbytes: int = 0, now: Optional[float] = None) -> None:
        """An image left: written to the socket, or handed to the user."""
        t = time.monotonic() if now is None else now
        with self._lock:
            self.delivered += 1
            self.bytes += nbytes
            self._times.append(t)
            if self._first is None:
                self._first = t

    def record_dropped(self, n: int = 1) -> None:
        """``n`` images were replaced by a newer one before being delivered."""
        with self._lock:
            self.dropped += n

    def fps(self, now: Optional[float] = None) -> float:
        """Delivered images per second over the last :attr:`window` seconds."""
        t = time.monotonic() if now is None else now
        with self._lock:
            return self._fps(t)

    def _fps(self, now: float) -> float:
        times = self._times
        start = now - self.window
        while times and times[0] <= start:
            times.popleft()
        n = len(times)
        if n == 0 or self._first is None:
            return 0.0
        if n == times.maxlen or now - self._first < self.window:
            # The window is not yet full of history (or holds only the newest samples):
            # rate between the first and last samples held.
            span = times[-1] - times[0]
            return (n - 1) / span if n > 1 and span > 0 else 0.0
        return n / self.window

    def snapshot(self, now: Optional[float] = None) -> Dict[str, Any]:
        """The counters as a dict: ``frames``, ``delivered``, ``dropped``, ``pending``
        (``frames - delivered - dropped``: queued or being decoded), ``bytes``, ``fps``
        (rounded to 0.1) and ``codec`` (of the latest image, or None)."""
        t = time.monotonic() if now is None else now
        with self._lock:
            return {
                "frames": self.frames,
                "delivered": self.delivered,
                "dropped": self.dropped,
                "pending": max(0, self.frames - self.delivered - self.dropped),
                "bytes": self.bytes,
                "fps": round(self._fps(t), 1),
                "codec": self.codec,
            }

    def __repr__(self) -> str:
        return f"ImageStats({self.snapshot()})"


def read_latest(channel: str, default: Any, *tables: Dict[str, Any]) -> Any:
    """``tables[0][channel]`` for the application: an encoded image is decoded, once.

    The decoded array replaces the encoded value in every one of ``tables`` that still
    holds that very value (a newer frame that arrived meanwhile is left alone), so the
    next read of any of them costs nothing.
    """
    value = tables[0].get(channel, default)
    if type(value) is not EncodedImage:
        return value
    decoded = value.decode()
    for table in tables:
        if table.get(channel) is value:
            table[channel] = decoded
    return decoded


class ImageLedger:
    """Per-endpoint image bookkeeping, shared by the threaded and asyncio layers.

    Sans-I/O: the endpoints call it when an image frame is written, sent, replaced,
    received and read; it keeps an :class:`ImageStats` per channel and direction, the
    newest encoded file per channel (for ``get_jpeg``) and which channels hold an image
    nobody has read yet (a newer frame then counts the old one as dropped).
    """

    def __init__(self) -> None:
        self.sent: Dict[str, ImageStats] = {}
        self.received: Dict[str, ImageStats] = {}
        self.encoded: Dict[str, EncodedImage] = {}  # newest JPEG/PNG file per channel
        self.unread: Dict[str, int] = {}  # channel -> bytes of its unread newest frame

    @staticmethod
    def _stats(table: Dict[str, ImageStats], channel: str) -> ImageStats:
        stats = table.get(channel)
        if stats is None:
            stats = table.setdefault(channel, ImageStats())
        return stats

    def written(self, channel: str, codec: str) -> None:
        """The application wrote a frame on ``channel`` (any thread)."""
        self._stats(self.sent, channel).record_frame(codec)

    def transmitted(self, channel: str, nbytes: int) -> None:
        """A frame of ``channel`` was handed to a socket / transport."""
        self._stats(self.sent, channel).record_delivered(nbytes)

    def replaced(self, channel: str) -> None:
        """A queued frame was replaced by a newer one before it was sent (conflation)."""
        self._stats(self.sent, channel).record_dropped()

    def queue_hook(self, channel: str, nbytes: int) -> None:
        """The send queues' image hook: a frame handed over (``nbytes``) or replaced
        before that (``-1``)."""
        if nbytes < 0:
            self.replaced(channel)
        else:
            self.transmitted(channel, nbytes)

    def arrived(self, channel: str, value: Any) -> Optional[EncodedImage]:
        """A frame was received; returns it if it is still encoded (JPEG/PNG)."""
        stats = self._stats(self.received, channel)
        encoded = value if type(value) is EncodedImage else None
        stats.record_frame(encoded.codec if encoded is not None else "raw")
        if channel in self.unread:
            stats.record_dropped()  # the previous frame was never read: superseded
        self.unread[channel] = getattr(value, "nbytes", 0)
        if encoded is not None:
            self.encoded[channel] = encoded
        return encoded

    def read(self, channel: str) -> None:
        """The application took the newest frame of ``channel`` (if it was unread)."""
        nbytes = self.unread.pop(channel, None)
        if nbytes is not None:
            self._stats(self.received, channel).record_delivered(nbytes)

    def superseded(self, channel: str) -> None:
        """A value that is not an image became the latest on ``channel``: the file kept
        for :meth:`get_jpeg` goes (it would escape ``max_stored``, which counts the new
        value), and a frame nobody read counts as dropped."""
        self.encoded.pop(channel, None)
        if self.unread.pop(channel, None) is not None:
            self._stats(self.received, channel).record_dropped()

    def forget(self, latest: Mapping[str, Any]) -> None:
        """Channels left the endpoint's latest values (a forgotten client's): so do
        their files and unread marks."""
        for table in (self.encoded, self.unread):
            for channel in [ch for ch in table if ch not in latest]:
                del table[channel]

    def get_jpeg(self, channel: str) -> Optional[bytes]:
        """The newest encoded file received on ``channel``, or ``None``."""
        enc = self.encoded.get(channel)
        return None if enc is None else enc.tobytes()

    def snapshot(self) -> Dict[str, Any]:
        """``{"sent": {channel: stats}, "received": {channel: stats}}``."""
        return {
            "sent": {ch: s.snapshot() for ch, s in list(self.sent.items())},
            "received": {ch: s.snapshot() for ch, s in list(self.received.items())},
        }
