"""Fan-out: the host sends N small values to K clients (all in this process); time
until every client holds the last one.  Deliveries/s = N * K / elapsed.

socketengine: ``host.write_all`` to K ``Client`` objects (each has its I/O thread).
pyzmq: one PUB socket, K SUB sockets each read by its own thread (HWM 0: PUB never
drops).  raw-tcp: the host ``sendall``s each length-prefixed message to K sockets,
each read by its own thread.

The ``_aio`` runners (workload ``fanout_aio``) send from a coroutine on an event loop
instead, one awaited call per value: socketengine ``await aio.Host.write_all``, pyzmq a
``zmq.asyncio`` PUB (``await send``), raw TCP an asyncio ``StreamWriter`` per client
(``write``, then ``await drain()`` for each).  The K receivers are the same threaded
ones as above.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Dict, List

import msgpack

from .common import (
    RAW,
    SE,
    U32,
    WARM_SEQ,
    ZMQ,
    AioThread,
    BenchCheckFailed,
    close_quietly,
    deadline_in,
    now,
    raw_accept,
    raw_connect,
    raw_listener,
    raw_msg_loop,
    small_message,
    wait_until,
)

CHANNEL = "fan"


def _all_have(readers: List[Any], seq: int, get: Any) -> Any:
    """A predicate: every reader's latest seq is ``seq`` (scans forward, so each
    reader is looked at again only until it has it)."""
    pos = [0]

    def done() -> bool:
        i = pos[0]
        while i < len(readers):
            if get(readers[i]) != seq:
                pos[0] = i
                return False
            i += 1
        pos[0] = i
        return True

    return done


def _result(n: int, k: int, t0: float, t1: float, counts: List[int]) -> Dict[str, Any]:
    bad = [c for c in counts if c != n]
    if bad:
        raise BenchCheckFailed(f"fanout: {len(bad)} of {k} clients missed messages ({bad[:3]})")
    elapsed = t1 - t0
    return {"deliveries_per_s": n * k / elapsed, "elapsed_s": elapsed}


def run_socketengine(n: int, k: int, timeout: float) -> Dict[str, Any]:
    from socketengine import Client, Host

    host = Host(port=0, timeout=10)
    clients: List[Any] = []
    try:
        for _ in range(k):
            clients.append(Client(port=host.port, timeout=10, connect_timeout=10))
        wait_until(lambda: len(host.clients()) == k, deadline_in(timeout), "K clients", 0.001)

        def seq_of(c: Any) -> int:
            v = c.get(CHANNEL)
            return -2 if v is None else v[0]

        host.write_all(CHANNEL, small_message(WARM_SEQ))
        wait_until(_all_have(clients, WARM_SEQ, seq_of), deadline_in(timeout), "warm-up", 0.001)
        before = [getattr(getattr(c, "_conn", None), "messages_in", None) for c in clients]
        text = small_message(0)[1]
        write_all = host.write_all
        t0 = now()
        for i in range(n):
            write_all(CHANNEL, [i, text])
        wait_until(_all_have(clients, n - 1, seq_of), t0 + timeout, "the last fan-out value")
        t1 = now()
        # Delivered counts (the client's connection counters; skipped if unavailable).
        counts = []
        for c, b in zip(clients, before):
            a = getattr(getattr(c, "_conn", None), "messages_in", None)
            counts.append(n if a is None or b is None else a - b)
        return _result(n, k, t0, t1, counts)
    finally:
        for c in clients:
            close_quietly(c)
        host.close()


class _Reader:
    def __init__(self) -> None:
        self.latest: Any = None
        self.seq = -2
        self.count = 0


def run_pyzmq(n: int, k: int, timeout: float) -> Dict[str, Any]:
    import zmq

    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.setsockopt(zmq.LINGER, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    stop = [False]
    subs, readers, threads = _sub_readers(ctx, port, k, stop)
    try:
        # Slow joiners: publish the warm-up value until every subscriber has it.
        warm = msgpack.packb(small_message(WARM_SEQ))
        dl = deadline_in(timeout)
        everyone = _all_have(readers, WARM_SEQ, lambda r: r.seq)
        while not everyone():
            if now() > dl:
                raise BenchCheckFailed("fanout: SUB sockets never got the warm-up value")
            pub.send(warm)
            time.sleep(0.01)
        packb = msgpack.packb
        send = pub.send
        text = small_message(0)[1]
        t0 = now()
        for i in range(n):
            send(packb([i, text]))
        wait_until(_all_have(readers, n - 1, lambda r: r.seq), t0 + timeout, "the last value")
        t1 = now()
        return _result(n, k, t0, t1, [r.count for r in readers])
    finally:
        _stop_sub_readers(subs, threads, stop)
        pub.close(linger=0)
        ctx.term()


def _raw_readers(
    listener: socket.socket,
    port: int,
    readers: List[_Reader],
    ends: List[socket.socket],
    peers: List[socket.socket],
    threads: List[threading.Thread],
    deadline: float,
) -> None:
    """A socket per reader connected to ``listener`` (``ends``, each read by a thread
    into its reader; the accepted ``peers``).  Appends as it goes: the caller's cleanup
    closes whatever was opened."""
    for _ in readers:
        ends.append(raw_connect(port))
        peers.append(raw_accept(listener, deadline))
    for sock, r in zip(ends, readers):
        t = threading.Thread(target=raw_msg_loop, args=(sock, r), daemon=True)
        t.start()
        threads.append(t)


def run_raw(n: int, k: int, timeout: float) -> Dict[str, Any]:
    listener = raw_listener()
    port = listener.getsockname()[1]
    ends: List[socket.socket] = []  # client ends, read by threads
    peers: List[socket.socket] = []  # host ends
    readers = [_Reader() for _ in range(k)]
    threads: List[threading.Thread] = []
    try:
        dl = deadline_in(timeout)
        _raw_readers(listener, port, readers, ends, peers, threads, dl)

        def broadcast(value: Any) -> None:
            body = msgpack.packb(value)
            msg = U32.pack(len(body)) + body
            for p in peers:
                p.sendall(msg)

        broadcast(small_message(WARM_SEQ))
        wait_until(_all_have(readers, WARM_SEQ, lambda r: r.seq), dl, "warm-up", 0.001)
        packb = msgpack.packb
        pack_len = U32.pack
        text = small_message(0)[1]
        t0 = now()
        for i in range(n):
            body = packb([i, text])
            msg = pack_len(len(body)) + body
            for p in peers:
                p.sendall(msg)
        wait_until(_all_have(readers, n - 1, lambda r: r.seq), t0 + timeout, "the last value")
        t1 = now()
        return _result(n, k, t0, t1, [r.count for r in readers])
    finally:
        for p in peers:
            try:
                p.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in threads:
            t.join(2)
        close_quietly(listener, *peers, *ends)


# -- the asyncio senders --------------------------------------------------------------


def run_socketengine_aio(n: int, k: int, timeout: float) -> Dict[str, Any]:
    from socketengine import Client, aio

    loop = AioThread(timeout + 30)
    host: Any = None
    clients: List[Any] = []
    try:

        async def start() -> Any:
            return await aio.Host(port=0, timeout=10).start()

        host = loop.run(start())
        for _ in range(k):
            clients.append(Client(port=host.port, timeout=10, connect_timeout=10))
        wait_until(lambda: len(host.clients()) == k, deadline_in(timeout), "K clients", 0.001)

        def seq_of(c: Any) -> int:
            v = c.get(CHANNEL)
            return -2 if v is None else v[0]

        loop.run(host.write_all(CHANNEL, small_message(WARM_SEQ)))
        wait_until(_all_have(clients, WARM_SEQ, seq_of), deadline_in(timeout), "warm-up", 0.001)
        before = [c._conn.messages_in for c in clients]

        async def burst() -> float:
            write_all = host.write_all
            text = small_message(0)[1]
            t0 = now()
            for i in range(n):
                await write_all(CHANNEL, [i, text])
            return t0

        t0 = loop.run(burst())
        wait_until(_all_have(clients, n - 1, seq_of), t0 + timeout, "the last fan-out value")
        t1 = now()
        counts = [c._conn.messages_in - b for c, b in zip(clients, before)]
        return _result(n, k, t0, t1, counts)
    finally:
        for c in clients:
            close_quietly(c)
        try:
            if host is not None:
                loop.run(host.close())
        finally:
            loop.close()


def _sub_readers(ctx: Any, port: int, k: int, stop: List[bool]) -> Any:
    """K SUB sockets on ``port``, each read by its own thread into a :class:`_Reader`."""
    import zmq

    subs = []
    readers = [_Reader() for _ in range(k)]
    for _ in range(k):
        s = ctx.socket(zmq.SUB)
        s.setsockopt(zmq.RCVHWM, 0)
        s.setsockopt(zmq.RCVTIMEO, 100)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SUBSCRIBE, b"")
        s.connect(f"tcp://127.0.0.1:{port}")
        subs.append(s)

    def read(sock: Any, state: _Reader) -> None:
        unpackb = msgpack.unpackb
        while not stop[0]:
            try:
                v = unpackb(sock.recv())
            except zmq.Again:
                continue
            except zmq.ZMQError:
                return
            state.latest = v
            if v[0] >= 0:
                state.count += 1
            state.seq = v[0]

    threads = [
        threading.Thread(target=read, args=(s, r), daemon=True) for s, r in zip(subs, readers)
    ]
    for t in threads:
        t.start()
    return subs, readers, threads


def _stop_sub_readers(subs: List[Any], threads: List[threading.Thread], stop: List[bool]) -> None:
    """End what :func:`_sub_readers` started: stop and join the threads, close the
    sockets."""
    stop[0] = True
    for t in threads:
        t.join(2)
    for s in subs:
        s.close(linger=0)


def run_pyzmq_aio(n: int, k: int, timeout: float) -> Dict[str, Any]:
    import zmq
    import zmq.asyncio

    loop = AioThread(timeout + 30)
    actx = zmq.asyncio.Context()
    pub = actx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.setsockopt(zmq.LINGER, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    ctx = zmq.Context()
    stop = [False]
    subs, readers, threads = _sub_readers(ctx, port, k, stop)
    try:
        warm = msgpack.packb(small_message(WARM_SEQ))

        async def send_warm() -> None:  # on the loop's thread, like every send
            await pub.send(warm)

        dl = deadline_in(timeout)
        everyone = _all_have(readers, WARM_SEQ, lambda r: r.seq)
        while not everyone():  # slow joiners, as in run_pyzmq
            if now() > dl:
                raise BenchCheckFailed("fanout: SUB sockets never got the warm-up value")
            loop.run(send_warm())
            time.sleep(0.01)

        async def burst() -> float:
            packb = msgpack.packb
            send = pub.send
            text = small_message(0)[1]
            t0 = now()
            for i in range(n):
                await send(packb([i, text]))
            return t0

        t0 = loop.run(burst())
        wait_until(_all_have(readers, n - 1, lambda r: r.seq), t0 + timeout, "the last value")
        t1 = now()
        return _result(n, k, t0, t1, [r.count for r in readers])
    finally:
        _stop_sub_readers(subs, threads, stop)

        async def shut() -> None:
            pub.close(linger=0)

        try:
            loop.run(shut())
        finally:
            loop.close()
        ctx.term()
        actx.term()


def run_raw_aio(n: int, k: int, timeout: float) -> Dict[str, Any]:
    import asyncio

    listener = raw_listener()
    port = listener.getsockname()[1]
    ends: List[socket.socket] = []  # client ends, read by threads
    peers: List[socket.socket] = []  # host ends, then owned by asyncio streams
    readers = [_Reader() for _ in range(k)]
    threads: List[threading.Thread] = []
    loop = AioThread(timeout + 30)
    writers: List[Any] = []
    try:
        dl = deadline_in(timeout)
        _raw_readers(listener, port, readers, ends, peers, threads, dl)

        async def wrap() -> List[Any]:
            return [(await asyncio.open_connection(sock=p))[1] for p in peers]

        writers = loop.run(wrap())

        async def broadcast(value: Any) -> None:
            body = msgpack.packb(value)
            msg = U32.pack(len(body)) + body
            for w in writers:
                w.write(msg)
                await w.drain()

        loop.run(broadcast(small_message(WARM_SEQ)))
        wait_until(_all_have(readers, WARM_SEQ, lambda r: r.seq), dl, "warm-up", 0.001)

        async def burst() -> float:
            packb = msgpack.packb
            pack_len = U32.pack
            text = small_message(0)[1]
            t0 = now()
            for i in range(n):
                body = packb([i, text])
                msg = pack_len(len(body)) + body
                for w in writers:
                    w.write(msg)
                    await w.drain()
            return t0

        t0 = loop.run(burst())
        wait_until(_all_have(readers, n - 1, lambda r: r.seq), t0 + timeout, "the last value")
        t1 = now()
        return _result(n, k, t0, t1, [r.count for r in readers])
    finally:

        async def shut() -> None:
            for w in writers:
                w.close()

        try:
            loop.run(shut())
        finally:
            loop.close()
        for t in threads:
            t.join(2)
        close_quietly(listener, *peers, *ends)


RUNNERS = {SE: run_socketengine, ZMQ: run_pyzmq, RAW: run_raw}
AIO_RUNNERS = {SE: run_socketengine_aio, ZMQ: run_pyzmq_aio, RAW: run_raw_aio}
