"""Chunking frames for NATS and putting them back together (sans-I/O)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from socketengine import frames
from socketengine.errors import MessageTooBig, ProtocolError
from socketengine.transport.nats.chunks import (
    CHUNK_HEADER,
    CHUNK_HEADER_SIZE,
    Chunker,
    Reassembler,
    is_chunk,
    split_parts,
)
from socketengine.transport.nats.wire import decode_one, frame_bytes


def body_of(n: int) -> bytes:
    return bytes(i * 7 % 251 for i in range(n))


@given(payload=st.integers(CHUNK_HEADER_SIZE + 1, 300), data=st.data())
@settings(max_examples=200)
def test_every_split_boundary_round_trips(payload: int, data: st.DataObject) -> None:
    size = payload - CHUNK_HEADER_SIZE
    # Sizes at and around every multiple of the chunk size.
    k = data.draw(st.integers(0, 6))
    n = data.draw(st.sampled_from([max(1, k * size + d) for d in (-1, 0, 1)] + [payload]))
    body = body_of(n)
    msgs = Chunker(payload).split(body)
    assert all(len(m) <= payload for m in msgs)
    if n <= payload:
        assert msgs == [body] and not is_chunk(msgs[0])
    else:
        assert len(msgs) == -(-n // size) and all(is_chunk(m) for m in msgs)
    r = Reassembler(max_message=10_000)
    out = [r.feed("s", m, now=0.0) for m in msgs]
    assert [bytes(o) for o in out if o is not None] == [body]
    assert out[:-1] == [None] * (len(msgs) - 1)
    assert r.losses == [] and r.pending_bytes == 0


@given(st.lists(st.integers(1, 400), min_size=1, max_size=8), st.integers(40, 100))
def test_streams_from_several_senders_interleaved_by_message(sizes: list, payload: int) -> None:
    a, b = Chunker(payload, sender=1), Chunker(payload, sender=2)
    r = Reassembler(max_message=1000)
    got = []
    for i, n in enumerate(sizes):
        body = bytes([i]) * n
        for chunker in (a, b):
            for m in chunker.split(body):
                done = r.feed("subj", m, now=0.0)
                if done is not None:
                    got.append(bytes(done))
    assert got == [bytes([i]) * n for i, n in enumerate(sizes) for _ in (0, 1)]
    assert r.losses == []


def test_missing_chunk_is_reported() -> None:
    msgs = Chunker(100, sender=5).split(body_of(500))
    r = Reassembler(max_message=1000)
    assert r.feed("s", msgs[0], now=0) is None
    assert r.feed("s", msgs[2], now=0) is None  # chunk 1 lost
    for m in msgs[3:]:
        assert r.feed("s", m, now=0) is None
    (loss,) = r.take_losses()
    assert (loss.sender, loss.message_id, loss.received, loss.chunks) == (5, 1, 1, len(msgs))
    assert "gap" in loss.reason
    assert r.pending_bytes == 0
    # The next message is delivered normally.
    nxt = Chunker(100, sender=5)
    nxt._next_id = 1
    done = [r.feed("s", m, now=0) for m in nxt.split(body_of(300))]
    assert bytes(done[-1]) == body_of(300) and r.losses == []


def test_missing_start_and_missing_end_are_reported() -> None:
    c = Chunker(100, sender=9)
    first, second = c.split(body_of(400)), c.split(body_of(400))
    r = Reassembler(max_message=1000, timeout=5)
    for m in first[1:]:  # joined mid-message
        assert r.feed("s", m, now=0) is None
    (loss,) = r.take_losses()
    assert "without its start" in loss.reason and loss.message_id == 1
    for m in second[:-1]:  # the last chunk never comes
        assert r.feed("s", m, now=1) is None
    assert r.pending_bytes == 400
    r.expire(now=2)
    assert r.losses == []
    r.expire(now=7)
    (loss,) = r.take_losses()
    assert "timeout" in loss.reason and loss.received == len(second) - 1
    assert r.pending_bytes == 0
    assert r.feed("s", second[-1], now=8) is None  # a late straggler stays dropped
    assert r.losses == []


def test_oversize_announcement_refused_before_allocating() -> None:
    r = Reassembler(max_message=1000)
    # A forged chunk 0 announcing 2**40 bytes: refused from its header alone.
    forged = CHUNK_HEADER.pack(0xC5, 1, 0, 0, 2**31, 1, 1, 2**40) + b"x" * 64
    assert r.feed("s", forged, now=0) is None
    (loss,) = r.take_losses()
    assert "max_message" in loss.reason and r.pending_bytes == 0
    # Within max_message but beyond the shared budget.
    r = Reassembler(max_message=1000, max_pending=1500)
    a = Chunker(100, sender=1).split(body_of(900))
    b = Chunker(100, sender=2).split(body_of(900))
    r.feed("s", a[0], now=0)
    r.feed("s", b[0], now=0)
    (loss,) = r.take_losses()
    assert "max_pending" in loss.reason and loss.sender == 2
    assert r.pending_bytes == 900


def test_inconsistent_headers_are_losses() -> None:
    r = Reassembler(max_message=1000)
    bad_count = CHUNK_HEADER.pack(0xC5, 1, 0, 0, 5, 1, 1, 100) + b"x" * 50  # needs 2, says 5
    assert r.feed("s", bad_count, now=0) is None
    assert "chunks of" in r.take_losses()[0].reason
    assert r.feed("s", b"\xc5short", now=0) is None
    assert "shorter than a header" in r.take_losses()[0].reason


def test_split_parts_joins_frame_parts() -> None:
    parts = frames.encode_value_frame(frames.DATA, "ch", b"z" * 5000)
    msgs = split_parts(Chunker(1000), parts)
    r = Reassembler(max_message=10_000)
    body = [r.feed("s", m) for m in msgs][-1]
    f = decode_one(body)
    assert f.channel == "ch" and f.value() == b"z" * 5000


@given(
    st.text(max_size=20),
    st.one_of(st.none(), st.integers(), st.text(), st.binary(max_size=3000)),
    st.integers(0, 3),
)
def test_decode_one_round_trips(channel: str, value: object, flags: int) -> None:
    body = frame_bytes(frames.encode_value_frame(frames.DATA, channel, value, flags=flags))
    f = decode_one(body)
    assert (f.type, f.flags, f.channel) == (frames.DATA, flags, channel)
    assert f.value() == value
    g = decode_one(bytearray(body))
    assert g.value() == value


def test_decode_one_refuses_short_trailing_and_oversize() -> None:
    body = frame_bytes(frames.encode_value_frame(frames.DATA, "c", b"abc"))
    with pytest.raises(ProtocolError, match="shorter than a frame header"):
        decode_one(body[:10])
    with pytest.raises(ProtocolError, match="cut short"):
        decode_one(body[:-1])
    with pytest.raises(ProtocolError, match="trailing"):
        decode_one(body + b"\x00")
    with pytest.raises(MessageTooBig):
        decode_one(body, max_message=len(body) - 1)
    with pytest.raises(ProtocolError, match="unknown frame type"):
        decode_one(b"\x7f" + body[1:])


def test_numpy_arrays_decode_writable() -> None:
    np = pytest.importorskip("numpy")
    arr = np.arange(100_000, dtype="<u4")
    parts = frames.encode_value_frame(frames.DATA, "img", arr)
    r = Reassembler(max_message=1 << 20)
    body = [r.feed("s", m) for m in split_parts(Chunker(64 * 1024), parts)][-1]
    out = decode_one(body).value()
    assert np.array_equal(out, arr) and out.flags.writeable
    small = decode_one(frame_bytes(frames.encode_value_frame(frames.DATA, "v", arr[:10])))
    assert small.value().flags.writeable


@given(
    sizes=st.lists(st.integers(1, 700), min_size=1, max_size=10),
    drop=st.sets(st.integers(0, 80), max_size=12),
    payload=st.integers(CHUNK_HEADER_SIZE + 20, 200),
)
@settings(max_examples=200)
def test_any_partial_loss_is_reported_exactly_once(sizes: list, drop: set, payload: int) -> None:
    """Drop any chunks of a stream: every message is delivered intact, or reported lost
    exactly once if some (not all) of its chunks arrived; nothing else comes out."""
    chunker = Chunker(payload, sender=3)
    stream = []  # (message index, body of NATS message)
    bodies = []
    for i, n in enumerate(sizes):
        body = bytes([16 + i]) * n
        bodies.append(body)
        stream.extend((i, m) for m in chunker.split(body))
    kept = [(i, m) for k, (i, m) in enumerate(stream) if k not in drop]
    r = Reassembler(max_message=10_000, timeout=1.0)
    delivered = []
    for _, m in kept:
        out = r.feed("s", m, now=0.0)
        if out is not None:
            delivered.append(bytes(out))
    r.expire(now=5.0)
    per_msg = {i: [k for k, (j, _) in enumerate(stream) if j == i] for i in range(len(sizes))}
    intact = [i for i in range(len(sizes)) if not set(per_msg[i]) & drop]
    partial = [
        i
        for i in range(len(sizes))
        if set(per_msg[i]) & drop and set(per_msg[i]) - drop and len(per_msg[i]) > 1
    ]
    assert delivered == [bodies[i] for i in intact]
    # Message ids count from 1 in split() order; only chunked messages have one.
    chunked = [i for i in range(len(sizes)) if len(per_msg[i]) > 1]
    mid = {i: n + 1 for n, i in enumerate(chunked)}
    assert sorted(loss.message_id for loss in r.losses) == sorted(mid[i] for i in partial)
    assert r.pending_bytes == 0
