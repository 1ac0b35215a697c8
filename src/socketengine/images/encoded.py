"""The encoded image and validation.  Sans-I/O.

An encoded image travels as an :class:`EncodedImage` (msgpack extension 5, see
docs/protocol.md), its compressed bytes out of band in the frame's data section.
:func:`validate` checks that an array can be sent with a codec, :func:`from_bytes` wraps
an existing JPEG or PNG file without re-encoding it.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Dict, Sequence, Tuple, Union

from .peek import _JPEG_SIG, _PNG_COLOUR_TYPE, _PNG_SIG, _peek_jpeg, _peek_png

if TYPE_CHECKING:  # numpy is optional at run time: imported only when pixels are handled
    import numpy as np

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


class EncodedImage:
    """A compressed image plus what the receiver needs to rebuild the sender's array.

    :attr codec: ``"jpeg"`` or ``"png"``.
    :attr data: the compressed file's bytes (a complete JPEG/JFIF or PNG file): ``bytes``
        or a memoryview on the sending side; on the receiving side a read-only
        memoryview of the received frame (no copy).  ``bytes(img)`` copies it.
    :attr shape: the sender's array shape: ``(H, W)`` or ``(H, W, C)``.
    :attr dtype: the sender's numpy dtype string (``"|u1"``, ``"<u2"``, ``">u2"``).
    :attr order: ``"BGR"`` or ``"RGB"``: how the sender's channels are labelled inside
        the file (see the :mod:`socketengine.images` docstring); ignored for 1-channel
        images.
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
        from .codecs import decode  # here: codecs imports this module

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
