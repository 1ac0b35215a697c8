"""One-way streams: ``small`` messages and ``images``, client -> host.

Every library gets a *receiver* (the side that binds, like a socketengine Host) and a
*sender* (the side that connects, like a Client).  The receiver decodes in a background
thread and keeps the latest value; whoever waits for the last value polls it, exactly
as a socketengine program polls ``host.get(channel)``.

Receiver API: ``port``, ``wait_ready(deadline)``, ``measure(n, deadline) -> dict``,
``close()``.  Sender API: ``warmup()``, ``go(n) -> dict``, ``close()``.  The same objects
run in one process (sender and receiver threads side by side) or in two (see
:mod:`bench.xproc`).
"""

from __future__ import annotations

import asyncio
import functools
import socket
import threading
from typing import Any, Dict, List, Optional

import msgpack

from .common import (
    LAST_STAMP,
    RAW,
    SE,
    U32,
    U64,
    WAIT_SLEEP,
    WARM_SEQ,
    WARM_STAMP,
    ZMQ,
    AioThread,
    BenchCheckFailed,
    BenchTimeout,
    close_quietly,
    deadline_in,
    frame_nbytes,
    make_frames,
    now,
    raw_accept,
    raw_connect,
    raw_listener,
    raw_msg_loop,
    recv_exact,
    small_message,
    stamp_of,
    wait_until,
)

CHANNEL = {"small": "small", "images": "image", "arrays": "frame"}
#: How the socketengine sender writes small messages: one ``write`` each, or
#: ``write_many`` with MANY_CHUNK messages a call, or ``aio``: a coroutine on an event
#: loop awaiting one ``socketengine.aio.Client.write`` each.  With ``aio`` every anchor
#: sends from a coroutine too (pyzmq: ``zmq.asyncio`` PUSH, ``await send``; raw TCP:
#: ``StreamWriter.write`` then ``await drain()``, the streams idiom); the receivers are
#: the same threaded ones.
SENDER_STYLES = ("write", "many", "aio")
MANY_CHUNK = 1000
#: Kinds whose values are 1080p frames.  ``images``: socketengine sends with
#: ``write_image`` (a queued, unsent frame may be replaced by a newer one);
#: ``arrays``: ``write(channel, ndarray)`` (never conflated).  Anchors: the same for both.
FRAME_KINDS = ("images", "arrays")
#: How socketengine's receiving program waits for the last frame (the anchors always
#: block in ``recv`` on their own thread, with the waiter polling every 100 us):
#: ``poll``: ``host.get`` every ``WAIT_SLEEP`` (100 us); ``wait``: blocks in
#: ``host.wait(channel)``; ``busy``: the seed README's loop, ``host.get_ALL`` without
#: any sleep; ``aio``: the receiving program is asyncio (small messages only):
#: socketengine's ``aio.Host``, pyzmq's ``zmq.asyncio`` PULL awaiting ``recv``, raw
#: TCP an ``asyncio`` server reading with ``StreamReader.readexactly``; in each a
#: coroutine on the same event loop polls the latest value every ``WAIT_SLEEP``.
READERS = ("poll", "wait", "busy", "aio")


def _check_images(received: Any, frames: Dict[str, Any]) -> None:
    import numpy as np

    last = frames["last"]
    if received is None or not np.array_equal(np.asarray(received).reshape(last.shape), last):
        raise BenchCheckFailed("the last image frame did not arrive intact")


def _sent(kind: str, n: int, count: int) -> None:
    """Every small message must arrive.  Image frames may be conflated (socketengine
    replaces a queued, unsent frame by a newer one): the metrics count delivered
    frames, and the last frame is checked byte for byte."""
    if kind == "images":
        if count < 1:
            raise BenchCheckFailed("images: no frame arrived")
        return
    if count < n:
        raise BenchCheckFailed(f"{kind}: only {count} of {n} messages arrived")


# -- socketengine -----------------------------------------------------------------------------


