"""frames: the wire format and the incremental FrameDecoder.  Sans-I/O: no sockets.

The decoder must give the same frames however the byte stream is cut into receive
calls, refuse oversized frames from the header alone, and turn any garbage into a
ProtocolError (or a HandshakeError for a wrong preamble).
"""

from __future__ import annotations

import math
from typing import Any, List, Sequence, Tuple

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from socketengine import codec, frames
from socketengine.errors import HandshakeError, MessageTooBig, ProtocolError
from socketengine.frames import PREAMBLE, Frame, FrameDecoder

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

Spec = Tuple[int, int, str, int, Any]  # type, flags, channel, id, value


# -- helpers ---------------------------------------------------------------------------


def wire(parts: Sequence[codec.Buffer]) -> bytes:
    return b"".join(bytes(memoryview(p)) for p in parts)


def build(specs: Sequence[Spec]) -> bytes:
    return PREAMBLE + b"".join(
        wire(frames.encode_value_frame(t, ch, v, flags=fl, fid=i)) for t, fl, ch, i, v in specs
    )


def header(ftype: int, clen: int = 0, mlen: int = 0, dlen: int = 0, *, fid: int = 0) -> bytes:
    return frames.HEADER.pack(ftype, 0, clen, fid, mlen, dlen)


def feed_chunks(dec: FrameDecoder, stream: bytes, cuts: Sequence[int]) -> List[Frame]:
    got: List[Frame] = []
    bounds = [0, *sorted(cuts), len(stream)]
    for a, b in zip(bounds, bounds[1:]):
        got.extend(dec.feed(stream[a:b]))
    return got


def same(got: Any, want: Any) -> None:
    """Exact equality, types included; arrays bit-identical."""
    assert type(got) is type(want), (got, want)
    if isinstance(want, np.ndarray):
        assert got.dtype.str == want.dtype.str and got.shape == want.shape
        assert got.tobytes() == want.tobytes()
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            same(g, w)
    elif isinstance(want, dict):
        assert list(got) == list(want)
        for k in want:
            same(got[k], want[k])
    elif isinstance(want, float) and math.isnan(want):
        assert math.isnan(got)
    else:
        assert got == want


def check(got: List[Frame], specs: Sequence[Spec]) -> None:
    assert len(got) == len(specs)
    for frame, (t, fl, ch, i, v) in zip(got, specs):
        assert (frame.type, frame.flags, frame.channel, frame.id) == (t, fl, ch, i)
        same(frame.value(), v)


# -- strategies --------------------------------------------------------------------------

# Large data sections (>= 64 KiB) take the decoder's own-buffer path.
BIG_ARRAYS: List[np.ndarray] = [
    np.arange(70_000 // 8, dtype=np.float64),  # 70 000 bytes
    np.asfortranarray(np.arange(300 * 400, dtype=np.int16).reshape(300, 400)),  # 240 000
    (np.arange(512 * 512 * 3) % 251).astype(np.uint8).reshape(512, 512, 3),  # 786 432
    np.arange(1 << 16, dtype=np.uint8),  # exactly the threshold
]
SMALL_ARRAYS: List[np.ndarray] = [
    np.zeros(0, np.float32),
    np.arange(7, dtype=np.uint8),
    np.eye(3, dtype=">f4"),
    np.arange(8191, dtype=np.float64),  # data just below the threshold
]

small_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=False),
        st.text(max_size=10),
        st.binary(max_size=10),
        st.sampled_from(SMALL_ARRAYS),
    ),
    lambda ch: st.lists(ch, max_size=3) | st.lists(ch, max_size=3).map(tuple),
    max_leaves=6,
)
frame_values = st.one_of(
    small_values,
    st.sampled_from(BIG_ARRAYS),
    st.sampled_from(BIG_ARRAYS).map(lambda a: {"img": a, "n": 1}),
)
specs = st.tuples(
    st.sampled_from(sorted(frames.FRAME_TYPES)),
    # any flags but FLAG_COMPRESSED, whose frames carry another body (test_compression_wire)
    st.integers(min_value=0, max_value=255).map(lambda f: f & ~frames.FLAG_COMPRESSED),
    st.text(max_size=12),
    st.integers(min_value=0, max_value=2**32 - 1),
    frame_values,
)


