"""Prototype measurement, not product code: what if the requesting thread read its own reply?

``request()`` today crosses three threads (caller -> host I/O thread -> client I/O thread
-> caller).  Here, after a normal warm-up, the client's socket is taken off its I/O
thread; the caller then sends each REQUEST frame itself and reads the REPLY itself
(blocking ``recv_into`` and a :class:`~socketengine.frames.FrameDecoder`), so the client
I/O thread and the hand-over to the caller disappear.  Both ways are timed in the same
process and run, host with an inline handler, ``resume_window=0`` (the prototype does
not number frames).  It does none of what a real implementation needs (sharing the
socket with the I/O thread, values and pings arriving meanwhile, TLS, shared memory,
resume), so its figure is a lower bound.  A first real implementation (branch
``experiment/self-read``, 2026-12-03) measured no gain over the I/O-thread path; a
leaner one was merged on 2026-12-04 (``Connection.read_until``: ``request()`` ÷ pyzmq
1.25-1.38× against 1.43-1.55× in two processes, unchanged in one).  Since then
``_normal`` here is itself a self-reading ``request()``; see docs/benchmarks.md, "Round
trips"::

    python -m bench.selfread --n 3000 --rounds 4
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from typing import Any, List


def _normal(client: Any, n: int) -> List[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        client.request("req", i)
        out.append(time.perf_counter() - t0)
    return out


def _self_read(client: Any, n: int) -> List[float]:
    from socketengine import frames

    conn = client._conn  # private on purpose: this is a probe of the internals
    sock = conn.socket
    off = threading.Event()

    def unregister() -> None:
        conn._loop.unregister(sock)
        off.set()

    conn._loop.call_soon(unregister)
    if not off.wait(5):
        raise RuntimeError("the client's I/O thread did not release the socket")
    sock.setblocking(True)
    sock.settimeout(5)
    decoder = frames.FrameDecoder(1 << 20, 4096, expect_preamble=False)
    buf = bytearray(65536)
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        parts = frames.encode_value_frame(frames.REQUEST, "req", i, fid=1_000_000 + i)
        sock.sendmsg(parts)
        got = None
        while got is None:
            k = sock.recv_into(buf)
            if not k:
                raise RuntimeError("the host closed the connection")
            for frame in decoder.feed(bytes(buf[:k])):
                if frame.type == frames.REPLY:
                    got = frame.value()
        out.append(time.perf_counter() - t0)
        if got != i:
            raise RuntimeError(f"reply {got!r} to request {i}")
    return out


def _pct(values: List[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1e6


def one_round(n: int) -> List[float]:
    from socketengine import Client, Host

    host = Host(port=0, timeout=5, resume_window=0)
    host.on("req", lambda value, conn: value, inline=True)
    client = Client(port=host.port, timeout=5)
    try:
        client.open()
        _normal(client, 300)
        normal = _normal(client, n)
        own = _self_read(client, n)
    finally:
        try:
            client._conn.socket.close()  # the I/O thread no longer watches it
        finally:
            client.close()
            host.close()
    return [_pct(normal, 0.5), _pct(normal, 0.99), _pct(own, 0.5), _pct(own, 0.99)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000, help="requests per way and round")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    rows = [one_round(args.n) for _ in range(args.rounds)]
    for r in rows:
        print(
            f"request() p50 {r[0]:.0f} p99 {r[1]:.0f} us | "
            f"own read p50 {r[2]:.0f} p99 {r[3]:.0f} us"
        )
    med = [statistics.median(col) for col in zip(*rows)]
    print(
        f"median of {args.rounds} rounds: request() p50 {med[0]:.0f} us, the caller reading "
        f"its own reply p50 {med[2]:.0f} us ({med[2] / med[0]:.2f}x)"
    )


if __name__ == "__main__":
    main()
