"""One NATS message body = one socketengine frame (sans-I/O).

:func:`frame_bytes` joins a frame's parts (as produced by :func:`socketengine.frames.
encode_frame`) into one body; :func:`decode_one` turns a body back into a
:class:`~socketengine.frames.Frame`, refusing a body that is short, has trailing bytes,
is larger than ``max_message`` or is otherwise malformed (:class:`ProtocolError`).
There is no preamble and no handshake over NATS: the server authenticates connections.
"""

from __future__ import annotations

from typing import List, Sequence

from ... import codec, frames
from ...errors import MessageTooBig, ProtocolError

__all__ = ["frame_bytes", "decode_one", "StreamSplitter"]

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


class StreamSplitter:
    """Cuts one direction of a connection's byte stream into the units that travel as
    NATS messages: the 8-byte preamble, then each whole frame (sans-I/O).

    :meth:`feed` takes any chunk of the stream and returns the units it completed.
    Raises :class:`ProtocolError` when the stream does not start with the preamble's
    magic and :class:`MessageTooBig` for a frame above ``max_message`` (the gateway
    then ends the session, like the engine closes a connection that sends one).
    """

    def __init__(self, max_message: int = frames.DEFAULT_MAX_MESSAGE) -> None:
        self.max_message = max_message
        self._buf = bytearray()
        self._preamble = True
        self._need = len(frames.PREAMBLE)

    def feed(self, data: codec.Buffer) -> List[bytes]:
        buf = self._buf
        buf += data
        out: List[bytes] = []
        while len(buf) >= self._need:
            if self._preamble:
                n = len(frames.PREAMBLE)
                if bytes(buf[:4]) != frames.MAGIC:
                    raise ProtocolError("the stream does not start with a socketengine preamble")
                out.append(bytes(buf[:n]))
                del buf[:n]
                self._preamble = False
                self._need = _HEADER_SIZE
                continue
            _, _, clen, _, mlen, dlen = _HEADER.unpack_from(buf, 0)
            total = _HEADER_SIZE + clen + mlen + dlen
            if total > self.max_message:
                raise MessageTooBig(
                    f"a {total}-byte frame is above max_message ({self.max_message} bytes)"
                )
            if len(buf) < total:
                self._need = total
                break
            out.append(bytes(buf[:total]))
            del buf[:total]
            self._need = _HEADER_SIZE
        return out