# -- encoding ----------------------------------------------------------------------------


def test_preamble_is_version_1_1_and_accepts_other_minors() -> None:
    assert PREAMBLE == b"SENG\x01\x02\x00\x00"
    frames.check_preamble(b"SENG\x01\x00\x00\x00")  # a 1.0 peer
    frames.check_preamble(b"SENG\x01\x09\x00\x00")  # a later 1.x peer
    with pytest.raises(HandshakeError, match="upgrade"):
        frames.check_preamble(b"SENG\x02\x00\x00\x00")


def test_preamble_and_header_layout() -> None:
    parts = frames.encode_value_frame(frames.DATA, "cam", [1, 2], flags=3, fid=7)
    raw = wire(parts)
    ftype, flags, clen, fid, mlen, dlen = frames.HEADER.unpack_from(raw)
    assert (ftype, flags, clen, fid, dlen) == (frames.DATA, 3, 3, 7, 0)
    assert raw[16:19] == b"cam"
    assert codec.decode(raw[19 : 19 + mlen]) == [1, 2]
    assert len(raw) == 16 + 3 + mlen
    assert frames.frame_size(parts) == len(raw)


def test_array_data_is_referenced_not_copied() -> None:
    arr = BIG_ARRAYS[0]
    parts = frames.encode_value_frame(frames.DATA, "x", arr)
    assert len(parts) == 2
    assert np.shares_memory(np.frombuffer(parts[1], np.uint8), arr)
    assert frames.frame_size(parts) == len(wire(parts))


@FAST
@given(st.lists(specs, max_size=6), st.lists(st.integers(min_value=0), max_size=12))
def test_any_cut_of_a_stream_gives_the_same_frames(
    spec_list: List[Spec], raw_cuts: List[int]
) -> None:
    stream = build(spec_list)
    cuts = [c % (len(stream) + 1) for c in raw_cuts]
    dec = FrameDecoder()
    check(feed_chunks(dec, stream, cuts), spec_list)
    assert dec.bytes_received == len(stream)
    assert dec.take() == []


def test_every_single_cut_of_a_small_stream() -> None:
    spec_list: List[Spec] = [
        (frames.DATA, 0, "a", 1, 1),
        (frames.REQUEST, 2, "ünï/κ", 2**32 - 1, {"k": (1.5, b"\x00")}),
        (frames.PING, 0, "", 0, None),
        (frames.REPLY, 1, "x", 3, [np.arange(3, dtype=np.int16), "s"]),
        (frames.BYE, 0, "", 0, ()),
    ]
    stream = build(spec_list)
    for cut in range(len(stream) + 1):
        check(feed_chunks(FrameDecoder(), stream, [cut]), spec_list)
    for a in range(0, len(stream) + 1, 7):
        for b in range(a, len(stream) + 1, 5):
            check(feed_chunks(FrameDecoder(), stream, [a, b]), spec_list)


def test_byte_by_byte() -> None:
    spec_list: List[Spec] = [
        (frames.DATA, 1, "c", 5, {"a": [1, 2]}),
        (frames.DATA, 0, "big", 6, BIG_ARRAYS[0]),
        (frames.DATA, 0, "", 7, "after"),
    ]
    stream = build(spec_list)
    dec = FrameDecoder()
    got: List[Frame] = []
    for i in range(len(stream)):
        got.extend(dec.feed(stream[i : i + 1]))
    check(got, spec_list)


def test_large_frames_all_at_once_and_interleaved_with_small_ones() -> None:
    spec_list: List[Spec] = []
    for i, arr in enumerate(BIG_ARRAYS * 2):
        spec_list.append((frames.DATA, 0, f"big{i}", i, arr))
        spec_list.append((frames.DATA, 0, "small", i, [i, "x" * i]))
    stream = build(spec_list)
    check(FrameDecoder().feed(stream), spec_list)
    check(feed_chunks(FrameDecoder(), stream, range(0, len(stream), 40_000)), spec_list)
    check(feed_chunks(FrameDecoder(), stream, range(0, len(stream), 65_537)), spec_list)


