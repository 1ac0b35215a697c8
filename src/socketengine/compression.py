"""Opt-in compression of large values: zstd and lz4 frames.  Sans-I/O: no sockets, no threads.

socket.engine 1.x had ``useCompression``; this module is the building block for it: the
endpoints announce :func:`available` codecs in the handshake, pick one with
:func:`negotiate`, compress a value's bytes when :func:`should_compress` says it is large
enough, and the receiver calls :func:`decompress` with its ``max_message`` limit.

Codecs (``pip install 'socket.engine[compression]'``)
-----------------------------------------------------
``"zstd"``
    Zstandard (package ``zstandard``): the better ratio, still fast at level 1-3.
``"lz4"``
    LZ4 frame format (package ``lz4``): faster, lower ratio.

Both produce a standard frame (RFC 8878 for zstd, the LZ4 frame format) that records the
uncompressed size, so a receiver knows the output size before it decompresses anything.

Hostile input
-------------
:func:`decompress` never produces, nor allocates room for, more than ``max_size`` bytes:
it reads the size the frame declares and refuses a larger one with
:class:`~socketengine.errors.MessageTooBig` before decompressing, and bounds the
decompressor's output by that size, so a frame that lies about it fails too (a
"decompression bomb" of a few KB announcing or expanding to gigabytes costs nothing).
zstd frames must declare their size (ours always do); an lz4 frame that does not is
decompressed in bounded steps.  Truncated input, trailing bytes after the frame and
garbage raise :class:`~socketengine.errors.ProtocolError`, never anything else.

When it pays
------------
Compression costs CPU on both sides to save link time.  Measured end to end
(``bench/compression.py``, figures in bench/README.md): at 100 Mbit/s (Wi-Fi class) it
wins for data that compresses: 219 KiB of msgpack'd telemetry 4.6x faster with zstd 1,
a millimetre depth map 1.3-1.5x.  It loses on 1 Gbit/s links and loopback for arrays
(0.3-0.5x), on noisy float32 such as point clouds (ratio 1.13) and on data already
compressed (JPEG, PNG).  :data:`DEFAULT_THRESHOLD` is the size below which the saving
cannot pay for the call.

Thread-safety: every function may be called from any thread (compressor and decompressor
contexts are kept per thread).  Both libraries release the GIL while they compress and
decompress (checked: another Python thread keeps running meanwhile).
"""

from __future__ import annotations

import importlib
import struct
import threading
from typing import Any, Dict, List, Optional, Sequence, Union

from .errors import MessageTooBig, ProtocolError

__all__ = [
    "CODECS",
    "DEFAULT_LEVELS",
    "DEFAULT_THRESHOLD",
    "CompressionUnavailable",
    "available",
    "negotiate",
    "compress",
    "decompress",
    "should_compress",
    "maybe_compress",
]

Buffer = Union[bytes, bytearray, memoryview]

#: Codec names, in the order :func:`available` prefers them.
CODECS = ("zstd", "lz4")
#: Level used when ``compress`` gets ``level=None``.  zstd 3 compresses 2-14x slower than
#: zstd 1 for the same ratio on noisy floats and telemetry (a third better on millimetre
#: depth maps), and never beat zstd 1 end to end at 100 Mbit/s on any payload of
#: bench/compression.py; lz4 0 is lz4's default.
DEFAULT_LEVELS: Dict[str, int] = {"zstd": 1, "lz4": 0}
#: Values smaller than this many bytes are sent as they are (see :func:`should_compress`).
#: Measured on telemetry (bench/compression.py --threshold): compressing saves link time
#: from ~1 KiB at 100 Mbit/s and wins end to end from 4 KiB (x1.2-1.5); at 1 Gbit/s it
#: breaks even only from 8-64 KiB, so fast-LAN users should raise it or leave it off.
DEFAULT_THRESHOLD = 4096

_LEVELS = {"zstd": (-131072, 22), "lz4": (0, 16)}
_MODULES = {"zstd": "zstandard", "lz4": "lz4.frame"}
_INSTALL = "pip install 'socket.engine[compression]'"
_PACKAGES = {"zstd": "zstandard", "lz4": "lz4"}
_MAX_ANNOUNCED = 32  # codec names a peer may announce

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_LZ4_MAGIC = b"\x04\x22\x4d\x18"
_LZ4_STEP = 1 << 20  # output per step when an lz4 frame does not declare its size


class CompressionUnavailable(ImportError):
    """The codec's library is not installed; the message says what to install."""


# -- backends -------------------------------------------------------------------------------

_loaded: Dict[str, Any] = {}


