"""Images: validation, JPEG/PNG encoding and decoding, per-channel stats.  Sans-I/O.

Nothing here touches a socket or starts a thread: the endpoints call :func:`prepare`
(validate, then encode) before an image is queued, and :func:`decoded` after it was
received, off their I/O thread.

Codecs
------
``"raw"``
    the array itself (extension 1, zero-copy): any numeric dtype, exact.
``"jpeg"``
    lossy, 8-bit, 1 or 3 channels (JPEG has no alpha).  Backends, first found wins:
    simplejpeg (libjpeg-turbo, fastest), OpenCV, Pillow.
``"png"``
    lossless, uint8 or uint16, 1, 3 or 4 channels.  Backends: OpenCV, Pillow (Pillow
    cannot write or read 16-bit colour PNG: that needs OpenCV).

An encoded image travels as an :class:`EncodedImage` (msgpack extension 5, see
docs/protocol.md), its compressed bytes out of band in the frame's data section.

Channel order
-------------
The library never reorders channels: the receiver gets back the sender's array, in the
sender's channel order (OpenCV's BGR stays BGR) and shape ((H, W) stays 2-D, (H, W, 1)
keeps its axis).  ``order`` only says how the 3 (or 4) channels are labelled *inside* the
compressed file, which matters only to someone who reads the bytes with another tool
(:attr:`EncodedImage.data`, e.g. saved as ``.jpg``).  The default ``"BGR"`` is OpenCV's
convention, shared by ``cv2.imencode``, imagezmq's ``send_jpg`` and VidGear's NetGear, so
the bytes of an OpenCV frame are a correct JPEG file; pass ``order="RGB"`` for arrays
in RGB order (Pillow, imageio, matplotlib).  Each backend encodes and decodes in the
order recorded in the image, so any backend decodes what any other encoded.

Thread-safety: every function is re-entrant, and all three backends compress and
decompress with the GIL released (measured on 1080p frames: another Python thread kept
at least 88 % of its speed meanwhile), so coding on a worker thread does not stall an I/O
thread.  :class:`ImageStats` takes a lock and may be updated from any thread.
"""

from __future__ import annotations

import collections
import importlib
import io
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Deque, Dict, List, Optional, Sequence, Tuple, Union

if TYPE_CHECKING:  # numpy is optional at run time: imported only when pixels are handled
    import numpy as np

__all__ = [
    "CODECS",
    "EncodedImage",
    "CodecUnavailable",
    "ImageStats",
    "validate",
    "encode",
    "decode",
    "prepare",
    "decoded",
    "from_bytes",
    "backend_for",
    "available_backends",
    "MAX_DECODED_BYTES",
]

Buffer = Union[bytes, bytearray, memoryview]

#: Codec names accepted by :func:`validate`, :func:`prepare` and ``write_image``.
CODECS = ("raw", "jpeg", "png")
#: Codecs that travel as an :class:`EncodedImage` (extension 5).
ENCODED_CODECS = frozenset({"jpeg", "png"})
#: Channel orders an encoded image may record.
ORDERS = frozenset({"BGR", "RGB"})

# Wire dtypes (numpy ``dtype.str``) each encoded codec may carry.
_WIRE_DTYPES: Dict[str, frozenset] = {
    "jpeg": frozenset({"|u1"}),
    "png": frozenset({"|u1", "<u2", ">u2"}),
}
_CHANNELS: Dict[str, Tuple[int, ...]] = {"raw": (1, 3, 4), "jpeg": (1, 3), "png": (1, 3, 4)}
# Largest height/width: JPEG's is libjpeg's JPEG_MAX_DIMENSION; PNG's is kept to what
# every decoder handles (libpng's default user limit is 1,000,000).
_MAX_SIDE: Dict[str, int] = {"jpeg": 65500, "png": 65535}

#: Default bound on the size of a decoded image (H*W*C*itemsize): a few hundred bytes
#: of hostile PNG or JPEG may announce gigapixels.  8K RGB uint8 is 100 MB.
MAX_DECODED_BYTES = 256 * 1024 * 1024

_JPEG_SIG = b"\xff\xd8"
_PNG_SIG = b"\x89PNG\r\n\x1a\n"

# Backend name -> module to import.  Order of preference per codec below.
_MODULES: Dict[str, str] = {"simplejpeg": "simplejpeg", "opencv": "cv2", "pillow": "PIL.Image"}
_PREFERENCE: Dict[str, Tuple[str, ...]] = {
    "jpeg": ("simplejpeg", "opencv", "pillow"),
    "png": ("opencv", "pillow"),
}
_INSTALL: Dict[str, str] = {
    "jpeg": "JPEG needs simplejpeg, OpenCV or Pillow: pip install 'socket.engine[jpeg]'",
    "png": "PNG needs OpenCV or Pillow: pip install 'socket.engine[png]'",
}
_INSTALL_PNG16 = (
    "16-bit colour PNG needs OpenCV (Pillow cannot read or write it): "
    "pip install opencv-python-headless"
)


