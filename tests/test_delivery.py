"""Delivery API of the threaded layer: on, wait, subscribe, request, retain, hooks."""

import logging
import threading
import time
from functools import partial
from typing import Any, Callable, Tuple

import pytest
from conftest import thread_frame, wait_for

from socketengine import (
    Client,
    ConnectionClosed,
    EndpointClosed,
    Host,
    RemoteError,
    WriteTimeout,
    compiled,
)


def test_callbacks_on_both_sides_run_off_the_io_thread(host: Host, make_client) -> None:  # type: ignore[no-untyped-def]
    seen_host: list = []
    seen_client: list = []

    @host.on("up")
    def on_up(data, conn):  # type: ignore[no-untyped-def]
        seen_host.append((data, conn, threading.current_thread().name))

    c = make_client(name="cb")
    c.on("down", lambda data: seen_client.append((data, threading.current_thread().name)))
    c.write("up", 1)
    wait_for(lambda: seen_host)
    data, conn, thread = seen_host[0]
    assert data == 1 and conn is host.get_client("cb") and conn in host.clients()
    assert thread.startswith("socketengine-host-callbacks")
    host.write_all("down", "x")
    wait_for(lambda: seen_client)
    assert seen_client[0][0] == "x"
    assert seen_client[0][1].startswith("socketengine-client-callbacks")


def test_callbacks_keep_arrival_order(host: Host, make_client) -> None:  # type: ignore[no-untyped-def]
    got: list = []
    host.on("seq", lambda data, conn: got.append(data))
    c = make_client()
    for i in range(5000):
        c.write("seq", i)
    wait_for(lambda: len(got) == 5000)
    assert got == list(range(5000))


def test_a_raising_callback_is_logged_and_changes_nothing(host: Host, make_client, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.ERROR, logger="socketengine")
    good: list = []

    @host.on("ch")
    def bad(data, conn):  # type: ignore[no-untyped-def]
        raise RuntimeError("boom")

    host.on("ch", lambda data, conn: good.append(data))
    c = make_client()
    c.write("ch", 1)
    c.write("ch", 2)
    wait_for(lambda: good == [1, 2])
    assert any("boom" in (r.exc_text or "") for r in caplog.records)
    c.write("after", 3)
    wait_for(lambda: host.get("after") == 3)


def test_a_slow_callback_stalls_neither_reading_nor_other_clients(host: Host, make_client) -> None:  # type: ignore[no-untyped-def]
    release = threading.Event()
    fast: list = []

    @host.on("slow")
    def slow(data, conn):  # type: ignore[no-untyped-def]
        release.wait(10)

    host.on("fast", lambda data, conn: fast.append(data))
    a, b = make_client(), make_client()
    a.write("slow", 0)
    for i in range(100):
        a.write("value", i)
    wait_for(lambda: host.get("value") == 99)  # reading goes on
    b.write("fast", "ok")
    wait_for(lambda: fast == ["ok"])  # another client's callbacks go on
    release.set()


def test_off_removes_callbacks(host: Host, make_client) -> None:  # type: ignore[no-untyped-def]
    got: list = []

    def fn(data, conn):  # type: ignore[no-untyped-def]
        got.append(data)

    host.on("a", fn)
    host.off("a", fn)
    c = make_client()
    c.write("a", 1)
    wait_for(lambda: host.get("a") == 1)
    assert host._dispatcher.drain(5)
    assert got == []


def test_wait_returns_the_next_value(host: Host, make_client) -> None:  # type: ignore[no-untyped-def]
    c = make_client(name="w")
    c.write("v", "old")
    wait_for(lambda: host.get("v") == "old")
    result: list = []
    t = threading.Thread(target=lambda: result.append(host.wait("v", timeout=10)))
    t.start()
    wait_for(lambda: host._waiters.get("v"), what="the waiter to register")
    c.write("v", "new")
    t.join(10)
    data, conn = result[0]
    assert data == "new" and conn.name == "w"
    with pytest.raises(TimeoutError):
        host.wait("v", timeout=0.05)
    assert "v" not in host._waiters  # a timed-out waiter is removed

    t2 = threading.Thread(target=lambda: result.append(c.wait("reply", timeout=10)))
    t2.start()
    wait_for(lambda: c._waiters.get("reply"))
    host.write_all("reply", [1])
    t2.join(10)
    assert result[1] == [1]


def test_wait_is_released_by_close() -> None:
    h = Host(port=0)
    errors: list = []

    def waiter() -> None:
        try:
            h.wait("never", timeout=10)
        except EndpointClosed as exc:
            errors.append(exc)

    t = threading.Thread(target=waiter)
    t.start()
    wait_for(lambda: h._waiters.get("never"))
    h.close()
    t.join(10)
    assert errors


def test_subscribe_gets_every_message_in_order(host: Host, make_client) -> None:  # type: ignore[no-untyped-def]
    n = 100_000
    sub = host.subscribe("stream")
    c = make_client()
    for i in range(n):
        c.write("stream", i)
    got = [sub.get(timeout=10) for _ in range(n)]
    assert [d for d, _ in got] == list(range(n))
    assert all(conn is got[0][1] for _, conn in got)
    with pytest.raises(TimeoutError):
        sub.get(timeout=0.01)
    sub.close()
    assert list(sub) == []