class SEReceiver:
    def __init__(self, kind: str, params: Dict[str, Any]) -> None:
        from socketengine import Host

        self.kind = kind
        self.channel = CHANNEL[kind]
        self.frames = make_frames() if kind in FRAME_KINDS else None
        self.reader = params.get("reader", "poll")
        if self.reader not in READERS or self.reader == "aio":
            raise ValueError(
                f"the threaded receiver's reader is poll, wait or busy, not {self.reader!r}"
            )
        self.host = Host(port=0, timeout=5)
        self.port = self.host.port

    def _seq(self) -> int:
        v = self.host.get(self.channel)
        if v is None:
            return -2
        return stamp_of(v) if self.kind in FRAME_KINDS else v[0]

    def wait_ready(self, deadline: float) -> None:
        warm = WARM_STAMP if self.kind in FRAME_KINDS else WARM_SEQ
        wait_until(lambda: self._seq() == warm, deadline, "the warm-up value", sleep=0.001)

    def measure(self, n: int, deadline: float) -> Dict[str, Any]:
        h = self.host
        ch = self.channel
        self._last = n - 1
        if self.kind == "small":
            last = n - 1

            def done() -> bool:
                v = h.get(ch)
                return v is not None and v[0] == last

        else:

            def done() -> bool:
                return stamp_of(h.get(ch)) == LAST_STAMP

        if self.reader == "busy":
            self._busy_read(deadline)
        elif self.reader == "wait":
            self._wait_read(done, deadline)
        else:
            wait_until(done, deadline, f"the last {self.kind} value")
        t_end = now()
        if self.kind in FRAME_KINDS:
            _check_images(h.get(ch), self.frames)  # type: ignore[arg-type]
        conns = h.clients()
        if not conns:
            raise BenchCheckFailed(f"{self.kind}: the client is gone")
        if self.kind == "images":
            # Counted when each frame arrives, before it becomes the latest value.
            stats = h.stats()["images"]["received"].get(ch, {})
            delivered = int(stats.get("frames", 0)) - 1  # minus the warm-up frame
        else:
            # ``messages_in`` is bumped once per received batch, just *after* the
            # batch's values are visible: give the I/O thread a moment (after t_end).
            conn = conns[0]
            try:
                wait_until(
                    lambda: conn.messages_in - 1 >= n, deadline_in(2.0), "messages_in", 0.001
                )
            except BenchTimeout:
                pass  # _sent() reports the shortfall
            delivered = conn.messages_in - 1
        _sent(self.kind, n, delivered)
        return {"t_end": t_end, "delivered": delivered}

    def _busy_read(self, deadline: float) -> None:
        """``while True: data = h.get_ALL(channel)``, no sleep: how the seed reads."""
        get_all = self.host.get_ALL
        ch = self.channel
        clock = now
        if self.kind == "small":
            last = self._last
            while True:
                data = get_all(ch)
                if data and data[-1] is not None and data[-1][0] == last:
                    return
                if clock() > deadline:
                    raise BenchTimeout(f"timed out waiting for the last {self.kind} value")
        while True:
            data = get_all(ch)
            if data and stamp_of(data[-1]) == LAST_STAMP:
                return
            if clock() > deadline:
                raise BenchTimeout(f"timed out waiting for the last {self.kind} value")

    def _wait_read(self, done: Any, deadline: float) -> None:
        """Block in ``host.wait(channel)`` for each value until the last one.  ``wait``
        sees only values arriving after the call: the latest value is checked before
        each wait, and a wait that times out (the last value slipped in between) checks
        it again, so a lost race costs 50 ms (visible in the figures), never a hang."""
        wait = self.host.wait
        ch = self.channel
        frames_kind = self.kind in FRAME_KINDS
        last = LAST_STAMP if frames_kind else self._last
        while not done():
            if now() > deadline:
                raise BenchTimeout(f"timed out waiting for the last {self.kind} value")
            try:
                value, _conn = wait(ch, 0.05)
            except TimeoutError:
                continue
            if (stamp_of(value) if frames_kind else value[0]) == last:
                return

    def close(self) -> None:
        self.host.close()