class CodecUnavailable(ImportError):
    """No installed library can encode or decode this image; the message says what to install."""


# -- backends -------------------------------------------------------------------------------

_loaded: Dict[str, Any] = {}


def _load(backend: str) -> Any:
    """The backend's module, or None if it cannot be imported (cached).

    The single place backends are looked up: tests replace it to simulate missing ones.
    """
    try:
        return _loaded[backend]
    except KeyError:
        pass
    try:
        module: Any = importlib.import_module(_MODULES[backend])
    except Exception:  # not installed, or broken (e.g. built against another numpy)
        module = None
    _loaded[backend] = module
    return module


def available_backends() -> Dict[str, List[str]]:
    """The importable backends per encoded codec, in order of preference."""
    return {c: [b for b in _PREFERENCE[c] if _load(b) is not None] for c in _PREFERENCE}


def backend_for(codec: str, *, png16_colour: bool = False) -> str:
    """Name of the backend that will handle ``codec`` ("jpeg" or "png").

    :param png16_colour: the image is a 16-bit PNG with 3 or 4 channels (OpenCV only).
    :raises CodecUnavailable: none is installed; the message names the extra to install.
    """
    if codec not in _PREFERENCE:
        raise ValueError(f"codec {codec!r} has no backend: use 'jpeg' or 'png'")
    names = ("opencv",) if png16_colour else _PREFERENCE[codec]
    for name in names:
        if _load(name) is not None:
            return name
    raise CodecUnavailable(_INSTALL_PNG16 if png16_colour else _INSTALL[codec])


def _choose(codec: str, backend: Optional[str], png16_colour: bool) -> Tuple[str, Any]:
    if backend is None:
        backend = backend_for(codec, png16_colour=png16_colour)
    elif backend not in _PREFERENCE[codec]:
        raise ValueError(
            f"backend {backend!r} does not handle {codec}: use one of {_PREFERENCE[codec]}"
        )
    elif png16_colour and backend != "opencv":
        raise CodecUnavailable(_INSTALL_PNG16)
    module = _load(backend)
    if module is None:
        raise CodecUnavailable(f"backend {backend!r} is not installed. {_INSTALL[codec]}")
    return backend, module


def _numpy() -> Any:
    np = sys.modules.get("numpy")
    if np is None:
        try:
            import numpy as np
        except ImportError:  # pragma: no cover - depends on the environment
            raise CodecUnavailable(
                "images need numpy: pip install 'socket.engine[numpy]'"
            ) from None
    return np


# -- the encoded image ----------------------------------------------------------------------