def test_client_subscription_iterates_until_closed(host: Host, make_client) -> None:  # type: ignore[no-untyped-def]
    c = make_client()
    sub = c.subscribe("news")
    wait_for(lambda: host.clients())
    for i in range(10):
        host.write_all("news", i)
    got = []
    for item in sub:
        got.append(item)
        if len(got) == 10:
            sub.close()
    assert got == list(range(10))


def test_a_full_subscription_pauses_the_sender_and_loses_nothing(host: Host) -> None:
    sub = host.subscribe("bulk", maxsize=50)
    c = Client(port=host.port, max_buffer=1 << 20, timeout=0.3)
    payload = b"x" * 65536
    sent = 0
    try:
        for i in range(20_000):  # bounded: the sender must stall long before this
            c.write("bulk", [i, payload])
            sent += 1
    except WriteTimeout:
        pass
    assert sent < 20_000, "the sender never felt backpressure"
    conn = host.clients()[0]
    assert conn.reading_paused
    assert len(sub) < 50 + 64  # bounded: maxsize plus at most one read's worth
    for i in range(sent):
        data, _ = sub.get(timeout=10)
        assert data[0] == i and data[1] == payload
    wait_for(lambda: not conn.reading_paused)
    c.write("bulk", ["after", b""])
    assert sub.get(timeout=10)[0] == ["after", b""]
    c.close()


def test_request_reply_both_directions(host: Host, make_client) -> None:  # type: ignore[no-untyped-def]
    @host.on("add")
    def add(data, conn):  # type: ignore[no-untyped-def]
        return sum(data)

    c = make_client(name="r")

    @c.on("name")
    def name(data):  # type: ignore[no-untyped-def]
        return f"I am r, you said {data}"

    assert c.request("add", [1, 2, 3]) == 6
    assert c.request("add", (4, 5), timeout=None) == 9
    conn = wait_for(lambda: host.get_client("r"))
    assert conn.request("name", "hi") == "I am r, you said hi"


def test_request_errors(host: Host, make_client) -> None:  # type: ignore[no-untyped-def]
    release = threading.Event()

    @host.on("fail")
    def fail(data, conn):  # type: ignore[no-untyped-def]
        raise ValueError(f"bad input {data}")

    @host.on("slow")
    def slow(data, conn):  # type: ignore[no-untyped-def]
        release.wait(10)
        return "late"

    host.on("unsendable", lambda data, conn: {1, 2})
    c = make_client()
    with pytest.raises(RemoteError, match="ValueError: bad input 7"):
        c.request("fail", 7)
    with pytest.raises(RemoteError, match="no handler"):
        c.request("nobody", 1)
    with pytest.raises(RemoteError, match="could not be sent"):
        c.request("unsendable", 1)
    with pytest.raises(TimeoutError):
        c.request("slow", 1, timeout=0.1)
    release.set()
    with pytest.raises(TypeError):
        c.request("fail", {1})
    assert c.request("slow", 2) == "late"  # the late reply to the timed-out one is ignored


def test_request_to_a_peer_that_disconnects(host: Host, make_client) -> None:  # type: ignore[no-untyped-def]
    started = threading.Event()
    release = threading.Event()

    @host.on("hang")
    def hang(data, conn):  # type: ignore[no-untyped-def]
        started.set()
        release.wait(10)

    c = make_client()
    errors: list = []

    def ask() -> None:
        try:
            c.request("hang", 1, timeout=20)
        except ConnectionError as exc:
            errors.append(exc)

    t = threading.Thread(target=ask)
    t.start()
    assert started.wait(10)
    host.clients()[0].close(timeout=1)
    t.join(10)
    release.set()
    assert errors and isinstance(errors[0], ConnectionClosed)


def test_retained_values_reach_late_clients(host: Host, make_client) -> None:  # type: ignore[no-untyped-def]
    host.write_all("config", {"rate": 30}, retain=True)
    host.write_all("volatile", 1)
    c = make_client()
    wait_for(lambda: c.get("config") == {"rate": 30})
    assert c.get("volatile") is None
    host.write_all("config", {"rate": 60}, retain=True)
    wait_for(lambda: c.get("config") == {"rate": 60})
    late = make_client()
    wait_for(lambda: late.get("config") == {"rate": 60})
    host.clear_retained("config")
    assert make_client().get("config") is None


def test_retained_values_race_with_new_clients() -> None:
    """Clients connecting while the retained value changes end with the newest one."""
    with Host(port=0) as h:
        clients = []
        for i in range(10):
            h.write_all("state", i, retain=True)
            clients.append(Client(port=h.port))
        h.write_all("state", "final", retain=True)
        for c in clients:
            wait_for(partial(lambda c: c.get("state") == "final", c))
            c.close()


