"""The connection engine's rules, in memory: no sockets, no threads, no event loop.

Two engines (a client and a host) are wired back to back; bytes move between them
only when a test says so, and fed in every chunking, so each rule is checked at
every boundary.
"""

from __future__ import annotations

import logging
from typing import Any, List, Optional, Tuple

import msgpack
import pytest
from engine_feed import feed
from hypothesis import given, settings
from hypothesis import strategies as st

from socketengine import frames
from socketengine.engine import BYE_FRAME, OWED_MAX, ConnectionEngine, ConnState, Tick
from socketengine.errors import ConnectionClosed, ProtocolError, RemoteError
from socketengine.limits import check_settings
from socketengine.protocol import Protocol, Role
from socketengine.requests import RequestTable
from socketengine.sendqueue import (
    BURST_GAP,
    ITEM_OVERHEAD,
    STAGE_HEADROOM,
    SendQueue,
    rack_frame,
)
from socketengine.state import Backoff, Departed, RetainedValues, SubscriptionBuffer


def _engine(role: Role, now: float = 0.0, heartbeat: Optional[float] = 5.0) -> ConnectionEngine:
    return ConnectionEngine(
        Protocol(role, name="c" if role is Role.CLIENT else None, heartbeat=heartbeat),
        peer=role.value,
        max_buffer=1 << 20,
        heartbeat=heartbeat,
        handshake_timeout=10.0,
        now=now,
    )


_feed = feed


def _open_pair(chunk: int = 1 << 16) -> Tuple[ConnectionEngine, ConnectionEngine]:
    client, host = _engine(Role.CLIENT), _engine(Role.HOST)
    for _ in range(4):
        _feed(host, client.control_bytes(), chunk)
        _feed(client, host.control_bytes(), chunk)
    assert client.state is ConnState.OPEN and host.state is ConnState.OPEN
    return client, host


def _types(data: bytes) -> List[int]:
    """Frame types in a post-handshake byte stream."""
    out, off = [], 0
    while off < len(data):
        t, _, ch, _, meta, body = frames.HEADER.unpack_from(data, off)
        out.append(t)
        off += frames.HEADER_SIZE + ch + meta + body
    return out


@pytest.mark.parametrize("chunk", [1, 2, 7, 16, 64, 1 << 16])
def test_handshake_opens_both_sides_at_every_chunk_boundary(chunk: int) -> None:
    client, host = _open_pair(chunk)
    assert host.protocol.peer_name == "c"
    # protocol 1.1: each side learned the other's heartbeat from the handshake
    assert client.protocol.peer_heartbeat == 5.0 and host.protocol.peer_heartbeat == 5.0


def test_states_move_only_along_allowed_transitions() -> None:
    engine = _engine(Role.CLIENT)
    engine.finish()
    assert engine.state is ConnState.CLOSED
    with pytest.raises(RuntimeError):
        engine._to(ConnState.OPEN)


@pytest.mark.parametrize("chunk", [1, 5, 1 << 16])
def test_nothing_is_sent_after_our_bye_not_even_a_pong(chunk: int) -> None:
    client, host = _open_pair()
    bye = client.send_bye(now=1.0, linger=2.0)
    assert bye == BYE_FRAME and client.state is ConnState.CLOSING
    assert not client.writable
    with pytest.raises(ConnectionClosed):
        client.check_writable()
    # The host pings the closing client; the client must not answer.
    _feed(client, host.ping(now=1.0), chunk)
    assert client.control_bytes() == b""
    assert client.ping(now=2.0) == b""
    assert client.send_bye(now=2.0, linger=2.0) == b""  # idempotent


def test_a_peer_bye_ends_its_frames_and_makes_eof_graceful() -> None:
    client, host = _open_pair()
    value = frames.encode_value_frame(frames.DATA, "x", 1)
    stream = b"".join(value) + BYE_FRAME + b"".join(value)
    got = _feed(host, stream, 3)
    handled = []
    for frame in got:
        if frame.type == frames.DATA:
            handled.append(frame.value())
            continue
        if host.control(frame):
            break
    assert handled == [1]
    assert host.bye_received and host.state is ConnState.CLOSING
    assert host.receive_eof() is True


def test_eof_without_bye_is_a_loss() -> None:
    client, host = _open_pair()
    assert host.receive_eof() is False


def test_heartbeat_pings_a_peer_that_only_streams_to_us_and_keeps_a_pinging_peer() -> None:
    """The 1.0 rule pinged only when we had *sent* nothing; a client that only
    receives was then declared dead.  Now: PING when nothing was received (or sent)
    for H, and a peer that answers PINGs is never dead."""
    client, host = _open_pair()
    H = 5.0
    now = 0.0
    for step in range(40):  # 100 s of a host that streams and a client that only listens
        now += H / 2
        host.sent(now)  # the host streams: it always sends
        verdict = host.tick(now)
        assert verdict is not Tick.DEAD, f"declared dead at step {step}"
        if verdict is Tick.PING:
            _feed(client, host.ping(now), 1 << 16)
            pong = client.control_bytes()
            assert _types(pong) == [frames.PONG]
            host.received(now)  # the pong arrives
    # Silence from the peer for 3H is death.
    assert host.tick(now + 3 * H + 0.1) is Tick.DEAD
    assert "declared dead" in str(host.error)


