"""Last will: a client's value the host publishes when the client vanishes without a
goodbye (kill -9, a blackholed link declared dead), and not after a polite close.
Each scenario runs against both hosts (threaded and asyncio)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Any, List

import pytest
from conftest import wait_for
from faults import CuttingProxy
from test_parity import LAYERS, AioThread, loop_thread, make_host  # noqa: F401

from socketengine import Client
from socketengine.protocol import encode_will

WILL = ("status/cam", {"state": "offline"})


def _observer(port: int) -> Client:
    return Client(port=port, name="dashboard", connect_timeout=10)


@pytest.mark.parametrize("layer", LAYERS)
def test_the_will_is_published_when_the_client_is_killed(
    layer: str,
    loop_thread: AioThread,  # noqa: F811
) -> None:
    host = make_host(layer, loop_thread)
    try:
        with _observer(host.ep.port) as dashboard:
            code = textwrap.dedent(
                f"""
                import sys, time
                from socketengine import Client
                c = Client(port={host.ep.port}, name="cam", will={WILL!r}, connect_timeout=10)
                c.write("status/cam", {{"state": "online"}})
                c.flush()
                print("ready", flush=True)
                time.sleep(60)
                """
            )
            proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
            try:
                assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
                wait_for(lambda: host.ep.get("status/cam") == {"state": "online"})
                cam = host.ep.get_client("cam")
                online_at = cam.received_at["status/cam"]
                proc.kill()  # kill -9: no goodbye
                proc.wait(10)
            finally:
                if proc.poll() is None:
                    proc.kill()
            wait_for(lambda: host.ep.get("status/cam") == {"state": "offline"}, timeout=10)
            # the other clients get it too, and get_all reports it for the departed client
            wait_for(lambda: dashboard.get("status/cam") == {"state": "offline"}, timeout=10)
            # the departed record follows the will on the host's I/O thread
            wait_for(lambda: {"state": "offline"} in host.ep.get_all("status/cam"), timeout=10)
            # ... with the will's own arrival time (the monitor's "updated"), as a write
            assert cam.received_at["status/cam"] > online_at
    finally:
        host.close()


@pytest.mark.parametrize("layer", LAYERS)
def test_the_will_is_published_when_a_blackholed_link_is_declared_dead(
    layer: str,
    loop_thread: AioThread,  # noqa: F811
) -> None:
    host = make_host(layer, loop_thread, heartbeat=0.2)
    seen: List[Any] = []
    try:
        host.do("on", "status/cam", lambda *args: seen.append(args[0]))
        with CuttingProxy(host.ep.port) as proxy:
            cam = Client(port=proxy.port, name="cam", will=WILL, reconnect=False, heartbeat=None)
            try:
                cam.write("status/cam", {"state": "online"}, ack=True, timeout=5)
                proxy.blackhole()  # nothing passes any more; nobody closes anything
                wait_for(lambda: {"state": "offline"} in seen, timeout=10, what="the will")
            finally:
                cam.close()
    finally:
        host.close()


@pytest.mark.parametrize("layer", LAYERS)
def test_a_polite_close_does_not_publish_the_will(
    layer: str,
    loop_thread: AioThread,  # noqa: F811
) -> None:
    host = make_host(layer, loop_thread)
    try:
        with Client(port=host.ep.port, name="cam", will=WILL) as cam:
            cam.write("status/cam", {"state": "online"}, ack=True, timeout=5)
        # closed politely: the host saw the BYE, and the value stays what the client wrote
        wait_for(lambda: not host.ep.clients(), what="the client to leave")
        with Client(port=host.ep.port) as probe:
            probe.write("after", 1, ack=True, timeout=5)  # the host handled what came before
        assert host.ep.get("status/cam") == {"state": "online"}
    finally:
        host.close()


def test_a_will_is_checked_when_the_client_is_made() -> None:
    np = pytest.importorskip("numpy")
    with pytest.raises(TypeError):
        Client(port=1, open=False, will=("status", object()))
    with pytest.raises(TypeError, match="arrays"):
        encode_will("status", np.zeros(3))
    with pytest.raises(ValueError, match="16384"):
        encode_will("status", "x" * 20000)
    with pytest.raises(ValueError, match="1024 UTF-8 bytes"):
        Client(port=1, open=False, will=("é" * 513, "offline"))
    from socketengine import aio

    with pytest.raises(ValueError, match="1024 UTF-8 bytes"):
        aio.Client(port=1, will=("w" * 1025, "offline"))


@pytest.mark.parametrize("layer", LAYERS)
def test_a_hello_with_every_field_at_its_limit_is_accepted(
    layer: str,
    loop_thread: AioThread,  # noqa: F811
) -> None:
    # Name, interest and will at their limits, with a token and shared memory announced:
    # the HELLO must still fit what a host reads before the handshake (64 KiB).
    from socketengine.limits import MAX_INTEREST_BYTES, MAX_INTEREST_KEYS
    from socketengine.protocol import MAX_WILL_BYTES, MAX_WILL_CHANNEL_BYTES

    key = MAX_INTEREST_BYTES // MAX_INTEREST_KEYS
    interest = [f"{i:0{key}d}" for i in range(MAX_INTEREST_KEYS)]
    assert sum(len(k) for k in interest) == MAX_INTEREST_BYTES
    channel = "w" * MAX_WILL_CHANNEL_BYTES
    value = b"x" * (MAX_WILL_BYTES - 3)  # msgpack bin 16: a 3-byte head
    assert len(encode_will(channel, value)[1]) == MAX_WILL_BYTES
    host = make_host(layer, loop_thread, token="secret")
    try:
        with Client(
            port=host.ep.port,
            name="n" * 256,
            token="secret",
            interest=interest,
            will=(channel, value),
            connect_timeout=10,
        ) as c:
            wait_for(lambda: host.ep.clients(), what="the client")
            assert c.connected
    finally:
        host.close()
