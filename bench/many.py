"""Many idle clients: N clients (from W worker processes) connect to one host that runs
in a process of its own.  Measured: the time from the first connect attempt until
the host has seen all N, the host process's thread count, and the growth of its
VmRSS per connection (read from /proc/<pid>/status before and after).

A client "has connected" when the host has seen it: for socketengine, the handshake
is complete (``len(host.clients())``); for the anchors, the host has received the
one-byte hello each client sends after connecting.
"""

from __future__ import annotations

import gc
import selectors
import socket
import threading
import time
from typing import Any, Dict, List

from .common import (
    RAW,
    SE,
    ZMQ,
    BenchTimeout,
    close_quietly,
    deadline_in,
    now,
    proc_status,
    raise_nofile,
    raw_connect,
    raw_listener,
    wait_until,
)
from .xproc import Remote, shutdown_all

# -- hosts (in the host process) ---------------------------------------------------------


class SEHost:
    def __init__(self, params: Dict[str, Any]) -> None:
        from socketengine import Host

        raise_nofile(params["clients"] * 2 + 256)
        self.host = Host(port=0, timeout=10, max_clients=params["clients"] + 64, backlog=1024)
        self.port = self.host.port

    def count(self) -> int:
        return len(self.host.clients())

    def settle(self) -> None:
        gc.collect()

    def wait_clients(self, n: int, deadline: float) -> float:
        try:
            wait_until(lambda: self.count() >= n, deadline, f"{n} clients", 0.001)
        except BenchTimeout:
            conns = list(self.host._conns.values())
            raise BenchTimeout(
                f"timed out waiting for {n} clients: {self.count()} open, "
                f"{len(conns)} accepted, {sum(c.ready.is_set() for c in conns)} ready"
            ) from None
        return now()

    def close(self) -> None:
        self.host.close()


class RawHost:
    """A selector thread accepts connections and reads each one's hello byte."""

    def __init__(self, params: Dict[str, Any]) -> None:
        raise_nofile(params["clients"] * 2 + 256)
        self.listener = raw_listener(backlog=1024)
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.listener, selectors.EVENT_READ, None)
        self.socks: List[socket.socket] = []
        self.hellos = 0
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop:
            for key, _ in self.sel.select(0.1):
                if key.data is None:
                    while True:
                        try:
                            sock, _ = self.listener.accept()
                        except (BlockingIOError, InterruptedError):
                            break
                        except OSError:
                            return
                        sock.setblocking(False)
                        self.socks.append(sock)
                        self.sel.register(sock, selectors.EVENT_READ, sock)
                else:
                    sock = key.data
                    try:
                        data = sock.recv(4096)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        data = b""
                    if data:
                        self.hellos += 1
                    # Seen once (or gone): stop watching; the socket stays open.
                    self.sel.unregister(sock)

    def count(self) -> int:
        return self.hellos

    def settle(self) -> None:
        gc.collect()

    def wait_clients(self, n: int, deadline: float) -> float:
        wait_until(lambda: self.hellos >= n, deadline, f"{n} clients", 0.001)
        return now()

    def close(self) -> None:
        self.stop = True
        self.thread.join(2)
        close_quietly(self.listener, *self.socks)
        self.sel.close()


class ZmqHost:
    """A ROUTER socket; a thread counts the distinct identities that said hello."""

    def __init__(self, params: Dict[str, Any]) -> None:
        import zmq

        raise_nofile(params["clients"] * 2 + 256)
        self.ctx = zmq.Context()
        self.ctx.setsockopt(zmq.LINGER, 0)
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.RCVTIMEO, 100)
        self.sock.setsockopt(zmq.BACKLOG, 1024)
        self.port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.peers: set = set()
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import zmq

        while not self.stop:
            try:
                ident, _ = self.sock.recv_multipart()
            except zmq.Again:
                continue
            except (zmq.ZMQError, ValueError):
                return
            self.peers.add(ident)

    def count(self) -> int:
        return len(self.peers)

    def settle(self) -> None:
        gc.collect()

    def wait_clients(self, n: int, deadline: float) -> float:
        wait_until(lambda: len(self.peers) >= n, deadline, f"{n} clients", 0.001)
        return now()

    def close(self) -> None:
        self.stop = True
        self.thread.join(2)
        self.sock.close(linger=0)
        self.ctx.term()