def test_answers_owed_to_a_peer_that_does_not_read_are_bounded() -> None:
    """PONGs (and ACKs) queued while more than max_buffer waits unsent are counted;
    past OWED_MAX the peer is asking without reading: ProtocolError.  The count starts
    again whenever the peer has read us back under the bound."""
    client, host = _open_pair()
    unsent = [0]
    host.unsent = lambda: unsent[0]
    ping = b"".join(frames.encode_frame(frames.PING))
    answers = OWED_MAX // 16
    _feed(host, ping * answers, 4096)  # under max_buffer: nothing is counted
    assert host.owed == 0 and _types(host.control_bytes()) == [frames.PONG] * answers
    unsent[0] = (1 << 20) + 1  # the peer stopped reading
    _feed(host, ping * (answers - 1), 4096)
    assert host.owed == OWED_MAX - 16
    unsent[0] = 0  # it read everything: a new count
    _feed(host, ping, 4096)
    assert host.owed == 0
    unsent[0] = (1 << 20) + 1
    _feed(host, ping * answers, 4096)
    with pytest.raises(ProtocolError, match="without reading"):
        _feed(host, ping, 4096)
    # SYNC frames are counted the same way (their ACKs).
    sync = b"".join(frames.encode_frame(frames.SYNC, fid=1))
    client, host = _open_pair()
    host.unsent = lambda: (1 << 20) + 1
    with pytest.raises(ProtocolError, match="PING/SYNC"):
        for _ in range(answers + 1):
            for frame in _feed(host, sync, 4096):
                host.control(frame)


def test_paused_reading_suspends_the_dead_peer_rule() -> None:
    _, host = _open_pair()
    assert host.tick(100.0, reading_paused=True) is not Tick.DEAD


def test_handshake_deadline_and_linger_are_ticks() -> None:
    engine = _engine(Role.HOST, now=0.0)
    assert engine.next_deadline() == 10.0
    assert engine.tick(9.9) is Tick.NOTHING
    assert engine.tick(10.0) is Tick.HANDSHAKE_TIMEOUT
    client, _ = _open_pair()
    client.send_bye(now=0.0, linger=1.5)
    assert client.next_deadline() == 1.5
    assert client.tick(1.5) is Tick.LINGER_OVER


class _Sink:
    def __init__(self) -> None:
        self.result: Any = None
        self.error: Optional[BaseException] = None
        self.finished = False

    def done(self) -> bool:
        return self.finished

    def set_result(self, result: Any) -> None:
        self.result, self.finished = result, True

    def set_exception(self, exception: BaseException) -> None:
        self.error, self.finished = exception, True


def test_requests_ids_replies_errors_and_close() -> None:
    table: RequestTable[_Sink] = RequestTable()
    a, b, c = _Sink(), _Sink(), _Sink()
    ra, rb, rc = table.open(a), table.open(b), table.open(c)
    assert len({ra, rb, rc}) == 3 and 0 not in (ra, rb, rc)
    decoder = frames.FrameDecoder(1 << 20, 4096, expect_preamble=False)
    data = b"".join(
        [
            *frames.encode_value_frame(frames.REPLY, "q", 42, fid=ra),
            *frames.encode_value_frame(frames.REPLY_ERROR, "q", "boom", fid=rb),
            *frames.encode_value_frame(frames.REPLY, "q", 1, fid=999),  # unknown: ignored
        ]
    )
    buf = decoder.get_buffer()
    buf[: len(data)] = data
    buf.release()
    decoder.buffer_updated(len(data))
    for frame in decoder.take():
        table.resolve(frame)
    assert a.result == 42
    assert isinstance(b.error, RemoteError) and "boom" in str(b.error)
    table.fail_all(ConnectionClosed("gone"))
    assert isinstance(c.error, ConnectionClosed)
    assert len(table) == 0


def test_an_answer_of_the_wrong_kind_for_an_id_is_ignored() -> None:
    # Requests and SYNCs share one id space: a peer's ACK naming a request, or REPLY
    # naming a SYNC, must not answer it.
    table: RequestTable[_Sink] = RequestTable()
    request, sync = _Sink(), _Sink()
    rid, sid = table.open(request), table.open(sync)
    table.expect_ack(sid)  # what ConnectionEngine.sync_frame does
    assert not table.acknowledge(rid)
    reply = frames.Frame(frames.REPLY, 0, "q", sid, msgpack.packb(5), None)
    assert not table.resolve(reply)
    assert not request.finished and not sync.finished
    assert table.acknowledge(sid) and sync.result is True
    assert table.resolve(frames.Frame(frames.REPLY, 0, "q", rid, msgpack.packb(7), None))
    assert request.result == 7 and len(table) == 0


