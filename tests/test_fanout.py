"""Bursts of ``write_all``, on both layers: values are queued once per run and handed
to every client's send queue together (socketengine/fanout.py).  Whatever the runs,
every client gets every value in order, nothing sent to one client overtakes them,
and at most FAN_MAX values wait outside the send queues.

A burst is what a program's loop of ``write_all`` makes: on the asyncio layer one
coroutine that calls it over and over (:func:`_in_one_go`), so the calls are not
separated by steps of the event loop, which hand a run over."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Callable, Iterator, List, Sequence, Tuple

import pytest
from conftest import wait_for
from faults import RawClient
from test_parity import LAYERS, AioThread, Side, make_host

from socketengine import Client, Host
from socketengine.fanout import BROADCAST_GAP, FAN_MAX, FanOut
from socketengine.sendqueue import ITEM_OVERHEAD

N = 2000


@pytest.fixture
def aio_loop() -> Iterator[AioThread]:
    runner = AioThread()
    yield runner
    runner.close()


@pytest.fixture
def layer_host(request: pytest.FixtureRequest, aio_loop: AioThread) -> Iterator[Side]:
    """A host of the layer the test is parametrized with (``layer``)."""
    side = make_host(request.param, aio_loop)
    yield side
    side.close()


@pytest.fixture
def clients() -> Iterator[Callable[..., Client]]:
    """Makes threaded clients, closed after the test."""
    made: List[Client] = []

    def make(port: int, **kwargs: Any) -> Client:
        c = Client(port=port, connect_timeout=10, **kwargs)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def _in_one_go(host: Side, calls: Sequence[Tuple[Any, str, Tuple[Any, ...]]]) -> List[Any]:
    """Make ``calls`` (``(target, method, args)``) one after the other: on the asyncio
    layer in one coroutine, awaiting each, never yielding to the loop in between."""
    if host.runner is None:
        return [getattr(target, name)(*args) for target, name, args in calls]

    async def go() -> List[Any]:
        out = []
        for target, name, args in calls:
            result = getattr(target, name)(*args)
            out.append(await result if asyncio.iscoroutine(result) else result)
        return out

    return host.runner.run(go(), 60.0)


def _recorder(client: Client) -> List[Tuple[str, Any]]:
    """Everything ``client`` receives, in arrival order, across channels."""
    got: List[Tuple[str, Any]] = []
    client.on_message(lambda channel, data: got.append((channel, data)))
    return got


BOTH = pytest.mark.parametrize("layer_host", LAYERS, indirect=True)


def test_a_broadcast_joins_a_run_only_in_a_burst_to_several() -> None:
    fan: FanOut[str] = FanOut()
    audience = ["a", "b", "c"]
    is_open = {"a": True, "b": False, "c": True}.__getitem__
    assert fan.defer(b"0", audience, 100.0, is_open) == -1  # isolated: sent at once
    fan.last = 100.0002  # ... and the host notes when that broadcast ended
    assert fan.defer(b"1", ["a"], 100.0003, is_open) == -1  # one client: no run
    assert fan.defer(b"2", audience, 100.0004, is_open) == 2  # a burst: a run starts
    assert fan.recipients == ["a", "c"] and fan.items == [b"2"] and not fan.full
    assert fan.defer(b"3", audience, 100.5, is_open) == 2  # joins, whatever the gap
    with pytest.raises(RuntimeError):  # another audience: the host hands over first
        fan.defer(b"4", ["a", "b"], 100.5001, is_open)
    fan.clear()
    assert fan.defer(b"5", audience, 100.5 + BROADCAST_GAP, is_open) == -1
    assert fan.in_burst(2, fan.last + BROADCAST_GAP / 2)
    assert not fan.in_burst(1, fan.last) and not fan.in_burst(2, fan.last + BROADCAST_GAP)
    fan.last = 0.0
    for _ in range(FAN_MAX):
        assert fan.defer(b"x", audience, BROADCAST_GAP / 2, is_open) == 2
    assert fan.full


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


def test_a_value_joins_only_a_run_for_its_own_audience() -> None:
    """``FanOut.join``, the hosts' one-step path of a burst: it appends to the current
    run and notes the time only for that run's audience; otherwise it does nothing and
    ``defer`` decides."""
    fan: FanOut[str] = FanOut()
    audience = ["a", "b"]
    assert not fan.join(b"0", audience, 1.0)  # no run: nothing done
    assert fan.items == [] and fan.last == 0.0
    fan.start(audience, ["a", "b"])
    fan.add(b"1")
    assert not fan.join(b"2", list(audience), 2.0)  # an equal list is another audience
    assert fan.items == [b"1"] and fan.last == 0.0
    assert fan.join(b"3", audience, 3.0)
    assert fan.items == [b"1", b"3"] and fan.last == 3.0
    assert fan.nbytes == 2 * (1 + ITEM_OVERHEAD)
    while not fan.full:
        assert fan.join(b"x", audience, 4.0)
    assert len(fan.items) == FAN_MAX


@BOTH
def test_a_burst_reaches_every_client_in_order(layer_host: Side, clients) -> None:  # type: ignore[no-untyped-def]
    host = layer_host.ep
    logs = [_recorder(clients(host.port, name=f"c{i}")) for i in range(4)]
    wait_for(lambda: len(host.clients()) == 4, what="4 clients")
    used = _count_runs(host)
    counts = _in_one_go(layer_host, [(host, "write_all", ("fan", i)) for i in range(N)])
    assert counts == [4] * N
    for log in logs:
        wait_for(lambda log=log: len(log) == N, what="every value at every client")
        assert log == [("fan", i) for i in range(N)]
    for conn in host.clients():
        assert conn.messages_out == N
    assert used[0] > 2 * N  # most deliveries went through runs


def _count_runs(host: Any) -> List[int]:
    """Count the values handed over in runs (deliveries, over every recipient)."""
    used = [0]
    flush = host._fan_flush

    def counted() -> Any:
        used[0] += len(host._fan.items) * len(host._fan.recipients)
        return flush()

    host._fan_flush = counted  # the connections' hooks call it through the host too
    return used


@BOTH
def test_nothing_written_to_one_client_overtakes_a_burst(layer_host: Side, clients) -> None:  # type: ignore[no-untyped-def]
    host = layer_host.ep
    log_a = _recorder(clients(host.port, name="a"))
    log_b = _recorder(clients(host.port, name="b"))
    conn_a = wait_for(lambda: host.get_client("a"))
    wait_for(lambda: host.get_client("b"))
    calls: List[Tuple[Any, str, Tuple[Any, ...]]] = []
    expected_a: List[Tuple[str, Any]] = []
    for i in range(N):
        calls.append((host, "write_all", ("fan", i)))
        expected_a.append(("fan", i))
        if i % 97 == 0:  # a direct write, a write_many, in the middle of runs
            calls.append((conn_a, "write", ("direct", i)))
            expected_a.append(("direct", i))
        if i % 331 == 0:
            calls.append((conn_a, "write_many", ([("many", i), ("many", -i)],)))
            expected_a += [("many", i), ("many", -i)]
    calls.append((conn_a, "write", ("direct", "end")))
    expected_a.append(("direct", "end"))
    _in_one_go(layer_host, calls)
    wait_for(lambda: len(log_a) == len(expected_a), what="everything at a")
    assert log_a == expected_a
    wait_for(lambda: len(log_b) == N, what="the broadcasts at b")
    assert log_b == [("fan", i) for i in range(N)]


@pytest.mark.parametrize("layer", LAYERS)
def test_both_layers_keep_broadcasts_and_direct_writes_in_order(
    layer: str, aio_loop: AioThread
) -> None:
    # One call at a time from the test's thread (on the asyncio layer each is a step
    # of the event loop, which hands the run over): a client sees the same
    # interleaving of broadcasts and direct writes either way.
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


@BOTH
def test_broadcasts_to_different_audiences_keep_their_order(layer_host: Side, clients) -> None:  # type: ignore[no-untyped-def]
    # b wants "x" only: broadcasts on "x" and "y" have different audiences, so the
    # runs alternate; every client still sees its values in the order written.
    host = layer_host.ep
    log_a = _recorder(clients(host.port, name="a"))
    b = clients(host.port, name="b")
    log_b = _recorder(b)
    conn_b = wait_for(lambda: host.get_client("b"))
    wait_for(lambda: host.get_client("a"))
    b.set_interest(["x"])
    wait_for(lambda: conn_b.interest is not None, what="b's interest at the host")
    written = [("x" if (i // 3) % 2 else "y", i) for i in range(N)]
    counts = _in_one_go(layer_host, [(host, "write_all", w) for w in written])
    assert counts == [2 if channel == "x" else 1 for channel, _ in written]
    wait_for(lambda: len(log_a) == N, what="every value at a")
    assert log_a == written
    want_b = [w for w in written if w[0] == "x"]
    wait_for(lambda: len(log_b) == len(want_b), what="the x values at b")
    assert log_b == want_b


@BOTH
def test_a_client_that_connects_during_a_burst_gets_all_after_its_open(
    layer_host: Side, clients
) -> None:  # type: ignore[no-untyped-def]
    host = layer_host.ep
    clients(host.port, name="first")
    stop = threading.Event()
    written = [0]
    if layer_host.runner is None:

        def burst() -> None:
            i = 0
            while not stop.is_set() and i < 2_000_000:
                host.write_all("n", i)
                i += 1
                written[0] = i

        writer: Any = threading.Thread(target=burst)
        writer.start()
    else:

        async def aburst() -> None:
            i = 0
            while not stop.is_set() and i < 2_000_000:
                await host.write_all("n", i)
                i += 1
                written[0] = i
                if i % 100 == 0:
                    await asyncio.sleep(0)  # the loop accepts the late client meanwhile

        writer = asyncio.run_coroutine_threadsafe(aburst(), layer_host.runner.loop)
    late = None
    try:
        wait_for(lambda: written[0] > 1000, what="the burst under way")
        late = clients(host.port, name="late")
        log = _recorder(late)
        # write_all(at_open) may have begun before open() returned; every later one
        # began after: those must all reach the late client.
        at_open = written[0]
        wait_for(lambda: len(log) > 1000, what="values at the late client")
    finally:
        stop.set()
        if layer_host.runner is None:
            writer.join(10)
        else:
            writer.result(10)
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


def test_an_asyncio_run_waits_for_at_most_fan_max_values(aio_loop: AioThread, clients) -> None:  # type: ignore[no-untyped-def]
    # A coroutine that never yields: the loop never hands a run over, the writer does
    # whenever FAN_MAX values wait.
    host = make_host("aio", aio_loop)
    try:
        logs = [_recorder(clients(host.ep.port, name=f"c{i}")) for i in range(3)]
        wait_for(lambda: len(host.ep.clients()) == 3, what="3 clients")
        n = 3 * FAN_MAX + 7

        async def burst() -> int:
            most = 0
            for i in range(n):
                await host.ep.write_all("fan", i)
                most = max(most, len(host.ep._fan.items))
            return most

        most = aio_loop.run(burst())
        assert 0 < most < FAN_MAX
        for log in logs:
            wait_for(lambda log=log: len(log) == n, what="every value")
            assert log == [("fan", i) for i in range(n)]
    finally:
        host.close()


def test_an_asyncio_run_pending_when_a_link_is_lost_goes_to_its_session(
    aio_loop: AioThread, clients
) -> None:  # type: ignore[no-untyped-def]
    # The link of "w" is reset (the host aborts it) while a run that includes "w"
    # waits for the loop's next step: connection_lost comes first and hands the run
    # into the queue its session keeps, so "w" gets the run on resume, then the rest.
    host = make_host("aio", aio_loop)
    try:
        w = clients(host.ep.port, name="w")
        log_w = _recorder(w)
        log_o = _recorder(clients(host.ep.port, name="o"))
        conn_w = wait_for(lambda: host.ep.get_client("w"))
        wait_for(lambda: len(host.ep.clients()) == 2, what="2 clients")
        reconnects = w.reconnects
        handed: List[Any] = []
        send_run = conn_w._send_run

        def recorded(items: List[bytes], nbytes: int) -> None:
            handed.append((conn_w._lost, len(items)))
            send_run(items, nbytes)

        conn_w._send_run = recorded

        async def burst() -> None:
            await host.ep.write_all("fan", 0)
            conn_w.transport.abort()  # connection_lost is the loop's next callback
            for i in range(1, 10):  # the run starts after it: lost first, then the tick
                await host.ep.write_all("fan", i)

        aio_loop.run(burst())
        wait_for(lambda: w.reconnects > reconnects, what="w reconnected (resumed)")
        aio_loop.run(host.ep.write_all("fan", 10))
        want = [("fan", i) for i in range(11)]
        wait_for(lambda: len(log_w) == 11, what="every value at w")
        assert log_w == want
        wait_for(lambda: len(log_o) == 11, what="every value at o")
        assert log_o == want
        assert (False, 9) in handed  # the run went to w in connection_lost
    finally:
        host.close()


@pytest.mark.parametrize("layer", LAYERS)
def test_a_client_that_stops_reading_during_bursts_is_dropped_the_rest_get_all(
    layer: str, aio_loop: AioThread, clients, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    # Runs of small values to a client that never reads: the run's slow-consumer
    # verdict drops it (its queue is bounded by max_buffer), the other gets everything.
    limit = 1 << 20
    host = make_host(layer, aio_loop, max_buffer=limit, timeout=0.5, heartbeat=None)
    try:
        with RawClient(host.ep.port, name="slow"):
            fast = clients(host.ep.port, name="fast")
            log = _recorder(fast)
            slow_conn = wait_for(lambda: host.ep.get_client("slow"))
            wait_for(lambda: len(host.ep.clients()) == 2, what="2 clients")
            text = "x" * 1000
            sent = 0
            for _ in range(2000):  # bounded: about 10 MB; the drop comes long before
                _in_one_go(
                    host, [(host.ep, "write_all", ("fan", [sent + k, text])) for k in range(50)]
                )
                sent += 50
                wait_for(lambda n=sent: len(log) == n, what="the fast client keeping up")
                assert slow_conn._queue.queued <= 2 * limit
                if not slow_conn.is_open:
                    break
            wait_for(lambda: [c.name for c in host.ep.clients()] == ["fast"], what="slow dropped")
            assert "slow consumer" in caplog.text
            assert host.do("write_all", "fan", ["after", ""]) == 1
            wait_for(lambda: len(log) == sent + 1, what="the value after the drop")
            assert [v for _, v in log] == [*([i, text] for i in range(sent)), ["after", ""]]
    finally:
        host.close()


@pytest.mark.parametrize("layer", LAYERS)
def test_a_burst_then_close_delivers_the_burst(layer: str, aio_loop: AioThread, clients) -> None:  # type: ignore[no-untyped-def]
    h = make_host(layer, aio_loop)
    logs = [_recorder(clients(h.ep.port, name=f"c{i}")) for i in range(3)]
    wait_for(lambda: len(h.ep.clients()) == 3, what="3 clients")
    # graceful: what was written goes before the BYE
    _in_one_go(h, [*((h.ep, "write_all", ("fan", i)) for i in range(N)), (h.ep, "close", ())])
    for log in logs:
        wait_for(lambda log=log: len(log) == N, what="the whole burst")
        assert log == [("fan", i) for i in range(N)]


@BOTH
def test_conn_flush_after_a_burst_waits_for_it(layer_host: Side, clients) -> None:  # type: ignore[no-untyped-def]
    host = layer_host.ep
    c = clients(host.port, name="c")
    clients(host.port, name="d")
    log = _recorder(c)
    conn = wait_for(lambda: host.get_client("c"))
    wait_for(lambda: len(host.clients()) == 2, what="2 clients")
    burst = [(host, "write_all", ("fan", i)) for i in range(N)]
    _in_one_go(layer_host, [*burst, (conn, "flush", ())])
    assert not host._fan  # handed over ...
    assert not conn._queue  # ... and sent
    layer_host.do("write_all", "fan", N)  # isolated ...
    if layer_host.runner is None:
        conn.flush(acked=True)  # ... and the client has stored them all
    else:
        layer_host.runner.run(conn.flush(acked=True))
    assert c.get("fan") == N
    wait_for(lambda: len(log) == N + 1, what="every value")


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
