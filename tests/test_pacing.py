"""Pacing: a thread that writes far ahead of its connection's I/O thread waits for the
flush (``sendqueue.PACE_ABOVE``), except for a peer that takes nothing (stalled), which
queues up to ``max_buffer`` as before."""

from __future__ import annotations

import sys
from typing import Iterator

import pytest
from conftest import wait_for
from faults import CuttingProxy

from socketengine import Client, Host
from socketengine.sendqueue import PACE_ABOVE, PACE_BELOW, PACE_WAIT


def test_the_pacing_limits_are_ordered() -> None:
    assert 0 < PACE_BELOW < PACE_ABOVE
    assert 0 < PACE_WAIT <= 0.1  # a write waits at most this long for the flush


@pytest.fixture
def long_slices() -> Iterator[None]:
    """The writer keeps the interpreter lock 200 ms at a time: a burst then always runs
    megabytes ahead of the I/O threads (they need the lock to flush and read)."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.2)
    yield
    sys.setswitchinterval(before)


def test_a_writer_far_ahead_of_its_flush_is_paced_and_loses_nothing(long_slices: None) -> None:
    n = 100_000
    text = "x" * 100
    with Host(port=0) as h, Client(port=h.port) as c:
        conn = c._conn
        assert conn is not None
        for i in range(n):
            c.write("burst", [i, text])
        wait_for(lambda: (h.get("burst") or [None])[0] == n - 1, 30, "the last value")
        # 100,000 items of 100-odd bytes are 17 MB, written in 200 ms slices.
        assert conn.stats()["writes_paced"] >= 1
        hc = h.clients()[0]
        wait_for(lambda: hc.messages_in >= n, 10, "every value counted")
        assert hc.messages_in == n
        assert hc.stats()["writes_paced"] == 0  # the host wrote nothing


def test_a_stalled_peer_is_marked_once_then_writes_queue_without_waiting() -> None:
    text = "y" * 2000  # a small value (a BATCH item): pacing applies to those too
    with Host(port=0) as h, CuttingProxy(h.port) as proxy:
        with Client(port=proxy.port) as c:
            conn = c._conn
            assert conn is not None
            c.write("v", [-1, text])
            wait_for(lambda: h.get("v") is not None, 10, "the link to carry a value")
            proxy.blackhole()
            # The kernel's buffers absorb some megabytes first; then the queue grows.
            i = 0
            while conn.stats()["queued_bytes"] <= 2 * PACE_ABOVE:
                assert i < 100_000, "the queue never grew: is the proxy forwarding?"
                c.write("v", [i, text])
                i += 1
            paced = conn.stats()["writes_paced"]
            assert paced >= 1  # the first write beyond PACE_ABOVE waited
            assert conn._pace_stalled == conn.bytes_out  # ... and found the peer stalled
            for _ in range(200):  # so these do not wait: they queue, as before pacing
                c.write("v", [i, text])
                i += 1
            assert conn.stats()["writes_paced"] == paced
            assert conn.stats()["queued_bytes"] > 2 * PACE_ABOVE
            proxy.resume()
            last = i - 1
            wait_for(lambda: h.get("v")[0] == last, 30, "every value after the stall")
            hc = h.clients()[0]
            wait_for(lambda: hc.messages_in >= i + 1, 10, "every value counted")
            assert hc.messages_in == i + 1


def test_writes_from_the_io_thread_are_never_paced() -> None:
    """A write from the I/O thread (an inline handler's) is never paced: it is the
    thread that flushes, so it would wait for itself."""
    text = "z" * 100
    n = 60_000  # 10 MB: the flush cannot run before the handler returns
    deepest = []
    with Host(port=0) as h, Client(port=h.port) as c:

        def burst(value: object) -> None:
            conn = c._conn
            assert conn is not None
            for i in range(n):
                c.write("out", [i, text])
            deepest.append(conn.stats()["queued_bytes"])

        c.on("go", burst, inline=True)
        wait_for(lambda: h.clients(), 10, "the client")
        h.write_all("go", 1)
        wait_for(lambda: deepest, 30, "the inline handler's burst")
        assert deepest[0] > PACE_ABOVE  # far beyond the pacing limit, and never waited
        wait_for(lambda: (h.get("out") or [None])[0] == n - 1, 30, "the last value")
        conn = c._conn
        assert conn is not None and conn.stats()["writes_paced"] == 0