class EncodedImage:
    """A compressed image plus what the receiver needs to rebuild the sender's array.

    :attr codec: ``"jpeg"`` or ``"png"``.
    :attr data: the compressed file's bytes (a complete JPEG/JFIF or PNG file): ``bytes``
        or a memoryview on the sending side; on the receiving side a read-only
        memoryview of the received frame (no copy).  ``bytes(img)`` copies it.
    :attr shape: the sender's array shape: ``(H, W)`` or ``(H, W, C)``.
    :attr dtype: the sender's numpy dtype string (``"|u1"``, ``"<u2"``, ``">u2"``).
    :attr order: ``"BGR"`` or ``"RGB"``: how the sender's channels are labelled inside
        the file (see the module docstring); ignored for 1-channel images.
    """

    __slots__ = ("codec", "data", "shape", "dtype", "order")

    def __init__(
        self, codec: str, data: Buffer, shape: Sequence[int], dtype: str, order: str = "BGR"
    ) -> None:
        """Check every field (so that a receiver never refuses the image) and keep them.

        :raises ValueError: a field is out of range, naming it.
        :raises TypeError: ``data`` is not bytes-like.
        """
        if type(codec) is not str or codec not in ENCODED_CODECS:
            raise ValueError(f"image codec {codec!r} is not 'jpeg' or 'png'")
        if type(dtype) is not str or dtype not in _WIRE_DTYPES[codec]:
            raise ValueError(f"image dtype {dtype!r} is not allowed for {codec}")
        if type(order) is not str or order not in ORDERS:
            raise ValueError(f"image channel order {order!r} is not 'BGR' or 'RGB'")
        if (
            type(shape) not in (tuple, list)
            or len(shape) not in (2, 3)
            or not all(type(n) is int for n in shape)
        ):
            raise ValueError(f"image shape {shape!r} is not 2 or 3 ints")
        limit = _MAX_SIDE[codec]
        if not (0 < shape[0] <= limit and 0 < shape[1] <= limit):
            raise ValueError(f"image size {shape[0]}x{shape[1]} is outside 1..{limit}")
        if len(shape) == 3 and shape[2] not in _CHANNELS[codec]:
            raise ValueError(f"{codec} image with {shape[2]} channels")
        try:
            view = memoryview(data)
        except TypeError:
            raise TypeError(
                f"image data must be bytes-like, not {type(data).__qualname__}"
            ) from None
        if view.nbytes == 0:
            raise ValueError("image has no bytes")
        if type(data) not in (bytes, bytearray) and (view.ndim != 1 or view.format != "B"):
            data = view.cast("B")  # e.g. cv2.imencode's (N, 1) array
        self.codec = codec
        self.data = data
        self.shape: Tuple[int, ...] = tuple(shape)
        self.dtype = dtype
        self.order = order

    @classmethod
    def from_wire(
        cls, codec: Any, shape: Any, dtype: Any, order: Any, data: Buffer
    ) -> EncodedImage:
        """Build from received fields, checking each (``ValueError`` names the bad one).

        Checks the structure only; :func:`decode` also checks the compressed file's
        own header against ``shape`` and ``dtype`` before decompressing.
        """
        if type(shape) is not list:
            raise ValueError("image shape is not an array")
        return cls(codec, data, shape, dtype, order)

    @property
    def nbytes(self) -> int:
        """Size of the compressed bytes."""
        return memoryview(self.data).nbytes

    @property
    def channels(self) -> int:
        """Number of channels (1 for a 2-D image)."""
        return self.shape[2] if len(self.shape) == 3 else 1

    def tobytes(self) -> bytes:
        """The compressed file as ``bytes`` (a copy unless it already is ``bytes``)."""
        data = self.data
        return data if type(data) is bytes else bytes(data)

    __bytes__ = tobytes

    def decode(self, **kwargs: Any) -> np.ndarray:
        """Same as :func:`decode` ``(self, **kwargs)``."""
        return decode(self, **kwargs)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EncodedImage):
            return NotImplemented
        return (
            self.codec == other.codec
            and self.shape == other.shape
            and self.dtype == other.dtype
            and self.order == other.order
            and memoryview(self.data) == memoryview(other.data)
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"EncodedImage({self.codec!r}, {self.nbytes} bytes, shape={self.shape}, "
            f"dtype={self.dtype!r}, order={self.order!r})"
        )


# -- validation -----------------------------------------------------------------------------


def _check_codec(codec: Any) -> str:
    if type(codec) is not str:
        raise TypeError(f"codec must be a str ('raw', 'jpeg' or 'png'), not {type(codec).__name__}")
    name = codec.lower()
    if name == "jpg":
        name = "jpeg"
    if name not in CODECS:
        raise ValueError(f"unknown image codec {codec!r}: use 'raw', 'jpeg' or 'png'")
    return name


def _check_quality(quality: Any) -> int:
    if type(quality) is bool or not isinstance(quality, int):
        raise TypeError(f"quality must be an int from 1 to 100, not {type(quality).__name__}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be from 1 to 100, not {quality}")
    return int(quality)


def _check_order(order: Any) -> str:
    if order not in ORDERS:
        raise ValueError(f"order must be 'BGR' or 'RGB', not {order!r}")
    return str(order)


def validate(img: Any, codec: str = "raw") -> str:
    """Check that ``img`` can be sent with ``codec``; return the codec's canonical name.

    Accepted: a numpy array of shape (H, W) or (H, W, C) with H, W > 0, and

    ======  ===========================  ==========  ======================
    codec   dtype                        C           H, W
    ======  ===========================  ==========  ======================
    raw     any bool/int/uint/float      1, 3, 4     any
    jpeg    uint8                        1, 3        at most 65500
    png     uint8 or uint16              1, 3, 4     at most 65535
    ======  ===========================  ==========  ======================

    ``"jpg"`` is accepted for ``"jpeg"``, and codec names are case-insensitive.

    :raises TypeError: ``img`` is not a numpy array, or its dtype is wrong for ``codec``.
    :raises ValueError: the shape is wrong, or ``codec`` is unknown.
    """
    name = _check_codec(codec)
    np = sys.modules.get("numpy")
    if np is None or not isinstance(img, np.ndarray):
        raise TypeError(
            f"an image must be a numpy array of shape (H, W) or (H, W, C), "
            f"not {type(img).__module__}.{type(img).__qualname__}"
        )
    dtype = img.dtype
    if name == "raw":
        if dtype.kind not in "biuf":
            raise TypeError(f"an image must have a bool, int, uint or float dtype, not {dtype}")
    elif name == "jpeg":
        if dtype != np.uint8:
            raise TypeError(
                f"a JPEG image must have dtype uint8, not {dtype} "
                "(scale it to 0..255 and convert with .astype(np.uint8), or use codec='png'"
                " for uint16, codec='raw' for anything else)"
            )
    elif dtype.kind != "u" or dtype.itemsize not in (1, 2):
        raise TypeError(
            f"a PNG image must have dtype uint8 or uint16, not {dtype} "
            "(use codec='raw' for other dtypes)"
        )
    shape = img.shape
    if len(shape) not in (2, 3):
        raise ValueError(
            f"an image must have shape (H, W) or (H, W, C), not {shape} ({len(shape)}-D)"
        )
    channels = _CHANNELS[name]
    if len(shape) == 3 and shape[2] not in channels:
        allowed = ", ".join(map(str, channels))
        hint = (
            " (JPEG has no alpha channel: use codec='png', or send img[..., :3])"
            if name == "jpeg" and shape[2] == 4
            else ""
        )
        raise ValueError(
            f"a {name} image must have {allowed} channels, not {shape[2]} (shape {shape}){hint}"
        )
    if shape[0] == 0 or shape[1] == 0:
        raise ValueError(f"an image must have height and width > 0, not shape {shape}")
    limit = _MAX_SIDE.get(name)
    if limit is not None and (shape[0] > limit or shape[1] > limit):
        raise ValueError(
            f"a {name} image may be at most {limit} pixels high and wide, not {shape[:2]}"
        )
    return name


