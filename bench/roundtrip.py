"""Round trips: the client sends ``[seq, 100-byte str]`` on "ping", the host sends it
back on "pong", the client waits for it.  Latency per round trip in microseconds.

Three socketengine styles: ``poll`` (the latest-value API: the host's echo thread polls
``host.get("ping")``, the client polls ``client.get("pong")``), ``sub`` (both sides
block in ``subscribe(channel).get()``) and ``req`` (``client.request`` answered by a
``host.on`` callback).  The anchors block in ``recv`` as their APIs allow.  Every
echo server decodes the request and encodes the reply, as socketengine does.

Server API: ``port``, ``wait_ready(deadline)``, ``measure(n, deadline) -> dict`` (a
no-op: it echoes from a thread), ``close()``.  Pinger API: ``warmup()``, ``go(n)``,
``close()``.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Dict, List, Optional

import msgpack

from . import common
from .common import (
    RAW,
    SE,
    U32,
    ZMQ,
    AioThread,
    BenchCheckFailed,
    BenchTimeout,
    close_quietly,
    now,
    raw_accept,
    raw_connect,
    raw_listener,
    recv_exact,
    small_message,
)

WARMUP = 50


def _latency_result(lat_ns: List[int]) -> Dict[str, Any]:
    return {"lat_ns": lat_ns}


# -- socketengine -----------------------------------------------------------------------------


class SEServer:
    def __init__(self, kind: str, params: Dict[str, Any]) -> None:
        from socketengine import Host

        self.host = Host(port=0, timeout=5)
        self.port = self.host.port
        self.stop = False
        self.echoed = 0
        self.thread = threading.Thread(target=self._echo, name="se-echo", daemon=True)
        self.thread.start()

    def _echo(self) -> None:
        h = self.host
        get = h.get
        write_all = h.write_all
        sleep = time.sleep
        pause = common.POLL_SLEEP
        last = None
        while not self.stop:
            v = get("ping")
            if v is not None and v[0] != last:
                last = v[0]
                write_all("pong", v)
                self.echoed += 1
            elif pause >= 0:
                sleep(pause)

    def wait_ready(self, deadline: float) -> None:
        pass

    def measure(self, n: int, deadline: float) -> Dict[str, Any]:
        return {}

    def close(self) -> None:
        self.stop = True
        self.thread.join(2)
        self.host.close()


class SEPinger:
    def __init__(self, kind: str, params: Dict[str, Any], port: int) -> None:
        from socketengine import Client

        self.client = Client(port=port, timeout=10, connect_timeout=10)
        self.timeout = float(params.get("timeout", 30))
        self.seq = 0

    def _rounds(self, n: int) -> List[int]:
        c = self.client
        write = c.write
        get = c.get
        clock = time.perf_counter_ns
        sleep = time.sleep
        pause = common.POLL_SLEEP
        text = small_message(0)[1]
        deadline_ns = clock() + int(self.timeout * 1e9)
        out = []
        seq = self.seq
        for _ in range(n):
            seq += 1
            t0 = clock()
            write("ping", [seq, text])
            while True:
                v = get("pong")
                if v is not None and v[0] == seq:
                    break
                if clock() > deadline_ns:
                    raise BenchTimeout(f"timed out waiting for pong {seq}")
                if pause >= 0:
                    sleep(pause)
            out.append(clock() - t0)
        self.seq = seq
        return out

    def warmup(self) -> None:
        self._rounds(WARMUP)

    def go(self, n: int) -> Dict[str, Any]:
        return _latency_result(self._rounds(n))

    def close(self) -> None:
        self.client.close()


# -- socketengine with the delivery API (no polling) -------------------------------------


class SESubServer:
    """Echo thread blocked in ``host.subscribe("ping").get()``, replying with write_all."""

    def __init__(self, kind: str, params: Dict[str, Any]) -> None:
        from socketengine import Host

        self.host = Host(port=0, timeout=5)
        self.port = self.host.port
        self.sub = self.host.subscribe("ping")
        self.stop = False
        self.thread = threading.Thread(target=self._echo, name="se-sub-echo", daemon=True)
        self.thread.start()

    def _echo(self) -> None:
        get = self.sub.get
        write_all = self.host.write_all
        while not self.stop:
            try:
                value, _conn = get(0.1)
            except Exception:  # queue.Empty / TimeoutError on timeout, closed on close
                continue
            write_all("pong", value)

    def wait_ready(self, deadline: float) -> None:
        pass

    def measure(self, n: int, deadline: float) -> Dict[str, Any]:
        return {}

    def close(self) -> None:
        self.stop = True
        self.thread.join(2)
        self.sub.close()
        self.host.close()


class SESubPinger:
    """``client.write("ping")`` then block in ``client.subscribe("pong").get()``."""

    def __init__(self, kind: str, params: Dict[str, Any], port: int) -> None:
        from socketengine import Client

        self.client = Client(port=port, timeout=10, connect_timeout=10)
        self.sub = self.client.subscribe("pong")
        self.timeout = float(params.get("timeout", 30))
        self.seq = 0

    def _rounds(self, n: int) -> List[int]:
        write = self.client.write
        get = self.sub.get
        clock = time.perf_counter_ns
        text = small_message(0)[1]
        timeout = self.timeout
        out = []
        seq = self.seq
        for _ in range(n):
            seq += 1
            t0 = clock()
            write("ping", [seq, text])
            v = get(timeout)
            if v[0] != seq:
                raise BenchCheckFailed(f"pong {v[0]} for ping {seq}")
            out.append(clock() - t0)
        self.seq = seq
        return out

    def warmup(self) -> None:
        self._rounds(WARMUP)

    def go(self, n: int) -> Dict[str, Any]:
        return _latency_result(self._rounds(n))

    def close(self) -> None:
        self.sub.close()
        self.client.close()


class SEReqServer:
    """``host.on("ping")`` callback returning the value: the reply of a request."""

    inline = False

    def __init__(self, kind: str, params: Dict[str, Any]) -> None:
        from socketengine import Host

        self.host = Host(port=0, timeout=5)
        self.port = self.host.port
        self.host.on("ping", lambda data, conn: data, inline=self.inline)

    def wait_ready(self, deadline: float) -> None:
        pass

    def measure(self, n: int, deadline: float) -> Dict[str, Any]:
        return {}

    def close(self) -> None:
        self.host.close()


class SEReqInlineServer(SEReqServer):
    """The same, answered by an inline handler (on the host's I/O thread)."""

    inline = True


class SEReqPinger:
    """``client.request("ping", value)``: send and block for the reply."""

    def __init__(self, kind: str, params: Dict[str, Any], port: int) -> None:
        from socketengine import Client

        self.client = Client(port=port, timeout=10, connect_timeout=10)
        self.timeout = float(params.get("timeout", 30))
        self.seq = 0

    def _rounds(self, n: int) -> List[int]:
        request = self.client.request
        clock = time.perf_counter_ns
        text = small_message(0)[1]
        timeout = self.timeout
        out = []
        seq = self.seq
        for _ in range(n):
            seq += 1
            t0 = clock()
            v = request("ping", [seq, text], timeout)
            if v[0] != seq:
                raise BenchCheckFailed(f"reply {v[0]} for request {seq}")
            out.append(clock() - t0)
        self.seq = seq
        return out

    def warmup(self) -> None:
        self._rounds(WARMUP)

    def go(self, n: int) -> Dict[str, Any]:
        return _latency_result(self._rounds(n))

    def close(self) -> None:
        self.client.close()


class SEAioReqPinger:
    """``await client.request("ping", value)`` from a ``socketengine.aio.Client``, its
    event loop running in a thread of the pinger (the host is the threaded one, with
    an inline handler): the round trip as asyncio code sees it."""

    def __init__(self, kind: str, params: Dict[str, Any], port: int) -> None:
        from socketengine import aio

        self.timeout = float(params.get("timeout", 30))
        self.aio = AioThread(self.timeout + 30)
        self.seq = 0

        async def start() -> Any:
            return await aio.Client(port=port, timeout=10, connect_timeout=10).start()

        self.client = self._run(start())

    def _run(self, coro: Any) -> Any:
        return self.aio.run(coro)

    async def _arounds(self, n: int) -> List[int]:
        request = self.client.request
        clock = time.perf_counter_ns
        text = small_message(0)[1]
        timeout = self.timeout
        out = []
        seq = self.seq
        for _ in range(n):
            seq += 1
            t0 = clock()
            v = await request("ping", [seq, text], timeout)
            if v[0] != seq:
                raise BenchCheckFailed(f"reply {v[0]} for request {seq}")
            out.append(clock() - t0)
        self.seq = seq
        return out

    def warmup(self) -> None:
        self._run(self._arounds(WARMUP))

    def go(self, n: int) -> Dict[str, Any]:
        return _latency_result(self._run(self._arounds(n)))

    def close(self) -> None:
        try:
            self._run(self.client.close())
        finally:
            self.aio.close()


class SEEchoServer(SEReqServer):
    """``host.on("ping", ..., inline=True)`` writes the value back on "pong" to its
    sender (``conn.write``), on the host's I/O thread."""

    def __init__(self, kind: str, params: Dict[str, Any]) -> None:
        from socketengine import Host

        self.host = Host(port=0, timeout=5)
        self.port = self.host.port

        def echo(data: Any, conn: Any) -> None:
            conn.write("pong", data)

        self.host.on("ping", echo, inline=True)


class SEWaitPinger(SEPinger):
    """``client.write("ping")`` then block in ``client.wait("pong")``.

    ``wait`` sees only values arriving after the call.  In one process the reply can be
    in before the pinger gets the GIL back from its ``send`` (the host's and the client's
    I/O threads run the whole round trip meanwhile), so ``get`` looks first; if the
    reply slips in between that look and ``wait``, the 50 ms wait times out and ``get``
    finds it: a lost race shows as a 50 ms outlier in p99, never a hang."""

    def _rounds(self, n: int) -> List[int]:
        c = self.client
        write = c.write
        wait = c.wait
        get = c.get
        clock = time.perf_counter_ns
        text = small_message(0)[1]
        deadline_ns = clock() + int(self.timeout * 1e9)
        out = []
        seq = self.seq
        for _ in range(n):
            seq += 1
            t0 = clock()
            write("ping", [seq, text])
            v = get("pong")  # the reply may already be in (see the class docstring)
            while v is None or v[0] != seq:
                try:
                    v = wait("pong", 0.05)
                except TimeoutError:
                    v = get("pong")
                    if v is not None and v[0] == seq:
                        break
                if clock() > deadline_ns:
                    raise BenchTimeout(f"timed out waiting for pong {seq}")
            out.append(clock() - t0)
        self.seq = seq
        return out


# -- pyzmq ------------------------------------------------------------------------------------


class ZmqServer:
    """REP socket served by a thread: recv, unpackb, packb, send."""

    def __init__(self, kind: str, params: Dict[str, Any]) -> None:
        import zmq

        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.REP)
        self.sock.setsockopt(zmq.RCVTIMEO, 100)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.stop = False
        self.thread = threading.Thread(target=self._echo, name="zmq-echo", daemon=True)
        self.thread.start()

    def _echo(self) -> None:
        import zmq

        sock = self.sock
        packb, unpackb = msgpack.packb, msgpack.unpackb
        while not self.stop:
            try:
                msg = sock.recv()
            except zmq.Again:
                continue
            except zmq.ZMQError:
                return
            sock.send(packb(unpackb(msg)))

    def wait_ready(self, deadline: float) -> None:
        pass

    def measure(self, n: int, deadline: float) -> Dict[str, Any]:
        return {}

    def close(self) -> None:
        self.stop = True
        self.thread.join(2)
        self.sock.close(linger=0)
        self.ctx.term()


