"""Encoding a frame for the browser: JPEG with Pillow, PNG from the standard library."""

from __future__ import annotations

import io
import struct
import sys
import zlib
from typing import Any, Optional, Tuple

from ..render import encoded_image_info

__all__ = ["encode_image", "encode_png", "have_pillow"]

_PIL: Any = None


def _pillow() -> Any:
    """Pillow's ``Image`` module, or ``False`` if it is not installed (checked once)."""
    global _PIL
    if _PIL is None:
        try:
            from PIL import Image

            _PIL = Image
        except ImportError:
            _PIL = False
    return _PIL


def have_pillow() -> bool:
    """Whether JPEG frames are possible (Pillow is installed)."""
    return bool(_pillow())


def encode_png(img: Any) -> bytes:
    """A PNG of a ``uint8`` image ``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)`` (stdlib only)."""
    np = sys.modules["numpy"]  # an image array exists, so numpy is imported
    h, w = img.shape[:2]
    channels = 1 if img.ndim == 2 else img.shape[2]
    color = {1: 0, 3: 2, 4: 6}[channels]
    raw = np.zeros((h, w * channels + 1), dtype=np.uint8)  # filter byte 0 on each row
    raw[:, 1:] = img.reshape(h, w * channels)

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw.tobytes(), 1))
        + chunk(b"IEND", b"")
    )


def encode_image(
    img: Any,
    max_width: Optional[int] = 1280,
    bgr: bool = False,
    image_format: str = "auto",
    quality: int = 80,
) -> Tuple[bytes, str]:
    """Encode an image (see :func:`~socketengine.render.image_shape`); return
    ``(bytes, content type)``.

    Wider than ``max_width`` pixels, it is reduced by an integer step first.  ``bgr``
    swaps OpenCV's channel order.  ``image_format``: ``"jpeg"`` (needs Pillow),
    ``"png"``, or ``"auto"`` = JPEG when Pillow is installed, PNG otherwise.  An image
    received still compressed (``EncodedImage``) is served as the sender's file (the
    sender already wrote it in RGB order).
    """
    encoded = encoded_image_info(img)
    if encoded is not None:
        return img.tobytes(), "image/jpeg" if encoded[0] == "jpeg" else "image/png"
    np = sys.modules["numpy"]
    a = img
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if max_width and a.shape[1] > max_width:
        step = -(-a.shape[1] // max_width)
        a = a[::step, ::step]
    if bgr and a.ndim == 3:
        a = a[:, :, [2, 1, 0, 3][: a.shape[2]]]
    a = np.ascontiguousarray(a)
    pil = _pillow()
    if image_format == "png" or (image_format == "auto" and not pil):
        return encode_png(a), "image/png"
    if not pil:
        raise RuntimeError("JPEG frames need Pillow: pip install 'socket.engine[monitor]'")
    picture = pil.fromarray(a)
    if picture.mode == "RGBA":
        picture = picture.convert("RGB")
    buf = io.BytesIO()
    picture.save(buf, "JPEG", quality=quality)
    return buf.getvalue(), "image/jpeg"
