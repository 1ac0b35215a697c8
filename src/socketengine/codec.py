"""Values <-> bytes.  Sans-I/O: no sockets, no threads, no global mutable state but caches.

A value is encoded as two parts (see docs/protocol.md, "Values"):

* ``meta`` -- one msgpack document describing the value;
* ``data`` -- the raw bytes of every numpy array in the value, concatenated, each
  starting on an 8-byte boundary.  Arrays travel out of band so that sending never
  copies pixel buffers and receiving turns the received buffer into the array.

msgpack-python is used rather than msgspec because its ``strict_types`` packer lets
tuples, numpy scalars and big ints round-trip exactly (msgspec packs tuples as lists
without a hook); both are C extensions of similar speed (measured: Packer.pack 77 ns,
unpackb 139 ns for ``[int, 100-char str]``; msgspec 50/92 ns).

Nothing is ever unpickled: every extension type is decoded by explicit code here.
"""

from __future__ import annotations

import re
import sys
import threading
from typing import Any, Callable, Container, Dict, Final, List, Optional, Sequence, Tuple, Union

import msgpack

from .images import EncodedImage

__all__ = [
    "encode",
    "decode",
    "decoded_size",
    "Buffer",
    "EXT_NDARRAY",
    "EXT_TUPLE",
    "EXT_NPSCALAR",
    "EXT_BIGINT",
    "EXT_IMAGE",
]

Buffer = Union[bytes, bytearray, memoryview]

#: msgpack extension type codes (docs/protocol.md, "Extension types").
EXT_NDARRAY: Final = 1
EXT_TUPLE: Final = 2
EXT_NPSCALAR: Final = 3
EXT_BIGINT: Final = 4
EXT_IMAGE: Final = 5  # an images.EncodedImage (JPEG/PNG bytes in the data section)

_ALIGN: Final = 8
_PAD: Final = bytes(_ALIGN)
# numpy kinds that can be rebuilt from raw bytes alone: no objects, no structured records.
_ARRAY_KINDS: Final = frozenset("biufcmMSU")
_INT64_MIN: Final = -(1 << 63)
_UINT64_MAX: Final = (1 << 64) - 1
# Tuples nest msgpack documents (one unpackb call per level), and each unpackb call
# keeps a ~40 KB parse stack on the C stack: about 200 levels overflow an 8 MB stack and
# kill the process (measured).  Both sides refuse deeper tuples; lists/dicts do not count.
MAX_TUPLE_DEPTH: Final = 32


def _numpy() -> Any:
    """numpy if the program imported it (an array can only exist if it did), else None."""
    return sys.modules.get("numpy")


