"""Resume (protocol 1.2) in memory: sequence numbers, acknowledgements, replay.

Engines are wired back to back as in test_engine.py; a "link failure" is bytes that
never arrive, then both engines finish and new ones take the session over, as the I/O
layers do.  No sockets, no threads.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import pytest
from engine_feed import feed
from hypothesis import given, settings
from hypothesis import strategies as st

from socketengine import frames
from socketengine import requests as requests_mod
from socketengine.engine import ConnectionEngine, ConnState
from socketengine.errors import ConnectionClosed, ProtocolError
from socketengine.protocol import Protocol, Role
from socketengine.sendqueue import WINDOW_MIN, SendQueue, rack_frame, skip_frame
from socketengine.session import ACK_BYTES, ACK_EVERY, Session, SessionTable


def _client(session: Optional[Session], max_buffer: int = 1 << 20) -> ConnectionEngine:
    return ConnectionEngine(
        Protocol(Role.CLIENT, name="c", heartbeat=5.0, resume=session),
        peer="host",
        max_buffer=max_buffer,
        heartbeat=5.0,
        handshake_timeout=10.0,
        now=0.0,
    )


def _host(table: Optional[SessionTable], max_buffer: int = 1 << 20) -> ConnectionEngine:
    return ConnectionEngine(
        Protocol(Role.HOST, heartbeat=5.0, sessions=table),
        peer="client",
        max_buffer=max_buffer,
        heartbeat=5.0,
        handshake_timeout=10.0,
        now=0.0,
    )


CHUNK = [4096]  # bytes fed at a time (a test may change it)


def _feed(engine: ConnectionEngine, data: bytes) -> List[frames.Frame]:
    return feed(engine, data, CHUNK[0])


def _wire(engine: ConnectionEngine) -> bytes:
    """Everything the engine's queue and control output hold, as bytes."""
    return engine.control_bytes() + b"".join(bytes(b) for b in engine.queue.take_all())


def _values(received: List[frames.Frame]) -> List[Any]:
    out: List[Any] = []
    for frame in received:
        if frame.type == frames.DATA:
            out.append(frame.value())
        elif frame.type == frames.BATCH:
            out.extend(frame.items()[1::2])
    return out


def _handshake(
    client: ConnectionEngine, host: ConnectionEngine
) -> Tuple[List[frames.Frame], List[frames.Frame]]:
    """Run the handshake; returns what each side received after it (replays)."""
    to_client: List[frames.Frame] = []
    to_host: List[frames.Frame] = []
    for _ in range(4):
        to_host += _feed(host, client.control_bytes())
        to_client += _feed(client, host.control_bytes())
    assert client.opened and host.opened
    return to_client, to_host


def _write(engine: ConnectionEngine, values: List[Any], channel: str = "n") -> None:
    for v in values:
        item = frames.value_item(channel, v)
        if isinstance(item, bytes):
            engine.queue.push_item(item)
        else:
            engine.queue.push(item[0], item[1])


class Pair:
    """A client and a host that resume across link failures."""

    def __init__(self, max_buffer: int = 1 << 20) -> None:
        self.table = SessionTable(60.0, 8)
        self.session = Session(b"", None, None)
        self.max_buffer = max_buffer
        self.client: ConnectionEngine
        self.host: ConnectionEngine
        self.at_host: List[Any] = []
        self.at_client: List[Any] = []
        self.connect()

    def connect(self) -> None:
        self.client = _client(self.session, self.max_buffer)
        self.host = _host(self.table, self.max_buffer)
        to_client, to_host = _handshake(self.client, self.host)
        assert not to_client and not to_host
        hs = self.host.session
        assert hs is not None
        assert self.host.state is ConnState.HANDSHAKE  # not writable before adopt()
        self.host.adopt(hs.queue)
        hs.owner = self.host
        self.client.adopt(self.session.queue)
        assert self.client.state is ConnState.OPEN and self.host.state is ConnState.OPEN

    def cut(self, to_host: int, to_client: int) -> None:
        """Deliver only this many bytes each way, then lose the link."""
        self.at_host += _values(_feed(self.host, _wire(self.client)[:to_host]))
        self.at_client += _values(_feed(self.client, _wire(self.host)[:to_client]))
        for engine in (self.client, self.host):
            engine.lost(ConnectionError("cut"))
            engine.finish()
        hs = self.host.session
        assert hs is not None
        self.table.suspend(hs, 0.0)

    def exchange(self) -> None:
        for _ in range(3):
            self.at_host += _values(_feed(self.host, _wire(self.client)))
            self.at_client += _values(_feed(self.client, _wire(self.host)))