def test_engine_finish_fails_outstanding_requests() -> None:
    client, _ = _open_pair()
    sink = _Sink()
    client.requests.open(sink)
    client.finish()
    assert isinstance(sink.error, ConnectionClosed)


def test_send_queue_orders_conflates_and_bounds() -> None:
    sent: List[Tuple[str, int]] = []
    q = SendQueue(max_buffer=100, on_image=lambda ch, n: sent.append((ch, n)))
    q.push([b"a" * 10], 10)
    q.push([b"i1" * 10], 20, image="cam")
    q.push([b"b" * 10], 10)
    assert not q.push([b"i2" * 10], 20, image="cam")  # replaced, keeps its turn
    assert q.images_sent == 1 and q.images_dropped == 1 and sent == [("cam", -1)]
    assert q.queued == 40
    assert q.fits(60) and not q.fits(61)
    assert SendQueue(0).fits(10**9)  # an empty queue takes any frame
    out = b"".join(bytes(p) for p in q.take_all())
    assert out == b"a" * 10 + b"i2" * 10 + b"b" * 10
    assert sent[-1] == ("cam", 20) and q.queued == 0


def _flush(q: SendQueue) -> None:
    q.to_wire(q.take_inbox())


def test_send_queue_partial_sends_keep_the_tail() -> None:
    q = SendQueue(1 << 20)
    q.push([b"hello", b"world"], 10)
    _flush(q)
    batch = q.wire_batch(512)
    assert [bytes(b) for b in batch] == [b"hello", b"world"]
    q.consumed(7)
    assert [bytes(b) for b in q.wire_batch(512)] == [b"rld"] and q.queued == 3


def test_the_burst_rule_a_write_after_a_quiet_gap_goes_at_once() -> None:
    # Both I/O layers ask the queue (sendqueue.BURST_GAP): a write more than the gap
    # after the previous one is sent at once, one within it joins the burst.
    q = SendQueue(1 << 20)
    t = 1000.0
    assert q.quiet(t) and q.opens_burst(t)  # a new queue: quiet
    assert q.last_write == t
    assert not q.quiet(t + BURST_GAP / 2)
    assert not q.opens_burst(t + BURST_GAP / 2)  # joins; the burst goes on from here
    assert not q.opens_burst(t + BURST_GAP)  # within the gap of the previous write
    assert q.quiet(t + 2.5 * BURST_GAP)
    assert q.opens_burst(t + 2.5 * BURST_GAP)
    q.last_write = t + 10.0  # a flush stamps the queue: a write right after it joins
    assert not q.quiet(t + 10.0 + BURST_GAP / 2)


def test_the_burst_rule_an_answer_goes_at_once_even_within_the_gap() -> None:
    # A ping-pong faster than BURST_GAP (a reply, an echo, the next request) must not
    # wait for a flush on the I/O thread: application frames from the peer since this
    # side's last write make the next write go at once.  Link-level frames (PING) and
    # the handshake do not.
    client, host = _open_pair()
    q = host.queue
    assert not q.answering  # the handshake is not something to answer
    t = 1000.0
    assert q.opens_burst(t)
    _feed(host, client.ping(t), 1 << 16)
    assert not q.answering and not q.quiet(t + BURST_GAP / 4)  # a PING: still the burst
    data = b"".join(bytes(p) for p in frames.encode_value_frame(frames.DATA, "ping", 1))
    assert [f.channel for f in _feed(host, data, 7)] == ["ping"]
    assert q.answering and q.quiet(t + BURST_GAP / 4)
    assert q.opens_burst(t + BURST_GAP / 4)  # the answer: at once, from the writer
    assert not q.answering
    assert not q.opens_burst(t + BURST_GAP / 2)  # a second write: the burst's again
    _feed(host, data, 1 << 16)
    q.last_write = t + 1.0  # a flush on the I/O thread does not count as the answer
    assert q.quiet(t + 1.0 + BURST_GAP / 4)
    q.wrote(t + 1.0 + BURST_GAP / 4)  # a writer's own send does
    assert not q.answering and not q.quiet(t + 1.0 + BURST_GAP / 2)


def _decode_all(data: bytes) -> List[Tuple[str, Any]]:
    decoder = frames.FrameDecoder(1 << 20, 4096, expect_preamble=False)
    out: List[Tuple[str, Any]] = []
    for frame in decoder.feed(data):
        if frame.type == frames.BATCH:
            items = frame.items()
            out.extend(zip(items[0::2], items[1::2]))
        else:
            assert frame.type == frames.DATA
            out.append((frame.channel, frame.value()))
    return out


