"""Where a round trip's time goes: one request's path through both processes, step by step.

``client.request("ping", [seq, 100-byte str])`` to a Host in another process that
answers with an inline handler (what ``roundtrip_req_xproc`` measures), against a raw TCP
echo in the same run, rounds alternating.  Both processes stamp events with
``CLOCK_MONOTONIC``, which all processes of one machine share, so each request splits
into six consecutive segments:

========================  =====================================  ==========================
segment                   socketengine: from → to                raw TCP: from → to
========================  =====================================  ==========================
client send               ``request()`` called → its send        ``send`` called → returned
                          returned (request table, encoding,
                          queue, the ``send`` call)
wire out                  → the host's I/O thread woken          → the server's ``poll``
                          (``epoll_wait`` returned)              returned
host read                 → the handler called (``recv``,        → its ``recv`` returned
                          parsing, dispatch)
host reply                → the reply's send returned            → its ``send`` returned
                          (encoding, queue, ``send``)
wire back                 → the client's ``poll`` returned       → the client's ``poll``
                                                                 returned
client receive            → ``request()`` returned (``recv``,    → its ``recv`` returned
                          parsing, the reply handed over, the
                          socket given back to the I/O thread)
========================  =====================================  ==========================

One side's steps follow each other; the two "wire" segments span the other side's
wake-up, which may come before the ``send`` that caused it has returned (they are
negative then, and the send segment holds that time).  The raw echo waits in ``poll``
on both sides, as socketengine does, so the segments compare one to one; it is the
floor of any Python library (one ``poll``, one ``recv`` and one ``send`` per side).
The socketengine side is timed by wrapping three internal steps (the I/O loops'
``epoll`` wait, the send path's flush and the requesting thread's ``poll``), which
adds about 1 µs to each; the table's total is the instrumented one.  "wire back" ends
when the requesting thread's ``poll`` returns, or the client's I/O thread wakes if the
reply came before the requester polled (then "client receive" holds the hand-over).
A stamp taken late (its process preempted after the call) is still matched: each step
is the first of its kind after the step that must precede it.
Linux only (the I/O loop's ``epoll``)::

    python -m bench.rt_timeline                     # 5 rounds of 20,000 requests
    python -m bench.rt_timeline --n 2000 --rounds 2 --json out.json
"""

from __future__ import annotations

import argparse
import bisect
import json
import multiprocessing as mp
import select
import socket
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

SEGMENTS = ("client send", "wire out", "host read", "host reply", "wire back", "client receive")
SYSTEMS = ("socketengine", "raw")
WARMUP = 2000

Log = List[Tuple[str, int]]


def _clock() -> Callable[[], int]:
    return lambda: time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def _wrap_flush(log: Log) -> None:
    """Stamp ``sent`` when a connection's flush (its ``send`` calls) returns."""
    from socketengine.sync import connection

    clock = _clock()
    flush = connection.Connection._flush_batches

    def stamped(self: Any) -> None:
        flush(self)
        log.append(("sent", clock()))

    connection.Connection._flush_batches = stamped  # type: ignore[method-assign]


def _wrap_loop_wait(log: Log, kind: str) -> None:
    """Stamp ``kind`` each time an I/O loop's epoll wait returns (before any loop of
    this process starts: the loop looks its wait up once)."""
    from socketengine.sync import loop

    if not hasattr(loop, "_Epoll"):
        raise SystemExit("rt_timeline needs the epoll I/O loop (Linux)")
    clock = _clock()
    wait = loop._Epoll.select

    def woken(self: Any, timeout: Optional[float]) -> Any:
        ready = wait(self, timeout)
        log.append((kind, clock()))
        return ready

    loop._Epoll.select = woken  # type: ignore[method-assign]


def _host(ports: Any, logs: Any, stop: Any) -> None:
    """A socketengine Host answering "ping" inline, its steps stamped (child process)."""
    log: Log = []
    clock = _clock()
    _wrap_flush(log)
    _wrap_loop_wait(log, "woke")
    from socketengine import Host

    host = Host(port=0, timeout=30)

    def echo(data: Any, conn: Any) -> Any:
        log.append(("handler", clock()))
        return data

    host.on("ping", echo, inline=True)
    ports.put(host.port)
    stop.wait(3600)
    logs.put(("socketengine", log))
    host.close()