class _Encoder:
    """One per thread: a reusable msgpack Packer plus the out-of-band buffers of one value."""

    def __init__(self) -> None:
        self.buffers: List[Buffer] = []
        self.offset = 0
        self.packer = msgpack.Packer(
            default=self._default, use_bin_type=True, strict_types=True, autoreset=True
        )
        # Tuples are packed by a nested call; it needs its own packer (the outer one is busy).
        self.inner = msgpack.Packer(
            default=self._default, use_bin_type=True, strict_types=True, autoreset=True
        )
        self.depth = 0

    def encode(self, value: Any) -> Tuple[bytes, Sequence[Buffer], int]:
        # The state is reset after use, not before: most values hold no array, and the
        # common path then allocates nothing but the msgpack bytes.
        try:
            meta = self.packer.pack(value)
        except OverflowError:
            # An int beyond the 64-bit msgpack range somewhere: pack again with big ints
            # turned into extension values (slow path, rare).
            self._reset()
            try:
                meta = self.packer.pack(_widen(value))
            except BaseException:
                self._reset()
                raise
        except RecursionError:
            self._reset()
            raise ValueError("value is nested too deeply to send") from None
        except BaseException:
            self._reset()
            raise
        if not self.buffers:
            return meta, (), 0
        buffers, length = self.buffers, self.offset
        self._reset()
        return meta, buffers, length

    def _reset(self) -> None:
        self.buffers = []
        self.offset = 0
        self.depth = 0

    def _pack_nested(self, value: Any) -> bytes:
        packer = (
            self.inner
            if self.depth == 0
            else msgpack.Packer(
                default=self._default, use_bin_type=True, strict_types=True, autoreset=True
            )
        )
        self.depth += 1
        try:
            return packer.pack(value)
        finally:
            self.depth -= 1

    def _tuple(self, obj: Any) -> msgpack.ExtType:
        if self.depth >= MAX_TUPLE_DEPTH:
            # The receiver would refuse it (see MAX_TUPLE_DEPTH): fail here, where it is clear.
            raise ValueError(f"value is nested too deeply to send (tuples > {MAX_TUPLE_DEPTH})")
        return msgpack.ExtType(EXT_TUPLE, self._pack_nested(list(obj)))

    def _default(self, obj: Any) -> Any:
        t = type(obj)
        if t is tuple:
            return self._tuple(obj)
        if t is EncodedImage:
            return self._image(obj)
        np = _numpy()
        if np is not None:
            if isinstance(obj, np.ndarray):
                return self._array(np, obj)
            if isinstance(obj, np.generic):
                return self._scalar(np, obj)
        # Subclasses of the plain types travel as their base type (IntEnum as int,
        # OrderedDict as dict, namedtuple as tuple), as json does.
        if isinstance(obj, bool):
            return bool(obj)
        for base in (int, float, str, bytes, list, dict):
            if isinstance(obj, base):
                return base(obj)  # type: ignore[arg-type]
        if isinstance(obj, tuple):
            return self._tuple(obj)
        raise TypeError(
            f"socketengine cannot send a value of type {t.__module__}.{t.__qualname__}: "
            "send None, bool, int, float, str, bytes, list, tuple, dict or a numpy array "
            "(convert it first, e.g. with dataclasses.asdict() or str())"
        )

    def _array(self, np: Any, arr: Any) -> msgpack.ExtType:
        dtype = arr.dtype
        if dtype.kind not in _ARRAY_KINDS or dtype.hasobject or dtype.fields is not None:
            raise TypeError(
                f"socketengine cannot send a numpy array of dtype {dtype!r}: only numeric, "
                "bool, datetime and fixed-width string dtypes travel as raw bytes"
            )
        fortran = False
        if arr.flags.c_contiguous:
            flat = arr.reshape(-1)
        elif arr.flags.f_contiguous:
            fortran = True
            flat = arr.T.reshape(-1)
        else:
            flat = np.ascontiguousarray(arr).reshape(-1)  # the one copy a strided view needs
        raw = memoryview(flat.view(np.uint8))
        nbytes = raw.nbytes
        offset = self.offset
        if nbytes:
            self.buffers.append(raw)
            pad = -nbytes % _ALIGN
            if pad:
                self.buffers.append(_PAD[:pad])
            self.offset = offset + nbytes + pad
        head = [dtype.str, list(arr.shape), offset, nbytes]
        if fortran:
            head.append(1)
        return msgpack.ExtType(EXT_NDARRAY, self._pack_nested(head))

    def _image(self, img: EncodedImage) -> msgpack.ExtType:
        """Ext 5: [codec, shape, dtype, offset, nbytes, order]; the bytes go out of band."""
        raw = memoryview(img.data).cast("B")  # len() == bytes: the senders rely on it
        nbytes = raw.nbytes
        offset = self.offset
        self.buffers.append(raw)
        pad = -nbytes % _ALIGN
        if pad:
            self.buffers.append(_PAD[:pad])
        self.offset = offset + nbytes + pad
        head = [img.codec, list(img.shape), img.dtype, offset, nbytes, img.order]
        return msgpack.ExtType(EXT_IMAGE, self._pack_nested(head))

    def _scalar(self, np: Any, obj: Any) -> msgpack.ExtType:
        dtype = obj.dtype
        if dtype.kind not in _ARRAY_KINDS:
            raise TypeError(f"socketengine cannot send a numpy scalar of dtype {dtype!r}")
        return msgpack.ExtType(EXT_NPSCALAR, self._pack_nested([dtype.str, obj.tobytes()]))