@pytest.mark.parametrize("batch_limit", [0, 40, 1 << 16])
def test_items_become_batch_frames_only_for_peers_that_read_them(batch_limit: int) -> None:
    q = SendQueue(1 << 20)
    q.batch_limit = batch_limit
    values = [("a", 1), ("b/c", "x" * 10), ("é" * 40, [1, 2.0]), ("a", None)]
    for channel, value in values:
        item = frames.value_item(channel, value)
        assert type(item) is bytes
        q.push_item(item)
    q.push(frames.encode_value_frame(frames.DATA, "big", b"\0" * 5000), 5000 + 21)
    q.push_item(frames.value_item("z", 9))  # type: ignore[arg-type]
    wire = b"".join(bytes(p) for p in q.take_all())
    assert _decode_all(wire) == [*values, ("big", b"\0" * 5000), ("z", 9)]
    decoder = frames.FrameDecoder(1 << 20, 4096, expect_preamble=False)
    types = [f.type for f in decoder.feed(wire)]
    if batch_limit == 0:
        assert frames.BATCH not in types  # a 1.0 peer never gets one
    elif batch_limit == 1 << 16:
        assert types == [frames.BATCH, frames.DATA, frames.DATA]
    else:
        assert types.count(frames.BATCH) == 1 and len(types) == 5  # split at the limit
        for frame in frames.FrameDecoder(1 << 20, 4096, expect_preamble=False).feed(wire):
            if frame.type == frames.BATCH:
                assert len(frame.meta) <= batch_limit


def test_staged_items_join_the_inbox_in_order_counted_before_anything_else() -> None:
    # The threaded layer stages burst items without its lock; whatever reads or changes
    # the inbox first moves them to its end, counted, so the order is the pushing order.
    q = SendQueue(1 << 20)
    q.batch_limit = 1 << 16
    item = [frames.value_item("s", i) for i in range(4)]
    q.push_item(frames.value_item("a", 0))  # type: ignore[arg-type]
    q.staged.extend(item[:2])  # what writers append without the lock
    assert q and q.queued == len(frames.value_item("a", 0)) + ITEM_OVERHEAD
    q.push(frames.encode_value_frame(frames.DATA, "b", 1), 0)  # unstages first
    q.staged.append(item[2])
    assert q.fits(1) and len(q.staged) == 0  # counted before the budget says
    q.staged.append(item[3])
    wire = b"".join(bytes(p) for p in q.take_all())
    assert _decode_all(wire) == [("a", 0), ("s", 0), ("s", 1), ("b", 1), ("s", 2), ("s", 3)]
    assert q.queued == 0 and not q.staged
    assert q.stage_below == (1 << 20) - STAGE_HEADROOM
    assert SendQueue(STAGE_HEADROOM - 1).stage_below < 0  # too small a buffer: never


def test_a_staged_item_taken_back_or_carried_to_the_next_link() -> None:
    old = SendQueue(1 << 20)
    mine, theirs = frames.value_item("x", 1), frames.value_item("x", 1)  # equal, distinct
    assert mine == theirs and mine is not theirs
    old.staged.extend([theirs, mine])
    assert old.unstage_own(mine) and list(old.staged) == [theirs]  # by identity
    assert not old.unstage_own(mine)
    new = SendQueue(1 << 20)
    new.take_over(old)  # a resumed session carries what was staged
    assert not old.staged and old.queued == 0
    assert new.queued == len(theirs) + ITEM_OVERHEAD
    assert _decode_all(b"".join(bytes(p) for p in new.take_all())) == [("x", 1)]
    dropped = SendQueue(1 << 20)
    dropped.staged.append(mine)
    assert dropped.clear() == len(mine) + ITEM_OVERHEAD and not dropped.staged


def test_queued_bytes_return_to_zero_after_batching() -> None:
    q = SendQueue(1 << 20)
    q.batch_limit = 1 << 16
    for i in range(100):
        q.push_item(frames.value_item("c", i))  # type: ignore[arg-type]
    _flush(q)
    total = sum(len(b) for b in q.wire_batch(1000))
    assert q.queued == total
    q.consumed(total)
    assert q.queued == 0 and not q


@pytest.mark.parametrize(
    "body",
    [
        b"\x01",  # channel is not a string
        b"\xa1a",  # a channel without its value
        b"\xa1a\x92\x01",  # a truncated value
        b"\xa1a\xc7\x01\x01\x00",  # an array (ext 1) without a data section
        b"\xa1a\xc1",  # a reserved byte
    ],
)
def test_malformed_batch_bodies_are_protocol_errors(body: bytes) -> None:
    from socketengine.errors import ProtocolError

    frame = b"".join(frames.encode_frame(frames.BATCH, "", body))
    (decoded,) = frames.FrameDecoder(1 << 20, 4096, expect_preamble=False).feed(frame)
    with pytest.raises(ProtocolError):
        decoded.items()
    with pytest.raises(ProtocolError):
        decoded.last_items()  # a receiver that keeps only the last values


def test_batch_limit_follows_the_handshake() -> None:
    client, host = _open_pair()
    assert client.queue.batch_limit == host.queue.batch_limit == 64 * 1024
    old = _engine(Role.HOST)
    old.protocol.peer_batch = False  # what a 1.0 peer's HELLO gives
    old._negotiate()
    assert old.queue.batch_limit == 0


def test_batch_to_a_peer_that_did_not_ask_closes_the_connection() -> None:
    from socketengine.errors import ProtocolError

    _, host = _open_pair()
    frame = b"".join(frames.encode_frame(frames.BATCH, "", b"\xa1a\x01"))
    (decoded,) = frames.FrameDecoder(1 << 20, 4096, expect_preamble=False).feed(frame)
    with pytest.raises(ProtocolError):
        host.control(decoded)


