"""How far the small-message writer is from the cheapest write Python can make.

The writer thread's CPU per message (``time.thread_time``), measured in the same process
and the same run, rounds rotating between the variants:

* **pack alone**: ``msgpack.Packer.pack([seq, text])``, what any msgpack sender pays;
* **minimal write**: a Python function that packs the value and appends channel prefix
  plus bytes to a ``deque``; no lock, no budget, no framing, no socket.  No write API
  in pure Python does less per message;
* **socketengine encode**: ``frames.value_item("test", [seq, text])``, the encoding
  ``write`` does in the caller's thread (the BATCH item: channel prefix + msgpack);
* **socketengine**: ``Client.write("test", [seq, text])`` to a Host in another process
  (what ``small_xproc`` measures, its writer side): encoding, then the thread-safe
  queue (lock, ``max_buffer`` budget, coalescing decision);
* **socketengine write_many**: ``Client.write_many`` of the same messages, 1,000 to a
  call, the pairs built in the loop (a batch API: no per-call floor applies);
* **pyzmq**: ``PUSH.send(msgpack.packb([seq, text]))`` to a PULL socket in another
  process (the ``small_xproc`` anchor's writer side).

In ``small_xproc`` the writer is the limit (the receiver spends less per message), so
pyzmq's cost ÷ a variant's cost is about the throughput ratio that variant could reach
against pyzmq.  ``pyzmq ÷ minimal write`` is therefore the ceiling of the "3× pyzmq"
goal for any design that keeps a per-call ``write`` in Python::

    python -m bench.writer_floor                 # 5 rounds of 100,000 messages
    python -m bench.writer_floor --n 2000 --rounds 2 --json out.json
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing as mp
import statistics
import time
from typing import Any, Callable, Dict, List

from .common import small_message

VARIANTS = (
    "pack alone",
    "minimal write",
    "socketengine encode",
    "socketengine",
    "socketengine write_many",
    "pyzmq",
)
#: Messages per ``write_many`` call in the write_many variant.
MANY_CHUNK = 1000


def _host(ports: Any, stop: Any) -> None:
    """A socketengine Host that stores what the writer sends (child process)."""
    from socketengine import Host

    host = Host(port=0)
    ports.put(host.port)
    stop.wait(600)
    host.close()


def _pull(ports: Any, stop: Any) -> None:
    """A PULL socket that drains what the pyzmq writer sends (child process)."""
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.RCVHWM, 0)
    ports.put(sock.bind_to_random_port("tcp://127.0.0.1"))
    while not stop.is_set():
        if sock.poll(50):
            while True:
                try:
                    sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
    sock.close(0)
    ctx.term()


def _cpu_per_message(loop: Callable[[int], None], n: int) -> float:
    started = time.thread_time()
    loop(n)
    return (time.thread_time() - started) / n * 1e6


def measure(n: int, rounds: int) -> Dict[str, List[float]]:
    """µs of writer CPU per message, one figure per round, for every variant."""
    import msgpack
    import zmq

    from socketengine import Client
    from socketengine.frames import value_item

    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    ports: Any = ctx.Queue()
    children = [ctx.Process(target=_host, args=(ports, stop), daemon=True)]
    children[0].start()
    host_port = ports.get(timeout=60)
    children.append(ctx.Process(target=_pull, args=(ports, stop), daemon=True))
    children[1].start()
    pull_port = ports.get(timeout=60)
    zctx = zmq.Context()
    push = zctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 0)
    push.connect(f"tcp://127.0.0.1:{pull_port}")
    client = Client(port=host_port, timeout=30, connect_timeout=30)
    try:
        text = small_message(0)[1]
        packer = msgpack.Packer(use_bin_type=True, strict_types=True, autoreset=True)
        pack = packer.pack
        sink: collections.deque[bytes] = collections.deque()
        prefixes = {"test": packer.pack("test")}

        def minimal(channel: str, value: Any) -> None:
            sink.append(prefixes[channel] + pack(value))

        def run_pack(k: int) -> None:
            for i in range(k):
                pack([i, text])

        def run_minimal(k: int) -> None:
            for i in range(k):
                minimal("test", [i, text])
            sink.clear()

        def run_encode(k: int) -> None:
            for i in range(k):
                value_item("test", [i, text])

        write = client.write

        def run_socketengine(k: int) -> None:
            for i in range(k):
                write("test", [i, text])

        write_many = client.write_many

        def run_write_many(k: int) -> None:
            for start in range(0, k, MANY_CHUNK):
                write_many([("test", [i, text]) for i in range(start, min(k, start + MANY_CHUNK))])

        send = push.send
        packb = msgpack.packb

        def run_pyzmq(k: int) -> None:
            for i in range(k):
                send(packb([i, text]))

        loops = dict(
            zip(
                VARIANTS,
                (run_pack, run_minimal, run_encode, run_socketengine, run_write_many, run_pyzmq),
            )
        )
        for loop in loops.values():  # warm-up: connections, caches
            loop(min(n, 2000))
        out: Dict[str, List[float]] = {name: [] for name in VARIANTS}
        for r in range(rounds):
            order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
            for name in order:
                out[name].append(_cpu_per_message(loops[name], n))
        return out
    finally:
        client.close()
        push.close(0)
        zctx.term()
        stop.set()
        for child in children:
            child.join(30)
            if child.is_alive():
                child.kill()


def summary(results: Dict[str, List[float]]) -> Dict[str, Any]:
    medians = {name: statistics.median(values) for name, values in results.items()}
    zmq_cost = medians["pyzmq"]
    return {
        "us_per_message": {
            name: {"median": medians[name], "min": min(v), "max": max(v), "runs": v}
            for name, v in results.items()
        },
        "pyzmq_over": {name: zmq_cost / medians[name] for name in VARIANTS if name != "pyzmq"},
    }


def main(argv: Any = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="messages per variant and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    doc = summary(measure(args.n, args.rounds))
    for name, row in doc["us_per_message"].items():
        ratio = doc["pyzmq_over"].get(name)
        tail = f"   pyzmq ÷ this {ratio:.2f}" if ratio is not None else ""
        print(f"{name:24s} {row['median']:6.2f} µs/msg [{row['min']:.2f}, {row['max']:.2f}]{tail}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"n": args.n, "rounds": args.rounds, **doc}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