def test_received_arrays_are_writable_whatever_the_frame_size_or_split() -> None:
    for arr in (SMALL_ARRAYS[1], BIG_ARRAYS[0], BIG_ARRAYS[2]):
        stream = build([(frames.DATA, 0, "x", 0, arr)])
        for cuts in ([], [len(stream) // 2], [40, 100]):
            [frame] = feed_chunks(FrameDecoder(), stream, cuts)
            got = frame.value()
            same(got, arr)
            assert got.flags.writeable
            got.reshape(-1)[0] = 1


def test_large_data_section_is_received_into_its_own_buffer() -> None:
    arr = BIG_ARRAYS[2]
    stream = build([(frames.DATA, 0, "img", 9, arr)])
    dlen = arr.nbytes
    dec = FrameDecoder()
    assert dec.feed(stream[:1000]) == []
    # The rest of the data section goes straight into a buffer of exactly its size.
    buf = dec.get_buffer()
    assert len(buf) == len(stream) - 1000
    rest = memoryview(stream)[1000:]
    buf[:50_000] = rest[:50_000]
    dec.buffer_updated(50_000)
    assert dec.take() == []
    buf = dec.get_buffer()
    assert len(buf) == len(rest) - 50_000
    buf[:] = rest[50_000:]
    dec.buffer_updated(len(buf))
    [frame] = dec.take()
    assert type(frame.data) is bytearray and len(frame.data) == dlen
    got = frame.value()
    same(got, arr)
    # The array *is* that buffer: no copy on receive.
    assert np.shares_memory(got, np.frombuffer(frame.data, np.uint8))
    # ... and the stream goes on normally afterwards.
    check(
        dec.feed(wire(frames.encode_value_frame(frames.PONG, "", None))), [(0x21, 0, "", 0, None)]
    )


@FAST
@given(
    st.lists(specs, min_size=1, max_size=4),
    st.lists(st.integers(min_value=1, max_value=200_000), min_size=1, max_size=30),
)
def test_get_buffer_buffer_updated_with_partial_writes(
    spec_list: List[Spec], steps: List[int]
) -> None:
    """Drive the BufferedProtocol-style interface directly, writing less than offered."""
    stream = memoryview(build(spec_list))
    dec = FrameDecoder(read_size=4096)
    got: List[Frame] = []
    views = []  # keep every handed-out view alive: the decoder must cope
    pos = 0
    i = 0
    while pos < len(stream):
        buf = dec.get_buffer()
        views.append(buf)
        assert len(buf) > 0
        if dec._body is None:
            assert len(buf) >= dec.read_size
        # Hypothesis's chosen sizes for a while, then whole buffers (keeps it fast).
        step = steps[i % len(steps)] if i < 300 else len(buf)
        n = min(len(buf), len(stream) - pos, step)
        i += 1
        buf[:n] = stream[pos : pos + n]
        pos += n
        dec.buffer_updated(n)
        got.extend(dec.take())
    check(got, spec_list)
    assert dec.bytes_received == len(stream)


def test_the_stream_buffer_is_compacted_in_place_once_it_has_grown() -> None:
    """A frame cut by a read is moved to the front of the same buffer for the next
    read: a fresh (zero-filled) buffer only when it must grow, not for every read."""
    items = [(frames.DATA, 0, f"ch{i % 7}", 0, [i, "x" * (i % 300)]) for i in range(3000)]
    stream = build(items)
    dec = FrameDecoder(read_size=4096)
    got: List[Frame] = []
    buffers = []  # kept alive: a freed buffer's id could come back
    pos = 0
    while pos < len(stream):
        buf = dec.get_buffer()
        buffers.append(dec._buf)
        n = min(len(buf), len(stream) - pos)  # whole reads: frames are cut at the ends
        buf[:n] = stream[pos : pos + n]
        buf.release()
        pos += n
        dec.buffer_updated(n)
        got.extend(dec.take())
    check(got, items)
    distinct = [b for i, b in enumerate(buffers) if i == 0 or b is not buffers[i - 1]]
    assert len(buffers) > 50 and len(distinct) <= 4  # the growth steps only


def test_get_buffer_is_never_empty_and_buffer_grows_for_big_metas() -> None:
    # A 1 MB bytes value travels in meta (not data): the stream buffer must grow.
    value = bytes(range(256)) * 4096
    stream = build([(frames.DATA, 0, "m", 0, value), (frames.DATA, 0, "n", 1, 2)])
    dec = FrameDecoder(read_size=4096)
    got: List[Frame] = []
    pos = 0
    while pos < len(stream):
        buf = dec.get_buffer()
        assert len(buf) >= 4096
        n = min(len(buf), len(stream) - pos, 10_000)
        buf[:n] = stream[pos : pos + n]
        pos += n
        dec.buffer_updated(n)
        got.extend(dec.take())
    check(got, [(frames.DATA, 0, "m", 0, value), (frames.DATA, 0, "n", 1, 2)])


def test_no_preamble_mode() -> None:
    raw = wire(frames.encode_value_frame(frames.DATA, "a", 1))
    check(FrameDecoder(expect_preamble=False).feed(raw), [(frames.DATA, 0, "a", 0, 1)])
    with pytest.raises(HandshakeError):
        FrameDecoder().feed(raw)


def test_frame_with_no_meta_and_no_data() -> None:
    raw = PREAMBLE + wire(frames.encode_frame(frames.PING))
    [frame] = FrameDecoder().feed(raw)
    assert frame == Frame(frames.PING, 0, "", 0, b"", None)


# -- limits ------------------------------------------------------------------------------


def test_message_too_big_is_raised_from_the_header_alone() -> None:
    dec = FrameDecoder(max_message=100_000)
    dec.feed(PREAMBLE)
    head = header(frames.DATA, 1, 10, 10**9)
    for b in head[:-1]:
        dec.feed(bytes([b]))  # not yet: the header is incomplete
    with pytest.raises(MessageTooBig) as info:
        dec.feed(head[-1:])  # the body (1 GB) was never sent
    assert "max_message" in str(info.value)
    assert isinstance(info.value, ProtocolError)


@pytest.mark.parametrize("field", ["clen", "mlen", "dlen"])
def test_max_message_counts_the_whole_frame(field: str) -> None:
    limit = 70_000
    size = limit - 16  # header + this == limit: accepted
    sizes = {"clen": 0, "mlen": 0, "dlen": 0}
    sizes[field] = size if field != "clen" else 65_535
    total = 16 + sum(sizes.values())
    dec = FrameDecoder(max_message=total)
    assert dec.feed(PREAMBLE + header(frames.DATA, **sizes)) == []
    dec = FrameDecoder(max_message=total - 1)
    with pytest.raises(MessageTooBig):
        dec.feed(PREAMBLE + header(frames.DATA, **sizes))


def test_max_message_can_be_raised_on_a_live_decoder() -> None:
    dec = FrameDecoder(max_message=1000)
    dec.feed(PREAMBLE)
    dec.max_message = 1 << 20
    arr = BIG_ARRAYS[0]
    check(dec.feed(build([(frames.DATA, 0, "a", 0, arr)])[8:]), [(frames.DATA, 0, "a", 0, arr)])


@pytest.mark.parametrize("ftype", [0x00, 0x06, 0x0F, 0x1A, 0x1F, 0x23, 0x7F, 0xFF])
def test_unknown_frame_type_is_a_protocol_error(ftype: int) -> None:
    with pytest.raises(ProtocolError, match="unknown frame type"):
        FrameDecoder().feed(PREAMBLE + header(ftype))


# -- preamble ----------------------------------------------------------------------------


def test_tls_client_hello_is_recognised() -> None:
    hello = bytes.fromhex("16030100f5010000f10303") + bytes(40)
    with pytest.raises(HandshakeError, match="TLS"):
        FrameDecoder().feed(hello)


@pytest.mark.parametrize(
    "start", [b"GET / HTTP/1.1\r\n", b"POST /x HTTP/1.1\r\n", b"HTTP/1.1 200 OK"]
)
def test_http_is_recognised(start: bytes) -> None:
    with pytest.raises(HandshakeError, match="HTTP"):
        FrameDecoder().feed(start)


def test_other_garbage_preamble_shows_the_bytes() -> None:
    with pytest.raises(HandshakeError, match="xyz"):
        FrameDecoder().feed(b"xyzxyzxyz")


def test_preamble_is_checked_once_eight_bytes_arrived() -> None:
    dec = FrameDecoder()
    dec.feed(b"\x16\x03\x01")  # three bytes of TLS: cannot tell yet
    with pytest.raises(HandshakeError, match="TLS"):
        dec.feed(b"\x00\x00\x00\x00\x00")


@pytest.mark.parametrize("major", [0, 2, 255])
def test_wrong_major_version(major: int) -> None:
    with pytest.raises(HandshakeError, match=f"protocol {major}\\.3"):
        FrameDecoder().feed(b"SENG" + bytes([major, 3]) + b"\x00\x00")


def test_other_minor_version_is_accepted() -> None:
    raw = b"SENG\x01\x07\x00\x00" + wire(frames.encode_value_frame(frames.DATA, "a", 1))
    check(FrameDecoder().feed(raw), [(frames.DATA, 0, "a", 0, 1)])


def test_handshake_error_is_a_connection_error_not_a_protocol_error() -> None:
    with pytest.raises(ConnectionError) as info:
        frames.check_preamble(b"GET / HT")
    assert not isinstance(info.value, ProtocolError)
    frames.check_preamble(PREAMBLE)


# -- hostile streams ---------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(min_value=0, max_value=300), max_size=5))
def test_garbage_after_the_preamble_raises_only_protocol_errors(
    garbage: bytes, cuts: List[int]
) -> None:
    dec = FrameDecoder(max_message=1 << 16)
    try:
        got = feed_chunks(dec, PREAMBLE + garbage, [c % (len(garbage) + 9) for c in cuts])
    except ProtocolError:
        return
    for frame in got:
        try:
            frame.value()
        except ProtocolError:
            pass


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from(sorted(frames.FRAME_TYPES)),
    st.binary(max_size=8),
    st.binary(max_size=60),
    st.binary(max_size=40),
)
def test_well_framed_garbage_gives_frames_whose_values_raise_protocol_error(
    ftype: int, channel: bytes, meta: bytes, data: bytes
) -> None:
    raw = PREAMBLE + header(ftype, len(channel), len(meta), len(data)) + channel + meta + data
    try:
        [frame] = FrameDecoder().feed(raw)
    except ProtocolError:
        return  # channel that is not UTF-8
    assert (frame.meta, frame.data or b"") == (meta, data)
    try:
        frame.value()
    except ProtocolError as exc:
        assert repr(frame.channel) in str(exc)


# -- channel names -----------------------------------------------------------------------


@pytest.mark.parametrize("channel", [b"cam", 1, None, 1.5, ["a"], ("a",)])
def test_non_str_channel_names_raise_type_error(channel: Any) -> None:
    with pytest.raises(TypeError):
        frames.encode_value_frame(frames.DATA, channel, 1)


def test_type_error_for_channel_names_says_str() -> None:
    with pytest.raises(TypeError, match="str, not bytes"):
        frames.channel_bytes(b"cam")  # type: ignore[arg-type]


def test_too_long_channel_name_is_value_error() -> None:
    frames.encode_frame(frames.DATA, "x" * 65_535)
    with pytest.raises(ValueError):
        frames.encode_frame(frames.DATA, "x" * 65_536)
    with pytest.raises(ValueError):
        frames.encode_frame(frames.DATA, "é" * 40_000)  # 80 000 UTF-8 bytes


@pytest.mark.parametrize("channel", ["", "a", "caméra/0", "🎥", "x" * 300, "a\x00b"])
def test_unicode_channel_names_round_trip(channel: str) -> None:
    [frame] = FrameDecoder().feed(build([(frames.DATA, 0, channel, 0, 1)]))
    assert frame.channel == channel


@pytest.mark.parametrize("big", [False, True])
def test_non_utf8_channel_on_the_wire_is_a_protocol_error(big: bool) -> None:
    channel = b"\xff\xfe"
    dlen = 100_000 if big else 0
    raw = PREAMBLE + header(frames.DATA, len(channel), 1, dlen) + channel + b"\xc0"
    with pytest.raises(ProtocolError, match="UTF-8"):
        FrameDecoder().feed(raw + bytes(dlen if not big else 10))


def test_peer_chosen_long_channel_names_are_not_kept_in_the_name_cache() -> None:
    # The cache is process-wide and filled by any peer: long names must not stay in it.
    before = sum(len(k) for k in frames._names)
    specs_: List[Spec] = [(frames.DATA, 0, f"{i:04d}" + "x" * 60_000, 0, None) for i in range(40)]
    got = FrameDecoder().feed(build(specs_))
    assert [f.channel for f in got] == [s[2] for s in specs_]
    assert sum(len(k) for k in frames._names) - before < 40 * 300


def test_long_channel_names_are_not_kept_in_the_sending_caches() -> None:
    # A host encodes names its clients chose when it relays a value or answers a
    # request: the process-wide caches of encoded names must not keep long ones.
    from socketengine.relay import RelayPolicy

    def held() -> int:
        return sum(len(k) for k in [*frames._channel_bytes, *frames._item_prefixes])

    before = held()
    policy = RelayPolicy(True)
    for i in range(40):
        name = f"{i:04d}" + "x" * 60_000
        frames.value_frame(frames.DATA, name, i)
        item = frames.value_item(name, i)
        assert isinstance(item, bytes) and item.endswith(bytes([i]))
        frames.value_item(name, np.zeros(3))  # the full encoder
        assert policy.allows(name, "writer")
    assert held() - before < 40 * 300
    assert not any(len(ch) > frames.CACHED_NAME_MAX for ch in frames._full_channels)
    assert not any(len(ch) > frames.CACHED_NAME_MAX for ch, _ in policy._cache)


# -- pausing after handshake frames ----------------------------------------------------


def test_pause_after_handshake_holds_the_following_frames_until_resume() -> None:
    big = BIG_ARRAYS[1]
    stream = build([(frames.WELCOME, 0, "", 0, {"v": 1}), (frames.DATA, 0, "img", 1, big)])
    dec = FrameDecoder(max_message=1000)
    dec.pause_after_handshake = True
    [welcome] = dec.feed(stream[:-10])
    assert welcome.type == frames.WELCOME
    assert dec.feed(stream[-10:]) == []  # still paused: not sized against 1000 yet
    dec.max_message = 1 << 20
    dec.pause_after_handshake = False
    check(dec.resume(), [(frames.DATA, 0, "img", 1, big)])


def test_resume_still_enforces_the_limit() -> None:
    stream = build([(frames.HELLO, 0, "", 0, {}), (frames.DATA, 0, "img", 1, BIG_ARRAYS[0])])
    dec = FrameDecoder(max_message=1000)
    dec.pause_after_handshake = True
    assert [f.type for f in dec.feed(stream)] == [frames.HELLO]
    with pytest.raises(MessageTooBig):
        dec.resume()


def test_channel_names_of_equal_length_are_never_confused() -> None:
    names = ["ab", "cd", "ab", "ab", "cd", "é", "xy", "", "ab"]
    stream = frames.PREAMBLE + b"".join(
        b"".join(frames.encode_value_frame(frames.DATA, name, i)) for i, name in enumerate(names)
    )
    for step in (1, 7, len(stream)):  # also across reads, where the last name is carried over
        dec = frames.FrameDecoder()
        got = []
        for i in range(0, len(stream), step):
            got += dec.feed(stream[i : i + step])
        assert [f.channel for f in got] == names
        assert [f.value() for f in got] == list(range(len(names)))


def test_large_bodies_are_recycled_only_once_nothing_refers_to_them() -> None:
    decoder = frames.FrameDecoder(1 << 24, 65536, expect_preamble=False)
    arr = np.arange(200_000, dtype=np.uint8)

    def one(value: Any) -> Any:
        (frame,) = decoder.feed(wire(frames.encode_value_frame(frames.DATA, "v", value)))
        return frame.value()

    kept = one(arr)  # the application keeps this array
    first = kept.base
    second = one(arr + 1)  # must not overwrite the kept one
    assert kept.tolist() == arr.tolist() and second.tolist() == (arr + 1).tolist()
    assert second.base is not first
    del second
    third = one(arr + 2)  # the second buffer is free again: reused, correctly filled
    assert third.tolist() == (arr + 2).tolist() and kept.tolist() == arr.tolist()


_writable = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=False),
        st.text(max_size=30),
        st.binary(max_size=6000),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=6),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(st.text(max_size=5), children, max_size=4),
    ),
    max_leaves=20,
)