class SESender:
    def __init__(self, kind: str, params: Dict[str, Any], port: int) -> None:
        from socketengine import Client

        self.kind = kind
        self.channel = CHANNEL[kind]
        self.frames = make_frames() if kind in FRAME_KINDS else None
        self.sender = _sender_style(kind, params)
        self.aio: Optional[AioThread] = None
        if self.sender == "aio":
            from socketengine import aio

            self.aio = AioThread()

            async def start() -> Any:
                return await aio.Client(port=port, timeout=30, connect_timeout=10).start()

            self.client = self.aio.run(start())
        else:
            self.client = Client(port=port, timeout=30, connect_timeout=10)

    async def _aio_go(self, n: int) -> Dict[str, Any]:
        write = self.client.write
        ch = self.channel
        text = small_message(0)[1]
        t0 = now()
        for i in range(n):
            await write(ch, [i, text])
        return {"t0": t0, "t_sent": now()}

    def warmup(self) -> None:
        if self.aio is not None:
            self.aio.run(self.client.write(self.channel, small_message(WARM_SEQ)))
        elif self.kind == "images":
            self.client.write_image(self.frames["warm"], self.channel)  # type: ignore[index]
        elif self.kind == "arrays":
            self.client.write(self.channel, self.frames["warm"])  # type: ignore[index]
        else:
            self.client.write(self.channel, small_message(WARM_SEQ))

    def go(self, n: int) -> Dict[str, Any]:
        if self.aio is not None:
            return self.aio.run(self._aio_go(n))  # type: ignore[no-any-return]
        c = self.client
        ch = self.channel
        t0 = now()
        if self.kind == "small" and self.sender == "many":
            # write_many: the same messages, MANY_CHUNK to a call (each still arrives
            # as its own value, in order).
            write_many = c.write_many
            text = small_message(0)[1]
            for start in range(0, n, MANY_CHUNK):
                write_many([(ch, [i, text]) for i in range(start, min(n, start + MANY_CHUNK))])
        elif self.kind == "small":
            write = c.write
            text = small_message(0)[1]
            for i in range(n):
                write(ch, [i, text])
        elif self.kind == "images":
            pool = self.frames["pool"]  # type: ignore[index]
            write_image = c.write_image
            for i in range(n - 1):
                write_image(pool[i % len(pool)], ch)
            write_image(self.frames["last"], ch)  # type: ignore[index]
        else:  # arrays: the plain write() of an ndarray (never conflated)
            pool = self.frames["pool"]  # type: ignore[index]
            write = c.write
            for i in range(n - 1):
                write(ch, pool[i % len(pool)])
            write(ch, self.frames["last"])  # type: ignore[index]
        return {"t0": t0, "t_sent": now()}

    def close(self) -> None:
        if self.aio is None:
            self.client.close()
            return
        try:
            self.aio.run(self.client.close())
        finally:
            self.aio.close()


def _sender_style(kind: str, params: Dict[str, Any]) -> str:
    style = params.get("sender", "write")
    if style not in SENDER_STYLES:
        raise ValueError(f"sender must be one of {SENDER_STYLES}, not {style!r}")
    if style == "aio" and kind != "small":
        raise ValueError("the aio sender sends small messages only")
    return str(style)


# -- pyzmq ------------------------------------------------------------------------------------


