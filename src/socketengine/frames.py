"""Frames: the unit on the wire.  Sans-I/O: bytes in, frames out; frames in, bytes out.

Layout (little-endian; docs/protocol.md is the normative description)::

    preamble, once per direction:  b"SENG" | u8 major=1 | u8 minor=2 | u16 reserved=0
    frame:   u8 type | u8 flags | u16 channel_len | u32 id | u32 meta_len | u32 data_len
             | channel (UTF-8) | meta (msgpack) | data (raw array bytes)

:class:`FrameDecoder` follows asyncio's ``BufferedProtocol`` shape: the I/O layer asks
:meth:`FrameDecoder.get_buffer` where to put the next bytes, receives into it
(``recv_into``), and reports how many arrived with :meth:`FrameDecoder.buffer_updated`.
Small frames are cut out of one reusable stream buffer; a frame with a large data
section gets a buffer of its own that the socket fills directly, and that buffer then
*becomes* the numpy array (no copy on receive).  Every size is checked against
``max_message`` before anything is allocated.
"""

from __future__ import annotations

import mmap
import struct
import sys
from typing import (
    Any,
    Callable,
    Container,
    Dict,
    Final,
    Iterable,
    List,
    NamedTuple,
    Optional,
    Sequence,
    Set,
    Tuple,
    Union,
)

from . import codec, compression, limits
from .compiled import mypyc_attr
from .errors import HandshakeError, MessageTooBig, ProtocolError

__all__ = [
    "PREAMBLE",
    "VERSION",
    "HEADER",
    "Frame",
    "FrameDecoder",
    "encode_frame",
    "encode_value_frame",
    "compressed_frame",
    "decompressed",
    "compressed_item",
    "check_preamble",
    "DEFAULT_MAX_MESSAGE",
]

MAGIC: Final = b"SENG"
VERSION: Final = (1, 2)
PREAMBLE: Final = MAGIC + bytes(VERSION) + b"\x00\x00"
HEADER: Final[struct.Struct] = struct.Struct("<BBHIII")
HEADER_SIZE: Final[int] = HEADER.size  # 16
_pack_header: Final = HEADER.pack

# Frame types (docs/protocol.md, "Frame types").
HELLO: Final = 0x01
CHALLENGE: Final = 0x02
AUTH: Final = 0x03
WELCOME: Final = 0x04
REFUSE: Final = 0x05
DATA: Final = 0x10
REQUEST: Final = 0x11
REPLY: Final = 0x12
REPLY_ERROR: Final = 0x13
BATCH: Final = 0x14  # protocol 1.1: several small DATA values in one frame
SYNC: Final = 0x15  # protocol 1.1: "tell me when everything before this is stored"
ACK: Final = 0x16  # protocol 1.1: the answer to SYNC (same id)
INTEREST: Final = 0x17  # protocol 1.1: a client's new interest (the channels it wants)
RACK: Final = 0x18  # protocol 1.2 (resume): "I received this many sequenced frames"
SKIP: Final = 0x19  # protocol 1.2 (resume): stands for ``id`` sequence numbers, carries nothing
PING: Final = 0x20
PONG: Final = 0x21
BYE: Final = 0x22
FRAME_TYPES: Final = frozenset(
    {
        HELLO,
        CHALLENGE,
        AUTH,
        WELCOME,
        REFUSE,
        DATA,
        REQUEST,
        REPLY,
        REPLY_ERROR,
        BATCH,
        SYNC,
        ACK,
        INTEREST,
        RACK,
        SKIP,
        PING,
        PONG,
        BYE,
    }
)

# DATA flags.
FLAG_RETAINED: Final = 0x01  # replay of a value the host retains (sent right after the handshake)
FLAG_IMAGE: Final = 0x02  # an image frame: may be conflated (only the newest one matters)
FLAG_COMPRESSED: Final = 0x04  # protocol 1.1: meta [codec, meta_len, data_len], data compressed
FLAG_RELAYED: Final = 0x08  # forwarded by a relaying host: meta starts with the sender's name
#: Protocol 1.1 "shm": the data section is a shared memory descriptor (see shm.py).
FLAG_SHM: Final = 0x40