def _widen(value: Any) -> Any:
    """Copy of ``value`` with ints outside the 64-bit range replaced by EXT_BIGINT values.

    isinstance, not type(): subclasses (IntEnum, OrderedDict, namedtuple) travel as their
    base type, so a big int inside (or being) one must be widened too.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        if _INT64_MIN <= value <= _UINT64_MAX:
            return value
        value = int(value)
        length = (value.bit_length() + 8) // 8
        return msgpack.ExtType(EXT_BIGINT, value.to_bytes(length, "big", signed=True))
    if isinstance(value, list):
        return [_widen(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_widen(v) for v in value)
    if isinstance(value, dict):
        return {_widen(k): _widen(v) for k, v in value.items()}
    return value


_local: Final = threading.local()


def _plain_packer() -> Any:
    """The shared packer of :data:`pack_plain`, or None on a free-threaded build."""
    gil_enabled = getattr(sys, "_is_gil_enabled", None)
    if gil_enabled is not None and not gil_enabled():
        return None
    return msgpack.Packer(use_bin_type=True, strict_types=True, autoreset=True)


_PLAIN: Final = _plain_packer()
#: ``pack_plain(value) -> bytes``: the ``meta`` of a value msgpack packs by itself (no
#: array, tuple, image, numpy scalar, subclass or int beyond 64 bits), byte for byte what
#: :func:`encode` gives it; anything else raises (``TypeError``, ``OverflowError``,
#: ``ValueError``) and :func:`encode` must be used.  One packer serves every thread:
#: without a ``default`` hook it runs no Python code, so the GIL is never released
#: inside a call and no other thread can enter it meanwhile (the writers' fast path
#: saves the thread-local lookup and the hook's set-up).  ``None`` on a free-threaded
#: build, where that reasoning does not hold.
pack_plain: Final[Any] = None if _PLAIN is None else _PLAIN.pack


def encode(value: Any) -> Tuple[bytes, Sequence[Buffer], int]:
    """Encode ``value`` into ``(meta, buffers, data_length)``.

    ``buffers`` are the data section's parts in order (array memory is referenced, not
    copied); ``data_length`` is their total size in bytes.  Raises ``TypeError`` naming
    the type of the first value that cannot be sent, before anything is produced.
    Thread-safe (one packer per thread).
    """
    enc = getattr(_local, "encoder", None)
    if enc is None:
        enc = _local.encoder = _Encoder()
    return enc.encode(value)


_BATCH_TAIL: Final = "BATCH body does not end with a whole (channel, value) item"


def _batch_unpacker(body: Buffer) -> msgpack.Unpacker:
    """A streaming unpacker fed a whole BATCH body (:func:`decode_batch`,
    :func:`decode_batch_last`): plain values only, at most the body's size buffered."""
    unpacker = msgpack.Unpacker(
        ext_hook=_plain_ext_hook,
        raw=False,
        strict_map_key=False,
        max_buffer_size=max(len(body), 1),
    )
    unpacker.feed(body)
    return unpacker


def _batch_error(exc: Exception) -> ValueError:
    """What a BATCH decoder raises for ``exc`` from its unpacker: msgpack raises several
    types (some are ``ValueError`` already, kept as they are); the caller sees one."""
    if isinstance(exc, ValueError):
        return exc
    if isinstance(exc, msgpack.OutOfData):  # a channel with no value after it
        return ValueError(_BATCH_TAIL)
    return ValueError(f"malformed BATCH item: {type(exc).__name__}: {exc}")


def decode_batch(body: Buffer) -> List[Any]:
    """The items of a BATCH frame body, flat: ``[channel, value, channel, value, ...]``.

    Raises ``ValueError`` if the body is not a whole number of (str, value) pairs of
    msgpack objects (arrays and encoded images cannot be in a BATCH: they have a data
    section of their own).
    """
    unpacker = _batch_unpacker(body)
    try:
        out = list(unpacker)
    except Exception as exc:
        raise _batch_error(exc) from None
    if unpacker.tell() != len(body) or len(out) % 2:
        raise ValueError(_BATCH_TAIL)
    for channel in out[0::2]:
        if type(channel) is not str:
            raise ValueError("BATCH item channel is not a string")
    return out


def decode_batch_last(
    body: Buffer, watched: Sequence[Container[str]] = ()
) -> Optional[Tuple[int, Dict[str, Any]]]:
    """A BATCH frame body reduced to what a receiver that stores only the latest value
    keeps: ``(items, last)``, the number of (channel, value) items and the last value
    of each channel, ``{channel: value}`` in the order the channels first appear (what
    storing the items one by one leaves).

    Every item is decoded and checked exactly as :func:`decode_batch` checks it (the
    same ``ValueError`` for the same body), but a value is dropped as soon as a later
    one on its channel is decoded, so a burst on one channel never holds more than one
    of its values.

    ``watched``: containers of channels whose every value is wanted (waited for,
    subscribed to, handled).  An item on one of them ends the reduction: ``None`` is
    returned, and the caller decodes the body item by item (:func:`decode_batch`).
    """
    unpacker = _batch_unpacker(body)
    last: Dict[str, Any] = {}
    count = 0
    unpack = unpacker.unpack
    # A run of items on one channel (a burst) is compared, not hashed: the channel
    # goes into ``last`` once the run ends, where it would have been inserted first.
    run: Any = None
    value: Any = None
    try:
        for channel in unpacker:
            if type(channel) is not str:
                raise ValueError("BATCH item channel is not a string")
            if channel != run:
                if count:
                    last[run] = value
                for wanted in watched:
                    if channel in wanted:
                        return None
                run = channel
            value = unpack()
            count += 1
    except Exception as exc:
        raise _batch_error(exc) from None
    if unpacker.tell() != len(body):
        raise ValueError(_BATCH_TAIL)
    if count:
        last[run] = value
    return count, last


