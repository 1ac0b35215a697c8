"""A user's script, type-checked with ``mypy --strict`` by tests/test_typing.py.

It is checked, never run: it shows that both layers' public API is typed, so that a
strictly typed application needs no ``# type: ignore`` and no cast.  ``assert_type``
fails the check if a type is not exactly the one stated (``Any`` included), so a
return type that falls back to ``Any`` is caught.
"""

from __future__ import annotations

import asyncio
from typing import Any, Dict, List, Optional, Tuple

from typing_extensions import assert_type

from socketengine import Client, Connection, Host, aio, client, host
from socketengine.aio import Subscription as AioSubscription
from socketengine.sync.delivery import Subscription


def seed_style() -> None:
    h = host(port=0)
    assert_type(h, Host)
    assert_type(h.start(), Host)
    c = client(port=h.port).start()
    assert_type(c, Client)
    c.write("test", "client is connected!")
    c.writeLock("test", "again")
    data = h.get_ALL("test")
    assert_type(data, List[Any])
    for item in data:
        print(item)
    assert_type(h.getClients(), List[Connection])
    assert_type(h.write_ALL("config", {"fps": 30}), int)
    assert_type(h.writeLock_ALL("config", {"fps": 30}, retain=True), int)
    h.writeImg_ALL([[0]], "image", codec="raw")
    c.close()
    h.close()


def pep8_threaded() -> None:
    with Host(port=0) as h, Client(port=h.port, name="cam-1", reconnect=False) as c:
        assert_type(h, Host)
        assert_type(c, Client)

        @h.on("add")
        def add(numbers: List[int], conn: Connection) -> int:
            return sum(numbers)

        total = add([1, 2], h.clients()[0])  # "add" keeps its signature
        assert_type(total, int)

        @c.on("command")
        def command(data: str) -> None:
            print("do", data)

        def record(data: Any) -> None:
            print(data)

        registered = c.on("other", record)
        registered({"any": "value"})

        @h.on_message
        def log_host(channel: str, data: Any, conn: Connection) -> None:
            print(channel, data, conn.name)

        @c.on_message
        def log_client(channel: str, data: Any) -> None:
            print(channel, data)

        @h.on_connect
        def hello(conn: Connection) -> None:
            print("hello", conn.name)

        @h.on_disconnect
        def bye(conn: Connection) -> None:
            print("bye", conn.name)

        h.on_connect(lambda conn: print("hello", conn.name))

        @h.on_request
        def answered(
            conn: Connection, channel: str, value: Any, reply: Any, error: Optional[str]
        ) -> None:
            print(conn.name, channel, value, reply, error)

        hello(h.clients()[0])
        command("stop")
        c.write("pose", {"x": 1.5})
        c.write_many([("pose", {"x": 1.5}), ("speed", 0.3)])
        c.write_many({"pose": {"x": 2.0}, "speed": 0.4})
        samples: List[float] = [0.1, 0.2]
        c.write_many(("imu", s) for s in samples)
        assert_type(h.wait("pose", timeout=5), Tuple[Any, Connection])
        value, sender = h.wait("pose", timeout=5)
        name: Optional[str] = sender.name
        reply = c.request("add", [1, 2, 3])
        assert_type(reply, Any)
        assert_type(c.wait("config", timeout=5), Any)
        latest: Any = h.get("pose")
        one = h.get_client("cam-1")
        assert_type(one, Optional[Connection])
        if one is not None:
            one.write("exposure", 10)
            answer: Any = one.request("snapshot", None, timeout=2)
            print(answer)
        assert_type(h.clients(), List[Connection])
        assert_type(h.write_all("config", {"fps": 30}, retain=True), int)
        stats: Dict[str, Any] = h.stats()
        with h.subscribe("events") as sub:
            assert_type(sub, Subscription[Tuple[Any, Connection]])
            for data, conn in sub:
                print(data, conn.name)
        assert_type(sub.get(timeout=1.0), Tuple[Any, Connection])
        client_sub = c.subscribe("cmd", maxsize=10)
        assert_type(client_sub, Subscription[Any])
        for item in client_sub:
            print(item)
        c.off("command", command)
        print(total, value, name, latest, stats, log_host, log_client, bye, answered)
    opened = Host(port=0, open=False).open()
    assert_type(opened, Host)
    started = Client(port=opened.port, open=False).start()
    assert_type(started, Client)
    started.close()
    opened.close()


async def pep8_asyncio() -> None:
    async with aio.Host(port=0) as h, aio.Client(port=h.port, name="cam") as c:
        assert_type(h, aio.Host)
        assert_type(c, aio.Client)

        @h.on("add")
        async def add(numbers: List[int], conn: aio.Connection) -> int:
            return sum(numbers)

        @c.on("command")
        def command(data: str) -> None:
            print("do", data)

        @h.on_message
        def log_host(channel: str, data: Any, conn: aio.Connection) -> None:
            print(channel, data, conn.name)

        @h.on_connect
        async def hello(conn: aio.Connection) -> None:
            print("hello", conn.name)

        @h.on_disconnect
        def bye(conn: aio.Connection) -> None:
            print("bye", conn.name)

        total = await add([1, 2], h.clients()[0])
        assert_type(total, int)
        command("stop")
        await c.write("pose", {"x": 1.5})
        await c.write_many({"pose": {"x": 2.0}, "speed": 0.4})
        await h.clients()[0].write_many([("cmd", "go")])
        assert_type(await h.wait("pose", timeout=5), Tuple[Any, aio.Connection])
        data, conn = await h.wait("pose", timeout=5)
        name: Optional[str] = conn.name
        assert_type(await c.request("add", [1, 2], timeout=5), Any)
        assert_type(await c.wait("config", timeout=5), Any)
        assert_type(h.get_client("cam"), Optional[aio.Connection])
        assert_type(h.clients(), List[aio.Connection])
        assert_type(await h.write_all("config", {"fps": 30}, retain=True), int)
        stats: Dict[str, Any] = c.stats()
        host_sub = h.subscribe("events")
        assert_type(host_sub, AioSubscription[Tuple[Any, aio.Connection]])
        async for value, sender in host_sub:
            print(value, sender.name)
        client_sub = c.subscribe("cmd")
        assert_type(client_sub, AioSubscription[Any])
        async for value in client_sub:
            print(value)
        print(total, data, name, stats, log_host, hello, bye)
    started = await aio.Host(port=0).start()
    assert_type(started, aio.Host)
    connected = await aio.Client(port=started.port).start()
    assert_type(connected, aio.Client)
    await connected.close()
    await started.close()


if __name__ == "__main__":
    seed_style()
    pep8_threaded()
    asyncio.run(pep8_asyncio())