class ZmqPinger:
    def __init__(self, kind: str, params: Dict[str, Any], port: int) -> None:
        import zmq

        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.REQ)
        timeout_ms = int(float(params.get("timeout", 30)) * 1000)
        self.sock.setsockopt(zmq.RCVTIMEO, timeout_ms)
        self.sock.setsockopt(zmq.SNDTIMEO, timeout_ms)
        self.sock.connect(f"tcp://127.0.0.1:{port}")
        self.seq = 0

    def _rounds(self, n: int) -> List[int]:
        import zmq

        send, recv = self.sock.send, self.sock.recv
        packb, unpackb = msgpack.packb, msgpack.unpackb
        clock = time.perf_counter_ns
        text = small_message(0)[1]
        out = []
        seq = self.seq
        for _ in range(n):
            seq += 1
            t0 = clock()
            send(packb([seq, text]))
            try:
                v = unpackb(recv())
            except zmq.Again:
                raise BenchTimeout(f"timed out waiting for reply {seq}") from None
            if v[0] != seq:
                raise BenchCheckFailed(f"REQ/REP reply {v[0]} for request {seq}")
            out.append(clock() - t0)
        self.seq = seq
        return out

    def warmup(self) -> None:
        self._rounds(WARMUP)

    def go(self, n: int) -> Dict[str, Any]:
        return _latency_result(self._rounds(n))

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


