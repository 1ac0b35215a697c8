"""Feeding bytes to a sans-I/O :class:`ConnectionEngine` in tests, a chunk at a time
(the way a socket would hand them over).  Importable by tests: ``from engine_feed
import feed``."""

from __future__ import annotations

from typing import List

from socketengine import frames
from socketengine.engine import ConnectionEngine


def feed(engine: ConnectionEngine, data: bytes, chunk: int) -> List[frames.Frame]:
    """Give ``data`` to ``engine``'s decoder ``chunk`` bytes at a time; the frames
    :meth:`ConnectionEngine.events` returned along the way, in order."""
    out: List[frames.Frame] = []
    decoder = engine.protocol.decoder
    for i in range(0, len(data), chunk):
        piece = data[i : i + chunk]
        buf = decoder.get_buffer()
        buf[: len(piece)] = piece
        buf.release()
        decoder.buffer_updated(len(piece))
        out.extend(engine.events())
    return out