@FAST
@given(st.sampled_from(["c", "a/b", "é" * 40]), _writable)
def test_value_item_is_the_canonical_encoding_whatever_path_it_takes(
    channel: str, value: Any
) -> None:
    # The writers' fast path (one shared packer) and the full encoder must give the same
    # bytes: a BATCH item when small, else the DATA frame value_frame() makes.
    got = frames.value_item(channel, value)
    meta = codec.encode(value)[0]
    if type(got) is bytes:
        assert len(meta) <= frames.ITEM_MAX
        assert got == frames._item_prefix(channel) + meta
    else:
        parts, size = got
        want, want_size = frames.value_frame(frames.DATA, channel, value)
        assert b"".join(bytes(p) for p in parts) == b"".join(bytes(p) for p in want)
        assert size == want_size


def test_a_channel_whose_values_hold_tuples_goes_straight_to_the_full_encoder() -> None:
    # The shared packer cannot pack tuples; after one failed try the channel skips it,
    # and its values, with or without tuples, keep their exact encoding.
    channel = "test-frames-tuple-channel"
    assert channel not in frames._full_channels
    first = frames.value_item(channel, {"pos": (1.0, 2.0)})
    assert channel in frames._full_channels
    assert first == frames._item_prefix(channel) + codec.encode({"pos": (1.0, 2.0)})[0]
    assert (
        frames.value_item(channel, [1, "x"])
        == frames._item_prefix(channel) + codec.encode([1, "x"])[0]
    )