# -- encoding -------------------------------------------------------------------------------

# PNG is written at zlib level 1 with the run-length strategy (zlib.Z_RLE): on 1080p
# camera frames, depth maps and masks it was both faster and smaller than level 1 with
# the default strategy (measured: noisy RGB 89 vs 108 ms, 3.1 vs 3.7 MB).
_Z_RLE = 3


def _swap(np: Any, arr: Any) -> Any:
    """``arr`` with its first and third channels exchanged (a new C-contiguous array).

    One plane at a time: 1.8 ms for 1080p RGB, where fancy indexing (``arr[..., [2, 1,
    0]]``) takes 2 ms and returns a planar layout that costs another 5 ms to make
    contiguous.
    """
    out = np.empty_like(arr, order="C")
    out[..., 0] = arr[..., 2]
    out[..., 1] = arr[..., 1]
    out[..., 2] = arr[..., 0]
    if arr.shape[2] == 4:
        out[..., 3] = arr[..., 3]
    return out


def _enc_simplejpeg(mod: Any, np: Any, img: Any, quality: int, order: str) -> Buffer:
    a = img if img.ndim == 3 else img[:, :, None]
    if a.strides[1] != a.shape[2] or a.strides[2] != 1:  # rows must be C-contiguous
        a = np.ascontiguousarray(a)
    if a.shape[2] == 1:
        return mod.encode_jpeg(a, quality, colorspace="GRAY", colorsubsampling="Gray")
    return mod.encode_jpeg(a, quality, colorspace=order, colorsubsampling="420")


def _cv2_native(np: Any, img: Any) -> Any:
    if img.dtype.byteorder == ">":
        return img.astype(img.dtype.newbyteorder("="))
    return img


def _enc_opencv(mod: Any, np: Any, img: Any, codec: str, quality: int, order: str) -> Buffer:
    a = _cv2_native(np, img)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if order == "RGB" and a.ndim == 3:
        a = mod.cvtColor(a, mod.COLOR_RGB2BGR if a.shape[2] == 3 else mod.COLOR_RGBA2BGRA)
    if codec == "jpeg":
        params = [mod.IMWRITE_JPEG_QUALITY, quality]
        sampling = getattr(mod, "IMWRITE_JPEG_SAMPLING_FACTOR", None)
        if sampling is not None:
            params += [sampling, mod.IMWRITE_JPEG_SAMPLING_FACTOR_420]
        ok, buf = mod.imencode(".jpg", a, params)
    else:
        params = [mod.IMWRITE_PNG_COMPRESSION, 1]
        strategy = getattr(mod, "IMWRITE_PNG_STRATEGY", None)
        if strategy is not None:
            params += [strategy, mod.IMWRITE_PNG_STRATEGY_RLE]
        ok, buf = mod.imencode(".png", a, params)
    if not ok:  # pragma: no cover - OpenCV refuses nothing validate() accepts
        raise ValueError(f"OpenCV could not encode a {codec} image of shape {img.shape}")
    return memoryview(buf).cast("B")


