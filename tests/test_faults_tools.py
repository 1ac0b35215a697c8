"""The adversarial tools of tests/faults.py do what they say, seen from both ends."""

from __future__ import annotations

import socket
from typing import Iterator, Tuple

import pytest
from conftest import wait_for
from faults import (
    ClientsProcess,
    CuttingProxy,
    HandshakeFlooder,
    HostProcess,
    RawClient,
    flood_channels,
)

from socketengine import Client, Host

Ends = Tuple[CuttingProxy, socket.socket, socket.socket]


@pytest.fixture
def ends() -> Iterator[Ends]:
    """A proxy in front of a plain listening socket: (proxy, client end, target end)."""
    target = socket.create_server(("127.0.0.1", 0))
    target.settimeout(5)
    proxy = CuttingProxy(target.getsockname()[1])
    client = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    server, _ = target.accept()
    server.settimeout(5)
    proxy.wait_links(1)
    yield proxy, client, server
    client.close()
    server.close()
    proxy.close()
    target.close()


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        data = sock.recv(n - len(got))
        assert data, f"EOF after {len(got)} of {n} bytes"
        got += data
    return got


def _nothing_arrives(sock: socket.socket, within: float = 0.3) -> bool:
    """True if ``sock`` neither receives data nor sees EOF/reset for ``within`` s."""
    sock.settimeout(within)
    try:
        sock.recv(1)
    except socket.timeout:
        return True
    finally:
        sock.settimeout(5)
    return False


def test_forwards_both_ways_and_counts_bytes(ends: Ends) -> None:
    proxy, client, server = ends
    client.sendall(b"hello")
    assert _recv_exactly(server, 5) == b"hello"
    server.sendall(b"world!")
    assert _recv_exactly(client, 6) == b"world!"
    wait_for(lambda: proxy.bytes_up == 5 and proxy.bytes_down == 6)
    big = bytes(range(256)) * 4096  # 1 MiB, more than the proxy holds at once
    client.sendall(big)
    assert _recv_exactly(server, len(big)) == big
    wait_for(lambda: proxy.bytes_up == 5 + len(big))


def test_a_half_close_is_passed_on_after_the_data(ends: Ends) -> None:
    proxy, client, server = ends
    client.sendall(b"last words")
    client.shutdown(socket.SHUT_WR)
    assert _recv_exactly(server, 10) == b"last words"
    assert server.recv(1) == b""  # then EOF
    server.sendall(b"reply")
    assert _recv_exactly(client, 5) == b"reply"  # the other direction still works
    server.shutdown(socket.SHUT_WR)
    assert client.recv(1) == b""
    wait_for(lambda: proxy.links == 0, what="the link to close")


def test_cut_close_is_a_clean_eof_at_both_ends(ends: Ends) -> None:
    proxy, client, server = ends
    client.sendall(b"a")
    assert _recv_exactly(server, 1) == b"a"
    assert proxy.cut_close() == 1
    assert client.recv(1) == b""  # FIN, not a reset
    assert server.recv(1) == b""
    assert proxy.links == 0 and proxy.cuts == 1


def test_cut_reset_is_a_reset_at_both_ends(ends: Ends) -> None:
    proxy, client, server = ends
    assert proxy.cut_reset() == 1
    with pytest.raises(ConnectionResetError):
        client.recv(1)
    with pytest.raises(ConnectionResetError):
        server.recv(1)
    assert proxy.links == 0


def test_blackhole_holds_everything_until_resume(ends: Ends) -> None:
    proxy, client, server = ends
    proxy.blackhole()
    client.sendall(b"x" * 1000)
    server.sendall(b"y" * 2000)
    assert _nothing_arrives(server) and _nothing_arrives(client)  # and neither is closed
    assert proxy.bytes_up == 0 and proxy.bytes_down == 0
    assert proxy.links == 1
    proxy.resume()
    assert _recv_exactly(server, 1000) == b"x" * 1000  # nothing lost after a resume
    assert _recv_exactly(client, 2000) == b"y" * 2000
    wait_for(lambda: proxy.bytes_up == 1000 and proxy.bytes_down == 2000)


