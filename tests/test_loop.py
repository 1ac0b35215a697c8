"""The threaded layer's poller: epoll on Linux, a selectors selector elsewhere.

Both must mean the same thing by every call, including a socket registered but
watched for nothing (a thread reading its own reply switches its socket's reads off).
"""

from __future__ import annotations

import select
import socket
import threading
from typing import Any, Iterator, List, Tuple

import numpy as np
import pytest
from conftest import wait_for

from socketengine import Client, Host
from socketengine.sync import loop as loop_module
from socketengine.sync.loop import _Epoll, _Selector

READ, WRITE = 1, 2
POLLERS = [_Selector] + ([_Epoll] if hasattr(select, "epoll") else [])


@pytest.fixture(params=POLLERS, ids=lambda p: p.__name__)
def poller(request: pytest.FixtureRequest) -> Iterator[Any]:
    p = request.param()
    yield p
    p.close()


@pytest.fixture
def pair() -> Iterator[Tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def _fired(poller: Any, timeout: float = 0) -> List[Tuple[str, int]]:
    return [(handler(), mask) for handler, mask in poller.select(timeout)]


def test_events_are_reported_within_what_the_socket_is_watched_for(poller: Any, pair: Any) -> None:
    a, b = pair
    poller.register(a, READ, lambda: "a")
    assert _fired(poller) == []
    b.send(b"x")
    assert _fired(poller, 1.0) == [("a", READ)]
    poller.modify(a, READ | WRITE, lambda: "a2")
    assert _fired(poller, 1.0) == [("a2", READ | WRITE)]
    poller.modify(a, WRITE, lambda: "a3")
    assert _fired(poller, 1.0) == [("a3", WRITE)]


def test_a_socket_watched_for_nothing_stays_registered(poller: Any, pair: Any) -> None:
    a, b = pair
    poller.register(a, READ, lambda: "a")
    b.send(b"x")
    poller.modify(a, 0, lambda: "off")
    assert _fired(poller) == []
    with pytest.raises(KeyError):
        poller.register(a, READ, lambda: "twice")
    poller.modify(a, READ, lambda: "on")
    assert _fired(poller, 1.0) == [("on", READ)]
    poller.modify(a, 0, lambda: "off")
    poller.unregister(a)
    with pytest.raises(KeyError):
        poller.unregister(a)
    poller.register(a, READ, lambda: "again")
    assert _fired(poller, 1.0) == [("again", READ)]


def test_a_hang_up_reads_as_readable_and_writable(poller: Any, pair: Any) -> None:
    a, b = pair
    poller.register(a, READ | WRITE, lambda: "a")
    b.close()
    assert _fired(poller, 1.0) == [("a", READ | WRITE)]


def test_closed_sockets(poller: Any, pair: Any) -> None:
    a, b = pair
    c = socket.socket()
    c.close()
    with pytest.raises((ValueError, OSError)):
        poller.register(c, READ, lambda: "c")
    poller.register(a, READ, lambda: "a")
    a.close()
    poller.unregister(a)  # closed first, then taken off: no error
    # its number may come back for a new socket
    d, e = socket.socketpair()
    try:
        poller.register(d, READ, lambda: "d")
        e.send(b"x")
        assert _fired(poller, 1.0) == [("d", READ)]
    finally:
        d.close()
        e.close()


def test_the_endpoints_work_over_the_portable_poller(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where there is no epoll, the same loop runs over selectors: values both ways, a
    request whose reply the asking thread reads itself, a write that fills the socket."""
    monkeypatch.setattr(loop_module, "poller", _Selector)
    with Host(port=0, heartbeat=None) as host:
        assert isinstance(host._loop.selector, _Selector)
        host.on("double", lambda data, conn: data * 2, inline=True)
        with Client(port=host.port, heartbeat=None) as client:
            assert isinstance(client._loop.selector, _Selector)
            for i in range(50):
                assert client.request("double", i) == 2 * i
            big = np.arange(4_000_000, dtype=np.uint8)  # more than a socket buffer holds
            client.write("big", big)
            host.write_all("down", "v")
            wait_for(lambda: client.get("down") == "v", what="a value to the client")
            wait_for(lambda: host.get("big") is not None, what="the array at the host")
            assert np.array_equal(host.get("big"), big)
            got: List[Any] = []
            t = threading.Thread(target=lambda: got.append(client.wait("later", timeout=10)))
            t.start()
            wait_for(lambda: t.is_alive(), what="the waiter")
            host.write_all("later", 7)
            t.join(10)
            assert got == [7]


def test_stop_after_a_start_interrupted_before_the_thread_said_it_started() -> None:
    # A Ctrl-C inside Thread.start() can land after the new thread set its ident but
    # before it set its "started" flag; join() then raises RuntimeError ("cannot join
    # thread before it is started"), which once turned the CLI's Ctrl-C exit 130 into
    # a traceback and exit 1.  stop() must take it: the thread ends by itself.
    class HalfStarted(threading.Thread):
        ident = 12345  # type: ignore[assignment]  # set before "started" is

        def join(self, timeout: Any = None) -> None:
            raise RuntimeError("cannot join thread before it is started")

        def is_alive(self) -> bool:
            return False

    loop = loop_module.Loop("half-started")
    loop._io_thread = HalfStarted(target=lambda: None)
    loop.stop(timeout=1)  # no RuntimeError
    assert loop._closed  # the selector is closed: a thread that runs late finds it so
