"""Parity: the same scenarios against both I/O layers (threaded and asyncio).

Every rule of a connection lives once, in the sans-I/O engine; this suite exists to
catch a layer that drifts from it.  Each scenario runs with ``layer`` = ``"sync"``
(``socketengine.Host``/``Client``) and ``"aio"`` (``socketengine.aio``), the latter on
an event loop in a helper thread so that both are driven by the same test code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict, Iterator, List, Optional, Tuple, TypeVar

import numpy as np
import pytest
from conftest import thread_frame, wait_for

from socketengine import Client, Host, SocketEngineError, aio, frames, images
from socketengine.protocol import Protocol, Role

# Arrays and images: over the socket and over shared memory (conftest.transfer).
pytestmark = pytest.mark.usefixtures("transfer")

T = TypeVar("T")
LAYERS = ["sync", "aio"]


class AioThread:
    """An event loop in a daemon thread; ``run`` awaits a coroutine from the test."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, aw: Awaitable[T], timeout: float = 20.0) -> T:
        async def wrapper() -> T:
            return await aw

        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        async def wrapper() -> T:
            return fn()

        return self.run(wrapper())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def loop_thread() -> Iterator[AioThread]:
    runner = AioThread()
    yield runner
    runner.close()


class Side:
    """One endpoint of either layer, driven with blocking calls."""

    def __init__(self, layer: str, endpoint: Any, runner: Optional[AioThread]) -> None:
        self.layer = layer
        self.ep = endpoint
        self.runner = runner

    def do(self, name: str, *args: Any, **kwargs: Any) -> Any:
        result = getattr(self.ep, name)(*args, **kwargs)
        if self.runner is not None and asyncio.iscoroutine(result):
            return self.runner.run(result)
        return result

    def close(self) -> None:
        self.do("close")


def make_host(layer: str, runner: AioThread, **kwargs: Any) -> Side:
    if layer == "sync":
        return Side(layer, Host(port=0, **kwargs), None)

    async def start() -> Any:
        return await aio.Host(port=0, **kwargs).start()

    return Side(layer, runner.run(start()), runner)


def make_client(layer: str, runner: AioThread, port: int, **kwargs: Any) -> Side:
    kwargs.setdefault("connect_timeout", 10)
    if layer == "sync":
        return Side(layer, Client(port=port, **kwargs), None)

    async def start() -> Any:
        return await aio.Client(port=port, **kwargs).start()

    return Side(layer, runner.run(start()), runner)


# -- parameters ----------------------------------------------------------------------------


BAD_HOST_ARGS: List[Dict[str, Any]] = [
    {"timeout": -1},
    {"max_buffer": -1},
    {"heartbeat": 0},
    {"max_message": 100},
    {"max_clients": 0},
    {"keep_departed": -1},
    {"handshake_timeout": 0},
    {"tls": "no"},
    {"token": 3},
    {"retain_relayed_bytes": -1},
]


@pytest.mark.parametrize("kwargs", BAD_HOST_ARGS, ids=lambda k: next(iter(k)))
def test_both_layers_refuse_the_same_host_parameters(kwargs: Dict[str, Any]) -> None:
    errors = []
    for make in (lambda: Host(port=0, open=False, **kwargs), lambda: aio.Host(port=0, **kwargs)):
        with pytest.raises((ValueError, TypeError)) as info:
            make()
        errors.append(type(info.value))
    assert errors[0] is errors[1]


@pytest.mark.parametrize(
    "kwargs", [{"max_buffer": 0}, {"timeout": 0}, {"heartbeat": None}, {"keep_departed": 0}]
)
def test_both_layers_accept_the_same_edge_values(kwargs: Dict[str, Any]) -> None:
    sync_host = Host(port=0, open=False, **kwargs)
    aio_host = aio.Host(port=0, **kwargs)
    for key, value in kwargs.items():
        assert getattr(sync_host, key) == getattr(aio_host, key) == value
    sync_host.close()


@pytest.mark.parametrize("name", ["x" * 257, "é" * 129, 5])
def test_both_layers_refuse_the_same_client_names(name: Any) -> None:
    with pytest.raises(TypeError):
        Client(port=1, open=False, name=name)
    with pytest.raises(TypeError):
        aio.Client(port=1, name=name)


# -- closing: nothing after BYE ------------------------------------------------------------


def _raw_host_that_pings_after_bye(listener: socket.socket, result: Dict[str, Any]) -> None:
    """Accept one client, handshake with the sans-I/O core, and answer its BYE with a
    PING; record every frame type the client sends after the handshake."""
    conn, _ = listener.accept()
    conn.settimeout(10)
    proto = Protocol(Role.HOST)
    decoder = proto.decoder
    while not proto.is_open:
        data = conn.recv(65536)
        buf = decoder.get_buffer()
        buf[: len(data)] = data
        buf.release()
        decoder.buffer_updated(len(data))
        proto.events()
        conn.sendall(proto.data_to_send())
    stream = b""
    pinged = False
    while True:
        data = conn.recv(65536)
        if not data:
            break
        stream += data
        if not pinged and frames.BYE in _types(stream):
            conn.sendall(b"".join(frames.encode_frame(frames.PING)))
            pinged = True
    result["types"] = _types(stream)
    result["pinged"] = pinged
    conn.close()


def _types(data: bytes) -> List[int]:
    out, off = [], 0
    while off + frames.HEADER_SIZE <= len(data):
        t, _, ch, _, meta, body = frames.HEADER.unpack_from(data, off)
        out.append(t)
        off += frames.HEADER_SIZE + ch + meta + body
    return out


@pytest.mark.parametrize("layer", LAYERS)
def test_a_ping_that_arrives_after_our_bye_is_not_answered(
    layer: str, loop_thread: AioThread, caplog: pytest.LogCaptureFixture
) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    result: Dict[str, Any] = {}
    server = threading.Thread(
        target=_raw_host_that_pings_after_bye, args=(listener, result), daemon=True
    )
    server.start()
    client = make_client(layer, loop_thread, listener.getsockname()[1], heartbeat=None)
    with caplog.at_level(logging.DEBUG):
        client.close()
    server.join(10)
    listener.close()
    assert result["pinged"]
    assert result["types"] == [frames.BYE]  # no PONG after the BYE
    assert "Fatal error" not in caplog.text


# -- retained values -----------------------------------------------------------------------


@pytest.mark.parametrize("layer", LAYERS)
def test_retained_arrays_are_snapshots_in_both_layers(layer: str, loop_thread: AioThread) -> None:
    np = pytest.importorskip("numpy")
    host = make_host(layer, loop_thread)
    try:
        arr = np.arange(6, dtype=np.int32)
        host.do("write_all", "cfg", arr, retain=True)
        arr[:] = -1  # changed after retaining: late joiners must not see it
        with Client(port=host.ep.port, connect_timeout=10) as late:
            wait_for(lambda: late.get("cfg") is not None, what="the retained value")
            assert late.get("cfg").tolist() == list(range(6))
        host.do("clear_retained", "cfg")
        with Client(port=host.ep.port, connect_timeout=10) as later:
            later.write("ping", 1)
            wait_for(lambda: host.ep.get_all("ping"), what="the later client")
            assert later.get("cfg") is None
    finally:
        host.close()


# -- subscriptions and callbacks -----------------------------------------------------------


@pytest.mark.parametrize("layer", LAYERS)
def test_closing_a_subscription_keeps_what_was_queued(layer: str, loop_thread: AioThread) -> None:
    with Host(port=0) as host:
        client = make_client(layer, loop_thread, host.port)
        try:
            sub = client.do("subscribe", "n")
            wait_for(lambda: host.clients(), what="the client")
            for i in range(3):
                host.write_all("n", i)
            wait_for(lambda: len(sub) == 3, what="three queued items")
            sub.close()
            if layer == "sync":
                got = list(sub)
            else:

                async def drain() -> List[Any]:
                    return [item async for item in sub]

                got = loop_thread.run(drain())
            assert got == [0, 1, 2]
        finally:
            client.close()


@pytest.mark.parametrize("layer", LAYERS)
def test_off_without_a_function_removes_every_callback(layer: str, loop_thread: AioThread) -> None:
    with Host(port=0) as host:
        client = make_client(layer, loop_thread, host.port)
        try:
            seen: List[Any] = []
            client.do("on", "v", lambda v: seen.append(("a", v)))
            client.do("on", "v", lambda v: seen.append(("b", v)))
            client.do("off", "v")
            client.do("on", "w", seen.append)
            wait_for(lambda: host.clients(), what="the client")
            host.write_all("v", 1)
            host.write_all("w", 2)
            wait_for(lambda: seen, what="the w callback")
            assert seen == [2]
        finally:
            client.close()


@pytest.mark.parametrize("layer", LAYERS)
def test_requests_fail_with_the_same_errors(layer: str, loop_thread: AioThread) -> None:
    from socketengine import RemoteError

    with Host(port=0) as host:
        host.on("boom", lambda v, conn: 1 / 0)
        client = make_client(layer, loop_thread, host.port)
        try:
            with pytest.raises(RemoteError, match="ZeroDivisionError"):
                client.do("request", "boom", 1, timeout=5)
            with pytest.raises(RemoteError, match="no handler"):
                client.do("request", "nobody", 1, timeout=5)
        finally:
            client.close()


# -- reconnect outbox ----------------------------------------------------------------------


@pytest.mark.parametrize("layer", LAYERS)
def test_images_written_while_reconnecting_are_conflated(
    layer: str, loop_thread: AioThread
) -> None:
    np = pytest.importorskip("numpy")
    first = Host(port=0)
    port = first.port
    client = make_client(layer, loop_thread, port, heartbeat=None)
    try:
        wait_for(lambda: first.clients(), what="the client")
        first.close()
        wait_for(lambda: not client.ep.connected, what="the client to notice")
        client.do("write", "before", 1)
        for i in range(5):
            client.do("write_image", np.full((4, 4), i, dtype=np.uint8), "cam")
        client.do("write", "after", 2)
        sent = client.do("stats")["images"]["sent"]["cam"]
        assert sent["frames"] == 5 and sent["dropped"] == 4
        with Host(port=port) as second:
            wait_for(lambda: second.get("after") == 2, what="the outbox to arrive")
            assert second.get("before") == 1
            assert second.get("cam").tolist() == np.full((4, 4), 4, dtype=np.uint8).tolist()
            assert second.stats()["images"]["received"]["cam"]["frames"] == 1
    finally:
        client.close()


