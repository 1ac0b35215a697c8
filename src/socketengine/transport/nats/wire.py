"""One NATS message body = one socketengine frame (sans-I/O).

:func:`frame_bytes` joins a frame's parts (as produced by :func:`socketengine.frames.
encode_frame`) into one body; :func:`decode_one` turns a body back into a
:class:`~socketengine.frames.Frame`, refusing a body that is short, has trailing bytes,
is larger than ``max_message`` or is otherwise malformed (:class:`ProtocolError`).
There is no preamble and no handshake over NATS: the server authenticates connections.
"""

from __future__ import annotations

from typing import Sequence

from ... import codec, frames
from ...errors import MessageTooBig, ProtocolError

__all__ = ["frame_bytes", "decode_one"]

_HEADER = frames.HEADER
_HEADER_SIZE = frames.HEADER_SIZE


def frame_bytes(parts: Sequence[codec.Buffer]) -> bytes:
    """The frame's wire bytes as one ``bytes`` object (one copy)."""
    if len(parts) == 1 and type(parts[0]) is bytes:
        return parts[0]
    return b"".join(parts)


def decode_one(body: codec.Buffer, max_message: int = frames.DEFAULT_MAX_MESSAGE) -> frames.Frame:
    """Decode exactly one frame from ``body``.

    ``data`` of the frame is a writable zero-copy view when ``body`` is a ``bytearray``
    (a reassembled chunked message), else a ``bytearray`` copy, so that decoded numpy
    arrays are always writable, as with the TCP decoder.
    """
    mv = memoryview(body).cast("B")
    n = mv.nbytes
    if n < _HEADER_SIZE:
        raise ProtocolError(f"NATS message of {n} bytes is shorter than a frame header")
    ftype, flags, clen, fid, mlen, dlen = _HEADER.unpack_from(mv, 0)
    total = _HEADER_SIZE + clen + mlen + dlen
    if total > max_message:
        raise MessageTooBig(
            f"peer sent a {total}-byte frame; max_message is {max_message} bytes "
            "(raise max_message on this endpoint if such frames are expected)"
        )
    if total != n:
        what = "is cut short" if total > n else f"has {n - total} trailing bytes"
        raise ProtocolError(f"NATS message of {n} bytes {what} (its frame header says {total})")
    if ftype not in frames.FRAME_TYPES:
        raise ProtocolError(f"unknown frame type 0x{ftype:02x}")
    p = _HEADER_SIZE
    try:
        channel = str(mv[p : p + clen], "utf-8") if clen else ""
    except UnicodeDecodeError:
        raise ProtocolError("channel name is not valid UTF-8") from None
    p += clen
    meta = bytes(mv[p : p + mlen])
    p += mlen
    data = None
    if dlen:
        data = mv[p:] if not mv.readonly else bytearray(mv[p:])
    return frames.Frame(ftype, flags, channel, fid, meta, data)
