"""The value a command sends: VALUE as JSON, ``--raw`` text, or ``--file`` contents."""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import Any, Tuple

from .exits import CommandError, UsageError

__all__ = ["read_value"]

_IMAGE_MAGIC = (
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
)


def _decode_image(data: bytes, path: str) -> Any:
    """A numpy array of the image file ``data``, or None if it is not an image file."""
    if not data.startswith(_IMAGE_MAGIC) and not (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
        return None
    try:
        import numpy as np
        from PIL import Image
    except ImportError:
        raise CommandError(
            f"{path} is an image; sending it as one needs Pillow and numpy "
            "(pip install 'socket.engine[monitor]'), or send its bytes with --bytes"
        ) from None
    try:
        with Image.open(io.BytesIO(data)) as opened:
            picture: Any = opened
            if picture.mode == "LA" or (picture.mode == "P" and "transparency" in picture.info):
                picture = picture.convert("RGBA")
            elif picture.mode not in ("L", "RGB", "RGBA"):
                picture = picture.convert("RGB")
            return np.ascontiguousarray(np.asarray(picture, dtype=np.uint8))
    except (OSError, ValueError, SyntaxError) as exc:
        raise CommandError(f"cannot decode the image {path}: {exc}") from exc


def read_value(args: argparse.Namespace) -> Tuple[Any, bool]:
    """The value to send from VALUE / ``--raw`` / ``--file``; and whether it is an image."""
    if args.file is not None:
        if args.value is not None:
            raise UsageError("give VALUE or --file, not both")
        if args.raw:
            raise UsageError("--raw applies to VALUE, not to --file")
        try:
            if args.file == "-":
                data = sys.stdin.buffer.read()
            else:
                data = Path(args.file).read_bytes()
        except OSError as exc:
            raise CommandError(f"cannot read --file {args.file}: {exc.strerror or exc}") from exc
        if not args.bytes:
            image = _decode_image(data, args.file)
            if image is not None:
                return image, True
        return data, False
    if args.bytes:
        raise UsageError("--bytes applies to --file")
    if args.value is None:
        raise UsageError("give a VALUE (JSON, or --raw for a plain string) or --file PATH")
    if args.raw:
        return args.value, False
    try:
        return json.loads(args.value), False
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"VALUE is not valid JSON ({exc.msg} at column {exc.colno}); "
            "quote a string as '\"text\"' or pass --raw"
        ) from None
    except RecursionError:
        raise UsageError("VALUE is nested too deeply") from None