class ZmqReceiver:
    """PULL socket; a thread receives, decodes and keeps the latest value."""

    def __init__(self, kind: str, params: Dict[str, Any]) -> None:
        import zmq

        self.kind = kind
        self.frames = make_frames() if kind in FRAME_KINDS else None
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PULL)
        self.sock.setsockopt(zmq.RCVTIMEO, 100)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.latest: Any = None
        self.seq = -2
        self.count = 0
        self.stop = False
        self.thread = threading.Thread(target=self._run, name="zmq-recv", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import zmq

        sock = self.sock
        unpackb = msgpack.unpackb
        images = self.kind in FRAME_KINDS
        if images:
            import numpy as np

            shape = self.frames["last"].shape  # type: ignore[index]
        while not self.stop:
            try:
                msg = sock.recv(copy=not images)
            except zmq.Again:
                continue
            except zmq.ZMQError:
                return
            if images:
                arr = np.frombuffer(msg.buffer, dtype=np.uint8).reshape(shape)  # type: ignore[union-attr]
                seq = stamp_of(arr)
                self.latest = arr
                if seq != WARM_STAMP:
                    self.count += 1
                self.seq = seq
            else:
                v = unpackb(msg)
                self.latest = v
                if v[0] >= 0:
                    self.count += 1
                self.seq = v[0]

    def wait_ready(self, deadline: float) -> None:
        warm = WARM_STAMP if self.kind in FRAME_KINDS else WARM_SEQ
        wait_until(lambda: self.seq == warm, deadline, "the warm-up value", sleep=0.001)

    def measure(self, n: int, deadline: float) -> Dict[str, Any]:
        last = LAST_STAMP if self.kind in FRAME_KINDS else n - 1
        wait_until(lambda: self.seq == last, deadline, f"the last {self.kind} value")
        t_end = now()
        if self.kind in FRAME_KINDS:
            _check_images(self.latest, self.frames)  # type: ignore[arg-type]
        _sent(self.kind, n, self.count)
        return {"t_end": t_end, "delivered": self.count}

    def close(self) -> None:
        self.stop = True
        self.thread.join(2)
        self.sock.close(linger=0)
        self.ctx.term()


class ZmqSender:
    """PUSH socket; msgpack for small messages, ``send(frame, copy=False)`` for images
    (what imagezmq does).  ``sender="aio"``: a ``zmq.asyncio`` PUSH socket on an event
    loop, one ``await send`` per message."""

    def __init__(self, kind: str, params: Dict[str, Any], port: int) -> None:
        import zmq

        self.kind = kind
        self.frames = make_frames() if kind in FRAME_KINDS else None
        self.aio: Optional[AioThread] = None
        if _sender_style(kind, params) == "aio":
            import zmq.asyncio

            self.aio = AioThread()
            self.ctx: Any = zmq.asyncio.Context()
        else:
            self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.SNDTIMEO, 30000)
        self.sock.connect(f"tcp://127.0.0.1:{port}")

    async def _aio_go(self, n: int) -> Dict[str, Any]:
        send = self.sock.send
        packb = msgpack.packb
        text = small_message(0)[1]
        t0 = now()
        for i in range(n):
            await send(packb([i, text]))
        return {"t0": t0, "t_sent": now()}

    def warmup(self) -> None:
        if self.aio is not None:
            sock = self.sock

            async def send_warm() -> None:  # on the loop's thread, like every send
                await sock.send(msgpack.packb(small_message(WARM_SEQ)))

            self.aio.run(send_warm())
        elif self.kind in FRAME_KINDS:
            self.sock.send(self.frames["warm"], copy=False)  # type: ignore[index]
        else:
            self.sock.send(msgpack.packb(small_message(WARM_SEQ)))

    def go(self, n: int) -> Dict[str, Any]:
        if self.aio is not None:
            return self.aio.run(self._aio_go(n))  # type: ignore[no-any-return]
        send = self.sock.send
        t0 = now()
        if self.kind == "small":
            packb = msgpack.packb
            text = small_message(0)[1]
            for i in range(n):
                send(packb([i, text]))
        else:
            pool = self.frames["pool"]  # type: ignore[index]
            for i in range(n - 1):
                send(pool[i % len(pool)], copy=False)
            send(self.frames["last"], copy=False)  # type: ignore[index]
        return {"t0": t0, "t_sent": now()}

    def close(self) -> None:
        if self.aio is None:
            self.sock.close(linger=5000)
            self.ctx.term()
            return
        sock = self.sock

        async def shut() -> None:  # the loop's reader of the socket goes with it
            sock.close(linger=5000)

        try:
            self.aio.run(shut())
            self.ctx.term()
        finally:
            self.aio.close()