# -- client workers (in W worker processes) -------------------------------------------------


class _Workers:
    def __init__(self, params: Dict[str, Any], port: int, k: int) -> None:
        raise_nofile(k * 6 + 256)
        self.port = None  # not a server
        self.host_port = port
        self.k = k
        self.items: List[Any] = []
        self.timeout = float(params.get("timeout", 60))

    def open(self, deadline: float) -> Dict[str, Any]:
        t0 = now()
        for _ in range(self.k):
            if now() > deadline:
                raise TimeoutError(f"opened only {len(self.items)} of {self.k} clients in time")
            self.items.append(self.connect_one())
        return {"t0": t0, "t1": now()}

    def connect_one(self) -> Any:
        raise NotImplementedError


class SEClients(_Workers):
    def connect_one(self) -> Any:
        from socketengine import Client

        return Client(port=self.host_port, timeout=10, connect_timeout=self.timeout)

    def close(self) -> None:
        for c in self.items:
            close_quietly(c)


class RawClients(_Workers):
    def connect_one(self) -> Any:
        sock = raw_connect(self.host_port)
        sock.sendall(b"h")
        return sock

    def close(self) -> None:
        close_quietly(*self.items)


class ZmqClients(_Workers):
    def __init__(self, params: Dict[str, Any], port: int, k: int) -> None:
        import zmq

        super().__init__(params, port, k)
        self.ctx = zmq.Context()
        self.ctx.setsockopt(zmq.LINGER, 0)
        self.ctx.set(zmq.MAX_SOCKETS, k + 64)

    def connect_one(self) -> Any:
        import zmq

        s = self.ctx.socket(zmq.DEALER)
        s.connect(f"tcp://127.0.0.1:{self.host_port}")
        s.send(b"h")
        return s

    def close(self) -> None:
        for s in self.items:
            s.close(linger=0)
        self.ctx.term()


HOSTS = {SE: SEHost, ZMQ: ZmqHost, RAW: RawHost}
CLIENTS = {SE: SEClients, ZMQ: ZmqClients, RAW: RawClients}


def run(lib: str, clients: int, workers: int, timeout: float) -> Dict[str, Any]:
    params = {"clients": clients, "timeout": timeout}
    host = None
    procs: List[Remote] = []
    try:
        host = Remote(HOSTS[lib], (params,))
        # Start the client workers (interpreter start-up is not timed) ...
        shares = [clients // workers + (1 if i < clients % workers else 0) for i in range(workers)]
        for k in shares:
            procs.append(Remote(CLIENTS[lib], (params, host.port, k)))
        host.call("settle")
        time.sleep(0.2)
        before = proc_status(host.pid)
        # ... then connect them all at once.
        dl = deadline_in(timeout)
        host.send("wait_clients", clients, dl)
        for p in procs:
            p.send("open", dl)
        opened = [p.result(timeout + 5) for p in procs]
        t_all = host.result(timeout + 5)
        host.call("settle")
        after = proc_status(host.pid)
        worker_rss = sum(proc_status(p.pid)["VmRSS"] for p in procs)
        t0 = min(o["t0"] for o in opened)
        return {
            "connect_s": t_all - t0,
            "host_threads": after["Threads"],
            "rss_per_conn_kb": (after["VmRSS"] - before["VmRSS"]) / clients,
            "host_rss_mb": after["VmRSS"] / 1024.0,
            "client_side_rss_mb": worker_rss / 1024.0,
        }
    finally:
        shutdown_all(*procs, timeout=timeout)
        shutdown_all(host, timeout=10)