# -- raw TCP ---------------------------------------------------------------------------------


def _read_msg(sock: socket.socket, head: memoryview, buf: bytearray) -> Optional[memoryview]:
    if not recv_exact(sock, head):
        return None
    size = U32.unpack_from(head, 0)[0]
    view = memoryview(buf)[:size]
    if not recv_exact(sock, view):
        return None
    return view


class RawServer:
    """A thread accepts one connection, then reads ``u32 len | msgpack`` and echoes."""

    def __init__(self, kind: str, params: Dict[str, Any]) -> None:
        self.listener = raw_listener()
        self.port = self.listener.getsockname()[1]
        self.sock: Optional[socket.socket] = None
        self.accept_deadline = now() + float(params.get("timeout", 30))
        self.thread = threading.Thread(target=self._echo, name="raw-echo", daemon=True)
        self.thread.start()

    def _echo(self) -> None:
        try:
            self.sock = sock = raw_accept(self.listener, self.accept_deadline)
            head = memoryview(bytearray(4))
            buf = bytearray(1 << 16)
            packb, unpackb = msgpack.packb, msgpack.unpackb
            while True:
                msg = _read_msg(sock, head, buf)
                if msg is None:
                    return
                body = packb(unpackb(msg))
                sock.sendall(U32.pack(len(body)) + body)
        except (OSError, BenchTimeout):
            return

    def wait_ready(self, deadline: float) -> None:
        pass

    def measure(self, n: int, deadline: float) -> Dict[str, Any]:
        return {}

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        close_quietly(self.listener)
        self.thread.join(2)
        close_quietly(self.sock)


