"""Resume across link failures (protocol 1.2), against both I/O layers.

A client and a host exchange sequenced values through a :class:`CuttingProxy` that
cuts the link (clean close, reset, blackhole) a few times while both endpoints live:
nothing may be lost, duplicated or reordered, either way.  Bounded waits, no sleeps.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Iterator, List, Sequence

import pytest
from conftest import wait_for
from faults import CuttingProxy, RawClient
from test_parity import LAYERS, AioThread, make_client, make_host

from socketengine import Client, ConnectionClosed, HandshakeError, frames

H = 0.2  # heartbeat: a blackhole is noticed within 3·H


@pytest.fixture
def loop_thread() -> Iterator[AioThread]:
    runner = AioThread()
    yield runner
    runner.close()


def _cut(proxy: CuttingProxy, kind: str, client: Any) -> None:
    before = client.ep.reconnects
    if kind == "blackhole":
        proxy.blackhole(new_links=False)
        # Noticed within 3·H by the heartbeat; then the network heals.
        wait_for(lambda: not client.ep.connected, 10 * H, "the blackhole noticed")
        proxy.resume()
    else:
        proxy.cut(kind)
    wait_for(lambda: client.ep.reconnects > before, 10.0, f"a reconnection after a {kind}")


def _check(got: List[int], n: int, way: str) -> None:
    """Exactly 0..n-1, in order: else say what was lost, duplicated or reordered."""
    if got == list(range(n)):
        return
    lost = sorted(set(range(n)) - set(got))
    dups = len(got) - len(set(got))
    runs = []
    for v in lost:
        if runs and runs[-1][1] == v - 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    raise AssertionError(
        f"{way}: {len(lost)} lost (runs {runs[:10]}), {dups} duplicated, "
        f"in order: {got == sorted(got)}"
    )


def _cut_under_load(
    proxy: CuttingProxy,
    client: Any,
    workers: List[threading.Thread],
    stop: threading.Event,
    kinds: Sequence[str],
    progress: Callable[[], int],
    step: int,
) -> None:
    """Start ``workers``; for each of ``kinds``, once ``progress()`` grew by ``step``,
    cut the link that way and wait for the reconnection; then stop and join them."""
    for w in workers:
        w.start()
    try:
        for kind in kinds:
            mark = progress() + step
            wait_for(lambda m=mark: progress() > m, 10.0, "values flowing")
            _cut(proxy, kind, client)
    finally:
        stop.set()
        for w in workers:
            w.join(10)


def _wait_all(got: List[int], n: int, timeout: float, way: str) -> None:
    """Wait until ``got`` holds ``n`` values; on time-out, say what is missing."""
    try:
        wait_for(lambda: len(got) >= n, timeout, f"{n} values, {way}")
    except AssertionError:
        _check(got, n, way)
        raise


@pytest.mark.parametrize("layer", LAYERS)
def test_no_loss_no_duplicates_in_order_across_cuts(layer: str, loop_thread: AioThread) -> None:
    host = make_host(layer, loop_thread, heartbeat=H)
    at_host: List[int] = []
    at_client: List[int] = []
    lock = threading.Lock()

    def on_host(value: Any, *rest: Any) -> None:
        with lock:
            at_host.append(value)

    host.ep.on("n", on_host)
    with CuttingProxy(host.ep.port) as proxy:
        client = make_client(layer, loop_thread, proxy.port, heartbeat=H, name="w")

        def on_client(value: Any, *rest: Any) -> None:
            with lock:
                at_client.append(value)

        client.ep.on("n", on_client)
        wait_for(lambda: host.ep.clients(), 5.0, "the client at the host")
        stop = threading.Event()
        sent_down = [0]

        def writer() -> None:
            i = 0
            deadline = time.monotonic() + 30
            while not stop.is_set() and time.monotonic() < deadline:
                client.do("write", "n", i)
                if host.do("write_all", "n", sent_down[0]):
                    sent_down[0] += 1
                i += 1
                if i % 50 == 0:
                    time.sleep(0.001)  # a paced writer, not synchronisation
            writes[0] = i

        writes = [0]
        _cut_under_load(
            proxy,
            client,
            [threading.Thread(target=writer, daemon=True)],
            stop,
            ("close", "reset", "blackhole", "close", "reset", "blackhole"),
            lambda: len(at_host),
            50,
        )
        n = writes[0]
        _wait_all(at_host, n, 10.0, "client -> host")
        wait_for(lambda: len(at_client) >= sent_down[0], 10.0, "the host's values")
        client.close()
    host.close()
    _check(at_host, n, "client -> host")
    _check(at_client, sent_down[0], "host -> client")


@pytest.mark.parametrize("layer", LAYERS)
def test_unpaced_writers_in_several_threads_lose_nothing_across_cuts(
    layer: str, loop_thread: AioThread
) -> None:
    # Bursts from several threads at once: on the threaded layer, writes in a burst are
    # staged without the connection lock, so they race with flushes, with the link
    # closing and with the next link taking the queue over.  Each thread's values must
    # still arrive exactly once and in order, both ways.
    threads = 3
    host = make_host(layer, loop_thread, heartbeat=H)
    at_host: List[List[int]] = [[] for _ in range(threads)]
    at_client: List[int] = []
    for k in range(threads):
        host.ep.on(f"t{k}", lambda value, *rest, k=k: at_host[k].append(value))
    with CuttingProxy(host.ep.port) as proxy:
        client = make_client(layer, loop_thread, proxy.port, heartbeat=H, name="w")
        client.ep.on("down", lambda value, *rest: at_client.append(value))
        wait_for(lambda: host.ep.clients(), 5.0, "the client at the host")
        stop = threading.Event()
        written = [0] * threads
        sent_down = [0]

        def writer(k: int) -> None:
            i = 0
            deadline = time.monotonic() + 30
            while not stop.is_set() and time.monotonic() < deadline:
                client.do("write", f"t{k}", i)
                i += 1
            written[k] = i

        def broadcaster() -> None:
            # Bursts of 20, paced: a held session keeps max_buffer while the link is
            # down and loses (counted) what goes beyond; this one never gets there.
            deadline = time.monotonic() + 30
            while not stop.is_set() and time.monotonic() < deadline:
                for _ in range(20):
                    if host.do("write_all", "down", sent_down[0]):
                        sent_down[0] += 1
                time.sleep(0.001)  # pacing, not synchronisation

        workers = [threading.Thread(target=writer, args=(k,), daemon=True) for k in range(threads)]
        workers.append(threading.Thread(target=broadcaster, daemon=True))
        _cut_under_load(
            proxy,
            client,
            workers,
            stop,
            ("close", "reset", "close", "reset"),
            lambda: sum(map(len, at_host)),
            5000,
        )
        for k in range(threads):
            _wait_all(at_host[k], written[k], 20.0, f"client thread {k} -> host")
        wait_for(lambda: len(at_client) >= sent_down[0], 20.0, "the host's values")
        client.close()
    host.close()
    for k in range(threads):
        _check(at_host[k], written[k], f"client thread {k} -> host")
    _check(at_client, sent_down[0], "host -> client")


@pytest.mark.parametrize("layer", LAYERS)
def test_a_client_cut_during_bursts_to_several_clients_gets_every_broadcast(
    layer: str, loop_thread: AioThread
) -> None:
    # write_all to the cut client and two others: with more than one recipient a burst
    # of broadcasts travels in runs on both layers (fanout.py), handed over a step
    # later.  A run pending when the cut client's link dies goes into its session.
    host = make_host(layer, loop_thread, heartbeat=H)
    others = [Client(port=host.ep.port, name=f"o{k}", connect_timeout=10) for k in range(2)]
    at_others: List[List[int]] = [[], []]
    for other, log in zip(others, at_others):
        other.on("down", lambda value, log=log: log.append(value))
    at_client: List[int] = []
    try:
        with CuttingProxy(host.ep.port) as proxy:
            client = make_client(layer, loop_thread, proxy.port, heartbeat=H, name="w")
            client.ep.on("down", lambda value, *rest: at_client.append(value))
            wait_for(lambda: len(host.ep.clients()) == 3, 5.0, "3 clients at the host")
            stop = threading.Event()
            sent = [0]

            async def aburst(start: int) -> None:
                for i in range(start, start + 50):
                    await host.ep.write_all("down", i)

            def burst(start: int) -> None:  # 50 write_all in a row: runs form
                if host.runner is not None:
                    host.runner.run(aburst(start))
                    return
                for i in range(start, start + 50):
                    host.ep.write_all("down", i)

            def broadcaster() -> None:
                deadline = time.monotonic() + 30
                while not stop.is_set() and time.monotonic() < deadline:
                    burst(sent[0])
                    sent[0] += 50
                    time.sleep(0.001)  # pacing, not synchronisation

            _cut_under_load(
                proxy,
                client,
                [threading.Thread(target=broadcaster, daemon=True)],
                stop,
                ("close", "reset", "blackhole", "close", "reset"),
                lambda: len(at_client),
                2000,
            )
            _wait_all(at_client, sent[0], 20.0, "host -> the cut client")
            for log in at_others:
                _wait_all(log, sent[0], 20.0, "host -> the other clients")
            client.close()
    finally:
        for other in others:
            other.close()
        host.close()
    _check(at_client, sent[0], "host -> the cut client")
    for log in at_others:
        _check(log, sent[0], "host -> the other clients")


SMALL = 64 * 1024  # max_buffer: far less than the kernel holds in flight on loopback


@pytest.mark.parametrize("layer", LAYERS)
def test_a_small_max_buffer_loses_nothing_across_cuts(layer: str, loop_thread: AioThread) -> None:
    # An unpaced writer of 1 KB values with max_buffer = 64 KiB: the socket buffers
    # alone hold several MiB, so before the replay window had flow control the frames
    # in flight left it unacknowledged and every cut lost some.  Now writes wait for
    # RACKs instead.
    host = make_host(layer, loop_thread, heartbeat=H, max_buffer=SMALL)
    at_host: List[int] = []
    host.ep.on("n", lambda value, *rest: at_host.append(value[0]))
    pad = b"x" * 1000
    with CuttingProxy(host.ep.port) as proxy:
        client = make_client(layer, loop_thread, proxy.port, heartbeat=H, max_buffer=SMALL)
        wait_for(lambda: host.ep.clients(), 5.0, "the client at the host")
        stop = threading.Event()
        written = [0]

        def writer() -> None:
            i = 0
            deadline = time.monotonic() + 30
            while not stop.is_set() and time.monotonic() < deadline:
                client.do("write", "n", [i, pad])
                i += 1
            written[0] = i

        _cut_under_load(
            proxy,
            client,
            [threading.Thread(target=writer, daemon=True)],
            stop,
            ("reset", "close", "reset", "reset"),
            lambda: len(at_host),
            2000,
        )
        n = written[0]
        _wait_all(at_host, n, 20.0, "client -> host")
        client.close()
    host.close()
    _check(at_host, n, "client -> host")


@pytest.mark.parametrize("layer", LAYERS)
def test_full_replay_windows_both_ways_do_not_wait_for_each_other(
    layer: str, loop_thread: AioThread
) -> None:
    # Each side's RACKs travel in its send queue, behind its own values: with both
    # windows full, a side that held its RACKs back with its values would wait for
    # the other side's RACKs, held back the same way.  Link-level frames pass.
    n = 4000
    pad = b"y" * 1500
    host = make_host(layer, loop_thread, heartbeat=None, max_buffer=SMALL)
    at_host: List[int] = []
    at_client: List[int] = []
    host.ep.on("up", lambda value, *rest: at_host.append(value[0]))
    client = make_client(layer, loop_thread, host.ep.port, heartbeat=None, max_buffer=SMALL)
    client.ep.on("down", lambda value, *rest: at_client.append(value[0]))
    try:
        wait_for(lambda: host.ep.clients(), 5.0, "the client at the host")
        (conn,) = host.ep.clients()
        errors: List[BaseException] = []

        def down() -> None:
            try:
                for i in range(n):
                    result = conn.write("down", [i, pad])
                    if host.runner is not None:
                        host.runner.run(result)
            except BaseException as exc:  # reported below
                errors.append(exc)

        thread = threading.Thread(target=down, daemon=True)
        thread.start()
        for i in range(n):
            client.do("write", "up", [i, pad])
        thread.join(30)
        assert not errors, errors
        wait_for(lambda: len(at_host) >= n and len(at_client) >= n, 20.0, "both directions")
        assert at_host == list(range(n)) and at_client == list(range(n))
    finally:
        client.close()
        host.close()


def _data_frames(n: int) -> bytes:
    return b"".join(b"".join(frames.encode_value_frame(frames.DATA, "n", i)) for i in range(n))


@pytest.mark.parametrize("layer", LAYERS)
def test_rack_counts_never_go_backwards_behind_a_backlog(
    layer: str, loop_thread: AioThread
) -> None:
    # A RACK owed after a read waits in the send queue (it leaves with the next write);
    # the heartbeat's RACK, with a newer count, must not overtake it while a backlog
    # holds the queue: the peer would read the older count as one beyond what it sent.
    host = make_host(layer, loop_thread, heartbeat=0.5)
    raw = RawClient(host.ep.port, resume=True)  # reads only when told, below
    sock, protocol = raw.sock, raw.protocol
    assert protocol.peer_resume
    try:
        wait_for(lambda: len(host.ep.clients()) == 1, 5.0, "the raw client")
        (conn,) = host.ep.clients()
        session = conn.engine.session
        for _ in range(4):  # 8 MB the raw client does not read yet: a backlog
            assert host.do("write_all", "big", b"x" * (2 << 20)) == 1  # (never waits)
        sock.sendall(_data_frames(40))
        wait_for(lambda: session.acked_out == 40, 5.0, "the RACK owed after 40 frames")
        sock.sendall(_data_frames(10))
        wait_for(lambda: session.acked_out == 50, 5.0, "the heartbeat's RACK")
        racks: List[int] = []
        big = 0
        deadline = time.monotonic() + 10
        while (big < 4 or 50 not in racks) and time.monotonic() < deadline:
            chunk = sock.recv(1 << 20)
            assert chunk, "the host closed the connection"
            for frame in protocol.decoder.feed(chunk):
                if frame.type == frames.RACK:
                    racks.append(frame.id)
                elif frame.type == frames.DATA and frame.channel == "big":
                    big += 1
        assert 40 in racks and 50 in racks, racks
        assert racks == sorted(racks), f"RACK counts went backwards: {racks}"
    finally:
        sock.close()
        host.close()


@pytest.mark.parametrize("layer", LAYERS)
def test_a_conflated_image_channel_replays_only_its_newest_frame(
    layer: str, loop_thread: AioThread
) -> None:
    np = pytest.importorskip("numpy")
    host = make_host(layer, loop_thread, heartbeat=H)
    images: List[int] = []
    host.ep.on("img", lambda img, *rest: images.append(int(img[0, 0])))
    with CuttingProxy(host.ep.port) as proxy:
        client = make_client(layer, loop_thread, proxy.port, heartbeat=H, name="cam")
        client.do("write_image", np.full((4, 4), 0, np.uint8), "img")
        wait_for(lambda: images == [0], 5.0, "the first frame")
        proxy.blackhole()
        for i in range(1, 10):
            client.do("write_image", np.full((4, 4), i, np.uint8), "img")
        before = client.ep.reconnects
        wait_for(lambda: not client.ep.connected, 10 * H, "the blackhole noticed")
        proxy.cut_reset()  # nothing held by the dead link reaches anybody
        wait_for(lambda: client.ep.reconnects > before, 10.0, "the reconnection")
        client.do("write", "n", "after")
        wait_for(lambda: host.do("get", "n") == "after", 5.0, "a value after the replay")
        client.close()
    host.close()
    assert images == [0, 9]


@pytest.mark.parametrize("layer", LAYERS)
def test_a_host_without_resume_still_serves_a_reconnecting_client(
    layer: str, loop_thread: AioThread
) -> None:
    """resume_window=0: no session (as a 1.1 host); links come and go as before."""
    host = make_host(layer, loop_thread, heartbeat=H, resume_window=0)
    with CuttingProxy(host.ep.port) as proxy:
        client = make_client(layer, loop_thread, proxy.port, heartbeat=H)
        client.do("write", "n", 1)
        wait_for(lambda: host.do("get", "n") == 1, 5.0, "the first value")
        conn = host.ep.clients()[0]
        assert conn.engine.session is None and not conn.engine.queue.numbered
        before = client.ep.reconnects
        proxy.cut("reset")
        wait_for(lambda: client.ep.reconnects > before, 10.0, "the reconnection")
        client.do("write", "n", 2)
        wait_for(lambda: host.do("get", "n") == 2, 5.0, "a value after it")
        client.close()
    host.close()


@pytest.mark.parametrize("layer", LAYERS)
def test_a_client_without_resume_is_served_as_before(layer: str, loop_thread: AioThread) -> None:
    """A 1.1 client (no "rs" in its HELLO): no session, no numbering, no RACK."""
    host = make_host(layer, loop_thread, heartbeat=H)
    with RawClient(host.ep.port, name="old") as raw:
        raw.send_values(("n", i) for i in range(100))
        wait_for(lambda: host.do("get", "n") == 99, 5.0, "the old client's values")
        (conn,) = host.ep.clients()
        assert conn.engine.session is None and not conn.engine.queue.numbered
    host.close()


def _link_down(proxy: CuttingProxy, kind: str, host: Any) -> None:
    """Cut the client's link and keep it from reconnecting until ``proxy.resume()``;
    return once the host noticed (the client is no longer among its clients)."""
    if kind == "blackhole":
        proxy.blackhole(new_links=True)
    else:
        proxy.cut(kind, hold_new=True)
    wait_for(lambda: not host.ep.clients(), 10.0, f"the host noticing the {kind}")


def _conn_write(layer: str, loop_thread: AioThread, conn: Any, *args: Any) -> None:
    if layer == "sync":
        conn.write(*args)
    else:
        loop_thread.run(conn.write(*args))


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("kind", ["close", "reset", "blackhole"])
def test_writes_for_a_client_whose_link_is_down_wait_for_its_resume(
    layer: str, kind: str, loop_thread: AioThread
) -> None:
    """write_all and conn.write while the host knows the client's link is down (and
    client writes while the client knows it): all delivered on resume, in order,
    once."""
    n = 300
    host = make_host(layer, loop_thread, heartbeat=H)
    at_client: List[Any] = []
    at_host: List[Any] = []
    host.ep.on("up", lambda value, *rest: at_host.append(value))
    with CuttingProxy(host.ep.port) as proxy:
        client = make_client(layer, loop_thread, proxy.port, heartbeat=H, name="w")
        client.ep.on("n", lambda value, *rest: at_client.append(value))
        wait_for(lambda: host.ep.clients(), 5.0, "the client at the host")
        (conn,) = host.ep.clients()
        assert host.do("write_all", "n", -1) == 1
        wait_for(lambda: at_client == [-1], 5.0, "a first value")
        before = client.ep.reconnects
        _link_down(proxy, kind, host)
        for i in range(n):
            assert host.do("write_all", "n", i) == 1  # held for the client
        _conn_write(layer, loop_thread, conn, "n", n)  # the old connection: held too
        many = [("n", n + 1), ("n", n + 2)]
        if layer == "sync":
            conn.write_many(many)  # held one by one, like separate writes
        else:
            loop_thread.run(conn.write_many(many))
        wait_for(lambda: not client.ep.connected, 10.0, "the client noticing")
        for i in range(n):
            client.do("write", "up", i)  # the client's own queue holds these
        client.do("write_many", [("up", n), ("up", n + 1)])
        proxy.resume()
        wait_for(lambda: client.ep.reconnects > before, 10.0, "the resume")
        wait_for(lambda: len(at_client) >= n + 4, 10.0, "the held values")
        wait_for(lambda: len(at_host) >= n + 2, 10.0, "the client's values")
        assert host.do("write_all", "n", "after") == 1
        wait_for(lambda: len(at_client) >= n + 5, 5.0, "a value after the resume")
        (new,) = host.ep.clients()
        assert new is not conn and new.stats()["resume_lost"] == 0
        assert conn.messages_out == 4  # -1, then n and n+1, n+2 held for it (write_all: not)
        client.close()
    host.close()
    assert at_client == [-1, *range(n + 3), "after"]
    assert at_host == list(range(n + 2))


@pytest.mark.parametrize("layer", LAYERS)
def test_held_writes_are_bounded_and_images_conflate(layer: str, loop_thread: AioThread) -> None:
    """While a link is down the session holds at most max_buffer bytes (the rest is
    counted in resume_lost); image frames held for it conflate to the newest."""
    np = pytest.importorskip("numpy")
    host = make_host(layer, loop_thread, heartbeat=H, max_buffer=64 * 1024)
    at_client: List[Any] = []
    images: List[int] = []
    with CuttingProxy(host.ep.port) as proxy:
        client = make_client(layer, loop_thread, proxy.port, heartbeat=H, name="w")
        client.ep.on("n", lambda value, *rest: at_client.append(value[0]))
        client.ep.on("img", lambda img, *rest: images.append(int(img[0, 0])))
        wait_for(lambda: host.ep.clients(), 5.0, "the client at the host")
        before = client.ep.reconnects
        _link_down(proxy, "reset", host)
        for i in range(10):
            host.do("write_image_all", np.full((4, 4), i, np.uint8), "img")
        payload = b"x" * 4000
        held = sum(host.do("write_all", "n", [i, payload]) for i in range(40))
        assert 5 < held < 40  # 64 KiB hold about 16 of them
        proxy.resume()
        wait_for(lambda: client.ep.reconnects > before, 10.0, "the resume")
        wait_for(lambda: len(at_client) >= held and images, 10.0, "the held values")
        (conn,) = host.ep.clients()
        assert conn.stats()["resume_lost"] == 40 - held
        assert host.do("write_all", "n", [99, b""]) == 1
        wait_for(lambda: at_client[-1:] == [99], 5.0, "a value after the resume")
        client.close()
    host.close()
    assert at_client == [*range(held), 99]  # the first ones, in order, once
    assert images == [9]  # the newest frame only


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("acked", [False, True])
def test_a_flush_during_a_reconnection_waits_for_the_resume(
    layer: str, acked: bool, loop_thread: AioThread
) -> None:
    host = make_host(layer, loop_thread, heartbeat=H)
    with CuttingProxy(host.ep.port) as proxy:
        client = make_client(layer, loop_thread, proxy.port, heartbeat=H, name="w")
        client.do("write", "n", 0)
        wait_for(lambda: host.do("get", "n") == 0, 5.0, "a first value")
        proxy.blackhole(new_links=True)
        wait_for(lambda: not client.ep.connected, 10.0, "the client noticing")
        client.do("write", "n", 1)  # kept for the next link
        outcome: List[Any] = []

        def flush() -> None:
            try:
                client.do("flush", 10.0, acked=acked)
                outcome.append("flushed")
            except Exception as exc:  # reported by the assertion below
                outcome.append(exc)

        thread = threading.Thread(target=flush, daemon=True)
        thread.start()
        if layer == "sync":  # the flush waits on the client's link condition
            wait_for(lambda: client.ep._link_lock._waiters, 5.0, "the flush waiting")  # type: ignore[attr-defined]
        else:
            wait_for(lambda: client.ep._outbox_waiters, 5.0, "the flush waiting")
        proxy.resume()
        thread.join(15.0)
        assert outcome == ["flushed"]
        if acked:
            assert host.do("get", "n") == 1  # stored before the flush returned
        wait_for(lambda: host.do("get", "n") == 1, 5.0, "the value kept meanwhile")
        client.close()
    host.close()


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("what", ["request", "ack"])
def test_a_request_or_an_acked_write_survives_a_cut(
    layer: str, what: str, loop_thread: AioThread
) -> None:
    """A request: the link dies after the host's handler ran and before the reply
    reached the client.  An acked write: the value and its SYNC go into a dead link.
    On resume the frames are replayed, the answer arrives, the call returns, and the
    handler ran once."""
    host = make_host(layer, loop_thread, heartbeat=H)
    calls: List[Any] = []
    with CuttingProxy(host.ep.port) as proxy:

        def handler(value: Any, *rest: Any) -> Any:
            if what == "request":
                proxy.blackhole(new_links=True)  # the reply goes into a dead link
            calls.append(value)
            return value * 2

        host.ep.on("q", handler)
        # The client notices a dead link within 3 s: the acked write starts before.
        beat = H if what == "request" else 1.0
        client = make_client(layer, loop_thread, proxy.port, heartbeat=beat, name="w")
        wait_for(lambda: host.ep.clients(), 5.0, "the client at the host")
        before = client.ep.reconnects
        outcome: List[Any] = []
        if what == "ack":
            proxy.blackhole(new_links=True)

        def call() -> None:
            try:
                if what == "request":
                    outcome.append(client.do("request", "q", 21, timeout=15.0))
                else:
                    client.do("write", "q", 21, ack=True, timeout=15.0)
                    outcome.append("acked")
            except Exception as exc:  # reported by the assertion below
                outcome.append(exc)

        thread = threading.Thread(target=call, daemon=True)
        thread.start()
        if what == "request":
            wait_for(lambda: calls, 5.0, "the handler")
        wait_for(lambda: not host.ep.clients(), 10.0, "the host noticing")
        wait_for(lambda: not client.ep.connected, 10.0, "the client noticing")
        assert not outcome  # still waiting, not failed
        proxy.resume()
        wait_for(lambda: client.ep.reconnects > before, 10.0, "the resume")
        thread.join(15.0)
        assert outcome == ([42] if what == "request" else ["acked"])
        client.close()
    host.close()
    assert calls == [21]  # once


@pytest.mark.parametrize("layer", LAYERS)
def test_a_request_fails_when_its_session_cannot_resume(layer: str, loop_thread: AioThread) -> None:
    """The client closes while its link is down: the request waiting for the resume
    fails at once (never hangs)."""
    host = make_host(layer, loop_thread, heartbeat=H)
    with CuttingProxy(host.ep.port) as proxy:

        def handler(value: Any, *rest: Any) -> Any:
            proxy.blackhole(new_links=True)
            return value

        host.ep.on("q", handler)
        client = make_client(layer, loop_thread, proxy.port, heartbeat=H, name="w")
        outcome: List[Any] = []

        def call() -> None:
            try:
                outcome.append(client.do("request", "q", 1, timeout=None))
            except Exception as exc:  # the expected outcome
                outcome.append(exc)

        thread = threading.Thread(target=call, daemon=True)
        thread.start()
        wait_for(lambda: not client.ep.connected, 10.0, "the client noticing")
        client.close()
        thread.join(10.0)
        assert len(outcome) == 1 and isinstance(outcome[0], ConnectionClosed)
    host.close()


@pytest.mark.parametrize("layer", LAYERS)
def test_a_full_host_lets_a_resuming_client_take_its_old_seat(
    layer: str, loop_thread: AioThread
) -> None:
    """max_clients=1 and the client's blackholed old link still holds the seat (the
    host has not noticed: its heartbeat is slow): the client's resume takes the seat
    over; a client that does not resume is still refused."""
    host = make_host(layer, loop_thread, heartbeat=5.0, max_clients=1)
    got: List[Any] = []
    host.ep.on("n", lambda value, *rest: got.append(value))
    with CuttingProxy(host.ep.port) as proxy:
        client = make_client(layer, loop_thread, proxy.port, heartbeat=H, name="w")
        wait_for(lambda: host.ep.clients(), 5.0, "the client at the host")
        (old,) = host.ep.clients()
        before = client.ep.reconnects
        proxy.freeze()  # the old link is dead, new links pass
        client.do("write", "n", 1)
        wait_for(lambda: client.ep.reconnects > before, 10.0, "the resume")
        assert old.engine.closed  # superseded by the resumed link
        (new,) = host.ep.clients()
        assert new is not old and new.name == "w"
        client.do("write", "n", 2)
        wait_for(lambda: got == [1, 2], 5.0, "the values, once each")
        with pytest.raises(HandshakeError, match="max_clients=1"):
            make_client(layer, loop_thread, host.ep.port, name="other", connect_timeout=5)
        client.close()
    host.close()
