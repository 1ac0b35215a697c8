"""A live browser monitor for a :class:`~socketengine.Host`.

``Monitor(host, port=8000).start()`` serves one static page (``page.html``, no build
step, no external resources) and three small endpoints the page uses:

* ``GET /api/state`` -- a JSON snapshot: the host, its connected clients (name,
  address, since when, bytes and messages in/out) and every channel's latest value
  per client, rendered as short text, with when it was last received ("updated") and
  last changed;
* ``GET /events`` -- Server-Sent Events: ``state`` (the snapshot, at most 4 times a
  second, only when it changed) and ``frames`` (the newest frame number of every
  image channel, checked 30 times a second);
* ``GET /frame?s=SESSION&c=CHANNEL`` -- the *newest* frame of an image channel,
  encoded when asked (JPEG with Pillow, PNG from the standard library otherwise).

The page fetches a frame only when a newer one exists and only after it has drawn the
previous one, so a slow browser skips frames instead of piling them up, and the host
never encodes a frame nobody asked for.

The package, one idea a module:

* :mod:`.server` -- :class:`Monitor`: one asyncio thread (``socketengine-monitor``)
  plus at most one encoder thread, whatever the number of browsers (connections are
  capped at :data:`MAX_CONNECTIONS`); routes, event streams, newest-frame fetches;
* :mod:`.http` -- HTTP/1.1 over asyncio streams, parsed by h11 (sans-I/O);
* :mod:`.auth` -- the token, the expiring login cookie, the ``Host:`` check;
* :mod:`.state` -- the interface of the host the monitor reads, and the snapshots;
* :mod:`.encode` -- frames to JPEG/PNG;  :mod:`.page` -- the page and its CSP.
"""

from __future__ import annotations

from ..render import describe, image_shape
from .auth import COOKIE_MAX_AGE
from .encode import encode_image, encode_png
from .http import MAX_BODY, MAX_HEAD
from .server import IDLE_TIMEOUT, MAX_CONNECTIONS, Monitor
from .state import MonitoredConnection, MonitoredHost

__all__ = [
    "COOKIE_MAX_AGE",
    "IDLE_TIMEOUT",
    "MAX_BODY",
    "MAX_CONNECTIONS",
    "MAX_HEAD",
    "Monitor",
    "MonitoredConnection",
    "MonitoredHost",
    "describe",
    "encode_image",
    "encode_png",
    "image_shape",
]