def _decode_error(msg: str) -> ValueError:
    return ValueError(msg)


def _make_ext_hook(data: Buffer | None, depth: int = 0) -> Callable[[int, bytes], Any]:
    # ``depth`` is the number of enclosing tuples; a hook per level (not a shared
    # counter) keeps the module-level hook stateless and thread-safe.
    def ext_hook(code: int, payload: bytes) -> Any:
        if code == EXT_TUPLE:
            if depth >= MAX_TUPLE_DEPTH:
                raise _decode_error(f"tuples are nested more than {MAX_TUPLE_DEPTH} deep")
            inner = _make_ext_hook(data, depth + 1)
            items = msgpack.unpackb(payload, ext_hook=inner, raw=False, strict_map_key=False)
            if type(items) is not list:
                raise _decode_error("tuple extension does not hold an array")
            return tuple(items)
        if code == EXT_NDARRAY:
            return _decode_array(payload, data)
        if code == EXT_NPSCALAR:
            return _decode_scalar(payload)
        if code == EXT_BIGINT:
            return int.from_bytes(payload, "big", signed=True)
        if code == EXT_IMAGE:
            return _decode_image(payload, data)
        raise _decode_error(f"unknown msgpack extension type {code}")

    return ext_hook


plain_ext_hook: Final = _make_ext_hook(None)
_plain_ext_hook: Final = plain_ext_hook


def _import_numpy() -> Any:
    try:
        import numpy
    except ImportError:  # pragma: no cover - depends on the environment
        raise ValueError(
            "received a numpy array but numpy is not installed: pip install 'socket.engine[numpy]'"
        ) from None
    return numpy


def _dtype(np: Any, name: Any) -> Any:
    if type(name) is not str or len(name) > 32:
        raise _decode_error("array dtype is not a short string")
    dtype = np.dtype(name)
    if dtype.kind not in _ARRAY_KINDS or dtype.hasobject or dtype.fields is not None:
        raise _decode_error(f"array dtype {name!r} is not allowed")
    return dtype


def _decode_array(payload: bytes, data: Buffer | None) -> Any:
    np = _import_numpy()
    head = msgpack.unpackb(payload, raw=False)
    if type(head) is not list or len(head) not in (4, 5):
        raise _decode_error("array header is not a 4- or 5-item array")
    dtype = _dtype(np, head[0])
    if dtype.itemsize == 0:
        # No real array has one ('S0' arrays become 'S1'), and np.empty would size it at
        # 1 byte per element: a 30-byte header could allocate gigabytes.
        raise _decode_error(f"array dtype {head[0]!r} has no size")
    shape, offset, nbytes = head[1], head[2], head[3]
    if (
        type(shape) is not list
        or len(shape) > 64
        or not all(type(n) is int and n >= 0 for n in shape)
    ):
        raise _decode_error("array shape is not a list of non-negative ints")
    count = 1
    for n in shape:
        count *= n
    if type(offset) is not int or type(nbytes) is not int or offset < 0:
        raise _decode_error("array offset/size are not ints")
    if count * dtype.itemsize != nbytes:
        raise _decode_error("array size does not match its shape and dtype")
    fortran = len(head) == 5 and head[4] == 1
    if nbytes == 0:
        return np.empty(shape, dtype=dtype, order="F" if fortran else "C")
    if data is None or offset + nbytes > len(data):
        raise _decode_error("array bytes lie outside the frame's data section")
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    if fortran:
        return flat.reshape(shape[::-1]).T
    return flat.reshape(shape)