DEFAULT_MAX_MESSAGE: Final = limits.DEFAULT_MAX_MESSAGE
# Frames whose data section is at least this large are received into a buffer of
# their own (zero-copy) rather than cut out of the shared stream buffer.
_OWN_BUFFER: Final = 64 * 1024
_MIN_READ: Final = 64 * 1024
# An idle connection starts with reads this small; a read that fills its buffer makes
# the next one four times larger, up to read_size (memory follows the traffic).
_START_READ: Final = 4096
# Data sections at least this large are received into anonymous memory maps: the OS
# commits their pages only as bytes arrive, so a peer announcing a huge frame and sending
# little costs little.  Smaller ones (a 1080p frame is 6 MB) get a bytearray: pages that
# fault inside recv() halve the throughput (measured: 1.5 vs 2.9 GB/s for 6 MB arrays).
_MMAP_BODY: Final = 16 * 1024 * 1024
#: Values whose msgpack is at most this large (and hold no arrays) may travel in BATCH
#: frames; larger ones always get a DATA frame of their own.
ITEM_MAX: Final = 4096
_refcount: Final = sys.getrefcount
# Channel names are cached process-wide (received ones, and the encoded names of what
# this process sends, relays and answers), and peers choose many of them (even one that
# never completes the handshake): only short ones are kept, so each cache stays under
# ~2 MB instead of 4096 names of up to 64 KiB each.
CACHED_NAME_MAX: Final = 256


class Frame(NamedTuple):
    """One decoded frame.  ``meta`` and ``data`` are undecoded (see :mod:`codec`)."""

    type: int
    flags: int
    channel: str
    id: int
    meta: Union[bytes, bytearray, memoryview]
    data: Optional[Any]  # bytearray, mmap.mmap or memoryview (large frames): writable

    def value(self, max_size: int = DEFAULT_MAX_MESSAGE) -> Any:
        """The frame's value, decoded.  Raises ``ProtocolError`` if it is malformed.

        A compressed DATA frame (:data:`FLAG_COMPRESSED`) is decompressed first, to at
        most ``max_size`` bytes (the receiver's ``max_message``): a larger one raises
        :class:`MessageTooBig` before anything that large is allocated."""
        if self.flags & FLAG_COMPRESSED and self.type == DATA:
            return _compressed_value(self, max_size)
        try:
            return codec.decode(self.meta, self.data)
        except ValueError as exc:
            raise ProtocolError(f"malformed value on channel {self.channel!r}: {exc}") from None

    def items(self) -> List[Any]:
        """A BATCH frame's items, flat: ``[channel, value, ...]``.  Raises
        ``ProtocolError`` if the body is malformed."""
        try:
            return codec.decode_batch(self.meta)
        except ValueError as exc:
            raise ProtocolError(f"malformed BATCH frame: {exc}") from None

    def last_items(
        self, watched: Sequence[Container[str]] = ()
    ) -> Optional[Tuple[int, Dict[str, Any]]]:
        """A BATCH frame's item count and the last value of each channel
        (:func:`codec.decode_batch_last`: every item decoded and checked, superseded
        values dropped at once); ``None`` if an item is on a ``watched`` channel.
        Raises ``ProtocolError`` if the body is malformed."""
        try:
            return codec.decode_batch_last(self.meta, watched)
        except ValueError as exc:
            raise ProtocolError(f"malformed BATCH frame: {exc}") from None


def _compressed_value(frame: Frame, max_size: int) -> Any:
    """The value of a compressed DATA frame (docs/protocol.md, 8.6).  Never unpickles."""
    return decompressed(frame, max_size).value(max_size)