def test_both_sides_announce_resume_and_number_data() -> None:
    pair = Pair()
    assert pair.client.session is pair.session and pair.session.sid
    assert pair.host.session is not None and pair.host.session.sid == pair.session.sid
    _write(pair.client, list(range(10)))
    pair.exchange()
    assert pair.at_host == list(range(10))
    assert pair.client.queue.seq == 1  # one BATCH frame
    assert pair.host.session.recv == 1


@pytest.mark.parametrize("chunk", [1, 5, 4096])
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_a_cut_loses_nothing_and_duplicates_nothing_both_ways(fraction: float, chunk: int) -> None:
    CHUNK[0] = chunk
    try:
        _cuts(fraction)
    finally:
        CHUNK[0] = 4096


def _cuts(fraction: float) -> None:
    pair = Pair()
    n = 0
    for _ in range(3):  # three cuts
        for i in range(200):
            _write(pair.client, [n + i])
            _write(pair.host, [n + i])
            if i % 7 == 0:  # frames of their own, not one BATCH
                pair.client.queue.to_wire(pair.client.queue.take_inbox())
                pair.host.queue.to_wire(pair.host.queue.take_inbox())
        n += 200
        wire_c = sum(map(len, list(pair.client.queue._wire)))
        pair.cut(int(wire_c * fraction), int(wire_c * fraction))
        pair.connect()
        assert pair.client.protocol.resumed and pair.host.protocol.resumed
    pair.exchange()
    assert pair.at_host == list(range(n))
    assert pair.at_client == list(range(n))


def test_acks_empty_the_replay_buffer() -> None:
    pair = Pair()
    for i in range(ACK_EVERY * 3):
        _write(pair.client, [i])
        pair.client.queue.to_wire(pair.client.queue.take_inbox())
    pair.exchange()
    assert pair.client.queue.seq == ACK_EVERY * 3
    pair.client.queue.to_wire([])  # acknowledged frames leave at the next flush
    assert len(pair.client.queue._replay) == 0 and pair.client.queue.replay_bytes == 0


def test_tick_sends_the_ack_of_a_tail() -> None:
    pair = Pair()
    _write(pair.client, [1, 2, 3])
    pair.exchange()
    assert pair.client.queue.acked == 0
    host = pair.host
    assert host.tick(1.0).value == "ping"
    out = host.ping(1.0)
    assert frames.RACK in _types(out) and frames.PING not in _types(out)
    _feed(pair.client, out)
    assert pair.client.queue.acked == 1


def _types(data: bytes) -> List[int]:
    out, off = [], 0
    while off < len(data):
        t, _, c, _, m, d = frames.HEADER.unpack_from(data, off)
        out.append(t)
        off += frames.HEADER_SIZE + c + m + d
    return out


def test_conflated_images_replay_only_the_newest() -> None:
    pair = Pair()
    q = pair.client.queue
    for i in range(5):
        parts, nbytes = frames.value_frame(frames.DATA, "img", i, flags=frames.FLAG_IMAGE)
        q.push(parts, nbytes, image="img")
        q.to_wire(q.take_inbox())  # each one numbered: it went to the wire
    _write(pair.client, ["after"])
    pair.cut(0, 0)
    pair.connect()
    pair.exchange()
    assert pair.at_host == [4, "after"]
    assert pair.host.session is not None and pair.host.session.recv == 6


def _big_frames(engine: ConnectionEngine, first: int, count: int, size: int = 1500) -> None:
    big = b"x" * size
    for i in range(first, first + count):
        parts, nbytes = frames.value_frame(frames.DATA, "n", [i, big])
        engine.queue.push(parts, nbytes)