def _decode_scalar(payload: bytes) -> Any:
    np = _import_numpy()
    head = msgpack.unpackb(payload, raw=False)
    if type(head) is not list or len(head) != 2 or type(head[1]) is not bytes:
        raise _decode_error("numpy scalar is not [dtype, bytes]")
    dtype = _dtype(np, head[0])
    if dtype.itemsize == 0:
        # np.str_("") / np.bytes_(b""): a sizeless dtype whose tobytes() is padding.
        return dtype.type()
    if len(head[1]) != dtype.itemsize:
        raise _decode_error("numpy scalar size does not match its dtype")
    return np.frombuffer(head[1], dtype=dtype)[0]


def _decode_image(payload: bytes, data: Buffer | None) -> EncodedImage:
    """Ext 5 -> EncodedImage whose ``data`` is a read-only view of the data section.

    Still compressed: decompressing is the endpoint's job (off the I/O thread).
    """
    head = msgpack.unpackb(payload, raw=False)
    if type(head) is not list or len(head) < 6:
        raise _decode_error("image header is not an array of at least 6 items")
    offset, nbytes = head[3], head[4]
    if type(offset) is not int or type(nbytes) is not int or offset < 0 or nbytes <= 0:
        raise _decode_error("image offset/size are not ints (size > 0)")
    if data is None or offset + nbytes > len(data):
        raise _decode_error("image bytes lie outside the frame's data section")
    view = memoryview(data)[offset : offset + nbytes].toreadonly()
    return EncodedImage.from_wire(head[0], head[1], head[2], head[5], view)


def decode(meta: Buffer, data: Buffer | None = None) -> Any:
    """Decode one value from its ``meta`` msgpack bytes and optional ``data`` section.

    Arrays are views of ``data`` (no copy; writable when ``data`` is a bytearray).
    Raises ``ValueError`` on any malformed input.
    """
    hook = _plain_ext_hook if data is None else _make_ext_hook(data)
    try:
        return msgpack.unpackb(meta, ext_hook=hook, raw=False, strict_map_key=False)
    except ValueError:
        raise
    except Exception as exc:  # msgpack raises several types; normalise for the caller
        raise ValueError(f"malformed value: {type(exc).__name__}: {exc}") from None


# -- what a decoded value takes in memory ---------------------------------------------
#
# A host budgets what a client's values take (``max_stored``).  Their wire size is no
# measure of that for msgpack made of many small items: an empty list is one byte on the
# wire and 64 bytes plus an 8-byte pointer in Python; dicts of one entry nested in each
# other, two bytes and 224 bytes per level (the most measured: 112 per byte, CPython
# 3.11).  decoded_size() reads the msgpack
# bytes without decoding them and adds up the objects decoding them creates, from this
# interpreter's own object sizes rounded up to the allocators' 16 bytes.  It is an upper
# bound: what it cannot know (which ints and strings are cached singletons, which map
# keys another value already interned) it counts as new.


def _r16(n: int) -> int:
    return (n + 15) & -16


_LIST: Final = _r16(sys.getsizeof([]))
_DICT: Final = _r16(sys.getsizeof({}))


def _mixed_keys() -> Dict[Any, None]:
    mixed: Dict[Any, None] = {"": None}
    mixed[0] = None  # a str-only keys table is rebuilt, larger, for another key
    return mixed


_DICT_SMALL: Final = _r16(sys.getsizeof(_mixed_keys()))  # up to 5 entries (352 B)
# A dict entry beyond 5, with the table's growth and a rebuild for mixed keys (measured:
# at most 108 B below 2**15 entries, 120 B above).
_ENTRY: Final = 120
# msgpack interns str map keys: a new key also takes a slot (<= 48 B, with growth) in the
# interpreter's table of interned strings.  Counted for every map entry.
_KEY: Final = 48
_INT: Final = _r16(sys.getsizeof(1 << 59))  # an int below 2**60: msgpack's 8 to 32-bit ones
_INT64: Final = _r16(sys.getsizeof(1 << 63))
_FLOAT: Final = _r16(sys.getsizeof(1.0))
_STR: Final = sys.getsizeof("")  # an ASCII str: this + its length
_USTR: Final = sys.getsizeof("\U0001f600") - 4  # any other str: this + width x (chars + 1)
_BYTES: Final = sys.getsizeof(b"")
# A numpy array or an EncodedImage decoded from an extension value: the object, its view
# of the data section, shape and strides (measured 540-600 B, 16 B more per dimension);
# the data section itself is counted at its size.
_VIEW: Final = 640