def decompressed(frame: Frame, max_size: int) -> Frame:
    """The plain DATA frame a compressed one (:data:`FLAG_COMPRESSED`) carries: same
    type, channel, id and other flags; the original meta and data section.  At most
    ``max_size`` bytes are produced (the receiver's ``max_message``).

    :raises MessageTooBig: the value would expand beyond ``max_size`` (a bomb).
    :raises ProtocolError: anything else wrong with the frame (docs/protocol.md, 8.6).
    """
    try:
        head = codec.decode(frame.meta, None)
    except ValueError as exc:
        raise ProtocolError(f"malformed compressed frame on {frame.channel!r}: {exc}") from None
    if (
        type(head) is not list
        or len(head) != 3
        or head[0] not in compression.CODECS
        or type(head[1]) is not int
        or type(head[2]) is not int
        or head[1] < 1
        or head[2] < 0
        or frame.data is None
    ):
        raise ProtocolError(
            f"compressed frame on {frame.channel!r} is not [codec, meta_len, data_len] + data"
        )
    name, meta_len, data_len = head
    if meta_len + data_len > max_size:
        raise MessageTooBig(
            f"a compressed value on {frame.channel!r} declares {meta_len + data_len} bytes, "
            f"over the {max_size}-byte limit (max_message): raise max_message on the receiver"
        )
    try:
        out = compression.decompress(name, frame.data, max_size)
    except compression.CompressionUnavailable as exc:
        raise ProtocolError(f"the peer sent {name} data this side never announced: {exc}") from None
    if len(out) != meta_len + data_len:
        raise ProtocolError(
            f"compressed frame on {frame.channel!r} declared {meta_len}+{data_len} bytes "
            f"and held {len(out)}"
        )
    view = memoryview(out)
    # The data section in a buffer of its own: aligned, and writable like a received one.
    data = bytearray(view[meta_len:]) if data_len else None
    flags = frame.flags & ~FLAG_COMPRESSED
    return Frame(DATA, flags, frame.channel, frame.id, out[:meta_len], data)


def compressed_frame(
    channel: Any,
    meta: bytes,
    buffers: Sequence[codec.Buffer],
    data_len: int,
    name: str,
    level: Optional[int] = None,
) -> Optional[Tuple[List[codec.Buffer], int]]:
    """``(parts, size)`` of a compressed DATA frame for an encoded value (see
    :func:`codec.encode`), or None when compressing does not make it smaller.

    The caller checks the threshold; this compresses ``meta + data`` with ``name``."""
    body: codec.Buffer = b"".join((meta, *buffers)) if buffers else meta
    out = compression.maybe_compress(name, body, 0, level)
    if out is None:
        return None
    cmeta = codec.encode([name, len(meta), data_len])[0]
    ch = channel_bytes(channel)
    head = _pack_header(DATA, FLAG_COMPRESSED, len(ch), 0, len(cmeta), len(out)) + ch + cmeta
    return [head, out], len(head) + len(out)


def plain_item(
    channel: Any, meta: bytes, buffers: Sequence[codec.Buffer], data_len: int
) -> Union[bytes, Tuple[List[codec.Buffer], int]]:
    """What :func:`value_item` returns, for a value already encoded."""
    if not buffers and len(meta) <= ITEM_MAX:
        return _item_prefix(channel) + meta
    ch = channel_bytes(channel)
    head = _pack_header(DATA, 0, len(ch), 0, len(meta), data_len) + ch + meta
    if buffers:
        return [head, *buffers], len(head) + data_len
    return [head], len(head)


def compressed_item(
    channel: Any, value: Any, name: Optional[str], threshold: int
) -> Union[bytes, Tuple[List[codec.Buffer], int]]:
    """:func:`value_item` with compression: a value whose encoding (meta + data) is at
    least ``threshold`` bytes becomes a compressed DATA frame when that is smaller
    (``name`` None: never).  Raises ``TypeError`` before anything."""
    meta, buffers, data_len = codec.encode(value)
    if name is not None and len(meta) + data_len >= threshold:
        packed = compressed_frame(channel, meta, buffers, data_len, name)
        if packed is not None:
            return packed
    return plain_item(channel, meta, buffers, data_len)


_channel_bytes: Final[dict] = {}
#: Channel names as they arrive (UTF-8 bytes) -> str: the decoders' process-wide cache.
_names: Final[Dict[bytes, str]] = {}


def channel_bytes(channel: Any) -> bytes:
    """UTF-8 bytes of a channel name, validated and cached (names repeat endlessly).

    The encoding functions here take the channel a user passed as ``Any`` and check it
    in this one place: typed ``str``, the compiled build (socketengine/compiled.py) would
    refuse a wrong type with mypyc's generic message instead of this one."""
    b = _channel_bytes.get(channel)
    if b is None:
        if type(channel) is not str:
            raise TypeError(
                f"channel names are str, not {type(channel).__qualname__}: got {channel!r}"
            )
        b = channel.encode("utf-8")
        if len(b) > 0xFFFF:
            raise ValueError("channel name is longer than 65535 UTF-8 bytes")
        if len(_channel_bytes) < 4096 and len(b) <= CACHED_NAME_MAX:
            _channel_bytes[channel] = b
    return b