def test_send_queue_slow_consumer_verdict() -> None:
    q = SendQueue(max_buffer=100)
    q.push([b"x" * 100], 100)
    assert not q.slow_consumer(50, now=0.0, timeout=2.0)  # over, but just now
    assert not q.slow_consumer(50, now=1.0, timeout=2.0)
    assert q.slow_consumer(50, now=2.5, timeout=2.0)  # over for longer than timeout
    q2 = SendQueue(max_buffer=100)
    q2.push([b"x" * 100], 100)
    assert q2.slow_consumer(101, now=0.0, timeout=2.0)  # would exceed twice max_buffer


def test_outbox_absorbed_into_a_new_connection_keeps_images_replaceable() -> None:
    outbox, conn = SendQueue(1 << 20), SendQueue(1 << 20)
    outbox.push([b"v1"], 2)
    outbox.push([b"f1"], 2, image="cam")
    conn.absorb(outbox)
    assert not outbox and conn.queued == 4
    assert not conn.push([b"f2"], 2, image="cam")
    assert b"".join(bytes(p) for p in conn.take_all()) == b"v1f2"


def test_retained_values_are_snapshots() -> None:
    np = pytest.importorskip("numpy")
    arr = np.arange(10, dtype=np.uint8)
    parts, _ = frames.value_frame(frames.DATA, "cfg", arr)
    retained = RetainedValues()
    retained.retain("cfg", parts)
    arr[:] = 99  # the application changes the array afterwards
    (frame,) = retained.replay()
    decoder = frames.FrameDecoder(1 << 20, 4096, expect_preamble=False)
    buf = decoder.get_buffer()
    buf[: len(frame)] = frame
    buf.release()
    decoder.buffer_updated(len(frame))
    (got,) = decoder.take()
    assert got.flags & frames.FLAG_RETAINED
    assert list(got.value()) == list(range(10))


