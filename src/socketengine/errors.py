"""The exception tree of socketengine.

Catch :class:`SocketEngineError` for anything the library raises on purpose.
Network failures are :class:`ConnectionError` subclasses, so code written for
plain sockets keeps working::

    SocketEngineError
    ├── ProtocolError            a peer sent bytes that break the wire protocol
    │   └── MessageTooBig        a frame is larger than ``max_message``
    ├── RemoteError              the peer's request handler raised
    ├── WriteTimeout             the peer did not take (or acknowledge) a write in time
    ├── NotSupported             the peer's protocol version lacks the feature used
    └── EndpointClosed           the endpoint was closed by the user
    ConnectionError
    └── SocketEngineConnectionError (also a SocketEngineError)
        ├── ConnectTimeout       ``connect_timeout`` elapsed before the host accepted
        ├── HandshakeError       the peer is not a compatible socketengine endpoint
        │   └── HostBusy         the host gave up on this handshake (max_pending): retry
        ├── AuthenticationError  the shared-secret token did not match
        └── ConnectionClosed     the connection to the peer is gone
"""

from __future__ import annotations

__all__ = [
    "SocketEngineError",
    "ProtocolError",
    "MessageTooBig",
    "RemoteError",
    "EndpointClosed",
    "WriteTimeout",
    "NotSupported",
    "SocketEngineConnectionError",
    "ConnectTimeout",
    "HandshakeError",
    "HostBusy",
    "AuthenticationError",
    "ConnectionClosed",
]


class SocketEngineError(Exception):
    """Base class of every error socketengine raises on purpose."""


class ProtocolError(SocketEngineError):
    """A peer sent bytes that do not follow the wire protocol (docs/protocol.md).

    The connection that sent them is closed; other connections are unaffected.
    """


def malformed(exc: Exception) -> ProtocolError:
    """The :class:`ProtocolError` for any other exception that handling a peer's frames
    raised (a decoder that let a malformed value through): the I/O layers close that
    connection only, as for any protocol error, and log why."""
    if isinstance(exc, ProtocolError):
        return exc
    text = str(exc)
    if len(text) > 200:
        text = text[:200] + "..."
    return ProtocolError(f"malformed frame from the peer ({type(exc).__name__}: {text})")


class MessageTooBig(ProtocolError):
    """A frame exceeds the ``max_message`` limit (bytes) of the receiving endpoint."""


class RemoteError(SocketEngineError):
    """The peer's request handler raised; the message is the peer's exception text."""


class WriteTimeout(SocketEngineError, TimeoutError):
    """A peer's send buffer stayed full (``max_buffer`` bytes queued) for ``timeout`` s.

    Nothing of the write was sent.  The peer is not reading fast enough.
    """


class NotSupported(SocketEngineError):
    """The peer did not announce the protocol feature a call needs (it runs an older
    socketengine): upgrade it, or do without the feature."""


class EndpointClosed(SocketEngineError, RuntimeError):
    """The endpoint was closed with ``close()``; create a new one to talk again."""


class SocketEngineConnectionError(SocketEngineError, ConnectionError):
    """Base class of the connection failures (also a builtin ``ConnectionError``)."""


class ConnectTimeout(SocketEngineConnectionError, TimeoutError):
    """The host did not accept the connection within ``connect_timeout`` seconds."""


class HandshakeError(SocketEngineConnectionError):
    """The peer did not complete a socketengine handshake (wrong protocol, TLS mismatch, ...)."""


class HostBusy(HandshakeError):
    """The host gave up on this handshake because newer connections kept arriving
    before it completed (``max_pending``, e.g. under a flood of connections that never
    finish theirs).  Transient: a client's ``open()`` / ``start()`` tries again, with
    backoff, until its ``connect_timeout``; reconnections retry anyway."""


class AuthenticationError(HandshakeError):
    """The shared-secret ``token`` was missing or did not match the peer's."""


class ConnectionClosed(SocketEngineConnectionError):
    """The connection to the peer was closed or lost."""
