"""Split frames larger than the NATS server's ``max_payload`` and put them back together.

Sans-I/O.  A body that fits in one NATS message is sent as is (it starts with a frame
type byte, 0x01..0x22).  A larger one is cut into *chunk* messages, each starting with a
36-byte little-endian header::

    u8 0xC5 (mark, never a frame type) | u8 version=1 | u16 reserved=0
    | u32 index | u32 count | u64 sender | u64 message id | u64 total size

followed by bytes ``[index*size, (index+1)*size)`` of the body, where ``size`` is the
length of chunk 0's payload (every chunk but the last has that length).  ``sender`` is a
random 64-bit id per :class:`Chunker` (per NATS connection), the message id counts up.

NATS keeps the order of one publisher's messages on one subject, so the chunks of a
message arrive contiguously and in order.  :class:`Reassembler` keeps at most one
incomplete message per (subject, sender), checks every announced size against
``max_message`` and a shared ``max_pending`` byte budget *before* allocating, and reports
every message it cannot complete as a :class:`Loss` (a gap, a message whose start it
never saw, a timeout, an oversize announcement): losses are never silent.
"""

from __future__ import annotations

import os
import struct
import time
from collections import OrderedDict
from typing import Any, Dict, Hashable, List, NamedTuple, Optional, Sequence, Tuple

from ... import codec

__all__ = ["CHUNK_MARK", "CHUNK_HEADER", "Chunker", "Reassembler", "Loss", "is_chunk"]

CHUNK_MARK = 0xC5
CHUNK_VERSION = 1
CHUNK_HEADER = struct.Struct("<BBHIIQQQ")
CHUNK_HEADER_SIZE = CHUNK_HEADER.size  # 36


def is_chunk(body: codec.Buffer) -> bool:
    """Does this NATS message body carry a chunk (rather than a whole frame)?"""
    mv = memoryview(body)
    return mv.nbytes > 0 and mv.cast("B")[0] == CHUNK_MARK


