"""Automatic reconnection of the threaded Client."""

import subprocess
import sys
import textwrap
from typing import Any

import pytest
from conftest import wait_for

from socketengine import Client, ConnectionClosed, Host, WriteTimeout


def test_writes_while_the_host_restarts_arrive_in_order() -> None:
    h = Host(port=0)
    port = h.port
    c = Client(port=port, name="cam-1")
    c.write("n", -1)
    wait_for(lambda: h.get("n") == -1)
    h.close()
    wait_for(lambda: not c.connected, what="the client to notice")
    for i in range(100):  # kept while disconnected
        c.write("n", i)
    h2 = Host(port=port, open=False)
    sub = h2.subscribe("n")
    h2.open()
    got = [sub.get(timeout=10)[0] for _ in range(100)]
    assert got == list(range(100))
    wait_for(lambda: c.connected)
    assert h2.get_client("cam-1") is not None  # same name after reconnecting
    assert c.reconnects == 1
    c.write("n", "live")
    assert sub.get(timeout=10)[0] == "live"
    c.close()
    h2.close()


def test_the_outbox_is_bounded() -> None:
    h = Host(port=0)
    c = Client(port=h.port, max_buffer=100_000, timeout=0.1)
    h.close()
    wait_for(lambda: not c.connected)
    with pytest.raises(WriteTimeout, match="not connected"):
        for _i in range(1000):  # bounded
            c.write("x", b"y" * 10_000)
    c.close()  # returns although the host never comes back


def test_reconnect_false_raises_connection_closed() -> None:
    h = Host(port=0)
    c = Client(port=h.port, reconnect=False)
    h.close()
    wait_for(lambda: not c.connected)
    with pytest.raises(ConnectionClosed):
        c.write("x", 1)
    c.close()


def test_request_while_disconnected_fails_fast() -> None:
    h = Host(port=0)
    c = Client(port=h.port)
    h.close()
    wait_for(lambda: not c.connected)
    with pytest.raises(ConnectionClosed):
        c.request("anything", 1, timeout=5)
    c.close()


HOST = textwrap.dedent(
    """
    import sys
    from socketengine import Host
    h = Host(port=int(sys.argv[1]), open=False)
    sub = h.subscribe("n")  # before open(): not a value can be missed
    h.open()
    print(h.port, flush=True)
    for value, conn in sub:
        print(value, flush=True)
    """
)


def _host_process(port: int) -> "tuple[subprocess.Popen[str], int]":
    """A host in another process; returns it and the port it bound."""
    p = subprocess.Popen([sys.executable, "-c", HOST, str(port)], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    return p, int(p.stdout.readline())


def _next_line(p: "subprocess.Popen[str]") -> str:
    assert p.stdout is not None
    return p.stdout.readline().strip()


def test_a_killed_host_process_comes_back_and_data_flows_again() -> None:
    host, port = _host_process(0)
    c = Client(port=port, heartbeat=0.5)
    try:
        c.write("n", 0)
        assert _next_line(host) == "0"
        host.kill()  # no BYE, no clean close: the process just dies
        host.wait(10)
        wait_for(lambda: not c.connected, what="the client to notice the dead host")
        c.write("n", 1)  # written while the host is down
        host, _ = _host_process(port)  # the same port, at once
        # A restarted host has no session to resume: what it never acknowledged comes
        # again (at least once), then what was written meanwhile.
        first = _next_line(host)
        assert first in ("0", "1")
        if first == "0":
            assert _next_line(host) == "1"
        wait_for(lambda: c.connected)
        c.write("n", 2)  # data flows again without any call by the user
        assert _next_line(host) == "2"
    finally:
        c.close()
        host.kill()
        host.wait(10)


def test_flush_while_disconnected_times_out() -> None:
    h = Host(port=0)
    c = Client(port=h.port)
    h.close()
    wait_for(lambda: not c.connected)
    c.write("kept", 1)
    with pytest.raises(WriteTimeout, match="reconnection"):
        c.flush(0.2)
    c.close()


def test_a_first_link_lost_before_open_returns_is_reconnected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The link dies after its handshake but before open() has returned (when a loss
    # cannot start a reconnection yet): open() must start it (the asyncio client does).
    import socket

    with Host(port=0) as host:
        original = Client._open_link

        def open_link(self: Client) -> Any:
            conn = original(self)
            wait_for(lambda: host.clients(), what="the host's side of the link")
            host.clients()[0].socket.shutdown(socket.SHUT_RDWR)
            wait_for(conn.closed.is_set, what="the client to see the link die")
            return conn

        monkeypatch.setattr(Client, "_open_link", open_link)
        with Client(port=host.port, reconnect_max=0.1, heartbeat=None) as c:
            monkeypatch.setattr(Client, "_open_link", original)
            wait_for(lambda: c.reconnects == 1 and c.connected, timeout=10, what="a reconnection")
            c.write("after", 1)
            wait_for(lambda: host.get("after") == 1, what="a write over the new link")


def test_a_slow_name_lookup_while_reconnecting_does_not_hold_the_io_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reconnection looks the host's name up again, and a DNS server may take
    seconds: the lookup runs in a thread of its own, so close() (and everything else
    on the I/O thread) does not wait for it."""
    import socket
    import threading

    real = socket.getaddrinfo
    armed, blocked, release = threading.Event(), threading.Event(), threading.Event()

    def lookup(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host != "slow.test":
            return real(host, port, *args, **kwargs)
        if kwargs.get("flags", 0) & socket.AI_NUMERICHOST:
            raise socket.gaierror(socket.EAI_NONAME, "not a numeric address")
        if armed.is_set():
            blocked.set()
            release.wait(30)  # a DNS server that does not answer (bounded)
        return real("127.0.0.1", port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    host = Host(port=0)
    client = Client("slow.test", host.port, connect_timeout=10, reconnect_max=0.05)
    try:
        wait_for(lambda: host.clients(), what="the first connection")
        armed.set()
        host.close()  # the client loses its link and tries again: a lookup
        wait_for(blocked.is_set, what="the reconnection's lookup")
        client.close()
        loop_thread = client._loop._io_thread
        assert loop_thread is not None and not loop_thread.is_alive()
        assert not release.is_set()  # the lookup was still waiting all along
    finally:
        release.set()
        client.close()
        host.close()
