"""What Host and Client share: the loop, limits, timeouts, and frame dispatch."""

from __future__ import annotations

import logging
import threading
from typing import Any, List, TypeVar, Union

from .. import frames
from ..errors import EndpointClosed
from ..frames import Frame
from ..protocol import token_bytes
from .connection import Connection
from .loop import Loop

logger = logging.getLogger("socketengine")

_E = TypeVar("_E", bound="Endpoint")

#: Read size floor, bytes: the seed's 256-byte reads would cripple throughput.
MIN_READ_SIZE = 64 * 1024


class Endpoint:
    """Base of :class:`Host` and :class:`Client` (not used directly)."""

    _kind = "endpoint"

    def __init__(
        self,
        addr: str,
        port: int,
        timeout: float,
        size: int,
        *,
        token: Union[str, bytes, None],
        max_message: int,
        max_buffer: int,
    ) -> None:
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port must be an int from 0 to 65535, not {port!r}")
        if max_message < 1024:
            raise ValueError("max_message must be at least 1024 bytes")
        self.addr = addr
        self._port = port
        self.timeout = float(timeout)
        self.size = int(size)
        self.max_message = int(max_message)
        self.max_buffer = int(max_buffer)
        self._token = token_bytes(token)
        self._loop = Loop(f"socketengine-{self._kind}")
        self._state_lock = threading.Lock()
        self.opened = False
        self.stopped = False
        self.started = False

    # -- seed-compatible lifecycle --------------------------------------------------------

    @property
    def read_size(self) -> int:
        """Bytes offered to each receive call: ``max(size, 64 KiB)``."""
        return max(self.size, MIN_READ_SIZE)

    def set_timeout(self, time: float) -> None:
        """Set the timeout in seconds for blocking calls (connect attempts, full send
        buffers, the linger of ``close()``)."""
        if time is None or time < 0:
            raise ValueError("timeout must be a number of seconds >= 0")
        self.timeout = float(time)

    def start(self: _E) -> _E:
        """Open the endpoint if it is not open yet; return it (so calls can chain).

        The I/O thread already runs from ``open()``: data is received and stored
        from then on.  Calling ``start()`` again is harmless.
        """
        self._check_not_closed()
        if not self.opened:
            self.open()  # type: ignore[attr-defined]
        self.started = True
        return self

    def __enter__(self: _E) -> _E:
        if not self.opened:
            self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()  # type: ignore[attr-defined]

    def _check_not_closed(self) -> None:
        if self.stopped:
            raise EndpointClosed(f"{self!r} is closed; create a new {self._kind}")

    def _check_open(self) -> None:
        if self.stopped:
            raise EndpointClosed(f"cannot write: {self!r} is closed; create a new {self._kind}")
        if not self.opened:
            raise EndpointClosed(f"cannot write: {self!r} is not open yet; call open() or start()")

    # -- images ---------------------------------------------------------------------------

    @staticmethod
    def _check_image(img: Any) -> Any:
        """Validate an image: a 2-D (gray) or 3-D (H, W, 1|3|4 channels) numpy array."""
        import sys

        np = sys.modules.get("numpy")
        if np is None or not isinstance(img, np.ndarray):
            raise TypeError(
                f"an image must be a numpy array (H, W) or (H, W, C), not {type(img).__qualname__}"
            )
        if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (1, 3, 4)):
            raise ValueError(f"an image must have shape (H, W) or (H, W, 1|3|4), not {img.shape}")
        if img.dtype.kind not in "biuf":
            raise TypeError(f"an image must have a numeric dtype, not {img.dtype}")
        return img

    # -- loop-thread callbacks from connections -----------------------------------------

    def _on_ready(self, conn: Connection) -> None:
        """Handshake completed (loop thread)."""

    def _on_closed(self, conn: Connection) -> None:
        """Connection closed (loop thread)."""

    def _store(self, conn: Connection, channel: str, value: Any) -> None:
        """Record a received value (loop thread)."""
        conn.values[channel] = value

    def _dispatch(self, conn: Connection, events: List[Frame]) -> None:
        """Handle application frames from ``conn`` (loop thread).

        A malformed value raises ``ProtocolError``, which closes ``conn`` only.
        """
        for frame in events:
            t = frame.type
            if t == frames.DATA:
                value = frame.value()
                conn.messages_in += 1
                self._store(conn, frame.channel, value)
            elif t == frames.BYE:
                conn._on_bye()
                return
            elif t == frames.REQUEST:
                conn._send_raw(
                    b"".join(
                        frames.encode_value_frame(
                            frames.REPLY_ERROR,
                            frame.channel,
                            f"no handler for requests on channel {frame.channel!r}",
                            fid=frame.id,
                        )
                    )
                )
            else:
                logger.debug("%r: ignoring frame type 0x%02x", self, t)