def test_relayed_retained_values_are_bounded_in_bytes_least_recent_first(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def parts(channel: str, size: int) -> List[Any]:
        return frames.value_frame(frames.DATA, channel, b"x" * size)[0]

    size = sum(len(p) for p in parts("c0", 1000))  # one frame of 1,000 bytes
    retained = RetainedValues(relayed_limit=3 * size)
    retained.retain("own", parts("own", 5000))  # the application's: not counted
    for ch in ("c0", "c1", "c2"):
        retained.retain(ch, parts(ch, 1000), relayed=True)
    retained.retain("c0", parts("c0", 1000), relayed=True)  # c0 relayed again: recent
    with caplog.at_level(logging.WARNING, logger="socketengine"):
        retained.retain("c3", parts("c3", 1000), relayed=True)
    assert "c1" not in retained and {"own", "c0", "c2", "c3"} <= set(retained._frames)
    assert retained.relayed_bytes == 3 * size
    assert "retain_relayed_bytes" in caplog.text and "'c1'" in caplog.text
    retained.retain("c2", parts("c2", 10_000), relayed=True)  # alone over the limit
    assert "c2" not in retained and retained.relayed_bytes == 2 * size
    retained.clear("c0")
    assert retained.relayed_bytes == size
    retained.retain("c3", parts("c3", 1000))  # the application retains it: uncounted
    assert retained.relayed_bytes == 0 and len(retained) == 2
    assert [f[len(f) - 1 :] for f in retained.replay()] == [b"x", b"x"]


def test_departed_is_bounded_and_forgets_returning_names() -> None:
    class C:
        def __init__(self, name: str) -> None:
            self.name = name

    d: Departed[int, C] = Departed(2)
    for i in range(5):
        d.add(i, C(f"n{i}"))
    assert [k for k, _ in d.items()] == [3, 4]
    d.forget_named("n4")
    assert [k for k, _ in d.items()] == [3]


def test_subscription_watermarks_and_close_keeps_items() -> None:
    buf: SubscriptionBuffer[int] = SubscriptionBuffer(4)
    src = object()
    assert [buf.put(i, src) for i in range(4)] == [False, False, False, True]
    item, released = buf.take()
    assert item == 0 and released == []
    _, released = buf.take()
    assert released == [src]  # down to half: the paused source goes on
    buf.close()
    assert not buf.put(99, src)
    assert list(buf.items) == [2, 3] and not buf.exhausted


def test_backoff_is_exponential_capped_and_jittered() -> None:
    for _ in range(20):
        delays = Backoff(5.0, first=0.02)
        got = [next(delays) for _ in range(12)]
        nominal = [min(0.02 * 2**i, 5.0) for i in range(12)]
        for delay, base in zip(got, nominal):
            assert base * 0.8 <= delay <= base * 1.2
    assert len({round(next(Backoff(5.0, first=1.0)), 6) for _ in range(50)}) > 10


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"port": -1}, ValueError),
        ({"port": "8080"}, ValueError),
        ({"timeout": -1}, ValueError),
        ({"max_message": 10}, ValueError),
        ({"max_buffer": -1}, ValueError),
        ({"heartbeat": 0}, ValueError),
        ({"handshake_timeout": 0}, ValueError),
        ({"tls": "yes"}, TypeError),
        ({"token": 5}, TypeError),
    ],
)
def test_settings_refuse_bad_values(kwargs: Any, error: type) -> None:
    base = dict(
        port=0,
        timeout=2,
        max_message=1 << 20,
        max_buffer=0,
        handshake_timeout=10,
        heartbeat=None,
        tls=None,
        token=None,
    )
    base.update(kwargs)
    with pytest.raises(error):
        check_settings(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("chunk", [1, 3, 1 << 16])
def test_sync_is_answered_by_ack_after_what_came_before(chunk: int) -> None:
    client, host = _open_pair()
    sink = _Sink()
    rid = client.requests.open(sink)
    stream = b"".join(frames.encode_value_frame(frames.DATA, "v", 7)) + client.sync_frame(rid)
    stored = []
    for frame in _feed(host, stream, chunk):
        if frame.type == frames.DATA:
            stored.append(frame.value())
        else:
            assert not host.control(frame)
    assert stored == [7]
    ack = host.control_bytes()
    assert _types(ack) == [frames.ACK]
    for frame in _feed(client, ack, chunk):
        client.control(frame)
    assert sink.result is True and len(client.requests) == 0


def test_taken_items_are_framed_a_chunk_at_a_time() -> None:
    # A full queue of small items is framed WIRE_CHUNK bytes at a time: the rest waits
    # (unframed) and the inbox is not taken before it is all framed, in order.
    from socketengine.sendqueue import WIRE_CHUNK

    q = SendQueue(1 << 30)
    q.batch_limit = 1 << 16
    values = [("c", [i, "x" * 100]) for i in range(3 * WIRE_CHUNK // 100)]
    for channel, value in values:
        q.push_item(frames.value_item(channel, value))  # type: ignore[arg-type]
    q.push(frames.encode_value_frame(frames.DATA, "big", b"\0" * 5000), 5000 + 21)
    q.to_wire(q.take_inbox())
    assert q.unframed and q.wire_pending
    first = q.wire_batch(1000)
    framed = sum(len(b) for b in first)
    assert framed <= WIRE_CHUNK + (1 << 16) + 16
    q.push_item(frames.value_item("late", 1))  # type: ignore[arg-type]
    wire = b"".join(bytes(b) for b in first)
    q.consumed(framed)
    assert q.unframed and not q.wire_pending and q
    wire += b"".join(bytes(p) for p in q.take_all())
    assert _decode_all(wire) == [*values, ("big", b"\0" * 5000), ("late", 1)]
    assert q.queued == 0 and not q


def test_a_queue_that_drained_starts_a_new_slow_consumer_clock() -> None:
    # A peer that was above max_buffer once, caught up, and is briefly above it again
    # much later is not a slow consumer (the threaded layer asks for a verdict only
    # when a broadcast does not fit, so draining must reset the clock).
    q = SendQueue(max_buffer=100)
    q.push([b"x" * 150], 150)
    assert not q.slow_consumer(50, now=0.0, timeout=2.0)
    _flush(q)
    q.consumed(150)
    assert q.queued == 0 and q.full_for == 0.0
    q.push([b"y" * 150], 150)
    assert not q.slow_consumer(50, now=60.0, timeout=2.0)  # over since now, not since 0
    assert q.slow_consumer(50, now=62.5, timeout=2.0)


def test_offer_item_queues_only_what_fits() -> None:
    from socketengine.sendqueue import ITEM_OVERHEAD

    item = frames.value_item("c", "x" * 100)
    assert type(item) is bytes
    cost = len(item) + ITEM_OVERHEAD
    q = SendQueue(max_buffer=2 * cost)
    assert q.offer_item(item) and q.offer_item(item) and q.queued == 2 * cost
    assert not q.offer_item(item) and q.queued == 2 * cost  # full: nothing queued
    assert SendQueue(0).offer_item(item)  # an empty queue takes any item
    q.batch_limit = 1 << 16
    wire = b"".join(bytes(p) for p in q.take_all())
    assert _decode_all(wire) == [("c", "x" * 100)] * 2 and q.queued == 0


@settings(max_examples=120, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("item"), st.integers(0, 4000)),
            st.tuples(st.just("frame"), st.integers(0, 3000)),
            st.tuples(st.just("image"), st.integers(1, 3)),
        ),
        max_size=1500,
    ),
    st.sampled_from([40, 300, 5000, 1 << 16]),
    st.booleans(),
)
def test_framing_keeps_order_limits_and_byte_counts(
    entries: List[Tuple[str, int]], batch_limit: int, numbered: bool
) -> None:
    # Items are framed a window at a time (sized, split and joined in C) and frames or
    # image slots among them entry by entry: whatever the mix, the peer decodes every
    # value in order, no BATCH body exceeds the limit and the byte count returns to 0.
    q = SendQueue(1 << 30)
    q.batch_limit = batch_limit
    q.numbered = numbered
    want: List[Tuple[str, Any]] = []
    for i, (kind, size) in enumerate(entries):
        if kind == "item":
            item = frames.value_item("c", [i, "x" * size])
            assert type(item) is bytes
            q.push_item(item)
            want.append(("c", [i, "x" * size]))
        elif kind == "frame":
            parts = frames.encode_value_frame(frames.DATA, "f", b"\1" * size)
            q.push(parts, frames.frame_size(parts))
            want.append(("f", b"\1" * size))
        else:
            parts = frames.encode_value_frame(frames.DATA, f"img{size}", i)
            q.push(parts, frames.frame_size(parts), image=f"img{size}")
            want.append((f"img{size}", i))
    wire = b""
    for _ in range(10000):
        q.to_wire([] if q.unframed else q.take_inbox())
        sent = q.wire_batch(1 << 20)
        if not sent and not q.unframed:
            break
        n = sum(len(b) for b in sent)
        wire += b"".join(bytes(b) for b in sent)
        q.consumed(n)
    assert q.queued == 0 and not q
    got = _decode_all(wire)
    # A newer image on the same channel replaced a waiting one (conflation).
    latest = {ch: v for ch, v in want if ch.startswith("img")}
    assert [p for p in got if not p[0].startswith("img")] == [
        p for p in want if not p[0].startswith("img")
    ]
    assert {ch: v for ch, v in got if ch.startswith("img")} == latest
    for frame in frames.FrameDecoder(1 << 20, 4096, expect_preamble=False).feed(wire):
        if frame.type == frames.BATCH:
            assert len(frame.meta) <= batch_limit


