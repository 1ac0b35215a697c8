"""The asyncio layer's reliability, security and image features, and their interop with
the threaded layer: TLS, heartbeats, reconnect, max_buffer and slow consumers, image
codecs with lazy off-loop decoding and conflation, on_message.

Same rules as test_aio.py: each test runs in its own event loop under a 20 s bound,
binds port 0 on loopback, and synchronises on futures, queues and subscriptions; only
state with no awaitable (the threaded layer, a reconnection's counter) is polled,
bounded.  Heartbeat tests use heartbeat=0.1 s and measure elapsed time by counting the
pings that arrive, never by sleeping.  TLS certificates are made at run time.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import pytest
from certs import self_signed
from test_aio import _feed, raw_client, run_async, until, within

import socketengine
from socketengine import (
    AuthenticationError,
    ConnectionClosed,
    HandshakeError,
    WriteTimeout,
    aio,
    images,
)
from socketengine.protocol import Protocol, Role

_BACKENDS = images.available_backends()
needs_jpeg = pytest.mark.skipif(not _BACKENDS.get("jpeg"), reason="no JPEG backend installed")
needs_png = pytest.mark.skipif(not _BACKENDS.get("png"), reason="no PNG backend installed")

PING = 16  # bytes of a PING (or PONG) frame


def _frame(h: int = 120, w: int = 160) -> np.ndarray:
    """A smooth colour test image (compresses well, survives JPEG)."""
    y, x = np.mgrid[0:h, 0:w]
    img = np.empty((h, w, 3), np.uint8)
    img[..., 0] = 200
    img[..., 1] = (x * 255 // w).astype(np.uint8)
    img[..., 2] = (y * 255 // h).astype(np.uint8)
    return img


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


# -- TLS ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Tuple[Path, Path]]:
    d = tmp_path_factory.mktemp("aio-certs")
    return {"good": self_signed(d, "good"), "other": self_signed(d, "other")}


def _server_ctx(certs: Dict[str, Tuple[Path, Path]]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*certs["good"])
    return ctx


def _client_ctx(cafile: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cafile))


@needs_jpeg
@run_async
async def test_tls_pair_exchanges_values_images_and_closes_on_bye(certs: Dict) -> None:
    timeout = 10.0  # a close that waited for a half-close would take this long
    async with aio.Host(port=0, tls=_server_ctx(certs), token="t", timeout=timeout) as h:
        c = await aio.Client(
            port=h.port, tls=_client_ctx(certs["good"][0]), token="t", name="secure"
        ).start()
        conn = h.clients()[0]
        assert conn.tls and c.connection is not None and c.connection.tls
        sub = h.subscribe("a")
        await c.write("a", {"x": [1, 2, 3]})
        assert await within(sub.get()) == ({"x": [1, 2, 3]}, conn)
        frame = _frame()
        up = h.subscribe("image")
        await c.write_image(frame, codec="jpeg")
        img, _ = await within(up.get())
        assert img.shape == frame.shape and _psnr(img, frame) > 30
        big = b"z" * 3_000_000  # many TLS records each way
        down = c.subscribe("big")
        await h.write_all("big", big)
        assert await within(down.get()) == big
        seq = h.subscribe("seq")
        for i in range(2000):
            await c.write("seq", i)
        assert [(await within(seq.get()))[0] for _ in range(2000)] == list(range(2000))

        # Over TLS there is no half-close: BYE alone ends the connection, at once.
        await c.write("last", "words")
        start = time.monotonic()
        await c.close()
        assert time.monotonic() - start < timeout / 2
        assert h.get("last") == "words" and conn.closed

        again = await aio.Client(
            port=h.port, tls=_client_ctx(certs["good"][0]), token="t", reconnect=False
        ).start()
        conn2 = h.clients()[0]
        start = time.monotonic()
        await within(conn2.close(), timeout / 2)  # the host closes first: the same
        assert time.monotonic() - start < timeout / 2
        theirs = again.connection
        await until(lambda: theirs is not None and theirs.closed, what="the client to close")
        await again.close()


@run_async
async def test_tls_mismatches_fail_the_handshake_clearly(certs: Dict) -> None:
    async with aio.Host(port=0, tls=_server_ctx(certs)) as h:
        with pytest.raises(HandshakeError, match="TLS"):
            await aio.Client(port=h.port, handshake_timeout=5, reconnect=False).start()
        with pytest.raises(HandshakeError, match="certificate"):
            await aio.Client(
                port=h.port, tls=_client_ctx(certs["other"][0]), handshake_timeout=5
            ).start()
        with pytest.raises(AuthenticationError):  # TLS fine, then the token is checked
            await aio.Client(port=h.port, tls=_client_ctx(certs["good"][0]), token="x").start()
        async with aio.Client(port=h.port, tls=_client_ctx(certs["good"][0])) as good:
            sub = h.subscribe("still")
            await good.write("still", "fine")  # the host still serves
            assert (await within(sub.get()))[0] == "fine"
    async with aio.Host(port=0) as plain:
        with pytest.raises(HandshakeError, match="TLS"):
            await aio.Client(
                port=plain.port, tls=_client_ctx(certs["good"][0]), handshake_timeout=5
            ).start()
    with pytest.raises(TypeError, match="SSLContext"):
        aio.Host(port=0, tls="cert.pem")  # type: ignore[arg-type]


@run_async
async def test_tls_handshake_counts_against_handshake_timeout(certs: Dict) -> None:
    async with aio.Host(port=0, tls=_server_ctx(certs), handshake_timeout=0.3) as h:
        # A TCP connection that never starts TLS is closed by the host.
        reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
        assert await within(reader.read()) == b""
        writer.close()

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accepts, answers nothing
        writer.close()

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        start = time.monotonic()
        with pytest.raises(HandshakeError, match="TLS"):
            await aio.Client(
                port=port, tls=_client_ctx(certs["good"][0]), handshake_timeout=0.3
            ).start()
        assert time.monotonic() - start < 3
    finally:
        server.close()


@needs_jpeg
@run_async
async def test_tls_interop_with_the_threaded_layer(certs: Dict) -> None:
    # threaded Client -> aio Host
    async with aio.Host(port=0, tls=_server_ctx(certs)) as h:
        sub = h.subscribe("x")
        tc = await asyncio.to_thread(
            socketengine.Client, port=h.port, tls=_client_ctx(certs["good"][0]), name="t"
        )
        try:
            await asyncio.to_thread(tc.write, "x", {"arr": np.arange(4)})
            data, conn = await within(sub.get())
            assert conn.name == "t" and conn.tls and np.array_equal(data["arr"], np.arange(4))
            await h.write_image_all(_frame(), codec="jpeg")
            await until(lambda: tc.get_jpeg() is not None, what="the threaded client's image")
            assert tc.get("image").shape == _frame().shape
            await asyncio.to_thread(tc.write, "last", 1)
        finally:
            await asyncio.to_thread(tc.close)  # BYE alone: no half-close over TLS
        assert h.get("last") == 1
        await until(lambda: not h.clients(), what="the host to see the client leave")

    # aio Client -> threaded Host
    th = await asyncio.to_thread(socketengine.Host, port=0, tls=_server_ctx(certs))
    try:
        c = await aio.Client(
            port=th.port, tls=_client_ctx(certs["good"][0]), name="a", timeout=10
        ).start()
        down = c.subscribe("y")
        await until(lambda: th.get_client("a") is not None, what="the aio client")
        assert await asyncio.to_thread(th.write_all, "y", [1, (2, 3)]) == 1
        assert await within(down.get()) == [1, (2, 3)]
        await c.write_image(_frame(), codec="jpeg")
        await c.write("last", "words")
        start = time.monotonic()
        await c.close()
        assert time.monotonic() - start < 5  # not the 10 s linger: the host closes on BYE
        await until(lambda: th.get("last") == "words", what="the last value")
        assert _psnr(th.get("image"), _frame()) > 30
    finally:
        await asyncio.to_thread(th.close)


# -- heartbeats -----------------------------------------------------------------------------


@run_async
async def test_heartbeat_drops_a_silent_client() -> None:
    gone: asyncio.Queue[aio.Connection] = asyncio.Queue()
    async with aio.Host(port=0, heartbeat=0.1) as h:
        h.on_disconnect(gone.put_nowait)
        _, _, writer = await raw_client(h.port, name="mute")  # never answers a PING
        conn = await within(gone.get())
        assert conn.name == "mute" and "heartbeat" in str(conn.error)
        assert h.clients() == []
        writer.close()


@run_async
async def test_heartbeat_keeps_an_idle_healthy_link() -> None:
    async with aio.Host(port=0, heartbeat=0.1) as h, aio.Client(port=h.port, heartbeat=0.1) as c:
        conn = h.clients()[0]
        mine = c.connection
        assert mine is not None
        start_in, start_out = conn.bytes_in, mine.bytes_in
        # Idle for many intervals (measured in frames received: pings or pongs).
        await until(lambda: conn.bytes_in >= start_in + 8 * PING, what="pings from the client")
        await until(lambda: mine.bytes_in >= start_out + 8 * PING, what="frames from the host")
        assert c.connected and conn.is_open and c.reconnects == 0
        sub = h.subscribe("still")
        await c.write("still", "here")
        assert (await within(sub.get()))[0] == "here"


@run_async
async def test_heartbeat_none_disables_it_and_bad_values_are_refused() -> None:
    async with aio.Host(port=0, heartbeat=None) as h:
        quiet = await aio.Client(port=h.port, heartbeat=None).start()
        pinger = await aio.Client(port=h.port, heartbeat=0.05, name="pinger").start()
        quiet_conn, pinging = quiet.connection, h.get_client("pinger")
        assert quiet_conn is not None and pinging is not None
        before = quiet_conn.bytes_in
        # At least 0.5 s pass (10 pings of the other client), far beyond 3 * 0.05 s.
        await until(lambda: pinging.bytes_in >= 10 * PING + 100, what="pings")
        assert quiet_conn.bytes_in == before  # the host pinged nobody
        assert quiet.connected and len(h.clients()) == 2
        await quiet.close()
        await pinger.close()
    with pytest.raises(ValueError, match="heartbeat"):
        aio.Host(port=0, heartbeat=0)
    with pytest.raises(ValueError, match="heartbeat"):
        aio.Client(port=1, heartbeat=-1.0)


@run_async
async def test_heartbeat_spares_a_connection_paused_by_backpressure() -> None:
    async with aio.Host(port=0, heartbeat=0.1) as h:
        c = await aio.Client(port=h.port, heartbeat=None).start()
        full = h.subscribe("x", maxsize=1)
        await c.write("x", 1)
        await c.write("x", 2)  # the subscription is full: the host stops reading c
        conn = h.clients()[0]
        await until(lambda: conn.reading_paused, what="reading to pause")
        mine = c.connection
        assert mine is not None
        start = mine.bytes_in
        # The host pings every interval; the client answers, but nothing is read.  After
        # 6 pings (0.6 s > 3 * 0.1 s of "silence") the client must still be connected.
        await until(lambda: mine.bytes_in >= start + 6 * PING, what="the host's pings")
        assert conn.is_open and c.connected
        assert [(await within(full.get()))[0] for _ in range(2)] == [1, 2]
        await until(lambda: not conn.reading_paused, what="reading to resume")
        sub = h.subscribe("y")
        await c.write("y", "alive")
        assert (await within(sub.get()))[0] == "alive"
        await c.close()


async def _fake_host(
    silent_connections: int,
) -> Tuple[asyncio.AbstractServer, int, asyncio.Queue[Tuple[int, str]]]:
    """A host built on the sans-I/O core: completes every handshake; the first
    ``silent_connections`` connections then never answer anything (a frozen host)."""
    events: asyncio.Queue[Tuple[int, str]] = asyncio.Queue()
    count = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        count += 1
        index = count
        protocol = Protocol(Role.HOST, session=index)
        writer.write(protocol.data_to_send())
        while True:
            data = await reader.read(65536)
            if not data:
                break
            was_open = protocol.is_open
            _feed(protocol, data)
            protocol.events()
            out = protocol.data_to_send()
            if not was_open:
                writer.write(out)  # WELCOME
                events.put_nowait((index, "welcome"))
            elif index > silent_connections and out:
                writer.write(out)  # PONG
                events.put_nowait((index, "pong"))
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], events


@run_async
async def test_heartbeat_reconnects_a_client_whose_host_froze() -> None:
    server, port, events = await _fake_host(silent_connections=1)
    try:
        c = await aio.Client(port=port, heartbeat=0.1, name="hb").start()
        first = c.connection
        assert await within(events.get()) == (1, "welcome")
        # The host never answers: declared dead after 0.3 s, reconnected in the background.
        assert await within(events.get()) == (2, "welcome")
        assert first is not None and "heartbeat" in str(first.error)
        await until(lambda: c.reconnects == 1 and c.connected, what="the reconnection")
        for _ in range(5):  # the new link stays up, ping after ping
            assert await within(events.get()) == (2, "pong")
        assert c.connected and c.reconnects == 1 and c.connection is not first
        await c.close()
    finally:
        server.close()


# -- reconnect ------------------------------------------------------------------------------


@run_async
async def test_writes_while_the_host_restarts_arrive_in_order_under_the_same_name() -> None:
    h = await aio.Host(port=0).start()
    port = h.port
    c = await aio.Client(port=port, name="cam-1").start()
    down = c.subscribe("cmd")  # a subscription survives reconnections
    first = h.subscribe("n")
    await c.write("n", -1)
    assert (await within(first.get()))[0] == -1
    await h.close()
    assert not c.connected and c.reconnects == 0
    for i in range(100):  # kept while disconnected, in order
        await c.write("n", i)
    for i in range(10):  # images are conflated while kept: only the newest is sent
        await c.write_image(np.full((4, 4), i, np.uint8))
    with pytest.raises(ConnectionClosed, match="reconnecting"):
        await within(c.request("anything", 1, timeout=5), 1)  # at once, not after 5 s

    h2 = aio.Host(port=port)
    sub = h2.subscribe("n")  # before start(): nothing can be missed
    images_in = h2.subscribe("image")
    await h2.start()
    got = [(await within(sub.get()))[0] for _ in range(100)]
    assert got == list(range(100))
    img, conn = await within(images_in.get())
    assert img[0, 0] == 9 and len(images_in) == 0
    assert conn.name == "cam-1" and h2.get_client("cam-1") is conn
    await until(lambda: c.connected, what="the client to see the welcome")
    assert c.reconnects == 1
    assert c.stats()["images"]["sent"]["image"]["dropped"] == 9
    await c.write("n", "live")
    assert (await within(sub.get()))[0] == "live"
    await h2.write_all("cmd", "go")
    assert await within(down.get()) == "go"
    await c.close()
    await h2.close()


@run_async
async def test_kept_writes_are_bounded_by_max_buffer() -> None:
    h = await aio.Host(port=0).start()
    c = await aio.Client(port=h.port, max_buffer=100_000, timeout=0.1).start()
    await h.close()
    assert not c.connected
    kept = 0
    start = time.monotonic()
    with pytest.raises(WriteTimeout, match="not connected"):
        for _ in range(1000):  # bounded
            await c.write("x", b"y" * 10_000)
            kept += 1
    assert 5 <= kept <= 10 and time.monotonic() - start < 2
    await within(c.close())  # returns although the host never comes back


@run_async
async def test_reconnect_false_makes_a_lost_connection_final() -> None:
    h = await aio.Host(port=0).start()
    c = await aio.Client(port=h.port, reconnect=False).start()
    sub = c.subscribe("x")
    await h.close()
    with pytest.raises(ConnectionClosed):
        await c.write("x", 1)
    with pytest.raises(ConnectionClosed):
        await within(sub.get())
    assert not c.connected and c.reconnects == 0
    await c.close()


# -- max_buffer and slow consumers ----------------------------------------------------------


@run_async
async def test_write_to_a_peer_that_does_not_read_times_out() -> None:
    async with aio.Host(port=0) as h:
        c = await aio.Client(port=h.port, max_buffer=1 << 20, timeout=0.2).start()
        held = h.subscribe("x", maxsize=1)  # full at once: the host stops reading c
        payload = b"y" * 65536
        written = 0
        start = time.monotonic()
        with pytest.raises(WriteTimeout, match="not reading"):
            for i in range(10_000):  # bounded: the kernel buffers hold a few MB at most
                await c.write("x", [i, payload])
                written += 1
        assert time.monotonic() - start < 5
        mine = c.connection
        assert mine is not None and mine.queued_bytes <= (1 << 20) + 65600
        # Everything written before the timeout arrives, and nothing of the failed write.
        got = [(await within(held.get()))[0][0] for _ in range(written)]
        assert got == list(range(written))
        assert len(held) == 0
        await c.write("x", "ok")  # room again once the host reads
        assert (await within(held.get()))[0] == "ok"
        await c.close()


@run_async
async def test_write_all_drops_a_slow_consumer_and_keeps_serving_the_rest() -> None:
    dropped: asyncio.Queue[aio.Connection] = asyncio.Queue()
    limit = 1 << 20
    async with aio.Host(port=0, max_buffer=limit, timeout=0.3) as h:
        h.on_disconnect(dropped.put_nowait)
        slow = await aio.Client(port=h.port, name="slow", reconnect=False).start()
        fast = await aio.Client(port=h.port, name="fast").start()
        slow_transport = slow.connection.transport  # type: ignore[union-attr]
        assert slow_transport is not None
        slow_transport.pause_reading()  # a consumer that stopped reading
        slow_conn = h.get_client("slow")
        assert slow_conn is not None
        feed = fast.subscribe("data")
        payload = b"x" * 65536
        i = 0
        for i in range(2_000):  # bounded; the slow one is dropped long before
            await h.write_all("data", [i, payload])
            assert slow_conn.queued_bytes <= 2 * limit + 65600
            # The healthy consumer gets everything, paced at its own speed.
            assert (await within(feed.get()))[0] == i
            if not dropped.empty():
                break
        gone = await within(dropped.get())
        assert gone is slow_conn and isinstance(gone.error, WriteTimeout)
        assert [c.name for c in h.clients()] == ["fast"]
        assert await h.write_all("data", ["after", b""]) == 1
        assert await within(feed.get()) == ["after", b""]
        await fast.close()
        await slow.close()


# -- images ---------------------------------------------------------------------------------


@needs_jpeg
@needs_png
@run_async
async def test_images_decode_lazily_once_and_off_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: List[int] = []
    real_decode = images.decode

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(threading.get_ident())
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(images.codecs, "decode", counting)
    loop_thread = threading.get_ident()
    frame = _frame()
    async with aio.Host(port=0) as h, aio.Client(port=h.port, name="cam") as c:
        # Nobody reads "idle": received, stored, never decoded until get().
        probe = h.subscribe("probe")
        await c.write_image(frame, channel="idle", codec="jpeg")
        await c.write("probe", 1)
        await within(probe.get())
        assert calls == [] and h.get_jpeg("idle")[:2] == b"\xff\xd8"  # type: ignore[index]
        idle = h.get("idle")
        assert idle.shape == frame.shape and calls == [loop_thread]  # get(): decoded here
        assert h.get("idle") is idle and h.get_all("idle")[0] is idle  # ... once
        calls.clear()

        # Every consumer of one frame shares one decoding, in a worker thread.
        seen: asyncio.Queue[Tuple[str, Any]] = asyncio.Queue()
        h.on("image", lambda img, conn: seen.put_nowait(("plain", img)))

        @h.on("image")
        async def slow(img: Any, conn: aio.Connection) -> None:
            await asyncio.sleep(0)
            seen.put_nowait(("async", img))

        h.on_message(lambda ch, img, conn: seen.put_nowait(("any", img)))
        sub = h.subscribe("image")
        waiter = asyncio.ensure_future(h.wait("image", timeout=5))
        await asyncio.sleep(0)  # let the waiter register (one loop step)
        await c.write_image(frame, codec="jpeg", quality=95)
        got = [await within(seen.get()) for _ in range(3)]
        assert [kind for kind, _ in got] == ["plain", "async", "any"]
        img, conn = await within(sub.get())
        waited, _ = await within(waiter)
        assert conn.name == "cam" and _psnr(img, frame) > 30
        assert all(x is img for _, x in got) and waited is img
        assert calls and calls[0] != loop_thread and len(calls) == 1
        assert h.get("image") is img  # the decoded array replaced the stored file

        # PNG is lossless for uint16 and grayscale; the host sends it down.
        depth = (np.arange(60 * 80, dtype=np.uint16) * 7).reshape(60, 80)
        down = c.subscribe("depth")
        await h.write_image_all(depth, channel="depth", codec="png")
        assert np.array_equal(await within(down.get()), depth)
        stats = h.stats()
        assert stats["images"]["received"]["image"]["codec"] == "jpeg"
        assert stats["images"]["sent"]["depth"]["frames"] == 1
        assert stats["images"]["sent"]["depth"]["delivered"] == 1
        assert stats["clients"]["cam"]["images_sent"] == 1
        assert c.stats()["images"]["received"]["depth"]["codec"] == "png"
        sent = c.stats()["images"]["sent"]
        assert sent["image"]["frames"] == sent["idle"]["frames"] == 1


@needs_jpeg
@run_async
async def test_image_codec_defaults_and_encoding_once(monkeypatch: pytest.MonkeyPatch) -> None:
    encoded: List[str] = []
    real_encode = images.encode

    def counting(img: Any, codec: str = "jpeg", *args: Any, **kwargs: Any) -> Any:
        encoded.append(codec)
        return real_encode(img, codec, *args, **kwargs)

    monkeypatch.setattr(images.codecs, "encode", counting)
    frame = _frame()
    async with aio.Host(port=0, image_codec="jpeg", image_quality=80) as h:
        clients = [await aio.Client(port=h.port).start() for _ in range(3)]
        subs = [c.subscribe("image") for c in clients]
        assert await h.write_image_all(frame) == 3
        for sub in subs:
            assert _psnr(await within(sub.get()), frame) > 28
        assert encoded == ["jpeg"]  # once, whatever the number of clients
        assert all(c.get_jpeg() is not None for c in clients)

        c = await aio.Client(port=h.port, image_codec="jpeg", image_quality=85).start()
        up = h.subscribe("image")
        await c.write_image(frame)
        img, _ = await within(up.get())
        assert img.shape == frame.shape and encoded == ["jpeg", "jpeg"]
        await c.write_image(frame, codec="raw")  # per call
        img, _ = await within(up.get())
        assert np.array_equal(img, frame)
        with pytest.raises(ValueError, match="quality"):
            await c.write_image(frame, quality=0)
        with pytest.raises(TypeError, match="uint8"):
            await c.write_image(np.zeros((4, 4), np.float32), codec="jpeg")
        with pytest.raises(ValueError):
            aio.Client(port=1, image_codec="gif")
        for client in [*clients, c]:
            await client.close()


@run_async
async def test_images_are_conflated_for_a_slow_receiver() -> None:
    async with aio.Host(port=0) as h, aio.Client(port=h.port) as c:
        conn = h.clients()[0]
        mine = c.connection
        assert mine is not None and mine.transport is not None
        mine.transport.pause_reading()  # the receiver stops reading: a very slow consumer
        frame = np.zeros((500, 1000, 3), np.uint8)
        for i in range(60):
            frame = np.full((500, 1000, 3), i, np.uint8)
            assert await h.write_image_all(frame) == 1
            # Never more than what went out plus one waiting frame per channel.
            assert conn.queued_bytes <= 3 * frame.nbytes
        assert conn.images_dropped > 0
        assert conn.images_sent + conn.images_dropped == 60
        sent = h.stats()["images"]["sent"]["image"]
        assert sent["frames"] == 60 and sent["dropped"] == conn.images_dropped
        sub = c.subscribe("image")
        mine.transport.resume_reading()
        received = 0
        while True:  # bounded: at most images_sent frames come
            img = await within(sub.get())
            received += 1
            if img[0, 0, 0] == 59:
                break
        assert received <= conn.images_sent and np.array_equal(img, frame)
        assert conn.stats()["images_dropped"] == conn.images_dropped


@needs_jpeg
@run_async
async def test_a_corrupt_image_fails_its_reader_only(caplog: pytest.LogCaptureFixture) -> None:
    good = images.encode(_frame(), "jpeg")
    bad = images.EncodedImage("jpeg", bytes(good.data)[:200], good.shape, good.dtype)
    async with aio.Host(port=0) as h, aio.Client(port=h.port) as c:
        sub = h.subscribe("image")
        called: asyncio.Queue[Any] = asyncio.Queue()
        h.on("image", lambda img, conn: called.put_nowait(img))
        with caplog.at_level(logging.ERROR, logger="socketengine"):
            await c.write("image", bad)
            await c.write_image(_frame(), codec="jpeg")
            with pytest.raises(ValueError):
                await within(sub.get())
            img, _ = await within(sub.get())  # the next frame is fine
            assert img.shape == _frame().shape
            assert (await within(called.get())).shape == img.shape
        assert any("could not be decoded" in r.message for r in caplog.records)
        assert c.connected and len(h.clients()) == 1


@needs_jpeg
@needs_png
@run_async
async def test_image_interop_with_the_threaded_layer() -> None:
    frame = _frame()
    async with aio.Host(port=0) as h:
        sub = h.subscribe("image")
        tc = await asyncio.to_thread(socketengine.Client, port=h.port)
        try:
            await asyncio.to_thread(tc.write_image, frame, "image", "jpeg", 90)
            img, _ = await within(sub.get())
            assert _psnr(img, frame) > 30 and h.get_jpeg() is not None
            depth = (np.arange(30 * 40, dtype=np.uint16) * 11).reshape(30, 40)
            await h.write_image_all(depth, channel="depth", codec="png")
            await until(lambda: tc.get("depth") is not None, what="the threaded client")
            assert np.array_equal(tc.get("depth"), depth)
        finally:
            await asyncio.to_thread(tc.close)
    th = await asyncio.to_thread(socketengine.Host, port=0)
    try:
        c = await aio.Client(port=th.port).start()
        await c.write_image(frame, codec="png")
        await until(lambda: th.get("image") is not None, what="the threaded host")
        assert np.array_equal(th.get("image"), frame)
        down = c.subscribe("image")
        await until(lambda: th.clients(), what="the threaded host's client list")
        await asyncio.to_thread(th.write_image_all, frame, "image", "jpeg", 90)
        assert _psnr(await within(down.get()), frame) > 30
        assert c.get_jpeg() is not None
        await c.close()
    finally:
        await asyncio.to_thread(th.close)


# -- on_message -----------------------------------------------------------------------------


@run_async
async def test_on_message_sees_every_channel_in_order_after_on_callbacks() -> None:
    log: List[Tuple[str, str, Any]] = []
    done = asyncio.Event()
    async with aio.Host(port=0) as h, aio.Client(port=h.port, name="c") as c:
        h.on("a", lambda data, conn: log.append(("on", "a", data)))

        @h.on_message
        async def record(channel: str, data: Any, conn: aio.Connection) -> None:
            await asyncio.sleep(0)
            log.append(("any", channel, (data, conn.name)))
            if channel == "end":
                done.set()

        for i in range(3):
            await c.write("a", i)
            await c.write("b", -i)
        await c.write("end", None)
        await within(done.wait())
        expected: List[Tuple[str, str, Any]] = []
        for i in range(3):
            expected += [("on", "a", i), ("any", "a", (i, "c")), ("any", "b", (-i, "c"))]
        assert log == [*expected, ("any", "end", (None, "c"))]

        got: asyncio.Queue[Tuple[str, Any]] = asyncio.Queue()
        c.on_message(lambda channel, data: got.put_nowait((channel, data)))
        await h.write_all("x", 1)
        await h.clients()[0].write("y", [2])
        assert [await within(got.get()) for _ in range(2)] == [("x", 1), ("y", [2])]
        with pytest.raises(TypeError):
            c.on_message(3)  # type: ignore[type-var]
