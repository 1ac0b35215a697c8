"""Reading a JPEG's or PNG's own header (size, channels, bit depth) without decoding it.

:func:`~socketengine.images.decode` compares the header with the declared shape and
dtype before anything is decompressed; :func:`~socketengine.images.from_bytes` builds an
:class:`~socketengine.images.EncodedImage` from it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Tuple

if TYPE_CHECKING:
    from .encoded import Buffer, EncodedImage

_JPEG_SIG = b"\xff\xd8"
_PNG_SIG = b"\x89PNG\r\n\x1a\n"


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