def _load(codec: str) -> Any:
    """The codec's module, or None if it cannot be imported (cached)."""
    try:
        return _loaded[codec]
    except KeyError:
        pass
    try:
        module: Any = importlib.import_module(_MODULES[codec])
    except Exception:  # not installed, or broken
        module = None
    _loaded[codec] = module
    return module


def _module(codec: str) -> Any:
    if codec not in _MODULES:
        raise ValueError(f"unknown compression codec {codec!r}: use one of {CODECS}")
    module = _load(codec)
    if module is None:
        raise CompressionUnavailable(
            f"{codec} compression needs the {_PACKAGES[codec]} package: {_INSTALL}"
        )
    return module


def available() -> List[str]:
    """The codecs whose library is importable here, preferred first."""
    return [c for c in CODECS if _load(c) is not None]


def negotiate(ours: Sequence[str], theirs: object) -> Optional[str]:
    """The first codec of ``ours`` that the peer also announced, or None.

    ``ours`` is what this side offers, preferred first (normally :func:`available`,
    possibly narrowed by the user); ``theirs`` is the peer's announcement as received.

    :raises ProtocolError: ``theirs`` is not a list of at most 32 str.
    """
    if type(theirs) is not list and type(theirs) is not tuple:
        raise ProtocolError(
            f"the peer's compression codecs are a list of names, not {type(theirs).__qualname__}"
        )
    if len(theirs) > _MAX_ANNOUNCED:
        raise ProtocolError(f"the peer announced {len(theirs)} compression codecs (max 32)")
    if any(type(name) is not str for name in theirs):
        raise ProtocolError("the peer's compression codec names are not all str")
    for name in ours:
        if name in CODECS and name in theirs:
            return name
    return None


def should_compress(nbytes: int, threshold: Optional[int] = DEFAULT_THRESHOLD) -> bool:
    """True if a value of ``nbytes`` bytes is worth compressing (``threshold`` None: never)."""
    return threshold is not None and nbytes >= threshold


# -- compress -------------------------------------------------------------------------------

_local = threading.local()


def _zstd_compressor(level: int) -> Any:
    cache: Optional[Dict[int, Any]] = getattr(_local, "zstd_c", None)
    if cache is None:
        cache = _local.zstd_c = {}
    cctx = cache.get(level)
    if cctx is None:
        zstd = _module("zstd")
        cctx = cache[level] = zstd.ZstdCompressor(
            level=level, write_content_size=True, write_checksum=False
        )
    return cctx


def _zstd_decompressor() -> Any:
    dctx = getattr(_local, "zstd_d", None)
    if dctx is None:
        dctx = _local.zstd_d = _module("zstd").ZstdDecompressor()
    return dctx


def _as_bytes_view(data: Buffer) -> memoryview:
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        if not view.c_contiguous:
            raise ValueError("compression needs a C-contiguous buffer")
        view = view.cast("B")
    return view


def compress(codec: str, data: Buffer, level: Optional[int] = None) -> bytes:
    """``data`` compressed as one ``codec`` frame that records its size.

    :param level: zstd -131072 (fastest) .. 22 (smallest), lz4 0 .. 16; None: the
        codec's :data:`DEFAULT_LEVELS`.
    :raises ValueError: unknown codec or level out of range.
    :raises CompressionUnavailable: the codec's library is not installed.
    """
    module = _module(codec)
    if level is None:
        level = DEFAULT_LEVELS[codec]
    lo, hi = _LEVELS[codec]
    if type(level) is not int or not lo <= level <= hi:
        raise ValueError(f"{codec} compression level must be an int in {lo}..{hi}, got {level!r}")
    view = _as_bytes_view(data)
    if codec == "zstd":
        return _zstd_compressor(level).compress(view)
    return module.compress(view, compression_level=level, store_size=True, content_checksum=False)


def maybe_compress(
    codec: Optional[str],
    data: Buffer,
    threshold: Optional[int] = DEFAULT_THRESHOLD,
    level: Optional[int] = None,
) -> Optional[bytes]:
    """``data`` compressed if it is large enough and the result is smaller; else None.

    The sender's one-liner: None means "send the bytes as they are".
    """
    nbytes = memoryview(data).nbytes
    if codec is None or not should_compress(nbytes, threshold):
        return None
    out = compress(codec, data, level)
    return out if len(out) < nbytes else None


# -- decompress -----------------------------------------------------------------------------