def encode_frame(
    ftype: int,
    channel: Any = "",
    meta: bytes = b"",
    buffers: Sequence[codec.Buffer] = (),
    data_len: int = 0,
    *,
    flags: int = 0,
    fid: int = 0,
) -> List[codec.Buffer]:
    """Frame parts ready for ``sendmsg``: ``[header+channel+meta, *buffers]``."""
    ch = channel_bytes(channel)
    head = HEADER.pack(ftype, flags, len(ch), fid, len(meta), data_len) + ch + meta
    if buffers:
        return [head, *buffers]
    return [head]


def encode_value_frame(
    ftype: int, channel: Any, value: Any, *, flags: int = 0, fid: int = 0
) -> List[codec.Buffer]:
    """Encode ``value`` and frame it.  Raises ``TypeError`` before producing anything."""
    return value_frame(ftype, channel, value, flags, fid)[0]


def value_frame(
    ftype: int, channel: Any, value: Any, flags: int = 0, fid: int = 0
) -> Tuple[List[codec.Buffer], int]:
    """``(parts, total size)`` of a frame carrying ``value``: the writers' hot path."""
    meta, buffers, data_len = codec.encode(value)
    ch = _channel_bytes.get(channel)
    if ch is None:
        ch = channel_bytes(channel)
    head = _pack_header(ftype, flags, len(ch), fid, len(meta), data_len) + ch + meta
    if buffers:
        return [head, *buffers], len(head) + data_len
    return [head], len(head)


_item_prefixes: Final[Dict[str, bytes]] = {}
_pack_plain: Final = codec.pack_plain
# Channels whose values the shared packer could not pack (see value_item).
_full_channels: Final[Set[str]] = set()


def _item_prefix(channel: Any) -> bytes:
    """msgpack str of ``channel`` (the head of a BATCH item), validated and cached."""
    prefix = _item_prefixes.get(channel)
    if prefix is None:
        ch = channel_bytes(channel)
        n = len(ch)
        if n < 32:
            head = bytes((0xA0 | n,))
        elif n < 256:
            head = bytes((0xD9, n))
        else:
            head = b"\xda" + n.to_bytes(2, "big")
        prefix = head + ch
        if len(_item_prefixes) < 4096 and n <= CACHED_NAME_MAX:
            _item_prefixes[channel] = prefix
    return prefix


def value_item(channel: Any, value: Any) -> Union[bytes, Tuple[List[codec.Buffer], int]]:
    """A DATA value, encoded in the caller's thread: a BATCH *item* (``bytes``:
    msgpack str channel + msgpack value) when the value has no arrays and is small,
    else ``(parts, size)`` of a DATA frame.  Raises ``TypeError`` before anything."""
    if _pack_plain is not None and type(value) is not tuple and channel not in _full_channels:
        try:
            meta = _pack_plain(value)
        except Exception:
            # Arrays, tuples, subclasses, big ints: the full encoder below, and from now
            # on at once for this channel (a failed try costs ~2 us: its values usually
            # keep their shape).
            if len(_full_channels) < 4096 and len(channel) <= CACHED_NAME_MAX:
                _full_channels.add(channel)
        else:
            if len(meta) <= ITEM_MAX:
                prefix = _item_prefixes.get(channel)
                if prefix is None:
                    prefix = _item_prefix(channel)
                return prefix + meta
            return plain_item(channel, meta, (), 0)  # large: a DATA frame, packed once
    meta, buffers, data_len = codec.encode(value)
    if not buffers and len(meta) <= ITEM_MAX:
        prefix = _item_prefixes.get(channel)
        if prefix is None:
            prefix = _item_prefix(channel)
        return prefix + meta
    ch = _channel_bytes.get(channel)
    if ch is None:
        ch = channel_bytes(channel)
    head = _pack_header(DATA, 0, len(ch), 0, len(meta), data_len) + ch + meta
    if buffers:
        return [head, *buffers], len(head) + data_len
    return [head], len(head)