def test_a_full_replay_window_holds_values_back_instead_of_losing_them() -> None:
    """Flow control: once the replay buffer holds the window (at most one frame more),
    values wait in the queue until RACKs make room, and a cut then loses nothing."""
    pair = Pair(max_buffer=4096)
    q = pair.client.queue
    assert q.window == WINDOW_MIN  # never below what a peer is bound to acknowledge
    _big_frames(pair.client, 0, 400)  # ~600 KB: more than the window
    wire = _wire(pair.client)
    assert q.held_back and q._inbox
    # At least the window (so the peer owes a RACK), at most one frame beyond it.
    assert q.window <= q.replay_bytes < q.window + 1600 and q.replay_overflow == 0
    assert q.queued == sum(frames.frame_size(e) for e in q._inbox)  # still counted
    # Nothing more leaves until a RACK arrives.
    assert _wire(pair.client) == b""
    # The link dies with what was sent half delivered; the resume replays it, and the
    # values held back follow as RACKs make room: all 400, once, in order.
    pair.at_host += _values(_feed(pair.host, wire[: len(wire) // 2]))
    for engine in (pair.client, pair.host):
        engine.lost(ConnectionError("cut"))
        engine.finish()
    assert pair.host.session is not None
    pair.table.suspend(pair.host.session, 0.0)
    pair.connect()
    for _ in range(20):
        pair.exchange()
        assert pair.client.queue.replay_bytes < pair.client.queue.window + 1600
    assert pair.at_host == [[i, b"x" * 1500] for i in range(400)]
    assert pair.session.lost == 0 and pair.client.queue.replay_overflow == 0


def test_link_level_frames_pass_values_held_back_by_the_window() -> None:
    """The peer's own window may wait for this side's RACKs: a RACK, PING or PONG
    queued behind held-back values leaves at once, in order; a BYE does not."""
    q = SendQueue(4096)
    q.numbered = True
    big = b"x" * 1500
    for i in range(400):
        parts, nbytes = frames.value_frame(frames.DATA, "n", [i, big])
        q.push(parts, nbytes)
    q.to_wire(q.take_inbox())
    assert q.held_back
    sent_values = q.seq
    q.push([rack_frame(3)], frames.HEADER_SIZE)
    bye = frames.encode_frame(frames.BYE, "", b"")
    q.push(list(bye), frames.frame_size(list(bye)))
    q.push([rack_frame(4)], frames.HEADER_SIZE)
    taken = q.take_inbox()
    assert taken == [[rack_frame(3)], [rack_frame(4)]]
    q.to_wire(taken)
    assert q.seq == sent_values  # nothing numbered
    assert q.held_back and frames.BYE in [e[0][0] for e in q._inbox if type(e) is list]
    # RACKs for everything sent open the window: the rest, BYE last, in order.
    rest: List[Any] = []
    for _ in range(10):
        q.ack(q.seq)
        taken = q.take_inbox()
        rest += taken  # before to_wire, which clears what it framed
        q.to_wire(taken)
        if not q.held_back:
            break
    assert not q._inbox and q.seq == 400
    assert type(rest[-1]) is list and rest[-1][0][0] == frames.BYE


def test_a_frame_larger_than_the_window_still_goes_alone() -> None:
    """A single frame larger than the window is taken when nothing waits for a RACK
    (or it would never leave), and the next waits for the RACK."""
    q = SendQueue(4096)
    q.numbered = True
    huge = b"y" * (WINDOW_MIN + 1000)
    for i in range(2):
        parts, nbytes = frames.value_frame(frames.DATA, "n", [i, huge])
        q.push(parts, nbytes)
    first = q.take_inbox()
    assert len(first) == 1 and q.held_back
    q.to_wire(first)
    assert q.take_inbox() == []
    q.ack(1)
    assert len(q.take_inbox()) == 1 and not q.held_back
    assert q.replay_overflow == 0


def test_frames_that_left_the_window_are_counted_lost_and_numbering_holds() -> None:
    """The safety net (``_bound``): frames that left the replay buffer unacknowledged
    (flow control never lets that happen here) are reported lost at the resume, and
    the numbering goes on with a SKIP for them."""
    pair = Pair(max_buffer=4096)
    q = pair.client.queue
    big = b"x" * 1500
    for i in range(10):
        item = frames.value_frame(frames.DATA, "n", [i, big])
        q.push(item[0], item[1])
        q.to_wire(q.take_inbox())
    assert q.replay_overflow == 0 and len(q._replay) == 10
    q.window = 4096  # as if the window were that small: the safety net trims
    q._bound()
    assert q.replay_overflow > 0 and len(q._replay) < 10
    pair.cut(0, 0)
    pair.connect()
    lost = pair.session.lost
    assert lost == 10 - len([r for r in pair.client.queue._replay])
    _write(pair.client, [["tail", b""]])
    pair.exchange()
    got = [v[0] for v in pair.at_host]
    assert got == list(range(lost, 10)) + ["tail"]
    assert pair.host.session is not None and pair.host.session.recv == 11


def test_a_host_without_the_session_gets_everything_again() -> None:
    """A restarted host (new table): at least once, in order."""
    pair = Pair()
    _write(pair.client, list(range(50)))
    pair.cut(0, 0)
    pair.table = SessionTable(60.0, 8)
    pair.connect()
    assert not pair.client.protocol.resumed
    pair.exchange()
    assert pair.at_host == list(range(50))


def test_another_name_cannot_take_a_session_over() -> None:
    table = SessionTable(60.0, 8)
    session, resumed = table.open(b"", "alice")
    assert not resumed
    other, resumed = table.open(session.sid, "mallory")
    assert not resumed and other.sid != session.sid
    again, resumed = table.open(session.sid, "alice")
    assert resumed and again is session


def test_suspended_sessions_are_bounded_and_expire() -> None:
    table = SessionTable(10.0, 2)
    sessions = [table.open(b"", f"c{i}")[0] for i in range(3)]
    assert table.suspend(sessions[0], 0.0) == []
    assert table.suspend(sessions[1], 1.0) == []
    assert table.suspend(sessions[2], 2.0) == [sessions[0]]
    assert table.expire(11.5) == [sessions[1]]
    assert table.open(sessions[2].sid, "c2")[1]
    assert not table.open(sessions[1].sid, "c1")[1]


def test_a_peer_without_resume_gets_no_sequence_frames() -> None:
    """A 1.1 client (no "rs" in HELLO): no numbering, no RACK, as before."""
    client = ConnectionEngine(
        Protocol(Role.CLIENT, name="old", heartbeat=5.0),
        peer="host",
        max_buffer=1 << 20,
        heartbeat=5.0,
        handshake_timeout=10.0,
        now=0.0,
    )
    host = _host(SessionTable(60.0, 8))
    _handshake(client, host)
    assert host.session is None and client.session is None
    assert not host.queue.numbered
    _write(client, list(range(100)))
    assert _values(_feed(host, _wire(client))) == list(range(100))
    assert host.control_bytes() == b""
    with pytest.raises(ProtocolError):
        host.control(frames.Frame(frames.RACK, 0, "", 1, b"", None))


def test_a_host_without_resume_numbers_nothing() -> None:
    session = Session(b"", None, None)
    client = _client(session)
    host = _host(None)
    _handshake(client, host)
    assert client.session is None and not client.queue.numbered


def test_an_ack_beyond_what_was_sent_is_a_protocol_error() -> None:
    pair = Pair()
    with pytest.raises(ProtocolError):
        _feed(pair.host, rack_frame(5))


def test_a_resume_count_out_of_range_sends_everything_again() -> None:
    q = SendQueue(1 << 20)
    q.numbered = True
    _ = [q.push_item(frames.value_item("n", i)) for i in range(3)]  # type: ignore[func-returns-value]
    q.to_wire(q.take_inbox())
    with pytest.raises(ProtocolError):
        q.rewind(5)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_rs_fields_fuzzed_are_refused_or_accepted_never_crash(blob: bytes) -> None:
    """Any HELLO "rs" value: accepted or ProtocolError (hypothesis)."""
    from socketengine import codec

    for rs in (blob, [blob, 0], [blob[:16], len(blob)], [b"", -1], [blob, 1, True]):
        host = _host(SessionTable(60.0, 8))
        hello = {"v": 1, "name": None, "nonce": b"\0" * 16, "rs": rs}
        meta, _, _ = codec.encode(hello)
        data = frames.PREAMBLE + b"".join(frames.encode_frame(frames.HELLO, "", meta))
        try:
            _feed(host, data)
        except ProtocolError:
            continue


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([frames.RACK, frames.SKIP]))
def test_rack_and_skip_fuzzed(count: int, ftype: int) -> None:
    """Any RACK / SKIP count: applied or ProtocolError, never anything else."""
    pair = Pair()
    _write(pair.host, list(range(3)))
    _feed(pair.client, _wire(pair.host))
    frame = (
        rack_frame(count)
        if ftype == frames.RACK
        else (skip_frame(count) if count else frames.HEADER.pack(frames.SKIP, 0, 0, 0, 0, 0))
    )
    try:
        _feed(pair.client, frame)
    except ProtocolError:
        return


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=20),
        st.lists(st.one_of(st.binary(max_size=20), st.integers(-2, 2**40), st.booleans())),
    )
)
def test_welcome_rs_fuzzed_is_accepted_or_refused_never_crashes(rs: Any) -> None:
    """Any WELCOME "rs" value at a client: accepted or ProtocolError (hypothesis)."""
    from socketengine import codec

    client = _client(Session(b"", None, None))
    client.control_bytes()
    meta, _, _ = codec.encode({"v": 1, "id": 1, "rs": rs})
    data = frames.PREAMBLE + b"".join(frames.encode_frame(frames.WELCOME, "", meta))
    try:
        _feed(client, data)
    except ProtocolError:
        return
    assert client.opened