def _enc_pillow(mod: Any, np: Any, img: Any, codec: str, quality: int, order: str) -> Buffer:
    a = img[:, :, 0] if img.ndim == 3 and img.shape[2] == 1 else img
    if a.ndim == 3 and order == "BGR":
        a = _swap(np, a)
    if a.dtype.itemsize == 2:
        if a.ndim == 3:  # refused earlier by _choose(); kept as a guard
            raise CodecUnavailable(_INSTALL_PNG16)
        a = a.astype("<u2", copy=False)  # Pillow's 'I;16' is little-endian
    pic = mod.fromarray(np.ascontiguousarray(a))
    out = io.BytesIO()
    if codec == "jpeg":
        pic.save(out, "JPEG", quality=quality, subsampling=2)  # 2 = 4:2:0
    else:
        pic.save(out, "PNG", compress_level=1, compress_type=_Z_RLE)
    return out.getvalue()


def encode(
    img: Any,
    codec: str = "jpeg",
    quality: int = 90,
    *,
    order: str = "BGR",
    backend: Optional[str] = None,
) -> EncodedImage:
    """Validate ``img`` and compress it with ``codec`` (``"jpeg"`` or ``"png"``).

    :param quality: JPEG quality, 1 (smallest) to 100 (best); checked but unused for PNG
        (lossless, compressed for speed: zlib level 1, run-length strategy).
    :param order: how the channels are labelled in the file, ``"BGR"`` (default) or
        ``"RGB"`` (module docstring); the round trip returns the same array either way.
    :param backend: ``"simplejpeg"``, ``"opencv"`` or ``"pillow"``; default: the first
        installed, in that order (PNG: OpenCV, then Pillow).
    :raises TypeError, ValueError: see :func:`validate`; also for a bad quality or order.
    :raises CodecUnavailable: no installed backend can do it (the message says what to
        install).

    JPEG colour images are stored with 4:2:0 chroma subsampling (as cameras do).  The
    returned image's :attr:`~EncodedImage.data` does not share memory with ``img``.
    """
    name = validate(img, codec)
    if name not in ENCODED_CODECS:
        raise ValueError("codec 'raw' is not compressed: send the array itself (see prepare())")
    quality = _check_quality(quality)
    order = _check_order(order)
    np = _numpy()
    png16_colour = name == "png" and img.dtype.itemsize == 2 and img.ndim == 3 and img.shape[2] > 1
    chosen, mod = _choose(name, backend, png16_colour)
    if chosen == "simplejpeg":
        data = _enc_simplejpeg(mod, np, img, quality, order)
    elif chosen == "opencv":
        data = _enc_opencv(mod, np, img, name, quality, order)
    else:
        data = _enc_pillow(mod, np, img, name, quality, order)
    return EncodedImage(name, data, tuple(int(n) for n in img.shape), img.dtype.str, order)


def prepare(img: Any, codec: str = "raw", quality: int = 90, *, order: str = "BGR") -> Any:
    """The value that carries ``img`` on the wire: the array itself for ``"raw"``, else
    an :class:`EncodedImage`.  Everything is validated before anything is encoded.

    Raises what :func:`encode` raises (``"raw"``: what :func:`validate` raises).
    """
    name = validate(img, codec)
    if name == "raw":
        return img
    return encode(img, name, quality, order=order)


# -- decoding -------------------------------------------------------------------------------


def _peek_png(data: Buffer) -> Tuple[int, int, int, int]:
    """(height, width, bit depth, colour type) from a PNG's IHDR chunk."""
    head = bytes(memoryview(data)[:26])
    if len(head) < 26 or head[:8] != _PNG_SIG or head[12:16] != b"IHDR":
        raise ValueError("image bytes are not a PNG file (no PNG signature and IHDR)")
    width = int.from_bytes(head[16:20], "big")
    height = int.from_bytes(head[20:24], "big")
    return height, width, head[24], head[25]


# SOFn markers (frame headers), all coding processes; C4 (DHT), C8 (JPG), CC (DAC) are not.
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def _peek_jpeg(data: Buffer) -> Tuple[int, int, int, int]:
    """(height, width, components, precision) from a JPEG's frame header (SOFn)."""
    view = memoryview(data).cast("B")
    n = len(view)
    if n < 4 or view[0] != 0xFF or view[1] != 0xD8:
        raise ValueError("image bytes are not a JPEG file (no SOI marker)")
    i = 2
    while i < n:
        if view[i] != 0xFF:
            raise ValueError("JPEG marker expected before the frame header")
        while i < n and view[i] == 0xFF:  # fill bytes
            i += 1
        if i >= n:
            break
        marker = view[i]
        i += 1
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM, RSTn: no length
            continue
        if marker in (0xD8, 0xD9, 0xDA) or i + 2 > n:
            break  # SOI again, EOI or scan data before any frame header
        length = view[i] << 8 | view[i + 1]
        if length < 2:
            break
        if marker in _SOF:
            if length < 8 or i + 8 > n:
                break
            precision = view[i + 2]
            height = view[i + 3] << 8 | view[i + 4]
            width = view[i + 5] << 8 | view[i + 6]
            return height, width, view[i + 7], precision
        i += length
    raise ValueError("JPEG file has no frame header (SOF) before its scan data")