@mypyc_attr(native_class=False)  # a list subclass: mypyc compiles only plain classes
class EncodedValues(List[Any]):
    """A ``write_many``'s values as :func:`value_item` encodes them, in order: BATCH
    items (``bytes``) and, for large values or arrays, DATA frames ``(parts, size)``;
    ``frames`` counts the latter (0: items only, queued in one step)."""

    __slots__ = ("frames",)

    def __init__(self) -> None:
        super().__init__()
        self.frames = 0


def value_items(pairs: Iterable[Any]) -> EncodedValues:
    """:func:`value_item` of every ``(channel, value)`` pair, in order (``write_many``):
    the same encoding, with the common case (a small plain value) inlined.  Raises
    ``TypeError``/``ValueError`` naming the first pair that cannot be sent."""
    out = EncodedValues()
    append = out.append
    pack = _pack_plain
    prefixes = _item_prefixes
    full = _full_channels
    last_channel: Any = None
    prefix = b""
    try:
        for pair in pairs:
            if type(pair) is not tuple:
                pair = checked_pair(pair)
            channel, value = pair
            if pack is not None and type(value) is not tuple and channel not in full:
                try:
                    meta = pack(value)
                except Exception:
                    meta = None
                if meta is not None and len(meta) <= ITEM_MAX:
                    if channel is not last_channel:
                        prefix = prefixes.get(channel) or _item_prefix(channel)
                        last_channel = channel
                    append(prefix + meta)
                    continue
            encoded = value_item(channel, value)
            if type(encoded) is not bytes:
                out.frames += 1
            append(encoded)
    except (TypeError, ValueError) as exc:
        raise _item_error(exc, len(out)) from exc
    return out


def encode_pairs(pairs: Iterable[Any], encode: Callable[[str, Any], Any]) -> EncodedValues:
    """``write_many`` with an encoder of the endpoint's (compression): ``encode(channel,
    value)`` of every pair, in order; errors as :func:`value_items` raises them."""
    out = EncodedValues()
    try:
        for pair in pairs:
            channel, value = checked_pair(pair)
            encoded = encode(channel, value)
            if type(encoded) is not bytes:
                out.frames += 1
            out.append(encoded)
    except (TypeError, ValueError) as exc:
        raise _item_error(exc, len(out)) from exc
    return out


def _item_error(exc: Exception, index: int) -> Exception:
    kind = TypeError if isinstance(exc, TypeError) else ValueError
    return kind(f"write_many(): item {index} cannot be sent (nothing was sent): {exc}")


def checked_pair(pair: Any) -> Any:
    """A ``write_many`` item: a ``(channel, value)`` tuple or list, else ``TypeError``."""
    if type(pair) is not tuple and not (isinstance(pair, (tuple, list)) and len(pair) == 2):
        raise TypeError(
            "write_many() takes a mapping or (channel, value) pairs, "
            f"not {type(pair).__qualname__} items"
        )
    return pair


def item_frame(item: bytes) -> bytes:
    """The DATA frame carrying a BATCH item (for a peer that reads no BATCH)."""
    first = item[0]
    if first & 0xE0 == 0xA0:
        skip, n = 1, first & 0x1F
    elif first == 0xD9:
        skip, n = 2, item[1]
    else:
        skip, n = 3, int.from_bytes(item[1:3], "big")
    return _pack_header(DATA, 0, n, 0, len(item) - skip - n, 0) + item[skip:]


def frame_size(parts: Sequence[codec.Buffer]) -> int:
    """Total bytes of a frame's parts."""
    return sum(memoryview(p).nbytes for p in parts)


def check_preamble(head: bytes) -> None:
    """Validate the 8-byte preamble; raise :class:`HandshakeError` saying what the peer is."""
    if head[:4] != MAGIC:
        if head[:1] == b"\x16" and head[1:2] == b"\x03":
            hint = "it speaks TLS: pass tls= on this side too"
        elif head[:4] in (b"GET ", b"POST", b"HEAD", b"PUT ", b"HTTP"):
            hint = "it speaks HTTP"
        else:
            hint = f"its first bytes are {bytes(head[:8])!r}"
        raise HandshakeError(f"the peer is not a socketengine endpoint ({hint})")
    if head[4] != VERSION[0]:
        raise HandshakeError(
            f"the peer speaks socketengine protocol {head[4]}.{head[5]}, this side "
            f"{VERSION[0]}.{VERSION[1]}: upgrade the older side"
        )


