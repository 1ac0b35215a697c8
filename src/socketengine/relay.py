"""Client to client through the host (sans-I/O): which writes a host relays, and the
RELAYED form of a DATA frame.

A host made with ``relay=`` forwards what one client writes to its other clients (each
still filtered by that client's interest).  The forwarded frame is an ordinary DATA
frame with the flag ``FLAG_RELAYED``; its meta starts with one extra msgpack str, the
name of the client that wrote it (``"host:port"`` for an unnamed one), followed by the
value's own meta; the data section (array bytes) is forwarded untouched.  A receiver
keeps the name as the channel's *sender* (``Client.sender(channel)``).

Permissions: ``writers={"cam-1": ["image", Pattern("cam/#")], ...}`` limits what each
named client may have relayed; a client not listed has nothing relayed.  Names are
chosen by the clients themselves: they are as trustworthy as the host's ``token`` (every
token holder is trusted), so give a relaying host a token.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import msgpack

from . import codec, frames
from .codec import Buffer
from .errors import ProtocolError
from .patterns import Interest, Key

__all__ = [
    "RelayPolicy",
    "relayed_frame",
    "split_relayed",
    "unwrap_relayed",
    "RelaySpec",
    "WritersSpec",
]

#: ``relay=``: ``True`` (every channel), ``False`` (none) or the channels / patterns.
RelaySpec = Union[bool, Iterable[Key]]
#: ``writers=``: client name -> the channels / patterns it may have relayed.
WritersSpec = Optional[Mapping[str, Iterable[Key]]]

_pack_header = frames.HEADER.pack


class RelayPolicy:
    """What a host relays, and whose writes (``allows`` is cached per channel/name)."""

    def __init__(self, relay: RelaySpec, writers: WritersSpec = None) -> None:
        if relay is True:
            self._channels: Optional[Interest] = None  # every channel
        elif relay is False:
            raise ValueError("RelayPolicy(relay=False) relays nothing: make none")
        else:
            self._channels = Interest(list(relay))
        self._writers: Optional[Dict[str, Interest]] = None
        if writers is not None:
            self._writers = {}
            for name, keys in writers.items():
                if not isinstance(name, str):
                    raise TypeError(f"writers keys are client names (str), not {name!r}")
                self._writers[name] = Interest(list(keys))
        self._cache: Dict[Tuple[str, Optional[str]], bool] = {}

    def allows(self, channel: str, writer: Optional[str]) -> bool:
        """Does a write by client ``writer`` on ``channel`` get relayed?"""
        key = (channel, writer)
        verdict = self._cache.get(key)
        if verdict is None:
            verdict = self._decide(channel, writer)
            # Bounded: the names are the clients' (at most ~16,384 x 2 short names, a
            # few MB); a long channel name is decided each time.
            if len(self._cache) < 16384 and len(channel) <= frames.CACHED_NAME_MAX:
                self._cache[key] = verdict
        return verdict

    def _decide(self, channel: str, writer: Optional[str]) -> bool:
        if self._channels is not None and not self._channels.wants(channel):
            return False
        if self._writers is None:
            return True
        allowed = self._writers.get(writer) if writer is not None else None
        return allowed is not None and not allowed.everything and allowed.wants(channel)


def _origin(name: str) -> bytes:
    return msgpack.packb(name, use_bin_type=True)


def relayed_frame(
    channel: str, origin: str, meta: Buffer, data: Optional[Buffer]
) -> Tuple[List[Buffer], int]:
    """The RELAYED DATA frame forwarding a received value (its meta and data section
    as received: the array bytes are not copied again)."""
    ch = frames.channel_bytes(channel)
    head_meta = _origin(origin)
    dlen = 0 if data is None else len(data)
    head = (
        _pack_header(frames.DATA, frames.FLAG_RELAYED, len(ch), 0, len(head_meta) + len(meta), dlen)
        + ch
        + head_meta
        + bytes(meta)
    )
    if data is None or not dlen:
        return [head], len(head)
    return [head, memoryview(data).cast("B")], len(head) + dlen


def relayed_value(channel: str, origin: str, value: Any) -> Tuple[List[Buffer], int]:
    """The RELAYED DATA frame for a value received decoded (a BATCH item)."""
    meta, buffers, data_len = codec.encode(value)
    data = b"".join(bytes(b) for b in buffers) if buffers else None
    return relayed_frame(channel, origin, meta, data)


def unwrap_relayed(frame: frames.Frame) -> Tuple[str, frames.Frame]:
    """``(sender name, the frame as its sender wrote it)`` of a DATA frame with
    ``FLAG_RELAYED``: the flag and the name are taken off, so that the value, its
    storage budget and a relaying host's forwarded copy see the value's own meta.
    Raises :class:`ProtocolError` if the name is missing or malformed."""
    origin, meta = split_relayed(frame.meta)
    return origin, frames.Frame(
        frame.type, frame.flags & ~frames.FLAG_RELAYED, frame.channel, frame.id, meta, frame.data
    )


def split_relayed(meta: Buffer) -> Tuple[str, bytes]:
    """``(sender name, the value's own meta)`` of a RELAYED frame's meta."""
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=max(len(meta), 1))
    unpacker.feed(meta)
    try:
        origin = unpacker.unpack()
    except Exception:
        raise ProtocolError("RELAYED frame without its sender name") from None
    if type(origin) is not str or len(origin) > 1024:
        raise ProtocolError("RELAYED frame sender is not a short string")
    return origin, bytes(memoryview(meta)[unpacker.tell() :])