_PNG_COLOUR_TYPE = {1: 0, 3: 2, 4: 6}  # channels -> IHDR colour type (grey, RGB, RGBA)


def _check_file(enc: EncodedImage, itemsize: int) -> None:
    """Compare the compressed file's own header with the declared shape and dtype."""
    h, w = enc.shape[0], enc.shape[1]
    c = enc.channels
    if enc.codec == "jpeg":
        fh, fw, comps, precision = _peek_jpeg(enc.data)
        if (fh, fw) != (h, w) or comps != c or precision != 8:
            raise ValueError(
                f"JPEG header ({fh}x{fw}, {comps} components, {precision}-bit) does not "
                f"match the declared image ({h}x{w}, {c} channels, 8-bit)"
            )
    else:
        fh, fw, depth, ctype = _peek_png(enc.data)
        if (fh, fw) != (h, w) or depth != 8 * itemsize or ctype != _PNG_COLOUR_TYPE[c]:
            raise ValueError(
                f"PNG header ({fh}x{fw}, {depth}-bit, colour type {ctype}) does not match "
                f"the declared image ({h}x{w}, {8 * itemsize}-bit, {c} channels)"
            )


def _dec_simplejpeg(mod: Any, np: Any, enc: EncodedImage) -> Any:
    colorspace = "GRAY" if enc.channels == 1 else enc.order
    return mod.decode_jpeg(enc.data, colorspace=colorspace)


def _dec_opencv(mod: Any, np: Any, enc: EncodedImage) -> Any:
    arr = mod.imdecode(np.frombuffer(enc.data, np.uint8), mod.IMREAD_UNCHANGED)
    if arr is None:
        raise ValueError("OpenCV could not decode it")
    if enc.order == "RGB" and arr.ndim == 3 and arr.shape[2] in (3, 4):
        mod.cvtColor(arr, mod.COLOR_BGR2RGB if arr.shape[2] == 3 else mod.COLOR_BGRA2RGBA, arr)
    return arr


def _dec_pillow(mod: Any, np: Any, enc: EncodedImage) -> Any:
    with mod.open(io.BytesIO(enc.data), formats=["JPEG" if enc.codec == "jpeg" else "PNG"]) as pic:
        if pic.mode == "I":  # 16-bit grey in older Pillow
            arr = np.array(pic).astype(np.uint16)
        else:
            arr = np.array(pic)
    if enc.order == "BGR" and arr.ndim == 3 and arr.shape[2] in (3, 4):
        arr = _swap(np, arr)
    return arr


def decode(
    enc: EncodedImage,
    *,
    backend: Optional[str] = None,
    max_bytes: Optional[int] = MAX_DECODED_BYTES,
) -> np.ndarray:
    """Decompress ``enc`` into a new, writable array of the sender's shape and dtype.

    :param backend: as in :func:`encode`; any backend decodes what any other encoded.
    :param max_bytes: refuse images larger than this once decoded (``None``: no limit).
    :raises ValueError: the bytes are not a valid file of the declared codec, or its
        header disagrees with the declared shape/dtype, or the image is over ``max_bytes``
        (checked before anything is decompressed).
    :raises CodecUnavailable: no installed backend can decode it.
    """
    np = _numpy()
    dtype = np.dtype(enc.dtype)
    h, w = enc.shape[0], enc.shape[1]
    c = enc.channels
    size = h * w * c * dtype.itemsize
    if max_bytes is not None and size > max_bytes:
        raise ValueError(
            f"a {h}x{w}x{c} {dtype} image is {size} bytes decoded, over max_bytes={max_bytes}"
        )
    _check_file(enc, dtype.itemsize)
    png16_colour = enc.codec == "png" and dtype.itemsize == 2 and c > 1
    chosen, mod = _choose(enc.codec, backend, png16_colour)
    try:
        if chosen == "simplejpeg":
            arr = _dec_simplejpeg(mod, np, enc)
        elif chosen == "opencv":
            arr = _dec_opencv(mod, np, enc)
        else:
            arr = _dec_pillow(mod, np, enc)
    except (CodecUnavailable, MemoryError):
        raise
    except Exception as exc:  # each backend has its own error types for corrupt files
        raise ValueError(
            f"cannot decode the {enc.codec} image: {type(exc).__name__}: {exc}"
        ) from None
    expect = (h, w) if c == 1 else (h, w, c)
    got = arr.shape if arr.ndim == 2 or arr.shape[2] != 1 else arr.shape[:2]
    if got != expect or arr.dtype.itemsize != dtype.itemsize or arr.dtype.kind != "u":
        raise ValueError(
            f"the {enc.codec} image decoded to {arr.shape} {arr.dtype}, "
            f"not the declared {enc.shape} {dtype}"
        )
    if arr.shape != enc.shape:
        arr = arr.reshape(enc.shape)
    if arr.dtype != dtype:
        arr = arr.astype(dtype)  # byte order ('>u2')
    if not arr.flags.writeable:  # pragma: no cover - every backend returns a new array
        arr = arr.copy()
    return arr