def test_on_connect_and_on_disconnect(host: Host) -> None:
    events: list = []
    host.on_connect(lambda conn: events.append(("connect", conn.name)))

    @host.on_disconnect
    def gone(conn):  # type: ignore[no-untyped-def]
        events.append(("disconnect", conn.name))

    with Client(port=host.port, name="cam-1"):
        wait_for(lambda: events == [("connect", "cam-1")])
    wait_for(lambda: events == [("connect", "cam-1"), ("disconnect", "cam-1")])


def test_callback_threads_are_bounded_and_joined() -> None:
    h = Host(port=0)
    h.on("x", lambda data, conn: None)
    clients = [Client(port=h.port) for _ in range(12)]
    for c in clients:
        c.write("x", 1)
    wait_for(lambda: len(h.get_all("x")) == 12)
    workers = [t for t in threading.enumerate() if "host-callbacks" in t.name]
    assert 1 <= len(workers) <= 4
    for c in clients:
        c.close()
    h.close()
    assert not any(t.is_alive() for t in workers)


def test_on_message_sees_every_channel(host: Host, make_client) -> None:  # type: ignore[no-untyped-def]
    seen: list = []
    host.on_message(lambda channel, data, conn: seen.append((channel, data, conn.name)))
    c = make_client(name="m")
    got: list = []
    c.on_message(lambda channel, data: got.append((channel, data)))
    c.write("a", 1)
    c.write("b", [2])
    wait_for(lambda: seen == [("a", 1, "m"), ("b", [2], "m")])
    wait_for(lambda: host.clients())
    host.write_all("down", "x")
    wait_for(lambda: got == [("down", "x")])
    with pytest.raises(TypeError):
        host.on_message("not callable")  # type: ignore[type-var]


def test_inline_callbacks_run_on_the_io_thread_and_answer_requests() -> None:
    import threading as _threading

    from socketengine import Pattern

    with Host(port=0) as h, Client(port=h.port) as c:
        threads = []

        @h.on("ping", inline=True)
        def ping(data: Any, conn: Any) -> Any:
            threads.append(_threading.current_thread().name)
            conn.write("pong", data)  # never blocks the I/O thread: it queues
            return data + 1

        assert c.request("ping", 41, timeout=5) == 42
        wait_for(lambda: c.get("pong") == 41, what="the pong written inline")
        assert threads == ["socketengine-host"]
        h.off("ping")
        with pytest.raises(RemoteError, match="no handler"):
            c.request("ping", 1, timeout=5)
        with pytest.raises(ValueError, match="Pattern"):
            h.on(Pattern("a/+"), lambda *a: None, inline=True)


def test_a_callback_that_outlives_stop_finishes_without_an_error() -> None:
    # stop() runs what is queued for up to its timeout, then drops the rest; a callback
    # still running then must end quietly (it raised KeyError in its worker thread).
    from socketengine.sync.delivery import Dispatcher

    class Key:
        def pause_reading(self) -> None: ...

        def resume_reading(self) -> None: ...

    errors: list = []
    hook = threading.excepthook
    threading.excepthook = lambda args: errors.append(args.exc_value)
    try:
        d = Dispatcher("test", workers=1)
        started, release, ran = threading.Event(), threading.Event(), threading.Event()

        def slow() -> None:
            started.set()
            release.wait(10)
            ran.set()

        d.submit(Key(), slow)
        assert started.wait(10)
        d.stop(timeout=0.05)  # gives up waiting for it
        release.set()
        assert ran.wait(10)
        worker = d._threads[0]
        worker.join(10)
        assert not worker.is_alive()
    finally:
        threading.excepthook = hook
    assert errors == []


class _Key:
    """A connection as the Dispatcher sees it: counts its pauses."""

    def __init__(self) -> None:
        self.paused = 0

    def pause_reading(self) -> None:
        self.paused += 1

    def resume_reading(self) -> None:
        self.paused -= 1


def test_the_dispatcher_runs_each_keys_callbacks_in_order_across_parked_workers() -> None:
    # Workers park between bursts (each on a lock of its own) and are woken one at a
    # time; every key's callbacks still run once each, in order, never two at once.
    from socketengine.sync.delivery import Dispatcher

    d = Dispatcher("test", workers=2)
    keys = [_Key() for _ in range(5)]
    seen: dict = {id(k): [] for k in keys}
    busy: set = set()
    overlap: list = []
    guard = threading.Lock()

    def record(key: _Key, n: int) -> None:
        with guard:
            if id(key) in busy:
                overlap.append(n)
            busy.add(id(key))
        seen[id(key)].append(n)
        with guard:
            busy.discard(id(key))

    try:
        for burst in range(30):
            for n in range(burst * 10, burst * 10 + 10):
                for k in keys:
                    d.submit(k, record, k, n)
            assert d.drain(10)
            # Everything ran: both workers are parked again before the next burst.
            wait_for(lambda: len(d._parked) == len(d._threads), what="parked workers")
        assert len(d._threads) == 2
        for k in keys:
            assert seen[id(k)] == list(range(300))
        assert overlap == []
    finally:
        d.stop()
    for t in d._threads:
        t.join(10)
        assert not t.is_alive()


