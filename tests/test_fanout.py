"""Bursts of ``write_all`` (threaded host): values are queued once per run and handed
to every client's send queue together (socketengine/fanout.py).  Whatever the
runs, every client gets every value in order, nothing sent to one client overtakes
them, and at most FAN_MAX values wait outside the send queues."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Iterator, List, Tuple

import pytest
from conftest import wait_for
from test_parity import LAYERS, AioThread, make_host

from socketengine import Client, Host
from socketengine.fanout import FAN_MAX, FanOut
from socketengine.sendqueue import ITEM_OVERHEAD

N = 2000


@pytest.fixture
def aio_loop() -> Iterator[AioThread]:
    runner = AioThread()
    yield runner
    runner.close()


def _recorder(client: Client) -> List[Tuple[str, Any]]:
    """Everything ``client`` receives, in arrival order, across channels."""
    got: List[Tuple[str, Any]] = []
    client.on_message(lambda channel, data: got.append((channel, data)))
    return got


def test_a_run_counts_its_values_and_says_when_it_is_full() -> None:
    fan: FanOut[str] = FanOut()
    audience = ["a", "b", "c"]
    assert not fan and not fan.joins(audience)
    fan.start(audience, ["a", "c"])
    assert not fan.add(b"xy")
    assert fan and fan.joins(audience) and not fan.joins(list(audience))
    assert fan.nbytes == 2 + ITEM_OVERHEAD and fan.recipients == ["a", "c"]
    with pytest.raises(RuntimeError):
        fan.start(audience, [])  # the run was not handed over
    full = [fan.add(b"z") for _ in range(FAN_MAX - 1)]
    assert full[-1] and not any(full[:-1])
    fan.clear()
    assert not fan and fan.nbytes == 0 and fan.recipients == [] and not fan.joins(audience)


def test_a_burst_reaches_every_client_in_order(host: Host, make_client) -> None:  # type: ignore[no-untyped-def]
    clients = [make_client(name=f"c{i}") for i in range(4)]
    logs = [_recorder(c) for c in clients]
    wait_for(lambda: len(host.clients()) == 4, what="4 clients")
    counts = [host.write_all("fan", i) for i in range(N)]
    assert counts == [4] * N
    for log in logs:
        wait_for(lambda log=log: len(log) == N, what="every value at every client")
        assert log == [("fan", i) for i in range(N)]
    for conn in host.clients():
        assert conn.messages_out == N


def test_nothing_written_to_one_client_overtakes_a_burst(host: Host, make_client) -> None:  # type: ignore[no-untyped-def]
    a, b = make_client(name="a"), make_client(name="b")
    log_a, log_b = _recorder(a), _recorder(b)
    conn_a = wait_for(lambda: host.get_client("a"))
    wait_for(lambda: host.get_client("b"))
    expected_a: List[Tuple[str, Any]] = []
    for i in range(N):
        host.write_all("fan", i)
        expected_a.append(("fan", i))
        if i % 97 == 0:  # a direct write, a write_many, in the middle of runs
            conn_a.write("direct", i)
            expected_a.append(("direct", i))
        if i % 331 == 0:
            conn_a.write_many([("many", i), ("many", -i)])
            expected_a += [("many", i), ("many", -i)]
    conn_a.write("direct", "end")
    expected_a.append(("direct", "end"))
    wait_for(lambda: len(log_a) == len(expected_a), what="everything at a")
    assert log_a == expected_a
    wait_for(lambda: len(log_b) == N, what="the broadcasts at b")
    assert log_b == [("fan", i) for i in range(N)]


@pytest.mark.parametrize("layer", LAYERS)
def test_both_layers_keep_broadcasts_and_direct_writes_in_order(
    layer: str, aio_loop: AioThread
) -> None:
    # The threaded host defers broadcasts in runs, the asyncio host queues each at
    # once: a client sees the same interleaving of both either way.
    host = make_host(layer, aio_loop)
    a = Client(port=host.ep.port, name="a", connect_timeout=10)
    b = Client(port=host.ep.port, name="b", connect_timeout=10)
    try:
        log_a, log_b = _recorder(a), _recorder(b)
        conn_a = wait_for(lambda: host.ep.get_client("a"))
        wait_for(lambda: host.ep.get_client("b"))

        def direct(name: str, *args: Any) -> None:
            result = getattr(conn_a, name)(*args)
            if asyncio.iscoroutine(result):
                aio_loop.run(result)

        expected: List[Tuple[str, Any]] = []
        for i in range(600):
            assert host.do("write_all", "fan", i) == 2
            expected.append(("fan", i))
            if i % 37 == 0:
                direct("write", "direct", i)
                expected.append(("direct", i))
            if i % 149 == 0:
                direct("write_many", [("many", i), ("many", -i)])
                expected += [("many", i), ("many", -i)]
        wait_for(lambda: len(log_a) == len(expected), what="everything at a")
        assert log_a == expected
        wait_for(lambda: len(log_b) == 600, what="the broadcasts at b")
        assert log_b == [("fan", i) for i in range(600)]
    finally:
        a.close()
        b.close()
        host.close()


def test_broadcasts_to_different_audiences_keep_their_order(host: Host, make_client) -> None:  # type: ignore[no-untyped-def]
    # b wants "x" only: broadcasts on "x" and "y" have different audiences, so the
    # runs alternate; every client still sees its values in the order written.
    a, b = make_client(name="a"), make_client(name="b")
    log_a, log_b = _recorder(a), _recorder(b)
    conn_b = wait_for(lambda: host.get_client("b"))
    wait_for(lambda: host.get_client("a"))
    b.set_interest(["x"])
    wait_for(lambda: conn_b.interest is not None, what="b's interest at the host")
    written = [("x" if (i // 3) % 2 else "y", i) for i in range(N)]
    for channel, i in written:
        assert host.write_all(channel, i) == (2 if channel == "x" else 1)
    wait_for(lambda: len(log_a) == N, what="every value at a")
    assert log_a == written
    want_b = [w for w in written if w[0] == "x"]
    wait_for(lambda: len(log_b) == len(want_b), what="the x values at b")
    assert log_b == want_b


def test_a_client_that_connects_during_a_burst_gets_all_after_its_open(
    host: Host, make_client
) -> None:  # type: ignore[no-untyped-def]
    make_client(name="first")
    stop = threading.Event()
    written = [0]

    def burst() -> None:
        i = 0
        while not stop.is_set() and i < 2_000_000:
            host.write_all("n", i)
            i += 1
            written[0] = i

    writer = threading.Thread(target=burst)
    writer.start()
    late = None
    try:
        wait_for(lambda: written[0] > 1000, what="the burst under way")
        late = make_client(name="late")
        log = _recorder(late)
        # write_all(at_open) may have begun before open() returned; every later one
        # began after: those must all reach the late client.
        at_open = written[0]
        wait_for(lambda: len(log) > 1000, what="values at the late client")
    finally:
        stop.set()
        writer.join(10)
    last = written[0] - 1
    assert late is not None
    wait_for(lambda: log and log[-1] == ("n", last), what="the last value at the late client")
    values = [v for _, v in log]
    assert values == list(range(values[0], last + 1))  # no gap, no repeat, in order
    assert values[0] <= at_open + 1


def test_a_run_waits_outside_the_send_queues_for_at_most_fan_max_values(
    host: Host, make_client
) -> None:  # type: ignore[no-untyped-def]
    # The host's I/O thread is kept busy (an inline handler blocks it), so it never
    # hands a run over: the writer does, whenever FAN_MAX values wait.
    release = threading.Event()
    blocked = threading.Event()

    def block(value: Any, conn: Any) -> None:
        blocked.set()
        release.wait(10)

    host.on("block", block, inline=True)
    clients = [make_client(name=f"c{i}") for i in range(3)]
    logs = [_recorder(c) for c in clients]
    wait_for(lambda: len(host.clients()) == 3, what="3 clients")
    clients[0].write("block", 1)
    assert blocked.wait(5)
    try:
        most = 0
        for i in range(3 * FAN_MAX + 7):
            host.write_all("fan", i)
            most = max(most, len(host._fan.items))
        assert 0 < most < FAN_MAX
    finally:
        release.set()
    for log in logs:
        wait_for(lambda log=log: len(log) == 3 * FAN_MAX + 7, what="every value")
        assert log == [("fan", i) for i in range(3 * FAN_MAX + 7)]


def test_a_burst_then_close_delivers_the_burst() -> None:
    h = Host(port=0)
    try:
        clients = [Client(port=h.port, name=f"c{i}") for i in range(3)]
        logs = [_recorder(c) for c in clients]
        wait_for(lambda: len(h.clients()) == 3, what="3 clients")
        for i in range(N):
            h.write_all("fan", i)
    finally:
        h.close()  # graceful: what was written goes before the BYE
    try:
        for log in logs:
            wait_for(lambda log=log: len(log) == N, what="the whole burst")
            assert log == [("fan", i) for i in range(N)]
    finally:
        for c in clients:
            c.close()


def test_conn_flush_after_a_burst_waits_for_it(host: Host, make_client) -> None:  # type: ignore[no-untyped-def]
    c = make_client(name="c")
    make_client(name="d")
    log = _recorder(c)
    conn = wait_for(lambda: host.get_client("c"))
    wait_for(lambda: len(host.clients()) == 2, what="2 clients")
    for i in range(N):
        host.write_all("fan", i)
    conn.flush(acked=False)
    assert not host._fan  # handed over ...
    assert not conn._queue  # ... and sent
    conn.flush(acked=True)  # the client has stored them all
    assert c.get("fan") == N - 1
    wait_for(lambda: len(log) == N, what="every value")


def test_a_send_queue_takes_a_run_whole_or_not_at_all() -> None:
    from socketengine.sendqueue import SendQueue

    q = SendQueue(max_buffer=1000)
    q.staged.append(b"s")  # staged before: stays first
    run = [b"a" * 300, b"b" * 300]
    cost = 600 + 2 * ITEM_OVERHEAD
    assert q.offer_items(run, cost)  # 57 bytes queued: 57 + 712 fit
    before = q.queued
    assert not q.offer_items(run, cost)  # would pass max_buffer: nothing queued
    assert q.queued == before
    q.push_items([b"c"], 1 + ITEM_OVERHEAD)  # the slow-consumer path: beyond the bound
    assert q.queued == before + 1 + ITEM_OVERHEAD
    assert q.take_inbox() == [b"s", b"a" * 300, b"b" * 300, b"c"]
    empty = SendQueue(max_buffer=10)
    assert empty.offer_items(run, cost)  # an empty queue takes any run
