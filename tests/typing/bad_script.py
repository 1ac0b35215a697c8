"""Mistakes a type checker must catch in a user's script (checked by tests/test_typing.py).

Never run.  Every line whose comment is ``E:`` followed by a text must draw a mypy
error on that very line whose message contains the text; no other line may draw one.
"""

from __future__ import annotations

from typing import List

from socketengine import Client, Connection, Host, aio, client, host


def threaded() -> None:
    h = Host(port="8080")  # E: Argument "port" to "Host" has incompatible type "str"
    c = Client(port=h.port, reconect=True)  # E: Unexpected keyword argument "reconect"
    h.on(42)  # E: No overload variant of "on" of "Endpoint" matches argument type "int"
    c.write(7, "data")  # E: Argument 1 to "write" of "Client" has incompatible type "int"
    c.write_many([(7, "data")])  # E: List item 0 has incompatible type

    @h.on("add")
    def add(numbers: List[int], conn: Connection) -> int:
        return sum(numbers)

    add("1, 2", h.clients()[0])  # E: Argument 1 to "add" has incompatible type "str"
    total: str = add([1, 2], h.clients()[0])  # E: Incompatible types in assignment
    h.on_connect(lambda: None)  # E: Value of type variable "_C" of "on_connect" of "Host"
    pair: int = h.wait("pose")  # E: Incompatible types in assignment
    for data, conn in h.subscribe("events"):
        print(data, conn.nmae)  # E: "Connection" has no attribute "nmae"
    print(total, pair, c)


def seed_style() -> None:
    h = host(port="8080")  # E: Argument "port" to "Host" has incompatible type "str"
    c = client(reconect=True)  # E: Unexpected keyword argument "reconect"
    h.get_ALL(1)  # E: No overload variant matches argument type "int"
    c.writeLock(1, "data")  # E: Argument 1 has incompatible type "int"
    count: str = h.write_ALL("config", 1)  # E: Incompatible types in assignment
    print(count)


async def asyncio_layer() -> None:
    h = aio.Host(port="8080")  # E: Argument "port" to "Host" has incompatible type "str"
    c = aio.Client(port=h.port, reconect=True)  # E: Unexpected keyword argument "reconect"
    h.on(42)  # E: No overload variant of "on" of "Endpoint" matches argument type "int"

    @c.on("command")
    async def command(data: str) -> None:
        print(data)

    await command(3)  # E: Argument 1 to "command" has incompatible type "int"
    pair: int = await h.wait("pose")  # E: Incompatible types in assignment
    print(pair)