def test_the_dispatcher_pauses_a_key_and_stop_ends_parked_workers() -> None:
    from socketengine.sync.delivery import Dispatcher

    d = Dispatcher("test", workers=1, pause_at=4)
    k = _Key()
    release = threading.Event()
    done: list = []

    def slow(n: int) -> None:
        release.wait(10)
        done.append(n)

    for n in range(8):
        d.submit(k, slow, n)
    assert k.paused == 1  # 4 waiting: the connection stops being read
    assert not d.drain(0.05)  # still blocked
    release.set()
    assert d.drain(10)
    assert done == list(range(8))
    assert k.paused == 0  # resumed once half had run
    wait_for(lambda: len(d._parked) == 1, what="the worker parked")
    d.stop()
    d._threads[0].join(10)
    assert not d._threads[0].is_alive()
    d.submit(k, done.append, 99)  # after stop: ignored
    assert done == list(range(8))


def test_a_subscription_read_by_several_threads_hands_each_item_to_one_of_them() -> None:
    # Blocked readers sleep on locks of their own; a put wakes one, the end wakes all.
    from socketengine import EndpointClosed
    from socketengine.sync.delivery import Subscription

    closed: list = []
    sub: Subscription[int] = Subscription("ch", 1000, closed.append)
    key = _Key()
    got: list = []
    guard = threading.Lock()

    def read() -> None:
        while True:
            try:
                item = sub.get(timeout=10)
            except EndpointClosed:
                return
            with guard:
                got.append(item)

    readers = [threading.Thread(target=read) for _ in range(3)]
    for t in readers:
        t.start()
    wait_for(lambda: len(sub._waiters) == 3, what="three blocked readers")
    for n in range(300):
        sub.put(n, key)
        if n % 50 == 0:  # let the readers block again now and then
            wait_for(partial(lambda n: len(got) == n + 1, n), what="the item read")
    wait_for(lambda: len(got) == 300, what="every item read")
    sub.close()
    for t in readers:
        t.join(10)
        assert not t.is_alive()
    assert sorted(got) == list(range(300))
    assert closed == [sub]
    assert not sub._waiters
    with pytest.raises(EndpointClosed):
        sub.get(timeout=1)


def test_a_subscription_get_times_out_and_leaves_no_waiter_behind() -> None:
    from socketengine.sync.delivery import Subscription

    sub: Subscription[int] = Subscription("ch", 10, lambda s: None)
    with pytest.raises(TimeoutError, match="no message on 'ch'"):
        sub.get(timeout=0.02)
    assert not sub._waiters
    sub.put(7, _Key())
    assert sub.get(timeout=0) == 7


# -- a waiting client thread reads its own reply (Connection.read_until) ------------------


def _in_poll(t: threading.Thread, c: Client) -> bool:
    """``t`` is blocked in ``read_until``'s ``poll`` on ``c``'s connection.

    Interpreted, its innermost Python frame is on that line.  Compiled (the mypyc build
    of socketengine/compiled.py), ``read_until`` has no Python frame: then ``t`` holds
    the client's wake pipe (taken just before the poll loop) and the kernel says it
    sleeps in a poll (Linux: /proc/self/task/<tid>/wchan)."""
    import linecache

    frame = thread_frame(t)
    if frame is not None and frame.f_code.co_name == "read_until":
        return "poller.poll(" in linecache.getline(frame.f_code.co_filename, frame.f_lineno)
    if "socketengine.sync.connection" not in compiled.modules():
        return False
    wake = c._reader_wake
    if wake is None or wake._users != 1:
        return False
    try:
        with open(f"/proc/self/task/{t.native_id}/wchan") as f:
            return "poll" in f.read()
    except OSError:
        return False


def _self_reading(c: Client) -> bool:
    conn = c._conn
    return conn is not None and conn._self_reader


def _request_in_thread(c: Client, channel: str, data: Any, timeout: float = 30) -> Any:
    out: dict = {}

    def ask() -> None:
        out["thread"] = threading.current_thread().name
        try:
            out["reply"] = c.request(channel, data, timeout=timeout)
        except Exception as exc:  # kept for the test to check
            out["error"] = exc

    t = threading.Thread(target=ask, name="asker")
    t.start()
    out["t"] = t
    return out


def test_an_asking_thread_reads_its_reply_and_what_comes_first(host: Host, make_client) -> None:  # type: ignore[no-untyped-def]
    release = threading.Event()

    @host.on("job")
    def job(data, conn):  # type: ignore[no-untyped-def]
        release.wait(10)
        conn.write("note", data * 10)  # arrives before the reply
        return data + 1

    c = make_client()
    seen: list = []
    c.on("note", lambda data: seen.append((data, threading.current_thread().name)), inline=True)
    got = _request_in_thread(c, "job", 4)
    wait_for(lambda: _self_reading(c), what="the asker reading its own connection")
    release.set()
    got["t"].join(10)
    assert got.get("reply") == 5, got
    # the value before the reply was handled exactly as the I/O thread would, on the asker
    assert seen == [(40, "asker")]
    assert c.get("note") == 40
    assert not _self_reading(c)
    # the I/O thread reads again once the asker is done
    host.write_all("after", 1)
    wait_for(lambda: c.get("after") == 1, what="a value read by the I/O thread")


