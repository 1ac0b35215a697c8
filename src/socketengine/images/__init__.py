"""Images: validation, JPEG/PNG encoding and decoding, per-channel stats.  Sans-I/O.

Nothing here touches a socket or starts a thread: the endpoints call :func:`prepare`
(validate, then encode) before an image is queued, and :func:`decoded` after it was
received, off their I/O thread.

Every name below is importable from ``socketengine.images``; the modules:

``encoded``
    :class:`EncodedImage` (a compressed file and the sender's shape, dtype and channel
    order), :func:`validate`, :func:`from_bytes`.
``codecs``
    the codecs (``"raw"``, ``"jpeg"``, ``"png"``) and their backends (simplejpeg, OpenCV,
    Pillow, first found wins), :func:`encode`, :func:`decode`, :func:`prepare`,
    :func:`decoded`.
``peek``
    a JPEG's or PNG's own header (size, channels, bit depth), read without decoding.
``stats``
    :class:`ImageStats`, :class:`ImageLedger` (per-endpoint bookkeeping) and
    :func:`read_latest`.

A test that replaces a function replaces it in the module that defines it (e.g.
``socketengine.images.codecs._load``): the names here are references to those.

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

# Also the names outside __all__ that other modules and tests use as images.X (noqa).
from .codecs import (  # noqa: F401
    _MODULES,
    _PREFERENCE,
    MAX_DECODED_BYTES,
    CodecUnavailable,
    _load,
    available_backends,
    backend_for,
    decode,
    decoded,
    encode,
    prepare,
)
from .encoded import (  # noqa: F401
    CODECS,
    ENCODED_CODECS,
    ORDERS,
    Buffer,
    EncodedImage,
    _check_codec,
    _check_quality,
    from_bytes,
    validate,
)
from .stats import ImageLedger, ImageStats, read_latest  # noqa: F401

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