# -- heartbeats ----------------------------------------------------------------------------


def _listener_that_only_answers_pings(port: int, stop: threading.Event, got: List[Any]) -> None:
    """A minimal client written from docs/protocol.md: it handshakes (as a 1.0 peer
    would: no "hb"), answers every PING with a PONG and never sends anything else."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    proto = Protocol(Role.CLIENT, name="listener")
    sock.sendall(proto.data_to_send())
    sock.settimeout(0.2)
    decoder = proto.decoder
    while not stop.is_set():
        try:
            data = sock.recv(65536)
        except socket.timeout:
            continue
        if not data:
            break
        buf = decoder.get_buffer()
        buf[: len(data)] = data
        buf.release()
        decoder.buffer_updated(len(data))
        for frame in proto.events():
            if frame.type == frames.DATA:
                got.append(frame.value())
        out = proto.data_to_send()  # the handshake, and PONGs for PINGs
        if out:
            sock.sendall(out)
    sock.close()


@pytest.mark.parametrize("layer", LAYERS)
def test_a_streaming_host_keeps_a_client_that_only_answers_pings(
    layer: str, loop_thread: AioThread
) -> None:
    """Protocol 1.0 pinged only after H without *sending*: a host streaming to a client
    never pinged it and declared it dead after 3·H.  The 1.1 rule pings on silence."""
    host = make_host(layer, loop_thread, heartbeat=0.2)
    stop = threading.Event()
    got: List[Any] = []
    reader = threading.Thread(
        target=_listener_that_only_answers_pings, args=(host.ep.port, stop, got), daemon=True
    )
    reader.start()
    try:
        wait_for(lambda: host.ep.clients(), what="the listener")
        for i in range(40):  # 2 s = 10 heartbeat intervals, at 20 messages/s
            host.do("write_all", "stream", i)
            stop.wait(0.05)  # pacing the producer, not synchronisation
        assert len(host.ep.clients()) == 1, "the listener was declared dead"
        wait_for(lambda: len(got) == 40, what="every streamed value")
        assert got == list(range(40))
    finally:
        stop.set()
        reader.join(10)
        host.close()


@pytest.mark.parametrize("layer", LAYERS)
def test_a_peer_that_goes_silent_is_declared_dead(layer: str, loop_thread: AioThread) -> None:
    host = make_host(layer, loop_thread, heartbeat=0.2)
    try:
        sock = socket.create_connection(("127.0.0.1", host.ep.port), timeout=10)
        proto = Protocol(Role.CLIENT, name="mute")
        sock.sendall(proto.data_to_send())
        wait_for(lambda: host.ep.clients(), what="the mute client")
        # It never reads nor answers again: dead within 3·H (+ one check interval).
        wait_for(lambda: not host.ep.clients(), timeout=5, what="the heartbeat verdict")
        sock.close()
    finally:
        host.close()


# -- budgets: handshakes, channels, stored bytes, departed clients ------------------------

ROOT = Path(__file__).resolve().parent.parent
FLOOD_TOKEN = "flood-test-token"  # bench/flood.py's


def _flooder(port: int, count: int, seconds: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.flood", "--flooder", str(port), str(count), str(seconds)],
        cwd=str(ROOT),
        stdout=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("layer", LAYERS)
def test_unfinished_handshakes_do_not_keep_a_client_with_the_token_out(
    layer: str, loop_thread: AioThread
) -> None:
    """300 connections that never finish the handshake, re-opened whenever the host
    closes them: before max_pending they held seats and the right client was refused
    ("host is full") on most tries; now they only evict each other."""
    flood = int(os.environ.get("SOCKETENGINE_FLOOD", "300"))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < flood + 200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(flood + 200, hard), hard))
    host = make_host(
        layer, loop_thread, token=FLOOD_TOKEN, max_clients=100, max_pending=32, heartbeat=None
    )
    proc = _flooder(host.ep.port, flood, 10.0)
    try:
        admission = host.ep._admission
        wait_for(lambda: admission.evicted >= flood, timeout=10, what="the flood")
        # The client gets in every time.  A try may still lose its handshake to the
        # flood (evicted as "busy" when 32 newer handshakes arrive before the host reads
        # its HELLO, a matter of load): that one is retried.  What must never happen is
        # the refusal the flood used to cause: "the host is full".
        tries = 0
        failures: List[str] = []
        for _ in range(10):
            while True:
                tries += 1
                assert tries <= 40, f"{tries} tries for 10 entries; failures: {failures[:5]}"
                try:
                    client = Client(port=host.ep.port, token=FLOOD_TOKEN, connect_timeout=5)
                    break
                except (SocketEngineError, OSError) as exc:
                    failures.append(str(exc))
                    assert "full" not in str(exc), exc
            wait_for(lambda: admission.clients == 1, what="the seat")  # the flood has none
            client.close()
            wait_for(lambda: admission.clients == 0, what="the seat to be free again")
        assert admission.pending <= 32
    finally:
        proc.kill()
        proc.communicate(10)
        host.close()


def _writer(port: int, **kwargs: Any) -> Client:
    return Client(port=port, connect_timeout=10, heartbeat=None, **kwargs)


def _batch(*pairs: Any) -> bytes:
    """One BATCH frame of small ``(channel, value)`` items, built by hand."""
    body = b"".join(frames.value_item(ch, v) for ch, v in pairs)  # type: ignore[misc]
    return b"".join(frames.encode_frame(frames.BATCH, "", body))


def _raw_client(port: int, name: str = "raw") -> socket.socket:
    """A hand-driven client that announces BATCH support; its handshake is not awaited."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    hello = frames.encode_value_frame(
        frames.HELLO, "", {"v": 1, "name": name, "nonce": b"n" * 16, "batch": True}
    )
    sock.sendall(frames.PREAMBLE + b"".join(hello))
    return sock


@contextlib.contextmanager
def _raw_client_of(layer: str, loop_thread: AioThread) -> Iterator[Tuple[Any, socket.socket, Any]]:
    """A host of ``layer`` and one :func:`_raw_client` of it, once the host has its
    connection: ``(host, sock, conn)``; both closed on the way out."""
    host = make_host(layer, loop_thread)
    sock = None
    try:
        sock = _raw_client(host.ep.port)
        wait_for(lambda: len(host.ep.clients()) == 1, what="the raw client")
        yield host, sock, host.ep.clients()[0]
    finally:
        if sock is not None:
            sock.close()
        host.close()


@pytest.mark.parametrize("layer", LAYERS)
def test_a_batch_leaves_the_same_values_whether_or_not_anything_watches(
    layer: str, loop_thread: AioThread
) -> None:
    # With nothing watching, both layers store a BATCH in bulk (the last value of each
    # channel); with a callback, item by item.  Values, stamps and counts must not tell
    # the two apart, and the watcher gets every item in order.
    with _raw_client_of(layer, loop_thread) as (host, sock, conn):
        pairs = [("a", 1), ("b", [2]), ("a", 3), ("c", {"k": 4}), ("b", [5])]
        last = {"a": 3, "b": [5], "c": {"k": 4}}
        got: List[Any] = []
        for watched in (False, True):
            if watched:
                host.ep.on("b", lambda value, *rest: got.append(value))
            start = time.time()
            sock.sendall(_batch(*pairs))
            wait_for(lambda n=5 + 5 * watched: conn.messages_in == n, what="the batch")
            assert {ch: host.ep.get(ch) for ch in last} == last
            assert {ch: conn.values[ch] for ch in last} == last
            assert all(start <= conn.received_at[ch] <= time.time() for ch in last)
            if watched:
                wait_for(lambda: got == [[2], [5]], what="both items at the callback")
        assert len(host.ep.clients()) == 1


@pytest.mark.parametrize("layer", LAYERS)
def test_a_batch_keeps_every_value_of_a_watched_channel_and_the_last_of_the_others(
    layer: str, loop_thread: AioThread
) -> None:
    # A callback on one channel: a BATCH without that channel is reduced to its last
    # values, one with it is handled item by item.  Either way the callback gets each
    # of its values in order, and every channel keeps its last value.
    with _raw_client_of(layer, loop_thread) as (host, sock, conn):
        got: List[Any] = []
        host.ep.on("cmd", lambda value, *rest: got.append(value))
        sock.sendall(_batch(("a", 1), ("b", [2]), ("a", 3)))  # "cmd" is not in it
        wait_for(lambda: conn.messages_in == 3, what="the first batch")
        assert (host.ep.get("a"), host.ep.get("b")) == (3, [2])
        sock.sendall(_batch(("a", 4), ("cmd", "x"), ("a", 5), ("cmd", "y"), ("b", [6])))
        wait_for(lambda: conn.messages_in == 8, what="the second batch")
        wait_for(lambda: got == ["x", "y"], what="both commands at the callback")
        want = {"a": 5, "b": [6], "cmd": "y"}
        assert {ch: host.ep.get(ch) for ch in want} == want
        assert {ch: conn.values[ch] for ch in want} == want
        sock.sendall(_batch(("b", [7]), ("b", [8])))  # reduced again
        wait_for(lambda: conn.messages_in == 10, what="the third batch")
        assert host.ep.get("b") == [8] and got == ["x", "y"]


@pytest.mark.parametrize("layer", LAYERS)
def test_a_client_beyond_max_channels_is_closed_and_the_log_says_why(
    layer: str, loop_thread: AioThread, caplog: pytest.LogCaptureFixture
) -> None:
    host = make_host(layer, loop_thread, max_channels=5)
    try:
        with caplog.at_level(logging.WARNING, logger="socketengine"), _writer(host.ep.port) as c:
            for i in range(5):
                c.write(f"c{i}", i)
            c.write("c0", 10)  # a known channel: no new one
            wait_for(lambda: host.ep.get("c4") == 4, what="the five channels")
            assert len(host.ep.clients()) == 1
            c.write("c5", 5)
            wait_for(lambda: not host.ep.clients(), what="the connection to close")
        assert "max_channels=5" in caplog.text
        assert host.ep.get("c5") is None
        assert host.ep.get_all("c0") == [10]  # what it wrote before is kept
    finally:
        host.close()


