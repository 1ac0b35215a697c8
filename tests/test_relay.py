"""Client to client through a relaying host, and interest (the host sends a client only
the channels it wants).  Each scenario runs against both hosts (threaded, asyncio)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, List

import pytest
from conftest import wait_for
from test_parity import LAYERS, AioThread, loop_thread, make_host  # noqa: F401

from socketengine import Client, Pattern, aio

# Arrays and images: over the socket and over shared memory (conftest.transfer).
pytestmark = pytest.mark.usefixtures("transfer")


@pytest.mark.parametrize("layer", LAYERS)
def test_camera_dashboard_and_controller_talk_only_through_the_host(
    layer: str,
    loop_thread: AioThread,  # noqa: F811
) -> None:
    np = pytest.importorskip("numpy")
    host = make_host(layer, loop_thread, relay=True, token="s3cret")
    port = host.ep.port
    try:
        with (
            Client(port=port, name="camera", token="s3cret") as camera,
            Client(port=port, name="dashboard", token="s3cret") as dashboard,
            Client(port=port, name="controller", token="s3cret") as controller,
        ):
            seen: List[Any] = []
            dashboard.on(Pattern("robot/#"), lambda ch, v: seen.append((ch, v)))
            wait_for(lambda: len(host.ep.clients()) == 3, what="three clients")
            frame = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
            camera.write_image(frame, "image")
            wait_for(lambda: dashboard.get("image") is not None, what="the relayed frame")
            assert np.array_equal(dashboard.get("image"), frame)
            assert dashboard.sender("image") == "camera"
            controller.write("robot/arm/cmd", {"move": [1, 2]})
            for i in range(20):  # a burst travels as BATCH frames: relayed item by item
                controller.write("robot/arm/step", i)
            wait_for(lambda: dashboard.get("robot/arm/step") == 19, what="the burst")
            assert camera.get("robot/arm/cmd") == {"move": [1, 2]}
            assert camera.sender("robot/arm/cmd") == "controller"
            wait_for(lambda: len(seen) == 21, what="pattern callbacks on relayed values")
            assert seen[0] == ("robot/arm/cmd", {"move": [1, 2]})
            # the writer does not get its own value back
            assert controller.get("robot/arm/cmd") is None
            # and the host keeps what each client wrote, as always
            assert host.ep.get("robot/arm/cmd") == {"move": [1, 2]}
    finally:
        host.close()


@pytest.mark.parametrize("layer", LAYERS)
def test_writers_restrict_what_is_relayed(layer: str, loop_thread: AioThread) -> None:  # noqa: F811
    host = make_host(
        layer,
        loop_thread,
        relay=[Pattern("cmd/#"), "status"],
        writers={"controller": [Pattern("cmd/#")], "cam": ["status"]},
    )
    try:
        port = host.ep.port
        with (
            Client(port=port, name="controller") as ctl,
            Client(port=port, name="cam") as cam,
            Client(port=port, name="intruder") as bad,
            Client(port=port) as watcher,
        ):
            wait_for(lambda: len(host.ep.clients()) == 4)
            ctl.write("cmd/go", 1)
            cam.write("cmd/go", 2)  # cam may not write cmd/#: kept by the host, not relayed
            bad.write("status", "hacked")  # not listed: nothing relayed
            cam.write("status", "ok")
            ctl.write("other", 3)  # not a relayed channel at all
            ctl.write("done", 1, ack=True)
            cam.flush(acked=True)
            bad.flush(acked=True)
            wait_for(lambda: watcher.get("status") == "ok")
            assert watcher.get("cmd/go") == 1 and watcher.sender("cmd/go") == "controller"
            assert watcher.get("other") is None and watcher.get("done") is None
            assert sorted(host.ep.get_all("cmd/go")) == [1, 2]
    finally:
        host.close()


@pytest.mark.parametrize("layer", LAYERS)
def test_relayed_values_can_be_retained_for_late_joiners(
    layer: str,
    loop_thread: AioThread,  # noqa: F811
) -> None:
    host = make_host(layer, loop_thread, relay=True, retain_relayed=True)
    try:
        with Client(port=host.ep.port, name="config-tool") as tool:
            tool.write("config", {"rate": 30}, ack=True)
        with Client(port=host.ep.port, name="late") as late:
            wait_for(lambda: late.get("config") == {"rate": 30}, what="the retained value")
            assert late.sender("config") == "config-tool"
    finally:
        host.close()


@pytest.mark.parametrize("layer", LAYERS)
def test_relayed_values_kept_for_late_joiners_are_bounded_in_bytes(
    layer: str,
    loop_thread: AioThread,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Each value's frame is a bit over 1,000 bytes: three fit in 3,500.
    host = make_host(layer, loop_thread, relay=True, retain_relayed=True, retain_relayed_bytes=3500)
    try:
        with caplog.at_level(logging.WARNING, logger="socketengine"):
            with Client(port=host.ep.port, name="writer") as writer:
                for i in range(6):
                    writer.write(f"c{i}", bytes([i]) * 1000, ack=True)
            with Client(port=host.ep.port, name="late") as late:
                wait_for(lambda: late.get("c5") is not None, what="the newest value")
                wait_for(lambda: late.get("c3") is not None, what="the oldest kept")
                assert [late.get(f"c{i}") for i in range(3)] == [None, None, None]
                assert late.get("c4") == b"\x04" * 1000
        assert "retain_relayed_bytes=3500" in caplog.text and "'c0'" in caplog.text
    finally:
        host.close()


@pytest.mark.parametrize("layer", LAYERS)
def test_a_client_gets_only_the_channels_it_is_interested_in(
    layer: str,
    loop_thread: AioThread,  # noqa: F811
) -> None:
    host = make_host(layer, loop_thread)
    try:
        port = host.ep.port
        with (
            Client(port=port, interest=["sensor/7"]) as narrow,
            Client(port=port, interest=[Pattern("sensor/+")]) as wide,
            Client(port=port) as everything,
        ):
            wait_for(lambda: len(host.ep.clients()) == 3)
            # Counted from here: the handshake's size (what each side announces) aside.
            narrow_0 = narrow._conn.stats()["bytes_in"]  # type: ignore[union-attr]
            all_0 = everything._conn.stats()["bytes_in"]  # type: ignore[union-attr]
            for i in range(50):
                host.do("write_all", f"sensor/{i}", i)
            host.do("write_all", "other", 1)
            wait_for(lambda: everything.get("other") == 1 and wide.get("sensor/49") == 49)
            wait_for(lambda: narrow.get("sensor/7") == 7)
            assert narrow.get("sensor/8") is None and wide.get("other") is None
            narrow_in = narrow._conn.stats()["bytes_in"] - narrow_0  # type: ignore[union-attr]
            all_in = everything._conn.stats()["bytes_in"] - all_0  # type: ignore[union-attr]
            assert narrow_in < all_in / 5
            # interest can change at any time
            narrow.set_interest([Pattern("#")])
            narrow.write("sync", 1, ack=True)  # the host has the new interest now
            host.do("write_all", "other", 2)
            wait_for(lambda: narrow.get("other") == 2)
    finally:
        host.close()


def test_an_asyncio_client_declares_interest_and_sees_senders() -> None:
    async def main() -> None:
        async with aio.Host(port=0, relay=True) as h:
            async with (
                aio.Client(port=h.port, name="a") as a,
                aio.Client(port=h.port, name="b", interest=["chat"]) as b,
            ):
                await a.write("chat", "hi", ack=True)
                await a.write("noise", 1, ack=True)
                for _ in range(200):
                    if b.get("chat") == "hi":
                        break
                    await asyncio.sleep(0.01)
                assert b.get("chat") == "hi" and b.sender("chat") == "a"
                assert b.get("noise") is None
                await b.set_interest(None)
                await b.write("x", 0, ack=True)
                await a.write("noise", 2, ack=True)
                for _ in range(200):
                    if b.get("noise") == 2:
                        break
                    await asyncio.sleep(0.01)
                assert b.get("noise") == 2

    asyncio.run(main())