class Chunker:
    """Cuts bodies into NATS messages of at most ``max_payload`` bytes.

    :param max_payload: the server's limit (``nats.aio.client.Client.max_payload``).
    :param sender: this publisher's 64-bit id (default: random).
    """

    def __init__(self, max_payload: int, sender: Optional[int] = None) -> None:
        if max_payload <= CHUNK_HEADER_SIZE:
            raise ValueError(f"max_payload {max_payload} leaves no room for chunk data")
        self.max_payload = max_payload
        self.sender = sender if sender is not None else int.from_bytes(os.urandom(8), "little")
        self._next_id = 0

    def split(self, body: codec.Buffer) -> List[bytes]:
        """One message (``body`` itself, as bytes) if it fits, else the chunk messages."""
        mv = memoryview(body).cast("B")
        total = mv.nbytes
        if total <= self.max_payload:
            return [body if type(body) is bytes else bytes(mv)]
        size = self.max_payload - CHUNK_HEADER_SIZE
        count = -(-total // size)
        if count > 0xFFFFFFFF:
            raise ValueError(f"a {total}-byte body needs more than 2**32 chunks")
        self._next_id += 1
        mid = self._next_id
        pack = CHUNK_HEADER.pack
        out = []
        for i in range(count):
            head = pack(CHUNK_MARK, CHUNK_VERSION, 0, i, count, self.sender, mid, total)
            out.append(head + mv[i * size : (i + 1) * size])
        return out


class Loss(NamedTuple):
    """A chunked message that will never be delivered, and why."""

    source: Hashable  # what the caller passed to feed() (usually the subject)
    sender: int
    message_id: int
    received: int  # chunks received
    chunks: int  # chunks announced (0 if the start was never seen)
    reason: str


class _Pending:
    __slots__ = ("mid", "buf", "count", "next", "offset", "size", "last")

    def __init__(self, mid: int, buf: bytearray, count: int, size: int, now: float) -> None:
        self.mid = mid
        self.buf = buf
        self.count = count
        self.next = 0
        self.offset = 0
        self.size = size
        self.last = now


class Reassembler:
    """Puts chunked messages back together with bounded memory.

    :param max_message: the largest message accepted, in bytes (larger announcements are
        refused before anything is allocated).
    :param max_pending: bytes all incomplete messages together may hold (default
        ``2 * max_message``); an announcement that would exceed it is refused.
    :param timeout: seconds without a new chunk after which an incomplete message is
        dropped (checked by :meth:`expire`, which :meth:`feed` calls at most every
        ``timeout / 4`` seconds).

    :meth:`feed` returns complete bodies; losses accumulate in :attr:`losses` (drain
    them with :meth:`take_losses`).
    """

    _MAX_SKIPPED = 1024

    def __init__(
        self,
        max_message: int,
        max_pending: Optional[int] = None,
        timeout: float = 10.0,
    ) -> None:
        self.max_message = max_message
        self.max_pending = max_pending if max_pending is not None else 2 * max_message
        self.timeout = timeout
        self.pending_bytes = 0
        self.losses: List[Loss] = []
        self._pending: Dict[Tuple[Hashable, int], _Pending] = {}
        # Messages already reported lost whose later chunks are dropped quietly.
        self._skipped: OrderedDict[Tuple[Hashable, int, int], None] = OrderedDict()
        self._next_expire = 0.0

    def take_losses(self) -> List[Loss]:
        losses = self.losses
        self.losses = []
        return losses

    def feed(
        self, source: Hashable, body: codec.Buffer, now: Optional[float] = None
    ) -> Optional[Any]:
        """Handle one NATS message body; return a complete body (``bytes`` when it was
        not chunked, a writable ``bytearray`` when it was) or ``None``."""
        if now is None:
            now = time.monotonic()
        if self._pending and now >= self._next_expire:
            self.expire(now)
        mv = memoryview(body).cast("B")
        if not (mv.nbytes and mv[0] == CHUNK_MARK):
            return body
        if mv.nbytes < CHUNK_HEADER_SIZE:
            self._lose(source, 0, 0, 0, 0, f"chunk of {mv.nbytes} bytes is shorter than a header")
            return None
        mark, version, _, index, count, sender, mid, total = CHUNK_HEADER.unpack_from(mv, 0)
        payload = mv[CHUNK_HEADER_SIZE:]
        key = (source, sender)
        if version != CHUNK_VERSION:
            return self._refuse(key, mid, 0, count, f"chunk version {version} is not supported")
        if (source, sender, mid) in self._skipped:
            if index + 1 == count:
                del self._skipped[(source, sender, mid)]
            return None
        p = self._pending.get(key)
        if p is not None and (p.mid != mid or p.next != index):
            # A gap: the message in progress can never complete.
            del self._pending[key]
            self.pending_bytes -= len(p.buf)
            what = f"chunk {index} of message {mid}" if p.mid != mid else f"chunk {index}"
            self._lose(source, sender, p.mid, p.next, p.count, f"gap: {what} followed {p.next}")
            if p.mid == mid:
                self._skip(key, mid)  # the rest of this message is dropped quietly
                return None
            p = None
        if p is None:
            if index != 0:
                return self._refuse(key, mid, 0, 0, f"chunk {index} arrived without its start")
            if total > self.max_message:
                return self._refuse(
                    key, mid, 1, count, f"announced {total} bytes > max_message {self.max_message}"
                )
            if count < 2 or not payload.nbytes or total > count * payload.nbytes:
                return self._refuse(key, mid, 1, count, f"bad chunk header ({count}, {total})")
            if -(-total // payload.nbytes) != count:
                return self._refuse(
                    key, mid, 1, count, f"{count} chunks of {payload.nbytes} != {total} bytes"
                )
            if self.pending_bytes + total > self.max_pending:
                return self._refuse(
                    key, mid, 1, count, f"{total} bytes would exceed max_pending {self.max_pending}"
                )
            p = _Pending(mid, bytearray(total), count, payload.nbytes, now)
            self._pending[key] = p
            self.pending_bytes += total
        n = payload.nbytes
        last = index + 1 == p.count
        if count != p.count or (n != p.size and not last) or p.offset + n > len(p.buf):
            del self._pending[key]
            self.pending_bytes -= len(p.buf)
            return self._refuse(key, mid, index, p.count, f"chunk {index} has the wrong size")
        p.buf[p.offset : p.offset + n] = payload
        p.offset += n
        p.next += 1
        p.last = now
        if not last:
            return None
        del self._pending[key]
        self.pending_bytes -= len(p.buf)
        if p.offset != len(p.buf):
            self._lose(source, sender, mid, p.next, p.count, "chunks shorter than announced")
            return None
        return p.buf

    def expire(self, now: Optional[float] = None) -> None:
        """Drop incomplete messages idle for more than ``timeout`` s (reported as losses)."""
        if now is None:
            now = time.monotonic()
        self._next_expire = now + self.timeout / 4
        for key, p in list(self._pending.items()):
            if now - p.last > self.timeout:
                del self._pending[key]
                self.pending_bytes -= len(p.buf)
                self._skip(key, p.mid)
                reason = f"timeout after {self.timeout} s"
                self._lose(key[0], key[1], p.mid, p.next, p.count, reason)

    def drop_source(self, source: Hashable) -> None:
        """Forget incomplete messages of ``source`` (e.g. unsubscribed), reporting them."""
        for key, p in list(self._pending.items()):
            if key[0] == source:
                del self._pending[key]
                self.pending_bytes -= len(p.buf)
                self._lose(source, key[1], p.mid, p.next, p.count, "source closed")

    def drop_source_all(self) -> None:
        """Forget every incomplete message (the subscription ended), reporting each."""
        for key, p in list(self._pending.items()):
            del self._pending[key]
            self.pending_bytes -= len(p.buf)
            self._lose(key[0], key[1], p.mid, p.next, p.count, "subscription closed")

    # -- internals ---------------------------------------------------------------------

    def _refuse(
        self, key: Tuple[Hashable, int], mid: int, received: int, count: int, reason: str
    ) -> Optional[Any]:
        """Report message ``mid`` lost, drop its later chunks; ``None`` for feed to return."""
        self._skip(key, mid)
        self._lose(key[0], key[1], mid, received, count, reason)
        return None

    def _skip(self, key: Tuple[Hashable, int], mid: int) -> None:
        self._skipped[(key[0], key[1], mid)] = None
        while len(self._skipped) > self._MAX_SKIPPED:
            self._skipped.popitem(last=False)

    def _lose(
        self, source: Hashable, sender: int, mid: int, received: int, count: int, reason: str
    ) -> None:
        self.losses.append(Loss(source, sender, mid, received, count, reason))


def split_parts(chunker: Chunker, parts: Sequence[codec.Buffer]) -> List[bytes]:
    """:meth:`Chunker.split` of a frame given as parts."""
    if len(parts) == 1:
        return chunker.split(parts[0])
    return chunker.split(b"".join(parts))