def _refcounts(bufs: List[bytearray]) -> List[int]:
    """The reference count of each buffer, as this function sees it."""
    return [_refcount(buf) for buf in bufs]


#: What :func:`_refcounts` reports for a buffer that only its list refers to: measured,
#: not assumed, because the references the loop itself holds differ between the
#: interpreted and the compiled build (socketengine/compiled.py).
_UNREFERENCED: Final = _refcounts([bytearray(1)])[0]


class _BodyPool:
    """Recycled receive buffers for large data sections (sans-I/O).

    A stream of 1080p frames would otherwise allocate and zero-fill a new 6 MB buffer
    per frame, and give the memory back to the OS in between (page faults on every
    frame).  A buffer comes back into use only once nothing refers to it any more:
    the arrays the application got from it are gone (reference count), so a value
    the application keeps is never overwritten.  At most :attr:`KEEP` buffers of at
    most two sizes are kept: bounded by ``2 * KEEP * max_message``.
    """

    KEEP = 3

    def __init__(self) -> None:
        self._free: Dict[int, List[bytearray]] = {}

    def take(self, size: int) -> bytearray:
        bufs = self._free.get(size)
        if bufs is None:
            if len(self._free) >= 2:
                self._free.pop(next(iter(self._free)))  # the oldest size goes
            bufs = self._free[size] = []
        counts = _refcounts(bufs)
        for i in range(len(bufs)):
            if counts[i] == _UNREFERENCED:
                return bufs[i]
        buf = bytearray(size)
        if len(bufs) < self.KEEP:
            bufs.append(buf)
        return buf