def test_an_expired_session_is_not_resumed() -> None:
    table = SessionTable(10.0, 4)
    session, _ = table.open(b"", "c")
    table.suspend(session, 0.0)
    assert table.expire(10.0) == [session]
    again, resumed = table.open(session.sid, "c")
    assert not resumed and again is not session


def _hold(session: Session, values: List[Any], channel: str = "n") -> List[bool]:
    out = []
    for v in values:
        item = frames.value_item(channel, v)
        if isinstance(item, bytes):
            out.append(session.hold(item, len(item)))
        else:
            out.append(session.hold(item[0], item[1]))
    return out


def test_writes_held_while_the_link_is_down_follow_the_replay_in_order() -> None:
    pair = Pair()
    _write(pair.host, list(range(10)))
    pair.cut(0, 40)  # the client got a few of them
    hs = pair.host.session
    assert hs is not None and hs.held and pair.table.held() == [hs]
    assert all(_hold(hs, list(range(10, 20))))
    pair.connect()  # adopt() stops holding: writes go to the new link
    assert not hs.held and pair.table.held() == []
    _write(pair.host, [20])
    pair.exchange()
    assert pair.at_client == list(range(21))


def test_held_writes_are_bounded_by_max_buffer_and_counted_lost() -> None:
    pair = Pair(max_buffer=4096)
    pair.cut(0, 0)
    hs = pair.host.session
    assert hs is not None
    taken = _hold(hs, [[i, b"x" * 1000] for i in range(10)])
    kept = taken.count(True)
    assert 0 < kept < 10 and taken == [True] * kept + [False] * (10 - kept)
    assert hs.lost == 10 - kept
    image = frames.value_frame(frames.DATA, "img", b"x" * 2000, flags=frames.FLAG_IMAGE)
    assert not hs.hold(image[0], image[1], "img")  # full: a new image channel too
    pair.connect()
    pair.exchange()
    assert [v[0] for v in pair.at_client] == list(range(kept))