def test_a_subscriber_thread_reads_its_connection_itself(host: Host, make_client) -> None:  # type: ignore[no-untyped-def]
    c = make_client()
    sub = c.subscribe("feed")
    seen: list = []
    c.on("feed", lambda data: seen.append(threading.current_thread().name), inline=True)
    out: dict = {}

    def read(name: str) -> None:
        out[name] = [sub.get(timeout=10) for _ in range(2)]

    first = threading.Thread(target=read, args=("first",), name="first")
    first.start()
    wait_for(lambda: _self_reading(c), what="the subscriber reading its own connection")
    # A second reader of the same subscription waits plainly: one thread reads at a time.
    second = threading.Thread(target=read, args=("second",), name="second")
    second.start()
    wait_for(lambda: len(sub._waiters) == 2, what="two blocked readers")
    for n in range(4):
        host.write_all("feed", n)
    first.join(10)
    second.join(10)
    assert sorted(out["first"] + out["second"]) == [0, 1, 2, 3]
    assert out["first"] == sorted(out["first"]) and out["second"] == sorted(out["second"])
    # The value that woke the first reader was handled on it, as the I/O thread would.
    assert seen[0] == "first"
    wait_for(lambda: not _self_reading(c), what="the socket handed back")
    host.write_all("after", 1)
    wait_for(lambda: c.get("after") == 1, what="a value read by the I/O thread")
    with pytest.raises(TimeoutError):
        sub.get(timeout=0.05)  # reads the connection for 50 ms, then gives it back
    assert not _self_reading(c) and not sub._waiters


def test_closing_a_subscription_wakes_its_reading_thread(  # type: ignore[no-untyped-def]
    make_client, monkeypatch
) -> None:
    # The reader would otherwise notice only at its next poll slice, or when a heartbeat
    # arrives: make both a minute, so only the wake ends the wait within the deadline.
    from socketengine.sync import connection

    monkeypatch.setattr(connection, "_SELF_READ_SLICE", 60.0)
    host = Host(port=0, heartbeat=60)
    c = make_client(port=host.port, heartbeat=60)
    sub = c.subscribe("feed")
    out: dict = {}

    def read() -> None:
        try:
            sub.get()
        except EndpointClosed as exc:
            out["error"] = exc

    t = threading.Thread(target=read)
    t.start()
    wait_for(lambda: _in_poll(t, c), what="the subscriber polling its own connection")
    assert _self_reading(c)
    sub.close()
    t.join(30)
    try:
        assert not t.is_alive() and isinstance(out.get("error"), EndpointClosed)
        wait_for(lambda: not _self_reading(c), what="the socket handed back")
        host.write_all("after", 1)
        wait_for(lambda: c.get("after") == 1, what="a value read by the I/O thread")
        wake = c._reader_wake
        assert wake._fds is not None and wake._users == 0
        c.close()
        assert wake._fds is None  # the pipe goes with the client
    finally:
        c.close()
        host.close()


def test_a_self_reading_request_serves_other_waiters_and_callbacks(host: Host, make_client) -> None:  # type: ignore[no-untyped-def]
    release = threading.Event()

    @host.on("job")
    def job(data, conn):  # type: ignore[no-untyped-def]
        release.wait(10)
        return "done"

    c = make_client()
    called = threading.Event()
    c.on("other", lambda data: called.set())  # a pooled callback, submitted by the asker
    got = _request_in_thread(c, "job", 1)
    wait_for(lambda: _self_reading(c), what="the asker reading its own connection")
    waited: dict = {}
    waiter = threading.Thread(target=lambda: waited.setdefault("v", c.wait("other", timeout=10)))
    waiter.start()
    wait_for(lambda: c._waiters.get("other"), what="the second thread waiting")
    host.write_all("other", "hello")
    waiter.join(10)
    assert waited == {"v": "hello"}  # read by the asker, handed to the waiter
    assert called.wait(10)
    release.set()
    got["t"].join(10)
    assert got.get("reply") == "done", got


def test_close_wakes_a_thread_reading_its_own_reply(host: Host) -> None:
    release = threading.Event()
    host.on("hang", lambda data, conn: release.wait(10))
    c = Client(port=host.port)
    got = _request_in_thread(c, "hang", 1, timeout=60)
    wait_for(lambda: _self_reading(c), what="the asker reading its own connection")
    c.close()
    got["t"].join(10)
    release.set()
    assert not got["t"].is_alive(), "request() did not end with close()"
    assert isinstance(got.get("error"), (ConnectionClosed, EndpointClosed)), got


