"""Resume across link failures (protocol 1.2), against both I/O layers.

A client and a host exchange sequenced values through a :class:`CuttingProxy` that
cuts the link (clean close, reset, blackhole) a few times while both endpoints live:
nothing may be lost, duplicated or reordered, either way.  Bounded waits, no sleeps.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Iterator, List

import pytest
from conftest import wait_for
from faults import CuttingProxy
from test_parity import LAYERS, AioThread, make_client, make_host

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
    raise AssertionError(
        f"{way}: {len(lost)} lost (first {lost[:10]}), {dups} duplicated, "
        f"in order: {got == sorted(got)}"
    )


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
        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        try:
            for kind in ("close", "reset", "blackhole", "close", "reset", "blackhole"):
                mark = len(at_host) + 50
                wait_for(lambda m=mark: len(at_host) > m, 10.0, "values flowing")
                _cut(proxy, kind, client)
        finally:
            stop.set()
            thread.join(10)
        n = writes[0]
        wait_for(lambda: len(at_host) >= n, 10.0, f"{n} values at the host")
        wait_for(lambda: len(at_client) >= sent_down[0], 10.0, "the host's values")
        client.close()
    host.close()
    _check(at_host, n, "client -> host")
    _check(at_client, sent_down[0], "host -> client")