def _list_size(n: int) -> int:
    # msgpack fills a long list by appending (the list over-allocates by up to 1/8).
    return _LIST + (_r16(8 * n) if n < 16 else _r16(9 * n + 48))


def _dict_size(n: int) -> int:
    if n == 0:
        return _DICT
    if n <= 5:
        return _DICT_SMALL + _KEY * n
    return _DICT + (_ENTRY + _KEY) * n


# Tokens whose length and cost their first byte tells: size (0: read further) and cost.
_SIZE: Final = [0] * 256
_COST: Final = [0] * 256
for _b in range(0x80):  # positive fixint: a cached int
    _SIZE[_b] = 1
for _b in range(0xE0, 0x100):  # negative fixint: -32..-6 are new ints
    _SIZE[_b], _COST[_b] = 1, (_INT if _b <= 0xFA else 0)
for _b in range(16):
    _SIZE[0x80 + _b], _COST[0x80 + _b] = 1, _dict_size(_b)  # fixmap header
    _SIZE[0x90 + _b], _COST[0x90 + _b] = 1, _list_size(_b)  # fixarray header
for _b, _s, _c in (
    (0xA0, 1, 0),  # "" and one-character strs are cached
    (0xA1, 2, 0),
    (0xC0, 1, 0),  # nil, false, true
    (0xC2, 1, 0),
    (0xC3, 1, 0),
    (0xCA, 5, _FLOAT),
    (0xCB, 9, _FLOAT),
    (0xCC, 2, 0),  # uint8: cached
    (0xCD, 3, _INT),
    (0xCE, 5, _INT),
    (0xCF, 9, _INT64),
    (0xD0, 2, _INT),
    (0xD1, 3, _INT),
    (0xD2, 5, _INT),
    (0xD3, 9, _INT64),
):
    _SIZE[_b], _COST[_b] = _s, _c
_TOKEN_SIZE: Final = tuple(_SIZE)
_TOKEN_COST: Final = tuple(_COST)
del _SIZE, _COST, _b, _s, _c
_FIXSTR_COST: Final = tuple(_r16(_STR + (b & 0x1F)) for b in range(256))  # by fixstr header
# In a long list: a run of one-byte tokens that cost nothing themselves (cached ints,
# nil, booleans, ""; the pointers to them are counted with the list), and a run of
# negative fixints that are new ints.
_FREE: Final = re.compile(rb"[\x00-\x7f\xa0\xc0\xc2\xc3\xfb-\xff]*")
_NEGATIVE: Final = re.compile(rb"[\xe0-\xfa]*")
_CONTINUATION: Final = bytes(range(0x80, 0xC0))
# UTF-8 lead bytes -> the width of the str holding that character (1 for the others).
_WIDTH: Final = bytes(4 if b >= 0xF0 else 2 if b >= 0xC4 else 1 for b in range(256))
_FIXEXT: Final = (1, 2, 4, 8, 16)
_ASCII_CHUNK: Final = 1 << 18