def test_a_full_subscription_hands_reading_back_and_loses_nothing(host: Host, make_client) -> None:  # type: ignore[no-untyped-def]
    @host.on("burst", inline=True)
    def burst(n, conn):  # type: ignore[no-untyped-def]
        for i in range(n):
            conn.write("flood", i)
        return "sent"

    c = make_client()
    sub = c.subscribe("flood", maxsize=2)
    got = _request_in_thread(c, "burst", 50)
    # the asker reads the flood, the subscription fills, reading pauses: the reply
    # waits behind the values until the subscriber drains them
    assert [sub.get(timeout=10) for _ in range(50)] == list(range(50))
    got["t"].join(10)
    assert got.get("reply") == "sent", got
    wait_for(lambda: not c._conn.reading_paused, what="reading resumed (asynchronously)")
    host.write_all("flood", "more")
    assert sub.get(timeout=10) == "more"


def test_the_loop_keeps_its_timers_while_a_thread_reads_its_reply() -> None:
    release = threading.Event()
    with Host(port=0, heartbeat=0.05) as h, Client(port=h.port, heartbeat=0.05) as c:
        h.on("slow", lambda data, conn: release.wait(10) and "late")
        got = _request_in_thread(c, "slow", 1)
        wait_for(lambda: _self_reading(c), what="the asker reading its own connection")
        conn = c._conn
        (at_host,) = h.clients()
        start = at_host.bytes_in
        # Heartbeat traffic keeps flowing from the client while the asker reads: its
        # PINGs come from a loop timer, its PONGs (to what the asker reads) leave on a
        # loop timer too.  Twenty 16-byte frames, far beyond the 3-beat dead-peer limit.
        wait_for(lambda: at_host.bytes_in >= start + 20 * 16, what="heartbeat traffic")
        assert c.connected and conn is c._conn and _self_reading(c)
        release.set()
        got["t"].join(10)
        assert got.get("reply") == "late", got


class _Interrupted(Exception):
    pass


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise _Interrupted


def _when_self_reading(c: Client, action: Any) -> threading.Thread:
    """A thread that calls ``action()`` once a thread of ``c`` reads its own reply."""

    def run() -> None:
        wait_for(lambda: _self_reading(c), what="the main thread reading its own reply")
        action()

    t = threading.Thread(target=run)
    t.start()
    return t


def test_ctrl_c_interrupts_a_main_thread_reading_its_own_reply(host: Host, make_client) -> None:  # type: ignore[no-untyped-def]
    import os
    import signal

    release = threading.Event()
    host.on("hang", lambda data, conn: release.wait(10) and "late")
    c = make_client()
    previous = signal.signal(signal.SIGINT, _raise_interrupted)
    try:
        t = _when_self_reading(c, lambda: os.kill(os.getpid(), signal.SIGINT))
        with pytest.raises(_Interrupted):  # raised while it waits: at once
            c.request("hang", 1, timeout=30)
        t.join(10)
        assert signal.getsignal(signal.SIGINT) is _raise_interrupted  # put back
        assert not _self_reading(c)
        release.set()
        assert c.request("hang", 2, timeout=10) == "late"  # the connection is intact
    finally:
        release.set()
        signal.signal(signal.SIGINT, previous)


def test_ctrl_c_in_a_read_step_waits_until_its_frames_are_handled(host: Host, make_client) -> None:  # type: ignore[no-untyped-def]
    import signal

    release = threading.Event()

    @host.on("job")
    def job(data, conn):  # type: ignore[no-untyped-def]
        release.wait(10)
        conn.write_many([("note", 1), ("note", 2)])
        return "done"

    c = make_client()
    notes: list = []

    @c.on("note", inline=True)
    def note(value: Any) -> None:  # runs on the main thread, which reads its reply
        notes.append((value, threading.current_thread() is threading.main_thread()))
        if len(notes) == 1:
            signal.raise_signal(signal.SIGINT)  # lands while the frames are handled

    previous = signal.signal(signal.SIGINT, _raise_interrupted)
    try:
        t = _when_self_reading(c, release.set)
        with pytest.raises(_Interrupted):
            c.request("job", 1, timeout=30)
        t.join(10)
        # the interrupt waited for the read step: both values were handled, whole
        assert notes[0] == (1, True)
        wait_for(lambda: c.get("note") == 2, what="the second note")
        assert [v for v, _ in notes] == [1, 2]
        assert c.request("job", 2, timeout=10) == "done"  # the connection is intact
        assert [v for v, _ in notes] == [1, 2, 1, 2]
    finally:
        release.set()
        signal.signal(signal.SIGINT, previous)


def test_an_acknowledged_write_reads_its_own_ack(host: Host, make_client) -> None:  # type: ignore[no-untyped-def]
    sub = host.subscribe("x", maxsize=1)  # full after one value: the host stops reading
    c = make_client()
    for i in range(3):
        c.write("x", i)
    (conn,) = wait_for(lambda: host.clients(), what="the client at the host")
    # only once the host has stopped reading is the ACK sure to wait for the subscriber
    wait_for(lambda: conn.reading_paused, what="the host pausing its reading")
    done: dict = {}

    def acked_write() -> None:
        c.write("x", 3, ack=True, timeout=30)
        done["ok"] = True

    t = threading.Thread(target=acked_write)
    t.start()
    wait_for(lambda: _self_reading(c), what="the writer waiting for its ACK, reading")
    assert [sub.get(timeout=10)[0] for _ in range(4)] == [0, 1, 2, 3]
    t.join(10)
    assert done == {"ok": True}
    assert not _self_reading(c)


