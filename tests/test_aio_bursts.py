"""Bursts on the asyncio layer: a write within 50 us of the previous one (or a
broadcast within 1 ms of the previous one) is sent by one pump on the loop's next step
with the rest of the burst, or as soon as 64 KiB (a quarter of ``max_buffer``) wait.
An isolated write still goes out at once."""

from __future__ import annotations

import asyncio
import functools
from typing import Any, Callable, Coroutine, List, Tuple

from conftest import wait_for

from socketengine import Client, Host, aio


def run_async(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 30))

    return wrapper


def _count_sends(conn: Any) -> List[int]:
    """Count the calls that hand bytes to ``conn``'s (real) transport."""
    sends = [0]
    transport = conn.transport
    write, writelines = transport.write, transport.writelines

    def counted_write(data: Any) -> None:
        sends[0] += 1
        write(data)

    def counted_writelines(data: Any) -> None:
        sends[0] += 1
        writelines(data)

    transport.write, transport.writelines = counted_write, counted_writelines
    return sends


@run_async
async def test_a_tight_write_loop_is_sent_in_few_sends_in_order() -> None:
    host = Host(port=0)
    got: List[Any] = []
    host.on_message(lambda channel, data, conn: got.append(data))
    client = await aio.Client(port=host.port).start()
    try:
        sends = _count_sends(client._conn)
        n = 20_000
        for i in range(n):  # never yields to the loop: only the 64 KiB rule sends
            await client.write("n", i)
        await client.write_many([("n", "many"), ("n", "more")])
        await client.flush()
        await asyncio.to_thread(wait_for, lambda: len(got) == n + 2, 10.0, "every value")
        assert got == [*range(n), "many", "more"]
        assert 0 < sends[0] < n // 50, sends[0]
        # An isolated write goes out at once, in a send of its own.
        await asyncio.sleep(0.01)
        before = sends[0]
        await client.write("n", "alone")
        assert sends[0] == before + 1
    finally:
        await client.close()
        host.close()


@run_async
async def test_a_burst_of_broadcasts_keeps_each_queue_small_and_drops_nobody() -> None:
    small = 64 * 1024
    host = await aio.Host(port=0, max_buffer=small).start()
    clients: List[Client] = []
    logs: List[List[Tuple[str, Any]]] = []
    try:
        for k in range(3):
            c = await asyncio.to_thread(Client, port=host.port, name=f"c{k}")
            log: List[Tuple[str, Any]] = []
            c.on_message(lambda channel, data, log=log: log.append((channel, data)))
            clients.append(c)
            logs.append(log)
        while len(host.clients()) < 3:
            await asyncio.sleep(0.001)
        conns = host.clients()
        n = 3000
        for i in range(n):
            assert await host.write_all("n", [i, "x" * 100]) == 3
            # What waits for the loop's next step stays within a quarter of max_buffer
            # (plus the value just queued), far from a slow-consumer verdict.
            assert all(conn._queue.queued <= small // 4 + 200 for conn in conns)
            if i % 200 == 199:
                await asyncio.sleep(0.001)  # pacing, not synchronisation
        for log in logs:
            await asyncio.to_thread(wait_for, lambda log=log: len(log) == n, 10.0, "every value")
            assert log == [("n", [i, "x" * 100]) for i in range(n)]
        assert len(host.clients()) == 3
    finally:
        for c in clients:
            await asyncio.to_thread(c.close)
        await host.close()