@pytest.mark.parametrize("layer", LAYERS)
def test_a_batch_that_crosses_max_channels_keeps_the_values_before_it(
    layer: str, loop_thread: AioThread, caplog: pytest.LogCaptureFixture
) -> None:
    # A writer's burst may travel as one BATCH frame: which of its values the host keeps
    # must not depend on how they were framed (here: one frame, sent by hand).
    host = make_host(layer, loop_thread, max_channels=5)
    try:
        with caplog.at_level(logging.WARNING, logger="socketengine"):
            sock = _raw_client(host.ep.port)
            wait_for(lambda: len(host.ep.clients()) == 1, what="the raw client")
            items = [f"c{i}" for i in range(5)] + ["c0", "c5", "c1"]
            sock.sendall(_batch(*zip(items, [0, 1, 2, 3, 4, 10, 5, 11])))
            wait_for(lambda: not host.ep.clients(), what="the connection to close")
            sock.close()
        assert "max_channels=5" in caplog.text
        assert host.ep.get_all("c0") == [10]  # before the sixth channel: kept
        assert host.ep.get_all("c1") == [1]  # after it: not stored
        assert host.ep.get("c5") is None
    finally:
        host.close()


@pytest.mark.parametrize("layer", LAYERS)
def test_a_batch_is_budgeted_by_what_it_leaves_stored(
    layer: str, loop_thread: AioThread, caplog: pytest.LogCaptureFixture
) -> None:
    # Only a channel's last value stays stored: a BATCH whose intermediate value would
    # exceed max_stored but whose final values fit is accepted by both layers; one
    # whose final values do not fit closes the connection, keeping what came before.
    host = make_host(layer, loop_thread, max_stored=3000)
    try:
        with caplog.at_level(logging.WARNING, logger="socketengine"):
            sock = _raw_client(host.ep.port)
            wait_for(lambda: len(host.ep.clients()) == 1, what="the raw client")
            sock.sendall(_batch(("a", b"x" * 3500), ("a", 1), ("b", 2)))
            wait_for(lambda: host.ep.get("b") == 2, what="the first batch")
            assert host.ep.get_all("a") == [1]
            assert len(host.ep.clients()) == 1 and "max_stored" not in caplog.text
            sock.sendall(_batch(("c", 3), ("d", b"y" * 3500), ("e", 4)))
            wait_for(lambda: not host.ep.clients(), what="the connection to close")
            sock.close()
        assert "max_stored=3000" in caplog.text
        assert host.ep.get("c") == 3  # before the offending value: kept
        assert host.ep.get("d") is None and host.ep.get("e") is None
    finally:
        host.close()