class FrameDecoder:
    """Incremental frame parser (sans-I/O).

    :param max_message: largest accepted frame in bytes (header included); a larger
        one raises :class:`MessageTooBig` as soon as its header arrives.
    :param read_size: what each receive is offered on a busy stream, in bytes: the
        offer starts at 4 KiB and grows 4x each time a receive fills it, up to this.
        The buffer holds that much after the unparsed bytes of a frame cut by a read.
    :param expect_preamble: the stream starts with the 8-byte preamble.

    :attr:`pause_after_handshake`: stop parsing after each handshake frame (type below
    ``DATA``) until :meth:`resume`, so that the owner can raise ``max_message`` in reply
    to it before the next frame (often a large one, right behind WELCOME) is sized.
    """

    def __init__(
        self,
        max_message: int = DEFAULT_MAX_MESSAGE,
        read_size: int = _MIN_READ,
        expect_preamble: bool = True,
    ) -> None:
        self.max_message = max_message
        self.read_size = max(read_size, _START_READ)
        self._want = _START_READ
        self._offered = 0
        self._capacity = _START_READ
        self._buf = bytearray(self._capacity)
        self._r = 0
        self._w = 0
        self._need_preamble = expect_preamble
        # A frame whose data section is being received into its own buffer.
        self._body: Optional[Any] = None  # bytearray or mmap.mmap
        self._body_got = 0
        self._body_head: Optional[tuple] = None
        self._bodies = _BodyPool()
        self._body_meta = -1  # >= 0: the own buffer holds this many metadata bytes first
        self.frames: List[Frame] = []
        #: Set when a handshake, PING or PONG frame was decoded (cleared by the reader).
        self.control = False
        self._last_channel: Tuple[int, bytes, str] = (-1, b"", "")
        self.bytes_received = 0
        self.pause_after_handshake = False
        self._paused = False  # parsing stopped after a handshake frame, until resume()

    # -- the BufferedProtocol-style interface ---------------------------------------

    def get_buffer(self) -> memoryview:
        """Writable memory for the next received bytes (never empty)."""
        if self._body is not None:
            return memoryview(self._body)[self._body_got :]
        free = self._capacity - self._w
        if free < self._want:
            # Room for ``_want`` more bytes after a frame cut by the last read: the
            # buffer grows to ``read_size`` + that much of a frame (measured: keeping it
            # at ``read_size``, so offering less to each read, lost the gain of the
            # larger reads in a fan-out to 20 clients: 1.91M against 2.12M deliveries/s).
            self._compact(self._want)
        self._offered = self._capacity - self._w
        return memoryview(self._buf)[self._w :]

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written into the last buffer; parse what is complete.

        Complete frames are appended to :attr:`frames`.  Raises :class:`ProtocolError`
        (the connection must then be closed) on malformed input.
        """
        self.bytes_received += nbytes
        if self._body is not None:
            self._body_got += nbytes
            if self._body_got < len(self._body):
                return
            ftype, flags, channel, fid, meta = self._body_head  # type: ignore[misc]
            body = self._body
            mlen = self._body_meta
            if mlen >= 0:  # metadata and data in one buffer (a memoryview of it)
                meta, body = body[:mlen], (body[mlen:] if len(body) > mlen else None)
            self.frames.append(Frame(ftype, flags, channel, fid, meta, body))
            if flags & FLAG_SHM:
                self.control = True  # Protocol.events() resolves (or refuses) it
            self._body = None
            self._body_head = None
            return
        if nbytes >= self._offered and self._want < self.read_size:
            self._want = min(self._want * 4, self.read_size)  # the stream is busy: read more
        self._w += nbytes
        self._parse()

    def feed(self, data: codec.Buffer) -> List[Frame]:
        """Push ``data`` through :meth:`get_buffer`/:meth:`buffer_updated`; return new frames."""
        view = memoryview(data).cast("B")
        while view:
            buf = self.get_buffer()
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            view = view[n:]
            self.buffer_updated(n)
        return self.take()

    def resume(self) -> List[Frame]:
        """Parse the bytes held back by :attr:`pause_after_handshake`; return new frames."""
        self._paused = False
        if self._body is None:
            self._parse()
        return self.take()

    def take(self) -> List[Frame]:
        """Return and forget the frames decoded so far."""
        frames = self.frames
        if frames:
            self.frames = []
        return frames

    def put_back(self, frames: List[Frame]) -> None:
        """Return ``frames`` (taken, not handled yet) to the front of :attr:`frames`;
        they may include frames that :attr:`control` announces."""
        self.frames[:0] = frames
        self.control = True

    def body(self, size: int) -> bytearray:
        """A buffer for a data section of ``size`` bytes received another way (shared
        memory): recycled like the ones the socket fills."""
        return self._bodies.take(size) if size >= _OWN_BUFFER else bytearray(size)

    # -- internals ---------------------------------------------------------------------

    def _compact(self, need: int) -> None:
        """Make at least ``need`` bytes free after the unparsed data."""
        pending = self._w - self._r
        capacity = self._capacity
        if pending + need > capacity:
            capacity = max(capacity * 2, pending + need)
        if capacity != self._capacity:
            # A fresh buffer rather than a resize: a memoryview handed out by
            # get_buffer() may still be alive, and a bytearray cannot resize under it.
            new = bytearray(capacity)
            new[:pending] = self._buf[self._r : self._w]
            self._buf = new
            self._capacity = capacity
            self._r = 0
            self._w = pending
        elif self._r:
            # In place (the same size: allowed under a live memoryview).  No frame
            # refers to the stream buffer: metadata and data are copied out of it.  A
            # fresh buffer each time cost a zero-filled allocation of the whole capacity.
            buf = self._buf
            buf[:pending] = buf[self._r : self._w]
            self._r = 0
            self._w = pending

    def _parse(self) -> None:
        if self._paused:
            return  # bytes received meanwhile wait for resume(), under the new limit
        buf = self._buf
        if self._need_preamble:
            if self._w - self._r < len(PREAMBLE):
                return
            check_preamble(bytes(buf[self._r : self._r + len(PREAMBLE)]))
            self._r += len(PREAMBLE)
            self._need_preamble = False
        r, w = self._r, self._w
        unpack = HEADER.unpack_from
        append = self.frames.append
        new_frame = tuple.__new__
        last_len, last_raw, last_name = self._last_channel
        max_message = self.max_message
        while w - r >= HEADER_SIZE:
            ftype, flags, clen, fid, mlen, dlen = unpack(buf, r)
            total = HEADER_SIZE + clen + mlen + dlen
            if total > max_message:
                raise MessageTooBig(
                    f"peer sent a {total}-byte frame; max_message is {max_message} bytes "
                    "(raise max_message on this endpoint if such frames are expected)"
                )
            if ftype not in FRAME_TYPES:
                raise ProtocolError(f"unknown frame type 0x{ftype:02x}")
            avail = w - r
            if avail < total:
                prefix = HEADER_SIZE + clen + mlen
                if dlen >= _OWN_BUFFER and avail >= prefix:
                    # Receive the rest of the data section straight into its own buffer.
                    channel = self._channel(buf, r + HEADER_SIZE, clen)
                    meta: Any = bytes(buf[r + HEADER_SIZE + clen : r + prefix])
                    body: Any = (
                        mmap.mmap(-1, dlen) if dlen >= _MMAP_BODY else self._bodies.take(dlen)
                    )
                    got = avail - prefix
                    body[:got] = buf[r + prefix : w]
                    self._body = body
                    self._body_got = got
                    self._body_head = (ftype, flags, channel, fid, meta)
                    self._body_meta = -1
                    r = w
                elif mlen >= _OWN_BUFFER and avail >= HEADER_SIZE + clen:
                    # A large metadata section (a big bytes or str value): received
                    # into a buffer of its own too, so that it is not first gathered in
                    # a grown stream buffer and then copied out of it.  The value
                    # decoded from it is then the only other copy.
                    channel = self._channel(buf, r + HEADER_SIZE, clen)
                    pad = -mlen % 8 if dlen else 0  # the data section stays 8-aligned
                    size = pad + mlen + dlen
                    own: Any = mmap.mmap(-1, size) if size >= _MMAP_BODY else bytearray(size)
                    view = memoryview(own)[pad:]
                    got = avail - HEADER_SIZE - clen
                    view[:got] = buf[r + HEADER_SIZE + clen : w]
                    self._body = view
                    self._body_got = got
                    self._body_head = (ftype, flags, channel, fid, b"")
                    self._body_meta = mlen
                    r = w
                elif total > self._capacity - r:
                    # Make the whole frame (or its prefix) fit in the stream buffer.
                    self._r = r
                    self._compact((prefix if dlen >= _OWN_BUFFER else total) - avail)
                    return
                break
            p = r + HEADER_SIZE
            if clen == last_len and buf.startswith(last_raw, p):
                channel = last_name  # the same channel as the frame before: no allocation
            elif clen:
                raw = buf[p : p + clen]
                try:
                    channel = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise ProtocolError("channel name is not valid UTF-8") from None
                last_len, last_raw, last_name = clen, bytes(raw), channel
            else:
                channel = ""
            p += clen
            meta = buf[p : p + mlen]  # a copy: the stream buffer is reused
            p += mlen
            # A bytearray (not bytes) so that arrays decoded from it are writable.
            data = buf[p : p + dlen] if dlen else None
            # tuple.__new__ directly: NamedTuple's generated __new__ costs a Python call.
            append(new_frame(Frame, (ftype, flags, channel, fid, meta, data)))
            r += total
            if ftype < DATA or ftype == PING or ftype == PONG or flags & FLAG_SHM:
                self.control = True  # Protocol.events() has frames of its own to handle
                if ftype < DATA and self.pause_after_handshake:
                    self._paused = True
                    break
        self._last_channel = (last_len, last_raw, last_name)
        if r == w:
            r = w = 0
            self._w = 0
            if self._capacity > 4 * self.read_size:  # a large frame passed: give it back
                self._capacity = self.read_size
                self._buf = bytearray(self._capacity)
        self._r = r

    def _channel(self, buf: bytearray, start: int, length: int) -> str:
        raw = bytes(buf[start : start + length])
        name = _names.get(raw)
        if name is None:
            try:
                name = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ProtocolError("channel name is not valid UTF-8") from None
            if length <= CACHED_NAME_MAX and len(_names) < 4096:
                _names[raw] = name
        return name