def test_a_host_thread_reads_its_own_reply_from_one_client(host: Host, make_client) -> None:  # type: ignore[no-untyped-def]
    release = threading.Event()
    c = make_client(name="cam")

    @c.on("job")
    def job(data):  # type: ignore[no-untyped-def]
        release.wait(10)
        c.write("note", data * 10)  # reaches the host before the reply
        return data + 1

    seen: list = []
    host.on(
        "note", lambda data, conn: seen.append((data, threading.current_thread().name)), inline=True
    )
    conn = wait_for(lambda: host.get_client("cam"), what="the client at the host")
    out: dict = {}

    def ask() -> None:
        out["reply"] = conn.request("job", 4, timeout=30)

    t = threading.Thread(target=ask, name="host-asker")
    t.start()
    wait_for(lambda: conn._self_reader, what="the host thread reading that connection")
    release.set()
    t.join(10)
    assert out == {"reply": 5}
    assert seen == [(40, "host-asker")]  # handled as the I/O thread would, on the asker
    assert conn.values["note"] == 40 and not conn._self_reader
    c.write("after", 1)  # the host's I/O thread reads that connection again
    wait_for(lambda: conn.values.get("after") == 1, what="a value read by the I/O thread")


# -- a self-reading thread spins first (Endpoint.spin, Connection.read_until) ----------


def test_spin_settings() -> None:
    from socketengine.limits import DEFAULT_SPIN, check_spin, default_spin

    assert check_spin(0) == 0.0 and check_spin(1) == 1.0 and check_spin(25e-6) == 25e-6
    assert check_spin(None) == default_spin()
    for bad in (-1e-6, 1.5, "50us", True, float("nan")):
        with pytest.raises(ValueError, match="spin must be a number of seconds"):
            check_spin(bad)
    assert DEFAULT_SPIN == 100e-6


def test_no_spin_on_one_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from socketengine.limits import DEFAULT_SPIN, default_spin

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert default_spin() == 0.0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert default_spin() == DEFAULT_SPIN


def test_spin_is_a_setting_of_both_endpoints(host: Host, make_client) -> None:  # type: ignore[no-untyped-def]
    from socketengine.limits import default_spin

    assert host.spin == default_spin() and make_client().spin == default_spin()
    c = make_client(spin=0)
    assert c.spin == 0.0
    h = Host(port=0, spin=2e-4)
    try:
        assert h.spin == 2e-4
    finally:
        h.close()
    with pytest.raises(ValueError, match="spin"):
        make_client(spin=-1)


def test_a_spin_that_runs_out_sends_the_next_waits_to_sleep(host: Host, make_client) -> None:  # type: ignore[no-untyped-def]
    slow = threading.Event()
    host.on("job", lambda data, conn: (slow.wait(0.6) if data == "slow" else None) or data)
    c = make_client(spin=0.25)  # a loopback reply comes well within 250 ms
    conn = c._conn
    assert conn is not None
    spin = conn.reply_spin

    def credit() -> Tuple[int, int]:
        return (spin.skip, spin.misses)

    assert credit() == (0, 0)
    assert c.request("job", "quick", timeout=10) == "quick"
    assert credit() == (0, 0)  # came during the spin
    assert c.request("job", "slow", timeout=10) == "slow"  # after 0.6 s: ran out
    assert credit() == (1, 1)  # the next wait sleeps
    assert c.request("job", "slow", timeout=10) == "slow"  # asleep: not a spin
    assert credit() == (0, 1)
    assert c.request("job", "slow", timeout=10) == "slow"  # spun, ran out again
    assert credit() == (3, 2)
    for left in (2, 1, 0):
        assert c.request("job", "quick", timeout=10) == "quick"  # asleep
        assert credit() == (left, 2)
    assert c.request("job", "quick", timeout=10) == "quick"  # spun, in time
    assert credit() == (0, 0)
    spin.misses = 6
    assert c.request("job", "slow", timeout=10) == "slow"
    assert credit() == (63, 6)  # capped: 1 wait in 64
    assert (conn.answer_spin.skip, conn.answer_spin.misses) == (0, 0)  # its own credit
    c.spin = 0  # off: nothing is counted
    spin.skip = 0
    assert c.request("job", "slow", timeout=10) == "slow"
    assert credit() == (0, 6)