def decoded_size(meta: Buffer, limit: int = 1 << 62, _depth: int = 0) -> int:
    """An upper bound of the bytes of Python objects that :func:`decode` creates for the
    value whose msgpack is ``meta`` (its data section not included), found without
    decoding it.

    Reading stops, and a number above ``limit`` is returned, as soon as the count exceeds
    ``limit``.  Malformed msgpack gives some number (decoding it fails anyway).  One pass
    over the tokens in Python: a few times as long as decoding them (about as long for
    long lists of numbers, which are skipped in C; a long str or bytes is one step).
    """
    m = meta
    if type(m) is memoryview:  # a large meta arrives as one: bytes slice faster (a
        m = m.tobytes()  # copy, freed before the value is decoded)
    n = len(m)
    i = 0
    total = 0
    size_of = _TOKEN_SIZE
    cost_of = _TOKEN_COST
    try:
        while i < n:
            b = m[i]
            s = size_of[b]
            if s:
                total += cost_of[b]
                i += s
            elif b <= 0xBF:  # fixstr of 2..31 bytes
                start = i + 1
                i = start + (b & 0x1F)
                chunk = m[start:i]
                total += _FIXSTR_COST[b] if chunk.isascii() else _wide_str_size(chunk)
            elif b == 0xDC or b == 0xDD:  # array 16/32: a long list, often of numbers
                start = i + (3 if b == 0xDC else 5)
                count = int.from_bytes(m[start - 2 if b == 0xDC else i + 1 : start], "big")
                total += _list_size(count)
                i, cost = _skip_run(m, start, count)
                total += cost
            elif b == 0xD9 or b == 0xDA:  # str 8/16
                start = i + 2 if b == 0xD9 else i + 3
                i = start + (m[i + 1] if b == 0xD9 else m[i + 1] << 8 | m[i + 2])
                chunk = m[start:i]
                if chunk.isascii():
                    total += (len(chunk) + _STR + 15) & -16
                else:
                    total += _wide_str_size(chunk)
            elif b == 0xDE or b == 0xDF:  # map 16/32
                start = i + (3 if b == 0xDE else 5)
                total += _dict_size(int.from_bytes(m[i + 1 : start], "big"))
                i = start
            elif b == 0xDB:  # str 32
                start = i + 5
                i = start + int.from_bytes(m[i + 1 : start], "big")
                total += _str_size(m, start, i)
            elif 0xC4 <= b <= 0xC6:  # bin 8/16/32: b"" and one-byte bytes are cached
                start = i + 2 + (b > 0xC4) + 2 * (b > 0xC5)
                length = int.from_bytes(m[i + 1 : start], "big")
                i = start + length
                if length > 1:
                    total += _r16(_BYTES + length)
            elif 0xD4 <= b <= 0xD8 or 0xC7 <= b <= 0xC9:  # extension values
                if b >= 0xD4:
                    length = _FIXEXT[b - 0xD4]
                    start = i + 2
                else:
                    start = i + 3 + (b > 0xC7) + 2 * (b > 0xC8)
                    length = int.from_bytes(m[i + 1 : start - 1], "big")
                code = m[start - 1]
                i = start + length
                if code == EXT_TUPLE:
                    if _depth < MAX_TUPLE_DEPTH:  # deeper fails to decode
                        total += decoded_size(m[start:i], limit - total, _depth + 1)
                elif code == EXT_NDARRAY or code == EXT_IMAGE:
                    total += _VIEW + 16 * length
                elif code == EXT_NPSCALAR:
                    total += 128 + length
                elif code == EXT_BIGINT:
                    total += 32 + 2 * length
            else:  # 0xc1: never valid
                break
            if total > limit:
                break
    except IndexError:  # truncated: decoding fails
        pass
    return total


def _skip_run(m: Union[bytes, bytearray], i: int, count: int) -> Tuple[int, int]:
    """Past the items at ``m[i:]`` of a list of ``count`` that are all the same kind
    of number (read in C): ``(where the rest starts, what those items cost)``."""
    if count < 16 or i >= len(m):
        return i, 0
    b = m[i]
    s = _TOKEN_SIZE[b]
    if s == 1:
        if b >= 0xE0 and _TOKEN_COST[b]:
            j = _NEGATIVE.match(m, i, i + count).end()  # type: ignore[union-attr]
            return j, _INT * (j - i)
        if not _TOKEN_COST[b]:
            return _FREE.match(m, i, i + count).end(), 0  # type: ignore[union-attr]
        return i, 0  # container headers: one by one
    if s > 1 and _TOKEN_COST[b]:
        # Floats or ints of one encoding: every s-th byte is b as far as they go.
        heads = m[i : i + s * count : s]
        run = len(heads) - len(heads.lstrip(heads[:1]))
        return i + s * run, _TOKEN_COST[b] * run
    return i, 0


def _str_size(m: Buffer, start: int, end: int) -> int:
    """What the str decoded from the UTF-8 bytes ``m[start:end]`` takes."""
    length = end - start
    if length <= 1:
        return 0  # "" and one-character strs are cached
    for at in range(start, end, _ASCII_CHUNK):  # in slices: m may be 64 MiB
        if not bytes(m[at : min(at + _ASCII_CHUNK, end)]).isascii():
            return _wide_str_size(bytes(m[start:end]))
    return _r16(_STR + length)


def _wide_str_size(chunk: Union[bytes, bytearray]) -> int:
    """What the str decoded from the UTF-8 bytes ``chunk`` (not all ASCII) takes: its
    characters are 1, 2 or 4 bytes wide, after the widest."""
    leads = chunk.translate(_WIDTH)
    width = 4 if b"\x04" in leads else 2 if b"\x02" in leads else 1
    chars = len(chunk.translate(None, _CONTINUATION))
    return _r16(_USTR + width * (chars + 1))