# -- raw TCP ---------------------------------------------------------------------------------


class RawReceiver:
    """A listening socket; a thread accepts one connection and parses its stream.

    Small messages: ``u32 length | msgpack``.  Images: ``u64 length | pixels`` received
    with ``recv_into`` straight into one preallocated buffer.
    """

    def __init__(self, kind: str, params: Dict[str, Any]) -> None:
        self.kind = kind
        self.frames = make_frames() if kind in FRAME_KINDS else None
        self.listener = raw_listener()
        self.port = self.listener.getsockname()[1]
        self.sock: Optional[socket.socket] = None
        self.latest: Any = None
        self.seq = -2
        self.count = 0
        self.error: Optional[BaseException] = None
        self.accept_deadline = now() + float(params.get("timeout", 30))
        self.thread = threading.Thread(target=self._run, name="raw-recv", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.sock = raw_accept(self.listener, self.accept_deadline)
            if self.kind in FRAME_KINDS:
                self._run_images(self.sock)
            else:
                self._run_small(self.sock)
        except OSError:
            pass  # closed under us
        except BaseException as exc:  # reported by measure()
            self.error = exc

    def _run_small(self, sock: socket.socket) -> None:
        raw_msg_loop(sock, self)

    def _run_images(self, sock: socket.socket) -> None:
        head = bytearray(8)
        head_view = memoryview(head)
        body = bytearray(frame_nbytes())
        body_view = memoryview(body)
        self.latest = body
        while True:
            if not recv_exact(sock, head_view):
                return
            size = U64.unpack_from(head, 0)[0]
            if size != len(body):
                raise BenchCheckFailed(f"raw image frame of {size} bytes, expected {len(body)}")
            if not recv_exact(sock, body_view):
                return
            seq = U64.unpack_from(body, 0)[0]
            if seq != WARM_STAMP:
                self.count += 1
            self.seq = seq

    def wait_ready(self, deadline: float) -> None:
        warm = WARM_STAMP if self.kind in FRAME_KINDS else WARM_SEQ
        wait_until(
            lambda: self.seq == warm or self.error, deadline, "the warm-up value", sleep=0.001
        )
        if self.error:
            raise self.error

    def measure(self, n: int, deadline: float) -> Dict[str, Any]:
        last = LAST_STAMP if self.kind in FRAME_KINDS else n - 1
        wait_until(lambda: self.seq == last or self.error, deadline, f"the last {self.kind} value")
        t_end = now()
        if self.error:
            raise self.error
        if self.kind in FRAME_KINDS:
            _check_images(self.latest, self.frames)  # type: ignore[arg-type]
        _sent(self.kind, n, self.count)
        return {"t_end": t_end, "delivered": self.count}

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        close_quietly(self.listener)
        self.thread.join(2)
        close_quietly(self.sock)


class RawSender:
    """Length-prefixed messages with ``sendall``.  ``sender="aio"``: the same bytes
    through an asyncio ``StreamWriter`` (``write``, then ``await drain()``) on an event
    loop."""

    def __init__(self, kind: str, params: Dict[str, Any], port: int) -> None:
        self.kind = kind
        self.frames = make_frames() if kind in FRAME_KINDS else None
        self.sock = raw_connect(port)
        self.head = U64.pack(frame_nbytes())
        self.aio: Optional[AioThread] = None
        self.writer: Any = None
        if _sender_style(kind, params) == "aio":
            import asyncio

            self.aio = AioThread()

            async def wrap() -> Any:
                return (await asyncio.open_connection(sock=self.sock))[1]

            self.writer = self.aio.run(wrap())

    def _send_frame(self, frame: Any) -> None:
        self.sock.sendall(self.head)
        self.sock.sendall(frame)

    async def _aio_send(self, body: bytes) -> None:
        self.writer.write(U32.pack(len(body)) + body)
        await self.writer.drain()

    async def _aio_go(self, n: int) -> Dict[str, Any]:
        writer = self.writer
        packb = msgpack.packb
        pack_len = U32.pack
        text = small_message(0)[1]
        t0 = now()
        for i in range(n):
            body = packb([i, text])
            writer.write(pack_len(len(body)) + body)
            await writer.drain()
        return {"t0": t0, "t_sent": now()}

    def warmup(self) -> None:
        if self.aio is not None:
            self.aio.run(self._aio_send(msgpack.packb(small_message(WARM_SEQ))))
        elif self.kind in FRAME_KINDS:
            self._send_frame(self.frames["warm"])  # type: ignore[index]
        else:
            body = msgpack.packb(small_message(WARM_SEQ))
            self.sock.sendall(U32.pack(len(body)) + body)

    def go(self, n: int) -> Dict[str, Any]:
        if self.aio is not None:
            return self.aio.run(self._aio_go(n))  # type: ignore[no-any-return]
        sendall = self.sock.sendall
        t0 = now()
        if self.kind == "small":
            packb = msgpack.packb
            pack_len = U32.pack
            text = small_message(0)[1]
            for i in range(n):
                body = packb([i, text])
                sendall(pack_len(len(body)) + body)
        else:
            pool = self.frames["pool"]  # type: ignore[index]
            send_frame = self._send_frame
            for i in range(n - 1):
                send_frame(pool[i % len(pool)])
            send_frame(self.frames["last"])  # type: ignore[index]
        return {"t0": t0, "t_sent": now()}

    def close(self) -> None:
        if self.aio is None:
            close_quietly(self.sock)
            return
        writer = self.writer

        async def shut() -> None:
            writer.close()
            await writer.wait_closed()

        try:
            self.aio.run(shut())
        finally:
            self.aio.close()


# -- asyncio receivers (reader="aio") ----------------------------------------------------------


class _AioReceiver:
    """A receiving program written with asyncio, on an event loop in a thread of its own
    (:class:`AioThread`).  Its ``_watch`` coroutine polls the latest value every
    ``WAIT_SLEEP`` on that same loop, as an asyncio program would (``asyncio.sleep``),
    so the figures include what the loop does between two looks.  Small messages only.
    Subclasses open the receiving side in ``_start`` (on the loop) and say how far it
    got in ``_seq``; ``_count`` is how many measured messages arrived."""

    def __init__(self, kind: str, params: Dict[str, Any]) -> None:
        if kind != "small":
            raise ValueError("the asyncio receivers receive small messages only")
        self.kind = kind
        self.channel = CHANNEL[kind]
        self.aio = AioThread()
        try:
            self.port: int = self.aio.run(self._start())
        except BaseException:
            self.aio.close()
            raise

    async def _start(self) -> int:  # pragma: no cover - overridden
        raise NotImplementedError

    async def _stop(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _seq(self) -> int:  # pragma: no cover - overridden
        raise NotImplementedError

    def _count(self) -> int:  # pragma: no cover - overridden
        raise NotImplementedError

    async def _watch(self, target: int, deadline: float, what: str) -> float:
        seq = self._seq
        while seq() != target:
            if now() > deadline:
                raise BenchTimeout(f"timed out waiting for {what}")
            await asyncio.sleep(WAIT_SLEEP)
        return now()

    def wait_ready(self, deadline: float) -> None:
        self.aio.run(self._watch(WARM_SEQ, deadline, "the warm-up value"))

    def measure(self, n: int, deadline: float) -> Dict[str, Any]:
        t_end = self.aio.run(self._watch(n - 1, deadline, f"the last {self.kind} value"))
        count = self._count()
        _sent(self.kind, n, count)
        return {"t_end": t_end, "delivered": count}

    def close(self) -> None:
        try:
            self.aio.run(self._stop())
        finally:
            self.aio.close()


class SEAioReceiver(_AioReceiver):
    """``socketengine.aio.Host``; the watcher reads ``host.get(channel)``."""

    async def _start(self) -> int:
        from socketengine import aio

        self.host = await aio.Host(port=0, timeout=5).start()
        return int(self.host.port)

    async def _stop(self) -> None:
        await self.host.close()

    def _seq(self) -> int:
        v = self.host.get(self.channel)
        return -2 if v is None else int(v[0])

    def _count(self) -> int:
        conns = self.host.clients()
        if not conns:
            raise BenchCheckFailed(f"{self.kind}: the client is gone")
        return int(conns[0].messages_in) - 1  # minus the warm-up value


class _LatestOf:
    """What the anchors' receiving coroutines keep: the latest value, its sequence
    number, and how many measured (seq >= 0) messages arrived."""

    def __init__(self) -> None:
        self.latest: Any = None
        self.seq = -2
        self.count = 0

    def keep(self, v: Any) -> None:
        self.latest = v
        if v[0] >= 0:
            self.count += 1
        self.seq = v[0]


class _AioAnchor(_AioReceiver):
    """An anchor's asyncio receiver: its receiving coroutine keeps a :class:`_LatestOf`."""

    def __init__(self, kind: str, params: Dict[str, Any]) -> None:
        self.state = _LatestOf()
        super().__init__(kind, params)

    def _seq(self) -> int:
        return int(self.state.seq)

    def _count(self) -> int:
        return self.state.count


class ZmqAioReceiver(_AioAnchor):
    """A ``zmq.asyncio`` PULL socket; a coroutine awaits ``recv`` and decodes each."""

    async def _start(self) -> int:
        import zmq
        import zmq.asyncio

        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.PULL)
        self.sock.setsockopt(zmq.LINGER, 0)
        port = int(self.sock.bind_to_random_port("tcp://127.0.0.1"))
        self.task = asyncio.ensure_future(self._recv_loop())
        return port

    async def _recv_loop(self) -> None:
        recv = self.sock.recv
        unpackb = msgpack.unpackb
        keep = self.state.keep
        while True:
            keep(unpackb(await recv()))

    async def _stop(self) -> None:
        self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            pass
        self.sock.close(linger=0)
        self.ctx.term()


class RawAioReceiver(_AioAnchor):
    """``asyncio.start_server``; the connection's coroutine reads ``u32 length |
    msgpack`` messages with ``StreamReader.readexactly`` (the streams idiom)."""

    async def _start(self) -> int:
        self.tasks: List[asyncio.Task[Any]] = []
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.tasks.append(task)
        readexactly = reader.readexactly
        unpack_len = U32.unpack
        unpackb = msgpack.unpackb
        keep = self.state.keep
        try:
            while True:
                size = unpack_len(await readexactly(4))[0]
                keep(unpackb(await readexactly(size)))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _stop(self) -> None:
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()


_THREADED = {SE: SEReceiver, ZMQ: ZmqReceiver, RAW: RawReceiver}
_ASYNCIO = {SE: SEAioReceiver, ZMQ: ZmqAioReceiver, RAW: RawAioReceiver}


def _receiver(lib: str, kind: str, params: Dict[str, Any]) -> Any:
    """``lib``'s threaded receiver, or its asyncio one for ``reader="aio"``."""
    return (_ASYNCIO if params.get("reader") == "aio" else _THREADED)[lib](kind, params)


#: ``RECEIVERS[lib](kind, params)``; partials of a module-level function, so
#: :mod:`bench.xproc` can hand them to another process.
RECEIVERS = {lib: functools.partial(_receiver, lib) for lib in _THREADED}
SENDERS = {SE: SESender, ZMQ: ZmqSender, RAW: RawSender}
