"""Helpers shared by every workload: deadlines, polling, payloads, raw TCP, stats."""

from __future__ import annotations

import asyncio
import resource
import socket
import statistics
import struct
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

LOCALHOST = "127.0.0.1"

#: The libraries compared.  ``socketengine`` is measured, the others are anchors.
SE = "socketengine"
ZMQ = "pyzmq"
RAW = "raw-tcp"

#: Sleep between two polls of a "latest value" (seconds).  ``time.sleep(0)`` releases
#: the GIL without a timer wait, so I/O threads in the same process get to run; a
#: negative value polls without any sleep call.
POLL_SLEEP = 0.0
#: Sleep between two polls while waiting for the *last* value of a throughput run.
#: Polling with sleep(0) would take the GIL from the I/O thread thousands of times a
#: millisecond; 100 us adds at most 0.1 ms to runs that last 100+ ms.
WAIT_SLEEP = 1e-4

#: Length prefix of raw-TCP small messages and of raw-TCP image frames.
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")

#: Image frames: 1080p RGB.
IMAGE_SHAPE = (1080, 1920, 3)
#: Stamp (first 8 bytes of a frame) of the warm-up frame and of the last timed frame.
WARM_STAMP = 1 << 62
LAST_STAMP = (1 << 62) + 1
WARM_SEQ = -1

SMALL_TEXT = "x" * 100  # the 100-byte str of a small message


class BenchTimeout(RuntimeError):
    """A wait loop reached its deadline."""


class BenchCheckFailed(RuntimeError):
    """A workload finished but its result is wrong (lost or corrupted data)."""


def now() -> float:
    """Monotonic seconds.  CLOCK_MONOTONIC is system-wide on Linux, so values taken in
    different processes on the same machine can be subtracted."""
    return time.monotonic()


def deadline_in(seconds: float) -> float:
    return now() + seconds


def left(deadline: float) -> float:
    return max(0.0, deadline - now())


def wait_until(
    pred: Callable[[], Any], deadline: float, what: str, sleep: Optional[float] = None
) -> Any:
    """Poll ``pred()`` until it returns something truthy; raise at ``deadline``."""
    pause = WAIT_SLEEP if sleep is None else sleep
    snooze = time.sleep
    clock = time.monotonic
    while True:
        result = pred()
        if result:
            return result
        if clock() > deadline:
            raise BenchTimeout(f"timed out waiting for {what}")
        if pause >= 0:
            snooze(pause)


def small_message(seq: int) -> list:
    return [seq, SMALL_TEXT]


# -- images -------------------------------------------------------------------------------


def make_frames(pool: int = 4, seed: int = 1234) -> Dict[str, Any]:
    """Deterministic 1080p frames (same bytes in every process): a small pool cycled
    through during the timed loop, a warm-up frame and a distinct last frame."""
    import numpy as np

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=IMAGE_SHAPE, dtype=np.uint8)
    frames = []
    for i in range(pool):
        f = np.roll(base, i * 7919)
        stamp(f, i)
        frames.append(f)
    warm = base.copy()
    stamp(warm, WARM_STAMP)
    last = np.ascontiguousarray(base[::-1])
    stamp(last, LAST_STAMP)
    return {"pool": frames, "warm": warm, "last": last}


def stamp(frame: Any, value: int) -> None:
    frame.reshape(-1)[:8].view("<u8")[0] = value


def stamp_of(frame: Any) -> int:
    """The stamp of an ndarray frame or of a raw frame buffer; -1 for ``None``."""
    if frame is None:
        return -1
    if hasattr(frame, "reshape"):
        return int(frame.reshape(-1)[:8].view("<u8")[0])
    return int(U64.unpack_from(frame, 0)[0])


def frame_nbytes() -> int:
    h, w, c = IMAGE_SHAPE
    return h * w * c


# -- raw TCP ------------------------------------------------------------------------------


def raw_listener(backlog: int = 128) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((LOCALHOST, 0))
    sock.listen(backlog)
    return sock


def raw_connect(port: int, timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection((LOCALHOST, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(None)
    return sock


def raw_accept(listener: socket.socket, deadline: float) -> socket.socket:
    listener.settimeout(max(0.01, left(deadline)))
    try:
        sock, _ = listener.accept()
    except socket.timeout:
        raise BenchTimeout("timed out waiting for a raw TCP connection") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(None)
    return sock


def recv_exact(sock: socket.socket, view: memoryview) -> bool:
    """Fill ``view`` from ``sock``; False on EOF."""
    got = 0
    total = len(view)
    while got < total:
        n = sock.recv_into(view[got:])
        if n == 0:
            return False
        got += n
    return True


def close_quietly(*things: Any) -> None:
    for thing in things:
        if thing is None:
            continue
        try:
            thing.close()
        except Exception:
            pass


class AioThread:
    """An asyncio event loop running in a thread of its own: how the asyncio workloads
    run their coroutines beside the (threaded) receivers, in one process or two."""

    def __init__(self, timeout: float = 60.0) -> None:
        self.timeout = timeout
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="bench-aio", daemon=True)
        self.thread.start()

    def run(self, coro: Any) -> Any:
        """Run ``coro`` on the loop; return its result (``timeout`` s at most)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(self.timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.thread.is_alive():
            self.loop.close()


# -- process / machine ------------------------------------------------------------------


def raise_nofile(want: int = 8192) -> int:
    """Raise the soft RLIMIT_NOFILE towards ``want`` (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def proc_status(pid: int) -> Dict[str, int]:
    """VmRSS (kB) and Threads of process ``pid`` from /proc/<pid>/status."""
    out: Dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "Threads", "VmHWM"):
                out[key] = int(rest.split()[0])
    return out


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- statistics -------------------------------------------------------------------------------


def summary(values: Sequence[Optional[float]]) -> Optional[Dict[str, Any]]:
    """Median, min and max of the runs that produced a value (``None`` if none did)."""
    good = [v for v in values if v is not None]
    if not good:
        return None
    return {
        "median": statistics.median(good),
        "min": min(good),
        "max": max(good),
        "runs": list(values),
    }


def percentile(sorted_values: List[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        raise ValueError("no values")
    k = max(0, min(len(sorted_values) - 1, int(round(q / 100.0 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


def pair_ratios(
    mine: Sequence[Optional[float]], theirs: Sequence[Optional[float]]
) -> List[Optional[float]]:
    """``mine[i] / theirs[i]`` for every run index where both exist."""
    out: List[Optional[float]] = []
    for a, b in zip(mine, theirs):
        out.append(a / b if a is not None and b not in (None, 0) else None)
    return out


def raw_msg_loop(sock: socket.socket, state: Any) -> None:
    """Parse ``u32 length | msgpack`` messages from ``sock`` until EOF, keeping the
    latest in ``state.latest`` / ``state.seq`` and counting those with seq >= 0 in
    ``state.count``.  Runs in a receiver thread."""
    import msgpack

    cap = 1 << 20
    buf = bytearray(cap)
    view = memoryview(buf)
    unpack_len = U32.unpack_from
    unpackb = msgpack.unpackb
    r = w = 0
    while True:
        if cap - w < 65536:
            pending = w - r
            buf[:pending] = buf[r:w]
            r, w = 0, pending
        n = sock.recv_into(view[w:])
        if n == 0:
            return
        w += n
        while w - r >= 4:
            size = unpack_len(buf, r)[0]
            end = r + 4 + size
            if end > w:
                break
            v = unpackb(view[r + 4 : end])
            r = end
            state.latest = v
            if v[0] >= 0:
                state.count += 1
            state.seq = v[0]
        if r == w:
            r = w = 0