@pytest.mark.parametrize("layer", LAYERS)
def test_a_large_batch_that_would_decode_beyond_max_stored_is_not_decoded(
    layer: str, loop_thread: AioThread, caplog: pytest.LogCaptureFixture
) -> None:
    # Each item's final value is tiny, so counting after decoding would accept it: but
    # 1 MiB of nested empty lists is ~60 MiB of Python objects while decoded.  A body
    # over BATCH_READ_ABOVE is read first and refused; one that decodes small is taken.
    host = make_host(layer, loop_thread, max_stored=8 * 1024 * 1024)
    try:
        with caplog.at_level(logging.WARNING, logger="socketengine"):
            good = _raw_client(host.ep.port, "good")
            wait_for(lambda: len(host.ep.clients()) == 1, what="the first raw client")
            # 300 KiB of ordinary items: larger than BATCH_READ_ABOVE, decodes small.
            pairs = [(f"k{i % 50}", [i, "v" * 90]) for i in range(3000)]
            good.sendall(_batch(*pairs))
            wait_for(lambda: host.ep.get("k49") == [2999, "v" * 90], what="the large batch")
            bomb = _raw_client(host.ep.port, "bomb")
            wait_for(lambda: len(host.ep.clients()) == 2, what="the second raw client")
            item = b"\xa1a" + b"\x91" * 6 + b"\x90"  # "a": [[[[[[[]]]]]]]
            body = item * (1024 * 1024 // len(item))
            bomb.sendall(b"".join(frames.encode_frame(frames.BATCH, "", body)))
            wait_for(lambda: len(host.ep.clients()) == 1, what="the connection to close")
            assert [c.name for c in host.ep.clients()] == ["good"]
            bomb.close()
            good.close()
        assert "BATCH frame" in caplog.text and "max_stored=8388608" in caplog.text
        assert host.ep.get("a") is None
    finally:
        host.close()


@pytest.mark.parametrize("layer", LAYERS)
def test_a_client_beyond_max_stored_is_closed_and_the_log_says_why(
    layer: str, loop_thread: AioThread, caplog: pytest.LogCaptureFixture
) -> None:
    host = make_host(layer, loop_thread, max_stored=10_000)
    try:
        with caplog.at_level(logging.WARNING, logger="socketengine"), _writer(host.ep.port) as c:
            for i in range(3):  # a new value replaces the old one's count
                c.write("a", bytes([i]) * 6000)
            wait_for(lambda: host.ep.get("a") == b"\2" * 6000, what="the values")
            assert len(host.ep.clients()) == 1
            c.write("b", b"x" * 6000)
            wait_for(lambda: not host.ep.clients(), what="the connection to close")
        assert "max_stored=10000" in caplog.text
        assert host.ep.get("b") is None
    finally:
        host.close()


@pytest.mark.parametrize("layer", LAYERS)
def test_departed_clients_are_bounded_in_bytes_and_forgotten_everywhere(
    layer: str, loop_thread: AioThread
) -> None:
    host = make_host(layer, loop_thread, keep_departed_bytes=10_000)
    try:
        for name in ("first", "second"):
            with _writer(host.ep.port, name=name) as c:
                c.write("v", name.encode() * 1000)
                c.write(name, 1)
                wait_for(lambda n=name: host.ep.get(n) == 1, what=f"{name}'s values")
            wait_for(lambda: not host.ep.clients(), what=f"{name} to leave")
        # ~6 KB each: only the newest departed client fits in 10,000 bytes.  (A client
        # leaves clients() when it starts closing; it joins the departed ones when its
        # connection has finished closing: wait for that.)
        wait_for(
            lambda: host.ep.get_all("v") == [b"second" * 1000],
            what="the first departed client to be forgotten",
        )
        assert host.ep.get("first") is None  # forgotten by get() too
        assert host.ep.get("second") == 1
        assert len(host.ep._departed) == 1
    finally:
        host.close()


@pytest.mark.parametrize("layer", LAYERS)
def test_a_handshake_that_completes_after_the_last_seat_went_is_closed(
    layer: str, loop_thread: AioThread, caplog: pytest.LogCaptureFixture
) -> None:
    host = make_host(layer, loop_thread, max_clients=1, heartbeat=None)
    late = socket.create_connection(("127.0.0.1", host.ep.port), timeout=10)
    try:
        wait_for(lambda: host.ep._admission.pending == 1, what="the pending handshake")
        with caplog.at_level(logging.WARNING, logger="socketengine"), _writer(host.ep.port):
            wait_for(lambda: host.ep._admission.clients == 1, what="the first client")
            proto = Protocol(Role.CLIENT, name="late")
            late.sendall(proto.data_to_send())  # the handshake completes now...
            stream = b""
            while True:
                data = late.recv(65536)
                if not data:
                    break
                stream += data
            # ...and the host refuses it in the handshake: no seat was left (it did not
            # resume a session, which would have taken over its old link's seat).
            assert _types(stream[len(frames.PREAMBLE) :]) == [frames.REFUSE]
            assert [c.name for c in host.ep.clients()] == [None]
        assert "max_clients=1" in caplog.text
    finally:
        late.close()
        host.close()


@pytest.mark.parametrize("layer", LAYERS)
def test_a_refused_peer_that_already_reset_is_dropped_quietly(
    layer: str, loop_thread: AioThread, caplog: pytest.LogCaptureFixture
) -> None:
    """A peer refused at accept (the host is full) that hung up before the host got to
    it: the half-close after the REFUSE fails (the peer answered the REFUSE with a
    reset), and that ends this connection only -- no error escapes into the event
    loop, the host serves on."""
    host = make_host(layer, loop_thread, max_clients=1, resume_window=0, heartbeat=None)
    release = threading.Event()
    blocked = threading.Event()

    def block() -> None:  # hold the host's I/O thread while the peer comes and goes
        blocked.set()
        release.wait(10)

    try:
        with caplog.at_level(logging.WARNING), _writer(host.ep.port) as first:
            wait_for(lambda: host.ep._admission.clients == 1, what="the first client")
            if layer == "sync":
                host.ep._loop.call_soon(block)
            else:
                loop_thread.loop.call_soon_threadsafe(block)
            assert blocked.wait(10)
            try:
                # It hangs up before the host accepts: the host's REFUSE still leaves,
                # and on loopback the answer (a reset) is in before the half-close.
                socket.create_connection(("127.0.0.1", host.ep.port), timeout=10).close()
            finally:
                release.set()
            wait_for(lambda: "the host is full" in caplog.text, what="the refusal")
            first.write("after", 1)
            wait_for(lambda: host.ep.get("after") == 1, what="the first client's write")
        assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    finally:
        release.set()
        host.close()


# -- channel patterns ----------------------------------------------------------------------


@pytest.mark.parametrize("layer", LAYERS)
def test_patterns_on_wait_subscribe_in_both_layers(layer: str, loop_thread: AioThread) -> None:
    from socketengine import Pattern

    with Host(port=0) as host:
        client = make_client(layer, loop_thread, host.port)
        try:
            seen: List[Any] = []
            client.do("on", Pattern("sensors/+/temp"), lambda ch, v: seen.append((ch, v)))
            sub = client.do("subscribe", Pattern("sensors/#"))
            exact_plus: List[Any] = []
            client.do("on", "sensors/+/temp", exact_plus.append)  # a str stays exact
            wait_for(lambda: host.clients(), what="the client")
            host.write_all("sensors/left/temp", 21.5)
            host.write_all("sensors/left/hum", 40)
            host.write_all("other", 1)
            host.write_all("sensors/+/temp", "literal")
            wait_for(lambda: len(seen) == 2, what="two pattern callbacks")
            assert seen == [("sensors/left/temp", 21.5), ("sensors/+/temp", "literal")]
            wait_for(lambda: len(sub) == 3, what="three matching messages")
            if layer == "sync":
                got = [sub.get(timeout=5) for _ in range(3)]
            else:
                got = [loop_thread.run(sub.get()) for _ in range(3)]
            assert got == [
                ("sensors/left/temp", 21.5),
                ("sensors/left/hum", 40),
                ("sensors/+/temp", "literal"),
            ]
            wait_for(lambda: exact_plus == ["literal"], what="the exact '+' name")
            client.do("off", Pattern("sensors/+/temp"))
            if layer == "sync":
                waiter = threading.Thread(
                    target=lambda: seen.append(client.ep.wait(Pattern("a/+"), timeout=5))
                )
                waiter.start()
                wait_for(lambda: client.ep._patterns, what="the pattern waiter")
                host.write_all("a/b", "x")
                waiter.join(10)
                assert seen[-1] == ("a/b", "x")
            else:

                async def wait_one() -> Any:
                    task = asyncio.ensure_future(client.ep.wait(Pattern("a/+"), timeout=5))
                    for _ in range(200):
                        if client.ep._patterns.all_waiters():
                            break
                        await asyncio.sleep(0.01)
                    host.write_all("a/b", "x")
                    return await task

                assert loop_thread.run(wait_one()) == ("a/b", "x")
            host.write_all("sensors/right/temp", 3)  # off(): no pattern callback any more
            wait_for(lambda: len(sub) == 1, what="the subscription to go on")
            assert len(seen) == 2 + (1 if layer == "sync" else 0)
        finally:
            client.close()


@pytest.mark.parametrize("layer", LAYERS)
def test_host_get_all_and_wait_with_a_pattern(layer: str, loop_thread: AioThread) -> None:
    from socketengine import Pattern

    host = make_host(layer, loop_thread)
    try:
        with Client(port=host.ep.port, name="a") as a, Client(port=host.ep.port, name="b") as b:
            a.write("robot/1/pose", [1, 2])
            b.write("robot/2/pose", [3, 4])
            b.write("robot/2/speed", 5)
            wait_for(lambda: len(host.ep.get_all(Pattern("robot/#"))) == 3)
            assert host.ep.get_all(Pattern("robot/+/pose")) == {
                "robot/1/pose": [[1, 2]],
                "robot/2/pose": [[3, 4]],
            }
            assert host.ep.get_all(Pattern("nothing/#")) == {}
            sub = host.do("subscribe", Pattern("robot/#"))
            a.write("robot/1/pose", [9, 9])
            wait_for(lambda: len(sub) == 1)
            item = sub.get(timeout=5) if layer == "sync" else loop_thread.run(sub.get())
            channel, value, conn = item
            assert (channel, value, conn.name) == ("robot/1/pose", [9, 9], "a")
    finally:
        host.close()


@pytest.mark.parametrize("text", ["", "a/#/b", "a+/b", "#x", "a/b+"])
def test_malformed_patterns_are_refused_at_the_call(text: str) -> None:
    from socketengine import Pattern

    with pytest.raises(ValueError):
        Pattern(text)


# -- lossless image streams ----------------------------------------------------------------


@pytest.mark.parametrize("layer", LAYERS)
def test_a_lossless_image_channel_delivers_every_frame_in_order(
    layer: str, loop_thread: AioThread
) -> None:
    """The imagezmq receive loop, ported: the camera writes 100 frames with
    conflate=False, the hub reads them one by one through a subscription (slower than
    the camera) and gets 100 of 100, in order; the writer is slowed by backpressure."""
    np = pytest.importorskip("numpy")
    with Host(port=0) as hub:
        frames_in = hub.subscribe("image", maxsize=4)  # a small queue: backpressure early
        camera = make_client(layer, loop_thread, hub.port, max_buffer=1 << 20)
        try:
            wait_for(lambda: hub.clients(), what="the camera")
            done = threading.Event()

            def run_camera() -> None:
                for i in range(100):
                    frame = np.full((480, 640, 3), i % 256, dtype=np.uint8)
                    camera.do("write_image", frame, "image", conflate=False)
                done.set()

            writer = threading.Thread(target=run_camera, daemon=True)
            writer.start()
            got = []
            for _ in range(100):
                img, conn = frames_in.get(timeout=20)
                got.append(int(img[0, 0, 0]))
                if len(got) == 10:
                    assert not done.is_set()  # the camera waits for the slow hub
            writer.join(20)
            assert got == list(range(100))
            sent = camera.do("stats")["images"]["sent"]["image"]
            assert sent["frames"] == 100 and sent["dropped"] == 0
        finally:
            camera.close()


# -- acknowledged writes -------------------------------------------------------------------


@pytest.mark.parametrize("layer", LAYERS)
def test_acknowledged_writes_both_ways(layer: str, loop_thread: AioThread) -> None:
    host = make_host(layer, loop_thread)
    try:
        with Client(port=host.ep.port, name="c") as c:
            c.write("cfg", {"gain": 2}, ack=True, timeout=5)
            assert host.ep.get("cfg") == {"gain": 2}  # stored before write() returned
            for i in range(50):
                c.write("n", i)
            c.flush(timeout=5, acked=True)
            assert host.ep.get("n") == 49
            wait_for(lambda: host.ep.clients(), what="the client")
            (conn,) = host.ep.clients()
            if layer == "sync":
                conn.write("cmd", "go", ack=True, timeout=5)
                conn.flush(acked=True)
            else:
                loop_thread.run(conn.write("cmd", "go", ack=True, timeout=5))
                loop_thread.run(conn.flush(acked=True))
            assert c.get("cmd") == "go"
    finally:
        host.close()


@contextlib.contextmanager
def _mute_host() -> Iterator[int]:
    """A host that completes one client's handshake, then never reads nor answers;
    yields its port."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: List[socket.socket] = []

    def mute_host() -> None:
        conn, _ = listener.accept()
        accepted.append(conn)
        proto = Protocol(Role.HOST)
        while not proto.is_open:
            data = conn.recv(65536)
            buf = proto.decoder.get_buffer()
            buf[: len(data)] = data
            buf.release()
            proto.decoder.buffer_updated(len(data))
            proto.events()
            conn.sendall(proto.data_to_send())
        # then it never reads again, nor answers

    server = threading.Thread(target=mute_host, daemon=True)
    server.start()
    try:
        yield listener.getsockname()[1]
    finally:
        server.join(5)
        for s in accepted:
            s.close()
        listener.close()


@pytest.mark.parametrize("layer", LAYERS)
def test_an_acknowledged_write_to_a_peer_that_stopped_reading_times_out(
    layer: str, loop_thread: AioThread
) -> None:
    from socketengine import WriteTimeout

    with _mute_host() as port:
        client = make_client(layer, loop_thread, port, heartbeat=None)
        try:
            with pytest.raises(WriteTimeout, match="acknowledge"):
                client.do("write", "x", 1, ack=True, timeout=0.5)
        finally:
            client.close()


def _fill_the_queue(client: Side) -> None:
    """Write more than the socket buffers take to a peer that does not read: the
    client's queue stays non-empty (the asyncio write, which waits for the transport to
    drain, is left running in a task)."""
    big = b"x" * (32 << 20)
    if client.runner is None:
        client.do("write", "big", big)
        return

    async def start() -> None:
        task = asyncio.ensure_future(client.ep.write("big", big))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        await asyncio.sleep(0)

    client.runner.run(start())
    wait_for(lambda: client.ep.connection.stats()["queued_bytes"] > 0, what="a full queue")


@pytest.mark.parametrize("layer", LAYERS)
def test_an_acknowledgement_is_asked_for_even_when_the_queue_is_full(
    layer: str, loop_thread: AioThread
) -> None:
    # flush(acked=True) waits for the answer as long as its own timeout says; asking
    # for it (a SYNC frame) does not first wait for room behind a full queue.
    from socketengine import WriteTimeout

    with _mute_host() as port:
        client = make_client(
            layer, loop_thread, port, heartbeat=None, max_buffer=0, timeout=2, shm=False
        )
        try:
            _fill_the_queue(client)
            with pytest.raises(WriteTimeout, match="acknowledge"):
                client.do("flush", timeout=0.3, acked=True)
        finally:
            client.close()


@pytest.mark.parametrize("layer", LAYERS)
def test_an_image_write_never_waits_behind_a_full_queue(layer: str, loop_thread: AioThread) -> None:
    np = pytest.importorskip("numpy")
    with _mute_host() as port:
        client = make_client(
            layer, loop_thread, port, heartbeat=None, max_buffer=0, timeout=2, shm=False
        )
        try:
            _fill_the_queue(client)
            for i in range(3):  # each one replaces the unsent one before it
                client.do("write_image", np.full((8, 8), i, dtype=np.uint8), "cam")
            sent = client.ep.stats()["images"]["sent"]["cam"]
            assert (sent["frames"], sent["dropped"]) == (3, 2)
        finally:
            client.close()


def test_acknowledged_writes_need_a_1_1_peer() -> None:
    from socketengine import NotSupported
    from socketengine.engine import ConnectionEngine

    engine = ConnectionEngine(
        Protocol(Role.CLIENT),
        peer="old host",
        max_buffer=1 << 20,
        heartbeat=None,
        handshake_timeout=10,
        now=0.0,
    )
    # A 1.0 host's WELCOME has no "ack": nothing would ever answer a SYNC.
    with pytest.raises(NotSupported, match="1.0"):
        engine.sync_frame(1)


@pytest.mark.parametrize("layer", LAYERS)
def test_a_subscription_is_bounded_in_bytes(layer: str, loop_thread: AioThread) -> None:
    """A subscriber that never reads holds at most maxbytes (plus one read's worth):
    then its connection is no longer read, and TCP backpressure reaches the writer."""
    from socketengine import WriteTimeout

    with Host(port=0, max_buffer=1 << 20, timeout=0.5) as host:
        client = make_client(layer, loop_thread, host.port)
        try:
            sub = client.do("subscribe", "big", maxsize=10_000, maxbytes=1 << 20)
            wait_for(lambda: host.clients(), what="the client")
            (conn,) = host.clients()
            payload = b"x" * (64 * 1024)
            with pytest.raises(WriteTimeout):
                for _ in range(400):  # 25 MiB: far more than every buffer on the way
                    conn.write("big", payload)
            held = len(sub) * len(payload)
            assert held <= (1 << 20) + 4 * len(payload) * 16  # maxbytes + one read's worth
            assert len(sub) < 400
        finally:
            client.close()


# -- drifts between the layers found by reading both (each failed on one layer) -----------


def _next_item(side: Side, sub: Any) -> Any:
    return sub.get(timeout=10) if side.runner is None else side.runner.run(sub.get())


@pytest.mark.parametrize("layer", LAYERS)
def test_a_client_without_reconnect_ends_waits_and_subscriptions_when_its_link_is_lost(
    layer: str, loop_thread: AioThread
) -> None:
    from socketengine import ConnectionClosed

    host = Host(port=0)
    client = make_client(layer, loop_thread, host.port, reconnect=False)
    try:
        sub = client.do("subscribe", "s")
        host.write_all("s", 1)
        assert _next_item(client, sub) == 1
        host.write_all("s", 2)
        wait_for(lambda: len(sub) == 1, what="the second item")
        outcome: Dict[str, Any] = {}

        def waiting() -> None:
            try:
                outcome["value"] = client.do("wait", "w", timeout=20)
            except Exception as exc:
                outcome["error"] = exc

        thread = threading.Thread(target=waiting)
        thread.start()
        wait_for(lambda: "w" in client.ep._waiters, what="the wait to be registered")
        host.close()
        thread.join(15)
        assert not thread.is_alive(), "wait() was not woken by the lost link"
        assert isinstance(outcome.get("error"), ConnectionClosed), outcome
        assert _next_item(client, sub) == 2  # what arrived before the loss is read first
        with pytest.raises(ConnectionClosed):
            _next_item(client, sub)
        with pytest.raises(ConnectionClosed):
            client.do("wait", "w", timeout=10)
        with pytest.raises(ConnectionClosed):
            client.do("subscribe", "t")
    finally:
        client.close()
        host.close()


@pytest.mark.parametrize("layer", LAYERS)
def test_max_stored_counts_a_small_value_at_its_wire_size(
    layer: str, loop_thread: AioThread
) -> None:
    # 100 small ints: 101 bytes on the wire (at most SMALL_META: not read ahead), about
    # 900 as value_size estimates them or in memory.  A DATA frame built by hand: a
    # writer could batch it (BATCH items count at value_size).
    host = make_host(layer, loop_thread, max_stored=400)
    value = list(range(100))
    sock: Optional[socket.socket] = None
    try:
        sock = _raw_client(host.ep.port)
        wait_for(lambda: len(host.ep.clients()) == 1, what="the raw client")
        for channel, v in (("v", value), ("done", 1)):
            sock.sendall(b"".join(frames.encode_value_frame(frames.DATA, channel, v)))
        wait_for(lambda: host.ep.get("done") == 1, what="the values")
        assert host.ep.get("v") == value
        assert len(host.ep.clients()) == 1
    finally:
        if sock is not None:
            sock.close()
        host.close()


@pytest.mark.parametrize("layer", LAYERS)
def test_max_stored_counts_a_large_value_at_its_decoded_size(
    layer: str, loop_thread: AioThread, caplog: pytest.LogCaptureFixture
) -> None:
    # 200,000 empty lists: 200 KB on the wire, which max_stored fits, and ~14 MB of
    # Python objects once decoded, which it does not: refused before it is decoded.
    host = make_host(layer, loop_thread, max_stored=1_000_000)
    try:
        c = _writer(host.ep.port, reconnect=False)
        with caplog.at_level(logging.WARNING, logger="socketengine"), c:
            c.write("a", b"x" * 100_000)
            wait_for(lambda: host.ep.get("a") is not None, what="the first value")
            c.write("big", [[] for _ in range(200_000)])
            wait_for(lambda: not host.ep.clients(), what="the connection to close")
        assert "max_stored=1000000" in caplog.text and "once decoded" in caplog.text
        assert host.ep.get("a") == b"x" * 100_000  # what came before is kept
        assert host.ep.get("big") is None
    finally:
        host.close()


@pytest.mark.parametrize("layer", LAYERS)
def test_a_batch_item_counts_at_its_decoded_size(
    layer: str, loop_thread: AioThread, caplog: pytest.LogCaptureFixture
) -> None:
    # A BATCH item of 4,000 empty lists (4 KB of msgpack, 20 KB as value_size estimates
    # it, ~290 KB in memory) beyond max_stored once decoded: the items before it are
    # kept, the connection is closed, on both layers.
    host = make_host(layer, loop_thread, max_stored=100_000)
    sock: Optional[socket.socket] = None
    try:
        with caplog.at_level(logging.WARNING, logger="socketengine"):
            sock = _raw_client(host.ep.port)
            wait_for(lambda: len(host.ep.clients()) == 1, what="the raw client")
            sock.sendall(_batch(("a", b"x" * 3000), ("b", 1)))
            wait_for(lambda: host.ep.get("b") == 1, what="the first batch")
            sock.sendall(_batch(("c", 3), ("d", [[] for _ in range(4000)]), ("e", 4)))
            wait_for(lambda: not host.ep.clients(), what="the connection to close")
        assert "max_stored=100000" in caplog.text
        assert host.ep.get("c") == 3  # before the offending value: kept
        assert host.ep.get("d") is None and host.ep.get("e") is None
        assert host.ep.get("a") == b"x" * 3000
    finally:
        if sock is not None:
            sock.close()
        host.close()


@pytest.mark.parametrize("layer", LAYERS)
def test_a_relaying_host_forwards_a_relayed_flag_from_a_client_as_its_own_value(
    layer: str, loop_thread: AioThread
) -> None:
    # A client may not claim a sender: the host takes its name off, stores and relays the
    # value as written, with the real sender.  Forwarding it as it came used to break
    # every receiver's connection (its meta then held two names).
    import msgpack

    host = make_host(layer, loop_thread, relay=True)
    try:
        with _writer(host.ep.port, name="reader") as reader:
            sock = _raw_client(host.ep.port)
            wait_for(lambda: len(host.ep.clients()) == 2, what="both clients")
            meta = msgpack.packb("spoof") + msgpack.packb(5)
            flags = frames.FLAG_RELAYED
            sock.sendall(b"".join(frames.encode_frame(frames.DATA, "ch", meta, flags=flags)))
            wait_for(lambda: reader.get("ch") == 5, what="the relayed value")
            assert reader.sender("ch") == "raw"
            assert host.ep.get("ch") == 5
            reader.write("after", 1)
            wait_for(lambda: host.ep.get("after") == 1, what="the reader's link to work")
            assert len(host.ep.clients()) == 2
            sock.close()
    finally:
        host.close()


@pytest.mark.parametrize("layer", LAYERS)
def test_replies_and_retained_values_count_as_messages_out(
    layer: str, loop_thread: AioThread
) -> None:
    host = make_host(layer, loop_thread)
    try:
        host.do("write_all", "r", 1, retain=True)
        host.do("on", "q", lambda data, conn: data)
        with _writer(host.ep.port) as c:
            assert c.request("q", 7, timeout=10) == 7
            wait_for(lambda: c.get("r") == 1, what="the retained value")
            conn = host.ep.clients()[0]
            # Counted by the host's I/O thread once the frame is queued: maybe just after
            # it left.
            wait_for(lambda: conn.messages_out == 2, what="two messages out")
            assert conn.messages_in == 1
    finally:
        host.close()


@pytest.mark.parametrize("layer", LAYERS)
def test_values_handled_before_a_malformed_frame_are_counted(
    layer: str, loop_thread: AioThread
) -> None:
    host = make_host(layer, loop_thread)
    try:
        sock = _raw_client(host.ep.port)
        wait_for(lambda: len(host.ep.clients()) == 1, what="the raw client")
        conn = host.ep.clients()[0]
        good = [b"".join(frames.encode_value_frame(frames.DATA, f"c{i}", i)) for i in range(3)]
        bad = b"".join(frames.encode_frame(frames.DATA, "c3", b"\xc1"))  # never-used byte
        sock.sendall(b"".join(good) + bad)
        wait_for(lambda: not host.ep.clients(), what="the connection to close")
        sock.close()
        assert [host.ep.get(f"c{i}") for i in range(4)] == [0, 1, 2, None]
        assert conn.messages_in == 3
    finally:
        host.close()


@pytest.mark.parametrize("layer", LAYERS)
def test_an_image_handed_to_on_message_counts_as_delivered(
    layer: str, loop_thread: AioThread
) -> None:
    np = pytest.importorskip("numpy")
    host = make_host(layer, loop_thread)
    seen: List[str] = []
    host.ep.on_message(lambda channel, data, *conn: seen.append(channel))
    try:
        with _writer(host.ep.port) as c:
            for i in range(2):
                c.write_image(np.full((4, 4), i, dtype=np.uint8), "image")
                wait_for(lambda n=i: len(seen) == n + 1, what=f"image {i}")
        wait_for(
            lambda: host.ep.stats()["images"]["received"]["image"]["delivered"] == 2,
            what="both images counted as delivered",
        )
        counts = host.ep.stats()["images"]["received"]["image"]
        assert (counts["frames"], counts["dropped"], counts["pending"]) == (2, 0, 0)
    finally:
        host.close()


@pytest.mark.parametrize("layer", LAYERS)
def test_the_first_inline_handler_answers_and_every_handler_runs(
    layer: str, loop_thread: AioThread
) -> None:
    from socketengine import Pattern

    host = make_host(layer, loop_thread)
    ran: List[str] = []

    class Handlers:
        def plain(self, data: Any, conn: Any) -> str:
            ran.append("plain")
            return "p"

        def fast(self, data: Any, conn: Any) -> str:
            ran.append("inline")
            return "i"

        def removed(self, data: Any, conn: Any) -> None:
            ran.append("removed")

    handlers = Handlers()
    try:
        host.ep.on("q", handlers.plain)  # registered first, but not inline
        host.ep.on("q", handlers.fast, inline=True)
        host.ep.on("q", handlers.removed)
        host.ep.off("q", handlers.removed)  # a bound method: a new object at each access
        with pytest.raises(ValueError, match="inline"):
            host.ep.on(Pattern("q/+"), handlers.fast, inline=True)
        with _writer(host.ep.port) as c:
            assert c.request("q", 1, timeout=10) == "i"
            wait_for(lambda: len(ran) == 2, what="both handlers")
        assert ran == ["inline", "plain"]
    finally:
        host.close()


@pytest.mark.parametrize("layer", LAYERS)
def test_a_connection_of_a_closed_host_says_the_host_is_closed(
    layer: str, loop_thread: AioThread
) -> None:
    from socketengine import EndpointClosed

    host = make_host(layer, loop_thread)
    try:
        with _writer(host.ep.port):
            wait_for(lambda: len(host.ep.clients()) == 1, what="the client")
            conn = host.ep.clients()[0]
            host.close()

            def call(name: str, *args: Any) -> Any:
                result = getattr(conn, name)(*args)
                return loop_thread.run(result) if asyncio.iscoroutine(result) else result

            for name, args in (("write", ("x", 1)), ("request", ("x", 1))):
                with pytest.raises(EndpointClosed, match="closed"):
                    call(name, *args)
    finally:
        host.close()


def _blackhole(port: int) -> Tuple[socket.socket, socket.socket]:
    """A listener on ``port`` whose accept queue is full: the SYNs of further connects
    are dropped (Linux), as by a host that is off or behind a firewall."""
    listener = socket.create_server(("127.0.0.1", port), backlog=0)
    filler = socket.create_connection(("127.0.0.1", port), timeout=5)
    return listener, filler


@pytest.mark.parametrize("layer", LAYERS)
def test_each_reconnect_attempt_is_bounded_by_timeout(
    layer: str, loop_thread: AioThread, caplog: pytest.LogCaptureFixture
) -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("dropping SYNs with a full accept queue is Linux behaviour")
    host = Host(port=0)
    port = host.port
    client = make_client(layer, loop_thread, port, timeout=0.3, reconnect_max=0.1, heartbeat=None)
    hole: Optional[Tuple[socket.socket, socket.socket]] = None
    try:
        assert client.ep.connected
        with caplog.at_level(logging.DEBUG, logger="socketengine"):
            host.close()
            hole = _blackhole(port)
            wait_for(
                lambda: caplog.text.count("reconnect attempt") >= 3,
                timeout=15,
                what="three reconnect attempts against a host that does not answer",
            )
        for s in hole:
            s.close()
        hole = None
        host = Host(port=port)
        wait_for(lambda: client.ep.connected, timeout=15, what="the reconnection")
    finally:
        if hole is not None:
            for s in hole:
                s.close()
        client.close()
        host.close()


@pytest.mark.parametrize("layer", LAYERS)
def test_a_reconnection_tries_every_address_of_the_host_name(
    layer: str, loop_thread: AioThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As open() does: a name whose first address refuses (say ::1 first, a host
    # listening on 127.0.0.1 only) still reconnects through the next one.
    host = Host(port=0)
    port = host.port
    real = socket.getaddrinfo

    def resolve(name: Any, *args: Any, **kwargs: Any) -> Any:
        if name != "dual.test":
            return real(name, *args, **kwargs)
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.2", port)),  # refused
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),
        ]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    client = make_client(
        layer, loop_thread, port, addr="dual.test", timeout=2, reconnect_max=0.1, heartbeat=None
    )
    try:
        assert client.ep.connected
        host.close()
        wait_for(lambda: not client.ep.connected, what="the lost link")
        host = Host(port=port)
        wait_for(lambda: client.ep.connected, timeout=15, what="the reconnection")
        assert client.ep.reconnects == 1
    finally:
        client.close()
        host.close()


@pytest.mark.parametrize("layer", LAYERS)
def test_close_drops_a_reconnection_still_in_its_handshake(
    layer: str, loop_thread: AioThread
) -> None:
    host = Host(port=0)
    port = host.port
    client = make_client(layer, loop_thread, port, timeout=2, reconnect_max=0.1, heartbeat=None)
    listener: Optional[socket.socket] = None
    accepted: Optional[socket.socket] = None
    try:
        host.close()
        listener = socket.create_server(("127.0.0.1", port))  # accepts, never answers
        listener.settimeout(15)
        accepted, _ = listener.accept()
        client.close()
        accepted.settimeout(5)
        for _ in range(100):  # the client's opening bytes, then the end of the stream
            if not accepted.recv(65536):
                break
        else:
            pytest.fail("the client kept sending")
    finally:
        client.close()
        for s in (accepted, listener):
            if s is not None:
                s.close()


@pytest.mark.parametrize("layer", LAYERS)
def test_a_requester_that_never_reads_its_replies_is_dropped_as_a_slow_consumer(
    layer: str, loop_thread: AioThread, caplog: pytest.LogCaptureFixture
) -> None:
    # Replies are bounded like broadcasts: without it the asyncio host queued every
    # reply (296 MB for 300 requests of a 1 MB reply with max_buffer=1 MiB).
    host = make_host(layer, loop_thread, max_buffer=1 << 20, timeout=2)
    host.ep.on("q", lambda data, conn: b"x" * 1_000_000)
    sock: Optional[socket.socket] = None
    try:
        with caplog.at_level(logging.WARNING, logger="socketengine"):
            sock = _raw_client(host.ep.port)
            wait_for(lambda: len(host.ep.clients()) == 1, what="the raw client")
            frame = frames.encode_value_frame
            requests = [b"".join(frame(frames.REQUEST, "q", i, fid=i + 1)) for i in range(40)]
            sock.sendall(b"".join(requests))  # and never reads
            wait_for(
                lambda: not host.ep.clients() and "slow consumer" in caplog.text,
                timeout=15,
                what="the requester dropped as a slow consumer",
            )
    finally:
        if sock is not None:
            sock.close()
        host.close()


@pytest.mark.parametrize("layer", LAYERS)
def test_a_shared_memory_announcement_naming_a_fifo_does_not_stall_the_host(
    layer: str, loop_thread: AioThread, tmp_path: Path
) -> None:
    # HELLO's "shm" names a (pid, fd) the host opens through /proc, before the token is
    # checked: naming a FIFO without a writer used to block the host's I/O thread (or
    # event loop) in open(); only a memfd is ever opened now.
    from socketengine import shm

    if not shm.available():
        pytest.skip("shared memory is not available here")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    host = make_host(layer, loop_thread, token="secret", heartbeat=None)
    sock: Optional[socket.socket] = None
    try:
        sock = socket.create_connection(("127.0.0.1", host.ep.port), timeout=10)
        hello = {"v": 1, "name": "x", "nonce": b"n" * 16, "shm": [os.getpid(), reader, b"t" * 16]}
        sock.sendall(frames.PREAMBLE + b"".join(frames.encode_value_frame(frames.HELLO, "", hello)))
        with Client(port=host.ep.port, token="secret", connect_timeout=5) as good:
            good.write("in", 1)
            wait_for(lambda: host.ep.get("in") == 1, what="the good client's write")
    finally:
        try:  # release an open() stuck on the FIFO, if any, so that the host can close
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
        os.close(reader)
        if sock is not None:
            sock.close()
        host.close()


@pytest.mark.parametrize("layer", LAYERS)
def test_a_frame_that_a_decoder_chokes_on_closes_that_connection_only(
    layer: str, loop_thread: AioThread, caplog: pytest.LogCaptureFixture
) -> None:
    # An INTEREST naming a 5,000-digit int: decoding it raised ValueError (not a
    # ProtocolError); the threaded host logged a traceback and kept the connection.
    host = make_host(layer, loop_thread)
    sock: Optional[socket.socket] = None
    try:
        with _writer(host.ep.port, name="bystander") as other:
            with caplog.at_level(logging.WARNING, logger="socketengine"):
                sock = _raw_client(host.ep.port)
                wait_for(lambda: len(host.ep.clients()) == 2, what="both clients")
                bad = b"".join(frames.encode_value_frame(frames.INTEREST, "", [10**5000]))
                after = b"".join(frames.encode_value_frame(frames.DATA, "after", 1))
                sock.sendall(bad + after)
                wait_for(
                    lambda: len(host.ep.clients()) == 1 and "malformed frame" in caplog.text,
                    what="the connection closed and the reason logged",
                )
            assert host.ep.get("after") is None  # nothing after the bad frame is handled
            other.write("still", 1)
            wait_for(lambda: host.ep.get("still") == 1, what="the other client, unaffected")
    finally:
        if sock is not None:
            sock.close()
        host.close()


def _beyond_interest_limit(limit: str) -> List[Dict[str, str]]:
    """Wire keys of an interest just beyond MAX_INTEREST_<limit> (under 64 KiB encoded)."""
    from socketengine.patterns import MAX_INTEREST_BYTES, MAX_INTEREST_KEYS

    if limit == "KEYS":
        return [{"c": f"{i:x}"} for i in range(MAX_INTEREST_KEYS + 1)]
    # patterns of empty levels: the costliest index per byte (~250 bytes per level)
    return [{"p": f"{i:x}" + "/" * 200} for i in range(MAX_INTEREST_BYTES // 200 + 1)]


@pytest.mark.parametrize("limit", ["KEYS", "BYTES"])
@pytest.mark.parametrize("layer", LAYERS)
def test_an_interest_beyond_the_protocol_limits_closes_that_connection_only(
    layer: str, loop_thread: AioThread, caplog: pytest.LogCaptureFixture, limit: str
) -> None:
    # After the handshake, an INTEREST frame beyond MAX_INTEREST_KEYS / _BYTES (an
    # unbounded one held ~70-250x its wire size as a pattern index, and could be re-sent
    # at will): that connection is closed with a WARNING naming the limit; another
    # client keeps its connection and its own interest.
    host = make_host(layer, loop_thread)
    sock: Optional[socket.socket] = None
    try:
        with _writer(host.ep.port, name="bystander", interest=["news"]) as other:
            with caplog.at_level(logging.WARNING, logger="socketengine"):
                sock = _raw_client(host.ep.port)
                wait_for(lambda: len(host.ep.clients()) == 2, what="both clients")
                wire = _beyond_interest_limit(limit)
                bad = b"".join(frames.encode_value_frame(frames.INTEREST, "", wire))
                assert len(bad) < 64 * 1024  # within the frame limit: the keys are refused
                after = b"".join(frames.encode_value_frame(frames.DATA, "after", 1))
                sock.sendall(bad + after)
                wait_for(
                    lambda: [c.name for c in host.ep.clients()] == ["bystander"],
                    what="the raw client's connection to close",
                )
            warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert any(f"MAX_INTEREST_{limit}=" in m for m in warnings), warnings
            assert host.ep.get("after") is None  # nothing after the bad frame is handled
            host.do("write_all", "other", 1)
            host.do("write_all", "news", 2)
            wait_for(lambda: other.get("news") == 2, what="the bystander's broadcast")
            assert other.get("other") is None  # its interest still applies
            other.write("still", 1)
            wait_for(lambda: host.ep.get("still") == 1, what="the bystander, unaffected")
    finally:
        if sock is not None:
            sock.close()
        host.close()


@pytest.mark.parametrize("layer", LAYERS)
def test_a_hello_interest_beyond_the_protocol_limits_closes_that_connection_only(
    layer: str, loop_thread: AioThread, caplog: pytest.LogCaptureFixture
) -> None:
    host = make_host(layer, loop_thread)
    sock: Optional[socket.socket] = None
    try:
        with _writer(host.ep.port, name="bystander") as other:
            with caplog.at_level(logging.WARNING, logger="socketengine"):
                sock = socket.create_connection(("127.0.0.1", host.ep.port), timeout=10)
                hello = {
                    "v": 1,
                    "name": "x",
                    "nonce": b"n" * 16,
                    "interest": _beyond_interest_limit("BYTES"),
                }
                frame = b"".join(frames.encode_value_frame(frames.HELLO, "", hello))
                sock.sendall(frames.PREAMBLE + frame)
                wait_for(
                    lambda: "MAX_INTEREST_BYTES=" in caplog.text,
                    what="the refusal, logged",
                )
            assert [c.name for c in host.ep.clients()] == ["bystander"]
            sock.settimeout(10)
            with contextlib.suppress(ConnectionResetError):
                while sock.recv(65536):  # the host closes it
                    pass
            other.write("still", 1)
            wait_for(lambda: host.ep.get("still") == 1, what="the bystander, unaffected")
    finally:
        if sock is not None:
            sock.close()
        host.close()


@pytest.mark.parametrize("layer", LAYERS)
def test_a_client_refuses_an_interest_beyond_the_protocol_limits_before_sending(
    layer: str, loop_thread: AioThread
) -> None:
    from socketengine import Pattern
    from socketengine.patterns import MAX_INTEREST_BYTES, MAX_INTEREST_KEYS

    too_many = [f"cam{i}" for i in range(MAX_INTEREST_KEYS + 1)]
    too_long = [Pattern("a" * 200 + f"/{i}/+") for i in range(MAX_INTEREST_BYTES // 200)]
    host = make_host(layer, loop_thread)
    try:
        for keys, name in ((too_many, "MAX_INTEREST_KEYS"), (too_long, "MAX_INTEREST_BYTES")):
            with pytest.raises(ValueError, match=name):
                make_client(layer, loop_thread, host.ep.port, interest=keys)
        client = make_client(layer, loop_thread, host.ep.port, interest=["a"])
        try:
            wait_for(lambda: len(host.ep.clients()) == 1, what="the client")
            for keys, name in ((too_many, "MAX_INTEREST_KEYS"), (too_long, "MAX_INTEREST_BYTES")):
                with pytest.raises(ValueError, match=name):
                    client.do("set_interest", keys)
            host.do("write_all", "b", 1)
            host.do("write_all", "a", 2)
            wait_for(lambda: client.do("get", "a") == 2, what="the broadcast on 'a'")
            assert client.do("get", "b") is None  # the interest in force stayed ['a']
            assert len(host.ep.clients()) == 1
        finally:
            client.close()
    finally:
        host.close()


@pytest.mark.parametrize("layer", LAYERS)
def test_a_handshake_that_a_decoder_chokes_on_is_closed_before_it_buffers_more(
    layer: str, loop_thread: AioThread
) -> None:
    # Before the token is checked: a HELLO whose interest names a 5,000-digit int used to
    # leave the threaded host's decoder paused, buffering all the peer sent next.
    host = make_host(layer, loop_thread, token="secret", handshake_timeout=30)
    sock = socket.create_connection(("127.0.0.1", host.ep.port), timeout=10)
    try:
        hello = {"v": 1, "name": "x", "nonce": b"n" * 16, "interest": [10**5000]}
        sock.sendall(frames.PREAMBLE + b"".join(frames.encode_value_frame(frames.HELLO, "", hello)))
        sock.settimeout(0.2)
        junk = b"\0" * 65536
        closed = False
        for _ in range(500):  # the host must close long before taking 32 MiB of junk
            try:
                sock.sendall(junk)
            except socket.timeout:
                pass
            except OSError:  # reset: closed
                closed = True
                break
        assert closed, "the host kept taking bytes after a malformed handshake"
    finally:
        sock.close()
        host.close()


@pytest.mark.parametrize("layer", LAYERS)
def test_a_value_beyond_max_stored_is_refused_before_it_is_decoded(
    layer: str, loop_thread: AioThread, caplog: pytest.LogCaptureFixture
) -> None:
    # The budget is checked from the frame's size: a value beyond it is never decoded
    # (here it would not even decode), and the log names the budget on both layers.
    host = make_host(layer, loop_thread, max_stored=1000)
    sock: Optional[socket.socket] = None
    try:
        with caplog.at_level(logging.WARNING, logger="socketengine"):
            sock = _raw_client(host.ep.port)
            wait_for(lambda: len(host.ep.clients()) == 1, what="the raw client")
            sock.sendall(b"".join(frames.encode_frame(frames.DATA, "big", b"\xc1" * 5000)))
            wait_for(lambda: "max_stored=1000" in caplog.text, what="the budget named")
        assert "malformed" not in caplog.text
    finally:
        if sock is not None:
            sock.close()
        host.close()


@pytest.mark.parametrize("layer", LAYERS)
def test_an_image_file_is_not_kept_once_a_value_replaces_it_or_its_client_is_forgotten(
    layer: str, loop_thread: AioThread
) -> None:
    """``get_jpeg``'s file goes with the image: an 8 MiB "JPEG" followed by a small int
    on the same channel must not stay behind ``max_stored``, which counts the int."""
    if not images.available_backends().get("jpeg"):
        pytest.skip("no JPEG backend installed")
    frame = np.zeros((120, 160, 3), np.uint8)
    frame[:, :, 1] = np.arange(160, dtype=np.uint8)
    host = make_host(layer, loop_thread, keep_departed=0)
    try:
        with _writer(host.ep.port, name="cam") as c:
            for channel in ("single", "burst"):
                c.write_image(frame, channel=channel, codec="jpeg")
                wait_for(lambda ch=channel: host.ep.get_jpeg(ch) is not None, what="the file")
            conn = host.ep.clients()[0]
            assert conn.get_jpeg("single") is not None and conn.get_jpeg("burst") is not None
            c.write("single", 1)  # one DATA frame
            for i in range(200):  # small values in a burst: BATCH items
                c.write("burst", i)
            wait_for(lambda: _int(host.ep.get("single")) == 1 and _int(host.ep.get("burst")) == 199)
            # The files go as the values are stored (a BATCH: once its items are).
            for channel in ("single", "burst"):
                wait_for(lambda ch=channel: host.ep.get_jpeg(ch) is None, what="no file")
                wait_for(lambda ch=channel: conn.get_jpeg(ch) is None, what="no file")

            # The frame was either read (a get() above) or replaced unread: counted once.
            def counted_once() -> bool:
                single = host.ep.stats()["images"]["received"]["single"]
                return bool(single["frames"] == 1 and single["delivered"] + single["dropped"] == 1)

            wait_for(counted_once, what="the frame counted once")
            c.write_image(frame, channel="left", codec="jpeg")
            wait_for(lambda: host.ep.get_jpeg("left") is not None, what="the last file")
            assert host.ep.get("left").shape == frame.shape  # decoded (and cached) here
        # keep_departed=0: the client is forgotten as it leaves, its value (decoded by
        # get() above: the threaded host's cache hid it from forgetting) and its file.
        wait_for(lambda: host.ep.get("left") is None, what="the client to be forgotten")
        assert host.ep.get_jpeg("left") is None
        assert not host.ep._images.encoded and not host.ep._images.unread
    finally:
        host.close()


@pytest.mark.parametrize("kind", ["PING", "SYNC"])
@pytest.mark.parametrize("layer", LAYERS)
def test_a_peer_that_asks_for_answers_without_reading_them_is_closed(
    layer: str,
    kind: str,
    transfer: str,
    loop_thread: AioThread,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each PING queues a PONG, each SYNC an ACK: a peer that floods them and reads
    nothing would grow the host's memory by one answer per frame.  Past max_buffer
    unsent plus 4,096 owed answers, the host closes that connection (only that one)."""
    if transfer == "shm":
        pytest.skip("no arrays travel here: the socket case is the whole test")
    host = make_host(layer, loop_thread, max_buffer=64 * 1024)
    try:
        with (
            caplog.at_level(logging.WARNING, logger="socketengine"),
            _writer(host.ep.port, name="good") as good,
        ):
            wait_for(lambda: len(host.ep.clients()) == 1, what="the good client")
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect
            sock.settimeout(10)
            sock.connect(("127.0.0.1", host.ep.port))
            hello = frames.encode_value_frame(
                frames.HELLO, "", {"v": 1, "name": "flood", "nonce": b"n" * 16}
            )
            sock.sendall(frames.PREAMBLE + b"".join(hello))
            wait_for(lambda: len(host.ep.clients()) == 2, what="the flooding client")
            ftype = frames.PING if kind == "PING" else frames.SYNC
            flood = b"".join(  # 1 MiB of 16-byte frames (SYNC ids 1..65536)
                b"".join(frames.encode_frame(ftype, fid=i if kind == "SYNC" else 0))
                for i in range(1, 65537)
            )
            with sock:
                for _ in range(64):  # at most 64 MiB, never reading
                    try:
                        sock.sendall(flood)
                    except OSError:  # reset, or the send timed out: the host is gone
                        break
                wait_for(lambda: len(host.ep.clients()) == 1, what="the flood to be closed")
            assert "PING/SYNC frames" in caplog.text and "without reading" in caplog.text
            good.write("still", 1, ack=True)  # the other client is untouched
            assert host.ep.get("still") == 1 and host.ep.clients()[0].name == "good"
    finally:
        host.close()


def _int(value: Any) -> Optional[int]:
    """``value`` if it is an int (not an image array, which ``==`` would compare)."""
    return value if type(value) is int else None


@pytest.mark.parametrize("layer", LAYERS)
def test_a_client_keeps_at_most_max_channels_and_max_stored_forgetting_the_oldest(
    layer: str, loop_thread: AioThread, caplog: pytest.LogCaptureFixture
) -> None:
    """A relaying host forwards whatever its other clients write: a client bounds what
    it keeps.  Beyond a budget it closes nothing: the channels that arrived first go."""
    with Host(port=0) as host, caplog.at_level(logging.WARNING, logger="socketengine"):
        narrow = make_client(layer, loop_thread, host.port, max_channels=5)
        small = make_client(layer, loop_thread, host.port, max_stored=5000)
        try:
            wait_for(lambda: len(host.clients()) == 2, what="both clients")
            for i in range(10):
                host.write_all(f"c{i}", i)  # small values: BATCH items
                host.write_all(f"b{i}", bytes([i]) * 1000)  # 1,005 bytes at wire size
            host.write_all("done", 1)
            for side in (narrow, small):
                wait_for(lambda s=side: s.do("get", "done") == 1, what="the last value")
            # Arrival order: c0, b0, c1, b1, ... c9, b9, done.  A frame's values are
            # stored, then the budget settles: wait for that (the I/O thread's work).
            # max_channels=5: the five newest channels.
            newest = ["b8", "b9", "c8", "c9", "done"]
            wait_for(lambda: sorted(narrow.ep._latest) == newest, what="max_channels")
            assert narrow.do("get", "b9") == b"\t" * 1000 and narrow.do("get", "c8") == 8
            assert narrow.do("get", "b7") is None and narrow.do("get", "c0") is None
            # max_stored=5000: from the newest back, while they fit: done, b9..b6 (about
            # 1,000 bytes each), c9..c6 (a few bytes each); b5 would go over.
            kept = sorted(["done"] + [f"{x}{i}" for i in range(6, 10) for x in "bc"])
            wait_for(lambda: sorted(small.ep._latest) == kept, what="max_stored")
            assert 4000 < small.ep._kept.nbytes <= 5000
            assert small.do("get", "b6") == bytes([6]) * 1000 and small.do("get", "b5") is None
            assert "max_channels=5" in caplog.text and "max_stored=5000" in caplog.text
        finally:
            narrow.close()
            small.close()


@pytest.mark.parametrize("kwargs", [{"max_channels": 0}, {"max_stored": 0}, {"max_stored": "1"}])
def test_both_client_layers_refuse_the_same_budgets(kwargs: Dict[str, Any]) -> None:
    makers = (lambda: Client(port=1, open=False, **kwargs), lambda: aio.Client(port=1, **kwargs))
    for make in makers:
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            make()


def _client_that_writes_when_told_bye(port: int, done: threading.Event) -> None:
    """A client written from docs/protocol.md: once the host's BYE arrives, it writes
    "late" = 1 (inside the host's linger), then says BYE itself."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    proto = Protocol(Role.CLIENT, name="late")
    sock.sendall(proto.data_to_send())
    decoder = proto.decoder
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return
            buf = decoder.get_buffer()
            buf[: len(data)] = data
            buf.release()
            decoder.buffer_updated(len(data))
            events = proto.events()
            out = proto.data_to_send()
            if any(f.type == frames.BYE for f in events):
                out += b"".join(frames.encode_value_frame(frames.DATA, "late", 1))
                out += b"".join(frames.encode_frame(frames.BYE))
            if out:
                sock.sendall(out)
    finally:
        sock.close()
        done.set()


@pytest.mark.parametrize("layer", LAYERS)
def test_a_value_that_arrives_while_the_host_closes_still_reaches_its_waiter(
    layer: str, loop_thread: AioThread
) -> None:
    """close() says BYE and lingers until the clients have said theirs: what arrives
    meanwhile is delivered, then waiters and subscriptions end (both layers)."""
    host = make_host(layer, loop_thread)
    done = threading.Event()
    client = threading.Thread(
        target=_client_that_writes_when_told_bye, args=(host.ep.port, done), daemon=True
    )
    client.start()
    got: List[Any] = []
    try:
        wait_for(lambda: host.ep.clients(), what="the client")
        if layer == "sync":
            waiter = threading.Thread(target=lambda: got.append(host.ep.wait("late", 10)))
        else:
            waiter = threading.Thread(target=lambda: got.append(host.do("wait", "late", 10)))
        waiter.start()
        wait_for(lambda: "late" in host.ep._waiters, what="the waiter")
        if layer == "sync":
            # wait() registers, then checks that delivery has not ended (the endpoint is
            # not closing): a close() between the two rightly ends it with
            # EndpointClosed.  So close only once it waits (a rare CI failure, 3.13).
            wait_for(lambda: _running(waiter, "_await"), what="the waiter to block")
    finally:
        host.close()
    waiter.join(10)
    client.join(10)
    assert done.is_set() and got and got[0][0] == 1


def _running(thread: threading.Thread, function: str) -> bool:
    """``thread`` is inside a call of ``function`` right now."""
    frame = thread_frame(thread)
    while frame is not None:
        if frame.f_code.co_name == function:
            return True
        frame = frame.f_back
    return False


# -- write_many -------------------------------------------------------------------------------


def _many_values() -> List[Tuple[str, Any]]:
    """Small values (BATCH items), a large one and an array (DATA frames), in one order."""
    pairs: List[Tuple[str, Any]] = [("n", i) for i in range(150)]
    pairs.insert(40, ("n", b"x" * 10_000))  # beyond a BATCH item: a DATA frame of its own
    pairs.insert(90, ("n", np.arange(1000, dtype=np.int32)))  # arrays: a DATA frame too
    pairs.append(("cfg", {"gain": 2, "name": "left"}))
    return pairs


def _plain(value: Any) -> Any:
    return value.tolist() if isinstance(value, np.ndarray) else value


@pytest.mark.parametrize("layer", LAYERS)
def test_write_many_delivers_every_value_as_separate_writes_would(
    layer: str, loop_thread: AioThread
) -> None:
    with Host(port=0) as host:
        sub = host.subscribe("n", maxsize=1000)
        seen: List[Any] = []
        host.on("cfg", lambda v, conn: seen.append(v))
        client = make_client(layer, loop_thread, host.port)
        try:
            pairs = _many_values()
            client.do("write_many", pairs)
            client.do("write_many", {"a": 1, "b": [1, 2]})  # a mapping
            client.do("write_many", [])  # nothing: nothing happens
            client.do("flush", acked=True)
            want = [_plain(v) for ch, v in pairs if ch == "n"]
            got = [_plain(sub.get(timeout=5)[0]) for _ in want]
            assert got == want
            assert host.get("cfg") == {"gain": 2, "name": "left"}
            assert (host.get("a"), host.get("b")) == (1, [1, 2])
            wait_for(lambda: seen, what="the callback")
            assert seen == [{"gain": 2, "name": "left"}]
            (conn,) = host.clients()
            assert conn.messages_in >= len(pairs) + 2
        finally:
            client.close()


@pytest.mark.parametrize("layer", LAYERS)
def test_write_many_from_a_host_to_one_client(layer: str, loop_thread: AioThread) -> None:
    host = make_host(layer, loop_thread)
    try:
        with Client(port=host.ep.port, connect_timeout=10) as c:
            sub = c.subscribe("n", maxsize=1000)
            wait_for(lambda: host.ep.clients(), what="the client")
            (conn,) = host.ep.clients()
            pairs = _many_values()
            if layer == "sync":
                conn.write_many(pairs)
            else:
                loop_thread.run(conn.write_many(pairs))
            want = [_plain(v) for ch, v in pairs if ch == "n"]
            got = [_plain(sub.get(timeout=5)) for _ in want]
            assert got == want
            wait_for(lambda: c.get("cfg") is not None, what="the last value")
            assert conn.messages_out >= len(pairs)
    finally:
        host.close()


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize(
    "items, error",
    [
        ([("a", 1), ("b", object())], TypeError),
        ([("a", 1), "ab"], TypeError),
        ([("a", 1), ("b", 2, 3)], ValueError),
        ({"a": 1, 5: 2}, TypeError),
    ],
    ids=["value", "not-a-pair", "triple", "channel"],
)
def test_write_many_with_one_bad_item_sends_nothing(
    layer: str, loop_thread: AioThread, items: Any, error: type
) -> None:
    with Host(port=0) as host:
        client = make_client(layer, loop_thread, host.port)
        try:
            with pytest.raises(error, match="write_many\\(\\): item 1 cannot be sent"):
                client.do("write_many", items)
            client.do("write", "after", 1)
            client.do("flush", acked=True)
            assert host.get("after") == 1
            assert host.get("a") is None  # the good item before the bad one was not sent
        finally:
            client.close()


@pytest.mark.parametrize("layer", LAYERS)
def test_write_many_waits_for_room_then_times_out_with_nothing_queued(
    layer: str, loop_thread: AioThread
) -> None:
    from socketengine import WriteTimeout

    with _mute_host() as port:
        client = make_client(
            layer, loop_thread, port, heartbeat=None, max_buffer=0, timeout=0.5, shm=False
        )
        try:
            _fill_the_queue(client)
            stats = client.ep.connection.stats if layer == "aio" else client.ep._conn.stats
            before = stats()["queued_bytes"]
            with pytest.raises(WriteTimeout, match="not reading"):
                client.do("write_many", [("a", i) for i in range(100)])
            assert stats()["queued_bytes"] == before  # the whole batch or nothing
        finally:
            client.close()


@pytest.mark.parametrize("layer", LAYERS)
def test_write_many_while_reconnecting_is_sent_in_order_on_the_next_link(
    layer: str, loop_thread: AioThread
) -> None:
    first = Host(port=0)
    port = first.port
    client = make_client(layer, loop_thread, port, heartbeat=None)
    try:
        wait_for(lambda: first.clients(), what="the client")
        first.close()
        wait_for(lambda: not client.ep.connected, what="the client to notice")
        client.do("write_many", [("n", i) for i in range(50)] + [("last", True)])
        with Host(port=port) as second:
            sub = second.subscribe("n", maxsize=100)
            wait_for(lambda: second.get("last"), what="the outbox to arrive")
            assert [sub.get(timeout=5)[0] for _ in range(50)] == list(range(50))
    finally:
        client.close()


@pytest.mark.parametrize("layer", LAYERS)
def test_write_many_compresses_as_write_does(layer: str, loop_thread: AioThread) -> None:
    from socketengine import compression

    if not compression.available():
        pytest.skip("no compression codec installed")
    with Host(port=0, compression="auto") as host:
        client = make_client(layer, loop_thread, host.port, compression="auto")
        try:
            big = "abc" * 20_000
            client.do("write_many", [("big", big), ("small", 1)])
            client.do("flush", acked=True)
            assert (host.get("big"), host.get("small")) == (big, 1)
            (conn,) = host.clients()
            assert conn.bytes_in < len(big)  # it crossed compressed
        finally:
            client.close()