def test_a_dropped_or_expired_session_holds_nothing() -> None:
    table = SessionTable(10.0, 1)
    a, _ = table.open(b"", "a")
    b, _ = table.open(b"", "b")
    for s in (a, b):
        s.queue = SendQueue(1 << 20)
        s.suspend(None)
    assert table.held() == [a, b]  # b: its link died, not handed to the table yet
    table.suspend(a, 0.0)
    assert table.suspend(b, 1.0) == [a] and not a.held  # over resume_sessions
    assert table.expire(11.0) == [b] and not b.held
    assert table.held() == []


class _Sink:
    def __init__(self) -> None:
        self.result: Any = None
        self.error: Optional[BaseException] = None
        self._done = False

    def done(self) -> bool:
        return self._done

    def set_result(self, result: Any) -> None:
        self.result, self._done = result, True

    def set_exception(self, exception: BaseException) -> None:
        self.error, self._done = exception, True


def _of_type(received: List[frames.Frame], ftype: int) -> List[frames.Frame]:
    return [f for f in received if f.type == ftype]


def test_a_request_and_its_reply_cross_two_cuts_exactly_once() -> None:
    """With "rq" both ways, REQUEST and REPLY frames are sequenced: replayed after a
    cut, never duplicated; the pending request survives the link change."""
    pair = Pair()
    assert pair.client.protocol.peer_rq and pair.host.protocol.peer_rq
    sink = _Sink()
    table = pair.client.requests
    rid = table.open(sink)
    parts, nbytes = frames.value_frame(frames.REQUEST, "q", 21, fid=rid)
    pair.client.queue.push(parts, nbytes)
    pair.cut(0, 0)  # the request never reached the host
    assert not sink.done()
    pair.connect()
    assert pair.client.requests is table  # the table continues on the new link
    got = _feed(pair.host, _wire(pair.client))
    requests = _of_type(got, frames.REQUEST)
    assert [f.id for f in requests] == [rid]
    reply, size, _ = requests_mod.reply_frame("q", rid, 42, None)
    pair.host.queue.push(reply, size)
    pair.cut(0, 0)  # the reply never reached the client
    pair.connect()
    received = _feed(pair.client, _wire(pair.host))
    assert _of_type(_feed(pair.host, _wire(pair.client)), frames.REQUEST) == []  # not again
    replies = _of_type(received, frames.REPLY)
    assert len(replies) == 1
    pair.client.control(replies[0])
    assert sink.done() and sink.result == 42