@FAST
@given(st.lists(st.tuples(st.sampled_from(["c", "a/b", "é" * 40, "t"]), _writable), max_size=8))
def test_value_items_encode_every_pair_as_value_item_does(pairs: List[Tuple[str, Any]]) -> None:
    # write_many's inlined loop must give exactly write()'s encoding, pair by pair, and
    # count the DATA frames among them (the queue takes items-only batches in one step).
    got = frames.value_items(pairs)
    assert len(got) == len(pairs)
    for (channel, value), encoded in zip(pairs, got):
        want = frames.value_item(channel, value)
        if type(want) is bytes:
            assert encoded == want
        else:
            assert type(encoded) is not bytes
            assert b"".join(bytes(p) for p in encoded[0]) == b"".join(bytes(p) for p in want[0])
            assert encoded[1] == want[1]
    assert got.frames == sum(type(e) is not bytes for e in got)


@pytest.mark.parametrize(
    "pairs, error, where",
    [
        ([("a", 1), ("b", object())], TypeError, "item 1"),
        ([("a", 1), "ab"], TypeError, "item 1"),
        ([("a", 1, 2)], ValueError, "item 0"),
        ([["a", 1], ("b", 2), 3], TypeError, "item 2"),
        ([("a", 1), (5, 2)], TypeError, "item 1"),
        ([("a", 1), ("x" * 70000, 2)], ValueError, "item 1"),
    ],
)
def test_value_items_name_the_first_pair_that_cannot_be_sent(
    pairs: List[Any], error: type, where: str
) -> None:
    with pytest.raises(error, match=f"write_many\\(\\): {where} cannot be sent"):
        frames.value_items(pairs)
    with pytest.raises(error, match=f"write_many\\(\\): {where} cannot be sent"):
        frames.encode_pairs(pairs, frames.value_item)