def decompress(codec: str, data: Buffer, max_size: int) -> bytes:
    """The bytes ``data`` (one ``codec`` frame) decompresses to, at most ``max_size``.

    :raises MessageTooBig: the frame declares (or expands to) more than ``max_size`` bytes;
        nothing of that size was allocated.
    :raises ProtocolError: ``data`` is not exactly one valid frame (truncated, trailing
        bytes, corrupt, a zstd frame without its size or needing a dictionary).
    :raises ValueError: unknown codec.
    :raises CompressionUnavailable: the codec's library is not installed.
    """
    module = _module(codec)
    if type(max_size) is not int or max_size < 0:
        raise ValueError(f"max_size must be an int >= 0, got {max_size!r}")
    view = _as_bytes_view(data)
    if codec == "zstd":
        return _zstd_decompress(module, view, max_size)
    return _lz4_decompress(module, view, max_size)


def _too_big(codec: str, size: int, max_size: int) -> MessageTooBig:
    return MessageTooBig(
        f"a {codec}-compressed value expands to {size} bytes, over the {max_size}-byte limit "
        "(max_message): raise max_message on the receiver or send smaller values"
    )


def _zstd_decompress(zstd: Any, view: memoryview, max_size: int) -> bytes:
    if view[:4] != _ZSTD_MAGIC:
        raise ProtocolError("not a zstd frame (bad magic number)")
    try:
        params = zstd.get_frame_parameters(view)
    except Exception as exc:  # zstd.ZstdError: truncated or corrupt header
        raise ProtocolError(f"corrupt zstd frame header: {exc}") from None
    size = params.content_size
    if size == zstd.CONTENTSIZE_UNKNOWN or size == zstd.CONTENTSIZE_ERROR:
        raise ProtocolError("a zstd frame that does not record its decompressed size")
    if size > max_size:
        raise _too_big("zstd", size, max_size)
    if params.dict_id:
        raise ProtocolError("a zstd frame that needs a dictionary")
    # The decoder refuses to produce more than the declared size (its buffers are sized
    # from it), so a frame lying about it fails instead of expanding.
    # One output chunk of exactly the declared size (at most max_size): no joining, and no
    # 128 KiB default buffer for a small value.
    dobj = _zstd_decompressor().decompressobj(write_size=max(size, 1))
    try:
        out = dobj.decompress(view)
    except Exception as exc:  # zstd.ZstdError
        raise ProtocolError(f"corrupt zstd frame: {exc}") from None
    if not dobj.eof:
        raise ProtocolError("truncated zstd frame")
    if dobj.unused_data:
        raise ProtocolError(f"{len(dobj.unused_data)} bytes after the zstd frame")
    if len(out) != size:
        raise ProtocolError(f"a zstd frame declared {size} bytes and held {len(out)}")
    return out


def _lz4_decompress(lz4frame: Any, view: memoryview, max_size: int) -> bytes:
    if len(view) < 7 or view[:4] != _LZ4_MAGIC:
        raise ProtocolError("not an lz4 frame (bad magic number or too short)")
    has_size = bool(view[4] & 0x08)  # FLG byte, Content Size flag
    size = -1
    if has_size:
        if len(view) < 15:
            raise ProtocolError("truncated lz4 frame header")
        (size,) = struct.unpack_from("<Q", view, 6)
        if size > max_size:
            raise _too_big("lz4", size, max_size)
    dec = lz4frame.LZ4FrameDecompressor()
    try:
        if has_size:
            # one byte more than declared: a frame that lies about its size is caught
            out = dec.decompress(view, max_length=size + 1)
            if len(out) > size:
                raise ProtocolError(f"an lz4 frame declared {size} bytes and held more")
        else:
            parts: List[bytes] = []
            total = 0
            chunk = dec.decompress(view, max_length=min(_LZ4_STEP, max_size + 1))
            while True:
                total += len(chunk)
                if total > max_size:
                    raise _too_big("lz4", total, max_size)
                parts.append(chunk)
                if dec.eof or dec.needs_input:
                    break
                chunk = dec.decompress(b"", max_length=min(_LZ4_STEP, max_size + 1 - total))
            out = b"".join(parts)
    except ProtocolError:
        raise
    except Exception as exc:  # RuntimeError from lz4 on corrupt blocks
        raise ProtocolError(f"corrupt lz4 frame: {exc}") from None
    if not dec.eof:
        raise ProtocolError("truncated lz4 frame")
    if dec.unused_data:
        raise ProtocolError(f"{len(dec.unused_data)} bytes after the lz4 frame")
    if has_size and len(out) != size:
        raise ProtocolError(f"an lz4 frame declared {size} bytes and held {len(out)}")
    return out