def _raw_server(ports: Any, logs: Any, stop: Any) -> None:
    """A raw TCP echo that waits in ``poll`` (child process)."""
    log: Log = []
    clock = _clock()
    listener = socket.create_server(("127.0.0.1", 0))
    ports.put(listener.getsockname()[1])
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    poller = select.poll()
    poller.register(conn, select.POLLIN)
    while True:
        if not poller.poll(1000):
            if stop.is_set():
                break
            continue
        log.append(("woke", clock()))
        data = conn.recv(65536)
        log.append(("handler", clock()))  # "read": what the handler would get now
        if not data:
            break
        conn.sendall(data)
        log.append(("sent", clock()))
    logs.put(("raw", log))
    conn.close()
    listener.close()


def _segments(marks: List[Tuple[int, int]], near: Log, far: Log) -> Dict[str, List[int]]:
    """Each request's segments (ns) from its start/end ``marks``, the client's events
    (``near``) and the server's (``far``), each in time order.  The steps of one side
    follow each other; across the sides they may overlap (a peer can wake before the
    ``send`` that woke it has returned: "wire out" or "wire back" is negative then).
    Requests whose events are incomplete are left out."""
    out: Dict[str, List[int]] = {name: [] for name in (*SEGMENTS, "total")}
    kinds = {
        side: {k: [t for kind, t in sorted(log, key=lambda e: e[1]) if kind == k] for k in names}
        for side, log, names in (
            ("near", near, ("sent", "polled")),
            ("far", far, ("woke", "handler", "sent")),
        )
    }

    def first(side: str, kind: str, after: int, before: int) -> Optional[int]:
        times = kinds[side][kind]
        i = bisect.bisect_left(times, after)
        return times[i] if i < len(times) and times[i] <= before else None

    never = 1 << 62
    for i, (start, end) in enumerate(marks):
        # The server's stamps may come late: taken after the call that woke the client
        # (a process preempted between its send and its stamp), so after ``end``; but
        # always before it handles the next request.
        later = marks[i + 1][1] if i + 1 < len(marks) else never
        sent = first("near", "sent", start, end)
        woke = first("far", "woke", start, end)
        handler = None if woke is None else first("far", "handler", woke, later)
        replied = None if handler is None else first("far", "sent", handler, later)
        # After the handler ran (the reply cannot come before it); the client's own
        # "sent" stamp may be late too (taken by its I/O thread after it was preempted).
        polled = None if handler is None else first("near", "polled", handler, end)
        if sent is None or polled is None or replied is None:
            continue
        steps = (start, sent, woke, handler, replied, polled, end)
        for name, a, b in zip(SEGMENTS, steps, steps[1:]):
            out[name].append(b - a)  # type: ignore[operator]
        out["total"].append(end - start)
    return out


class _Poll:
    """``select.poll()`` whose ``poll`` stamps ``polled`` when it returns."""

    def __init__(self, log: Log, clock: Callable[[], int]) -> None:
        self._poll = select.poll()
        self._log = log
        self._clock = clock

    def register(self, *args: Any) -> None:
        self._poll.register(*args)

    def poll(self, *args: Any) -> Any:
        ready = self._poll.poll(*args)
        self._log.append(("polled", self._clock()))
        return ready


def _round_socketengine(client: Any, log: Log, n: int) -> List[Tuple[int, int]]:
    clock = _clock()
    text = "x" * 100
    request = client.request
    marks = []
    log.clear()
    for i in range(n):
        start = clock()
        request("ping", [i, text])
        marks.append((start, clock()))
    return marks


def _round_raw(sock: socket.socket, log: Log, n: int) -> List[Tuple[int, int]]:
    import msgpack

    clock = _clock()
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    marks = []
    log.clear()
    for i in range(n):
        start = clock()
        msg = msgpack.packb([i, "x" * 100])
        sock.sendall(msg)
        log.append(("sent", clock()))
        poller.poll()
        log.append(("polled", clock()))
        got = sock.recv(65536)
        while len(got) < len(msg):  # one message at a time: nothing else is in flight
            got += sock.recv(65536)
        marks.append((start, clock()))
    return marks


