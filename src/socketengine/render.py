"""Short, safe renderings of received values, shared by the command line and the monitor.

* :func:`describe` -- one line of JSON-like text, bounded in length *and* in work;
* :func:`jsonable` -- the value as plain JSON data (``socketengine host --json``);
* :func:`image_shape` -- whether a value is an image the monitor shows, and its size;
* :func:`safe` and :func:`format_address` -- text a peer cannot use to drive a terminal.

Nothing here imports numpy: arrays only exist if the codec (which imports numpy to
decode them) already did.
"""

from __future__ import annotations

import base64
import json
import math
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

__all__ = [
    "JSON_ARRAY_LIMIT",
    "describe",
    "encoded_image_info",
    "format_address",
    "image_shape",
    "jsonable",
    "safe",
    "shape_text",
]

#: Array elements included by :func:`jsonable` (larger arrays: shape and dtype only).
JSON_ARRAY_LIMIT = 1024


class _Full(Exception):
    """The text budget of :func:`describe` is spent."""


def _numpy() -> Any:
    return sys.modules.get("numpy")


def shape_text(shape: Tuple[int, ...]) -> str:
    """``480x640x3``; ``scalar`` for ``()``."""
    return "x".join(str(n) for n in shape) if shape else "scalar"


def safe(text: Any) -> str:
    """``text`` with control characters escaped, so a peer cannot drive the terminal."""
    s = str(text)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)


def format_address(address: Any) -> str:
    """``host:port``, ``[v6]:port``; anything else as text."""
    try:
        host, port = address[0], address[1]
    except (TypeError, IndexError, KeyError):
        return safe(address)
    return f"[{safe(host)}]:{port}" if ":" in str(host) else f"{safe(host)}:{port}"


def describe(value: Any, limit: int = 80) -> str:
    """A short, single-line, JSON-like rendering of ``value``, at most ``limit`` chars.

    Strings are quoted and escaped (control characters never reach a terminal), arrays
    show shape and dtype (``<ndarray 480x640x3 uint8>``), bytes their length, long
    texts are cut with ``…``.  The work done is bounded by ``limit``, whatever the
    size of the value.
    """
    limit = max(int(limit), 8)
    if isinstance(value, str) and len(value) > limit:
        tail = f"… ({len(value)} chars)"
        room = max(limit - len(tail) - 1, 2)
        head = json.dumps(value[:room], ensure_ascii=False)[:-1][:room]
        escape = head.rfind("\\", max(1, len(head) - 6))
        if escape > 0:  # never end inside an escape sequence
            head = head[:escape]
        return head + '"' + tail
    parts: List[str] = []
    size = 0

    def emit(text: str) -> None:
        nonlocal size
        parts.append(text)
        size += len(text)
        if size > limit:
            raise _Full

    try:
        _walk(value, emit, limit, 0)
    except _Full:
        return "".join(parts)[: limit - 1] + "…"
    return "".join(parts)


def _walk(value: Any, emit: Callable[[str], None], limit: int, depth: int) -> None:
    if value is None:
        emit("null")
    elif isinstance(value, bool):
        emit("true" if value else "false")
    elif isinstance(value, int):
        emit(str(value) if value.bit_length() <= 256 else f"<int of {value.bit_length()} bits>")
    elif isinstance(value, float):
        emit(repr(value) if math.isfinite(value) else str(value))
    elif isinstance(value, str):
        emit(json.dumps(value[: limit + 1], ensure_ascii=False))
    elif isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value[:8])
        more = "…" if len(value) > 8 else ""
        emit(f"<{len(value)} bytes{' ' + data.hex() + more if data else ''}>")
    elif depth > 8:
        emit("…")
    elif isinstance(value, (list, tuple)):
        emit("[" if isinstance(value, list) else "(")
        for i, item in enumerate(value):
            if i:
                emit(", ")
            _walk(item, emit, limit, depth + 1)
        emit("]" if isinstance(value, list) else ")")
    elif isinstance(value, dict):
        emit("{")
        for i, (key, item) in enumerate(value.items()):
            if i:
                emit(", ")
            _walk(key, emit, limit, depth + 1)
            emit(": ")
            _walk(item, emit, limit, depth + 1)
        emit("}")
    else:
        _walk_other(value, emit, limit, depth)