def test_a_sync_is_acknowledged_across_a_cut() -> None:
    pair = Pair()
    sink = _Sink()
    rid = pair.client.requests.open(sink)
    _write(pair.client, [1, 2])
    sync = pair.client.sync_frame(rid)
    pair.client.queue.push([sync], len(sync))
    got = _feed(pair.host, _wire(pair.client))
    for frame in _of_type(got, frames.SYNC):
        pair.host.control(frame)
    acks = pair.host.take_acks()
    assert len(acks) == 1
    pair.host.queue.push([acks[0]], len(acks[0]))
    pair.cut(0, 0)  # the ACK is lost with the link
    pair.connect()
    for frame in _of_type(_feed(pair.client, _wire(pair.host)), frames.ACK):
        pair.client.control(frame)
    assert sink.done() and sink.result is True


def test_requests_fail_when_the_session_is_lost() -> None:
    """A restarted host (a new session): a request kept across the cut fails with
    ConnectionClosed, it is not sent again."""
    pair = Pair()
    sink = _Sink()
    rid = pair.client.requests.open(sink)
    parts, nbytes = frames.value_frame(frames.REQUEST, "q", 1, fid=rid)
    pair.client.queue.push(parts, nbytes)
    pair.cut(0, 0)
    assert not sink.done()
    pair.table = SessionTable(60.0, 8)
    pair.connect()
    assert isinstance(sink.error, ConnectionClosed)


def test_a_client_that_does_not_reconnect_fails_its_requests_with_the_link() -> None:
    pair = Pair()
    pair.session.keep_requests = False
    sink = _Sink()
    pair.client.requests.open(sink)
    pair.cut(0, 0)
    assert isinstance(sink.error, ConnectionClosed)


def _record_sends(monkeypatch: Any, sends: List[Any]) -> None:
    """Append the socket of every ``send``/``sendmsg`` call to ``sends`` (until
    ``monkeypatch.undo()``)."""
    import socket as socket_mod

    plain_send, plain_sendmsg = socket_mod.socket.send, socket_mod.socket.sendmsg

    def send(self: Any, data: Any, *args: Any) -> int:
        sends.append(self)
        return plain_send(self, data, *args)

    def sendmsg(self: Any, buffers: Any, *args: Any) -> int:
        sends.append(self)
        return plain_sendmsg(self, buffers, *args)

    monkeypatch.setattr(socket_mod.socket, "send", send)
    monkeypatch.setattr(socket_mod.socket, "sendmsg", sendmsg)


