"""Host and Client on loopback: values, lifecycle, limits and misbehaving peers."""

import logging
import os
import socket
import threading
from typing import List

import numpy as np
import pytest
from conftest import wait_for

from socketengine import (
    AuthenticationError,
    Client,
    ConnectionClosed,
    HandshakeError,
    Host,
    frames,
)

# Arrays and images: over the socket and over shared memory (conftest.transfer).
pytestmark = pytest.mark.usefixtures("transfer")

VALUES = {
    "none": None,
    "bool": True,
    "int": -(2**63),
    "uint": 2**64 - 1,
    "bigint": 3**90,
    "float": 1.5e-300,
    "str": "héllo ✓",
    "bytes": b"\x00\xff" * 10,
    "list": [1, [2, [3, None]]],
    "tuple": (1, ("a", b"b"), []),
    "dict": {"a": {"b": [1, 2.5, {"c": (1,)}]}, "n": None},
    "empty": [],
}


def _raw_connection(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    return s


def _handshake(sock: socket.socket) -> None:
    """Speak just enough protocol to be an accepted client."""
    hello = frames.encode_value_frame(frames.HELLO, "", {"v": 1, "name": "raw", "nonce": b"n" * 16})
    sock.sendall(frames.PREAMBLE + b"".join(hello))
    dec = frames.FrameDecoder()
    got: list = []
    while not got:
        data = sock.recv(65536)
        assert data, "host closed during handshake"
        got = dec.feed(data)
    assert got[0].type == frames.WELCOME


def _closed_by_peer(sock: socket.socket, timeout: float = 5.0) -> bool:
    sock.settimeout(timeout)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except ConnectionResetError:
        return True


def test_every_value_type_round_trips_both_ways(host: Host, make_client) -> None:  # type: ignore[no-untyped-def]
    c = make_client()
    for channel, value in VALUES.items():
        c.write(channel, value)
    wait_for(lambda: all(host.get_all(ch) == [v] for ch, v in VALUES.items()))
    for channel, value in VALUES.items():
        got = host.get(channel)
        assert got == value and type(got) is type(value), channel
    wait_for(lambda: host.clients())
    for channel, value in VALUES.items():
        host.write_all(channel, value)
    wait_for(lambda: all(c.get(ch) == v for ch, v in VALUES.items() if v is not None))
    assert type(c.get("tuple")) is tuple and type(c.get("tuple")[1]) is tuple


def test_a_poll_that_finds_nothing_new_yields_the_cpu(
    host: Host, make_client, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """The seed's ``while True: h.get_ALL(ch)``: a get that finds nothing new since this
    thread's previous look gives the GIL and the CPU to the I/O thread; one that finds a
    new value does not (it returns at once)."""
    from socketengine.sync import endpoint

    assert endpoint._yield_gil is getattr(os, "sched_yield", endpoint._release_gil)
    yields: List[int] = []
    monkeypatch.setattr(endpoint, "_yield_gil", lambda: yields.append(1))
    c = make_client()
    c.write("x", 1)
    wait_for(lambda: host.get_all("x") == [1])  # this thread has now seen the value
    del yields[:]
    for _ in range(3):
        assert host.get("x") == 1  # nothing new: a poll loop
    assert len(yields) == 3
    c.write("x", 2)
    waiter = threading.Thread(target=wait_for, args=(lambda: host.get("x") == 2,))
    waiter.start()  # another thread polls until the value is in
    waiter.join(10)
    del yields[:]
    assert host.get_all("x") == [2]  # this thread's first look since it came
    assert yields == []
    assert host.get_all("x") == [2]
    assert len(yields) == 1


def test_numpy_arrays_round_trip_exactly(host: Host, make_client) -> None:  # type: ignore[no-untyped-def]
    c = make_client()
    base = np.arange(60, dtype=">i4").reshape(3, 4, 5)
    arrays = {
        "c": np.arange(12, dtype=np.float32).reshape(3, 4),
        "f": np.asfortranarray(np.arange(12, dtype=np.int16).reshape(3, 4)),
        "strided": base[:, ::2, 1:4],
        "big_endian": base,
        "bool": np.array([True, False]),
        "complex": np.array([1 + 2j], dtype=np.complex128),
        "empty": np.zeros((0, 3), dtype=np.uint16),
        "scalar": np.float64(2.5),
        "nested": {"a": [np.eye(2), (np.int8(3),)]},
    }
    for ch, v in arrays.items():
        c.write(ch, v)
    wait_for(lambda: all(host.get(ch) is not None for ch in arrays))
    for ch, v in arrays.items():
        if ch == "nested":
            got = host.get(ch)
            assert np.array_equal(got["a"][0], np.eye(2)) and got["a"][1] == (np.int8(3),)
            assert type(got["a"][1][0]) is np.int8
            continue
        got = host.get(ch)
        assert type(got) is type(v), ch
        assert got.dtype == v.dtype and got.shape == v.shape and np.array_equal(got, v), ch
    assert host.get("f").flags.f_contiguous
    assert host.get("c").flags.writeable


def test_a_4k_frame_fits_the_default_limit(host: Host, make_client) -> None:  # type: ignore[no-untyped-def]
    frame = np.full((2160, 3840, 3), 7, dtype=np.uint8)
    frame[-1, -1] = [1, 2, 3]
    make_client().write_image(frame)
    wait_for(lambda: host.get("image") is not None, timeout=20)
    got = host.get("image")
    assert np.array_equal(got, frame)


def test_several_clients_get_all_in_connection_order(host: Host, make_client) -> None:  # type: ignore[no-untyped-def]
    clients = [make_client(name=f"c{i}") for i in range(5)]
    for i, c in enumerate(reversed(clients)):
        c.write("who", 4 - i)
    wait_for(lambda: host.get_all("who") == [0, 1, 2, 3, 4])
    wait_for(lambda: [c.name for c in host.clients()] == [f"c{i}" for i in range(5)])
    assert host.get_client("c3").get("who") == 3
    assert host.get_client("nobody") is None


def test_a_write_all_right_after_open_reaches_the_new_client(host: Host) -> None:
    # Once a client's open() returned, the host lists it and its next write_all reaches
    # it: the host's WELCOME leaves only after the connection is ready.
    for i in range(40):
        c = Client(port=host.port, name=f"c{i}")
        try:
            assert any(conn.name == f"c{i}" for conn in host.clients())
            assert host.write_all("now", i) >= 1
            wait_for(lambda c=c, i=i: c.get("now") == i, what=f"write_all {i} at c{i}")
        finally:
            c.close()
        wait_for(lambda: not host.clients(), what="the client gone")


def test_write_all_follows_arrivals_departures_and_interest_changes(
    host: Host, make_client
) -> None:  # type: ignore[no-untyped-def]
    # The host caches who wants each channel; every change of the audience must show
    # in the very next write_all: a client that came, one that left, a new interest.
    a = make_client(name="a")
    assert host.write_all("t", 1) == 1
    b = make_client(name="b")
    assert host.write_all("t", 2) == 2
    wait_for(lambda: a.get("t") == 2 and b.get("t") == 2, what="both have 2")
    conn_b = wait_for(lambda: host.get_client("b"))
    b.set_interest(["other"])
    wait_for(lambda: conn_b.interest is not None, what="b's interest at the host")
    assert host.write_all("t", 3) == 1
    host.write_all("other", "o")
    wait_for(lambda: b.get("other") == "o", what="b gets its channel")
    assert host.write_all("t", 4) == 1
    wait_for(lambda: a.get("t") == 4, what="a has 4")
    assert b.get("t") == 2
    b.set_interest(None)
    wait_for(lambda: conn_b.interest is None, what="b's interest cleared")
    assert host.write_all("t", 5) == 2
    wait_for(lambda: b.get("t") == 5, what="b has 5 again")
    a.close()
    wait_for(lambda: len(host.clients()) == 1, what="a gone")
    assert host.write_all("t", 6) == 1
    wait_for(lambda: b.get("t") == 6, what="b has 6")


def test_per_connection_write(host: Host, make_client) -> None:  # type: ignore[no-untyped-def]
    a, b = make_client(name="a"), make_client(name="b")
    conn = wait_for(lambda: host.get_client("b"))
    conn.write("only", "for b")
    wait_for(lambda: b.get("only") == "for b")
    assert a.get("only") is None
    assert repr(conn).startswith("<Connection 127.0.0.1:") and "name='b'" in repr(conn)


def test_refused_value_raises_before_sending(host: Host, make_client) -> None:  # type: ignore[no-untyped-def]
    c = make_client()
    with pytest.raises(TypeError, match="set"):
        c.write("x", {1, 2})
    with pytest.raises(TypeError, match="object"):
        c.write("x", [1, object()])
    with pytest.raises(TypeError, match="channel"):
        c.write(5, "x")  # type: ignore[arg-type]
    c.write("y", "after")
    wait_for(lambda: host.get("y") == "after")
    assert host.get("x") is None  # nothing of the refused writes arrived


def test_malformed_frame_closes_only_that_connection(host: Host, make_client, caplog) -> None:  # type: ignore[no-untyped-def]
    good = make_client()
    bad = _raw_connection(host.port)
    _handshake(bad)
    caplog.set_level(logging.WARNING, logger="socketengine")
    # A DATA frame whose value is not valid msgpack.
    bad.sendall(frames.HEADER.pack(frames.DATA, 0, 1, 0, 3, 0) + b"x" + b"\xc1\xc1\xc1")
    assert _closed_by_peer(bad)
    bad.close()
    assert any("malformed" in r.getMessage() for r in caplog.records)
    good.write("still", "works")
    wait_for(lambda: host.get("still") == "works")


@pytest.mark.parametrize(
    "payload",
    [
        b"GET / HTTP/1.1\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        frames.PREAMBLE + b"\xff" * 32,
        frames.PREAMBLE + frames.HEADER.pack(frames.HELLO, 0, 0, 0, 0xFFFFFFF0, 0),
        b"SENG\x09\x00\x00\x00",
    ],
    ids=["http", "tls", "garbage", "huge-length", "future-version"],
)
def test_hostile_openings_close_only_that_connection(  # type: ignore[no-untyped-def]
    host: Host, make_client, payload: bytes
) -> None:
    good = make_client()
    bad = _raw_connection(host.port)
    bad.sendall(payload)
    assert _closed_by_peer(bad)
    bad.close()
    good.write("ok", payload[:4])
    wait_for(lambda: host.get("ok") == payload[:4])
    assert len(host.clients()) == 1


def test_silent_peer_is_dropped_after_the_handshake_timeout() -> None:
    with Host(port=0, handshake_timeout=0.3) as h:
        s = _raw_connection(h.port)
        assert _closed_by_peer(s, timeout=5)
        s.close()
        wait_for(lambda: not h._conns, what="the silent connection to be forgotten")


def test_client_refuses_a_host_that_is_not_socketengine() -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def answer() -> None:
        conn, _ = server.accept()
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        conn.recv(100)
        conn.close()

    t = threading.Thread(target=answer)
    t.start()
    with pytest.raises(HandshakeError, match="HTTP"):
        Client(port=server.getsockname()[1], handshake_timeout=5)
    t.join(5)
    server.close()


def test_max_clients_refuses_with_a_clear_error() -> None:
    with Host(port=0, max_clients=1) as h, Client(port=h.port):
        with pytest.raises(HandshakeError, match="full"):
            Client(port=h.port)


def test_max_message_closes_the_offender_only() -> None:
    with Host(port=0, max_message=100_000) as h:
        good = Client(port=h.port)
        big = Client(port=h.port, reconnect=False)
        big.write("big", b"x" * 200_000)
        wait_for(lambda: len(h.clients()) == 1, what="the offender to be dropped")
        with pytest.raises(ConnectionClosed):
            wait_for(lambda: big.write("more", 1), timeout=5)  # raises once the drop is seen
        good.write("fine", 1)
        wait_for(lambda: h.get("fine") == 1)
        good.close()
        big.close()


def test_token_authentication() -> None:
    with Host(port=0, token="s3cret") as h:
        with Client(port=h.port, token=b"s3cret", name="ok") as c:
            c.write("a", 1)
            wait_for(lambda: h.get("a") == 1)
        with pytest.raises(AuthenticationError):
            Client(port=h.port, token="wrong")
        with pytest.raises(AuthenticationError, match="token"):
            Client(port=h.port)
    with Host(port=0) as h2, pytest.raises(AuthenticationError):
        Client(port=h2.port, token="s3cret")


def test_port_in_use_names_addr_and_port() -> None:
    with Host(port=0) as h:
        with pytest.raises(OSError, match=f"127.0.0.1:{h.port}"):
            Host(port=h.port)


def test_host_restart_on_the_same_port_binds_at_once() -> None:
    h = Host(port=0)
    port = h.port
    c = Client(port=port)
    c.write("a", 1)
    wait_for(lambda: h.get("a") == 1)
    h.close()  # the host closes first: its side of the connection enters TIME_WAIT
    c.close()
    h2 = Host(port=port)
    with Client(port=port) as c2:
        c2.write("b", 2)
        wait_for(lambda: h2.get("b") == 2)
    h2.close()


def test_host_binds_only_the_given_address() -> None:
    with Host(port=0) as h:
        assert h._listener is not None
        assert h._listener.getsockname()[0] == "127.0.0.1"
        assert f"127.0.0.1:{h.port}" in repr(h)


def test_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 support in this Python")
    try:
        h = Host(addr="::1", port=0)
    except OSError as exc:
        pytest.skip(f"IPv6 loopback unavailable: {exc}")
    with h, Client(addr="::1", port=h.port) as c:
        c.write("six", 6)
        wait_for(lambda: h.get("six") == 6)


def test_close_joins_the_io_thread_and_is_idempotent() -> None:
    h = Host(port=0)
    c = Client(port=h.port)
    names = [t.name for t in threading.enumerate()]
    assert "socketengine-host" in names and "socketengine-client" in names
    c.close()
    c.close()
    h.close()
    h.close()
    assert not c._loop.running and not h._loop.running


def test_host_close_disconnects_clients(make_client, host: Host) -> None:  # type: ignore[no-untyped-def]
    c = make_client(reconnect=False)
    wait_for(lambda: host.clients())
    host.write_all("bye", "soon")
    host.close()
    wait_for(lambda: not c.connected, what="the client to see the host close")
    assert c.get("bye") == "soon"
    with pytest.raises(ConnectionClosed):
        c.write("x", 1)