def test_blackhole_then_cut_loses_what_was_held(ends: Ends) -> None:
    proxy, client, server = ends
    proxy.blackhole()
    client.sendall(b"x" * 1000)
    assert _nothing_arrives(server)
    assert proxy.cut_reset() == 1
    with pytest.raises(ConnectionResetError):
        server.recv(1)
    with pytest.raises(ConnectionResetError):
        client.recv(1)
    assert proxy.bytes_up == 0


@pytest.mark.parametrize("mode", ["close", "reset"])
def test_cut_after_forwards_exactly_that_many_bytes(ends: Ends, mode: str) -> None:
    proxy, client, server = ends
    client.sendall(b"a" * 10)
    assert _recv_exactly(server, 10) == b"a" * 10
    proxy.cut_after(up=50, mode=mode)
    client.sendall(bytes(range(100)))
    got = b""
    try:
        while True:
            data = server.recv(65536)
            if not data:
                break
            got += data
    except ConnectionResetError:
        assert mode == "reset"
    assert got == bytes(range(50))  # the mark falls mid-write: the rest is never forwarded
    wait_for(lambda: proxy.cuts == 1)  # counted right after the FIN or RST went out
    assert proxy.bytes_up == 60


def test_blackhole_holds_new_links_until_resume() -> None:
    with (
        socket.create_server(("127.0.0.1", 0)) as target,
        CuttingProxy(target.getsockname()[1]) as proxy,
    ):
        target.settimeout(0.3)
        proxy.blackhole()
        late = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        proxy.wait_links(1)
        with pytest.raises(socket.timeout):
            target.accept()  # not connected upstream while partitioned
        proxy.resume()
        target.settimeout(5)
        server, _ = target.accept()
        late.sendall(b"hi")
        assert _recv_exactly(server, 2) == b"hi"
        late.close()
        server.close()


def test_a_client_reconnects_through_the_proxy_after_each_cut() -> None:
    with Host(port=0, heartbeat=0.5) as h, CuttingProxy(h.port) as proxy:
        c = Client(port=proxy.port, heartbeat=0.5, name="through")
        try:
            for n, mode in enumerate(["close", "reset"], 1):
                proxy.cut(mode)
                wait_for(lambda n=n: c.reconnects == n, timeout=10, what=f"reconnect {n}")
                c.write("after", mode)
                wait_for(lambda mode=mode: h.get("after") == mode)
            proxy.blackhole()
            # Three silent heartbeats later the client gives the link up...
            wait_for(lambda: not c.connected, timeout=10, what="the heartbeat to expire")
            proxy.cut_reset()  # ... and once the partition ends it comes back.
            wait_for(lambda: c.connected, timeout=10, what="reconnection after the partition")
        finally:
            c.close()


def test_the_handshake_flooder_reopens_what_the_host_closes() -> None:
    with Host(port=0, handshake_timeout=0.3) as h:
        with HandshakeFlooder(h.port, 5, mode="drip", rate=20, duration=30) as flood:
            wait_for(lambda: flood.closed_by_host >= 5, timeout=10, what="handshake timeouts")
            wait_for(lambda: flood.opened >= 10, what="re-opened connections")
            assert flood.established >= 5
            assert flood.bytes_sent > 0
            assert flood.open_now <= 5
            assert h.clients() == []  # none of them ever got in
        assert flood.open_now == 0  # stop() closed everything


def test_the_raw_client_floods_distinct_channels() -> None:
    with Host(port=0, token="s3cret") as h:
        with RawClient(h.port, token="s3cret", name="flood") as raw:
            assert flood_channels(raw, 2000, value=7) > 2000 * 16
            wait_for(lambda: h.get("ch0") == 7 and h.get("ch1999") == 7)
            assert h.get_client("flood") is not None


def test_a_host_process_is_killed_and_restarted_on_the_same_port() -> None:
    host = HostProcess(heartbeat=0.5)
    port = host.start()
    try:
        with ClientsProcess(port, 3, prefix="k", heartbeat=0.5, reconnect_max=0.2) as clients:
            wait_for(lambda: clients.status()[0] == [], timeout=10, what="3 connected clients")
            host.kill()
            wait_for(lambda: len(clients.status()[0]) == 3, timeout=10, what="3 lost links")
            assert host.restart() == port
            wait_for(lambda: clients.status() == ([], 3), timeout=10, what="3 reconnections")
            with Client(port=port) as c:
                assert c.request("_faults.clients", None) == ["", "k0", "k1", "k2"]
    finally:
        host.kill()
