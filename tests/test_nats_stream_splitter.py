"""wire.StreamSplitter: a connection's byte stream cut into NATS units (sans-I/O)."""

from __future__ import annotations

from typing import List

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from socketengine import frames
from socketengine.errors import MessageTooBig, ProtocolError
from socketengine.transport.nats.wire import StreamSplitter


def _stream(values: List[bytes]) -> List[bytes]:
    units = [frames.PREAMBLE]
    for i, v in enumerate(values):
        units.append(b"".join(frames.encode_value_frame(frames.DATA, f"c{i}", v)))
    return units


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.binary(max_size=300), max_size=6),
    st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=50),
)
def test_units_survive_any_chunking(values: List[bytes], cuts: List[int]) -> None:
    units = _stream(values)
    data = b"".join(units)
    sp = StreamSplitter()
    out: List[bytes] = []
    pos = i = 0
    while pos < len(data):
        step = cuts[i % len(cuts)]
        out += sp.feed(data[pos : pos + step])
        pos += step
        i += 1
    assert out == units


def test_every_boundary_one_byte_at_a_time() -> None:
    units = _stream([b"", b"x" * 1000, b"abc"])
    sp = StreamSplitter()
    out: List[bytes] = []
    for b in b"".join(units):
        out += sp.feed(bytes([b]))
    assert out == units


def test_a_stream_without_the_preamble_is_refused() -> None:
    with pytest.raises(ProtocolError, match="preamble"):
        StreamSplitter().feed(b"GET / HTTP/1.1\r\n")


def test_a_frame_above_max_message_is_refused_before_it_is_buffered() -> None:
    sp = StreamSplitter(max_message=1000)
    head = frames.HEADER.pack(frames.DATA, 0, 1, 0, 0, 10_000_000)
    with pytest.raises(MessageTooBig, match="max_message"):
        sp.feed(frames.PREAMBLE + head + b"c")