def test_acks_ride_with_the_next_write_instead_of_a_send_of_their_own(monkeypatch: Any) -> None:
    # Threaded layer, resume on, requests sequenced: each side owes a RACK every 32
    # frames.  It leaves with the reply (host) or the next request (client), never in a
    # send of its own in the middle of a round trip (that cost the peer a wake-up: a
    # request's p99 went from 162 to 250 us).
    from conftest import wait_for

    from socketengine import Client, Host

    sends: List[Any] = []
    host = Host(port=0, timeout=5, heartbeat=None)
    client = Client(port=host.port, timeout=5, heartbeat=None)
    try:
        host.on("echo", lambda value, conn: value, inline=True)
        conn = wait_for(lambda: host.clients() and host.clients()[0])
        assert client._conn is not None and client._conn.engine.session is not None
        for i in range(8):
            client.request("echo", i)  # warm up
        wait_for(lambda: not conn._queue and not client._conn._queue, what="idle")
        _record_sends(monkeypatch, sends)
        n = 3 * ACK_EVERY
        for i in range(n):
            assert client.request("echo", i) == i
        monkeypatch.undo()
        host_sends = sum(1 for s in sends if s is conn.socket)
        client_sends = sum(1 for s in sends if s is client._conn.socket)
        assert host_sends == n  # one send per reply, its RACK inside
        # The client's RACKs wait up to 1 ms for its next request (a slow machine may
        # send one on its own).
        assert n <= client_sends <= n + n // ACK_EVERY
    finally:
        monkeypatch.undo()
        client.close()
        host.close()


def test_link_level_frames_do_not_move_to_the_next_link() -> None:
    # A RACK (or PING/PONG) still queued when a link dies belongs to that link: on the
    # resumed one its count would be stale, and the peer would refuse it.
    old = SendQueue(1 << 20)
    old.numbered = True
    old.batch_limit = 1 << 16
    old.push_item(frames.value_item("c", 1))  # type: ignore[arg-type]
    rack = rack_frame(7)
    old.push([rack], len(rack))
    pong = b"".join(frames.encode_frame(frames.PONG))
    old.push([pong + rack_frame(8)], len(pong) + 16)
    old.push_item(frames.value_item("c", 2))  # type: ignore[arg-type]
    old.detach()
    new = SendQueue(1 << 20)
    new.take_over(old)
    wire = b"".join(bytes(p) for p in new.take_all())
    decoded = frames.FrameDecoder(1 << 20, 4096, expect_preamble=False).feed(wire)
    assert frames.RACK not in {f.type for f in decoded}
    assert frames.PONG not in {f.type for f in decoded}
    values = []
    for f in decoded:
        values += f.items()[1::2] if f.type == frames.BATCH else [f.value()]
    assert values == [1, 2]
    assert new.queued == 0 and not old


def test_asyncio_acks_ride_with_the_next_write_too(monkeypatch: Any) -> None:
    # The same rule on the asyncio layer: a RACK due after a read leaves with the reply.
    import asyncio

    from socketengine import aio

    sends: List[Any] = []

    async def main() -> None:
        host = aio.Host(port=0, timeout=5, heartbeat=None)
        await host.start()
        client = aio.Client(port=host.port, timeout=5, heartbeat=None)
        try:
            host.on("echo", lambda value, conn: value)
            await client.start()
            for i in range(8):
                await client.request("echo", i)  # warm up
            conn = host.clients()[0]
            assert conn.engine.session is not None
            host_socket = conn.transport.get_extra_info("socket")
            _record_sends(monkeypatch, sends)
            n = 3 * ACK_EVERY
            for i in range(n):
                assert await client.request("echo", i) == i
            monkeypatch.undo()
            # asyncio hands transports a TransportSocket wrapper: compare file numbers.
            host_sends = sum(1 for s in sends if s.fileno() == host_socket.fileno())
            assert host_sends == n  # one send per reply, its RACK inside
        finally:
            monkeypatch.undo()
            await client.close()
            await host.close()

    asyncio.run(main())


def test_a_rack_is_due_every_256_kib_of_sequenced_bytes_too() -> None:
    """BATCH frames of up to 64 KiB: 32 of them would leave 2 MiB unacknowledged, more
    than a small replay window (max_buffer) holds; a RACK is also due per ACK_BYTES."""
    pair = Pair()
    host = pair.host
    body = "x" * 1000
    racks_at = []
    for i in range(12):  # each push + flush is one BATCH frame of ~60 KiB
        _write(pair.client, [[i, body]] * 60)
        wire = b"".join(bytes(b) for b in pair.client.queue.take_all())
        assert _types(wire) == [frames.BATCH]
        _feed(host, wire)
        out = host.control_bytes()
        if frames.RACK in _types(out):
            racks_at.append(i + 1)
    assert host.session is not None and host.session.recv == 12
    # ~60 KiB frames: the 5th crosses 256 KiB, then every 5th again; never 32 frames
    assert racks_at == [5, 10], racks_at
    assert ACK_BYTES == 256 * 1024
