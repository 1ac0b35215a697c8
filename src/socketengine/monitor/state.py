"""What the monitor shows of a host: the snapshot of its clients and values, and the
newest frame number of each image channel.

The monitor depends only on this small interface of the host (a
:class:`~socketengine.Host` has it; an ``aio.Host`` has the same members), read from
the monitor's own thread:

* ``host.clients()`` -- the connected clients, a list (or any iterable) of connections;
* optional, shown in the page header: ``host.addr``, ``host.port``, ``host.tls``
  (None or an SSL context), ``host.opened``, ``host.stopped``; and ``host._token``
  (None or bytes), only when ``Monitor(token=...)`` is not given.

and, of each connection:

* ``session`` (int, unique per host), ``name`` (str or None), ``address``
  (``(host, port)``), ``connected_at`` (``time.time()``);
* ``bytes_in``, ``bytes_out``, ``messages_in``, ``messages_out`` (ints);
* ``values`` -- a dict of the latest value received on each channel: the monitor calls
  ``values.copy()`` and ``values.get(channel)`` only;
* optional ``received_at`` -- a dict of ``time.time()`` when the latest value on each
  channel arrived.  Without it, a value counts as received when the object in
  ``values`` is a new one (an equal value re-sent is a new object, except the small
  ints, ``True``/``False`` and ``None`` Python shares).
"""

from __future__ import annotations

import sys
import time
from typing import Any, Dict, Iterable, List, Mapping, Optional, Protocol, Set, Tuple

from ..render import describe, format_address, image_shape

__all__ = ["MonitoredConnection", "MonitoredHost", "View"]

#: Clients and channels per client listed in a snapshot (the rest are counted).
MAX_CLIENTS_SHOWN = 200
MAX_CHANNELS_SHOWN = 100
#: Characters of a rendered value in a snapshot.
VALUE_TEXT_LIMIT = 160
#: Arrays up to this many bytes are compared element-wise to tell "changed" from
#: "received again"; larger ones (and every image frame) count as changed.
COMPARE_BYTES = 64 * 1024


class MonitoredConnection(Protocol):
    """The members of a connection the monitor reads (see the module docstring)."""

    name: Optional[str]
    address: Any
    connected_at: float
    bytes_in: int
    bytes_out: int
    messages_in: int
    messages_out: int
    values: Dict[str, Any]

    @property
    def session(self) -> int: ...


class MonitoredHost(Protocol):
    """The one method of a host the monitor needs (the rest is optional)."""

    def clients(self) -> Iterable[Any]: ...


_UNSET: Any = object()


def same_value(a: Any, b: Any) -> bool:
    """Whether ``b`` is ``a`` received again (equal), cheaply: bounded work."""
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    np = sys.modules.get("numpy")
    if np is not None and isinstance(a, np.ndarray):
        if a.shape != b.shape or a.dtype != b.dtype or a.nbytes > COMPARE_BYTES:
            return False
        return bool(np.array_equal(a, b))
    if type(a).__name__ == "EncodedImage":
        return False  # a new frame
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - an odd __eq__ means "changed"
        return False


class Entry:
    """What the monitor knows of one (client, channel)."""

    __slots__ = ("value", "seq", "updated", "changed", "text", "image")

    def __init__(self) -> None:
        self.value: Any = _UNSET
        self.seq = 0  # +1 per value received (as far as the monitor can tell)
        self.updated = 0.0  # time.time() the latest value was received
        self.changed = 0.0  # time.time() the value last differed from the one before
        self.text = ""
        self.image: Optional[Tuple[int, int, int]] = None