def measure(n: int, rounds: int) -> Tuple[Dict[str, Dict[str, List[float]]], Dict[str, List[int]]]:
    """Per round and system, the median of every segment over ``n`` requests (µs), and
    how many requests of each round could be followed through every step."""
    from socketengine import Client
    from socketengine.sync import connection

    ctx = mp.get_context("spawn")
    stop, raw_stop = ctx.Event(), ctx.Event()
    ports: Any = ctx.Queue()
    logs: Any = ctx.Queue()
    host = ctx.Process(target=_host, args=(ports, logs, stop), daemon=True)
    host.start()
    host_port = ports.get(timeout=60)
    server = ctx.Process(target=_raw_server, args=(ports, logs, raw_stop), daemon=True)
    server.start()
    raw_port = ports.get(timeout=60)
    log: Log = []
    clock = _clock()
    _wrap_flush(log)
    plain_select = connection.select

    class _Select:  # what connection.py sees as ``select``: poll() stamped
        def __getattr__(self, name: str) -> Any:
            return getattr(plain_select, name)

        def poll(self) -> _Poll:
            return _Poll(log, clock)

    connection.select = _Select()  # type: ignore[assignment]
    # A reply that arrives before the requester polls is read by the client's I/O
    # thread: its wake-up ends "wire back" then (and "client receive" holds the hand-over).
    _wrap_loop_wait(log, "polled")
    client = Client(port=host_port, timeout=30, connect_timeout=30)
    sock = socket.create_connection(("127.0.0.1", raw_port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    marks: Dict[str, List[List[Tuple[int, int]]]] = {name: [] for name in SYSTEMS}
    try:
        _round_socketengine(client, log, min(n, WARMUP))
        _round_raw(sock, log, min(n, WARMUP))
        client_logs: Dict[str, List[Log]] = {name: [] for name in SYSTEMS}
        for r in range(rounds):
            for name in SYSTEMS if r % 2 == 0 else SYSTEMS[::-1]:
                if name == "socketengine":
                    marks[name].append(_round_socketengine(client, log, n))
                else:
                    marks[name].append(_round_raw(sock, log, n))
                client_logs[name].append(list(log))
        client.close()
        sock.close()
        stop.set()
        raw_stop.set()
        far: Dict[str, Log] = dict(logs.get(timeout=120) for _ in SYSTEMS)
    finally:
        connection.select = plain_select  # type: ignore[assignment]
        stop.set()
        raw_stop.set()
        for child in (host, server):
            child.join(30)
            if child.is_alive():
                child.kill()
    out: Dict[str, Dict[str, List[float]]] = {}
    followed: Dict[str, List[int]] = {name: [] for name in SYSTEMS}
    for name in SYSTEMS:
        per_round: Dict[str, List[float]] = {seg: [] for seg in (*SEGMENTS, "total")}
        for round_marks, round_log in zip(marks[name], client_logs[name]):
            segs = _segments(round_marks, round_log, far[name])
            followed[name].append(len(segs["total"]))
            if len(segs["total"]) < len(round_marks) // 2:
                raise RuntimeError(f"{name}: most requests could not be followed")
            for seg, values in segs.items():
                per_round[seg].append(statistics.median(values) / 1000)
        out[name] = per_round
    return out, followed


def summary(
    results: Dict[str, Dict[str, List[float]]], followed: Dict[str, List[int]]
) -> Dict[str, Any]:
    medians = {
        name: {seg: statistics.median(v) for seg, v in rows.items()}
        for name, rows in results.items()
    }
    return {
        "us_p50": medians,
        "runs": results,
        "followed": followed,
        "over_raw": {
            seg: medians["socketengine"][seg] - medians["raw"][seg] for seg in (*SEGMENTS, "total")
        },
    }


def main(argv: Any = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20_000, help="requests per system and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    from socketengine import compiled

    wrapped = {"socketengine.sync.connection", "socketengine.sync.loop"}
    if wrapped & set(compiled.modules()):
        raise SystemExit(
            "bench.rt_timeline times a request by wrapping methods of "
            "socketengine.sync.connection and socketengine.sync.loop, which this install "
            "runs compiled (socketengine/compiled.py): run it on an interpreted install"
        )
    doc = summary(*measure(args.n, args.rounds))
    se, raw, extra = doc["us_p50"]["socketengine"], doc["us_p50"]["raw"], doc["over_raw"]
    print(f"{'p50 µs':16s} {'socketengine':>13s} {'raw TCP':>9s} {'difference':>11s}")
    for seg in (*SEGMENTS, "total"):
        print(f"{seg:16s} {se[seg]:13.1f} {raw[seg]:9.1f} {extra[seg]:+11.1f}")
    for name, counts in doc["followed"].items():
        print(f"{name}: followed through every step {sum(counts)} of {args.n * len(counts)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