def _walk_other(value: Any, emit: Callable[[str], None], limit: int, depth: int) -> None:
    np = _numpy()
    encoded = encoded_image_info(value)
    if encoded is not None:
        codec, shape, dtype = encoded
        size = getattr(value, "nbytes", "?")
        emit(f"<{codec} {shape_text(shape)} {dtype.lstrip('|<>=')}, {size} bytes>")
    elif np is not None and isinstance(value, np.ndarray):
        text = f"<ndarray {shape_text(value.shape)} {value.dtype}"
        if 0 < value.size <= 8 and value.dtype.kind in "biuf":
            emit(text + " ")
            _walk(value.ravel().tolist(), emit, limit, depth + 1)
            emit(">")
        else:
            emit(text + ">")
    elif np is not None and isinstance(value, np.generic):
        _walk(value.item(), emit, limit, depth + 1)
    else:
        emit(f"<{type(value).__name__}>")


def encoded_image_info(value: Any) -> Optional[Tuple[str, Tuple[int, ...], str]]:
    """``(codec, shape, dtype)`` of an image received still compressed, or None.

    Duck-typed on ``images.EncodedImage`` (its name and ``codec``/``shape``/``dtype``),
    so rendering needs nothing from the image module.
    """
    if type(value).__name__ != "EncodedImage":
        return None
    codec = getattr(value, "codec", None)
    shape = getattr(value, "shape", None)
    if codec not in ("jpeg", "png") or not isinstance(shape, tuple) or len(shape) not in (2, 3):
        return None
    return codec, shape, str(getattr(value, "dtype", ""))


def image_shape(value: Any) -> Optional[Tuple[int, int, int]]:
    """``(height, width, channels)`` if ``value`` is an image the monitor shows, else None.

    Images are numpy ``uint8`` arrays of shape ``(H, W)`` or ``(H, W, 1|3|4)``, and
    8-bit JPEG/PNG images received still compressed (``EncodedImage``).
    """
    encoded = encoded_image_info(value)
    if encoded is not None:
        _, shape, dtype = encoded
        if dtype not in ("|u1", "u1", "uint8"):
            return None
        return int(shape[0]), int(shape[1]), int(shape[2]) if len(shape) == 3 else 1
    np = _numpy()
    if np is None or not isinstance(value, np.ndarray) or value.dtype != np.uint8:
        return None
    if value.ndim == 2:
        h, w = value.shape
        c = 1
    elif value.ndim == 3 and value.shape[2] in (1, 3, 4):
        h, w, c = value.shape
    else:
        return None
    if h < 1 or w < 1:
        return None
    return int(h), int(w), int(c)


def jsonable(value: Any, depth: int = 0) -> Any:
    """``value`` as plain JSON data (see ``socketengine host --json``).

    Tuples become lists, non-string keys strings, non-finite floats ``null``, bytes
    ``{"$bytes": BASE64}``, numpy arrays ``{"$ndarray": SHAPE, "dtype": DTYPE}`` plus
    ``"data"`` (nested lists) when they have at most :data:`JSON_ARRAY_LIMIT`
    elements, images still compressed ``{"$image": CODEC, "shape", "dtype", "bytes"}``;
    anything else its short description.
    """
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if depth > 32:
        return describe(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$bytes": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, depth + 1) for v in value]
    if isinstance(value, dict):
        return {
            (k if isinstance(k, str) else describe(k)): jsonable(v, depth + 1)
            for k, v in value.items()
        }
    encoded = encoded_image_info(value)
    if encoded is not None:
        return {
            "$image": encoded[0],
            "shape": list(encoded[1]),
            "dtype": encoded[2],
            "bytes": getattr(value, "nbytes", None),
        }
    np = _numpy()
    if np is not None and isinstance(value, np.ndarray):
        out: Dict[str, Any] = {"$ndarray": list(value.shape), "dtype": str(value.dtype)}
        if value.size <= JSON_ARRAY_LIMIT and value.dtype.kind in "biuf":
            out["data"] = jsonable(value.tolist(), depth + 1)
        return out
    if np is not None and isinstance(value, np.generic):
        return jsonable(value.item(), depth + 1)
    return describe(value)