class View:
    """The monitor's view of a host, refreshed from the monitor's thread only."""

    def __init__(self, host: Any) -> None:
        self.host = host
        self.entries: Dict[Tuple[int, str], Entry] = {}
        self._image_keys: List[Tuple[Any, int, str]] = []

    def track(
        self, key: Tuple[int, str], value: Any, now: float, received: Optional[float] = None
    ) -> Entry:
        """The entry for ``key``, updated if ``value`` was received since the last look.

        ``received`` is the host's own receive time when it reports one.
        """
        entry = self.entries.get(key)
        if entry is None:
            entry = self.entries[key] = Entry()
        fresh = entry.value is not value or (received is not None and received > entry.updated)
        if fresh:
            stamp = received if received is not None else now
            if entry.value is _UNSET or not same_value(entry.value, value):
                entry.changed = stamp
                entry.text = describe(value, VALUE_TEXT_LIMIT)
                entry.image = image_shape(value)
            entry.value = value
            entry.seq += 1
            entry.updated = stamp
        return entry

    def host_info(self) -> Dict[str, Any]:
        host = self.host
        return {
            "addr": getattr(host, "addr", None),
            "port": getattr(host, "port", None),
            "tls": getattr(host, "tls", None) is not None,
            "token": getattr(host, "_token", None) is not None,
            "open": bool(getattr(host, "opened", False)),
            "closed": bool(getattr(host, "stopped", False)),
        }

    def snapshot(self) -> Tuple[Dict[str, Any], Set[Tuple[int, str]]]:
        """Scan the host: clients, their values and image channels; and the keys that
        are gone since the last scan (their entries are forgotten)."""
        now = time.time()
        conns = list(self.host.clients())
        clients = []
        images = []
        image_keys = []
        seen: Set[Tuple[int, str]] = set()
        for conn in conns[:MAX_CLIENTS_SHOWN]:
            session = int(getattr(conn, "session", id(conn)))
            values: Mapping[str, Any] = conn.values.copy()
            stamps: Mapping[str, float] = getattr(conn, "received_at", None) or {}
            channels = []
            for n, (channel, value) in enumerate(values.items()):
                if n >= MAX_CHANNELS_SHOWN:
                    break
                key = (session, channel)
                seen.add(key)
                entry = self.track(key, value, now, stamps.get(channel))
                item: Dict[str, Any] = {
                    "name": channel,
                    "text": entry.text,
                    "seq": entry.seq,
                    "updated": round(entry.updated, 3),
                    "changed": round(entry.changed, 3),
                }
                if entry.image is not None:
                    h, w, c = entry.image
                    item["image"] = [h, w, c]
                    images.append(
                        {
                            "session": session,
                            "client": conn.name,
                            "channel": channel,
                            "shape": [h, w, c],
                            "seq": entry.seq,
                        }
                    )
                    image_keys.append((conn, session, channel))
                channels.append(item)
            clients.append(
                {
                    "session": session,
                    "name": conn.name,
                    "address": format_address(conn.address),
                    "since": round(float(conn.connected_at), 3),
                    "bytes_in": conn.bytes_in,
                    "bytes_out": conn.bytes_out,
                    "messages_in": conn.messages_in,
                    "messages_out": conn.messages_out,
                    "channels": channels,
                    "more_channels": max(0, len(values) - MAX_CHANNELS_SHOWN),
                }
            )
        gone = {k for k in self.entries if k not in seen}
        for key in gone:
            del self.entries[key]
        self._image_keys = image_keys
        doc = {
            "host": self.host_info(),
            "clients": clients,
            "more_clients": max(0, len(conns) - MAX_CLIENTS_SHOWN),
            "images": images,
        }
        return doc, gone

    def frames(self) -> List[List[Any]]:
        """The newest frame number of every image channel of the last snapshot."""
        now = time.time()
        out = []
        for conn, session, channel in self._image_keys:
            value = conn.values.get(channel)
            if image_shape(value) is None:
                continue
            stamps = getattr(conn, "received_at", None) or {}
            entry = self.track((session, channel), value, now, stamps.get(channel))
            out.append([session, channel, entry.seq])
        return out

    def find_image(self, session: int, channel: str) -> Tuple[Any, Optional[Entry]]:
        """The newest frame of ``channel`` from client ``session`` and its entry."""
        for conn in self.host.clients():
            if int(getattr(conn, "session", id(conn))) == session:
                value = conn.values.get(channel)
                if image_shape(value) is None:
                    return None, None
                stamps = getattr(conn, "received_at", None) or {}
                return value, self.track(
                    (session, channel), value, time.time(), stamps.get(channel)
                )
        return None, None
