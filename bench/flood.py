"""Handshake exhaustion: can a client with the right token get in while other
connections never finish their handshake?

A flooder process keeps ``--flood`` connections open to a host (``token=`` set) that
never complete the handshake -- idle, or (``--trickle``) sending one byte of a real
client's opening per second -- and re-opens each one as soon as the host closes it.
Meanwhile a client with the right token tries ``--tries`` times to connect; the result
is how many tries got in.

    python -m bench.flood [--layer sync|aio] [--flood 2000] [--tries 26] [--trickle]
                          [--max-pending N]

The flooder is also what tests/test_parity.py runs, smaller:
``python -m bench.flood --flooder PORT COUNT SECONDS [--trickle]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import selectors
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, Optional

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "flood-test-token"


def raise_fd_limit(n: int) -> None:
    """Allow ``n`` open files in this process (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n if hard == resource.RLIM_INFINITY else min(n, hard)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def flooder(port: int, count: int, seconds: float, trickle: bool) -> None:
    """Keep ``count`` connections that never finish the handshake, for ``seconds``."""
    from socketengine.protocol import Protocol, Role

    raise_fd_limit(count + 100)
    opening = Protocol(Role.CLIENT, name="flood").data_to_send()  # preamble + HELLO
    sel = selectors.DefaultSelector()
    sent: Dict[socket.socket, int] = {}
    reopened = 0

    def open_one() -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        sel.register(s, selectors.EVENT_READ)
        sent[s] = 0

    for _ in range(count):
        open_one()
    deadline = time.monotonic() + seconds
    next_byte = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        for key, _ in sel.select(0.05):
            s = key.fileobj
            assert isinstance(s, socket.socket)
            try:
                data = s.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:  # the host closed it: come back at once
                sel.unregister(s)
                del sent[s]
                s.close()
                open_one()
                reopened += 1
        if trickle and time.monotonic() >= next_byte:
            next_byte += 1.0
            for s, i in list(sent.items()):
                if i < len(opening) - 1:  # never the last byte: never a complete HELLO
                    try:
                        s.send(opening[i : i + 1])
                        sent[s] = i + 1
                    except OSError:
                        pass
    for s in list(sent):
        s.close()
    print(json.dumps({"reopened": reopened}))


def start_flooder(port: int, count: int, seconds: float, trickle: bool) -> subprocess.Popen:
    args = [sys.executable, "-m", "bench.flood", "--flooder", str(port), str(count), str(seconds)]
    if trickle:
        args.append("--trickle")
    return subprocess.Popen(args, cwd=str(ROOT), stdout=subprocess.PIPE, text=True)


def try_clients(port: int, tries: int, pause: float = 0.2, why: Optional[list] = None) -> int:
    """Connect ``tries`` times with the right token; how many got in (the errors of
    the others are appended to ``why``)."""
    from socketengine import Client, SocketEngineError

    got_in = 0
    for _ in range(tries):
        try:
            client = Client(port=port, token=TOKEN, connect_timeout=5, heartbeat=None)
        except (SocketEngineError, OSError) as exc:
            if why is not None:
                why.append(f"{type(exc).__name__}: {exc}")
        else:
            got_in += 1
            client.close()
        time.sleep(pause)  # pacing the tries over the flood, not synchronisation
    return got_in


class AioHost:
    """An asyncio Host on an event loop in a helper thread."""

    def __init__(self, **kwargs: Any) -> None:
        from socketengine import aio

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.host = self.run(aio.Host(port=0, **kwargs).start())
        self.port = self.host.port

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def close(self) -> None:
        self.run(self.host.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def run(
    layer: str, flood: int, tries: int, trickle: bool, max_pending: Optional[int]
) -> Dict[str, Any]:
    from socketengine import Host

    raise_fd_limit(flood + 200)
    kwargs: Dict[str, Any] = {"token": TOKEN, "heartbeat": None}
    if max_pending is not None:
        kwargs["max_pending"] = max_pending
    host: Any = Host(port=0, **kwargs) if layer == "sync" else AioHost(**kwargs)
    try:
        proc = start_flooder(host.port, flood, 3.0 + tries * 0.6, trickle)
        time.sleep(2.0)  # let the flood reach its full size
        why: list = []
        got_in = try_clients(host.port, tries, why=why)
        out, _ = proc.communicate(60)
    finally:
        host.close()
    return {
        "layer": layer,
        "flood": flood,
        "trickle": trickle,
        "max_pending": max_pending,
        "tries": tries,
        "got_in": got_in,
        "failures": why,
        **json.loads(out.strip().splitlines()[-1]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flooder", nargs=3, metavar=("PORT", "COUNT", "SECONDS"))
    parser.add_argument("--layer", choices=["sync", "aio"], default="sync")
    parser.add_argument("--flood", type=int, default=2000)
    parser.add_argument("--tries", type=int, default=26)
    parser.add_argument("--trickle", action="store_true")
    parser.add_argument("--max-pending", type=int, default=None)
    args = parser.parse_args()
    if args.flooder:
        port, count, seconds = args.flooder
        flooder(int(port), int(count), float(seconds), args.trickle)
        return
    print(json.dumps(run(args.layer, args.flood, args.tries, args.trickle, args.max_pending)))


if __name__ == "__main__":
    main()