def test_a_wait_right_after_a_write_spins_for_the_answer(host: Host, make_client) -> None:  # type: ignore[no-untyped-def]
    # wait() or a subscription's get() within ANSWER_WINDOW of a write, with nothing
    # from the peer since, waits for the answer: it spins first, on its own credit.
    from socketengine.sendqueue import ANSWER_WINDOW

    def answer(data: Any, conn: Any) -> None:
        if data == "slow":
            threading.Event().wait(0.6)  # a slow peer: longer than the spin
        elif data == "quick":
            # wait() sees only values that come after it began: on a loaded machine
            # the answer could otherwise come first (the waiter is in by now, as a rule)
            wait_for(lambda: c._waiters.get("answer"), what="the waiter to register")
        conn.write("answer", data)

    host.on("ask", answer)
    c = make_client(spin=0.25)
    conn = c._conn
    assert conn is not None
    spin = conn.answer_spin

    def credit() -> Tuple[int, int]:
        return (spin.skip, spin.misses)

    def ask(data: str) -> Any:
        c.write("ask", data)
        return c.wait("answer", timeout=10)

    def step(data: str, expect: Tuple[int, int], go: Callable[[str], Any] = ask) -> None:
        # A wait that begins more than ANSWER_WINDOW after its write (this thread held
        # up that long on a loaded machine) does not consult the credit at all, which
        # leaves it as it was: such a step is taken again (each slow step changes the
        # credit when consulted, so an unchanged credit means it was not).
        for _ in range(5):
            before = credit()
            assert go(data) == data
            if credit() != before or before == expect:
                break
        assert credit() == expect

    step("quick", (0, 0))  # came during the spin
    step("slow", (1, 1))  # ran out: the next one sleeps
    step("slow", (0, 1))  # asleep, not counted
    step("slow", (3, 2))
    assert (conn.reply_spin.skip, conn.reply_spin.misses) == (0, 0)  # requests keep theirs
    spin.skip = spin.misses = 0
    with c.subscribe("answer") as sub:  # a subscription's get() alike

        def sub_ask(data: str) -> Any:
            c.write("ask", data)
            return sub.get(timeout=10)

        step("slow", (1, 1), sub_ask)
    spin.skip = spin.misses = 0

    # Not on a client that did not write: a value that comes whenever the peer writes it.
    quiet = make_client(spin=0.25)
    qconn = quiet._conn
    assert qconn is not None and not qconn.owed(time.monotonic())
    t = threading.Thread(target=_write_once_awaited, args=(host, quiet, "later"))
    t.start()
    assert quiet.wait("answer", timeout=10) == "later"
    t.join(10)
    assert (qconn.answer_spin.skip, qconn.answer_spin.misses) == (0, 0)
    # Not once the peer sent something since the write (its answer came already).
    c.write("ask", "fast")
    wait_for(lambda: c.get("answer") == "fast" and conn._queue.answering, what="the answer")
    assert not conn.owed(time.monotonic())
    # Nor longer than ANSWER_WINDOW after the write.
    c.write("ask", "slow")  # answered in 0.6 s
    wait_for(lambda: time.monotonic() - conn._queue.last_write > ANSWER_WINDOW, what="the window")
    assert c.wait("answer", timeout=10) == "slow" and credit() == (0, 0)


def _write_once_awaited(host: Host, client: Client, value: str) -> None:
    wait_for(lambda: client._waiters.get("answer"), what="the waiter to register")
    host.write_all("answer", value)


def test_the_peer_owes_an_answer_right_after_a_write() -> None:
    from socketengine.sendqueue import ANSWER_WINDOW, SendQueue

    q = SendQueue(max_buffer=1 << 20)
    assert not q.owed(1.0)  # never wrote
    q.wrote(1.0)
    assert q.owed(1.0) and q.owed(1.0 + ANSWER_WINDOW)
    assert not q.owed(1.0 + 2 * ANSWER_WINDOW)  # too long after the write
    q.answering = True  # the peer sent application frames since (ConnectionEngine.events)
    assert not q.owed(1.0)
    q.wrote(2.0)
    assert q.owed(2.0)


def test_ctrl_c_during_the_spin_interrupts_at_once(host: Host, make_client) -> None:  # type: ignore[no-untyped-def]
    # With a 1 s spin the signal lands while the main thread polls without blocking:
    # no poll is interrupted, so the handlers are run when the spin runs out, not when
    # the reply comes (never, here, before the request's timeout).
    import os
    import signal

    release = threading.Event()
    host.on("hang", lambda data, conn: release.wait(30) and "late")
    c = make_client(spin=1.0)
    previous = signal.signal(signal.SIGINT, _raise_interrupted)
    try:
        t = _when_self_reading(c, lambda: os.kill(os.getpid(), signal.SIGINT))
        with pytest.raises(_Interrupted) as raised:
            c.request("hang", 1, timeout=20)
        t.join(10)
        # not raised on top of the request's TimeoutError: it interrupted the wait itself
        assert raised.value.__context__ is None and not release.is_set()
        assert signal.getsignal(signal.SIGINT) is _raise_interrupted
        assert not _self_reading(c)
        release.set()
        assert c.request("hang", 2, timeout=10) == "late"
    finally:
        release.set()
        signal.signal(signal.SIGINT, previous)