class RawPinger:
    def __init__(self, kind: str, params: Dict[str, Any], port: int) -> None:
        self.sock = raw_connect(port)
        self.sock.settimeout(float(params.get("timeout", 30)))
        self.seq = 0

    def _rounds(self, n: int) -> List[int]:
        sock = self.sock
        sendall = sock.sendall
        head = memoryview(bytearray(4))
        buf = bytearray(1 << 16)
        packb, unpackb = msgpack.packb, msgpack.unpackb
        pack_len = U32.pack
        clock = time.perf_counter_ns
        text = small_message(0)[1]
        out = []
        seq = self.seq
        for _ in range(n):
            seq += 1
            t0 = clock()
            body = packb([seq, text])
            sendall(pack_len(len(body)) + body)
            try:
                msg = _read_msg(sock, head, buf)
            except socket.timeout:
                raise BenchTimeout(f"timed out waiting for echo {seq}") from None
            if msg is None:
                raise BenchCheckFailed("the raw echo server closed the connection")
            v = unpackb(msg)
            if v[0] != seq:
                raise BenchCheckFailed(f"echo {v[0]} for request {seq}")
            out.append(clock() - t0)
        self.seq = seq
        return out

    def warmup(self) -> None:
        self._rounds(WARMUP)

    def go(self, n: int) -> Dict[str, Any]:
        return _latency_result(self._rounds(n))

    def close(self) -> None:
        close_quietly(self.sock)


SERVERS = {SE: SEServer, ZMQ: ZmqServer, RAW: RawServer}
PINGERS = {SE: SEPinger, ZMQ: ZmqPinger, RAW: RawPinger}
#: socketengine's implementation per roundtrip style; the anchors are the same for all.
STYLES = {
    "poll": (SEServer, SEPinger),
    "sub": (SESubServer, SESubPinger),
    "req": (SEReqServer, SEReqPinger),
    "req_inline": (SEReqInlineServer, SEReqPinger),
    "echo_wait": (SEEchoServer, SEWaitPinger),
    "aio_req": (SEReqInlineServer, SEAioReqPinger),
}
