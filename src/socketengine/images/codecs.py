"""Image codecs and their backends: encoding and decoding JPEG and PNG.  Sans-I/O.

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

Thread-safety: see the :mod:`socketengine.images` docstring.
"""

from __future__ import annotations

import importlib
import io
import sys
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from .encoded import (
    ENCODED_CODECS,
    Buffer,
    EncodedImage,
    _check_order,
    _check_quality,
    validate,
)
from .peek import _check_file

if TYPE_CHECKING:  # numpy is optional at run time: imported only when pixels are handled
    import numpy as np

#: Default bound on the size of a decoded image (H*W*C*itemsize): a few hundred bytes
#: of hostile PNG or JPEG may announce gigapixels.  8K RGB uint8 is 100 MB.
MAX_DECODED_BYTES = 256 * 1024 * 1024

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
        ``"RGB"`` (:mod:`socketengine.images` docstring); the round trip returns the
        same array either way.
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