@pytest.mark.parametrize("off", [0, 0.0])
def test_resume_window_zero_turns_resume_off_as_int_or_float(off: float) -> None:
    from socketengine.limits import check_host_limits

    base: Any = {"max_clients": 10, "keep_departed": 10, "backlog": 10}
    assert check_host_limits(**base, resume_window=off).resume_window == 0.0
    for bad in (-1, -0.5, True, "0"):
        with pytest.raises((TypeError, ValueError)):
            check_host_limits(**base, resume_window=bad)


def _interest_frame(meta: bytes) -> frames.Frame:
    frame = b"".join(frames.encode_frame(frames.INTEREST, "", meta))
    (decoded,) = frames.FrameDecoder(1 << 24, 4096, expect_preamble=False).feed(frame)
    return decoded


def test_an_interest_frame_beyond_the_protocol_limits_is_a_protocol_error() -> None:
    # After the handshake a peer may re-send INTEREST at will: one beyond the limits is
    # refused (the connection is closed by the layer) and the interest in force stays.
    from socketengine.errors import ProtocolError
    from socketengine.limits import PRE_HANDSHAKE_MAX
    from socketengine.patterns import MAX_INTEREST_BYTES, MAX_INTEREST_KEYS, Interest, Pattern

    _, host = _open_pair()
    host.control(_interest_frame(msgpack.packb([{"p": "a/+"}, {"c": "b"}])))
    assert host.interest == Interest([Pattern("a/+"), "b"])
    too_many = [{"c": f"{i:x}"} for i in range(MAX_INTEREST_KEYS + 1)]
    with pytest.raises(ProtocolError, match=f"MAX_INTEREST_KEYS={MAX_INTEREST_KEYS}"):
        host.control(_interest_frame(msgpack.packb(too_many)))
    too_long = [{"p": f"{i:x}" + "/" * 200} for i in range(MAX_INTEREST_BYTES // 200)]
    with pytest.raises(ProtocolError, match=f"MAX_INTEREST_BYTES={MAX_INTEREST_BYTES}"):
        host.control(_interest_frame(msgpack.packb(too_long)))
    # larger than a handshake frame: refused from its size, never decoded (these bytes
    # would not even decode)
    with pytest.raises(ProtocolError, match="PRE_HANDSHAKE_MAX"):
        host.control(_interest_frame(b"\xc1" * (PRE_HANDSHAKE_MAX + 1)))
    assert host.interest == Interest([Pattern("a/+"), "b"])


@pytest.mark.parametrize("batch_limit", [0, 1 << 16])
def test_a_write_many_is_queued_in_order_and_counted_once(batch_limit: int) -> None:
    from socketengine.sendqueue import ITEM_OVERHEAD, values_size

    q = SendQueue(1 << 20)
    q.batch_limit = batch_limit  # 0: a 1.0 peer, every item becomes a DATA frame
    pairs = [("a", 1), ("big", b"\0" * 5000), ("b", "x"), ("a", 2)]
    encoded = frames.value_items(pairs)
    assert encoded.frames == 1
    size = values_size(encoded)
    assert size == sum(len(e) + ITEM_OVERHEAD if type(e) is bytes else e[1] for e in encoded)
    items_only = frames.value_items([("a", 1), ("b", "x")])
    assert items_only.frames == 0
    assert values_size(items_only) == sum(len(e) + ITEM_OVERHEAD for e in items_only)
    q.push_values(encoded, size)
    q.push_values(items_only, values_size(items_only))
    assert q.queued == size + values_size(items_only)
    wire = b"".join(bytes(p) for p in q.take_all())
    assert _decode_all(wire) == [*pairs, ("a", 1), ("b", "x")]
    types = [f.type for f in frames.FrameDecoder(1 << 20, 4096, expect_preamble=False).feed(wire)]
    if batch_limit == 0:
        assert frames.BATCH not in types
    else:
        assert frames.BATCH in types


def _queue_state(q: SendQueue) -> Tuple[Any, ...]:
    wire = b"".join(bytes(b) for b in q.wire_batch(1 << 20))
    replay = [(r[0], r[2], r[3]) for r in q._replay]
    return wire, q.queued, q.seq, q.replay_bytes, replay, q.held_back, bool(q)


@pytest.mark.parametrize("numbered", [False, True])
def test_a_lone_frame_on_an_idle_queue_goes_straight_to_the_wire(numbered: bool) -> None:
    """``push_direct`` (``push_item_direct``) does in one step what push (push_item),
    take_inbox and to_wire do with a lone frame (item): the same wire bytes, byte
    counts, numbering and replay buffer."""
    direct, staged_path = SendQueue(1 << 20), SendQueue(1 << 20)
    frames_sent = [
        frames.value_frame(frames.REQUEST, "ping", [1, "x" * 100], fid=7),
        frames.value_frame(frames.DATA, "big", ["y" * 5000]),  # numbered when resumable
        ([rack_frame(3)], frames.HEADER_SIZE),  # link-level: never numbered
        frames.value_frame(frames.REPLY, "ping", [1, "x" * 100], fid=7),
    ]
    item = frames.value_item("pong", [2, "z" * 50])
    assert type(item) is bytes
    frames_sent.insert(2, (item, 0))  # a BATCH item, alone: a DATA frame, numbered
    for q in (direct, staged_path):
        q.numbered = numbered
        q.batch_limit = 1 << 16  # a peer that reads BATCH frames: still one DATA frame
    for parts, nbytes in frames_sent:
        if type(parts) is bytes:
            assert direct.push_item_direct(parts)
            staged_path.push_item(parts)
        else:
            assert direct.push_direct(parts, nbytes)
            staged_path.push(parts, nbytes)
        _flush(staged_path)
        assert _queue_state(direct) == _queue_state(staged_path)
        sent = direct.queued
        for q in (direct, staged_path):
            q.consumed(sent)
        assert _queue_state(direct) == _queue_state(staged_path)
        assert direct.queued == 0 and not direct
    assert direct.seq == (2 if numbered else 0)  # the DATA frames only


def test_push_direct_leaves_a_busy_queue_alone() -> None:
    """Anything queued, staged, taken, on the wire or being framed, or a full replay
    window: ``push_direct`` does nothing and says so (the frame is pushed as usual,
    behind what waits)."""
    parts, nbytes = frames.value_frame(frames.REQUEST, "ping", [1], fid=1)
    item = frames.value_item("a", 1)
    assert type(item) is bytes

    def busy() -> List[SendQueue]:
        inbox, staged, wire, framing, unframed, window = (SendQueue(1 << 20) for _ in range(6))
        inbox.push([b"z" * 8], 8)
        staged.staged.append(item)
        wire.push([b"z" * 8], 8)
        _flush(wire)
        framing.framing = True
        unframed.batch_limit = 1 << 16
        for _ in range(3000):  # more than one WIRE_CHUNK of items: framed in parts
            unframed.push_item(frames.value_item("n", "x" * 200))  # type: ignore[arg-type]
        unframed.to_wire(unframed.take_inbox())
        unframed._wire.clear()  # as if sent: only the unframed rest is left
        assert unframed.unframed
        window.numbered = True
        window.replay_bytes = window.window  # full: the next frame waits for a RACK
        return [inbox, staged, wire, framing, unframed, window]

    def state(q: SendQueue) -> Tuple[Any, ...]:
        return list(q._inbox), list(q.staged), list(q._wire), q.queued, q.seq

    for q in busy():
        before = state(q)
        assert not q.push_direct(parts, nbytes)
        assert state(q) == before
    # Shared memory negotiated: a frame with data sections goes through to_wire, whose
    # copy into shared memory (and its wait for a slot) the threaded flusher makes
    # outside its lock; a frame without them may still go straight to the wire.
    shm = SendQueue(1 << 20)
    shm.shm = object()  # type: ignore[assignment]
    data = bytes(300_000)
    array_frame = [frames.value_frame(frames.DATA, "a", b"")[0][0], data]  # head + section
    array_size = len(array_frame[0]) + len(data)
    assert not shm.push_direct(array_frame, array_size) and not shm._wire
    assert shm.push_direct(parts, nbytes) and shm.queued == nbytes
    for q in busy():
        before = state(q)
        assert not q.push_item_direct(item)
        assert state(q) == before
