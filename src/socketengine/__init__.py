"""socketengine: named channels between Python processes, over TCP.

``Host`` listens, ``Client`` connects; both keep the latest value of every channel in
a background I/O thread.  ``host`` and ``client`` (and the seed's camelCase method
names) are aliases kept for socket.engine 1.x code; see :mod:`socketengine.compat`.
"""

from __future__ import annotations

from typing import Any, Dict

from .compat import client, host
from .errors import (
    AuthenticationError,
    ConnectionClosed,
    ConnectTimeout,
    EndpointClosed,
    HandshakeError,
    HostBusy,
    MessageTooBig,
    NotSupported,
    ProtocolError,
    RemoteError,
    SocketEngineConnectionError,
    SocketEngineError,
    WriteTimeout,
)
from .images import CodecUnavailable, EncodedImage
from .patterns import Pattern
from .sync.client import Client
from .sync.connection import Connection
from .sync.delivery import Subscription
from .sync.host import Host

__version__ = "2.0.0a1"


def nats_hosts(url: Any, **kwargs: Any) -> Dict[str, Dict[str, Any]]:
    """The hosts running on a NATS cluster, in one call: ``{name: info}``.

    ``url``: ``"nats://a:4222,nats://b:4222"`` (or a list); keywords ``token=``,
    ``tls=`` (an ``ssl.SSLContext``), ``connect_timeout=`` (seconds, default 5).
    ``info`` has ``pid`` and ``t`` (``time.time()`` of its last announcement).  Needs
    ``pip install "socket.engine[nats]"``; see docs/nats.md.
    """
    from .transport.nats.gateway import nats_hosts as hosts

    return hosts(url, **kwargs)


__all__ = [
    "Host",
    "Client",
    "Connection",
    "Subscription",
    "Pattern",
    "host",
    "client",
    "nats_hosts",
    "SocketEngineError",
    "SocketEngineConnectionError",
    "ProtocolError",
    "MessageTooBig",
    "NotSupported",
    "RemoteError",
    "WriteTimeout",
    "EndpointClosed",
    "ConnectTimeout",
    "HandshakeError",
    "HostBusy",
    "AuthenticationError",
    "ConnectionClosed",
    "CodecUnavailable",
    "EncodedImage",
]
