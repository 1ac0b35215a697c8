"""A threaded client's ``write``: the most frequent call of all, in one object.

Each :class:`~socketengine.sync.client.Client` has a :class:`ClientWriter`.  It holds
the client's current connection (``Client._conn`` reads and sets it), and the client
installs it as the instance's ``write`` (unless a subclass defines its own ``write``);
``Client.write`` calls it too, so the rule is written here once.  In the compiled build
(:mod:`socketengine.compiled`) this module is C: ``client.write(channel, value)`` of a
small value on an open link is then one call from the user's code into compiled code,
which encodes the value and stages it on the connection, with no interpreted frame and
no attribute lookup on the client (docs/benchmarks.md, "The compiled build").
"""

from __future__ import annotations

from typing import Any, Final, Optional, Protocol

from ..engine import ConnState
from ..errors import ConnectionClosed
from ..frames import value_item
from .connection import Connection

__all__ = ["WritingClient", "ClientWriter"]

#: Looked up once: an enum member read through its class is slow on the write path.
_OPEN: Final = ConnState.OPEN


class WritingClient(Protocol):
    """What a :class:`ClientWriter` uses of its client (the threaded ``Client``)."""

    def _live_conn(self) -> Connection: ...

    def _encode_for(self, conn: Any, channel: str, data: Any, compress: Optional[bool]) -> Any: ...

    def _send(self, parts: Any, nbytes: int, image: Optional[str] = None) -> None: ...


class ClientWriter:
    """``client.write(channel, data, ack=False, timeout=None, compress=None)``: see
    :meth:`socketengine.sync.client.Client.write`.

    :param client: the client it writes for.
    :param plain: the client compresses nothing (no ``compression=``): a small value
        needs no codec decision.
    """

    __slots__ = ("client", "plain", "conn")

    def __init__(self, client: WritingClient, plain: bool) -> None:
        self.client = client
        self.plain = plain
        #: The client's current link (``None`` before the first and while none is up).
        self.conn: Optional[Connection] = None

    def __call__(
        self,
        channel: Any,
        data: Any,
        ack: bool = False,
        timeout: Optional[float] = None,
        compress: Optional[bool] = None,
    ) -> None:
        """:meth:`socketengine.sync.client.Client.write` (the same parameters)."""
        client = self.client
        if ack:
            client._live_conn().write(channel, data, ack=True, timeout=timeout, compress=compress)
            return
        if self.plain and not compress:
            encoded = value_item(channel, data)  # TypeError before anything is sent
            if type(encoded) is bytes:  # a small value: the fast path
                conn = self.conn
                if conn is not None:
                    try:
                        conn.send_item(encoded)  # checks the link is open
                        return
                    except ConnectionClosed:
                        pass
                client._send(encoded, len(encoded))  # a BATCH item stands for a frame
                return
        else:
            encoded = client._encode_for(self.conn, channel, data, compress)
        if type(encoded) is bytes:
            parts: Any = encoded
            nbytes = len(encoded)
        else:
            parts, nbytes = encoded
        conn = self.conn
        if conn is not None and conn.engine.state is _OPEN:  # the common case
            try:
                conn.send_parts(parts, nbytes)
                return
            except ConnectionClosed:
                pass
        client._send(parts, nbytes)