def decoded(value: Any, **kwargs: Any) -> Any:
    """``decode(value, **kwargs)`` if ``value`` is an :class:`EncodedImage`, else ``value``."""
    if type(value) is EncodedImage:
        return decode(value, **kwargs)
    return value


def from_bytes(data: Buffer, *, order: str = "BGR") -> EncodedImage:
    """Wrap an existing JPEG or PNG file (e.g. from an MJPEG camera) without re-encoding.

    The codec, height, width and channels are read from the file's header; ``order``
    says how its channels should be labelled in the receiver's array
    (``"BGR"``: as ``cv2.imdecode`` would return them).
    :raises ValueError: not a JPEG (8-bit, 1 or 3 components) or PNG (grey, RGB or RGBA).
    """
    order = _check_order(order)
    if type(data) not in (bytes, bytearray):
        data = memoryview(data).cast("B")
    head = bytes(data[:8])
    if head[:2] == _JPEG_SIG:
        h, w, comps, precision = _peek_jpeg(data)
        if precision != 8 or comps not in (1, 3):
            raise ValueError(f"unsupported JPEG: {comps} components, {precision}-bit")
        shape: Tuple[int, ...] = (h, w) if comps == 1 else (h, w, comps)
        return EncodedImage.from_wire("jpeg", list(shape), "|u1", order, data)
    if head == _PNG_SIG:
        h, w, depth, ctype = _peek_png(data)
        channels = {v: k for k, v in _PNG_COLOUR_TYPE.items()}.get(ctype)
        if depth not in (8, 16) or channels is None:
            raise ValueError(f"unsupported PNG: {depth}-bit, colour type {ctype}")
        shape = (h, w) if channels == 1 else (h, w, channels)
        return EncodedImage.from_wire(
            "png", list(shape), "|u1" if depth == 8 else "<u2", order, data
        )
    raise ValueError(f"not a JPEG or PNG file (first bytes {head!r})")


# -- statistics -----------------------------------------------------------------------------


class ImageStats:
    """Counters of one image channel in one direction (sans-I/O).

    The same class serves both sides:

    ============  ============================  ======================================
    counter       sending side                  receiving side
    ============  ============================  ======================================
    frames        images written by the user    images received from the socket
    delivered     images written to the socket  images handed to the user (decoded)
    dropped       replaced by a newer image before being delivered (conflation)
    bytes         encoded bytes of the delivered images (pixels for raw)
    fps           delivered images per second over the last ``window`` seconds
    ============  ============================  ======================================

    Thread-safe: every method takes an internal lock, so the user's thread, the I/O
    thread and a decoding thread may update the same object.  Timestamps are
    ``time.monotonic()`` unless ``now`` is passed (tests).
    """

    __slots__ = (
        "frames",
        "delivered",
        "dropped",
        "bytes",
        "codec",
        "window",
        "_times",
        "_first",
        "_lock",
    )

    def __init__(self, window: float = 2.0, max_samples: int = 4096) -> None:
        if window <= 0:
            raise ValueError("window must be > 0 seconds")
        self.frames = 0
        self.delivered = 0
        self.dropped = 0
        self.bytes = 0
        self.codec: Optional[str] = None
        self.window = float(window)
        self._times: Deque[float] = collections.deque(maxlen=max(2, max_samples))
        self._first: Optional[float] = None
        self._lock = threading.Lock()

    def record_frame(self, codec: Optional[str] = None) -> None:
        """An image entered: written by the user, or received; ``codec`` is its codec."""
        with self._lock:
            self.frames += 1
            if codec is not None:
                self.codec = codec

    def record_delivered(self, nbytes: int = 0, now: Optional[float] = None) -> None:
        """An image left: written to the socket, or handed to the user."""
        t = time.monotonic() if now is None else now
        with self._lock:
            self.delivered += 1
            self.bytes += nbytes
            self._times.append(t)
            if self._first is None:
                self._first = t

    def record_dropped(self, n: int = 1) -> None:
        """``n`` images were replaced by a newer one before being delivered."""
        with self._lock:
            self.dropped += n

    def fps(self, now: Optional[float] = None) -> float:
        """Delivered images per second over the last :attr:`window` seconds."""
        t = time.monotonic() if now is None else now
        with self._lock:
            return self._fps(t)

    def _fps(self, now: float) -> float:
        times = self._times
        start = now - self.window
        while times and times[0] <= start:
            times.popleft()
        n = len(times)
        if n == 0 or self._first is None:
            return 0.0
        if n == times.maxlen or now - self._first < self.window:
            # The window is not yet full of history (or holds only the newest samples):
            # rate between the first and last samples held.
            span = times[-1] - times[0]
            return (n - 1) / span if n > 1 and span > 0 else 0.0
        return n / self.window

    def snapshot(self, now: Optional[float] = None) -> Dict[str, Any]:
        """The counters as a dict: ``frames``, ``delivered``, ``dropped``, ``pending``
        (``frames - delivered - dropped``: queued or being decoded), ``bytes``, ``fps``
        (rounded to 0.1) and ``codec`` (of the latest image, or None)."""
        t = time.monotonic() if now is None else now
        with self._lock:
            return {
                "frames": self.frames,
                "delivered": self.delivered,
                "dropped": self.dropped,
                "pending": max(0, self.frames - self.delivered - self.dropped),
                "bytes": self.bytes,
                "fps": round(self._fps(t), 1),
                "codec": self.codec,
            }

    def __repr__(self) -> str:
        return f"ImageStats({self.snapshot()})"


def read_latest(channel: str, default: Any, *tables: Dict[str, Any]) -> Any:
    """``tables[0][channel]`` for the application: an encoded image is decoded, once.

    The decoded array replaces the encoded value in every one of ``tables`` that still
    holds that very value (a newer frame that arrived meanwhile is left alone), so the
    next read of any of them costs nothing.
    """
    value = tables[0].get(channel, default)
    if type(value) is not EncodedImage:
        return value
    decoded = value.decode()
    for table in tables:
        if table.get(channel) is value:
            table[channel] = decoded
    return decoded


class ImageLedger:
    """Per-endpoint image bookkeeping, shared by the threaded and asyncio layers.

    Sans-I/O: the endpoints call it when an image frame is written, sent, replaced,
    received and read; it keeps an :class:`ImageStats` per channel and direction, the
    newest encoded file per channel (for ``get_jpeg``) and which channels hold an image
    nobody has read yet (a newer frame then counts the old one as dropped).
    """

    def __init__(self) -> None:
        self.sent: Dict[str, ImageStats] = {}
        self.received: Dict[str, ImageStats] = {}
        self.encoded: Dict[str, EncodedImage] = {}  # newest JPEG/PNG file per channel
        self.unread: Dict[str, int] = {}  # channel -> bytes of its unread newest frame

    @staticmethod
    def _stats(table: Dict[str, ImageStats], channel: str) -> ImageStats:
        stats = table.get(channel)
        if stats is None:
            stats = table.setdefault(channel, ImageStats())
        return stats

    def written(self, channel: str, codec: str) -> None:
        """The application wrote a frame on ``channel`` (any thread)."""
        self._stats(self.sent, channel).record_frame(codec)

    def transmitted(self, channel: str, nbytes: int) -> None:
        """A frame of ``channel`` was handed to a socket / transport."""
        self._stats(self.sent, channel).record_delivered(nbytes)

    def replaced(self, channel: str) -> None:
        """A queued frame was replaced by a newer one before it was sent (conflation)."""
        self._stats(self.sent, channel).record_dropped()

    def queue_hook(self, channel: str, nbytes: int) -> None:
        """The send queues' image hook: a frame handed over (``nbytes``) or replaced
        before that (``-1``)."""
        if nbytes < 0:
            self.replaced(channel)
        else:
            self.transmitted(channel, nbytes)

    def arrived(self, channel: str, value: Any) -> Optional[EncodedImage]:
        """A frame was received; returns it if it is still encoded (JPEG/PNG)."""
        stats = self._stats(self.received, channel)
        encoded = value if type(value) is EncodedImage else None
        stats.record_frame(encoded.codec if encoded is not None else "raw")
        if channel in self.unread:
            stats.record_dropped()  # the previous frame was never read: superseded
        self.unread[channel] = getattr(value, "nbytes", 0)
        if encoded is not None:
            self.encoded[channel] = encoded
        return encoded

    def read(self, channel: str) -> None:
        """The application took the newest frame of ``channel`` (if it was unread)."""
        nbytes = self.unread.pop(channel, None)
        if nbytes is not None:
            self._stats(self.received, channel).record_delivered(nbytes)

    def get_jpeg(self, channel: str) -> Optional[bytes]:
        """The newest encoded file received on ``channel``, or ``None``."""
        enc = self.encoded.get(channel)
        return None if enc is None else enc.tobytes()

    def snapshot(self) -> Dict[str, Any]:
        """``{"sent": {channel: stats}, "received": {channel: stats}}``."""
        return {
            "sent": {ch: s.snapshot() for ch, s in list(self.sent.items())},
            "received": {ch: s.snapshot() for ch, s in list(self.received.items())},
        }
